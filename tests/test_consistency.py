"""take_snapshot against a fake kernel whose kallsyms shifts by position like the seq_file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ksymsfs import SnapshotError, consistency, sources
from ksymsfs.kallsyms import parse_kallsyms
from ksymsfs.sources import Sources, take_snapshot
from tests.helpers import DATA, DUMPS, LENIENT_DUMPS

KERNEL_LINES = 200
INIT_LINES = 3   # symbols of a module's init sections, printed until its init is done


class FakeKernel:
    """/proc/kallsyms printed line by line from the current state, by position.

    Modules are a list, newest first; line ``pos`` past the kernel's lines is found by
    walking it (kernel/module/kallsyms.c), then the ``[bpf]`` list. ``hook`` runs once
    when the printer reaches a position: the module list changes under the reader, as
    when a module comes or goes during the read. Changes follow the kernel's order of
    events (kernel/module/main.c): an unload sends KOBJ_REMOVE then leaves the list; a
    load is visible (COMING, "Loading") before KOBJ_ADD; a load failing after COMING
    (bad parameter) leaves again with no uevent at all.
    """

    def __init__(self, d: Path, modules: list[tuple[str, int, int]], bpf: int = 0):
        self.d = d
        self.mods = [(n, a, k, "Live") for n, a, k in modules]
        self.bpf = [(100 + i, f"p{i}") for i in range(bpf)]  # (id, name)
        self.seq = 0
        self.hooks: list = []   # [(position, fn)]: run once each, on the next reads
        self._write_state()

    def sources(self, **kw) -> Sources:
        return Sources(str(self.d / "kallsyms"), str(self.d / "modules"),
                       modules_optional=False, seqnum=str(self.d / "seqnum"), **kw)

    def _write_state(self) -> None:
        (self.d / "m.tmp").write_text("".join(f"{n} 16384 0 - {s} 0x{a:016x}\n"
                                              for n, a, _, s in self.mods))
        os.replace(self.d / "m.tmp", self.d / "modules")
        (self.d / "seqnum").write_text(f"{self.seq}\n")

    def state_lines(self) -> list[str]:
        out, pos = [], 0
        while (line := self.line(pos)) is not None:
            out.append(line)
            pos += 1
        return out

    def line(self, pos: int) -> str | None:
        if pos < KERNEL_LINES:
            return f"{0xffffffff81000000 + 16 * pos:016x} T k{pos}"
        pos -= KERNEL_LINES
        for n, a, k, _ in self.mods:
            if pos < k:
                return f"{a + 32 * pos:016x} t {n}_f{pos}\t[{n}]"
            pos -= k
        if pos < len(self.bpf):
            i, n = self.bpf[pos]
            return f"{0xffffffffa0000000 + 0x1000 * i:016x} t bpf_prog_0123_{n}\t[bpf]"
        return None

    def print(self) -> bytes:
        """One read of /proc/kallsyms: the hooks due run as the printer reaches them."""
        out, pos = [], 0
        while True:
            hook = next((h for h in self.hooks if h[0] == pos), None)
            if hook:            # one hook per position and read
                self.hooks.remove(hook)
                hook[1]()
            line = self.line(pos)
            if line is None:
                return "".join(out).encode()
            out.append(line + "\n")
            pos += 1

    # -- what the kernel does --------------------------------------------------------
    def unload(self, name: str) -> tuple:
        self.seq += 1      # KOBJ_REMOVE, sent before the module leaves the list
        self._write_state()
        m = next(m for m in self.mods if m[0] == name)
        self.mods.remove(m)
        self._write_state()
        return m

    def coming(self, name: str, addr: int, k: int) -> None:
        """Visible (COMING, "Loading") with its init symbols, before any uevent."""
        self.mods.insert(0, (name, addr, k + INIT_LINES, "Loading"))
        self._write_state()

    def added(self) -> None:
        self.seq += 1      # KOBJ_ADD (mod_sysfs_setup), still COMING
        self._write_state()

    def live(self, name: str) -> None:
        """do_init_module done: init symbols dropped, "Live"; no uevent."""
        i = next(i for i, m in enumerate(self.mods) if m[0] == name)
        n, a, k, _ = self.mods[i]
        self.mods[i] = (n, a, k - INIT_LINES, "Live")
        self._write_state()

    def failed(self, name: str) -> None:
        """A load failing after COMING (bad parameter) leaves with no uevent at all."""
        self.mods = [m for m in self.mods if m[0] != name]
        self._write_state()

    def reload(self, name: str) -> None:
        """Unload and load again at the same address (the ABA case), up to KOBJ_ADD."""
        n, a, k, _ = self.unload(name)
        self.coming(n, a, k)
        self.added()

    def bpf_close(self, i: int) -> None:
        self.bpf.pop(i)


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """The fake kernel, its kallsyms served to take_snapshot's file reads."""
    mods = [("newest", 0xffffffffc0300000, 40), ("middle", 0xffffffffc0200000, 30),
            ("oldest", 0xffffffffc0100000, 50)]
    k = FakeKernel(tmp_path, mods, bpf=4)
    real = sources._read
    ks = str(tmp_path / "kallsyms")
    monkeypatch.setattr(sources, "_read", lambda path, *a, **kw:
                        k.print() if path == ks else real(path, *a, **kw))
    return k


