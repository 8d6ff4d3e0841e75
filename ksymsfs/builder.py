"""Build an ELF image (.symtab/.strtab plus address sections) from a SymbolTable.

Layout, in file order::

    Elf_Ehdr | Elf_Phdr[1] | .symtab | .strtab | .ksyms.info | .ksyms.modules
             | .shstrtab | Elf_Shdr[]

Address sections (.text, .rodata, .data, .bss, ... one per run of same-class symbols
within a module, named ".text[fuse]" for modules) carry no bytes of their own: each
PROGBITS one overlays the file from offset 0 and is at most as long as the file, so that
binutils' "section extends past end of file" check holds. See README "Image format".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import letters as lt
from .elfdefs import (
    ELFCLASS32,
    ET_EXEC,
    EV_CURRENT,
    PF_R,
    PF_W,
    PF_X,
    PT_LOAD,
    SHN_ABS,
    SHN_LORESERVE,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_PROGBITS,
    SHT_STRTAB,
    SHT_SYMTAB,
    STB_LOCAL,
    Target,
    ehdr_dtype,
    phdr_dtype,
    shdr_dtype,
    sym_dtype,
)
from .errors import ImageError
from .kallsyms import SymbolTable

SIZE_CAP = 0x10000  # inferred st_size never exceeds this (drgn's per-cpu gap cap)
INFO_SECTION = ".ksyms.info"      # Elf32_Word per symtab entry: letter | modname_off << 8
MODULES_SECTION = ".ksyms.modules"  # string table of module names ("" = kernel)


@dataclass
class Section:
    """One address section: a run of symbols of one class in one module."""

    name: str
    sh_type: int
    sh_flags: int
    addr: int
    size: int


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def module_ranks(table: SymbolTable, load_order: list[str] | None) -> np.ndarray:
    """rank[module_id]: kernel 0, then modules in load order, unknown/pseudo ones last.

    ``load_order`` is oldest first (the reverse of /proc/modules). Modules missing from it
    keep the reverse of their kallsyms appearance (kallsyms lists newest first too).
    """
    n = len(table.modules)
    rank = np.zeros(n, np.int64)
    pos = {m: i for i, m in enumerate(load_order or [])}
    listed = [i for i in range(1, n) if table.modules[i] in pos]
    unlisted = [i for i in range(1, n) if table.modules[i] not in pos]
    listed.sort(key=lambda i: pos[table.modules[i]])
    for r, i in enumerate(listed + unlisted[::-1], start=1):
        rank[i] = r
    return rank


def infer_sizes(addr: np.ndarray, group: np.ndarray) -> np.ndarray:
    """st_size = distance to the next greater address in the same group, capped; last = 0.

    ``addr``/``group`` must be sorted by (group, addr).
    """
    n = len(addr)
    size = np.zeros(n, np.uint64)
    if n < 2:
        return size
    new = np.ones(n, bool)
    new[1:] = (addr[1:] != addr[:-1]) | (group[1:] != group[:-1])
    run = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    nxt = np.append(first[1:], n)  # index of the next run's first element, per run
    has_next = nxt < n
    nxt_c = np.minimum(nxt, n - 1)
    run_size = np.where(has_next & (group[nxt_c] == group[first]),
                        addr[nxt_c] - addr[first], 0).astype(np.uint64)
    return np.minimum(run_size[run], np.uint64(SIZE_CAP))


def build_image(table: SymbolTable, target: Target, load_order: list[str] | None = None,
                hide_addresses: bool = False,
                section_bases: dict[str, dict[str, int]] | None = None) -> bytes:
    """SymbolTable -> ELF bytes. Same inputs give byte-identical output."""
    n = len(table)
    addr = np.zeros(n, np.uint64) if hide_addresses else table.addr
    if int(addr.max(initial=0)) > target.word_max:
        raise ImageError("addresses do not fit in a 32-bit ELF class; use --class 64")
    cls = lt.LETTER_CLASS[table.letter]
    info = lt.LETTER_INFO[table.letter]
    rank = module_ranks(table, load_order)[table.module]
    is_global = (info >> 4) != STB_LOCAL
    order = np.lexsort((np.arange(n), rank, is_global))  # locals first, then kernel→modules
    ehdr_t = ehdr_dtype(target.elfclass, target.data)
    phdr_t = phdr_dtype(target.elfclass, target.data)
    sym_t = sym_dtype(target.elfclass, target.data)
    # a lower bound on the final file size bounds each overlaying PROGBITS section
    e = "<" if target.data == 1 else ">"
    modstr, modoff = _module_strtab(table.modules)
    head = ehdr_t.itemsize + phdr_t.itemsize
    symoff = _align(head, 8)
    stroff = symoff + (n + 1) * sym_t.itemsize
    infooff = _align(stroff + len(table.strtab), 4)
    modsoff = infooff + 4 * (n + 1)
    limit = modsoff + len(modstr)
    sections, shndx, size = _sections(table, addr, cls, rank, limit, section_bases)
    if len(sections) + 6 >= SHN_LORESERVE:
        raise ImageError(f"{len(sections)} address sections: more than ELF section "
                         "numbering allows without SHN_XINDEX")
    sym = np.zeros(n + 1, sym_t)
    s = sym[1:]
    s["st_name"] = table.name_off[order]
    s["st_value"] = addr[order]
    s["st_size"] = size[order]
    s["st_info"] = info[order]
    s["st_shndx"] = shndx[order]
    first_global = 1 + int(np.count_nonzero(~is_global))
    info_words = np.zeros(n + 1, e + "u4")
    info_words[1:] = table.letter[order].astype(np.uint32) | (modoff[table.module[order]] << 8)
    return _assemble(target, ehdr_t, phdr_t, sections, sym, first_global, table.strtab,
                     info_words, modstr, symoff, stroff, infooff, modsoff)


def _module_strtab(modules: list[str]) -> tuple[bytes, np.ndarray]:
    out, offs = bytearray(b"\0"), [0]
    for m in modules[1:]:
        offs.append(len(out))
        out += m.encode("utf-8", "surrogateescape") + b"\0"
    return bytes(out), np.array(offs, np.uint32)


def _sections(table, addr, cls, rank, limit, section_bases):
    """Group sectioned symbols into address sections; returns (sections, st_shndx, st_size)."""
    n = len(table)
    shndx = np.zeros(n, np.uint16)
    shndx[cls == lt.ABS] = SHN_ABS
    shndx[cls == lt.UNDEF] = SHN_UNDEF
    size = np.zeros(n, np.uint64)
    idx = np.flatnonzero((cls != lt.ABS) & (cls != lt.UNDEF))
    if len(idx) == 0:
        return [], shndx, size
    o = idx[np.lexsort((cls[idx], addr[idx], rank[idx]))]
    a, c, r = addr[o], cls[o], rank[o]
    sz = infer_sizes(a, r)
    half = max(limit // 2, 1)
    sz = np.minimum(sz, np.uint64(half))
    # a run: same module, same class, contiguous in address order
    new = np.ones(len(o), bool)
    new[1:] = (r[1:] != r[:-1]) | (c[1:] != c[:-1])
    if section_bases:
        new |= _real_section_cuts(table, o, a, section_bases)
    run = np.cumsum(new) - 1
    run_start = a[np.flatnonzero(new)][run]
    chunk = (a - run_start) // np.uint64(half)  # keeps each section <= limit bytes long
    new2 = new.copy()
    new2[1:] |= chunk[1:] != chunk[:-1]
    sec = np.cumsum(new2) - 1
    firsts = np.flatnonzero(new2)
    sec_end = np.maximum.reduceat(a + sz, firsts)
    sections = []
    mods = table.modules
    for k, f in enumerate(firsts.tolist()):
        base, sh_type, flags = lt.SECTION_KINDS[int(c[f])]
        mod = mods[int(table.module[o[f]])]
        name = _section_name(base, mod, int(a[f]), section_bases)
        start = int(a[f])
        sections.append(Section(name, sh_type, flags, start, int(sec_end[k]) - start))
    shndx[o] = (sec + 1).astype(np.uint16)
    size[o] = sz
    return sections, shndx, size


def _real_section_cuts(table, o, a, section_bases):
    """Extra run boundaries where a module's real ELF section (from /sys) begins."""
    cut = np.zeros(len(o), bool)
    mod_of = table.module[o]
    for mid, mname in enumerate(table.modules):
        bases = section_bases.get(mname)
        if not mid or not bases:
            continue
        sel = np.flatnonzero(mod_of == mid)
        b = np.array(sorted(set(bases.values())), np.uint64)
        which = np.searchsorted(b, a[sel], side="right")
        cut[sel[1:]] |= which[1:] != which[:-1]
    return cut


