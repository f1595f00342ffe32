"""Launch a script under ``torchrun`` on this machine (gloo, CPU) for the multi-process tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ATTEMPTS = 2
"""About 1 in 30 two-process gloo jobs aborts at exit (or earlier): a job is retried once."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(
    processes: int, script: Path, args: Sequence[str], timeout: float, done: Callable[[], bool],
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``script args`` on ``processes`` ranks until ``done()`` (it wrote its results), at most twice.

    The last attempt's process is returned, for its output. torchrun's log folder is a temporary one
    (by default torchrun leaves an empty ``torchelastic_*`` folder in the system's temp folder per run).
    """
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path, **(env or {})}
    for _attempt in range(ATTEMPTS):
        with tempfile.TemporaryDirectory(prefix="torchrun-logs-") as logs:
            command = [
                sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--log-dir", logs,
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *args,
            ]  # fmt: skip
            result = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
        if done():
            break
    return result
