"""The mounted device: FreeBSD open semantics, tools on the mount, churn, signals, leaks."""

from __future__ import annotations

import errno
import fcntl
import mmap
import multiprocessing as mp
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ksymsfs import KIOCGADDR, KIOCGSIZE, nlist, parse_image
from ksymsfs.mount import mount_state
from tests.fuse_harness import (
    Mount,
    fd_count,
    ksymsfs_cmd,
    malloc_arenas,
    read_all,
    require_fuse,
    rss_kb,
    write_sources,
)
from tests.helpers import IN_CI, cli_env

pytestmark = pytest.mark.fuse


@pytest.fixture(autouse=True)
def _need_fuse():
    require_fuse()


@pytest.fixture
def captured(tmp_path):
    ks, mods = write_sources(tmp_path / "src", ["alpha", "beta"])
    m = Mount(tmp_path / "ksyms", "--kallsyms", str(ks), "--modules", str(mods))
    yield m, tmp_path / "src"
    m.stop()


@pytest.fixture(scope="module", params=["page-cache", "passthrough"])
def live_mount(request, tmp_path_factory):
    """The live kernel's mount, read through the FUSE page cache or (--passthrough) by
    the kernel from the daemon's memory file."""
    require_fuse()
    d = tmp_path_factory.mktemp("live")
    through = request.param == "passthrough"
    m = Mount(d / "ksyms", *(["--passthrough"] if through else []))
    read_all(m.path)  # INIT is answered by now
    assert ("FUSE passthrough on" in m.output()) == through, m.output()
    yield m
    m.stop()


# -- tools read the mount exactly like a saved copy -----------------------------------------
TOOLS = [["readelf", "-a", "-W"], ["nm"], ["eu-readelf", "-a"], ["eu-nm"], ["llvm-nm"],
         ["objdump", "-t"]]


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t[0])
def test_tools_same_on_mount_and_saved_image(live_mount, tmp_path, tool):
    if shutil.which(tool[0]) is None:
        pytest.fail(f"{tool[0]} not installed")
    saved = tmp_path / "saved.elf"
    saved.write_bytes(read_all(live_mount.path))
    on_mount = subprocess.run([*tool, str(live_mount.path)], capture_output=True)
    on_file = subprocess.run([*tool, str(saved)], capture_output=True)
    assert on_mount.returncode == 0, on_mount.stderr
    assert on_mount.stderr == b"" and on_file.stderr == b""
    assert on_mount.stdout.replace(str(live_mount.path).encode(), b"IMG") == \
        on_file.stdout.replace(str(saved).encode(), b"IMG")
    assert len(on_mount.stdout) > 1000


