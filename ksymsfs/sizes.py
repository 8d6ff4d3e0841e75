"""st_size for kallsyms symbols (which carry none): next symbol, group ends, mapping symbols.

The rule (README "Symbol sizes and lookup"):

- a symbol ends where the next greater address of a *real* symbol begins, in any module
  (so no size runs into another module's or pseudo-module's symbols); symbols sharing an
  address share the size;
- the last symbol of its group (the kernel, a module, a pseudo-module such as ``[bpf]``)
  ends at the end of its 4 KiB page, as perf ends the last symbol before another module
  (tools/perf/util/symbol.c ``symbols__fixup_end``), but still not past the next symbol;
- symbols not in memory (kallsyms ``?``, ``N``, ``n``) get size 0 and end nothing;
- ARM/AArch64 mapping symbols (``$a $d $t $x``, ``$x.N``...) mark code/data runs inside a
  function: they neither end the previous symbol nor get a size themselves (0, as in
  the object files they come from);
- every size is capped (``SIZE_CAP``, drgn's per-cpu gap cap); address 0 gets size 0
  (an image whose addresses are hidden learns nothing from its sizes).
"""

from __future__ import annotations

import numpy as np

from .arrays import sorted_unique

SIZE_CAP = 0x10000  # inferred st_size never exceeds this (drgn's per-cpu gap cap)
PAGE_SIZE = 0x1000  # the last symbol of a group ends at the end of its page (perf's rule)
MAPPING_KINDS = b"adtx"  # $a ARM code, $t Thumb, $d data, $x AArch64 code (readbase)


def mapping_mask(strtab: bytes | bytearray | np.ndarray, name_off: np.ndarray) -> np.ndarray:
    """Per name offset into a NUL-separated ``strtab``: is it a mapping symbol's name?"""
    tab = strtab if isinstance(strtab, np.ndarray) else np.frombuffer(strtab, np.uint8)
    off = np.asarray(name_off, np.int64)
    out = np.zeros(len(off), bool)
    if len(off) == 0 or len(tab) < 2:
        return out
    last = len(tab) - 1
    cand = np.flatnonzero(tab[np.minimum(off, last)] == 0x24)  # "$": rare, check the rest
    if len(cand):
        o = off[cand]
        kind = tab[np.minimum(o + 1, last)]
        third = tab[np.minimum(o + 2, last)]  # within the name or its NUL when kind != 0
        ok = np.isin(kind, np.frombuffer(MAPPING_KINDS, np.uint8))
        ok &= (third == 0) | (third == 0x2E)
        out[cand[ok]] = True
    return out


def unsized(mapping: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Symbols that get size 0 and end no other symbol: mapping symbols (``mapping``, from
    mapping_mask), and symbols of classes that are not in memory (kallsyms "?", "N", "n":
    .modinfo, debug sections)."""
    from .letters import SECTION_KINDS, SHF_ALLOC
    in_memory = np.zeros(256, bool)
    for k, (_, _, flags) in SECTION_KINDS.items():
        in_memory[k] = bool(flags & SHF_ALLOC)
    return mapping | ~in_memory[cls]


def infer_sizes(addr: np.ndarray, group: np.ndarray, mapping: np.ndarray | None = None,
                cap: int = SIZE_CAP) -> np.ndarray:
    """st_size per symbol (uint64); ``addr``/``group`` sorted by (group, addr)."""
    return run_sizes(np.asarray(addr, np.uint64), np.asarray(group), cap,
                     mapping).astype(np.uint64)


def run_sizes(addr: np.ndarray, group: np.ndarray, cap: int,
              mapping: np.ndarray | None = None,
              page_bound: np.ndarray | None = None) -> np.ndarray:
    """infer_sizes capped at ``cap`` (< 2**32), as uint32. ``page_bound``: symbols that
    never reach past their own page (pseudo-modules: each BPF program, trampoline or
    kprobe page is an allocation of its own, so the next one's distance means nothing)."""
    n = len(addr)
    real = None
    if mapping is not None and np.any(mapping):
        real = np.flatnonzero(~np.asarray(mapping, bool))
        addr, group = addr[real], group[real]
        if page_bound is not None:
            page_bound = page_bound[real]
    gap = _gap_in_group(addr, group)
    last = np.flatnonzero(gap == 0)  # no greater address in its group: few
    la = addr[last]
    end = np.uint64(PAGE_SIZE) - (la & np.uint64(PAGE_SIZE - 1))  # to the page end ...
    np.minimum(end, ~la, out=end)  # ... within the address space: a + size < 2**64
    gap[last] = end
    sel, dist = _gap_to_next_any(addr, group, last)
    gap[sel] = np.minimum(gap[sel], dist)
    if page_bound is not None and np.any(page_bound):
        pb = np.flatnonzero(page_bound)
        pa = addr[pb]
        pend = np.uint64(PAGE_SIZE) - (pa & np.uint64(PAGE_SIZE - 1))
        np.minimum(pend, ~pa, out=pend)
        gap[pb] = np.minimum(gap[pb], pend)
    gap[addr == 0] = 0
    np.minimum(gap, np.uint64(cap), out=gap)
    if real is None:
        return gap.astype(np.uint32)
    out = np.zeros(n, np.uint32)
    out[real] = gap
    return out


def _gap_in_group(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Distance to the next greater address of the same group (0 if none), as uint64."""
    n = len(a)
    gap = np.zeros(n, np.uint64)
    if n < 2:
        return gap
    same = g[1:] == g[:-1]
    np.subtract(a[1:], a[:-1], out=gap[:-1], where=same)
    # a symbol sharing its address with the next one (same group) takes that one's size;
    # such aliases are few: resolve each chain of them to the symbol that ends it
    same &= gap[:-1] == 0
    dup = np.flatnonzero(same)
    if len(dup):
        end = np.append(np.flatnonzero(np.diff(dup) != 1), len(dup) - 1)
        gap[dup] = gap[np.repeat(dup[end] + 1, np.diff(end, prepend=-1))]
    return gap


def _gap_to_next_any(a: np.ndarray, g: np.ndarray,
                     last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(symbols, their distance to the next greater address of any group) for those that
    have one and where it can matter.

    Groups usually occupy disjoint address ranges: then only a group's last symbols can
    meet another group, and the next group's first address is all they need.
    """
    if len(a) == 0:
        return last, np.zeros(0, np.uint64)
    starts = np.flatnonzero(np.concatenate(([True], g[1:] != g[:-1])))
    lo, hi = a[starts], a[np.append(starts[1:], len(a)) - 1]
    order = np.argsort(lo, kind="stable")
    if np.all(lo[order][1:] > hi[order][:-1]):  # disjoint ranges
        nxt = np.zeros(len(lo), np.uint64)  # the next group's first address (0: none)
        nxt[order[:-1]] = lo[order[1:]]
        which = np.searchsorted(starts, last, side="right") - 1  # group of each
        sel = last[nxt[which] != 0]
        return sel, nxt[np.searchsorted(starts, sel, side="right") - 1] - a[sel]
    u = sorted_unique(a)
    k = np.searchsorted(u, a, side="right")
    sel = np.flatnonzero(k < len(u))
    return sel, u[k[sel]] - a[sel]