def aba(k: FakeKernel) -> None:
    """During the next read: the newest module unloaded and loaded again at the same
    address (in the list's first place again), its init done a little later."""
    k.hooks.append((KERNEL_LINES + 50, lambda: k.reload("newest")))
    k.hooks.append((KERNEL_LINES + 100, lambda: k.live("newest")))


def lines_of(snap) -> list[str]:
    t = snap.table
    out = []
    for i in range(len(t)):
        m = t.modules[int(t.module[i])]
        line = f"{int(t.addr[i]):016x} {chr(t.letter[i])} {t.name(i)}"
        out.append(f"{line}\t[{m}]" if m else line)
    return out


def raw_read(k: FakeKernel) -> tuple[bytes, bytes, bytes]:
    """The old reading: modules, kallsyms, modules (no signals)."""
    m1 = (k.d / "modules").read_bytes()
    data = k.print()
    return m1, data, (k.d / "modules").read_bytes()


def test_quiet_kernel_first_try(kernel):
    snap = take_snapshot(kernel.sources())
    assert snap.tries == 1
    assert lines_of(snap) == kernel.state_lines()


def test_fake_reproduces_the_mixed_image_the_old_rule_accepted(kernel):
    """Unload+reload at the same address mid-read: both module lists are identical, yet
    the text is mixed (this is what the old modules/kallsyms/modules rule served)."""
    clean = kernel.state_lines()
    aba(kernel)
    m1, data, m2 = raw_read(kernel)
    assert m1 == m2
    assert data.decode().splitlines() != clean
    assert consistency.shape_problem(parse_kallsyms(data))


def test_unload_reload_same_address_is_retried(kernel):
    clean = kernel.state_lines()
    aba(kernel)
    snap = take_snapshot(kernel.sources())
    assert snap.tries == 2
    assert lines_of(snap) == clean  # same state again after the reload


def test_seqnum_alone_catches_the_aba(kernel, monkeypatch):
    monkeypatch.setattr(consistency, "shape_problem", lambda table: "")
    aba(kernel)
    snap = take_snapshot(kernel.sources())
    assert snap.tries == 2 and lines_of(snap) == kernel.state_lines()


def test_failed_load_without_uevent_is_caught_by_shape(kernel):
    """A load failing after COMING sends no uevent and leaves both module lists equal:
    only the text's shape shows the shift (lines of ``middle`` printed twice)."""
    seq0 = kernel.seq
    kernel.hooks.append((KERNEL_LINES + 60, lambda: kernel.coming(
        "bad", 0xffffffffc0400000, 20)))
    kernel.hooks.append((KERNEL_LINES + 100, lambda: kernel.failed("bad")))
    snap = take_snapshot(kernel.sources())
    assert kernel.seq == seq0
    assert snap.tries == 2 and lines_of(snap) == kernel.state_lines()


def test_module_seen_then_gone_is_caught_by_the_list(kernel):
    """Loaded before the module region is reached, gone once it was read: the text has a
    module neither /proc/modules read lists."""
    kernel.hooks.append((10, lambda: kernel.coming("bad", 0xffffffffc0400000, 20)))
    kernel.hooks.append((KERNEL_LINES + 40, lambda: kernel.failed("bad")))
    snap = take_snapshot(kernel.sources())
    assert snap.tries == 2 and lines_of(snap) == kernel.state_lines()


def test_bpf_program_removed_mid_read_is_caught_by_ids(kernel, monkeypatch):
    monkeypatch.setattr(consistency, "bpf_prog_ids",
                        lambda: tuple(i for i, _ in kernel.bpf))
    end = KERNEL_LINES + 120
    kernel.hooks.append((end + 2, lambda: kernel.bpf_close(0)))  # p0 was read: p2 skipped
    m1, data, m2 = raw_read(kernel)
    assert m1 == m2 and "bpf_prog_0123_p2" not in data.decode()
    kernel.hooks.append((end + 2, lambda: kernel.bpf_close(0)))
    snap = take_snapshot(kernel.sources(bpf_ids=True))
    assert snap.tries == 2 and lines_of(snap) == kernel.state_lines()


