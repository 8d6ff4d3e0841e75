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

import bisect
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
    word_dtype,
)
from .errors import ImageError
from .kallsyms import SymbolTable
from .sizes import SIZE_CAP, run_sizes, unsized

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
    rank = np.zeros(n, np.int32)
    pos = {m: i for i, m in enumerate(load_order or [])}
    listed = [i for i in range(1, n) if table.modules[i] in pos]
    unlisted = [i for i in range(1, n) if table.modules[i] not in pos]
    listed.sort(key=lambda i: pos[table.modules[i]])
    for r, i in enumerate(listed + unlisted[::-1], start=1):
        rank[i] = r
    return rank


def _stable_order(rank: np.ndarray, is_global: np.ndarray) -> np.ndarray:
    """np.lexsort((rank, is_global)) in linear time: each kind of symbol (local, global),
    in kallsyms order, is a few long runs of one rank (kallsyms groups a module's
    symbols); a stable sort of the runs by rank, expanded back to symbols, is the order.
    """
    parts = []
    for glob in (False, True):
        idx = np.flatnonzero(is_global == glob)
        if len(idx) == 0:
            continue
        if len(idx) < 1 << 31:
            idx = idx.astype(np.int32)
        rk = rank[idx]
        starts = np.concatenate(([0], np.flatnonzero(rk[1:] != rk[:-1]) + 1))  # rank runs
        lens = np.diff(starts, append=len(idx))
        ro = np.argsort(rk[starts], kind="stable")
        del rk
        starts, lens = starts[ro].astype(idx.dtype), lens[ro]
        pos = np.repeat(starts - (np.cumsum(lens, dtype=idx.dtype) - lens), lens)
        pos += np.arange(len(pos), dtype=pos.dtype)
        parts.append(idx[pos])
    return np.concatenate(parts) if parts else np.zeros(0, np.intp)


def build_image(table: SymbolTable, target: Target, load_order: list[str] | None = None,
                hide_addresses: bool = False,
                section_bases: dict[str, dict[str, int]] | None = None) -> bytearray:
    """SymbolTable -> ELF image (a bytearray). Same inputs give byte-identical output.

    The symbol table is written straight into the output buffer: peak memory is the
    table plus one image plus per-symbol index arrays (kept to small dtypes).
    """
    n = len(table)
    addr = np.zeros(n, np.uint64) if hide_addresses else table.addr
    if int(addr.max(initial=0)) > target.word_max:
        raise ImageError("addresses do not fit in a 32-bit ELF class; use --class 64")
    cls = np.take(lt.LETTER_CLASS, table.letter)
    info = np.take(lt.LETTER_INFO, table.letter)
    ranks = module_ranks(table, load_order)
    rank = np.take(ranks.astype(np.uint16) if len(ranks) <= 1 << 16 else ranks, table.module)
    sym_t = sym_dtype(target.elfclass, target.data)
    modstr, modoff = _module_strtab(table.modules)
    lay = _Layout(target, n, sym_t, len(table.strtab), len(modstr))
    # every overlaying PROGBITS section must fit in the file: bound them by a lower
    # bound of its final size (headers and .shstrtab only add to it)
    sections, shndx, size = _sections(table, addr, cls, rank, lay.modsoff + len(modstr),
                                      section_bases)
    del cls
    if len(sections) + 6 >= SHN_LORESERVE:
        raise ImageError(f"{len(sections)} address sections: more than ELF section "
                         "numbering allows without SHN_XINDEX")
    shstr, name_offs = _shstrtab([x.name for x in sections])
    is_global = (info >> 4) != STB_LOCAL
    first_global = 1 + n - int(np.count_nonzero(is_global))
    order = _stable_order(rank, is_global)  # stable: locals first, then kernel→modules
    del rank, is_global
    out = lay.allocate(len(sections), len(shstr))
    sym = np.frombuffer(out, sym_t, n + 1, lay.symoff)[1:]
    sym["st_name"] = table.name_off[order]
    sym["st_value"] = addr[order]
    sym["st_size"] = size[order]
    del size
    sym["st_info"] = info[order]
    del info
    sym["st_shndx"] = shndx[order]
    del sym, shndx
    words = np.frombuffer(out, word_dtype(target.data), n + 1, lay.infooff)
    word = np.take(modoff << np.uint32(8), table.module)
    word |= table.letter
    words[1:] = word[order]
    del words, word, order
    out[lay.stroff:lay.stroff + len(table.strtab)] = table.strtab
    out[lay.modsoff:lay.modsoff + len(modstr)] = modstr
    out[lay.shstroff:lay.shstroff + len(shstr)] = shstr
    lay.write_headers(out, sections, name_offs, first_global)
    return out


def _shstrtab(names: list[str]) -> tuple[bytes, dict[str, int]]:
    shstr, offs = bytearray(b"\0"), {}
    for nm in names + [".symtab", ".strtab", INFO_SECTION, MODULES_SECTION, ".shstrtab"]:
        if nm not in offs:
            offs[nm] = len(shstr)
            shstr += nm.encode("utf-8", "surrogateescape") + b"\0"
    return bytes(shstr), offs


class _Layout:
    """File offsets of every part, and the ELF/program/section headers that describe them."""

    def __init__(self, target: Target, n: int, sym_t: np.dtype, strsize: int, modsize: int):
        self.target = target
        self.ehdr_t = ehdr_dtype(target.elfclass, target.data)
        self.phdr_t = phdr_dtype(target.elfclass, target.data)
        self.shdr_t = shdr_dtype(target.elfclass, target.data)
        self.sym_t = sym_t
        self.n = n
        self.symoff = _align(self.ehdr_t.itemsize + self.phdr_t.itemsize, 8)
        self.stroff = self.symoff + (n + 1) * sym_t.itemsize
        self.strsize = strsize
        self.infooff = _align(self.stroff + strsize, 4)
        self.modsoff = self.infooff + 4 * (n + 1)
        self.modsize = modsize

    def allocate(self, nsec: int, shstrsize: int) -> bytearray:
        self.shstroff = self.modsoff + self.modsize
        self.shstrsize = shstrsize
        self.shoff = _align(self.shstroff + shstrsize, 8)
        self.shnum = nsec + 6
        self.filesize = self.shoff + self.shnum * self.shdr_t.itemsize
        return bytearray(self.filesize)

    def write_headers(self, out: bytearray, sections: list[Section], name_offs: dict[str, int],
                      first_global: int) -> None:
        t = self.target
        sh = np.frombuffer(out, self.shdr_t, self.shnum, self.shoff)
        word = 4 if t.elfclass == ELFCLASS32 else 8
        for i, s in enumerate(sections, start=1):
            sh[i] = (name_offs[s.name], s.sh_type, s.sh_flags, s.addr,
                     0 if s.sh_type != SHT_NOBITS else self.filesize, s.size, 0, 0, 1, 0)
        k = len(sections) + 1  # .symtab, then .strtab, .ksyms.info, .ksyms.modules, .shstrtab
        sh[k] = (name_offs[".symtab"], SHT_SYMTAB, 0, 0, self.symoff,
                 (self.n + 1) * self.sym_t.itemsize, k + 1, first_global, word,
                 self.sym_t.itemsize)
        sh[k + 1] = (name_offs[".strtab"], SHT_STRTAB, 0, 0, self.stroff, self.strsize,
                     0, 0, 1, 0)
        sh[k + 2] = (name_offs[INFO_SECTION], SHT_PROGBITS, 0, 0, self.infooff,
                     4 * (self.n + 1), k, 0, 4, 4)
        sh[k + 3] = (name_offs[MODULES_SECTION], SHT_STRTAB, 0, 0, self.modsoff,
                     self.modsize, 0, 0, 1, 0)
        sh[k + 4] = (name_offs[".shstrtab"], SHT_STRTAB, 0, 0, self.shstroff,
                     self.shstrsize, 0, 0, 1, 0)
        eh = np.frombuffer(out, self.ehdr_t, 1, 0)
        ident = bytes([0x7F, ord("E"), ord("L"), ord("F"), t.elfclass, t.data,
                       EV_CURRENT, 0]) + bytes(8)
        eh[0] = (ident, ET_EXEC, t.machine, EV_CURRENT, 0, self.ehdr_t.itemsize, self.shoff,
                 0, self.ehdr_t.itemsize, self.phdr_t.itemsize, 1, self.shdr_t.itemsize,
                 self.shnum, k + 4)
        ph = _load_segment(self.phdr_t, sections, self.filesize)
        out[self.ehdr_t.itemsize:self.ehdr_t.itemsize + ph.nbytes] = ph.tobytes()


def _module_strtab(modules: list[str]) -> tuple[bytes, np.ndarray]:
    out, offs = bytearray(b"\0"), [0]
    for m in modules[1:]:
        offs.append(len(out))
        out += m.encode("utf-8", "surrogateescape") + b"\0"
    return bytes(out), np.array(offs, np.uint32)


def _sort_sectioned(cls, addr, rank) -> np.ndarray:
    """Stable order by (rank, addr, cls); one packed-key sort when the keys fit 64 bits.

    ``addr`` must be a temporary: it becomes the key.
    """
    if len(addr) > 1 and addr.dtype == np.uint64:
        lo = addr.min()
        span_bits = int(addr.max() - lo).bit_length()
        rank_bits = int(rank.max()).bit_length()
        if rank_bits + span_bits + 4 <= 64 and int(cls.max()) < 16:
            key = np.subtract(addr, lo, out=addr)
            key <<= np.uint64(4)
            key |= cls
            if rank_bits:
                hi = rank.astype(np.uint64)
                hi <<= np.uint64(span_bits + 4)
                key |= hi
                del hi
            return np.argsort(key, kind="stable")
    return np.lexsort((cls, addr, rank))


def _sections(table, addr, cls, rank, limit, section_bases):
    """Group sectioned symbols into address sections; returns (sections, st_shndx, st_size)."""
    n = len(table)
    shndx = np.zeros(n, np.uint16)
    shndx[cls == lt.ABS] = SHN_ABS
    shndx[cls == lt.UNDEF] = SHN_UNDEF
    size = np.zeros(n, np.uint32)  # sizes are capped at SIZE_CAP
    o = np.flatnonzero((cls != lt.ABS) & (cls != lt.UNDEF))
    if len(o) == 0:
        return [], shndx, size
    if n < 1 << 31:
        o = o.astype(np.int32)
    o = o[_sort_sectioned(cls[o], addr[o], rank[o])]
    a, r = addr[o], rank[o]
    half = max(limit // 2, 1)
    sz = run_sizes(a, r, min(SIZE_CAP, half), unsized(table.strtab, table.name_off[o], cls[o]))
    # a run: same module, same class, contiguous in address order
    c = cls[o]
    new = np.empty(len(o), bool)
    new[0] = True
    np.not_equal(r[1:], r[:-1], out=new[1:])
    del r
    new[1:] |= c[1:] != c[:-1]
    bases = _sorted_bases(section_bases)
    if bases:
        new |= _real_section_cuts(table, o, a, bases)
    starts = np.flatnonzero(new)
    chunk = np.repeat(a[starts], np.diff(starts, append=len(o)))
    del starts
    np.subtract(a, chunk, out=chunk)
    chunk //= np.uint64(half)  # keeps each section <= limit bytes long
    new[1:] |= chunk[1:] != chunk[:-1]
    del chunk
    firsts = np.flatnonzero(new)
    shndx[o] = np.cumsum(new, dtype=np.int32)  # 1-based section index per symbol
    del new
    sec_end = np.maximum.reduceat(a + sz, firsts).tolist()
    size[o] = sz
    del sz
    sections = []
    mods = table.modules
    for f_cls, f_mod, start, end in zip(c[firsts].tolist(), table.module[o[firsts]].tolist(),
                                        a[firsts].tolist(), sec_end):
        base, sh_type, flags = lt.SECTION_KINDS[f_cls]
        name = _section_name(base, mods[f_mod], start, bases)
        sections.append(Section(name, sh_type, flags, start, end - start))
    return sections, shndx, size


def _sorted_bases(section_bases):
    """{module: ([section addresses, ascending], [their (address, section name)])}."""
    out = {}
    for mod, bases in (section_bases or {}).items():
        tab = sorted((v, k) for k, v in bases.items() if v)
        if tab:
            out[mod] = ([v for v, _ in tab], tab)
    return out


def _real_section_cuts(table, o, a, bases):
    """Extra run boundaries where a module's real ELF section (from /sys) begins."""
    cut = np.zeros(len(o), bool)
    mod_of = table.module[o]
    for mid, mname in enumerate(table.modules):
        if not mid or mname not in bases:
            continue
        sel = np.flatnonzero(mod_of == mid)
        b = np.unique(np.array(bases[mname][0], np.uint64))
        which = np.searchsorted(b, a[sel], side="right")
        cut[sel[1:]] |= which[1:] != which[:-1]
    return cut


def _section_name(base, mod, start, bases):
    """``base[mod]``, or the module's real section at or below ``start``: ``.text[mod]``."""
    if not mod:
        return base
    if mod in bases:
        vals, tab = bases[mod]
        j = bisect.bisect_right(vals, start) - 1
        if j >= 0:
            return f"{tab[j][1]}[{mod}]"
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
