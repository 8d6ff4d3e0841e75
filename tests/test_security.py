"""Hostile local users (issue 11): no address leak, no crashed readers, no hangs, no lockout."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import mmap
import os
import pickle
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ksymsfs import KIOCGSIZE, parse_image
from ksymsfs.device import SIZE_BUCKET
from tests.fuse_harness import Mount, require_fuse, write_sources

pytestmark = pytest.mark.fuse
CLONE_NEWUSER = 0x10000000
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture(autouse=True)
def _need_fuse():
    require_fuse()


@pytest.fixture
def public_dir():
    """A directory every user can traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="ksymsfs-sec-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- running a step list in a forked child -------------------------------------------------
def in_child(fn: Callable[[], object], timeout: float = 60) -> object:
    """``fn()`` in a forked child; its result (or the OSError it raised) comes back."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out: object = ("ok", fn())
        except OSError as e:
            out = ("oserror", e.errno)
        except BaseException as e:  # noqa: BLE001
            out = ("error", repr(e))
        os.write(w, pickle.dumps(out))
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert data, f"child died: status {status}"
    kind, val = pickle.loads(data)
    if kind == "error":
        raise AssertionError(f"child failed: {val}")
    return OSError(val, os.strerror(val)) if kind == "oserror" else val


def become_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY.pw_gid)
    os.setuid(NOBODY.pw_uid)
    # a uid change makes the process non-dumpable: its /proc/self would stay root's and
    # it could not write its own uid_map
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE


def enter_userns() -> None:
    """unshare(CLONE_NEWUSER) and map our uid/gid to 0 inside (``unshare -U -r``)."""
    uid, gid = os.geteuid(), os.getegid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")


def device_shows(path: str) -> bool:
    """Open, read and parse the device: does the image hold any non-zero address?"""
    with open(path, "rb") as f:
        return bool(parse_image(f.read()).syms["st_value"].any())


def kernel_shows() -> bool:
    """Does the kernel's own /proc/kallsyms give this process real addresses?"""
    with open("/proc/kallsyms", "rb") as f:
        lines = list(itertools.islice(f, 2000))
    return any(int(line.split()[0], 16) for line in lines)


OPENERS: dict[str, list[Callable[[], None]]] = {
    "root": [],
    "nobody": [become_nobody],
    "nobody in userns": [become_nobody, enter_userns],
    "nobody in nested userns": [become_nobody, enter_userns, enter_userns],
    "root in userns": [enter_userns],
    "root in nested userns": [enter_userns, enter_userns],
}


def as_opener(steps: list[Callable[[], None]], path: str) -> tuple[bool, bool]:
    def run() -> tuple[bool, bool]:
        for step in steps:
            step()
        return device_shows(path), kernel_shows()
    out = in_child(run)
    assert not isinstance(out, OSError), out
    return out


def test_user_namespaces_get_what_the_kernel_gives(public_dir):
    """CAP_SYSLOG counts only in the initial user namespace: unshare -U -r (CapEff full
    inside) gets zeros, from the kernel and from the device alike."""
    m = Mount(public_dir / "ksyms", "--allow-other")
    try:
        seen = {name: as_opener(steps, str(m.path)) for name, steps in OPENERS.items()}
    finally:
        m.stop()
    print(seen)
    for name, (dev, kern) in seen.items():
        assert dev == kern, f"{name}: device shows {dev}, kernel shows {kern}"
    assert seen["root"] == (True, True)
    if int(Path("/proc/sys/kernel/perf_event_paranoid").read_text()) > 1:
        assert not any(d for name, (d, _) in seen.items() if name != "root")


def _expected(kptr: int, paranoid: int, cap_syslog: bool) -> bool:
    return (kptr == 0 and paranoid <= 1) or (kptr <= 1 and cap_syslog)


