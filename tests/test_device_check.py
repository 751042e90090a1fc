"""scripts/device_check.sh --smoke: every part runs on CPU, cuDNN attention's part fails cleanly."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_records_every_part_and_exits_0(tmp_path):
    out = tmp_path / "x.json"
    proc = subprocess.run(["bash", "scripts/device_check.sh", "--smoke", "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    parts = {row["part"]: row for row in report["parts"]}
    assert list(parts) == ["tiny attention=xla", "tiny attention=cudnn", "edit sync step (tiny)",
                           "edit sync step int8 (tiny)"]
    assert report["smoke"] and report["failed"] == ["tiny attention=cudnn"]

    cudnn = parts["tiny attention=cudnn"]
    assert cudnn["status"] == "failed" and "\n" not in cudnn["error"]
    assert "cudnn" in cudnn["error"].lower()

    xla = parts["tiny attention=xla"]
    for key in ("step_time_s", "tokens_per_s", "model_flops_per_s", "peak_memory_bytes"):
        assert xla[key] > 0, key
    assert xla["attention"] == "xla" and xla["compiled_memory"]["peak"] > 0

    fp32, int8 = parts["edit sync step (tiny)"], parts["edit sync step int8 (tiny)"]
    assert [p["kind"] for p in fp32["plans"].values()] == ["ddp", "local", "sync"]
    assert [p["kind"] for p in int8["plans"].values()] == ["local", "sync"]
    assert (fp32["compression"], int8["compression"]) == ("none", "int8")
    for row in (fp32, int8):
        assert row["compiled_peak_bytes"] > 0
        for plan in row["plans"].values():
            assert plan["step_time_s"] > 0 and plan["vs_local"] > 0
            assert plan["compiled_memory"]["peak"] > 0

    assert "| `tiny` | xla |" in proc.stdout and "failed parts: 1" in proc.stdout
