"""Real-mount test harness: start `ksymsfs mount -f` on a file, wait for it, tear it down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ksymsfs.mount import mount_state
from tests.helpers import IN_CI, cli_env, default_signals


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
        if IN_CI:
            pytest.fail(f"FUSE tests must run in CI: {why}")
        pytest.skip(why)


def write_sources(d: Path, modules: list[str], nkernel: int = 2000) -> tuple[Path, Path]:
    """A small kernel plus ``modules`` (oldest first), written as /proc would show them."""
    d.mkdir(parents=True, exist_ok=True)
    lines = [f"{0xffffffff81000000 + 16 * i:016x} {'T' if i % 3 else 't'} kfunc_{i}\n"
             for i in range(nkernel)]
    mods = []
    for k, m in reversed(list(enumerate(modules))):  # newest first, as the kernel lists
        base = 0xffffffffc0000000 + 0x100000 * k
        lines += [f"{base + 32 * j:016x} t {m}_fn{j}\t[{m}]\n" for j in range(20)]
        lines.append(f"{base + 0x8000:016x} d {m}_data\t[{m}]\n")
        mods.append(f"{m} 16384 0 - Live 0x{base:016x}\n")
    tmp = d / "kallsyms.tmp"
    tmp.write_text("".join(lines))
    os.replace(tmp, d / "kallsyms")
    tmp = d / "modules.tmp"
    tmp.write_text("".join(mods))
    os.replace(tmp, d / "modules")
    return d / "kallsyms", d / "modules"


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def malloc_arenas(pid: int) -> list[str]:
    """The glibc malloc arenas of ``pid`` beyond the main one: a non-main arena's first heap
    is an anonymous mapping on a 64 MiB boundary that begins with its heap_info: ar_ptr
    points just past it, to the arena (48 bytes with glibc 2.36 on x86-64), and prev is NULL."""
    found = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            f = line.split()
            start = int(f[0].split("-")[0], 16)
            if len(f) > 5 or not f[1].startswith("rw") or start % (64 << 20):
                continue
            try:
                mem.seek(start)
                head = mem.read(16)
            except OSError:
                continue
            ar_ptr, prev = int.from_bytes(head[:8], "little"), head[8:]
            if len(head) == 16 and start < ar_ptr <= start + 128 and prev == bytes(8):
                found.append(f[0])
    return found


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def ksymsfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ksymsfs", *args]


class Mount:
    """A foreground daemon serving ``path``; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, path: Path, *args: str, timeout: float = 30):
        self.path = path
        self.log = path.with_suffix(".log")
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(ksymsfs_cmd("mount", "-f", *args, str(path)),
                                     stdout=self._logf, stderr=subprocess.STDOUT, env=cli_env(),
                                     preexec_fn=default_signals)
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

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if mount_state(str(self.path)) != "none":
            subprocess.run(["fusermount", "-uz", str(self.path)], capture_output=True)
        self._logf.close()


def read_all(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def churn_sources(src: Path, stop: threading.Event, modules: int = 150) -> None:
    """Until ``stop``: rewrite the sources in ``src`` every 50 ms, ``modules`` modules and
    one module in turn (a kernel whose module list keeps changing size)."""
    k = 0
    while not stop.is_set():
        k += 1
        write_sources(src, [f"m{i}" for i in range(modules if k % 2 else 1)])
        time.sleep(0.05)