def test_every_sysctl_setting_for_every_opener(public_dir):
    """kptr_restrict 0/1/2 x perf_event_paranoid -1/1/2/3 for root, nobody and root in a
    user namespace (which has no CAP_SYSLOG in the initial one)."""
    sysctl = public_dir / "sysctl"
    sysctl.mkdir()
    ks, mods = write_sources(public_dir / "src", ["alpha"])
    os.chmod(public_dir / "src", 0o755)
    m = Mount(public_dir / "ksyms", "--allow-other", "--sysctl-dir", str(sysctl),
              "--kallsyms", str(ks), "--modules", str(mods))
    who = {"root": ([], True), "nobody": ([become_nobody], False),
           "root in userns": ([enter_userns], False)}
    try:
        for kptr, paranoid in itertools.product((0, 1, 2), (-1, 1, 2, 3)):
            (sysctl / "kptr_restrict").write_text(f"{kptr}\n")
            (sysctl / "perf_event_paranoid").write_text(f"{paranoid}\n")
            for name, (steps, cap) in who.items():
                dev, _ = as_opener(steps, str(m.path))
                assert dev == _expected(kptr, paranoid, cap), (kptr, paranoid, name)
    finally:
        m.stop()


def test_setuid_after_open_keeps_the_openers_view(public_dir):
    """Decided at open from the opener's credentials, as the kernel does (f_cred)."""
    m = Mount(public_dir / "ksyms", "--allow-other")

    def run() -> tuple[bool, bool]:
        fd = os.open(m.path, os.O_RDONLY)
        kfd = os.open("/proc/kallsyms", os.O_RDONLY)
        become_nobody()
        data = os.pread(fd, 1 << 28, 0)
        ktext = os.read(kfd, 1 << 16)
        return (bool(parse_image(data).syms["st_value"].any()),
                any(int(line.split()[0], 16) for line in ktext.splitlines()[:-1]))
    try:
        assert in_child(run) == (True, True)
    finally:
        m.stop()


def _recv_fd(sock: socket.socket) -> int:
    _, anc, _, _ = sock.recvmsg(1, socket.CMSG_LEN(4))
    return struct.unpack("i", anc[0][2][:4])[0]


def test_descriptor_passed_over_scm_rights_reads_the_openers_snapshot(public_dir):
    """The receiver (nobody) reads root's open, like a passed /proc/kallsyms descriptor;
    its own open is still judged by its own credentials."""
    m = Mount(public_dir / "ksyms", "--allow-other")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def receiver() -> tuple[bool, bool]:
        a.close()
        become_nobody()
        b.send(b"r")
        fd = _recv_fd(b)
        passed = bool(parse_image(os.pread(fd, 1 << 28, 0)).syms["st_value"].any())
        os.close(fd)
        b.recv(1)  # root has closed its copy
        time.sleep(0.2)
        return passed, device_shows(str(m.path))
    box: list = []
    try:  # the child is forked before the open, so it holds only what it is sent
        t = threading.Thread(target=lambda: box.append(in_child(receiver)))
        t.start()
        assert a.recv(1) == b"r"
        fd = os.open(m.path, os.O_RDONLY)
        a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        os.close(fd)
        a.send(b"c")
        t.join(60)
        assert box == [(True, False)]
    finally:
        a.close()
        b.close()
        m.stop()


# -- nobody's reader is hurt by anyone else (size semantics) --------------------------------
def _size_views(fd: int) -> tuple[int, int, int, int]:
    """(fstat, KIOCGSIZE, bytes read, mmap length) of one descriptor."""
    buf = bytearray(8)
    fcntl.ioctl(fd, KIOCGSIZE, buf)
    data = os.pread(fd, 1 << 28, 0)
    size = os.fstat(fd).st_size
    mm = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ)
    try:
        assert mm[:] == data
        n = len(mm)
    finally:
        mm.close()
    return size, struct.unpack("=Q", buf)[0], len(data), n


def _big_then_small(d: Path) -> None:
    """Unload enough modules that the image shrinks by more than a size bucket."""
    write_sources(d, ["alpha"])