def test_bpf_id_freed_before_its_line_is_caught_by_addresses(kernel, monkeypatch):
    """__bpf_prog_put frees the id, then deletes the kallsyms entry: closed just before
    the ids are listed, p0 is printed and then leaves mid-read (p2 skipped), and both id
    lists are equal. Its line's address belongs to no listed program."""
    gone: set[int] = set()
    monkeypatch.setattr(consistency, "bpf_prog_ids",
                        lambda: tuple(i for i, _ in kernel.bpf if i not in gone))
    monkeypatch.setattr(consistency, "bpf_prog_ksyms", lambda ids: frozenset(
        0xffffffffa0000000 + 0x1000 * i for i in ids))
    gone.add(kernel.bpf[0][0])
    kernel.hooks.append((KERNEL_LINES + 122, lambda: kernel.bpf_close(0)))
    snap = take_snapshot(kernel.sources(bpf_ids=True))
    assert snap.tries == 2 and lines_of(snap) == kernel.state_lines()
    assert "bpf_prog_0123_p0" not in "".join(lines_of(snap))


def test_an_unchanged_text_is_checked_again_only_when_other_programs_are_listed(
        kernel, monkeypatch):
    """The same bytes as the previous snapshot are that state again without asking for
    any program's addresses, while the listed programs are those it was checked against.
    Other ids (a program without a kallsyms line came): checked, then the same snapshot.
    A printed program whose id is gone (being freed): read again, not served."""
    ids = [i for i, _ in kernel.bpf]
    asked = []
    monkeypatch.setattr(consistency, "bpf_prog_ids", lambda: tuple(ids))

    def ksyms(listed):
        asked.append(listed)
        return frozenset(0xffffffffa0000000 + 0x1000 * i for i in listed)
    monkeypatch.setattr(consistency, "bpf_prog_ksyms", ksyms)
    src = kernel.sources(bpf_ids=True)
    prev = take_snapshot(src, keep_raw=True)
    assert prev.bpf_ids == tuple(ids) and len(asked) == 1
    assert take_snapshot(src, previous=prev, keep_raw=True) is prev
    assert len(asked) == 1  # unchanged: no addresses asked for
    ids.append(99)  # a program with no kallsyms entry (loaded without CAP_BPF)
    assert take_snapshot(src, previous=prev, keep_raw=True) is prev
    assert len(asked) == 2 and prev.bpf_ids == tuple(ids)
    first = ids.pop(0)  # its id freed, its line still printed (the kernel frees it next)
    kernel.hooks.append((KERNEL_LINES + 124, lambda: kernel.bpf_close(0)))  # at its end
    snap = take_snapshot(src, previous=prev, keep_raw=True)
    assert snap is not prev and snap.tries == 2
    assert f"bpf_prog_0123_p{first}" not in "".join(lines_of(snap))


def test_keeps_changing_gives_enxio(kernel):
    for _ in range(3):
        aba(kernel)
    with pytest.raises(SnapshotError, match="uevent|twice|changed"):
        take_snapshot(kernel.sources())


# --- shape_problem on its own ---------------------------------------------------------------

def _table(runs: list[tuple[str, int]]) -> str:
    out, a = [f"{0xffffffff81000000:016x} T start"], 0xffffffffc0000000
    for m, k in runs:
        for _ in range(k):
            a += 16
            out.append(f"{a:016x} t f{a:x}\t[{m}]")
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("runs,bad", [
    ([("a", 3), ("b", 2), ("bpf", 1)], False),
    ([("a", 3), ("b", 2), ("a", 1), ("__builtin__ftrace", 1)], False),  # ftrace's init list
    ([("a", 3), ("b", 2), ("a", 1), ("c", 2)], True),    # shifted: c starts after a repeat
    ([("a", 3), ("b", 2), ("a", 1), ("b", 1), ("a", 1)], True),  # a third run
])
def test_shape_runs(runs, bad):
    assert bool(consistency.shape_problem(parse_kallsyms(_table(runs).encode()))) == bad


def test_shape_duplicate_module_line():
    text = _table([("a", 3)]) + "ffffffffc0000010 t fffffffc0000010\t[a]\n"
    dup = text.splitlines()[1] + "\n"
    assert consistency.shape_problem(parse_kallsyms((text + dup).encode()))


@pytest.mark.parametrize("name", DUMPS)
def test_real_dumps_have_one_states_shape(name):
    """No false alarm on any captured dump (vmlinux duplicates like __key.N are allowed)."""
    data = (DATA / name / "kallsyms").read_bytes()
    table = parse_kallsyms(data, lenient=name in LENIENT_DUMPS)
    assert consistency.shape_problem(table) == ""
