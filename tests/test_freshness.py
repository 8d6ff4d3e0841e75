"""A reading in flight shared with a later opener only when it is as fresh as a new one:
the rule (freshness.py), the Coalescer's bookkeeping, the reader's progress, and the
device on a real read path and on the live /proc/kallsyms."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

import ksymsfs.device as devmod
from ksymsfs import sources as srcmod
from ksymsfs.device import Coalescer, Device
from ksymsfs.freshness import (
    AHEAD,
    SEQ_SLACK,
    SHOWN_WITHIN,
    STEP,
    KernelFirstJoin,
    ReadProgress,
    kernel_end,
    shows_per_open,
    unchanging_span,
)
from ksymsfs.readfile import ReadBuffer, read_regular
from ksymsfs.sources import Sources, take_snapshot

DATA = Path(__file__).parent / "data"


def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


class Snap:
    """What the rule reads of a snapshot."""

    def __init__(self, end: int, all_zero: bool = False, tag: object = None) -> None:
        self.kernel_end, self.all_zero, self.tag = end, all_zero, tag


# -- what a reading need not compare -------------------------------------------------------
def test_unchanging_span_starts_after_the_first_address_shown():
    """From the end of the first line with an address other than 0 to the kernel part's
    end; none for a reading that hid addresses, none when the kernel part ends before
    such a line, none when that line is further in than SHOWN_WITHIN."""
    hidden = b"0000000000000000 A a\n0000000000000000 T b\n0000000000000000 t c\t[m]\n"
    shown = (b"0000000000000000 A a\n0000000000001000 A b\nffffffff81000000 T c\n"
             b"ffffffffc0000000 t d\t[m]\n")
    assert unchanging_span(hidden) == (0, 0)
    assert unchanging_span(shown) == (42, 63) and shown[42:63] == b"ffffffff81000000 T c\n"
    assert unchanging_span(shown[:63]) == (42, 63)  # no modules: the kernel part is all
    assert unchanging_span(b"0000000000000000 A a\nffffffffc0000000 t d\t[m]\n") == (0, 0)
    assert unchanging_span(b"00000000 A a\n0000000c A b\nc1000000 T c\n") == (26, 39)
    late = b"0000000000000000 A z\n" * (SHOWN_WITHIN // 21 + 1) + shown[21:]
    assert unchanging_span(late) == (0, 0)


def test_kernel_first_only_where_kallsyms_decides_per_open():
    """Both rules rest on kallsyms deciding once per open whether addresses print (Linux
    4.15+): an older kernel's live source is not kernel-first; this machine's is."""
    older = ("4.14.336", "3.10.0-1160.el7.x86_64", "", "x")
    for release in ("4.15.0-20-generic", "6.18.0-1-amd64", "10.0", *older):
        assert shows_per_open(release) is (release not in older), release
    assert Sources.live().kernel_first is shows_per_open(os.uname().release) is True


def _kernel_first(tmp_path, text: str, first: bool = True) -> Sources:
    (tmp_path / "k").write_text(text)
    return Sources(str(tmp_path / "k"), None, kernel_first=first)


def test_snapshot_compares_only_what_may_change_in_a_kernel_first_source(tmp_path):
    """A kernel-first source (/proc/kallsyms): once a reading equals the previous one up
    to its first shown address, the kernel's own symbols are not compared: a file whose
    kernel part changed (no kernel's can) gives the previous snapshot back, which shows
    they were skipped. Everything else is compared: a change before that line, in a
    module's line, a reading that hides addresses, and any source not kernel-first."""
    kern = _kallsyms(20_000, "before")
    src = _kernel_first(tmp_path, kern)
    buf = ReadBuffer()
    prev = take_snapshot(src, keep_raw=True, buffer=buf)
    assert prev.unchanging == (len(kern.split("\n")[0]) + 1, kernel_end(prev.raw))
    renamed = kern.replace(" k0012345\n", " x0012345\n")
    (tmp_path / "k").write_text(renamed)
    assert take_snapshot(src, previous=prev, keep_raw=True, buffer=buf) is prev
    others = [kern.replace("T k0000000\n", "t k0000000\n"),          # before the line
              kern.replace(" before\t[m]", " after\t[m]"),          # a module's line
              kern.replace("ffffffff81", "0000000000").replace("ffffffffc0", "0000000000"),
              kern + "ffffffffc0001000 t more\t[m]\n"]                 # one more line
    for text in others:
        assert text != kern
        (tmp_path / "k").write_text(text)
        got = take_snapshot(src, previous=prev, keep_raw=True, buffer=buf)
        assert got is not prev and got.raw == text.encode()
    (tmp_path / "k").write_text(renamed)
    plain = _kernel_first(tmp_path, renamed, first=False)
    got = take_snapshot(plain, previous=prev, keep_raw=True, buffer=buf)
    assert got is not prev and got.raw == renamed.encode()
    assert take_snapshot(src, previous=got, keep_raw=True, buffer=buf) is got


# -- the rule ----------------------------------------------------------------------------
@pytest.mark.parametrize("dump", sorted(p.name for p in DATA.iterdir()
                                        if (p / "kallsyms").is_file()))
def test_kernel_end_is_the_first_line_not_the_kernels_own(dump):
    raw = (DATA / dump / "kallsyms").read_bytes()
    end = kernel_end(raw)
    lines = raw[:end].split(b"\n")
    assert all(b"\t" not in ln for ln in lines)
    if end < len(raw):
        assert raw[end:raw.index(b"\n", end)].split(b"\t")[1].startswith(b"[")
        assert end == 0 or raw[end - 1:end] == b"\n"


def test_kernel_end_without_modules_is_the_end():
    raw = b"ffffffff81000000 T _stext\nffffffff81000010 t helper\n"
    assert kernel_end(raw) == len(raw)
    assert kernel_end(raw + b"ffffffffc0000000 t f\t[m]\n") == len(raw)
    assert kernel_end(b"ffffffffc0000000 t f\t[m]\n") == 0


def test_rule_serves_only_readings_that_had_not_passed_the_kernel():
    rule, p = KernelFirstJoin(), ReadProgress()
    p.start_try(1)
    p.advance(1000)
    mark = rule.mark(p)
    assert mark == (1, 1000 + AHEAD)
    p.done(1)
    assert rule.serves(mark, p, Snap(1000 + AHEAD))          # the kernel's own, all after
    assert not rule.serves(mark, p, Snap(1000 + AHEAD - 1))  # the kernel may have been ahead
    assert not rule.serves(mark, p, Snap(10 ** 9, all_zero=True))  # hidden at its open
    p.done(2)  # the try that gave it began after the arrival: a fresh reading
    assert rule.serves(mark, p, Snap(0)) and rule.serves(mark, p, Snap(0, all_zero=True))
    assert rule.hint is None and rule.may_serve((1, 10 ** 9 + 1))  # nothing known: wait
    rule.learn(Snap(10 ** 9))
    assert rule.may_serve((1, 10 ** 9)) and not rule.may_serve((1, 10 ** 9 + 1))



def test_a_paused_reading_marks_what_the_kernel_made_not_ahead_of_it():
    """Paused at an offset (read up to it page by page), the kernel has made records up to
    at most seq_file's page past it: an arrival's mark is that bound, not received +
    AHEAD, until the reader reads on (then the usual AHEAD again); a new try forgets it."""
    rule, p = KernelFirstJoin(), ReadProgress()
    p.start_try(1)
    p.advance(4096)
    p.paused(10 << 20)
    assert rule.mark(p) == (1, (10 << 20) + SEQ_SLACK)
    p.done(1)
    assert rule.serves(rule.mark(p), p, Snap((10 << 20) + SEQ_SLACK))
    assert not rule.serves(rule.mark(p), p, Snap((10 << 20) + SEQ_SLACK - 1))
    p.advance(10 << 20)
    assert rule.mark(p) == (1, (10 << 20) + AHEAD)
    p.paused(5)
    p.start_try(2)
    assert rule.mark(p) == (2, AHEAD)


# -- the reader's progress -----------------------------------------------------------------
class Log(ReadProgress):
    __slots__ = ("seen",)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        self.seen.append(self.state)


@pytest.mark.parametrize("into", [ReadBuffer, lambda: None])
def test_reader_tells_its_progress_every_step(tmp_path, into):
    data = os.urandom(5 * STEP + 123)
    (tmp_path / "f").write_bytes(data)
    p = Log()
    p.start_try(3)
    got = read_regular(str(tmp_path / "f"), into=into(), progress=p)
    assert bytes(got) == data
    sizes = [n for _, n in p.seen]
    assert sizes[-1] == len(data) and all(t == 3 for t, _ in p.seen)
    assert all(0 < b - a <= STEP for a, b in zip([0, *sizes], sizes) if b != a)


def test_snapshot_progress_names_the_try_that_gave_it(tmp_path, monkeypatch):
    (tmp_path / "k").write_text("ffffffff81000000 T _stext\nffffffffc0000000 t f\t[m]\n")
    mods = iter([b"m 1 0 - Live 0xffffffffc0000000\n", b"",  # moved: unclean
                 b"m 1 0 - Live 0xffffffffc0000000\n", b"m 1 0 - Live 0xffffffffc0000000\n"])
    monkeypatch.setattr(srcmod, "_read_modules", lambda src: next(mods))
    p = Log()
    snap = take_snapshot(Sources(str(tmp_path / "k"), str(tmp_path / "m")), progress=p,
                         keep_raw=True, buffer=ReadBuffer())
    assert snap.tries == 2 and p.final == 2 and p.state[0] == 2
    assert snap.kernel_end == len("ffffffff81000000 T _stext\n")
    monkeypatch.undo()
    again = Log()
    assert take_snapshot(Sources(str(tmp_path / "k"), None), previous=None,
                         progress=again).tries == again.final == 1


# -- the Coalescer -------------------------------------------------------------------------
class GatedRead:
    """A read whose progress the test moves: ``to(n)`` lets it report n bytes, then it
    waits; ``finish(snap)`` ends it."""

    def __init__(self) -> None:
        self.calls: list[ReadProgress] = []
        self.step = threading.Semaphore(0)
        self.plan: list = []

    def __call__(self, progress: ReadProgress):
        self.calls.append(progress)
        progress.start_try(1)
        while True:
            self.step.acquire()
            what = self.plan.pop(0)
            if isinstance(what, int):
                progress.advance(what)
                continue
            progress.done(1)
            return what

    def then(self, what) -> None:
        self.plan.append(what)
        self.step.release()


def _get_in_thread(c: Coalescer, out: list) -> threading.Thread:
    t = threading.Thread(target=lambda: out.append(c.get()))
    t.start()
    return t


def test_coalescer_shares_a_reading_still_in_the_kernels_own_symbols():
    read = GatedRead()
    c = Coalescer(read, parallel=2, join=KernelFirstJoin())
    first, late = [], []
    t1 = _get_in_thread(c, first)
    _until(lambda: len(read.calls) == 1)
    read.then(STEP)  # 256 KiB read of a text whose kernel part is 10 MB
    _until(lambda: read.calls[0].state == (1, STEP))
    ts = [_get_in_thread(c, late) for _ in range(5)]
    _until(lambda: len(c._cond._waiters) == 5)
    served = Snap(10 << 20, tag="one")
    read.then(served)
    for t in [t1, *ts]:
        t.join(5)
    assert first == [served] and late == [served] * 5 and len(read.calls) == 1


@pytest.mark.parametrize("why", ["passed the kernel's own", "addresses hidden"])
def test_coalescer_reads_again_for_an_opener_a_reading_does_not_serve(why):
    read = GatedRead()
    c = Coalescer(read, parallel=1, join=KernelFirstJoin())
    first, late = [], []
    t1 = _get_in_thread(c, first)
    _until(lambda: len(read.calls) == 1)
    read.then(1 << 20)
    _until(lambda: read.calls[0].state == (1, 1 << 20))
    t2 = _get_in_thread(c, late)
    _until(lambda: len(c._cond._waiters) == 1)
    old = Snap(1 << 20, tag="old") if why.startswith("passed") else \
        Snap(10 << 20, all_zero=True, tag="old")
    read.then(old)
    _until(lambda: len(read.calls) == 2)  # the late opener's own read, begun after it came
    new = Snap(10 << 20, tag="new")
    read.then(new)
    for t in (t1, t2):
        t.join(5)
    assert first == [old] and late == [new]
    assert not c._marked and not c._ended  # nothing kept for callers who are gone


def test_coalescer_holds_a_paused_reading_while_a_crowd_keeps_coming(monkeypatch):
    """A reading's ``hold`` (called where it pauses near the end of the kernel's own symbols)
    returns at once for a lone caller; while callers keep arriving it waits until none
    came for ``gather`` s (never more than HOLD), and those callers share the reading."""
    monkeypatch.setattr(devmod, "HOLD", 2.0)
    read = GatedRead()
    c = Coalescer(read, parallel=2, gather=0.05, join=KernelFirstJoin())
    first, late = [], []
    t1 = _get_in_thread(c, first)
    _until(lambda: len(read.calls) == 1)
    p = read.calls[0]
    t = time.monotonic()
    p.hold()  # nobody else came: no wait
    assert time.monotonic() - t < 0.04
    p.paused(1 << 20)
    held = threading.Event()
    waiter = threading.Thread(target=lambda: (p.hold(), held.set()))
    ts = [_get_in_thread(c, late)]
    _until(lambda: len(c._cond._waiters) == 1)  # it came after the reading began
    waiter.start()
    for _ in range(3):  # callers keep coming every 20 ms: it keeps holding
        time.sleep(0.02)
        assert not held.is_set()
        ts.append(_get_in_thread(c, late))
    t = time.monotonic()
    assert held.wait(5)  # ~gather after the last caller
    assert time.monotonic() - t < 1.0
    _until(lambda: len(c._cond._waiters) == 4)
    served = Snap(10 << 20, tag="one")
    read.then(served)
    for th in [t1, *ts, waiter]:
        th.join(5)
    assert first == [served] and late == [served] * 4 and len(read.calls) == 1


def test_coalescer_knows_the_kernel_part_from_the_first_reading():
    """The mount's first reading (no opener joined it) tells where the kernel's own
    symbols end: an opener who comes when a later reading is past that point starts a
    read of its own at once instead of waiting for that reading to end."""
    read = GatedRead()
    c = Coalescer(read, parallel=2, join=KernelFirstJoin())
    first, second, late = [], [], []
    t1 = _get_in_thread(c, first)  # the mount's first reading: nobody else waits on it
    _until(lambda: len(read.calls) == 1)
    read.then(Snap(1 << 20, tag="first"))
    t1.join(5)
    t2 = _get_in_thread(c, second)
    _until(lambda: len(read.calls) == 2)
    read.then(2 << 20)  # past the kernel's own symbols
    _until(lambda: read.calls[1].state == (1, 2 << 20))
    t3 = _get_in_thread(c, late)
    _until(lambda: len(read.calls) == 3)  # its own read, while the second one still runs
    assert read.calls[1].final == 0 and t2.is_alive()
    read.then(Snap(1 << 20, tag="second"))
    read.then(Snap(1 << 20, tag="third"))
    for t in (t2, t3):
        t.join(5)
    assert first[0].tag == "first" and {second[0].tag, late[0].tag} == {"second", "third"}
    assert not c._marked and not c._ended and not c._flight


def test_coalescer_with_join_never_serves_a_reading_that_does_not_qualify():
    """Random arrivals, read lengths and kernel parts: every caller's result began after
    it arrived, or had not passed the kernel's own symbols (with the margin) when it did;
    never more than ``parallel`` reads at once; nothing left marked at the end."""
    rnd = random.Random(11)
    lock = threading.Lock()
    log: dict[int, list] = {}  # read number -> [(time, bytes)] as it went
    running, peak = [0], [0]

    def read(progress: ReadProgress):
        with lock:
            n = len(log) + 1
            log[n] = []
            began = time.monotonic()
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        progress.start_try(1)
        total, end = rnd.randrange(1, 40) * STEP, rnd.randrange(0, 40) * STEP
        for got in range(0, total + 1, STEP):
            with lock:  # received `got`; the next STEP is read while it sleeps
                progress.advance(got)
                log[n].append((time.monotonic(), got))
            time.sleep(rnd.uniform(0, 0.002))
        with lock:
            running[0] -= 1
        progress.done(1)
        return Snap(min(end, total), tag=(n, began))

    c = Coalescer(read, parallel=2, gather=0.002, join=KernelFirstJoin())
    bad, shared = [], [0]

    def caller(delay: float) -> None:
        time.sleep(delay)
        came = time.monotonic()
        snap = c.get()
        n, began = snap.tag
        if began >= came:
            return
        with lock:  # what that read had received by our arrival
            got = max([b for t, b in log[n] if t <= came], default=-1)
        shared[0] += 1
        if got >= 0 and got + STEP > snap.kernel_end:  # it may have read past it before
            bad.append((n, got, snap.kernel_end))
    ts = [threading.Thread(target=caller, args=(rnd.uniform(0, 0.3),)) for _ in range(80)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert not bad and peak[0] <= 2
    assert shared[0] > 0  # the rule did let some share a reading in flight
    assert not c._marked and not c._ended and not c._flight


# -- the device ----------------------------------------------------------------------------
class Gate(ReadProgress):
    """Progress that stops the reading after its first step until released."""

    __slots__ = ("stopped", "go")

    def __init__(self) -> None:
        super().__init__()
        self.stopped, self.go = threading.Event(), threading.Event()

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        if not self.go.is_set():
            self.stopped.set()
            assert self.go.wait(10)


def _kallsyms(kernel_lines: int, module_symbol: str) -> str:
    kern = "".join(f"{0xffffffff81000000 + 16 * i:016x} T k{i:07d}\n"
                   for i in range(kernel_lines))
    return kern + f"ffffffffc0000000 t {module_symbol}\t[m]\n"


@pytest.mark.parametrize("kernel_lines, shared", [(60_000, True), (2_000, False)])
def test_device_opener_shares_a_reading_only_before_it_passed_the_kernel(
        tmp_path, kernel_lines, shared):
    """A real read of a file (marked kernel-first as /proc/kallsyms is) held after its
    first 256 KiB: a second opener then arrives. With 1.4 MB of kernel symbols the
    reading had not reached the module line, so it serves them both, and what it reads
    after the arrival is there (the module line written meanwhile); with 60 KB it had,
    and the second opener gets a reading of its own."""
    k = tmp_path / "kallsyms"
    k.write_text(_kallsyms(kernel_lines, "before"))
    dev = Device(Sources(str(k), None, kernel_first=True))
    join = dev._coalescer._join
    gates: list[Gate] = []
    join.progress = lambda: gates.append(Gate()) or gates[-1]
    got: dict[str, bytes] = {}

    def opener(who: str, tgid: int) -> None:
        got[who] = dev.image_of(dev._open(devmod.ProcessCreds(tgid, 0, True), tgid))

    a = threading.Thread(target=opener, args=("a", 101))
    a.start()
    _until(lambda: gates and gates[0].stopped.is_set())
    b = threading.Thread(target=opener, args=("b", 102))
    b.start()
    _until(lambda: len(dev._coalescer._cond._waiters) == 1)
    with open(k, "r+b") as f:  # the module's line changes after b arrived
        f.seek(-len("before\t[m]\n"), os.SEEK_END)
        f.write(b"after!\t[m]\n")
    gates[0].go.set()
    if not shared:  # b's own reading, begun after a's ended
        _until(lambda: len(gates) == 2)
        gates[1].go.set()
    a.join(10)
    b.join(10)
    assert len(gates) == (1 if shared else 2)
    assert b"after!" in bytes(got["b"])  # either way: the module as after b arrived
    assert (got["a"] is got["b"]) == shared


def test_live_crowd_shares_the_reading_in_flight(monkeypatch):
    """The live kernel: an opener who arrives while the reading of /proc/kallsyms is
    still in the kernel's own symbols takes that reading (one kallsyms read for two
    opens); the wiring from Sources.live to the reader's progress is real."""
    dev = Device(Sources.live())
    first = dev.prime()
    reads = []
    real = devmod.take_snapshot
    monkeypatch.setattr(devmod, "take_snapshot",
                        lambda *a, **kw: reads.append(kw["progress"]) or real(*a, **kw))
    for _ in range(20):
        reads.clear()
        out: list = []
        a = threading.Thread(target=lambda o=out: o.append(dev._coalescer.get()))
        a.start()
        _until(lambda: reads)
        deadline = time.monotonic() + 5
        while reads[0].state[1] == 0 and time.monotonic() < deadline:
            time.sleep(0.0005)  # until its kallsyms read has begun
        tried, received = reads[0].state
        if received + AHEAD < first.kernel_end // 2:
            out.append(dev._coalescer.get())
        a.join(10)
        if len(out) == 2 and len(reads) == 1:
            assert out[0] is out[1]
            return
    pytest.fail("no second opener arrived early in a reading in 20 tries")


def test_live_reading_reads_the_kernels_own_symbols_page_by_page(monkeypatch):
    """The live kernel: a reading after one that showed addresses receives every byte of
    /proc/kallsyms and never seeks it (seq_file's lseek would make the kernel's own
    symbols in one stretch with no preemption point, README "Performance"); tracked, it
    pauses once, PAUSE_BEFORE the end of the kernel's own symbols; an unchanged kernel
    gives the previous snapshot back."""
    from ksymsfs.readfile import PAUSE_BEFORE

    def rchar() -> int:
        with open("/proc/self/io", "rb") as f:
            return int(dict(ln.split(b": ") for ln in f.read().splitlines())[b"rchar"])
    seeks = []
    real_lseek = os.lseek
    monkeypatch.setattr(os, "lseek", lambda fd, *a: seeks.append(a) or real_lseek(fd, *a))
    src, buf = Sources.live(), ReadBuffer()
    got = []
    for _ in range(3):  # (a module or eBPF program may come meanwhile: then once more)
        before = rchar()
        prev = got[-1] if got else None
        p = Log()
        holds = []
        p.hold = lambda p=p, holds=holds: holds.append((p.state[1], p.made))
        got.append(take_snapshot(src, previous=prev, keep_raw=True, buffer=buf,
                                 progress=p))
        got_bytes = rchar() - before
        snap = got[-1]
        a, b = snap.unchanging
        assert b > a > 0 and snap.kernel_end == b
        assert got_bytes >= len(snap.raw) and not seeks
        if prev is not None and snap is prev:
            at = b - PAUSE_BEFORE
            assert holds == [(at, at + SEQ_SLACK)]
            return
    pytest.fail("the kernel changed at every reading")


def test_live_readings_across_a_kptr_restrict_change_are_compared():
    """The live kernel: the kernel's own symbols are skipped only between readings that
    both show addresses. kptr_restrict=2 (addresses hidden even from root) gives a new,
    all-zero snapshot; restoring it gives the shown one back as a new snapshot; two
    readings in a row of an unchanged kernel give the same one (the skip in use)."""
    knob = Path("/proc/sys/kernel/kptr_restrict")
    src, buf = Sources.live(), ReadBuffer()
    old = knob.read_text().strip()
    shown = take_snapshot(src, keep_raw=True, buffer=buf)
    assert not shown.all_zero and shown.unchanging[1] > shown.unchanging[0] > 0
    for _ in range(3):  # (a module or eBPF program may come meanwhile: then once more)
        nxt = take_snapshot(src, previous=shown, keep_raw=True, buffer=buf)
        if nxt is shown:
            break
        shown = nxt
    assert nxt is shown
    try:
        knob.write_text("2")
        hidden = take_snapshot(src, previous=shown, keep_raw=True, buffer=buf)
    finally:
        knob.write_text(old)
    assert hidden is not shown and hidden.all_zero and hidden.unchanging == (0, 0)
    again = take_snapshot(src, previous=hidden, keep_raw=True, buffer=buf)
    assert again is not hidden and not again.all_zero
    assert again.raw[:again.kernel_end] == shown.raw[:shown.kernel_end]
