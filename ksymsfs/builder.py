"""Build an ELF image (.symtab/.strtab, notes, address sections) from a SymbolTable.

Layout, in file order (see layout.py for the decisions, README "The image" for why)::

    Elf_Ehdr | Elf_Phdr[] | notes | address sections (zeros, never stored)
             | .symtab | .strtab | .ksyms.info | .ksyms.modules | .shstrtab | Elf_Shdr[]

Address sections (.text, .rodata, .data, .bss, ... one per run of same-class symbols
within a module, named ".text[fuse]" for modules) sit at their kernel addresses, each in
its own PT_LOAD, with file bytes of their own that read as zeros ("no contents").
"""

from __future__ import annotations

import bisect

import numpy as np

from . import letters as lt
from .arrays import sorted_unique
from .elfdefs import (
    ELF_ST_INFO,
    ELFCLASS32,
    ELFDATA2LSB,
    ET_EXEC,
    EV_CURRENT,
    SHN_ABS,
    SHN_LORESERVE,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_NOTE,
    SHT_PROGBITS,
    SHT_STRTAB,
    SHT_SYMTAB,
    STB_LOCAL,
    STT_NOTYPE,
    Target,
    ehdr_dtype,
    phdr_dtype,
    shdr_dtype,
    sym_dtype,
    word_dtype,
)
from .errors import ImageError
from .kallsyms import SymbolTable, is_pseudo_module
from .layout import (
    Section,
    cut_runs,
    kernel_text_base,
    place,
    place_nobits,
    segments,
    unique_names,
)
from .notes import NOTE_SECTION, OTHER_NOTES_SECTION, Notes, split_notes, valid_notes
from .sizes import SIZE_CAP, mapping_mask, run_sizes, unsized
from .vimage import VirtualImage

STV_HIDDEN = 2  # elf.h: st_other visibility

INFO_SECTION = ".ksyms.info"      # Elf32_Word per symtab entry: letter | modname_off << 8
MODULES_SECTION = ".ksyms.modules"  # string table of module names ("" = kernel)
# per section class: allocated? PROGBITS (file bytes)?
_CLASS_ALLOC = np.array([bool(k[2] & lt.SHF_ALLOC) if k else False for k in
                         (lt.SECTION_KINDS.get(c) for c in range(9))])
_CLASS_PROGBITS = np.array([k is not None and k[1] != SHT_NOBITS for k in
                            (lt.SECTION_KINDS.get(c) for c in range(9))])


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
                section_bases: dict[str, dict[str, int]] | None = None,
                notes: Notes | None = None) -> bytearray:
    """The image as one bytearray, zeros included (tests, small tables): ``build_virtual``
    is what the device and ``snapshot -o`` use."""
    return bytearray(bytes(build_virtual(table, target, load_order, hide_addresses,
                                         section_bases, notes)))


