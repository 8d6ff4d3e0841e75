"""--passthrough: the kernel reads each snapshot from a memory file; one snapshot at a time."""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import mmap
import os
import signal
import struct
import time

import pytest

from ksymsfs import KIOCGSIZE, parse_image
from ksymsfs.mount import apply_options
from tests.fuse_harness import Mount, read_all, require_fuse, write_sources
from tests.helpers import child_processes, run_ksymsfs
from tests.test_security import in_child


@pytest.fixture
def captured(tmp_path):
    require_fuse()
    src = tmp_path / "src"
    ks, mods = write_sources(src, ["alpha", "beta"])
    m = Mount(tmp_path / "ksyms", "--passthrough", "--kallsyms", str(ks), "--modules",
              str(mods))
    yield m, src
    m.stop()


def views(fd: int) -> tuple[bytes, bytes, int, int]:
    """(bytes read, bytes mapped, fstat size, KIOCGSIZE) of one descriptor."""
    data = os.pread(fd, 1 << 28, 0)
    size = os.fstat(fd).st_size
    with mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ) as mm:
        mapped = mm[:]
    buf = bytearray(8)
    fcntl.ioctl(fd, KIOCGSIZE, buf)
    return data, mapped, size, struct.unpack("=Q", buf)[0]


def open_errno_in_child(path) -> int:
    """errno of an open by another process (0: it opened and read an ELF header)."""
    def attempt() -> int:
        with open(path, "rb") as f:
            return 0 if f.read(4) == b"\x7fELF" else 255
    res = in_child(attempt)
    return res.errno if isinstance(res, OSError) else res


def test_mount_option_passthrough_is_parsed():
    a = argparse.Namespace(passthrough=False)
    apply_options(a, "ro,passthrough")
    assert a.passthrough is True


@pytest.mark.parametrize("how", [["--passthrough", "--allow-other"],
                                 ["-o", "ro,passthrough,allow_other"],
                                 ["--allow-other", "-o", "passthrough"]])
def test_passthrough_is_refused_with_allow_other(tmp_path, how):
    """One snapshot at a time would let any user hold back every other user's opens:
    the combination is a one-line error, exit 2, and the mount point is left as it was
    (absent: not created; a file: untouched)."""
    ks, mods = write_sources(tmp_path / "src", ["alpha"])
    for existing in (False, True):
        mp = tmp_path / "ksyms"
        if existing:
            mp.touch()
        r = run_ksymsfs("mount", *how, "--kallsyms", ks, "--modules", mods, mp)
        err = r.stderr.decode()
        lines = [ln for ln in err.splitlines() if "/dev/log" not in ln]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert "--passthrough" in lines[0] and "--allow-other" in lines[0]
        assert mp.exists() is existing and not os.path.ismount(mp)
        assert not existing or mp.stat().st_size == 0


@pytest.mark.fuse
def test_reads_and_mappings_come_from_the_kernel_not_the_daemon(captured):
    """With passthrough on, an open descriptor reads and maps its snapshot even after the
    daemon is gone (the kernel holds the memory file); read, mmap, fstat and KIOCGSIZE
    agree, and the bytes are the snapshot of the sources."""
    m, _src = captured
    assert "FUSE passthrough on" in m.output()
    fd = os.open(m.path, os.O_RDONLY)
    try:
        data, mapped, size, ioc = views(fd)
        assert data == mapped and len(data) == size == ioc
        assert set(parse_image(data).modules) == {"", "alpha", "beta"}
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(20)
        # no daemon: only the kernel can answer (an fstat, which asks us, now fails)
        assert os.pread(fd, 1 << 28, 0) == data
        with mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ) as mm:
            assert mm[:] == data
        with pytest.raises(OSError) as e:
            os.fstat(fd)
        assert e.value.errno == errno.ENOTCONN
    finally:
        with contextlib.suppress(OSError):  # its FLUSH fails the same way
            os.close(fd)


@pytest.mark.fuse
def test_without_passthrough_reads_need_the_daemon(tmp_path):
    """The control for the test above: the page-cache mount's descriptor fails once the
    daemon is killed (so that test's reads did not come from a cache of ours)."""
    require_fuse()
    ks, mods = write_sources(tmp_path / "src", ["alpha"])
    m = Mount(tmp_path / "ksyms", "--kallsyms", str(ks), "--modules", str(mods))
    fd = os.open(m.path, os.O_RDONLY)
    try:
        assert "FUSE passthrough on" not in m.output()
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(20)
        with pytest.raises(OSError) as e:
            os.pread(fd, 1 << 20, 0)
        assert e.value.errno in (errno.ENOTCONN, errno.EIO)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        m.stop()


