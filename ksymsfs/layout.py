"""The layout decision: address sections (extents, names), their file offsets, segments.

No bytes are written here (builder.py serializes). The rules, and why (README "The image"):

* a section is a run of symbols of one class in one module, contiguous in address order,
  cut where a module's real section begins (/sys/module) and where two neighbours are more
  than ``gap`` apart (gaps between sections are in no section, no segment, no file byte);
* no two allocated sections overlap: each ends at most where the next one (in address
  order, any module) begins; symbol sizes are clipped to their section;
* every PROGBITS section has file bytes of its own (zeros, served virtually) at
  ``sh_offset``, so ``sh_addr - sh_offset`` maps addresses to offsets the way perf,
  libdwfl and gdb expect; NOBITS sections get distinct offsets past the end of the file;
* one PT_LOAD per allocated section, with ``p_vaddr``/``p_offset`` equal to the section's;
* text stays PROGBITS, zeros and all: nlist(3) makes any NOBITS symbol N_BSS, and
  eu-elflint rejects an executable NOBITS section (README "Reading memory").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .elfdefs import (
    PF_R,
    PF_W,
    PF_X,
    PT_LOAD,
    PT_NOTE,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_WRITE,
    SHT_NOBITS,
)

GAP_SPLIT = 4 << 20     # no section spans a symbol-free gap wider than this
MIN_GAP_SPLIT = 1 << 16  # the finest split tried when the span is too big
VIRTUAL_CAP = 1 << 30   # file bytes of all PROGBITS sections together, before splitting finer


@dataclass
class Section:
    """One address section (header fields; ``offset`` assigned by ``place``)."""

    name: str
    sh_type: int
    sh_flags: int
    addr: int
    size: int
    offset: int = 0

    @property
    def alloc(self) -> bool:
        return bool(self.sh_flags & SHF_ALLOC)


@dataclass
class Segment:
    """One program header."""

    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_filesz: int
    p_memsz: int
    p_align: int = 1


@dataclass
class Runs:
    """Sections as index ranges of the address-sorted symbols."""

    firsts: np.ndarray    # index of each section's first symbol
    ends: np.ndarray      # each section's end address (uint64), after clipping
    sizes: np.ndarray     # per-symbol st_size, clipped to its section (uint32)


def cut_runs(a: np.ndarray, sz: np.ndarray, new: np.ndarray, alloc: np.ndarray,
             progbits: np.ndarray) -> Runs:
    """Split runs at wide gaps (finer while the PROGBITS total exceeds VIRTUAL_CAP) and
    clip them so that no two allocated sections overlap.

    ``a`` sorted within runs; ``new[i]``: symbol i starts a run (class/module/real section
    change); ``alloc``/``progbits``: per symbol, whether its class' section is so.
    """
    gap = GAP_SPLIT
    step = np.zeros(len(a), np.uint64)
    np.subtract(a[1:], a[:-1], out=step[1:], where=~new[1:])
    while True:
        cut = new | (step > np.uint64(gap))
        firsts = np.flatnonzero(cut)
        ends = np.maximum.reduceat(a + sz, firsts) if len(a) else np.zeros(0, np.uint64)
        lasts = a[np.append(firsts[1:], len(a)) - 1]
        _clip(a[firsts], lasts, ends, alloc[firsts])
        starts = a[firsts]
        total = int(np.sum(ends - starts, where=progbits[firsts], dtype=np.uint64))
        if total <= VIRTUAL_CAP or gap <= MIN_GAP_SPLIT:
            break
        gap //= 2
    lens = np.diff(firsts, append=len(a))
    room = np.repeat(ends, lens)  # each symbol's section end, then the room left to it
    room -= a
    np.minimum(room, sz, out=room)
    return Runs(firsts, ends, room.astype(np.uint32))


def _clip(starts: np.ndarray, lasts: np.ndarray, ends: np.ndarray,
          alloc: np.ndarray) -> None:
    """End each allocated section where the next allocated one (by start) begins, but
    never before its own last symbol: where two modules' symbols really interleave (a
    module loaded where another's freed init text was, its stale symbols still listed,
    tests/data/d2000-sep4020-arm32) the sections overlap rather than lose symbols."""
    idx = np.flatnonzero(alloc)
    if len(idx) < 2:
        return
    idx = idx[np.argsort(starts[idx], kind="stable")]
    cur = idx[:-1]
    ends[cur] = np.maximum(np.minimum(ends[cur], starts[idx[1:]]), lasts[cur])


def unique_names(bases: list[tuple[str, str]], counts: list[int]) -> list[str]:
    """``(base, module)`` per section -> names; the biggest of each pair keeps ``base``,
    the others become ``base.1``, ``base.2``... in section order; ``[module]`` appended."""
    best: dict[tuple[str, str], int] = {}
    for i, key in enumerate(bases):
        if key not in best or counts[i] > counts[best[key]]:
            best[key] = i
    seen: dict[tuple[str, str], int] = {}
    out = []
    for i, (base, mod) in enumerate(bases):
        name = base
        if best[(base, mod)] != i:
            seen[(base, mod)] = seen.get((base, mod), 0) + 1
            name = f"{base}.{seen[(base, mod)]}"
        out.append(f"{name}[{mod}]" if mod else name)
    return out


def place(sections: list[Section], data_start: int) -> int:
    """Assign PROGBITS sections' ``offset``: back to back from ``data_start`` (a zero-size
    allocated one still gets one byte, so that its segment is not empty). Returns the end.

    One byte separates neighbours: eu-elflint matches a section to the first segment
    whose file range holds it, ends included, so a zero-size section right at the end
    of its neighbour's bytes would be taken for part of that segment.
    """
    cur = data_start
    for s in sections:
        if s.sh_type != SHT_NOBITS:
            s.offset = cur + 1
            cur = s.offset + max(s.size, 1 if s.alloc else 0)
    return cur


def place_nobits(sections: list[Section], filesize: int) -> None:
    """NOBITS sections' ``offset``: distinct, past the end of the file (eu-elflint wants
    each inside its own segment's range and after that segment's file bytes)."""
    cur = filesize
    for s in sections:
        if s.sh_type == SHT_NOBITS:
            s.offset = cur + 1
            cur = s.offset + max(s.size, 1)


def segments(sections: list[Section], note: tuple[int, int] | None) -> list[Segment]:
    """PT_NOTE over the kernel's build-id notes (if any), then one PT_LOAD per allocated
    section, sorted by address. A zero-size section's segment is one byte long (eu-elflint
    wants every allocated section inside a segment with p_memsz > 0)."""
    out = []
    if note is not None:
        out.append(Segment(PT_NOTE, PF_R, note[0], 0, note[1], note[1], 4))
    loads = []
    for s in sections:
        if not s.alloc:
            continue
        mem = max(s.size, 1)
        filesz = 0 if s.sh_type == SHT_NOBITS else mem
        flags = PF_R
        if filesz:  # eu-elflint counts only PROGBITS sections toward a segment's X/W flags
            flags |= (PF_X if s.sh_flags & SHF_EXECINSTR else 0) \
                | (PF_W if s.sh_flags & SHF_WRITE else 0)
        loads.append(Segment(PT_LOAD, flags, s.offset, s.addr, filesz, mem))
    loads.sort(key=lambda g: (g.p_vaddr, g.p_memsz, g.p_offset))
    return out + loads


def kernel_text_base(first: str, last: str, default: str) -> str:
    """``.init.text`` for a kernel text run that starts at ``_sinittext`` or ends at
    ``_einittext`` (the kernel's init text), else ``default``."""
    return ".init.text" if first == "_sinittext" or last == "_einittext" else default
