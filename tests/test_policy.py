"""Addresses only for openers the kernel would show them to (kallsyms_show_value)."""

from __future__ import annotations

import errno
import os
import pwd
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ksymsfs import parse_image
from ksymsfs.cli import cli
from ksymsfs.device import Device, DeviceError
from ksymsfs.policy import Sysctls, kallsyms_show_value, process_creds, read_sysctls
from ksymsfs.sources import Sources
from tests.fuse_harness import Mount, require_fuse

KS = "".join(f"{0xffffffff81000000 + 32 * i:016x} T f{i}\n" for i in range(100))


@pytest.mark.parametrize("kptr,paranoid,cap,want", [
    (0, -1, False, True), (0, 1, False, True), (0, 2, False, False), (0, 2, True, True),
    (1, -1, False, False), (1, 1, True, True), (2, -1, True, False), (2, 2, True, False),
])
def test_show_value_matches_kernel_rules(kptr, paranoid, cap, want):
    assert kallsyms_show_value(Sysctls(kptr, paranoid), cap) is want


def test_unreadable_sysctls_count_as_most_restrictive(tmp_path):
    assert read_sysctls(str(tmp_path)) == Sysctls(2, 3)


INIT_NS = "user:[4026531837]"


def fake_proc(root: Path, pid: int, tgid: int, uid: int, capeff: int, kptr=0, paranoid=2,
              userns: str = INIT_NS):
    """A procfs tree: ``pid``'s status and ns/user, the reader's own (``self``) in INIT_NS."""
    for p, ns in ((str(pid), userns), ("self", INIT_NS)):
        (root / p / "ns").mkdir(parents=True, exist_ok=True)
        if not (root / p / "ns" / "user").is_symlink():
            os.symlink(ns, root / p / "ns" / "user")
    (root / str(pid) / "status").write_text(
        f"Name:\tx\nTgid:\t{tgid}\nPid:\t{pid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
        f"CapEff:\t{capeff:016x}\n")
    (root / "sys" / "kernel").mkdir(parents=True, exist_ok=True)
    (root / "sys" / "kernel" / "kptr_restrict").write_text(f"{kptr}\n")
    (root / "sys" / "kernel" / "perf_event_paranoid").write_text(f"{paranoid}\n")


def test_process_creds_reads_tgid_and_cap_syslog(tmp_path):
    fake_proc(tmp_path, 101, 100, 0, 1 << 34)
    fake_proc(tmp_path, 201, 200, 65534, 0)
    assert process_creds(101, str(tmp_path)).cap_syslog is True
    c = process_creds(201, str(tmp_path))
    assert (c.tgid, c.uid, c.cap_syslog) == (200, 65534, False)
    assert process_creds(999, str(tmp_path)) is None