def build_virtual(table: SymbolTable, target: Target, load_order: list[str] | None = None,
                  hide_addresses: bool = False,
                  section_bases: dict[str, dict[str, int]] | None = None,
                  notes: Notes | None = None) -> VirtualImage:
    """SymbolTable -> ELF image. Same inputs give byte-identical output.

    The symbol table is written straight into the output buffer: peak memory is the
    table plus the image's real bytes plus per-symbol index arrays (small dtypes). The
    address sections' contents are zeros that are never stored (VirtualImage).
    """
    n = len(table)
    addr = np.zeros(n, np.uint64) if hide_addresses else table.addr
    if int(addr.max(initial=0)) > target.word_max:
        raise ImageError("addresses do not fit in a 32-bit ELF class; use --class 64")
    cls = np.take(lt.LETTER_CLASS, table.letter)
    info = np.take(lt.LETTER_INFO, table.letter)
    mapping = mapping_mask(table.strtab, table.name_off)  # in kallsyms order: sequential
    other = _mapping_symbols(mapping, info)
    ranks = module_ranks(table, load_order)
    rank = np.take(ranks.astype(np.uint16) if len(ranks) <= 1 << 16 else ranks, table.module)
    sym_t = sym_dtype(target.elfclass, target.data)
    modstr, modoff = _module_strtab(table.modules)
    sections, shndx, size = _sections(table, addr, cls, rank, section_bases, mapping)
    del mapping
    del cls
    note_secs = _note_sections(notes, table.modules, ranks,
                               "<" if target.data == ELFDATA2LSB else ">")
    if len(sections) + len(note_secs) + 6 >= SHN_LORESERVE:
        raise ImageError(f"{len(sections)} address sections: more than ELF section "
                         "numbering allows without SHN_XINDEX")
    shstr, name_offs = _shstrtab([x.name for x in sections] + [x[0] for x in note_secs])
    is_global = (info >> 4) != STB_LOCAL
    first_global = 1 + n - int(np.count_nonzero(is_global))
    order = _stable_order(rank, is_global)  # stable: locals first, then kernel→modules
    del rank, is_global
    lay = _Layout(target, n, sym_t, len(table.strtab), len(modstr), sections, note_secs,
                  len(shstr))
    front = bytearray(lay.frontsize)
    symtab = np.zeros(n + 1, sym_t)  # numpy memory: large arrays get huge pages (madvise)
    sym = symtab[1:]
    sym["st_name"] = table.name_off[order]
    sym["st_value"] = addr[order]
    sym["st_size"] = size[order]
    del size
    sym["st_info"] = info[order]
    del info
    if other is not None:
        sym["st_other"] = other[order]
        del other
    sym["st_shndx"] = shndx[order]
    del sym, shndx
    words = np.zeros(n + 1, word_dtype(target.data))
    word = np.take(modoff << np.uint32(8), table.module)
    word |= table.letter
    words[1:] = word[order]
    del word, order
    shdrs = bytearray(lay.shnum * lay.shdr_t.itemsize)
    for (_, _, data), off in zip(note_secs, lay.note_offs):
        front[off:off + len(data)] = data
    lay.write_headers(front, shdrs, name_offs, first_global)
    # the stored runs as they are, none copied: the symbol table and info words (NumPy
    # memory), the kallsyms string table (shared with the table), the small ones; the
    # alignment gaps between them read as zeros like the address sections
    runs = ((lay.symoff, symtab.view(np.uint8)), (lay.stroff, table.strtab),
            (lay.infooff, words.view(np.uint8)), (lay.modsoff, modstr),
            (lay.shstroff, shstr), (lay.shoff, shdrs))
    assert lay.shoff + len(shdrs) == lay.filesize
    return VirtualImage([(0, front), *runs], lay.filesize)


def _mapping_symbols(mapping: np.ndarray, info: np.ndarray) -> np.ndarray | None:
    """Write local ARM/AArch64 mapping symbols ($a $d $t $x, $x.N) as their assembler
    makes them, STT_NOTYPE, and STV_HIDDEN (changes ``info``); their st_other (None: no
    mapping symbols). Size 0, local, notype and hidden is what binutils' symbol-table
    function lookup skips (``_bfd_elf_maybe_function_sym``, the annobin rule), so
    addr2line names the function around them on any e_machine (README "Symbol sizes and
    lookup"). nm letters do not change. ``mapping``: mapping_mask of every symbol."""
    mapping = mapping & ((info >> 4) == STB_LOCAL)
    if not mapping.any():
        return None
    info[mapping] = ELF_ST_INFO(STB_LOCAL, STT_NOTYPE)
    return np.where(mapping, np.uint8(STV_HIDDEN), np.uint8(0))


