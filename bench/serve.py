"""The demo as a separate process, for the scripts that drive it (bench.app_load,
bench.app_screenshots): ``python app.py ...`` on a free local port, as a user starts it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from core.config import project_path

__all__ = ["serve_app"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_app(
    args: Sequence[str], timeout_s: float = 600.0, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Start ``python app.py <args> --port <free port>`` and yield its URL once it answers; stop
    it afterwards. RuntimeError with the server's last output when it exits or does not answer
    within `timeout_s` seconds (the shapes preset loads in about a minute on a busy CPU)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, str(project_path("app.py")), *args, "--port", str(port)]
    # a file, not a pipe: nobody reads the server's output while it serves
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            command,
            cwd=project_path("."),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        try:
            _wait_until_up(proc, url, log, command, timeout_s)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_up(
    proc: subprocess.Popen[str], url: str, log: Any, command: list[str], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log.seek(0)
            out = log.read()[-3000:]
            raise RuntimeError(f"{' '.join(command)} exited ({proc.returncode}):\n{out}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(command)} did not answer within {timeout_s:.0f} s")
        time.sleep(1.0)