def test_process_creds_of_a_process_named_like_status_fields(tmp_path):
    """A live process (not root) that names itself with status fields after a newline
    (``/proc/self/comm``): the kernel escapes the newline in ``Name:``, so its own
    Tgid, Uid and CapEff are read, not the forged ones; a truncated or field-less status
    gives None."""
    import subprocess
    import sys
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    code = ("import os,sys; open('/proc/self/comm','w').write('a\\nTgid:\\t1\\nUid:\\t0'); "
            f"os.setgid({uid}) if {uid} == 65534 else 0; os.setuid({uid}); "
            "print('ok', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ok"
        assert b"Tgid:" in open(f"/proc/{p.pid}/comm", "rb").read()  # the name is there
        c = process_creds(p.pid)
        assert (c.tgid, c.uid, c.cap_syslog) == (p.pid, uid, False)
    finally:
        p.stdin.close()
        p.wait(10)
    fake_proc(tmp_path, 401, 400, 0, 1 << 34)
    status = (tmp_path / "401" / "status").read_text()
    for broken in (status.replace("CapEff", "CapEf"), status.replace("\nUid:", "\nUid"),
                   status[:status.index("CapEff") + 8], "Tgid:\tx\n" + status[14:], ""):
        (tmp_path / "401" / "status").write_text(broken)
        assert process_creds(401, str(tmp_path)) is None, broken


def test_cap_syslog_counts_only_in_the_initial_user_namespace(tmp_path):
    """CapEff is relative to the process's own namespace; the kernel asks in the initial
    one (security_capable(cred, &init_user_ns, CAP_SYSLOG))."""
    fake_proc(tmp_path, 301, 301, 0, (1 << 41) - 1, userns="user:[4026532999]")
    c = process_creds(301, str(tmp_path))
    assert c.cap_syslog is False and c.userns == "user:[4026532999]"
    assert process_creds(301, str(tmp_path), init_userns="user:[4026532999]").cap_syslog
    os.unlink(tmp_path / "301" / "ns" / "user")  # unreadable namespace: no capability
    assert process_creds(301, str(tmp_path)).cap_syslog is False


def test_device_gives_a_namespaced_root_zeros(tmp_path):
    ks = tmp_path / "kallsyms"
    ks.write_text(KS)
    proc = tmp_path / "proc"
    fake_proc(proc, 41, 41, 0, (1 << 41) - 1, userns="user:[4026532999]")
    dev = Device(Sources(str(ks), None), procfs=str(proc))
    fh = dev.open(41, os.O_RDONLY)
    assert not parse_image(dev.read(fh, 1 << 24, 0)).syms["st_value"].any()


@pytest.mark.parametrize("kptr,paranoid,capeff,real", [
    (0, 2, 1 << 34, True), (0, 2, 0, False), (0, 1, 0, True), (1, 2, 1 << 34, True),
    (2, -1, (1 << 64) - 1, False),
])
def test_device_zeroes_addresses_by_policy(tmp_path, kptr, paranoid, capeff, real):
    ks = tmp_path / "kallsyms"
    ks.write_text(KS)
    proc = tmp_path / "proc"
    fake_proc(proc, 11, 10, 1000, capeff, kptr, paranoid)
    dev = Device(Sources(str(ks), None), procfs=str(proc), reopen="busy")
    fh = dev.open(11, os.O_RDONLY)
    img = parse_image(dev.read(fh, 1 << 24, 0))
    assert bool(np.any(img.syms["st_value"])) is real
    assert len(img) == 100
    with pytest.raises(DeviceError) as e:  # another thread of the same process
        fake_proc(proc, 12, 10, 1000, capeff, kptr, paranoid)
        dev.open(12, os.O_RDONLY)
    assert e.value.errno == errno.EBUSY
    dev.release(fh)
    assert dev.open_count() == 0


def test_reopen_shares_only_a_snapshot_with_the_same_address_rights(tmp_path):
    """A second open by a process that holds one shares its bytes (no new read) unless the
    process's rights changed since (it dropped CAP_SYSLOG): then EBUSY, never its old
    addresses; after the last release the next open is fresh again."""
    ks = tmp_path / "kallsyms"
    ks.write_text(KS)
    proc = tmp_path / "proc"
    fake_proc(proc, 11, 10, 0, 1 << 34)
    dev = Device(Sources(str(ks), None), procfs=str(proc))
    a = dev.open(11, os.O_RDONLY)
    ks.write_text(KS + "ffffffff82000000 T late\n")  # the kernel moved on
    fake_proc(proc, 12, 10, 0, 1 << 34)
    b = dev.open(12, os.O_RDONLY)
    assert dev.image_of(b) is dev.image_of(a)
    fake_proc(proc, 13, 10, 1000, 0)  # a thread that dropped its privileges
    with pytest.raises(DeviceError) as e:
        dev.open(13, os.O_RDONLY)
    assert e.value.errno == errno.EBUSY
    dev.release(a)
    assert len(parse_image(dev.read(b, 1 << 24, 0))) == 100  # b keeps the shared bytes
    dev.release(b)
    c = dev.open(11, os.O_RDONLY)
    assert len(parse_image(dev.read(c, 1 << 24, 0))) == 101
    dev.release(c)
    assert dev.open_count() == 0


def test_flush_frees_the_slot_only_for_the_owner(tmp_path):
    """close() by the owner (its main thread: no /proc read; another thread: by its Tgid)
    lets the same process open again at once; a close by another process does not."""
    ks = tmp_path / "kallsyms"
    ks.write_text(KS)
    proc = tmp_path / "proc"
    fake_proc(proc, 10, 10, 0, 1 << 34)
    fake_proc(proc, 11, 10, 0, 1 << 34)
    fake_proc(proc, 20, 20, 0, 1 << 34)
    dev = Device(Sources(str(ks), None), procfs=str(proc), reopen="busy", open_wait=30)
    a = dev.open(10, os.O_RDONLY)
    dev.flush(a, 20)  # another process (an inherited descriptor) closed its copy
    with pytest.raises(DeviceError) as e:
        dev.open(10, os.O_RDONLY)
    assert e.value.errno == errno.EBUSY
    os.unlink(proc / "10" / "status")  # the leader's close needs no /proc read
    dev.flush(a, 10)
    releaser = threading.Timer(0.05, dev.release, (a,))
    releaser.start()
    b = dev.open(11, os.O_RDONLY)  # waits for a's RELEASE (EBUSY at once without the flush)
    releaser.join()
    dev.release(b)
    c = dev.open(11, os.O_RDONLY)
    dev.flush(c, 11)  # a thread of the owner: by its Tgid
    dev.release(c)
    assert dev.open_count() == 0


def test_full_table_waits_for_the_release_of_a_closed_open(tmp_path):
    """--max-open counts an open until its RELEASE, which the kernel sends after close()
    returns (late under load): an opener finding the table full of such closed opens
    waits for their RELEASE instead of failing with ENOMEM at once."""
    ks = tmp_path / "kallsyms"
    ks.write_text(KS)
    proc = tmp_path / "proc"
    fake_proc(proc, 10, 10, 0, 1 << 34)
    fake_proc(proc, 20, 20, 0, 1 << 34)
    dev = Device(Sources(str(ks), None), procfs=str(proc), max_open=1, open_wait=30)
    a = dev.open(10, os.O_RDONLY)
    dev.flush(a, 10)  # its owner closed it; the RELEASE is on its way
    got = []
    t = threading.Thread(target=lambda: got.append(dev.open(20, os.O_RDONLY)))
    t.start()
    deadline = time.monotonic() + 30
    while not dev._cond._waiters and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert t.is_alive() and not got  # waiting, not refused
    dev.release(a)
    t.join(30)
    assert len(got) == 1 and dev.open_count() == 1
    dev.release(got[0])


def test_without_flush_the_callers_fd_table_tells_a_reopen_from_a_second_open(tmp_path):
    """With FOPEN_NOFLUSH the kernel sends no FLUSH: a process that still has a
    descriptor (``holds``) shares its snapshot; one that closed it gets a fresh snapshot
    once the RELEASE comes (waiting for it, not handed the old one), or EBUSY while a
    mapping, a child or a passed descriptor keeps the open alive."""
    ks = tmp_path / "kallsyms"
    ks.write_text(KS)
    proc = tmp_path / "proc"
    fake_proc(proc, 10, 10, 0, 1 << 34)
    fake_proc(proc, 11, 10, 0, 1 << 34)
    dev = Device(Sources(str(ks), None), procfs=str(proc), open_wait=0.3)
    asked, holding = [], [True]
    dev.holds = lambda tgid, tid: asked.append((tgid, tid)) or holding[0]
    a = dev.open(10, os.O_RDONLY)
    assert asked == []  # nothing held: no fd table read
    ks.write_text(KS + "ffffffff82000000 T late\n")  # the kernel moved on
    b = dev.open(11, os.O_RDONLY)  # a second open from a thread: shared
    assert dev.image_of(b) is dev.image_of(a) and asked == [(10, 11)]
    dev.release(b)
    holding[0] = False  # closed, the RELEASE not yet here (or a mapping holds it)
    with pytest.raises(DeviceError) as e:
        dev.open(10, os.O_RDONLY)  # never the old snapshot: waits, then EBUSY
    assert e.value.errno == errno.EBUSY
    releaser = threading.Timer(0.05, dev.release, (a,))
    releaser.start()
    c = dev.open(10, os.O_RDONLY)  # the RELEASE came while it waited: fresh
    releaser.join()
    assert len(parse_image(dev.read(c, 1 << 24, 0))) == 101
    dev.release(c)
    assert dev.open_count() == 0


def test_holds_descriptor_reads_the_fd_table_and_mountinfo(tmp_path):
    """A descriptor counts when its mount (fdinfo's mnt_id) has the device number asked
    for, in the process's own mountinfo; a live process, then a fake /proc."""
    from ksymsfs.holders import holds_descriptor
    from ksymsfs.mountpoint import mounted_dev
    shm = mounted_dev("/dev/shm")
    assert shm is not None
    path = f"/dev/shm/ksymsfs-holders-{os.getpid()}"
    with open(path, "w"):
        pass
    try:  # processes with nothing else open (this one may hold files in /dev/shm)
        with open(path) as f:
            holder = subprocess.Popen(["sleep", "60"], stdin=f)
        other = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
        try:
            assert holds_descriptor([holder.pid], shm)
            assert not holds_descriptor([holder.pid], "0:999999")
            assert not holds_descriptor([other.pid], shm)
            assert holds_descriptor([other.pid, holder.pid], shm)
        finally:
            for p in (holder, other):
                p.kill()
                p.wait()
    finally:
        os.unlink(path)
    proc = tmp_path / "proc"
    (proc / "7" / "fdinfo").mkdir(parents=True)
    (proc / "7" / "fdinfo" / "3").write_text("pos:\t0\nflags:\t0100000\nmnt_id:\t41\nino:\t1\n")
    (proc / "7" / "mountinfo").write_text(
        "41 30 0:77 / /dev/ksyms ro - fuse.ksymsfs ksymsfs ro\n"
        "30 1 254:0 / / rw - ext4 /dev/vda rw\n")
    assert holds_descriptor([7], "0:77", str(proc))
    assert not holds_descriptor([7], "254:0", str(proc))
    assert not holds_descriptor([7, 8], "0:78", str(proc))  # 8: gone
    assert holds_descriptor([8, 7], "0:77", str(proc))
    assert not holds_descriptor([7], "0:77", str(proc), max_fds=0)  # too many: not held


def _become(user) -> None:
    """Drop root for good: this process becomes ``user`` (a pwd entry)."""
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)


