"""Core units: sources, module order, sections, targets, odd-but-legal input, the Coalescer."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from ksymsfs import ParseError, parse_image, parse_kallsyms
from ksymsfs.builder import build_image
from ksymsfs.device import Coalescer, Device
from ksymsfs.elfdefs import ELFCLASS32, ELFCLASS64, ELFDATA2MSB, make_target
from ksymsfs.errors import ConfigError, SourceError
from ksymsfs.reader import dump_lines, lookup, nlist
from ksymsfs.readfile import ValueFiles
from ksymsfs.sizes import infer_sizes
from ksymsfs.sources import Sources, parse_modules, take_snapshot


def build(text: str, **kw) -> bytes:
    t = parse_kallsyms(text.encode())
    return build_image(t, kw.pop("target", make_target(address_bits=t.address_bits)), **kw)


def test_modules_parse_and_errors():
    mods = parse_modules(b"fuse 91492 2 - Live 0xffffffffa0485000 (O)\n"
                         b"old 3328 0 - Live 0xbf021000\nloading 10 0 - Loading 0x0\n")
    assert [(m.name, m.state, m.address) for m in mods] == [
        ("fuse", "Live", 0xffffffffa0485000), ("old", "Live", 0xbf021000),
        ("loading", "Loading", 0)]
    with pytest.raises(ParseError, match=r"mods:2: malformed"):
        parse_modules(b"a 1 0 - Live 0x0\nbroken\n", "mods")
    with pytest.raises(ParseError, match=r"mods:1: bad module address"):
        parse_modules(b"a 1 0 - Live 0xzz\n", "mods")


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="cannot read"):
        take_snapshot(Sources(str(tmp_path / "nope"), None))
    with pytest.raises(SourceError, match="modules"):
        (tmp_path / "k").write_text("0000000000000001 T a\n")
        take_snapshot(Sources(str(tmp_path / "k"), str(tmp_path / "modules"),
                              modules_optional=False))


def test_live_sources_cope_without_proc_modules(tmp_path):
    (tmp_path / "kallsyms").write_text("ffffffff81000000 T _stext\n")
    src = Sources.live(procfs=str(tmp_path), sysfs=str(tmp_path))
    assert src.modules is None  # never tried: procfs has it from boot or never
    snap = take_snapshot(src)
    assert snap.modules is None and len(snap.table) == 1
    (tmp_path / "modules").write_text("")
    assert Sources.live(procfs=str(tmp_path)).modules == str(tmp_path / "modules")


KS = ("ffffffff81000000 T _stext\nffffffff81000010 t helper\n"
      "ffffffffc0000000 t a_fn\t[a]\nffffffffc0000040 D a_data\t[a]\n"
      "ffffffffc0100000 t b_fn\t[b]\nffffffffc0100020 T b_export\t[b]\n"
      "ffffffffc0200000 t bpf_prog_1234_x\t[bpf]\n")


def test_symbol_order_locals_first_kernel_then_load_order():
    t = parse_kallsyms(KS.encode())
    img = parse_image(build_image(t, make_target(), load_order=["b", "a"]))
    names = img.names()
    assert names == ["helper", "b_fn", "a_fn", "bpf_prog_1234_x",
                     "_stext", "b_export", "a_data"]
    first_global = int(img.shdrs[img.section_names.index(".symtab")]["sh_info"])
    assert first_global == 5  # null entry + 4 locals
    assert img.modules == ["", "b", "a", "bpf", "", "b", "a"]


def test_without_module_list_load_order_is_reverse_of_kallsyms():
    img = parse_image(build(KS))
    locals_ = img.names()[:4]
    assert locals_ == ["helper", "bpf_prog_1234_x", "b_fn", "a_fn"]


def test_sections_dir_names_module_sections(tmp_path):
    ks = tmp_path / "kallsyms"
    ks.write_text(KS)
    (tmp_path / "modules").write_text("b 100 0 - Live 0xffffffffc0100000\n"
                                      "a 100 0 - Live 0xffffffffc0000000\n")
    for mod, secs in {"a": {".text": 0xffffffffc0000000, ".data": 0xffffffffc0000040},
                      "b": {".text": 0xffffffffc0100000, ".init.text": 0xffffffffc0100020}
                      }.items():
        d = tmp_path / "sys" / mod / "sections"
        d.mkdir(parents=True)
        for s, v in secs.items():
            (d / s).write_text(f"0x{v:016x}\n")
    snap = take_snapshot(Sources(str(ks), str(tmp_path / "modules"), str(tmp_path / "sys"),
                                 modules_optional=False))
    img = parse_image(build_image(snap.table, make_target(), snap.load_order,
                                  section_bases=snap.section_bases))
    assert ".data[a]" in img.section_names
    assert ".init.text[b]" in img.section_names and ".text[b]" in img.section_names
    i = img.names().index("b_export")
    assert img.section_names[int(img.syms["st_shndx"][i])] == ".init.text[b]"


@pytest.mark.parametrize("arch,cls,big", [("aarch64", ELFCLASS64, False),
                                          ("mips", ELFCLASS32, True),
                                          ("ppc64", ELFCLASS64, True), ("arm", ELFCLASS32, False)])
def test_arch_overrides(arch, cls, big):
    text = "c0008000 T _stext\nc0008010 t x\n" if cls == ELFCLASS32 else KS
    img = parse_image(build(text, target=make_target(arch)))
    assert img.elfclass == cls and (img.byteorder == ELFDATA2MSB) is big
    assert nlist(img, ["_stext"])["_stext"][0].n_value in (0xc0008000, 0xffffffff81000000)
    assert sorted(dump_lines(img)) == sorted(text.splitlines())


def test_32bit_dump_defaults_to_class32_and_class64_override():
    text = "c0008000 T _stext\n"
    assert parse_image(build(text)).elfclass == ELFCLASS32
    img = parse_image(build(text, target=make_target(elfclass=ELFCLASS64, address_bits=32)))
    assert img.elfclass == ELFCLASS64
    with pytest.raises(ConfigError):
        make_target("vax")


def test_odd_but_legal_input_is_kept():
    long = "x" * 511
    text = (f"0000000000000000 T zero_addr\n0000000000000000 T zero_addr\n"
            f"ffffffff81000000 t $x\nffffffff81000000 t .L_local\n"
            f"ffffffff81000004 t {long}\nffffffff81000008 ? what\n"
            f"ffffffff8100000c U undef_ref\nffffffff8100000c N dbg\n")
    img = parse_image(build(text))
    assert sorted(dump_lines(img)) == sorted(text.splitlines())
    assert len(nlist(img, ["zero_addr"])["zero_addr"]) == 2
    assert nlist(img, [long])[long][0].n_value == 0xffffffff81000004
    with pytest.raises(ParseError, match="longer than 511"):
        parse_kallsyms(f"ffffffff81000004 t {long}x\n".encode(), "k")


def test_all_zero_addresses_build_a_valid_image():
    t = parse_kallsyms(KS.encode())
    img = parse_image(build_image(t, make_target(), hide_addresses=True))
    assert not img.syms["st_value"].any() and len(img) == len(t)
    assert b"ffffffff" not in build_image(t, make_target(), hide_addresses=True)


def test_sizes_next_address_capped_last_to_page_end():
    a = np.array([0x20, 0x20, 0x30, 0x100000, 0x100f00, 0x200005, 0x200009], np.uint64)
    g = np.array([0, 0, 0, 0, 0, 1, 1])
    # last of group 0 at 0x100f00: to its page end; last of group 1: page end too
    assert infer_sizes(a, g).tolist() == [16, 16, 0x10000, 0xf00, 0x100, 4, 0xff7]
    # interleaved groups: a size stops at the other group's symbol
    a2 = np.array([0x1000, 0x1100, 0x1040], np.uint64)
    assert infer_sizes(a2, np.array([0, 0, 1])).tolist() == [0x40, 0xf00, 0xc0]
    # a mapping symbol ends nothing and gets no size
    m = np.array([False, True, False])
    assert infer_sizes(np.array([0x1000, 0x1004, 0x1010], np.uint64), np.zeros(3),
                       m).tolist() == [0x10, 0, 0xff0]


def test_lookup_rules():
    img = parse_image(build(KS))
    r = lookup(img, [0xffffffff81000004, 0xffffffffc0000041, 0xffffffff80000000])
    assert str(r[0]) == "_stext+0x4/0x10"
    # a module's last symbol reaches its page end (less if the image is too small to
    # hold such a section: see README "Symbol sizes and lookup")
    assert (r[1].name, r[1].offset, r[1].module) == ("a_data", 1, "a")
    assert 1 < r[1].size <= 0x1000 - 0x40
    assert r[2] is None


def test_same_input_same_bytes():
    assert build(KS) == build(KS)


def _until(cond, timeout: float = 30) -> None:
    """Wait for ``cond()`` (scheduling on a loaded machine, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_coalescer_shares_only_reads_started_after_arrival():
    calls = []
    gate = threading.Event()

    def read():
        calls.append(time.monotonic())
        gate.wait(5)
        return len(calls)
    c = Coalescer(read)
    results = []
    first = threading.Thread(target=lambda: results.append(("first", c.get())))
    first.start()
    _until(lambda: len(calls) == 1)  # the first read is in flight: later callers must not take it
    late = [threading.Thread(target=lambda: results.append(("late", c.get())))
            for _ in range(5)]
    for t in late:
        t.start()
    _until(lambda: len(c._cond._waiters) == 5)  # all five wait in get() (none reads yet)
    gate.set()
    for t in [first, *late]:
        t.join(5)
    assert ("first", 1) in results
    assert sorted(v for k, v in results if k == "late") == [2] * 5  # one shared read
    assert len(calls) == 2


def test_parallel_coalescer_starts_a_second_read_while_the_first_runs():
    """With two slots, callers who came after the first read began do not wait for it to
    end: once no new caller came for ``gather`` s, one of them starts a second read, which
    they all share."""
    starts, ends = [], []
    gate = threading.Event()

    def read():
        starts.append(time.monotonic())
        n = len(starts)
        if n == 1:
            gate.wait(5)  # the first read stays in flight until the late ones are served
        ends.append(time.monotonic())
        return n
    c = Coalescer(read, parallel=2, gather=0.02)
    results = []
    first = threading.Thread(target=lambda: results.append(("first", c.get())))
    first.start()
    deadline = time.monotonic() + 10
    while not starts and time.monotonic() < deadline:  # the first read is in flight
        time.sleep(0.001)
    late = [threading.Thread(target=lambda: results.append(("late", c.get())))
            for _ in range(5)]
    for t in late:
        t.start()
    for t in late:
        t.join(5)
    assert sorted(v for k, v in results if k == "late") == [2] * 5  # one shared read
    assert not gate.is_set() and first.is_alive()  # served while the first still ran
    gate.set()
    first.join(5)
    assert ("first", 1) in results and len(starts) == 2


def test_parallel_coalescer_never_serves_a_read_older_than_the_caller():
    """Random arrivals and read times: every caller's result comes from a read that began
    after it arrived, and no more than ``parallel`` reads ever run at once."""
    import random
    rnd = random.Random(7)
    lock = threading.Lock()
    running, peak = [0], [0]

    def read():
        t = time.monotonic()
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(rnd.uniform(0.001, 0.02))
        with lock:
            running[0] -= 1
        return t
    c = Coalescer(read, parallel=2, gather=0.003)
    bad = []

    def caller(delay):
        time.sleep(delay)
        came = time.monotonic()
        began = c.get()
        if began < came:
            bad.append((came, began))
    ts = [threading.Thread(target=caller, args=(rnd.uniform(0, 0.2),)) for _ in range(60)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert not bad and peak[0] <= 2


def test_parallel_reads_of_one_new_state_share_one_snapshot(tmp_path, monkeypatch):
    """Two reads in flight at once that both find the kernel changed give one snapshot
    object (so one image and one page-cache epoch), not two equal ones."""
    import ksymsfs.device as devmod
    (tmp_path / "k").write_text(KS)
    dev = Device(Sources(str(tmp_path / "k"), None))
    old = dev.prime()
    (tmp_path / "k").write_text(KS + "ffffffff82000000 T late\n")
    both = threading.Barrier(2, timeout=5)
    real = devmod.take_snapshot

    def slow(*a, **kw):
        snap = real(*a, **kw)
        both.wait()  # both reads have read and parsed before either is kept
        return snap
    monkeypatch.setattr(devmod, "take_snapshot", slow)
    got = []
    ts = [threading.Thread(target=lambda: got.append(dev._read_sources())) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(5)
    assert len(got) == 2 and got[0] is got[1] is dev._snap and got[0] is not old
    assert len(got[0].table) == len(old.table) + 1 and b"\0late\0" in got[0].table.strtab


def test_device_unchanged_kernel_shares_one_image(tmp_path):
    import subprocess
    (tmp_path / "k").write_text(KS)
    dev = Device(Sources(str(tmp_path / "k"), None))
    a = dev.open(os.getpid(), os.O_RDONLY)
    img_a = dev._handles[a].image
    # a second process (another tgid, of our credentials and user namespace; pid 1 may
    # not let us read its namespace) gets the very same bytes
    other = subprocess.Popen(["sleep", "60"])
    try:
        b = dev.open(other.pid, os.O_RDONLY)
        assert dev._handles[b].image is img_a
        (tmp_path / "k").write_text(KS + "ffffffff81000020 T new_sym\n")
        dev.release(b)
        c = dev.open(other.pid, os.O_RDONLY)
        assert dev._handles[c].image is not img_a and b"new_sym" in dev._handles[c].image
        assert dev.read(a, 1 << 20, 0)[:len(img_a)] == img_a  # the older open keeps it
    finally:
        other.kill()
        other.wait()


def test_device_changed_kernel_built_once_for_openers_arriving_during_the_build(
        tmp_path, monkeypatch):
    import ksymsfs.device as device_mod
    (tmp_path / "k").write_text(KS)
    dev = Device(Sources(str(tmp_path / "k"), None))
    dev.snapshot(True)
    (tmp_path / "k").write_text(KS + "ffffffff81000020 T new_sym\n")
    builds = []
    real = device_mod.snapshot_image

    def slow(*a, **kw):
        builds.append(1)
        time.sleep(0.3)
        return real(*a, **kw)
    monkeypatch.setattr(device_mod, "snapshot_image", slow)
    out = []
    first = threading.Thread(target=lambda: out.append(dev.snapshot(True)))
    first.start()
    time.sleep(0.1)  # the second opener arrives while the first one's image is built
    out.append(dev.snapshot(True))
    first.join(5)
    assert len(builds) == 1 and out[0] is out[1] and b"new_sym" in out[0]


def test_device_openers_sharing_one_read_share_one_build(tmp_path, monkeypatch):
    import ksymsfs.device as device_mod
    (tmp_path / "k").write_text(KS)
    dev = Device(Sources(str(tmp_path / "k"), None))
    snap = dev._read_sources()
    builds = []
    real = device_mod.snapshot_image

    def counting(*a, **kw):
        builds.append(1)
        time.sleep(0.05)  # long enough for the other threads to arrive meanwhile
        return real(*a, **kw)
    monkeypatch.setattr(device_mod, "snapshot_image", counting)
    out = []
    threads = [threading.Thread(target=lambda: out.append(dev._image_for(snap, True)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(builds) == 1 and len(out) == 8 and all(o is out[0] for o in out)


def test_snapshot_digest_is_of_the_bytes_read_and_refused_without_them(tmp_path):
    """The VM churn checker keys its verdicts by digest: two readings of different bytes
    must never share one (a snapshot that kept no bytes has no digest at all)."""
    from ksymsfs.sources import Sources, take_snapshot
    ks = tmp_path / "kallsyms"
    ks.write_text("ffffffff81000000 T a\n")
    one = take_snapshot(Sources(str(ks), None), keep_raw=True)
    ks.write_text("ffffffff81000000 T b\n")
    two = take_snapshot(Sources(str(ks), None), previous=one, keep_raw=True)
    assert two is not one and two.digest != one.digest
    assert take_snapshot(Sources(str(ks), None), previous=two, keep_raw=True) is two
    with pytest.raises(ValueError):
        _ = take_snapshot(Sources(str(ks), None)).digest


def test_read_buffer_reads_exactly_grows_and_keeps_the_cap(tmp_path):
    """The device's reused kallsyms buffer: the same bytes as a plain read (also of a
    procfs file answered a page per read), growth past its size, the read cap."""
    from ksymsfs.readfile import CHUNK, ReadBuffer, read_regular
    buf = ReadBuffer()
    big = tmp_path / "big"
    data = os.urandom(3 * CHUNK + 12345)
    big.write_bytes(data)
    assert bytes(read_regular(str(big), into=buf)) == data
    small = tmp_path / "small"
    small.write_bytes(b"tiny\n")
    assert bytes(read_regular(str(small), into=buf)) == b"tiny\n"  # no tail of the big one
    assert bytes(read_regular(str(big), into=buf)) == data
    buf.release()  # idle: freed; the next read allocates its old size at once
    assert bytes(read_regular(str(small), into=buf)) == b"tiny\n"
    assert bytes(read_regular(str(big), into=buf)) == data
    proc = read_regular("/proc/self/status")  # same process: the same text twice
    assert bytes(read_regular("/proc/self/status", into=buf)).split(b"\n")[:3] == \
        proc.split(b"\n")[:3]
    with pytest.raises(SourceError, match="larger than 100 bytes"):
        read_regular(str(big), 100, into=buf)
    with pytest.raises(SourceError, match="larger than"):
        read_regular(str(big), len(data) - 1, into=buf)
    assert len(read_regular(str(big), len(data), into=buf)) == len(data)
    second = ReadBuffer(buf.size_hint)  # a second read in flight: sized at once
    assert second.size_hint >= len(data)
    assert bytes(read_regular(str(big), into=second)) == data
    assert second.size_hint == buf.size_hint  # no doubling past the first one's size


def test_read_buffer_compares_with_the_previous_reading_as_it_reads(tmp_path):
    """``expect``: the previous reading itself back if every byte is equal, else exactly
    the new bytes, wherever they first differ (first byte, inside a step, at a step's
    edge, the last byte, longer, shorter, empty); the cap still holds; progress is told
    each read at once, also for the read that differs."""
    from ksymsfs.freshness import READ_BUFFER, STEP
    from ksymsfs.readfile import ReadBuffer, read_regular
    from tests.test_freshness import Log  # a ReadProgress that keeps every advance
    old = os.urandom(3 * STEP + 777)
    f = tmp_path / "k"
    buf = ReadBuffer()
    f.write_bytes(old)
    expect = bytes(old)
    assert read_regular(str(f), into=buf, expect=expect) is expect
    flip = lambda b, i: b[:i] + bytes([b[i] ^ 1]) + b[i + 1:]  # noqa: E731
    cases = [flip(old, 0), flip(old, 5), flip(old, STEP - 1), flip(old, STEP),
             flip(old, READ_BUFFER - 1), flip(old, READ_BUFFER), flip(old, READ_BUFFER + 1),
             flip(old, 2 * STEP + 3), flip(old, len(old) - 1), old + b"x", old[:-1],
             old[:STEP], old[:2 * STEP + 1], b"", old + os.urandom(4 * STEP)]
    for new in cases:
        f.write_bytes(new)
        got = read_regular(str(f), into=buf, expect=expect)
        assert got is not expect and bytes(got) == new
    f.write_bytes(old)
    assert read_regular(str(f), into=buf, expect=expect) is expect  # after a fallback too
    with pytest.raises(SourceError, match="larger than"):
        read_regular(str(f), len(old) - 1, into=buf, expect=expect)
    for new in (old, flip(old, STEP + 9)):
        f.write_bytes(new)
        p = Log()
        read_regular(str(f), into=buf, progress=p, expect=expect)
        seen = [n for _, n in p.seen]
        steps = [b - a for a, b in zip([0, *seen], seen)]
        assert seen[-1] == len(new) and all(0 <= s <= STEP for s in steps)
        assert sorted(seen) == seen


def _bytes_read() -> int:
    """This process's bytes received by read() so far (/proc/self/io ``rchar``)."""
    with open("/proc/self/io", "rb") as f:
        return int(dict(ln.split(b": ") for ln in f.read().splitlines())[b"rchar"])


def test_read_buffer_leaves_the_unchecked_span_uncompared(tmp_path):
    """``unchecked`` = (a, b): a byte changed inside it is not seen (the previous reading
    comes back: the caller vouched for those bytes), though every byte is read (never
    sought past: README "Performance"); changes before or after it are, also inside a
    read that straddles its ends; a file that ends inside the span (so it is not what the
    caller said) is read again and compared whole: the exact new bytes."""
    from ksymsfs.freshness import STEP
    from ksymsfs.readfile import ReadBuffer, read_regular
    old = os.urandom(4 * STEP + 999)
    expect, f, buf = bytes(old), tmp_path / "k", ReadBuffer()
    a, b = STEP // 2, 3 * STEP + 7
    flip = lambda data, i: data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]  # noqa: E731
    for i in (a, a + 1, STEP, 2 * STEP + 5, b - 4097, b - 1):
        f.write_bytes(flip(old, i))
        before = _bytes_read()
        assert read_regular(str(f), into=buf, expect=expect, unchecked=(a, b)) is expect
        assert _bytes_read() - before >= len(old)  # all of it received, once
        assert _bytes_read() - before < 2 * len(old)
    for new in (flip(old, 0), flip(old, a - 1), flip(old, b), flip(old, b + 1),
                flip(old, len(old) - 1), old + b"x", old[:-1], old[:b],
                old[:b - 1], flip(old[:b - 1], 9), old[:2 * STEP], old[:a + 1], b""):
        f.write_bytes(new)
        got = read_regular(str(f), into=buf, expect=expect, unchecked=(a, b))
        assert got is not expect and bytes(got) == new
    f.write_bytes(flip(old, a + 3)[:b - 5])  # ends inside: the change is seen too
    got = read_regular(str(f), into=buf, expect=expect, unchecked=(a, b))
    assert bytes(got) == flip(old, a + 3)[:b - 5]
    f.write_bytes(flip(old, a + 3)[:b])  # ends where the span does (modules all gone):
    got = read_regular(str(f), into=buf, expect=expect, unchecked=(a, b))
    assert bytes(got) == old[:b]  # normal, so the span is vouched for, not read again


def test_tracked_reading_pauses_before_the_unchecked_span_ends(tmp_path):
    """Tracked, a reading of an unchanging span stops exactly PAUSE_BEFORE its end, says
    there what the kernel may have made (``paused``: that offset + SEQ_SLACK, still
    inside the span) and calls ``hold`` there once, before it reads on; exact bytes
    whether the text is the previous one or not, and no pause without a span."""
    from ksymsfs.freshness import SEQ_SLACK, STEP, ReadProgress
    from ksymsfs.readfile import PAUSE_BEFORE, ReadBuffer, read_regular
    old = os.urandom(4 * STEP + 999)
    f, buf = tmp_path / "k", ReadBuffer()
    a, b = 100, 3 * STEP + 7

    class Seen(ReadProgress):
        __slots__ = ("holds",)

    for new, unchecked in ((old, (a, b)), (old[:50] + b"x" + old[51:], (a, b)),
                           (old, (0, 0))):
        f.write_bytes(new)
        p = Seen()
        p.holds = []
        p.hold = lambda p=p: p.holds.append((p.state[1], p.made))
        got = read_regular(str(f), into=buf, progress=p, expect=bytes(old),
                           unchecked=unchecked)
        assert bytes(got) == new
        if unchecked == (0, 0) or new != old:
            assert p.holds == []
            continue
        at = b - PAUSE_BEFORE
        assert p.holds == [(at, at + SEQ_SLACK)] and at + SEQ_SLACK < b
        assert p.state[1] == len(new) and p.made is None  # read on past it


def test_plain_read_of_a_sized_file_is_one_read_and_exact(tmp_path, monkeypatch):
    """Without a reuse buffer, a regular file is read in one read() of its size (+1 to see
    growth), then one to see EOF: exact bytes, the cap kept, a file grown or shrunk since
    fstat read whole, short reads (kernfs: a page per read) read on; procfs (size 0)
    still in chunks."""
    import ksymsfs.readfile as rf
    data = os.urandom(3 * rf.CHUNK + 12345)
    big = tmp_path / "big"
    big.write_bytes(data)
    reads = []
    real_read, real_fstat = os.read, os.fstat
    monkeypatch.setattr(rf.os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    assert rf.read_regular(str(big)) == data and reads == [len(data) + 1, rf.CHUNK]
    assert rf.read_regular(str(big), len(data)) == data
    for cap in (len(data) - 1, len(data) // 2):
        with pytest.raises(SourceError, match="larger than"):
            rf.read_regular(str(big), cap)
    monkeypatch.setattr(rf.os, "read", lambda fd, n: real_read(fd, min(n, 4096)))
    assert rf.read_regular(str(big)) == data  # a page per read()
    with pytest.raises(SourceError, match="larger than"):
        rf.read_regular(str(big), len(data) - 1)
    monkeypatch.setattr(rf.os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    for told in (len(data) // 2, len(data) + 999):  # grown / shrunk since the fstat

        def fstat(fd, told=told):
            st = real_fstat(fd)
            return os.stat_result((st.st_mode, *st[1:6], told, *st[7:]))
        monkeypatch.setattr(rf.os, "fstat", fstat)
        assert rf.read_regular(str(big)) == data
    monkeypatch.setattr(rf.os, "fstat", real_fstat)
    reads.clear()
    assert b"\n" in rf.read_regular("/proc/self/maps") and len(reads) >= 2


def test_device_keeps_a_read_buffer_per_read_in_flight(tmp_path, monkeypatch):
    """Two reads at once use two buffers, the second sized like the first; both are
    kept for the next crowd and freed (their sizes remembered) when the device idles."""
    import ksymsfs.device as devmod
    (tmp_path / "k").write_text(KS)
    dev = Device(Sources(str(tmp_path / "k"), None))
    dev.prime()
    first = dev._readbufs[0]
    both = threading.Barrier(2, timeout=5)
    real = devmod.take_snapshot

    def slow(*a, **kw):
        both.wait()  # both reads hold a buffer at once
        return real(*a, **kw)
    monkeypatch.setattr(devmod, "take_snapshot", slow)
    ts = [threading.Thread(target=dev._read_sources) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(5)
    bufs = dev._readbufs
    assert len(bufs) == 2 and first in bufs and not dev._busy_bufs
    assert bufs[0].size_hint == bufs[1].size_hint >= len(KS)
    assert dev.forget_idle(0) is None
    assert all(len(b._buf) == 0 and b.size_hint >= len(KS) for b in bufs)


def test_snapshot_through_the_buffer_keeps_its_own_bytes(tmp_path):
    """A changed text is copied out of the reused buffer: the next open's read over it
    must not change the snapshot already served, nor fool the same-reading check."""
    from ksymsfs.readfile import ReadBuffer
    ks = tmp_path / "kallsyms"
    buf = ReadBuffer()
    ks.write_text("ffffffff81000000 T aaaa\n")
    one = take_snapshot(Sources(str(ks), None), keep_raw=True, buffer=buf)
    ks.write_text("ffffffff81000000 T bbbb\n")
    two = take_snapshot(Sources(str(ks), None), previous=one, keep_raw=True, buffer=buf)
    assert two is not one
    assert one.raw == b"ffffffff81000000 T aaaa\n" and isinstance(one.raw, bytes)
    assert two.raw == b"ffffffff81000000 T bbbb\n"
    assert one.table.name(0) == "aaaa" and two.table.name(0) == "bbbb"
    assert take_snapshot(Sources(str(ks), None), previous=two, keep_raw=True,
                         buffer=buf) is two
    ks.write_text("ffffffff81000000 T bbbb\nffffffff81000010 T c\n")  # a longer text
    assert take_snapshot(Sources(str(ks), None), previous=two, keep_raw=True,
                         buffer=buf) is not two


def test_image_digest_tells_apart_every_change_of_the_served_bytes():
    """The page cache outlives an idle spell only for an image whose digest equals the
    cached one's: a run moved, a byte changed, the size or a longer run must all differ."""
    from ksymsfs.digest import image_digest
    from ksymsfs.vimage import VirtualImage
    one = VirtualImage([(0, b"ab"), (10, b"c")], 20)
    assert image_digest(one) == image_digest(VirtualImage([(10, b"c"), (0, b"ab")], 20))
    others = [VirtualImage([(0, b"ab"), (11, b"c")], 20),
              VirtualImage([(0, b"ab"), (10, b"c")], 21),
              VirtualImage([(0, b"abc")], 20), VirtualImage([(0, b"ab"), (10, b"d")], 20)]
    digests = {image_digest(o) for o in others}
    assert len(digests) == len(others) and image_digest(one) not in digests
    assert image_digest(b"ab") == image_digest(VirtualImage.of(b"ab"))


def test_image_keeps_its_runs_uncopied_read_only_and_exact():
    """build_virtual stores the symbol table, info words and the kallsyms string table as
    they are (the strings shared with the parsed table, not copied: a 3M-symbol build
    copied 150 MB here), each behind a read-only view that also pins the buffer's size;
    every way of reading the image gives the same bytes as the one-buffer build."""
    import ctypes

    from ksymsfs.builder import build_virtual
    from ksymsfs.vimage import VirtualImage
    t = parse_kallsyms(KS.encode())
    target = make_target(address_bits=t.address_bits)
    v = build_virtual(t, target, ["a", "b"])
    strings = np.frombuffer(t.strtab, np.uint8)
    shared = [b for _, b in v.parts if np.shares_memory(np.frombuffer(b, np.uint8), strings)]
    assert len(shared) == 1 and bytes(shared[0]) == bytes(t.strtab)
    assert all(isinstance(b, bytes) or b.readonly for _, b in v.parts)
    if isinstance(t.strtab, bytearray):
        with pytest.raises(BufferError):
            t.strtab += b"x"  # pinned while the image lives
    whole = bytes(build_image(t, target, ["a", "b"]))
    assert bytes(v) == whole and v == whole and len(v) == len(whole)
    out = ctypes.create_string_buffer(len(whole))
    for off in range(0, len(whole), 97):
        n = v.copy_into(ctypes.addressof(out) + off, off, 97)
        assert out.raw[off:off + n] == whole[off:off + 97]
    mixed = VirtualImage([(4, bytearray(b"xy")), (0, np.array([7], np.uint8)),
                          (8, memoryview(b"z"))], 10)
    assert bytes(mixed) == b"\7\0\0\0xy\0\0z\0" and mixed[3:9] == b"\0xy\0\0z"
    assert b"xy\0\0z" in mixed and b"yx" not in mixed
    with pytest.raises(ValueError, match="overlapping"):
        VirtualImage([(0, bytearray(b"abc")), (2, b"d")], 10)


def test_value_files_keep_procfs_and_sysfs_open_and_read_them_afresh(tmp_path):
    """A sysctl and the uevent seqnum stay open (one pread per read) and still give the
    live value after a change; a file elsewhere is opened anew each time (replaced, it
    gives the new file's bytes); a FIFO is never read; close() lets them go."""
    values = ValueFiles()
    knob, seqnum = "/proc/sys/kernel/kptr_restrict", "/sys/kernel/uevent_seqnum"
    old = values.read(knob)
    assert old is not None and knob in values._kept
    try:
        with open(knob, "w") as f:
            f.write("2" if old.strip() != b"2" else "1")
        assert values.read(knob) != old
    finally:
        with open(knob, "w") as f:
            f.write(old.decode())
    assert values.read(knob) == old
    n = int(values.read(seqnum))
    assert seqnum in values._kept
    with open("/sys/devices/virtual/mem/null/uevent", "w") as f:
        f.write("change")  # a uevent for /dev/null: the counter moves
    assert int(values.read(seqnum)) > n
    local = tmp_path / "knob"
    local.write_text("0\n")
    assert values.read(str(local)) == b"0\n" and str(local) not in values._kept
    (tmp_path / "new").write_text("1\n")
    os.replace(tmp_path / "new", local)
    assert values.read(str(local)) == b"1\n"
    os.mkfifo(tmp_path / "fifo")
    assert values.read(str(tmp_path / "fifo")) is None
    assert values.read(str(tmp_path / "missing")) is None
    fds = list(values._kept.values())
    values.close()
    assert values._kept == {}
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