def _section_name(base, mod, start, section_bases):
    if not mod:
        return base
    bases = (section_bases or {}).get(mod)
    if bases:
        below = [(v, k) for k, v in bases.items() if v <= start]
        if below:
            return f"{max(below)[1]}[{mod}]"
    return f"{base}[{mod}]"


def _load_segment(phdr_t, sections, filesize):
    """One PT_LOAD over the whole file; NOBITS sections sit just past its file bytes.

    eu-elflint matches sections to segments by file offset, and wants PF_X/PF_W only
    when some PROGBITS section in the segment is executable/writable.
    """
    ph = np.zeros(1, phdr_t)
    flags = PF_R
    nobits = 0
    for s in sections:
        if s.sh_type == SHT_NOBITS:
            nobits = max(nobits, s.size)
        elif s.sh_flags & lt.SHF_ALLOC:
            flags |= PF_X if s.sh_flags & lt.SHF_EXECINSTR else 0
            flags |= PF_W if s.sh_flags & lt.SHF_WRITE else 0
    ph[0]["p_type"] = PT_LOAD
    ph[0]["p_flags"] = flags
    ph[0]["p_filesz"] = filesize
    ph[0]["p_memsz"] = filesize + nobits + (1 if nobits else 0)
    ph[0]["p_align"] = 1
    return ph


def _assemble(target, ehdr_t, phdr_t, sections, sym, first_global, strtab, info_words,
              modstr, symoff, stroff, infooff, modsoff) -> bytes:
    shdr_t = shdr_dtype(target.elfclass, target.data)
    names = [s.name for s in sections] + [".symtab", ".strtab", INFO_SECTION,
                                          MODULES_SECTION, ".shstrtab"]
    shstr, name_offs = bytearray(b"\0"), {}
    for nm in names:
        if nm not in name_offs:
            name_offs[nm] = len(shstr)
            shstr += nm.encode("utf-8", "surrogateescape") + b"\0"
    shstroff = modsoff + len(modstr)
    shoff = _align(shstroff + len(shstr), 8)
    nsec = len(sections)
    shnum = nsec + 6
    sh = np.zeros(shnum, shdr_t)
    filesize = shoff + sh.nbytes
    word = 4 if target.elfclass == ELFCLASS32 else 8
    for i, s in enumerate(sections, start=1):
        sh[i] = (name_offs[s.name], s.sh_type, s.sh_flags, s.addr,
                 0 if s.sh_type != SHT_NOBITS else filesize, s.size, 0, 0, 1, 0)
    symtab_ndx = nsec + 1
    sh[symtab_ndx] = (name_offs[".symtab"], SHT_SYMTAB, 0, 0, symoff, sym.nbytes,
                      symtab_ndx + 1, first_global, word, sym.dtype.itemsize)
    sh[symtab_ndx + 1] = (name_offs[".strtab"], SHT_STRTAB, 0, 0, stroff, len(strtab), 0, 0, 1, 0)
    sh[symtab_ndx + 2] = (name_offs[INFO_SECTION], SHT_PROGBITS, 0, 0, infooff,
                          info_words.nbytes, symtab_ndx, 0, 4, 4)
    sh[symtab_ndx + 3] = (name_offs[MODULES_SECTION], SHT_STRTAB, 0, 0, modsoff, len(modstr),
                          0, 0, 1, 0)
    sh[symtab_ndx + 4] = (name_offs[".shstrtab"], SHT_STRTAB, 0, 0, shstroff, len(shstr),
                          0, 0, 1, 0)
    eh = np.zeros(1, ehdr_t)
    ident = bytes([0x7F, ord("E"), ord("L"), ord("F"), target.elfclass, target.data,
                   EV_CURRENT, 0]) + bytes(8)
    eh[0] = (ident, ET_EXEC, target.machine, EV_CURRENT, 0, ehdr_t.itemsize, shoff, 0,
             ehdr_t.itemsize, phdr_t.itemsize, 1, shdr_t.itemsize, shnum, symtab_ndx + 4)
    ph = _load_segment(phdr_t, sections, filesize)
    out = bytearray(filesize)
    out[0:ehdr_t.itemsize] = eh.tobytes()
    out[ehdr_t.itemsize:ehdr_t.itemsize + phdr_t.itemsize] = ph.tobytes()
    out[symoff:symoff + sym.nbytes] = sym.tobytes()
    out[stroff:stroff + len(strtab)] = strtab
    out[infooff:infooff + info_words.nbytes] = info_words.tobytes()
    out[modsoff:modsoff + len(modstr)] = modstr
    out[shstroff:shstroff + len(shstr)] = shstr
    out[shoff:] = sh.tobytes()
    return bytes(out)