@pytest.mark.fuse
def test_a_different_snapshot_waits_for_the_open_one_then_ebusy(captured):
    """The kernel gives an inode one backing file at a time and maps it for every open:
    while one snapshot is open, an open of the same snapshot shares it, an open that
    would get another is refused (never served the open one's bytes), and once the old
    one is closed the new one is read and mapped exactly."""
    m, src = captured
    fd = os.open(m.path, os.O_RDONLY)
    try:
        old = views(fd)
        assert open_errno_in_child(m.path) == 0  # unchanged sources: the same snapshot
        write_sources(src, ["alpha", "beta", "gamma"])
        t = time.monotonic()
        assert open_errno_in_child(m.path) == errno.EBUSY
        assert time.monotonic() - t >= 0.9  # it waited (OPEN_WAIT) for a release first
        # the open one is untouched: its snapshot, then zeros up to the served size
        # (which the refused one's larger snapshot grew; the memory file grew with it)
        data, mapped, size, ioc = views(fd)
        assert data == mapped and len(data) == size == ioc > len(old[0])
        assert data[:len(old[0])] == old[0] and not data[len(old[0]):].strip(b"\0")
    finally:
        os.close(fd)
    time.sleep(0.3)  # the RELEASE is asynchronous
    fd = os.open(m.path, os.O_RDONLY)
    try:
        data, mapped, size, ioc = views(fd)
        assert data == mapped and len(data) == size == ioc
        assert "gamma" in parse_image(data).modules
    finally:
        os.close(fd)
    assert "another snapshot is open" in m.output()