def test_nm_prints_every_kallsyms_symbol(live_mount):
    out = subprocess.run(["nm", "--no-sort", str(live_mount.path)], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    with open("/proc/kallsyms") as f:
        want = sum(1 for _ in f)
    assert abs(len(out) - want) <= 200  # the kernel may change a little meanwhile


def test_package_nlist_on_mount(live_mount):
    hits = nlist(str(live_mount.path), ["_stext", "no_such_symbol_xyz"])
    assert hits["no_such_symbol_xyz"] == []
    (h,) = hits["_stext"]
    assert h.n_type == 0x4 | 0x1  # N_TEXT | N_EXT


# -- FreeBSD open semantics ------------------------------------------------------------------
def _ebusy_from_this_process_and_thread(path) -> None:
    with pytest.raises(OSError) as e:
        os.open(path, os.O_RDONLY)
    assert e.value.errno == errno.EBUSY
    box = []

    def other_thread():
        try:
            os.close(os.open(path, os.O_RDONLY))
            box.append("opened")
        except OSError as err:
            box.append(err.errno)
    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert box == [errno.EBUSY]


def test_second_open_same_process_is_ebusy_with_reopen_busy(tmp_path):
    """FreeBSD's rule exactly (``-o reopen=busy``, or ``--reopen busy``): a second open by
    the same process, from any thread, is EBUSY until it closes."""
    ks, mods = write_sources(tmp_path / "src", ["alpha", "beta"])
    m = Mount(tmp_path / "ksyms", "--kallsyms", str(ks), "--modules", str(mods),
              "-o", "reopen=busy")
    try:
        fd = os.open(m.path, os.O_RDONLY)
        try:
            _ebusy_from_this_process_and_thread(m.path)
        finally:
            os.close(fd)
        os.close(os.open(m.path, os.O_RDONLY))  # after close: fine again
    finally:
        m.stop()


def _fd_bytes(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def test_second_open_same_process_shares_its_snapshot(captured):
    """Default (``--reopen share``): a process that holds the device and opens it again (gdb
    16 does: open, fstat, find it in its BFD cache, close) gets the snapshot it holds, even
    after the kernel changed, from any thread; once all are closed, the next open is fresh."""
    m, src = captured
    fd = os.open(m.path, os.O_RDONLY)
    try:
        first = _fd_bytes(fd)
        write_sources(src, ["alpha", "beta", "gamma"])  # the kernel moves on
        fd2 = os.open(m.path, os.O_RDONLY)
        box = []
        t = threading.Thread(target=lambda: box.append(read_all(m.path)))
        t.start()
        t.join()
        try:
            assert _fd_bytes(fd2) == first and box == [first]
            assert os.fstat(fd2).st_size == os.fstat(fd).st_size
            size = struct.unpack("=Q", fcntl.ioctl(fd2, KIOCGSIZE, bytes(8)))[0]
            assert size == os.fstat(fd).st_size
        finally:
            os.close(fd2)
        assert _fd_bytes(fd) == first  # closing the second kept the first
        assert "gamma" not in parse_image(first).modules
    finally:
        os.close(fd)
    fresh = read_all(m.path)
    assert fresh != first
    assert "gamma" in parse_image(fresh).modules


def _child_reads(path, barrier, q):
    try:
        fd = os.open(path, os.O_RDONLY)
        barrier.wait(10)
        size = os.fstat(fd).st_size
        chunks = []
        while True:
            c = os.read(fd, 65536)
            if not c:
                break
            chunks.append(c)
        data = b"".join(chunks)
        barrier.wait(10)
        os.close(fd)
        img = parse_image(data)
        q.put((size, len(data), len(img)))
    except Exception as e:  # noqa: BLE001
        q.put(repr(e))


def test_two_processes_at_once_each_get_a_whole_image(captured):
    m, _ = captured
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_child_reads, args=(str(m.path), barrier, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    for r in results:
        assert isinstance(r, tuple), r
        size, nread, nsyms = r
        assert size == nread and nsyms == 2000 + 2 * 21


def test_forked_child_may_open_while_parent_has_it_open(captured):
    m, _ = captured
    fd = os.open(m.path, os.O_RDONLY)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.close(os.open(m.path, os.O_RDONLY))
                os._exit(0)
            except OSError as e:
                os._exit(e.errno)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)


def test_open_for_writing_is_refused_and_nothing_is_written(captured):
    m, src = captured
    before = (src / "kallsyms").read_bytes()
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
        with pytest.raises(OSError) as e:
            os.open(m.path, flags)
        assert e.value.errno in (errno.EROFS, errno.EACCES)
    for op in (lambda: os.truncate(m.path, 0), lambda: os.chmod(m.path, 0o666),
               lambda: os.chown(m.path, 1, 1), lambda: os.utime(m.path, (1, 1)),
               lambda: os.setxattr(m.path, "user.x", b"1")):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        os.open(os.path.join(m.path, "x"), os.O_RDONLY | os.O_CREAT)
    assert e.value.errno == errno.ENOTDIR
    assert (src / "kallsyms").read_bytes() == before


# -- size, reads, ioctl -----------------------------------------------------------------------
def test_kiocgsize_equals_fstat_equals_bytes_read(captured):
    m, _ = captured
    fd = os.open(m.path, os.O_RDONLY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, KIOCGSIZE, buf)
        (ksize,) = struct.unpack("=Q", buf)
        data = b""
        while chunk := os.read(fd, 7777):
            data += chunk
        assert ksize == os.fstat(fd).st_size == len(data) == os.stat(m.path).st_size
        assert os.pread(fd, 100, len(data)) == b""
        assert os.pread(fd, 100, len(data) + 12345) == b""
        assert os.pread(fd, 16, 1) == data[1:17]
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, KIOCGADDR, bytearray(8))
        assert e.value.errno == errno.ENOTTY
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, 0x80086C7F, bytearray(8))
        assert e.value.errno == errno.ENOTTY
        mm = mmap.mmap(fd, 0, mmap.MAP_PRIVATE, mmap.PROT_READ)
        assert mm[:] == data
        mm.close()
    finally:
        os.close(fd)


