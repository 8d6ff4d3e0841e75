"""Real-mount test harness: start `ksymsfs mount -f` on a file, wait for it, tear it down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ksymsfs.mount import mount_state

ROOT = Path(__file__).resolve().parent.parent


def fuse_available() -> str | None:
    """Why FUSE tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "FUSE tests need root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as e:
        return f"fusepy/libfuse not loadable: {e}"
    return None


def require_fuse() -> None:
    why = fuse_available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"FUSE tests must run in CI: {why}")
        pytest.skip(why)


def ksymsfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ksymsfs", *args]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


class Mount:
    """A foreground daemon serving ``path``; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, path: Path, *args: str, timeout: float = 30):
        self.path = path
        self.log = path.with_suffix(".log")
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(ksymsfs_cmd("mount", "-f", *args, str(path)),
                                     stdout=self._logf, stderr=subprocess.STDOUT, env=env())
        deadline = time.monotonic() + timeout
        while mount_state(str(path)) != "mounted":
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"not mounted after {timeout}s: {self.output()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._logf.flush()
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if mount_state(str(self.path)) != "none":
            subprocess.run(["fusermount", "-uz", str(self.path)], capture_output=True)
        self._logf.close()
        return self.proc.returncode


def read_all(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()