@pytest.mark.fuse
def test_memory_file_follows_the_served_size_down(tmp_path):
    """A smaller snapshot after a larger one: once nothing holds the larger one, the
    memory file is cut to the new served size, so a reader sees exactly what stat says
    (a longer file would give zeros past st_size, a shorter one a short mapping)."""
    require_fuse()
    src = tmp_path / "src"
    ks, mods = write_sources(src, [f"m{i}" for i in range(150)])
    m = Mount(tmp_path / "ksyms", "--passthrough", "--kallsyms", str(ks), "--modules",
              str(mods))
    try:
        big = read_all(m.path)
        write_sources(src, ["alpha"])
        # the open that builds the smaller snapshot still gets the served size of the
        # larger (it never shrinks before a release); the next one is sized to its own
        assert read_all(m.path)[len(big) // 2:] == bytes(len(big) - len(big) // 2)
        time.sleep(0.3)
        fd = os.open(m.path, os.O_RDONLY)
        try:
            data, mapped, size, ioc = views(fd)
        finally:
            os.close(fd)
        assert len(data) == size == ioc == len(mapped) < len(big)
        assert set(parse_image(data).modules) == {"", "alpha"}
        write_sources(src, [f"m{i}" for i in range(150)])  # and back up
        time.sleep(0.3)
        assert read_all(m.path) == big
    finally:
        m.stop()


# -- the decisions, without a mount ----------------------------------------------------------
def test_device_decisions_with_passthrough(tmp_path):
    """One backing image at a time: the same snapshot is shared, a different one waits
    for the holders then EBUSY; once they are gone it names its own; a kernel that will
    not take backing files turns the open direct and the device back to the page cache."""
    from ksymsfs.device import DeviceError
    from tests.test_pagecache import _dev

    dev, ks, _ = _dev(tmp_path)
    dev.passthrough, dev.open_wait = True, 0.2
    a = dev.open(11, os.O_RDONLY)
    b = dev.open(12, os.O_RDONLY)
    assert dev.backing_of(a) is dev.image_of(a) is dev.backing_of(b)
    assert dev.cache_mode(a) == dev.cache_mode(b) == (False, False)
    ks.write_text(ks.read_text() + "ffffffff82000000 T late\n")
    t = time.monotonic()
    with pytest.raises(DeviceError) as e:
        dev.open(13, os.O_RDONLY)
    assert e.value.errno == errno.EBUSY and time.monotonic() - t >= 0.2
    assert dev.open_count() == 2  # the refused open left nothing behind
    dev.release(a)
    dev.release(b)
    c = dev.open(13, os.O_RDONLY)
    assert dev.backing_of(c) is dev.image_of(c)
    assert b"late" in bytes(dev.image_of(c))
    dev.stop_passthrough(c)
    assert dev.cache_mode(c) == (True, False) and dev.backing_of(c) is None
    d = dev.open(14, os.O_RDONLY)  # page-cache decisions again: c's image is held
    assert dev.backing_of(d) is None and dev.cache_mode(d) == (False, False)


def test_may_passthrough_needs_cap_sys_admin_in_the_initial_user_namespace(tmp_path):
    from ksymsfs.fusefs import may_passthrough

    def proc(cap_eff: int, uid_map: str) -> str:
        d = tmp_path / f"proc-{cap_eff:x}-{uid_map.split()[1]}" / "self"
        d.mkdir(parents=True)
        (d / "status").write_text(f"Name:\tx\nCapEff:\t{cap_eff:016x}\n")
        (d / "uid_map").write_text(f"{uid_map}\n")
        return str(d.parent)

    full, init = (1 << 41) - 1, "         0          0 4294967295"
    assert may_passthrough(proc(full, init))
    assert not may_passthrough(proc(full & ~(1 << 21), init))       # no CAP_SYS_ADMIN
    assert not may_passthrough(proc(full, "0 100000 65536"))           # a user namespace
    assert not may_passthrough(str(tmp_path / "absent"))


def _reader_loop(path: str, seconds: float, q) -> None:
    """In a child: open, read, map and parse for ``seconds``; report (ok, errnos, bad)."""
    ok, errs, bad = 0, {}, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            errs[e.errno] = errs.get(e.errno, 0) + 1
            continue
        try:
            # the served size may grow between the calls (another process opened a
            # larger snapshot): then the longer view has zeros where the other ends
            data, mapped, size, _ = views(fd)
            n = min(len(data), len(mapped))
            if mapped[:n] != data[:n] or data[n:].strip(b"\0") or mapped[n:].strip(b"\0"):
                bad.append(f"read {len(data)} and mapped {len(mapped)} bytes differ")
            else:
                parse_image(data)
                ok += 1
        except Exception as e:  # noqa: BLE001
            bad.append(repr(e)[:200])
        finally:
            os.close(fd)
    q.put((ok, errs, bad))


@pytest.mark.fuse
def test_readers_under_churn_get_whole_snapshots_or_ebusy(tmp_path):
    """Four processes open, read, map and parse in a loop while the sources change every
    50 ms: each open gives a whole snapshot whose read and mapping agree, or EBUSY (a
    different one was held); never EIO, which is what the kernel answers when an open
    names another backing file than the inode's (our count of held files would be
    wrong), and the daemon never logs a failure."""
    import threading

    from tests.fuse_harness import churn_sources

    require_fuse()
    src = tmp_path / "src"
    ks, mods = write_sources(src, ["alpha"])
    m = Mount(tmp_path / "ksyms", "--passthrough", "--kallsyms", str(ks), "--modules",
              str(mods))
    stop = threading.Event()
    churn = threading.Thread(target=churn_sources, args=(src, stop), daemon=True)
    try:
        churn.start()
        ctx = child_processes("tests.test_passthrough")
        q = ctx.Queue()
        ps = [ctx.Process(target=_reader_loop, args=(str(m.path), 4, q)) for _ in range(4)]
        for p in ps:
            p.start()
        results = [q.get(timeout=120) for _ in ps]
        for p in ps:
            p.join(30)
    finally:
        stop.set()
        churn.join()
        m.stop()
    ok = sum(r[0] for r in results)
    errs: dict = {}
    for r in results:
        for k, v in r[1].items():
            errs[k] = errs.get(k, 0) + v
    assert ok > 10 and not any(r[2] for r in results), results
    assert set(errs) <= {errno.EBUSY, errno.ENXIO}, errs  # ENXIO: a torn source read
    log = m.log.read_text(errors="replace")
    assert not any(w in log for w in ("Traceback", "sending a FUSE reply failed",
                                      "passthrough off")), log[-2000:]


def test_memory_budget_counts_the_memory_files(tmp_path):
    """--max-memory: with passthrough an image costs its stored bytes twice (the daemon's
    and its memory file's), so a budget of 1.5 images admits one open without and
    refuses it with ENOMEM with passthrough."""
    from ksymsfs.device import Device, DeviceError, _stored
    from ksymsfs.sources import Sources
    from tests.test_pagecache import _dev

    dev, ks, proc = _dev(tmp_path)
    a = dev.open(11, os.O_RDONLY)
    stored = _stored(dev.image_of(a))
    dev.release(a)
    for through in (False, True):
        d = Device(Sources(str(ks), None), procfs=str(proc), max_memory=stored * 3 // 2)
        d.passthrough = through
        if through:
            with pytest.raises(DeviceError) as e:
                d.open(12, os.O_RDONLY)
            assert e.value.errno == errno.ENOMEM
        else:
            d.release(d.open(12, os.O_RDONLY))