def test_stat_before_any_open_reports_real_size(tmp_path):
    ks, mods = write_sources(tmp_path / "src", ["alpha"])
    m = Mount(tmp_path / "ksyms", "--kallsyms", str(ks), "--modules", str(mods))
    try:
        assert os.stat(m.path).st_size > 0
        out = subprocess.run(["nm", str(m.path)], capture_output=True, text=True)
        assert out.returncode == 0 and "kfunc_1" in out.stdout
    finally:
        m.stop()


# -- fresh snapshots ---------------------------------------------------------------------------
def test_module_change_shows_in_next_open_not_in_open_one(captured):
    m, src = captured
    fd = os.open(m.path, os.O_RDONLY)
    try:
        write_sources(src, ["alpha", "beta", "gamma"])  # load gamma
        old = os.pread(fd, 1 << 26, 0)
        assert nlist(old, ["gamma_fn0"])["gamma_fn0"] == []
        pid = os.fork()
        if pid == 0:
            new = read_all(m.path)
            os._exit(0 if nlist(new, ["gamma_fn0"])["gamma_fn0"] else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        again = os.pread(fd, 1 << 26, 0)  # still this open's own snapshot: the served size
        # may have grown with the newer, larger one (zeros after ours), never shrunk
        assert again[:len(old)] == old and again[len(old):] == bytes(len(again) - len(old))
    finally:
        os.close(fd)
    write_sources(src, ["beta"])  # unload alpha and gamma
    img = parse_image(read_all(m.path))
    assert set(img.modules) == {"", "beta"}


def _churn(modules_path: Path, stop):
    i = 0
    tmp = modules_path.with_suffix(".churn")
    while not stop.is_set():
        tmp.write_text(f"m{i} 16384 0 - Live 0xffffffffc0000000\n")
        os.replace(tmp, modules_path)
        i += 1


def test_sources_changing_during_read_give_enxio(tmp_path):
    ks, mods = write_sources(tmp_path / "src", [], nkernel=300000)
    m = Mount(tmp_path / "ksyms", "--kallsyms", str(ks), "--modules", str(mods))
    try:
        ctx = mp.get_context("fork")
        stop = ctx.Event()
        writer = ctx.Process(target=_churn, args=(mods, stop))
        writer.start()
        try:
            deadline = time.monotonic() + 30  # the writer runs (not a fixed 0.2 s)
            while not mods.read_text() and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(OSError) as e:
                os.open(m.path, os.O_RDONLY)
            assert e.value.errno == errno.ENXIO
        finally:
            stop.set()
            writer.join(10)
        write_sources(tmp_path / "src", [], nkernel=10)
        os.close(os.open(m.path, os.O_RDONLY))  # calm again: opens work
    finally:
        m.stop()


# -- no leaks ----------------------------------------------------------------------------------

def test_thousand_open_read_close_cycles_do_not_leak(captured):
    m, _ = captured
    for _ in range(50):
        read_all(m.path)
    fds0, rss0 = fd_count(m.pid), rss_kb(m.pid)
    for _ in range(1000):
        with open(m.path, "rb") as f:
            assert f.read(4) == b"\x7fELF"
            f.read()
    fds1, rss1 = fd_count(m.pid), rss_kb(m.pid)
    assert fds1 <= fds0
    assert rss1 - rss0 < 20 * 1024, (rss0, rss1)


def test_daemon_threads_share_one_malloc_arena(captured):
    """Every thread of the daemon allocates from the main arena: a thread that allocated
    before the limit was set (the mount watcher did) got an arena of its own, shared
    round-robin with the FUSE workers, and ~7 MB of it stayed resident when idle."""
    m, _ = captured
    cats = [subprocess.Popen(["cat", str(m.path)], stdout=subprocess.DEVNULL)
            for _ in range(8)]  # a crowd of processes: the pool's threads all serve
    assert [c.wait(60) for c in cats] == [0] * 8
    assert malloc_arenas(m.pid) == []


# -- lifecycle ---------------------------------------------------------------------------------
def test_sigterm_unmounts(captured):
    m, _ = captured
    m.proc.send_signal(signal.SIGTERM)
    m.proc.wait(20)
    assert mount_state(str(m.path)) == "none"


def test_killed_daemon_leaves_stale_mount_that_force_recovers(tmp_path):
    ks, mods = write_sources(tmp_path / "src", ["alpha"])
    mp_ = tmp_path / "ksyms"
    m = Mount(mp_, "--kallsyms", str(ks), "--modules", str(mods))
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(10)
    try:
        assert mount_state(str(mp_)) == "stale"
        r = subprocess.run(ksymsfs_cmd("mount", "--kallsyms", str(ks), str(mp_)),
                           capture_output=True, text=True, env=cli_env())
        assert r.returncode == 1
        assert "stale mount" in r.stderr and "--force" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        r = subprocess.run(ksymsfs_cmd("mount", "--force", "--kallsyms", str(ks),
                                       "--modules", str(mods), str(mp_)),
                           capture_output=True, text=True, env=cli_env())
        assert r.returncode == 0, r.stderr
        assert parse_image(read_all(mp_)).modules.count("alpha") == 21
        r = subprocess.run(ksymsfs_cmd("umount", str(mp_)), capture_output=True, env=cli_env())
        assert r.returncode == 0 and mount_state(str(mp_)) == "none"
    finally:
        m.stop()


def test_already_mounted_is_refused(captured):
    m, src = captured
    r = subprocess.run(ksymsfs_cmd("mount", "--kallsyms", str(src / "kallsyms"), str(m.path)),
                       capture_output=True, text=True, env=cli_env())
    assert r.returncode == 1 and "already mounted" in r.stderr


def _assert_serves_alpha(r: subprocess.CompletedProcess, mp_: Path) -> None:
    """The mount command succeeded and nm on the mount shows the captured module."""
    assert r.returncode == 0, r.stderr
    assert mount_state(str(mp_)) == "mounted"
    assert "alpha_fn3" in subprocess.run(["nm", str(mp_)], capture_output=True,
                                         text=True).stdout


def test_daemon_mode_and_mount_fuse_form(tmp_path):
    ks, mods = write_sources(tmp_path / "src", ["alpha"])
    mp_ = tmp_path / "ksyms"
    r = subprocess.run(ksymsfs_cmd("ksymsfs", str(mp_), "-o",
                                   f"ro,nosuid,kallsyms={ks},modules={mods}"),
                       capture_output=True, text=True, env=cli_env(), timeout=60)
    try:
        _assert_serves_alpha(r, mp_)
    finally:
        subprocess.run(ksymsfs_cmd("umount", str(mp_)), env=cli_env())
    assert mount_state(str(mp_)) == "none"


def test_mount_fuse_helper_protocol(tmp_path):
    """mount.fuse(8), as `mount -t fuse.ksymsfs` / an fstab line runs it, starts us."""
    helper = shutil.which("mount.fuse") or shutil.which("mount.fuse3")
    if not helper:
        pytest.fail("mount.fuse missing (apt package fuse)")
    ks, mods = write_sources(tmp_path / "src", ["alpha"])
    mp_ = tmp_path / "ksyms"
    mp_.touch()
    e = cli_env()
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "ksymsfs").write_text(f"#!/bin/sh\nexec {sys.executable} -m ksymsfs \"$@\"\n")
    (shim / "ksymsfs").chmod(0o755)
    e["PATH"] = f"{shim}:{e['PATH']}"
    r = subprocess.run([helper, "ksymsfs", str(mp_), "-t", "fuse.ksymsfs", "-o",
                        f"ro,nosuid,nodev,kallsyms={ks},modules={mods}"],
                       capture_output=True, text=True, timeout=60, env=e)
    try:
        _assert_serves_alpha(r, mp_)
    finally:
        subprocess.run(ksymsfs_cmd("umount", str(mp_)), env=cli_env())
    assert mount_state(str(mp_)) == "none"


