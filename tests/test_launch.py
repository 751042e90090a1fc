"""`edit-jax launch`: device split, command lines, output relay, and stopping on a failure."""

import io
import sys
import time

import pytest

from edit_jax import launch
from edit_jax.config import MeshConfig
from edit_jax.errors import UserError

# The launcher forks (to arm the parent-death signal); here, unlike in `edit-jax launch`, JAX's
# threads already run in the forking process, which JAX warns about. The child only execs.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called")


def test_devices_per_process():
    assert launch.devices_per_process(MeshConfig(2, 4, 8), 2, None) == 4
    assert launch.devices_per_process(MeshConfig(4, 2, 8), 4, None) == 2
    assert launch.devices_per_process(MeshConfig(2, 2, 8), 2, 2) == 2
    with pytest.raises(UserError, match="--processes 3 does not divide mesh.num_cpu_devices=8"):
        launch.devices_per_process(MeshConfig(2, 4, 8), 3, None)
    with pytest.raises(UserError, match=r"mesh \(2, 4\) needs 8 devices but 4 are available"):
        launch.devices_per_process(MeshConfig(2, 4, 8), 2, 2)


def test_train_commands():
    commands = launch.train_commands(["--config", "tiny", "run.steps=5"], 2, 4, "localhost:1234")
    assert [c[c.index("--process-id") + 1] for c in commands] == ["0", "1"]
    for command in commands:
        assert command[:4] == [sys.executable, "-m", "edit_jax.cli", "train"]
        assert "localhost:1234" in command and command[-1] == "mesh.num_cpu_devices=4"
        assert "run.steps=5" in command


def test_relay_prefixes_every_line_and_progress_redraws():
    sink = io.BytesIO()
    launch._relay(io.BufferedReader(io.BytesIO(b"one\ntwo\r50%\r100%\nlast")), sink, b"[p1] ")
    assert sink.getvalue() == b"[p1] one\n[p1] two\r[p1] 50%\r[p1] 100%\n[p1] last\n"


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_all_succeed(capfd):
    assert launch.run_processes([_python("print('hello')"), _python("print('world')")]) == 0
    out = capfd.readouterr().out
    assert "[p0] hello\n" in out and "[p1] world\n" in out


def test_a_failure_stops_the_others_and_is_reported(capfd):
    start = time.monotonic()
    status = launch.run_processes([_python("import time; time.sleep(60)"),
                                   _python("import sys; sys.exit(7)")])
    assert status == 7 and time.monotonic() - start < 30
    assert "[launch] process 1 exited with status 7; stopping the others" in capfd.readouterr().err
