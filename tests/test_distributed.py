"""Several processes for real: two JAX processes on loopback, 4 CPU devices each.

Each runs ``tests/distributed_worker.py``: the BatchNorm MLP trained data-parallel with
``lift.shard_map`` over a mesh of all 8 global devices, each process feeding its own
rows of the batch. Both must end with the parameters and running statistics of
single-process training on the full batch, computed here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed_worker import flat_result, train_single

WORKER = Path(__file__).with_name("distributed_worker.py")
PROCESSES = 2
STEPS = 3
TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(tmp_path: Path) -> list[Path]:
    """Start the processes, wait for them (bounded), and return their result files."""
    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    outs = [tmp_path / f"process{i}.npz" for i in range(PROCESSES)]
    logs = [(tmp_path / f"process{i}.log").open("w+") for i in range(PROCESSES)]
    procs: list[subprocess.Popen] = []
    try:
        for i in range(PROCESSES):
            args = [str(port), str(PROCESSES), str(i), str(STEPS), str(outs[i])]
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), *args],
                    env=env,
                    stdout=logs[i],
                    stderr=subprocess.STDOUT,
                )
            )
        codes = [proc.wait(timeout=TIMEOUT) for proc in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        output = []
        for i, log in enumerate(logs):
            log.seek(0)
            output.append(f"--- process {i} ---\n{log.read()[-4000:]}")
            log.close()
    report = "\n".join(output)
    assert codes is not None, f"workers timed out after {TIMEOUT}s\n{report}"
    assert codes == [0] * PROCESSES, f"exit codes {codes}\n{report}"
    missing = [str(p) for p in outs if not p.exists()]
    assert not missing, f"no results in {missing}\n{report}"
    return outs


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    outs = run_workers(tmp_path)
    expected = flat_result(*train_single(STEPS))
    for path in outs:
        with np.load(path) as got:
            assert set(got.files) == {*expected, "loss"}
            for name, value in expected.items():
                np.testing.assert_allclose(
                    got[name], value, rtol=2e-5, atol=2e-6, err_msg=f"{path}: {name}"
                )
    # Both processes hold the same (replicated) result.
    with np.load(outs[0]) as a, np.load(outs[1]) as b:
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
    assert not np.allclose(expected["bn.mean"], 0.0)


_IMPORT_ONLY = """
import jax
from jax._src import xla_bridge
import lift
print("backends:", sorted(xla_bridge._backends))
"""


def test_import_lift_starts_no_backend():
    # `jax.distributed.initialize()` must come before any backend starts; importing
    # lift first is what users do.
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ONLY],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "backends: []" in proc.stdout, proc.stdout
