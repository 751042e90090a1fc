"""Input pipeline benchmark: `edit-jax prepare` throughput, and the token-shard pipeline's
tokens/s and peak memory at growing corpus sizes.

    python scripts/bench_data.py [--base-mb 64] [--scales 1,4,16] [--steps 200]
                                 [--seq-len 2048] [--batch 512] [--workdir DIR]
                                 [--out results/bench_data.json]

For each scale s, synthetic text (random words, as .jsonl files) of s x base-mb MB is prepared
with the byte tokenizer (one uint16 token per byte, so 16 x 64 MB gives 1 GB of text and 2 GB of
tokens); then a fresh process reads `--steps` global batches of `--batch` x (seq-len + 1) tokens
through `data.train_iterator` (data.source=tokens) and reports tokens/s and memory: peak RSS
(VmHWM), and the anonymous and file-backed resident memory sampled after every batch. The
defaults are the 1b config's batch shape (512 x 2048), read whole by one process: the most a
host of a cluster run ever reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import write_report

FILES_PER_CORPUS = 8
LINE_BYTES = 4096
# The figure the pipeline is compared against (modelled, no GPU measured it yet): the 1b
# config's training step on one H200 at 45% MFU of its 989 TFLOP/s bf16 peak, with
# 6 N + 12 L d T FLOPs per token (N = 1.04e9 parameters, L = 18, d = 2048, T = 2048), times
# the 8 GPUs of one host, each of whose processes reads its own rows.
H200_PEAK_FLOPS, MFU, GPUS_PER_HOST = 989e12, 0.45, 8
FLOPS_PER_TOKEN_1B = 6 * 1.04e9 + 12 * 18 * 2048 * 2048


def write_text(directory: Path, megabytes: int, seed: int) -> None:
    """`megabytes` MB of random lowercase words as .jsonl lines of LINE_BYTES characters."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", np.uint8)
    per_file = megabytes * 2**20 // FILES_PER_CORPUS
    for n in range(FILES_PER_CORPUS):
        with open(directory / f"part-{n:02d}.jsonl", "w") as f:
            for _ in range(per_file // LINE_BYTES):
                text = alphabet[rng.integers(0, len(alphabet), LINE_BYTES)].tobytes().decode()
                f.write(json.dumps({"text": text}) + "\n")


def read_pipeline(shards: str, steps: int, seq_len: int, batch: int) -> dict:
    """In this process: `steps` batches from the token shards; tokens/s and memory."""
    from edit_jax import data
    from edit_jax.config import DataConfig
    from edit_jax.tokenizer import ByteTokenizer

    cfg = DataConfig(source="tokens", paths=(shards,), tokenizer="byte", seq_len=seq_len,
                     global_batch_size=batch)
    iterator = data.train_iterator(cfg, ByteTokenizer(), process_index=0, process_count=1)
    next(iterator)  # start-up: opening the shards, starting the prefetch threads
    peaks = {"RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
        for key, value in _status().items():
            if key in peaks:
                peaks[key] = max(peaks[key], value)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": steps * batch * (seq_len + 1) / seconds,
            "peak_rss_mb": _status()["VmHWM"] / 1024, "peak_anon_mb": peaks["RssAnon"] / 1024,
            "peak_file_mb": peaks["RssFile"] / 1024}


def _status() -> dict:
    """This process's memory lines of /proc/self/status, in kB."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines)
            if v.strip().endswith("kB")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-mb", type=int, default=64)
    parser.add_argument("--scales", default="1,4,16")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--workdir", default="/tmp/edit-jax-bench-data")
    parser.add_argument("--out", default="results/bench_data.json")
    parser.add_argument("--read", help=argparse.SUPPRESS)  # internal: the reading process
    args = parser.parse_args()
    if args.read:
        print(json.dumps(read_pipeline(args.read, args.steps, args.seq_len, args.batch)))
        return

    from edit_jax.config import DataConfig
    from edit_jax.prepare import prepare

    work = Path(args.workdir)
    host_step_tokens_s = GPUS_PER_HOST * H200_PEAK_FLOPS * MFU / FLOPS_PER_TOKEN_1B
    rows = []
    for scale in (int(s) for s in args.scales.split(",")):
        text, shards = work / f"text-{scale}x", work / f"shards-{scale}x"
        shutil.rmtree(work, ignore_errors=True)
        write_text(text, args.base_mb * scale, seed=scale)
        text_bytes = sum(p.stat().st_size for p in text.iterdir())
        started = time.perf_counter()
        index = prepare(DataConfig(source="files", paths=(str(text / "*.jsonl"),),
                                   tokenizer="byte"), shards, progress=False)
        prepare_s = time.perf_counter() - started
        read = subprocess.run([sys.executable, __file__, "--read", str(shards), "--steps",
                               str(args.steps), "--seq-len", str(args.seq_len), "--batch",
                               str(args.batch)], capture_output=True, text=True, check=True)
        tokens = index["tokens"]["train"] + index["tokens"]["val"]
        rows.append({"scale": scale, "text_mb": text_bytes / 2**20, "tokens": tokens,
                     "shard_mb": tokens * 2 / 2**20, "prepare_mb_s": text_bytes / 2**20 / prepare_s,
                     **json.loads(read.stdout.strip().splitlines()[-1])})
        row = rows[-1]
        print(f"{scale:>3}x  {row['shard_mb']:>8,.0f} MB of tokens  prepare "
              f"{row['prepare_mb_s']:6.1f} MB/s  read {row['tokens_per_s'] / 1e6:7.1f} M tok/s  "
              f"peak RSS {row['peak_rss_mb']:6.0f} MB (anon {row['peak_anon_mb']:.0f}, "
              f"file {row['peak_file_mb']:.0f})", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    report = {"cpu_count": os.cpu_count(), "batch": [args.batch, args.seq_len + 1],
              "steps": args.steps, "rows": rows,
              "compared_with": {"what": "1b config, one host of 8 H200 at 45% MFU (modelled)",
                                "tokens_per_s": host_step_tokens_s,
                                "pipeline_over_step": min(r["tokens_per_s"] for r in rows)
                                / host_step_tokens_s}}
    print(f"slowest read {min(r['tokens_per_s'] for r in rows) / 1e6:.1f} M tok/s = "
          f"{report['compared_with']['pipeline_over_step']:.0f}x the modelled 1b step of one "
          f"8 x H200 host ({host_step_tokens_s / 1e6:.2f} M tok/s)")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
