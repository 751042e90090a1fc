"""Lost-peer handling in one process: naming the missing processes, passing other errors on,
and the watchdog (in a subprocess, since it ends the process)."""

import subprocess
import sys

import pytest

from edit_jax import peers

BARRIER_ERROR = """DEADLINE_EXCEEDED: Barrier timed out. Id: edit-jax-sync-after-212::0.
# of tasks that reached the barrier: 2/4.
The first task at the barrier: 0. Some timed out task names:
/job:jax_worker/replica:0/task:1
/job:jax_worker/replica:0/task:3


RPC: /xla.coordination.CoordinationService/Barrier"""


def test_missing_processes_are_named_from_the_barrier_error():
    assert peers._missing_processes(BARRIER_ERROR) == "processes 1, 3"
    assert peers._missing_processes("Some timed out task names:\n2\n\nRPC") == "process 2"
    assert peers._missing_processes("Gloo all-reduce failed") == "another process"


def test_single_process_guards_do_nothing():
    peers.barrier("unused", 0.001, "nothing")  # no other process to wait for
    with pytest.raises(ValueError):  # errors that are not about peers pass through
        with peers.collective_errors("a test"):
            raise ValueError("a bug")


def _run_watchdog(body: str) -> subprocess.CompletedProcess:
    code = ("import time\nfrom edit_jax.peers import Watchdog\n"
            "with Watchdog(0.5, enabled=True) as watchdog:\n" + body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={"JAX_PLATFORMS": "cpu", "PATH": ""})


def test_the_watchdog_stops_a_wait_that_outlasts_the_timeout():
    proc = _run_watchdog("    with watchdog.guard('the sync after step 7'):\n"
                         "        time.sleep(10)\n")
    assert proc.returncode == 3
    assert proc.stderr.startswith("error: no progress for run.barrier_timeout_seconds=0.5 "
                                  "during the sync after step 7")
    assert proc.stderr.count("\n") == 1


def test_the_watchdog_lets_unguarded_work_run():
    proc = _run_watchdog("    with watchdog.guard('a step'):\n"
                         "        time.sleep(0.1)\n"
                         "    time.sleep(1.5)\n"
                         "print('done')\n")
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr
