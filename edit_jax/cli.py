"""`edit-jax` command line: a thin layer that parses arguments and calls the library.

Bad input raises `UserError`, which is printed as one line (`error: ...`) with exit status 2;
a lost peer process in a multi-process run (`PeerFailure`) likewise, with exit status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from edit_jax.errors import PeerFailure, UserError, exit_at_once


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edit-jax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="train (or resume) a model",
        description="Train a Llama on the ('replica', 'shard') mesh. Rerunning the same command "
                    "resumes from the newest checkpoint in run.run_dir.")
    train.add_argument("--config",
                       help="YAML file or a bundled config name (tiny, small, 350m, 1b, ...)")
    train.add_argument("--coordinator-address", help="HOST:PORT of process 0 (multi-host runs)")
    train.add_argument("--num-processes", type=int, help="number of processes (multi-host runs)")
    train.add_argument("--process-id", type=int, help="this process's index (multi-host runs)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted config overrides, e.g. run.steps=100 mesh.replica=4")
    prepare = commands.add_parser(
        "prepare", help="tokenize a corpus once into token shards for data.source=tokens",
        description="Tokenize the documents the config names (data.source=bundled, or files: "
                    ".txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet) with data.tokenizer into "
                    "flat token shards (one .bin per shard, uint16 or uint32, documents ended "
                    "by EOS) plus index.json, in parallel over files. Every k-th document "
                    "(k = 1/data.val_fraction) is held out for validation. Rerunning resumes: "
                    "finished files are kept. Train on the result with data.source=tokens "
                    "data.paths=[DIR].")
    prepare.add_argument("--out", required=True, metavar="DIR", help="directory for the shards")
    prepare.add_argument("--workers", type=int, metavar="N",
                         help="worker processes, one file each (default: all cores)")
    prepare.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                         help="tokens per shard, about (default: 100,000,000)")
    prepare.add_argument("--config", help="YAML file or a bundled config name")
    prepare.add_argument("overrides", nargs="*", metavar="key=value",
                         help="dotted config overrides, e.g. data.source=files "
                              "'data.paths=[corpus/*.jsonl.zst]' data.tokenizer=tok.json")
    inspect = commands.add_parser(
        "inspect", help="collective bytes and memory of the compiled train steps",
        description="Compile every step plan the configured method runs (nothing is allocated; "
                    "dreamddp without a profile first times its layers on one device) "
                    "and report, per device, the collective bytes over each mesh axis (loops "
                    "counted), compiled memory, parameter and outer-state sizes.")
    _report_arguments(inspect, "method.name=diloco")
    launch = commands.add_parser(
        "launch", help="run `train` as N local processes (multi-process on one machine)",
        description="Start N `edit-jax train` processes on this machine, joined by "
                    "jax.distributed on a free localhost port, each with D fake CPU devices "
                    "(JAX_PLATFORMS defaults to cpu), so that with mesh.replica=N each process "
                    "holds one replica. Output is prefixed [p0], [p1], ...; if one process fails "
                    "the others are stopped; Ctrl-C reaches all of them (they save a checkpoint "
                    "and exit). For trying multi-process runs on one machine: on a cluster, run "
                    "`edit-jax train --coordinator-address HOST:PORT --num-processes N "
                    "--process-id I` once per host instead.")
    launch.add_argument("--processes", type=int, required=True, metavar="N",
                        help="number of processes")
    launch.add_argument("--devices-per-process", type=int, metavar="D",
                        help="fake CPU devices per process (default: mesh.num_cpu_devices / N)")
    launch.add_argument("--link-mbit", type=float, metavar="RATE",
                        help="run the 2 processes in network namespaces joined by a link of "
                             "RATE Mbit/s each way, so all their traffic crosses a real slow "
                             "link (Linux, root, iproute2)")
    launch.add_argument("--config", help="YAML file or a bundled config name")
    launch.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, passed to every process")
    schedule = commands.add_parser(
        "schedule", help="DreamDDP's layer-wise sync schedule and its predicted iteration time",
        description="Build DreamDDP's schedule for the configured model, mesh and link "
                    "(method.link_gbps, method.link_latency_ms) from per-layer backward times "
                    "measured on these devices (or method.layer_profile, a JSON profile), and "
                    "print it with the predicted time per iteration next to full-model local "
                    "SGD and PLSGD over a period of method.sync_every iterations.")
    _report_arguments(schedule, "method.link_gbps=0.1")
    plot = commands.add_parser(
        "plot", help="loss curves of several runs in one PNG",
        description="Plot the validation loss of each run directory in one PNG, on a "
                    "y-range that shows the last three quarters of training, labelled by what "
                    "tells the runs apart (method and settings from each run's config.json).")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run.run_dir of each run")
    plot.add_argument("--x", default="tokens", choices=["tokens", "step", "wall_time",
                                                        "replica_bytes"],
                      help="x axis: tokens, step, wall_time, or the bytes each device sent over "
                           "replica (default: tokens)")
    plot.add_argument("--out", default="loss.png", metavar="FILE.png",
                      help="where to write the PNG (default: loss.png)")
    plot.add_argument("--train", action="store_true",
                      help="also the train loss (smoothed), on the full y-range")
    plot.add_argument("--sync", action="store_true",
                      help="panels of the replicas' sync weights (and of uneven local steps)")
    export = commands.add_parser(
        "export", help="a checkpoint as a Hugging Face Llama directory",
        description="Write one checkpoint of a run as a directory that transformers' "
                    "LlamaForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load "
                    "(config.json, model.safetensors in float32, tokenizer.json, ...), and that "
                    "model.init_from=DIR starts a run from. Exports phi once the local phase of "
                    "a method with an outer state has begun, else the mean of the replicas. "
                    "Runs on the CPU, without the run's mesh.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="run.run_dir of the run")
    export.add_argument("--step", type=int, metavar="N",
                        help="the checkpoint's step (default: the newest)")
    export.add_argument("--out", required=True, metavar="DIR",
                        help="directory to write (new, empty, or an earlier export)")
    return parser


def _report_arguments(command: argparse.ArgumentParser, example: str) -> None:
    """The arguments of a command that reports on a config: --config, --json, overrides."""
    command.add_argument("--config", help="YAML file or a bundled config name")
    command.add_argument("--json", action="store_true", help="print one JSON object")
    command.add_argument("overrides", nargs="*", metavar="key=value",
                         help=f"dotted config overrides, e.g. {example}")


def _plot(args: argparse.Namespace) -> None:
    from edit_jax.plot import load_runs, save_plot

    out = save_plot(load_runs(args.run_dirs), args.x, args.out, train=args.train,
                    sync=args.sync)
    print(f"wrote {out}")


def _prepare(args: argparse.Namespace) -> None:
    from edit_jax.config import load_config
    from edit_jax.prepare import prepare

    cfg = load_config(args.config, args.overrides)
    index = prepare(cfg.data, args.out, workers=args.workers, shard_tokens=args.shard_tokens)
    print(f"{args.out}: {len(index['shards'])} shards of {index['dtype']}, "
          f"{index['tokens']['train']:,} training and {index['tokens']['val']:,} validation "
          f"tokens ({index['documents']['train']:,} + {index['documents']['val']:,} documents); "
          f"train with data.source=tokens data.paths=[{args.out}]")


def _export(args: argparse.Namespace) -> None:
    import jax

    jax.config.update("jax_platforms", "cpu")  # host arrays only: leave the accelerators alone
    from edit_jax.hf_export import export

    result = export(args.run_dir, args.out, args.step)
    print(f"exported step {result['step']} of {args.run_dir} ({result['source']}, "
          f"{result['num_params']:,} parameters) to {result['out']}")


def _train(args: argparse.Namespace) -> None:
    from edit_jax.config import load_config
    from edit_jax.mesh import distributed_args_from_env, start_jax

    cfg = load_config(args.config, args.overrides)
    start_jax(cfg.mesh, distributed_args_from_env(args.coordinator_address, args.num_processes,
                                                  args.process_id),
              peer_timeout_s=cfg.run.barrier_timeout_seconds, xla_flags=cfg.run.xla_flags)
    from edit_jax.train import train  # imports JAX-heavy modules only after start-up

    summary = train(cfg)
    print(json.dumps({"summary": summary}))


def _inspect(args: argparse.Namespace) -> None:
    from edit_jax.config import load_config
    from edit_jax.mesh import distributed_args_from_env, start_jax

    cfg = load_config(args.config, args.overrides)
    start_jax(cfg.mesh, distributed_args_from_env(), xla_flags=cfg.run.xla_flags)
    from edit_jax.inspect_steps import format_report, inspect_program
    from edit_jax.program import build_program
    from edit_jax.data import load_tokenizer

    vocab_size = cfg.model.vocab_size or load_tokenizer(cfg.data).vocab_size
    report = inspect_program(build_program(cfg, vocab_size))
    print(json.dumps(report) if args.json else format_report(report))


def _schedule(args: argparse.Namespace) -> None:
    from edit_jax.config import load_config
    from edit_jax.mesh import distributed_args_from_env, start_jax

    cfg = load_config(args.config, args.overrides)
    start_jax(cfg.mesh, distributed_args_from_env(), xla_flags=cfg.run.xla_flags)
    import jax

    from edit_jax.layer_profile import run_profile, saved_profile_path
    from edit_jax.mesh import make_mesh
    from edit_jax.model import abstract_model
    from edit_jax.schedule import format_schedule_report, schedule_report
    from edit_jax.data import load_tokenizer

    vocab_size = cfg.model.vocab_size or load_tokenizer(cfg.data).vocab_size
    mesh = make_mesh(cfg.mesh)
    profile = run_profile(cfg, vocab_size, abstract_model(cfg.model, vocab_size)[1],
                          mesh.shape["replica"], mesh.shape["shard"], resumable=False)
    path = saved_profile_path(cfg, resumable=False)
    source = str(path) if path else f"measured on {jax.devices()[0].device_kind}"
    report = {**schedule_report(profile, cfg.method.sync_every), "profile": source,
              "mesh": dict(mesh.shape), "link_gbps": cfg.method.link_gbps,
              "link_latency_ms": cfg.method.link_latency_ms}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"mesh {mesh.shape['replica']} x {mesh.shape['shard']}, link "
              f"{cfg.method.link_gbps:g} Gbit/s + {cfg.method.link_latency_ms:g} ms, compute "
              f"{source}")
        print(format_schedule_report(report))


def _launch(args: argparse.Namespace) -> int:
    from edit_jax.config import load_config
    from edit_jax.launch import devices_per_process, launch

    cfg = load_config(args.config, args.overrides)
    devices = devices_per_process(cfg.mesh, args.processes, args.devices_per_process)
    config = ["--config", args.config] if args.config else []
    return launch([*config, *args.overrides], args.processes, devices, args.link_mbit)


COMMANDS = {"prepare": _prepare, "train": _train, "inspect": _inspect, "schedule": _schedule, "launch": _launch,
            "plot": _plot, "export": _export}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        status = COMMANDS[args.command](args)
    except PeerFailure as e:
        exit_at_once(e)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`edit-jax inspect | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # exit's flush too
        return 141  # as the shell reports a process ended by SIGPIPE
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
