"""Stopping child processes we started: SIGTERM, then SIGKILL if it does not exit in time."""

from __future__ import annotations

import socket
import subprocess
from typing import Any


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 5.0) -> int:
    """Stop `process` by PID and reap it; returns its exit code. Idempotent."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout=timeout_s)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for servers we start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