def _note_sections(notes, modules, ranks, order) -> list[tuple[str, int, bytes]]:
    """(section name, sh_type, raw notes): the kernel's GNU notes (build-id) first, its
    other notes in ``.ksyms.notes``, then each module's build-id note in load order
    (only modules of this table; notes that do not parse in the image's byte order are
    left out)."""
    if notes is None or not valid_notes(notes.kernel, order):
        out = []
    else:
        gnu, other = split_notes(notes.kernel, order)
        out = [(NOTE_SECTION, SHT_NOTE, gnu)] if gnu else []
        out += [(OTHER_NOTES_SECTION, SHT_PROGBITS, other)] if other else []
    if notes is None:
        return out
    pos = {m: int(ranks[i]) for i, m in enumerate(modules) if i}
    mods = sorted((m for m in notes.modules
                   if m in pos and valid_notes(notes.modules[m], order)), key=pos.get)
    return out + [(f"{NOTE_SECTION}[{m}]", SHT_NOTE, notes.modules[m]) for m in mods]


def _shstrtab(names: list[str]) -> tuple[bytes, dict[str, int]]:
    shstr, offs = bytearray(b"\0"), {}
    for nm in names + [".symtab", ".strtab", INFO_SECTION, MODULES_SECTION, ".shstrtab"]:
        if nm not in offs:
            offs[nm] = len(shstr)
            shstr += nm.encode("utf-8", "surrogateescape") + b"\0"
    return bytes(shstr), offs


class _Layout:
    """File offsets of every part, and the ELF/program/section headers that describe them.

    File order: Ehdr | Phdr[] | notes (stored: "front") | address sections (zeros, never
    stored) | .symtab | .strtab | .ksyms.info | .ksyms.modules | .shstrtab | Shdr[]
    (each stored as it is). The tables come last so that a truncated file is caught by the
    readers' bounds checks; NOBITS sections get offsets past the end.
    """

    def __init__(self, target: Target, n: int, sym_t: np.dtype, strsize: int, modsize: int,
                 sections: list[Section], note_secs: list[tuple[str, int, bytes]],
                 shstrsize: int):
        self.target = target
        self.ehdr_t = ehdr_dtype(target.elfclass, target.data)
        self.phdr_t = phdr_dtype(target.elfclass, target.data)
        self.shdr_t = shdr_dtype(target.elfclass, target.data)
        self.sym_t = sym_t
        self.n = n
        self.sections, self.note_secs = sections, note_secs
        nload = sum(1 for s in sections if s.alloc)
        kernel_note = bool(note_secs) and note_secs[0][0] == NOTE_SECTION
        self.phnum = nload + kernel_note
        cur = self.ehdr_t.itemsize + self.phnum * self.phdr_t.itemsize
        self.note_offs = []
        for _, _, data in note_secs:
            cur = _align(cur, 4)
            self.note_offs.append(cur)
            cur += len(data)
        self.frontsize = cur
        self.symoff = _align(place(sections, _align(cur, 16)), 8)
        self.stroff = self.symoff + (n + 1) * sym_t.itemsize
        self.strsize = strsize
        self.infooff = _align(self.stroff + strsize, 4)
        self.modsoff = self.infooff + 4 * (n + 1)
        self.modsize = modsize
        self.shstroff = self.modsoff + modsize
        self.shstrsize = shstrsize
        self.shoff = _align(self.shstroff + shstrsize, 8)
        self.shnum = len(sections) + len(note_secs) + 6
        self.filesize = self.shoff + self.shnum * self.shdr_t.itemsize
        place_nobits(sections, self.filesize)
        note = (self.note_offs[0], len(note_secs[0][2])) if kernel_note else None
        self.segments = segments(sections, note)

    def write_headers(self, front: bytearray, shdrs: bytearray, name_offs: dict[str, int],
                      first_global: int) -> None:
        """Ehdr and Phdr[] into ``front``, Shdr[] into ``shdrs`` (the table alone)."""
        t = self.target
        sh = np.frombuffer(shdrs, self.shdr_t, self.shnum)
        word = 4 if t.elfclass == ELFCLASS32 else 8
        for i, s in enumerate(self.sections, start=1):
            sh[i] = (name_offs[s.name], s.sh_type, s.sh_flags, s.addr, s.offset, s.size,
                     0, 0, 1, 0)
        k = len(self.sections) + 1
        for (name, sh_type, data), off in zip(self.note_secs, self.note_offs):
            sh[k] = (name_offs[name], sh_type, 0, 0, off, len(data), 0, 0, 4, 0)
            k += 1
        # .symtab, then .strtab, .ksyms.info, .ksyms.modules, .shstrtab
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
        eh = np.frombuffer(front, self.ehdr_t, 1, 0)
        ident = bytes([0x7F, ord("E"), ord("L"), ord("F"), t.elfclass, t.data,
                       EV_CURRENT, 0]) + bytes(8)
        phoff = self.ehdr_t.itemsize if self.phnum else 0
        eh[0] = (ident, ET_EXEC, t.machine, EV_CURRENT, 0, phoff, self.shoff,
                 0, self.ehdr_t.itemsize, self.phdr_t.itemsize, self.phnum,
                 self.shdr_t.itemsize, self.shnum, k + 4)
        ph = np.frombuffer(front, self.phdr_t, self.phnum, self.ehdr_t.itemsize)
        for i, g in enumerate(self.segments):
            ph[i]["p_type"], ph[i]["p_flags"] = g.p_type, g.p_flags
            ph[i]["p_offset"], ph[i]["p_vaddr"], ph[i]["p_paddr"] = g.p_offset, g.p_vaddr, \
                g.p_vaddr
            ph[i]["p_filesz"], ph[i]["p_memsz"], ph[i]["p_align"] = g.p_filesz, g.p_memsz, \
                g.p_align


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