def test_images_for_different_policies_are_never_shared(tmp_path):
    ks = tmp_path / "kallsyms"
    ks.write_text(KS)
    proc = tmp_path / "proc"
    fake_proc(proc, 11, 11, 0, 1 << 34)
    fake_proc(proc, 21, 21, 65534, 0)
    dev = Device(Sources(str(ks), None), procfs=str(proc))
    a = dev.open(11, os.O_RDONLY)
    with pytest.raises(DeviceError) as e:  # the page cache would be shared: refuse
        dev.open(21, os.O_RDONLY)
    assert e.value.errno == errno.EBUSY
    real = parse_image(dev.read(a, 1 << 24, 0))
    dev.release(a)
    b = dev.open(21, os.O_RDONLY)
    hidden = parse_image(dev.read(b, 1 << 24, 0))
    assert real.syms["st_value"].any() and not hidden.syms["st_value"].any()
    assert hidden.names() == real.names()
    assert dev.size_for(21) == len(dev.read(b, 1 << 24, 0))
    assert b"ffffffff81" not in dev.read(b, 1 << 24, 0)


def _as_nobody(path: str) -> tuple[int, bytes]:
    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _become(nobody)
            with open(path, "rb") as f:
                data = f.read()
            os.write(w, b"OK" + data)
            os._exit(0)
        except OSError as e:
            os.write(w, f"E{e.errno}".encode())
            os._exit(1)
    os.close(w)
    chunks = []
    while c := os.read(r, 1 << 20):
        chunks.append(c)
    os.close(r)
    os.waitpid(pid, 0)
    out = b"".join(chunks)
    return (0, out[2:]) if out.startswith(b"OK") else (int(out[1:]), b"")