def test_libbsd_nlist_same_on_mount_and_saved_image(live_mount, tmp_path, nlist_client):
    """A C program calling libbsd nlist(3) on /dev/ksyms: the fstat size must be true."""
    saved = tmp_path / "saved.elf"
    saved.write_bytes(read_all(live_mount.path))
    img = parse_image(saved.read_bytes())
    names = [n for n in ("_stext", "schedule", "printk", "_printk", "jiffies", "do_exit")
             if nlist(img, [n])[n]] + ["no_such_symbol_abc"]
    on_mount = subprocess.run([str(nlist_client), str(live_mount.path), *names],
                              capture_output=True, text=True)
    on_file = subprocess.run([str(nlist_client), str(saved), *names], capture_output=True,
                             text=True)
    assert on_mount.returncode == 0 and on_mount.stderr == ""
    assert on_mount.stdout == on_file.stdout
    lines = on_mount.stdout.splitlines()
    assert lines[-1] == "1"  # one name not found
    for line, name in zip(lines, names[:-1]):
        _, n_type, n_value = line.split()
        (hit,) = nlist(img, [name])[name][:1]
        assert int(n_type, 16) == hit.n_type and int(n_value, 16) == hit.n_value


def test_fstab_line_mounts_through_mount8(tmp_path):
    """`ksymsfs /dev/ksyms fuse.ksymsfs ro 0 0` in an fstab, mounted by mount(8)."""
    helper = Path("/usr/sbin/mount.fuse.ksymsfs")
    if not helper.exists():
        if IN_CI:
            pytest.fail("make install-mount-helper did not run")
        pytest.skip("mount helper not installed (make install-mount-helper)")
    ks, mods = write_sources(tmp_path / "src", ["alpha"])
    mp_ = tmp_path / "ksyms"
    mp_.touch()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"ksymsfs {mp_} fuse.ksymsfs ro,kallsyms={ks},modules={mods} 0 0\n")
    r = subprocess.run(["mount", "--fstab", str(fstab), str(mp_)], capture_output=True,
                       text=True, timeout=60)
    try:
        _assert_serves_alpha(r, mp_)
    finally:
        subprocess.run(["umount", str(mp_)])
    assert mount_state(str(mp_)) == "none"


def test_serving_daemon_maps_no_openssl(live_mount):
    """hashlib maps libcrypto: 3.6 MB of an idle daemon's RSS for one digest per mount.
    The live daemon, after serving an open, has none (and its digest is SHA-256's)."""
    import hashlib

    from ksymsfs.digest import sha256_hex
    assert sha256_hex(b"/dev/ksyms") == hashlib.sha256(b"/dev/ksyms").hexdigest()
    assert len(read_all(live_mount.path)) > 0
    with open(f"/proc/{live_mount.pid}/maps") as f:
        maps = f.read()
    assert "libfuse" in maps and "python" in maps  # it is the serving process
    assert "libcrypto" not in maps and "_hashlib" not in maps
