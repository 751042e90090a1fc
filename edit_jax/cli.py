"""`edit-jax` command line: a thin layer that parses arguments and calls the library.

Bad input raises `UserError`, which is printed as one line (`error: ...`) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from edit_jax.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edit-jax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="train (or resume) a model",
        description="Train a Llama on the ('replica', 'shard') mesh. Rerunning the same command "
                    "resumes from the newest checkpoint in run.run_dir.")
    train.add_argument("--config", help="YAML file or a name in configs/ (tiny, small, 350m, ...)")
    train.add_argument("--coordinator-address", help="HOST:PORT of process 0 (multi-host runs)")
    train.add_argument("--num-processes", type=int, help="number of processes (multi-host runs)")
    train.add_argument("--process-id", type=int, help="this process's index (multi-host runs)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted config overrides, e.g. run.steps=100 mesh.replica=4")
    inspect = commands.add_parser(
        "inspect", help="collective bytes and memory of the compiled train steps",
        description="Compile every step kind the configured method runs (nothing is allocated) "
                    "and report, per device, the collective bytes over each mesh axis (loops "
                    "counted), compiled memory, parameter and outer-state sizes.")
    inspect.add_argument("--config", help="YAML file or a name in configs/")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("overrides", nargs="*", metavar="key=value",
                         help="dotted config overrides, e.g. method.name=diloco")
    return parser


def _train(args: argparse.Namespace) -> None:
    from edit_jax.config import load_config
    from edit_jax.mesh import distributed_args_from_env, start_jax

    cfg = load_config(args.config, args.overrides)
    start_jax(cfg.mesh, distributed_args_from_env(args.coordinator_address, args.num_processes,
                                                  args.process_id))
    from edit_jax.train import train  # imports JAX-heavy modules only after start-up

    summary = train(cfg)
    print(json.dumps({"summary": summary}))


def _inspect(args: argparse.Namespace) -> None:
    from edit_jax.config import load_config
    from edit_jax.mesh import distributed_args_from_env, start_jax

    cfg = load_config(args.config, args.overrides)
    start_jax(cfg.mesh, distributed_args_from_env())
    from edit_jax.inspect_steps import format_report, inspect_program
    from edit_jax.program import build_program
    from edit_jax.tokenizer import load_tokenizer

    vocab_size = cfg.model.vocab_size or load_tokenizer(cfg.data).vocab_size
    report = inspect_program(build_program(cfg, vocab_size))
    print(json.dumps(report) if args.json else format_report(report))


COMMANDS = {"train": _train, "inspect": _inspect}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