@pytest.mark.fuse
def test_default_mount_refuses_other_users(tmp_path):
    require_fuse()
    m = Mount(tmp_path / "ksyms")
    try:
        err, _ = _as_nobody(str(m.path))
        assert err == errno.EACCES
    finally:
        m.stop()


@pytest.mark.fuse
def test_allow_other_gives_unprivileged_opener_zero_addresses(public_dir):
    require_fuse()
    m = Mount(public_dir / "ksyms", "--allow-other")
    try:
        err, data = _as_nobody(str(m.path))
        assert err == 0
        hidden = parse_image(data)
        assert len(hidden) > 1000 and not hidden.syms["st_value"].any()
        with open(m.path, "rb") as f:
            real = parse_image(f.read())
        assert real.syms["st_value"].any()
        assert sorted(hidden.names()) == sorted(real.names()) or \
            abs(len(hidden) - len(real)) < 200
    finally:
        m.stop()


@pytest.mark.fuse
def test_allow_other_with_fixture_sysctls(public_dir):
    """perf_event_paranoid <= 1 with kptr_restrict 0: the kernel shows everyone addresses."""
    require_fuse()
    sysctl = public_dir / "sysctl"
    sysctl.mkdir()
    (sysctl / "kptr_restrict").write_text("0\n")
    (sysctl / "perf_event_paranoid").write_text("1\n")
    m = Mount(public_dir / "ksyms", "--allow-other", "--sysctl-dir", str(sysctl))
    try:
        err, data = _as_nobody(str(m.path))
        assert err == 0 and parse_image(data).syms["st_value"].any()
        (sysctl / "kptr_restrict").write_text("2\n")  # now nobody, not even root
        err, data = _as_nobody(str(m.path))
        assert err == 0 and not parse_image(data).syms["st_value"].any()
        with open(m.path, "rb") as f:
            assert not parse_image(f.read()).syms["st_value"].any()
    finally:
        m.stop()


