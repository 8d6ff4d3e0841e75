"""Test helpers: run the CLI, parse kallsyms text independently, run the nlist(3) client."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ksymsfs.letters import LETTERS

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
DATA = TESTS / "data"
BAD = DATA / "bad"

# Captured dumps with lines that are not symbol lines (HTTP headers, "[+] ..." banners,
# grep "--" separators): they only build with --lenient.
LENIENT_DUMPS = {"noonkey-mips32-http-crlf", "mico-armle-vmlinuxtoelf", "ebpfexp-arm64-excerpt"}
DUMPS = sorted(p.name for p in DATA.iterdir() if (p / "kallsyms").is_file())

IN_CI = bool(os.environ.get("CI"))


def child_processes(*preload: str) -> object:
    """A multiprocessing context whose children are forked from a single-threaded server,
    not from this (threaded) test process: fork() here, with a churn thread running, is
    a deadlock risk (Python 3.12+ warns). ``preload``: modules the server imports once
    (the children's targets), so each child starts in milliseconds."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx

# One kallsyms symbol line, parsed independently of ksymsfs.kallsyms (a regex, not numpy):
# names are 1..511 bytes without spaces or control characters (KSYM_NAME_LEN 512).
SYMBOL_LINE = re.compile(
    rb"^(?P<addr>[0-9a-fA-F]{8}|[0-9a-fA-F]{16}) (?P<letter>[!-~]) "
    rb"(?P<name>[!-~\x80-\xff]{1,511})(?:\t\[(?P<module>[!-~\x80-\xff]+)\])?$")
# --lenient also reads the module suffix after blanks instead of the TAB (README: a
# terminal capture such as "870f8db8 T umiRegister  [umi]")
BLANK_MODULE_LINE = re.compile(
    rb"^(?P<addr>[0-9a-fA-F]{8}|[0-9a-fA-F]{16}) (?P<letter>[!-~]) "
    rb"(?P<name>[!-~\x80-\xff]{1,511})[ \t]+\[(?P<module>[!-~\x80-\xff]+)\]$")


@dataclass(frozen=True)
class Sym:
    """One input symbol line."""

    addr: int
    letter: str
    name: str
    module: str  # "" for the kernel itself
    text: str    # the line as the kernel printed it (CR/LF stripped)
    width: int   # hex digits of the address field


def parse_input(data: bytes, lenient: bool = False) -> tuple[list[Sym], list[int]]:
    """kallsyms bytes -> (symbol lines, 1-based numbers of the lines that are not symbols).

    A line counts as a symbol line when it matches SYMBOL_LINE with the address width of
    the first symbol line and a type letter ksymsfs documents (letters.LETTERS, the
    kernel's nm-style set). The last line may lack its newline. ``lenient`` (what
    ``--lenient`` reads): BLANK_MODULE_LINE counts too (its ``text`` is the kernel's line,
    with the TAB), and the width is the first such whole symbol line's.
    """
    def dec(b: bytes) -> str:
        return b.decode("utf-8", "surrogateescape")
    syms: list[Sym] = []
    junk: list[int] = []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    width = None
    for no, raw in enumerate(lines, start=1):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        m = SYMBOL_LINE.match(line)
        blank = lenient and m is None and (m := BLANK_MODULE_LINE.match(line)) is not None
        whole = m is not None and m["letter"].decode() in LETTERS
        if m and width is None and (whole or not lenient):
            width = len(m["addr"])
        if not whole or len(m["addr"]) != width:
            junk.append(no)
            continue
        if blank:
            line = b"%s %s %s\t[%s]" % (m["addr"], m["letter"], m["name"], m["module"])
        syms.append(Sym(int(m["addr"], 16), dec(m["letter"]), dec(m["name"]),
                        dec(m["module"] or b""), dec(line), width))
    return syms, junk


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    return env


def default_signals() -> None:
    """preexec_fn for daemons a test signals: SIGHUP/SIGINT/SIGTERM at their defaults.

    A test run started under ``nohup`` (or as a background job of a non-interactive shell,
    which ignores SIGINT) hands those dispositions down; libfuse installs its exit handler
    only over SIG_DFL (the nohup convention), so such a daemon would ignore the signal."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def run_ksymsfs(*args: str | os.PathLike, timeout: float = 120,
                **kw) -> subprocess.CompletedProcess:
    """``python -m ksymsfs ARGS``; bytes stdout/stderr, never raises on exit status."""
    return subprocess.run([sys.executable, "-m", "ksymsfs", *map(str, args)],
                          capture_output=True, env=cli_env(), cwd=str(REPO),
                          timeout=timeout, **kw)


def snapshot(out: os.PathLike | str, kallsyms: os.PathLike | str | None = None,
             modules: os.PathLike | str | None = None, lenient: bool = False,
             elfclass: str | None = None) -> subprocess.CompletedProcess:
    """``ksymsfs snapshot [--kallsyms P] [--modules M] [--lenient] [--class C] -o OUT``."""
    args: list[str] = ["snapshot"]
    if kallsyms is not None:
        args += ["--kallsyms", str(kallsyms)]
    if modules is not None:
        args += ["--modules", str(modules)]
    if lenient:
        args.append("--lenient")
    if elfclass is not None:
        args += ["--class", elfclass]
    args += ["-o", str(out)]
    return run_ksymsfs(*args)


def build_ok(out: os.PathLike | str, **kw) -> Path:
    """snapshot() that must succeed; returns the image path."""
    r = snapshot(out, **kw)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return Path(out)


def run_tool(*argv: str | os.PathLike, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, timeout=timeout)


def need_tool(name: str) -> str:
    """Path of an external tool; a missing tool fails under CI and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def run_nlist_client(client: Path, image: Path, names: list[str]
                     ) -> tuple[dict[str, tuple[int, int]], int]:
    """-> ({name: (n_type, n_value)}, nlist() return value)."""
    r = subprocess.run([str(client), str(image), *names], capture_output=True, timeout=60)
    lines = r.stdout.decode("utf-8", "surrogateescape").splitlines()
    assert len(lines) == len(names) + 1, (r.stdout, r.stderr)
    got = {}
    for name, line in zip(names, lines):
        n, t, v = line.rsplit(" ", 2)
        assert n == name
        got[name] = (int(t, 16), int(v, 16))
    rc = int(lines[-1].split()[0])
    return got, rc