def test_mapping_held_across_a_module_unload_survives_others_stat(tmp_path):
    """Before: a mapped bigger snapshot got SIGBUS once another process opened and stat'ed
    the smaller new one (the inode's size is shared). Now the served size never shrinks
    while anything is open or mapped, and the mapping's data stays its own snapshot."""
    src = tmp_path / "src"
    ks, mods = write_sources(src, [f"m{i}" for i in range(150)])
    m = Mount(tmp_path / "ksyms", "--kallsyms", str(ks), "--modules", str(mods))

    def holder(ready_w: int, go_r: int) -> tuple[int, int, bytes]:
        fd = os.open(m.path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ)
        own = os.pread(fd, 1 << 28, 0)
        os.write(ready_w, b"r")
        os.read(go_r, 1)
        tail = mm[size - 4096:]  # SIGBUS here with the old code
        return size, len(own), bytes(tail) if mm[:] == own else b"DIFFERENT"
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    box: list = []
    try:
        t = threading.Thread(target=lambda: box.append(in_child(lambda: holder(ready_w,
                                                                                go_r))))
        t.start()
        assert os.read(ready_r, 1) == b"r"
        _big_then_small(src)
        new = in_child(lambda: (os.stat(m.path).st_size,
                                len(open(m.path, "rb").read()),
                                os.stat(m.path).st_size))
        os.write(go_w, b"g")
        t.join(60)
        assert len(box) == 1 and isinstance(box[0], tuple), box
        size, nread, tail = box[0]
        assert size == nread and tail != b"DIFFERENT"
        assert new == (size, size, size)  # the served size did not drop under the mapping
        # after everyone closed, the size follows the latest snapshot again
        assert os.stat(m.path).st_size < size
        assert os.stat(m.path).st_size % SIZE_BUCKET == 0
    finally:
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
        m.stop()


def test_inherited_descriptor_sizes_agree_after_a_change(tmp_path):
    """fstat, KIOCGSIZE, read and mmap agree for a descriptor a child inherited, also after
    the sources changed and someone else opened the new snapshot."""
    src = tmp_path / "src"
    ks, mods = write_sources(src, [f"m{i}" for i in range(150)])
    m = Mount(tmp_path / "ksyms", "--kallsyms", str(ks), "--modules", str(mods))
    try:
        fd = os.open(m.path, os.O_RDONLY)
        before = _size_views(fd)
        assert len(set(before)) == 1
        _big_then_small(src)
        small = in_child(lambda: _size_views(os.open(m.path, os.O_RDONLY)))
        inherited = in_child(lambda: _size_views(fd))
        assert inherited == before and small == before, (before, small, inherited)
        img = parse_image(os.pread(fd, 1 << 28, 0))
        assert "m149" in img.modules  # still the snapshot taken at open
        os.close(fd)
        time.sleep(0.3)
        after = _size_views(os.open(m.path, os.O_RDONLY))
        assert len(set(after)) == 1 and after[0] < before[0]
    finally:
        m.stop()


def test_readelf_as_root_survives_nobody_stat_loop_under_churn(public_dir):
    """eu-readelf maps the file; another user stats (and opens) it in a loop while modules
    come and go: no reader may die of SIGBUS."""
    tool = shutil.which("eu-readelf")
    if tool is None:
        pytest.skip("eu-readelf not installed")
    src = public_dir / "src"
    ks, mods = write_sources(src, [f"m{i}" for i in range(150)])
    os.chmod(src, 0o755)
    m = Mount(public_dir / "ksyms", "--allow-other", "--kallsyms", str(ks), "--modules",
              str(mods))
    stop = threading.Event()

    def churn() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            write_sources(src, [f"m{i}" for i in range(150 if k % 2 else 1)])
            time.sleep(0.05)

    def stat_loop() -> int:  # stats, and now and then an open that builds a snapshot
        become_nobody()
        n = 0
        end = time.monotonic() + 8
        while time.monotonic() < end:
            os.stat(m.path)
            n += 1
            if n % 20 == 0:
                try:
                    with open(m.path, "rb") as f:
                        f.read(64)
                except OSError as e:  # held by root, or caught mid-churn
                    assert e.errno in (errno.EBUSY, errno.ENXIO)
        return n
    box: list = []
    threads = [threading.Thread(target=churn),
               threading.Thread(target=lambda: box.append(in_child(stat_loop)))]
    try:
        for t in threads:
            t.start()
        deaths, ok = [], 0
        for _ in range(15):
            r = subprocess.run([tool, "-S", str(m.path)], capture_output=True)
            if r.returncode < 0:
                deaths.append(signal.Signals(-r.returncode).name)
            elif r.returncode == 0 and b".symtab" in r.stdout:
                ok += 1
            else:  # caught mid-churn (ENXIO), or the old code's lockout (EBUSY)
                assert b"busy" in r.stderr or b"No such device" in r.stderr, r.stderr
        assert deaths == [] and ok > 0
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        m.stop()
    assert box and box[0] > 0