def _kernel_hides_addresses_from_nobody() -> bool:
    return int(Path("/proc/sys/kernel/perf_event_paranoid").read_text()) > 1 or \
        int(Path("/proc/sys/kernel/kptr_restrict").read_text()) > 0


def _cli_as_nobody(args: list[str], workdir: Path) -> tuple[int, str]:
    """Run ``cli(args)`` in a forked child as nobody; -> (exit status, its stderr)."""
    os.chmod(workdir, 0o777)
    err = workdir / "stderr"
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            _become(nobody)
            fd = os.open(err, os.O_WRONLY | os.O_CREAT, 0o666)
            os.dup2(fd, 2)
            sys.stderr = os.fdopen(fd, "w")
            code = cli(args)
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err.read_text()


def test_unprivileged_snapshot_says_addresses_are_hidden(public_dir):
    """`ksymsfs snapshot` run by a user the kernel hides addresses from warns about it."""
    if not _kernel_hides_addresses_from_nobody():
        pytest.skip("this kernel shows every user addresses")
    out = public_dir / "img.elf"
    code, text = _cli_as_nobody(["snapshot", "-o", str(out)], public_dir)
    assert code == 0, text
    assert "zero" in text and "root" in text
    assert not parse_image(out.read_bytes()).syms["st_value"].any()


def _nobody_mmap(path: str, q):
    """As nobody: open and mmap the device; report errno or whether addresses were seen."""
    import mmap
    nobody = pwd.getpwnam("nobody")
    try:
        _become(nobody)
        fd = os.open(path, os.O_RDONLY)
        m = mmap.mmap(fd, 0, mmap.MAP_PRIVATE, mmap.PROT_READ)
        data = bytes(m)
        q.put(("ok", bool(parse_image(data).syms["st_value"].any())))
    except OSError as e:
        q.put(("err", e.errno))
    except Exception as e:  # noqa: BLE001
        q.put(("bad", repr(e)))


@pytest.mark.fuse
def test_mmap_never_leaks_addresses_across_policies(public_dir):
    """A privileged mapping fills the file's page cache; an unprivileged opener must not
    get those pages: it is refused (EBUSY) while the privileged open lasts, and after it
    closes its own mmap sees only zeros (open without keep_cache drops cached pages)."""
    import mmap
    import multiprocessing as mp
    require_fuse()
    m = Mount(public_dir / "ksyms", "--allow-other")
    ctx = mp.get_context("fork")
    try:
        fd = os.open(m.path, os.O_RDONLY)
        mm = mmap.mmap(fd, 0, mmap.MAP_PRIVATE, mmap.PROT_READ)
        assert parse_image(bytes(mm)).syms["st_value"].any()
        q = ctx.Queue()
        p = ctx.Process(target=_nobody_mmap, args=(str(m.path), q))
        p.start()
        assert q.get(timeout=30) == ("err", errno.EBUSY)
        p.join(10)
        _ = bytes(mm)  # the privileged pages stay cached after close
        mm.close()
        os.close(fd)
        p = ctx.Process(target=_nobody_mmap, args=(str(m.path), q))
        p.start()
        assert q.get(timeout=30) == ("ok", False)
        p.join(10)
    finally:
        m.stop()


def test_unprivileged_mount_says_addresses_are_hidden(public_dir):
    """`ksymsfs mount` by a user who only sees zeros says so before anything else."""
    if not _kernel_hides_addresses_from_nobody():
        pytest.skip("this kernel shows every user addresses")
    import ksymsfs.fusefs  # noqa: F401  (loaded before dropping privileges)
    code, text = _cli_as_nobody(["mount", str(public_dir / "ksyms")], public_dir)
    assert "every address" in text and "zero" in text and "Run as root" in text, text
    # nobody cannot open /dev/fuse here, so the mount itself fails: clearly, exit 1
    if code != 0:
        assert code == 1 and "daemon exited" in text
    else:
        cli(["umount", str(public_dir / "ksyms")])