def _sections(table, addr, cls, rank, section_bases, mapping):
    """Group sectioned symbols into address sections; returns (sections, st_shndx, st_size).

    ``mapping``: per symbol (kallsyms order), is it a mapping symbol (sizes.mapping_mask).
    """
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
    pseudo = np.array([bool(i) and is_pseudo_module(m) for i, m in enumerate(table.modules)])
    sz = run_sizes(a, r, SIZE_CAP, unsized(mapping[o], cls[o]),
                   pseudo[table.module[o]])
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
    alloc = np.take(_CLASS_ALLOC, c)
    runs = cut_runs(a, sz, new, alloc, np.take(_CLASS_PROGBITS, c))
    del new, alloc, sz
    firsts = runs.firsts
    mark = np.zeros(len(o), bool)
    mark[firsts] = True
    shndx[o] = np.cumsum(mark, dtype=np.int32)  # 1-based section index per symbol
    del mark
    size[o] = runs.sizes
    keys, kinds, counts = [], [], np.diff(firsts, append=len(o)).tolist()
    mods = table.modules
    lasts = o[np.append(firsts[1:], len(o)) - 1].tolist()
    for f_cls, f_mod, start, f_sym, l_sym in zip(
            c[firsts].tolist(), table.module[o[firsts]].tolist(), a[firsts].tolist(),
            o[firsts].tolist(), lasts):
        base, sh_type, flags = lt.SECTION_KINDS[f_cls]
        if f_mod == 0 and f_cls == lt.TEXT:
            base = kernel_text_base(table.name(f_sym), table.name(l_sym), base)
        keys.append(_section_base(base, mods[f_mod], start, bases))
        kinds.append((sh_type, flags))
    ktext = [i for i, (t, f) in enumerate(kinds) if f & lt.SHF_EXECINSTR and not keys[i][1]]
    if ktext:  # the main kernel text is the biggest run: always ".text" (gdb, perf)
        keys[max(ktext, key=counts.__getitem__)] = (".text", "")
    names = unique_names(keys, counts)
    sections = [Section(nm, t, f, s, e - s) for nm, (t, f), s, e in
                zip(names, kinds, a[firsts].tolist(), runs.ends.tolist())]
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
        b = sorted_unique(np.array(bases[mname][0], np.uint64))
        which = np.searchsorted(b, a[sel], side="right")
        cut[sel[1:]] |= which[1:] != which[:-1]
    return cut


def _section_base(base, mod, start, bases):
    """(base name, module): the module's real section at or below ``start`` if known."""
    if mod and mod in bases:
        vals, tab = bases[mod]
        j = bisect.bisect_right(vals, start) - 1
        if j >= 0:
            return tab[j][1], mod
    return base, mod
