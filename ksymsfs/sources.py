"""Where symbols come from: kallsyms, /proc/modules and /sys/module sections, read consistently."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field

from . import consistency
from .digest import sha256
from .errors import KsymsError, ParseError, SnapshotError
from .freshness import ReadProgress, kernel_end, shows_per_open, unchanging_span
from .kallsyms import SymbolTable, is_pseudo_module, parse_kallsyms
from .notes import Notes, read_notes
from .readfile import DEFAULT_MAX_READ, ReadBuffer, ValueFiles, read_regular

log = logging.getLogger(__name__)
SNAPSHOT_TRIES = 3  # FreeBSD ksyms gives up with ENXIO after this many unclean tries
SECTION_FILE_MAX = 64  # a /sys/module/<m>/sections/<sec> file is "0x%px\n"


@dataclass(frozen=True)
class ModuleInfo:
    """One /proc/modules line: ``name size refcnt deps state 0xADDR [(taints)]``."""

    name: str
    size: int
    state: str
    address: int


def parse_modules(data: bytes, path: str = "<modules>") -> list[ModuleInfo]:
    """/proc/modules text -> modules, newest first (the file's order)."""
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.rstrip(b"\r")
        if not line.strip():
            continue
        f = line.split()
        if len(f) < 2 or not f[1].isdigit():
            raise ParseError(path, lineno, "malformed /proc/modules line "
                             "(expected 'NAME SIZE REFCNT DEPS STATE ADDRESS')", line)
        state = f[4].decode("ascii", "replace") if len(f) > 4 else "Live"
        addr = 0
        if len(f) > 5:
            try:
                addr = int(f[5], 16)
            except ValueError:
                raise ParseError(path, lineno, "bad module address", line) from None
        out.append(ModuleInfo(f[0].decode("utf-8", "surrogateescape"), int(f[1]), state, addr))
    return out


def read_section_bases(sysmodule: str, modules: list[ModuleInfo],
                       cache: dict | None = None) -> dict[str, dict[str, int]]:
    """``/sys/module/<m>/sections/<sec>`` -> {module: {section: address}} where readable.

    Cached per (module, load address): a module instance's sections never move.
    """
    out: dict[str, dict[str, int]] = {}
    for m in modules:
        key = (m.name, m.address)
        if cache is not None and key in cache:
            out[m.name] = cache[key]
            continue
        d = os.path.join(sysmodule, m.name, "sections")
        bases: dict[str, int] = {}
        try:
            entries = os.listdir(d)
        except OSError:
            entries = []
        for sec in entries:  # never blocks on a FIFO; anything but a regular file refused
            try:
                data = read_regular(os.path.join(d, sec), SECTION_FILE_MAX)
                bases[sec] = int((data or b"").strip(), 16)
            except (KsymsError, ValueError):
                continue
        bases = {k: v for k, v in bases.items() if v}
        if cache is not None and m.address:
            cache[key] = bases
        if bases:
            out[m.name] = bases
    if cache is not None:  # forget unloaded module instances
        for key in set(cache) - {(m.name, m.address) for m in modules}:
            del cache[key]
    return out


@dataclass
class Sources:
    """Paths of the inputs. Defaults are the live kernel; any may point at captured files.

    ``modules=None`` means "no module list" (offline dump without one); the default live
    path is optional because kernels booted without module support have no /proc/modules.
    """

    kallsyms: str = "/proc/kallsyms"
    modules: str | None = "/proc/modules"
    sections: str | None = None          # e.g. /sys/module (also <m>/notes/ for build-ids)
    notes: str | None = None             # e.g. /sys/kernel/notes (raw Elf_Nhdr records)
    notes_strict: bool = False           # a notes file the user named must be readable
    lenient: bool = False
    modules_optional: bool = True        # a missing modules file means "no modules"
    strict_modules: bool = True          # kallsyms module absent from the list = unclean
    max_read: int = DEFAULT_MAX_READ     # bytes: a larger (or endless) source is refused
    seqnum: str | None = None            # /sys/kernel/uevent_seqnum: moves on module changes
    bpf_ids: bool = False                # list eBPF program ids around the read (root)
    kernel_first: bool = False           # kallsyms is generated as it is read, the
    #                                      kernel's own (unchanging) symbols first: a
    #                                      reading in flight may serve a later opener

    @classmethod
    def live(cls, procfs: str = "/proc", sysfs: str = "/sys") -> Sources:
        # procfs makes /proc/modules at boot, only with module support: one absent now
        # never comes, and not trying to open it saves two failed opens per snapshot
        modules = os.path.join(procfs, "modules")
        return cls(os.path.join(procfs, "kallsyms"),
                   modules if os.path.exists(modules) else None,
                   os.path.join(sysfs, "module"), os.path.join(sysfs, "kernel", "notes"),
                   seqnum=os.path.join(sysfs, "kernel", "uevent_seqnum"), bpf_ids=True,
                   kernel_first=shows_per_open(os.uname().release))


@dataclass
class Snapshot:
    """One consistent reading of the sources."""

    table: SymbolTable
    modules: list[ModuleInfo] | None
    section_bases: dict[str, dict[str, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    raw: bytes = b""     # the kallsyms text read: the next reading equal to it (and to
    raw_modules: bytes | None = None  # the module list) is this same kernel state
    notes: Notes | None = None  # the kernel's and modules' ELF notes (build-ids)
    tries: int = 1       # readings it took (the others were unclean)
    bpf_ids: tuple[int, ...] | None = None  # the eBPF programs listed after the reading
    #                                         (its [bpf] lines were checked against them)

    def same_reading(self, kdata: bytes | memoryview, mdata: bytes | None) -> bool:
        """The sources read exactly these bytes (a memcmp: exact, unlike a hash alone).
        (``startswith``: a memcmp also for a memoryview, which ``==`` compares per item.)"""
        return (self.raw_modules == mdata and len(self.raw) == len(kdata)
                and (kdata is self.raw or self.raw.startswith(kdata)))

    @property
    def digest(self) -> bytes:
        """SHA-256 of the bytes read (for logs and tests; identity uses same_reading).
        Only a snapshot taken with ``keep_raw`` has them: any other raises."""
        if not self.raw and self.raw_modules is None:
            raise ValueError("snapshot taken without keep_raw: no bytes to digest")
        h = sha256(self.raw)
        h.update(b"\0modules\0" + (self.raw_modules if self.raw_modules is not None
                                     else b"\xff"))
        return h.digest()

    @functools.cached_property
    def kernel_end(self) -> int:
        """Where the kernel's own symbols end in ``raw`` (freshness.kernel_end)."""
        return kernel_end(self.raw)

    @functools.cached_property
    def unchanging(self) -> tuple[int, int]:
        """The span of ``raw`` a later reading need not compare (freshness.unchanging_span)."""
        return unchanging_span(self.raw, self.kernel_end)

    @functools.cached_property
    def all_zero(self) -> bool:
        """Every address is 0: the kernel hid them from whoever read kallsyms (asked by
        every opener who joined its reading: once)."""
        return not self.table.addr.any()

    @property
    def load_order(self) -> list[str] | None:
        """Oldest module first: /proc/modules lists newest first."""
        return None if self.modules is None else [m.name for m in reversed(self.modules)]


def _read(path: str, missing_ok: bool = False, max_bytes: int = DEFAULT_MAX_READ,
          into: ReadBuffer | None = None, progress: ReadProgress | None = None,
          expect: bytes | None = None,
          unchecked: tuple[int, int] = (0, 0)) -> bytes | memoryview | None:
    return read_regular(path, max_bytes, missing_ok, into, progress, expect, unchecked)


def _read_modules(src: Sources) -> bytes | None:
    """None when there is no module list (a kernel without module support, say)."""
    if src.modules is None:
        return None
    return _read(src.modules, missing_ok=src.modules_optional, max_bytes=src.max_read)


def take_snapshot(src: Sources,
                  section_cache: dict | None = None,
                  previous: Snapshot | None = None, keep_raw: bool = False,
                  buffer: ReadBuffer | None = None,
                  progress: ReadProgress | None = None,
                  values: ValueFiles | None = None) -> Snapshot:
    """Read signals, modules, kallsyms, modules, signals; retry while anything moved, then ENXIO.

    Clean means: both module lists equal, the signals (uevent seqnum, eBPF program ids)
    did not move, and the text has one state's shape (consistency.shape_problem) with
    only listed programs' ``[bpf]`` lines (consistency.bpf_lines_problem). If the
    bytes read equal ``previous``'s (Snapshot.same_reading), ``previous`` itself is
    returned: nothing changed, so its parsed table (and any image built from it) is still
    exact. ``keep_raw``: the snapshot keeps the bytes read for that comparison (the device
    does; a one-off dump frees them before its build). ``buffer``: kallsyms is read into
    it (the device's, reused at every open), compared with ``previous``'s as it arrives
    (ReadBuffer.read_fd); only a changed text is copied out. For a ``kernel_first``
    source the kernel's own symbols are read but not compared once the reading is seen
    to show addresses as ``previous`` did (freshness.unchanging_span).
    ``progress``: where the reading is (which try, how many bytes of kallsyms), for
    openers who arrive meanwhile (freshness.KernelFirstJoin). ``values``: the device's
    kept value files (the uevent seqnum, read twice per try).
    """
    why = ""
    for tries in range(1, SNAPSHOT_TRIES + 1):
        if progress is not None:
            progress.start_try(tries)
        before = consistency.read_signals(src.seqnum, src.bpf_ids, values=values)
        m1 = _read_modules(src)
        expect = previous.raw if previous is not None and buffer is not None else None
        kdata = _read(src.kallsyms, max_bytes=src.max_read, into=buffer, progress=progress,
                      expect=expect or None,
                      unchecked=previous.unchanging if expect and src.kernel_first
                      else (0, 0))
        m2 = _read_modules(src)
        after = consistency.read_signals(src.seqnum, src.bpf_ids, values=values)
        why = consistency.moved(before, after)
        if m1 != m2:
            why = f"{src.modules} changed while {src.kallsyms} was read"
        if why:
            continue
        same = previous is not None and previous.same_reading(kdata, m1)
        # the programs' addresses (3 calls a program) are needed unless these are the
        # bytes and programs the previous reading was checked with
        ksyms = (consistency.bpf_prog_ksyms(after.bpf_ids) if after.bpf_ids is not None
                 and not (same and after.bpf_ids == previous.bpf_ids) else None)
        if same:
            if after.bpf_ids != previous.bpf_ids:
                # other programs listed: one that left during the read can shift the
                # [bpf] lines into exactly the previous text (a line of a program no
                # longer listed shows it); else the same state, now with these
                if src.strict_modules and (why := consistency.bpf_lines_problem(
                        previous.table, ksyms)):
                    continue
                previous.bpf_ids = after.bpf_ids
            if progress is not None:
                progress.done(tries)
            return previous
        kdata = bytes(kdata)  # a view of the buffer: the next open reads over it
        table = parse_kallsyms(kdata, src.kallsyms, lenient=src.lenient)
        mods = None if m1 is None else parse_modules(m1, src.modules or "")
        warnings = _cross_check(table, mods, src)
        if src.strict_modules:
            why = ((warnings[0] if warnings else "") or consistency.shape_problem(table)
                   or consistency.bpf_lines_problem(table, ksyms))
        if why:
            continue
        bases = {}
        if src.sections and mods:
            bases = read_section_bases(src.sections, mods, section_cache)
        notes, nwarn = read_notes(src.notes, src.sections, [m.name for m in mods or []],
                                  strict=src.notes_strict)
        raw = (kdata, m1) if keep_raw else (b"", None)
        del kdata
        if progress is not None:
            progress.done(tries)
        return Snapshot(table, mods, bases, warnings + nwarn, *raw, notes, tries,
                        after.bpf_ids)
    raise SnapshotError(f"no consistent snapshot after {SNAPSHOT_TRIES} tries: {why}")


def _cross_check(table: SymbolTable, mods: list[ModuleInfo] | None, src: Sources) -> list[str]:
    """Both files must describe one module set (pseudo modules and non-Live ones aside)."""
    if mods is None:
        return []
    listed = {m.name for m in mods}
    live = {m.name for m in mods if m.state == "Live"}
    in_ksyms = set(table.modules[1:])
    out = []
    missing = [m for m in table.modules[1:] if m not in listed and not is_pseudo_module(m)]
    if missing:
        out.append(f"{src.kallsyms} has symbols of module(s) not in {src.modules}: "
                   + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    absent = sorted(live - in_ksyms)
    if absent:
        out.append(f"{src.modules} lists module(s) with no symbols in {src.kallsyms}: "
                   + ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else ""))
    return out
