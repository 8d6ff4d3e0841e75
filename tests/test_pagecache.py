"""Reads through the kernel's page cache only while every open holds one image; exact bytes
for every open when snapshots or address policies differ (device decisions and real mounts)."""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ksymsfs import parse_image
from ksymsfs.device import Device
from ksymsfs.sources import Sources
from tests.fuse_harness import Mount, require_fuse, write_sources
from tests.test_policy import KS, fake_proc
from tests.test_security import become_nobody, in_child


def _dev(tmp_path: Path) -> tuple[Device, Path, Path]:
    ks = tmp_path / "kallsyms"
    ks.write_text(KS)
    proc = tmp_path / "proc"
    for pid in (11, 12, 13, 14, 15):
        fake_proc(proc, pid, pid, 0, 1 << 34)
    return Device(Sources(str(ks), None), procfs=str(proc)), ks, proc


def test_cache_only_while_every_open_holds_one_image(tmp_path):
    dev, ks, _ = _dev(tmp_path)
    a = dev.open(11, os.O_RDONLY)
    assert dev.cache_mode(a) == (False, False)  # page cache; drops whatever was cached
    b = dev.open(12, os.O_RDONLY)
    assert dev.image_of(b) is dev.image_of(a)
    assert dev.cache_mode(b) == (False, False)  # a has not read yet: not proven invalidated
    dev.image_for_read(a)
    c = dev.open(13, os.O_RDONLY)
    assert dev.cache_mode(c) == (False, True)   # same image, epoch proven: keep the pages
    ks.write_text(KS + "ffffffff82000000 T late\n")  # the kernel moved on
    d = dev.open(14, os.O_RDONLY)
    assert dev.image_of(d) is not dev.image_of(a)
    assert dev.cache_mode(d) == (True, False)   # another snapshot is held: direct I/O
    assert dev.image_for_read(d) == (dev.image_of(d), False)  # its own direct reads
    image, drop = dev.image_for_read(d, fill=True)  # d was mapped: its pages enter the cache
    assert image is dev.image_of(d) and drop   # the cached opens' pages must go
    for fh in (a, b, c):
        dev.release(fh)
    e = dev.open(15, os.O_RDONLY)               # only d's image is held now
    assert dev.image_of(e) is dev.image_of(d)
    assert dev.cache_mode(e) == (False, False)  # a new epoch, which drops the old pages
    assert dev.image_for_read(d, fill=True) == (dev.image_of(d), False)  # same image
    dev.release(d)
    dev.release(e)
    assert dev.open_count() == 0


def test_cache_epoch_never_survives_a_new_snapshot_or_policy(tmp_path):
    dev, ks, proc = _dev(tmp_path)
    fake_proc(proc, 21, 21, 65534, 0)
    a = dev.open(11, os.O_RDONLY)
    first, _ = dev.image_for_read(a)
    dev.release(a)
    b = dev.open(12, os.O_RDONLY)  # nothing changed: the same image, its pages still good
    assert dev.image_of(b) is first and dev.cache_mode(b) == (False, True)
    dev.release(b)
    c = dev.open(21, os.O_RDONLY)  # another policy: another image, a fresh epoch
    assert dev.cache_mode(c) == (False, False)
    dev.image_for_read(c)
    dev.release(c)
    ks.write_text(KS + "ffffffff82000000 T late\n")
    d = dev.open(13, os.O_RDONLY)
    assert dev.cache_mode(d) == (False, False)
    dev.release(d)


def _read_and_map(fd: int) -> tuple[bytes, bytes]:
    data = os.pread(fd, 1 << 28, 0)
    mm = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_PRIVATE, mmap.PROT_READ)
    try:
        return data, bytes(mm)
    finally:
        mm.close()


@pytest.mark.fuse
def test_cached_and_direct_snapshots_alive_at_once(tmp_path):
    """One open reads (and maps) through the page cache; the sources change; another
    process opens the new snapshot (direct I/O), reads and maps it: each sees only its own
    bytes, also when the first reads and maps again afterwards."""
    require_fuse()
    src = tmp_path / "src"
    ks, mods = write_sources(src, [f"m{i}" for i in range(150)])
    m = Mount(tmp_path / "ksyms", "--kallsyms", str(ks), "--modules", str(mods))
    try:
        fd = os.open(m.path, os.O_RDONLY)
        old, old_map = _read_and_map(fd)
        assert old == old_map and "m149" in parse_image(old).modules
        write_sources(src, ["alpha"])
        new, new_map = in_child(lambda: _read_and_map(os.open(m.path, os.O_RDONLY)))
        assert new == new_map and "m149" not in parse_image(new).modules
        again, again_map = _read_and_map(fd)
        assert again == old and again_map == old
        os.close(fd)
    finally:
        m.stop()


@pytest.mark.fuse
def test_cached_pages_of_root_never_reach_nobody():
    """Root reads the real image through the page cache and closes; nobody's open (another
    image, a new epoch) drops those pages: nobody reads and maps only zeros."""
    require_fuse()
    d = Path(tempfile.mkdtemp(prefix="ksymsfs-pc-", dir="/tmp"))
    os.chmod(d, 0o755)
    m = Mount(d / "ksyms", "--allow-other")
    try:
        with open(m.path, "rb") as f:
            real = f.read()
        assert parse_image(real).syms["st_value"].any()
        _, (data, mapped) = in_child(lambda: (become_nobody(),
                                              _read_and_map(os.open(m.path, os.O_RDONLY))))
        assert data == mapped and not parse_image(data).syms["st_value"].any()
    finally:
        m.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_unchanged_sources_give_the_same_snapshot_object_and_any_change_a_new_one(tmp_path):
    """Snapshot identity is exact (bytes equality): one changed byte, same length, is seen."""
    from ksymsfs.sources import take_snapshot
    ks, mods = tmp_path / "kallsyms", tmp_path / "modules"
    ks.write_text(KS)
    mods.write_text("")
    src = Sources(str(ks), str(mods))
    a = take_snapshot(src, keep_raw=True)
    assert take_snapshot(src, previous=a, keep_raw=True) is a
    ks.write_text(KS.replace(" T f7\n", " t f7\n"))  # same length, one letter
    b = take_snapshot(src, previous=a, keep_raw=True)
    assert b is not a and len(b.raw) == len(a.raw)
    mods.write_text("\n")  # a module list that differs (and parses to the same nothing)
    assert take_snapshot(src, previous=b, keep_raw=True) is not b
    assert take_snapshot(src).raw == b""  # a one-off snapshot does not keep the text