# -- one open per process, robustly ------------------------------------------------------
@pytest.fixture
def captured(tmp_path):
    ks, mods = write_sources(tmp_path / "src", ["alpha", "beta"])
    m = Mount(tmp_path / "ksyms", "--kallsyms", str(ks), "--modules", str(mods))
    yield m
    m.stop()


def _open_errno(path: Path) -> int:
    """0 if this process may open (and close) the device now, else the errno."""
    try:
        os.close(os.open(path, os.O_RDONLY))
        return 0
    except OSError as e:
        return e.errno


DUPS = {"dup": os.dup, "dup2": lambda fd: os.dup2(fd, 200),
        "F_DUPFD": lambda fd: fcntl.fcntl(fd, fcntl.F_DUPFD, 100),
        "F_DUPFD_CLOEXEC": lambda fd: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)}


@pytest.mark.parametrize("how", sorted(DUPS))
def test_closing_a_duplicate_does_not_free_the_slot(captured, how):
    """Before: close(dup(fd)) sent FLUSH and freed the slot: one process held 8 (up to
    all 64) snapshots. Now the slot frees at RELEASE, when the last duplicate is gone."""
    fd = os.open(captured.path, os.O_RDONLY)
    try:
        os.close(DUPS[how](fd))
        assert _open_errno(captured.path) == errno.EBUSY
        assert os.pread(fd, 4, 0) == b"\x7fELF"
    finally:
        os.close(fd)
    assert _open_errno(captured.path) == 0  # after the last close: promptly free


def test_child_holding_an_inherited_descriptor_keeps_the_parents_slot(captured):
    fd = os.open(captured.path, os.O_RDONLY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # holds the inherited descriptor until told
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        os.close(fd)
        assert _open_errno(captured.path) == errno.EBUSY  # the child still holds it
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)
    assert _open_errno(captured.path) == 0


def test_passed_descriptor_keeps_the_senders_slot(captured):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        a.close()
        b.send(b"r")
        fd = _recv_fd(b)
        b.recv(1)
        os.close(fd)
        os._exit(0)
    b.close()
    try:
        assert a.recv(1) == b"r"
        fd = os.open(captured.path, os.O_RDONLY)
        a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        os.close(fd)
        assert _open_errno(captured.path) == errno.EBUSY
    finally:
        a.send(b"c")
        os.waitpid(pid, 0)
        a.close()
    assert _open_errno(captured.path) == 0


def test_mapping_kept_after_close_keeps_the_slot(captured):
    fd = os.open(captured.path, os.O_RDONLY)
    mm = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_PRIVATE, mmap.PROT_READ)
    os.close(fd)
    assert _open_errno(captured.path) == errno.EBUSY
    assert mm[:4] == b"\x7fELF"
    mm.close()
    assert _open_errno(captured.path) == 0


def test_tight_open_close_loop_never_ebusy(captured):
    """The FLUSH race fixed earlier stays fixed: close() then open() is never EBUSY (the
    open waits, bounded, for the RELEASE that follows the close)."""
    errs = [e for e in (_open_errno(captured.path) for _ in range(500)) if e]
    assert errs == []
