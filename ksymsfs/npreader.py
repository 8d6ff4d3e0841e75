"""The numpy image reader: headers and symbol table as array views, for images of any size."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from . import letters as lt
from .elfdefs import (
    ELFCLASS32,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFDATA2MSB,
    SHN_LORESERVE,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_SYMTAB,
    STT_FILE,
    ehdr_dtype,
    shdr_dtype,
    sym_dtype,
    word_dtype,
)
from .readbase import (
    INFO_SECTION,
    MODULES_SECTION,
    ImageLike,
    Lookup,
    NlistHit,
    check_address,
    load_bytes,
    n_type_of,
)
from .readbase import fail as _fail
from .sizes import mapping_mask


@dataclass
class Image:
    """A parsed image: headers and the symbol table as numpy views over the bytes.

    What only some readers need (section names, letters, module keys) is decoded on first
    use; ``parse_image`` has checked its bounds already.
    """

    data: bytes
    path: str
    elfclass: int
    byteorder: int
    machine: int
    shdrs: np.ndarray
    shstrtab: bytes | None    # section name table (None: e_shstrndx is 0)
    syms: np.ndarray          # symtab entries without the null entry 0
    strtab: np.ndarray        # uint8 view of the string table
    info: np.ndarray | None   # .ksyms.info word per symbol (letter | module offset << 8)
    modtab: bytes             # .ksyms.modules (b"" without .ksyms.info)
    strtab_off: int = -1      # file offset of the string table in ``data`` (-1: unknown)

    @property
    def section_names(self) -> list[str]:
        if not hasattr(self, "_secnames"):
            tab = self.shstrtab
            self._secnames = [""] * len(self.shdrs) if tab is None else [
                _cstr(tab, n) for n in self.shdrs["sh_name"].tolist()]
        return self._secnames

    @property
    def letters(self) -> np.ndarray | None:
        """uint8 kallsyms letter per symbol, from .ksyms.info (None without it)."""
        if self.info is None:
            return None
        if not hasattr(self, "_letters"):
            self._letters = (self.info & 0xFF).astype(np.uint8)
        return self._letters

    @property
    def modkey(self) -> np.ndarray:
        """Per symbol: offset in .ksyms.modules, or st_shndx (module from section name)."""
        if self.info is None:
            return self.syms["st_shndx"]
        if not hasattr(self, "_modkey"):
            self._modkey = self.info >> 8
        return self._modkey

    def modname(self, k: int) -> str:
        """modkey value -> module name ("" = kernel)."""
        if self.info is not None:
            return _cstr(self.modtab, k)
        if not hasattr(self, "_secmod"):
            self._secmod = [n[n.rindex("[") + 1:-1] if n.endswith("]") and "[" in n else ""
                            for n in self.section_names]
        return self._secmod[k] if k < len(self._secmod) else ""

    def __len__(self) -> int:
        return len(self.syms)

    def module(self, i: int) -> str:
        return self.modname(int(self.modkey[i]))

    @property
    def address_width(self) -> int:
        """Hex digits of an address, as kallsyms prints them."""
        return 8 if self.elfclass == ELFCLASS32 else 16

    @property
    def modules(self) -> list[str]:
        """Module name per symbol index ("" = kernel)."""
        if not hasattr(self, "_modules"):
            cache: dict[int, str] = {}
            self._modules = [cache[k] if k in cache else cache.setdefault(k, self.modname(k))
                             for k in self.modkey.tolist()]
        return self._modules

    def name_heads(self) -> np.ndarray:
        """First four bytes at every symbol's st_name as one little-endian uint32 (cached):
        one gather, after which each name search is a compare. Bytes past a name's NUL are
        whatever follows it (``nlist`` masks them)."""
        if not hasattr(self, "_heads"):
            tab, off = self.strtab, self.strtab_off
            buf = self.data
            if off < 0 or off + len(tab) + 3 > len(buf):  # no 3 bytes to read past the end
                buf, off = np.concatenate((tab, np.zeros(3, np.uint8))).tobytes(), 0
            heads = np.ndarray((len(tab),), "<u4", buf, off, (1,))  # unaligned, overlapping
            self._heads = heads[self.syms["st_name"]]
        return self._heads

    def by_address(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(indices sorted by value, global first; their values)] for the symbols in
        address sections: the real ones, then the ARM/AArch64 mapping symbols (cached)."""
        if not hasattr(self, "_by_addr"):
            s = self.syms
            shndx = s["st_shndx"]
            sectioned = (shndx != SHN_UNDEF) & (shndx < SHN_LORESERVE)
            mapping = mapping_mask(self.strtab, s["st_name"])
            self._by_addr = []
            for sel in (sectioned & ~mapping, sectioned & mapping):
                idx = np.flatnonzero(sel)
                is_local = (s["st_info"][idx] >> 4) == 0
                idx = np.concatenate((idx[~is_local], idx[is_local]))  # globals first
                # stable: ties keep that order (timsort: a kallsyms table is mostly sorted)
                idx = idx[np.argsort(s["st_value"][idx], kind="stable")]
                self._by_addr.append((idx, s["st_value"][idx]))
        return self._by_addr

    def name_lengths(self) -> np.ndarray:
        nul = np.flatnonzero(self.strtab == 0)
        off = self.syms["st_name"].astype(np.int64)
        return nul[np.searchsorted(nul, off)] - off

    def name(self, i: int) -> str:
        """Symbol ``i``'s name; a few names never copy the whole string table."""
        off = int(self.syms["st_name"][i])
        if hasattr(self, "_strtab_bytes"):
            tab = self._strtab_bytes
            return tab[off:tab.index(b"\0", off)].decode("utf-8", "surrogateescape")
        n = 128
        while True:
            chunk = self.strtab[off:off + n].tobytes()
            end = chunk.find(b"\0")
            if end >= 0:
                return chunk[:end].decode("utf-8", "surrogateescape")
            if off + n >= len(self.strtab):
                raise ValueError(f"symbol {i}: name runs past the string table")
            n *= 8

    @property
    def data_strtab(self) -> bytes:
        if not hasattr(self, "_strtab_bytes"):
            self._strtab_bytes = self.strtab.tobytes()
        return self._strtab_bytes

    def names(self) -> list[str]:
        tab = self.data_strtab
        off = self.syms["st_name"].tolist()
        ends = (self.syms["st_name"] + self.name_lengths()).tolist()
        return [tab[a:b].decode("utf-8", "surrogateescape") for a, b in zip(off, ends)]


def parse_image(image: ImageLike, path: str | None = None) -> Image:
    """Validate headers and bounds (every offset checked against the file size); errors
    name ``path`` (default: the file's own name)."""
    data, own = load_bytes(image)
    path = path or own
    if len(data) < 16 or data[:4] != b"\x7fELF":
        raise _fail(path, "no ELF magic" if data else "empty file")
    cls, order = data[4], data[5]
    if cls not in (ELFCLASS32, ELFCLASS64) or order not in (ELFDATA2LSB, ELFDATA2MSB):
        raise _fail(path, f"bad ELF class {cls} or byte order {order}")
    eh_t, sh_t = ehdr_dtype(cls, order), shdr_dtype(cls, order)
    if len(data) < eh_t.itemsize:
        raise _fail(path, "truncated ELF header")
    eh = np.frombuffer(data, eh_t, 1)[0]
    shoff, shnum, shentsize = int(eh["e_shoff"]), int(eh["e_shnum"]), int(eh["e_shentsize"])
    if shentsize != sh_t.itemsize or shnum == 0 or shnum >= SHN_LORESERVE:
        raise _fail(path, f"bad section header table (e_shentsize {shentsize}, e_shnum {shnum})")
    if shoff + shnum * shentsize > len(data):
        raise _fail(path, "section header table extends past end of file")
    sh = np.frombuffer(data, sh_t, shnum, shoff)
    shstrtab = _section_name_table(data, path, sh, int(eh["e_shstrndx"]))
    symtabs = np.flatnonzero(sh["sh_type"] == SHT_SYMTAB)
    if len(symtabs) == 0:
        raise _fail(path, "no .symtab section")
    st = sh[symtabs[0]]
    sym_t = sym_dtype(cls, order)
    off, size = int(st["sh_offset"]), int(st["sh_size"])
    if off + size > len(data) or size % sym_t.itemsize or size == 0:
        raise _fail(path, ".symtab extends past end of file or has a partial entry")
    syms = np.frombuffer(data, sym_t, size // sym_t.itemsize, off)[1:]
    link = int(st["sh_link"])
    strtab = _section_bytes(data, path, sh, link, ".strtab")
    if len(strtab) == 0 or strtab[-1] != 0:
        raise _fail(path, "string table is empty or not NUL-terminated")
    if len(syms) and int(syms["st_name"].max()) >= len(strtab):
        raise _fail(path, "symbol name offset past end of string table")
    shndx = syms["st_shndx"]
    # st_shndx in [shnum, SHN_LORESERVE) is bad: shifted by -shnum (mod 2**16), those are
    # exactly the values below SHN_LORESERVE - shnum; one pass and a min
    if len(syms) and int((shndx - np.uint16(shnum)).min()) < SHN_LORESERVE - shnum:
        bad = (shndx >= shnum) & (shndx < SHN_LORESERVE)
        raise _fail(path, f"symbol {int(np.flatnonzero(bad)[0]) + 1} refers to "
                          f"section {int(shndx[bad][0])} of {shnum}")
    info, modtab = _ksyms_info(data, path, sh, shstrtab, len(syms), order)
    return Image(data, path, cls, order, int(eh["e_machine"]), sh, shstrtab, syms, strtab,
                 info, modtab, int(sh[link]["sh_offset"]))


def _section_bytes(data, path, sh, idx, what) -> np.ndarray:
    if idx <= 0 or idx >= len(sh):
        raise _fail(path, f"{what} section index {idx} out of range")
    off, size = int(sh[idx]["sh_offset"]), int(sh[idx]["sh_size"])
    if sh[idx]["sh_type"] == SHT_NOBITS or off + size > len(data):
        raise _fail(path, f"{what} extends past end of file")
    return np.frombuffer(data, np.uint8, size, off)


def _section_name_table(data, path, sh, shstrndx) -> bytes | None:
    """.shstrtab's bytes, every sh_name checked to lie inside it (None: no table)."""
    if shstrndx == 0:
        return None
    tab = _section_bytes(data, path, sh, shstrndx, ".shstrtab").tobytes()
    if int(sh["sh_name"].max()) >= len(tab):
        raise _fail(path, "section name offset past end of .shstrtab")
    return tab


def _cstr(tab: bytes, off: int) -> str:
    """The string at ``off`` up to its NUL (or the end of ``tab``)."""
    end = tab.find(b"\0", off)
    return tab[off:end if end >= 0 else len(tab)].decode("utf-8", "surrogateescape")


def _section_index(sh, shstrtab: bytes | None, name: str) -> int:
    """Index of the first section named ``name``, or -1 (no name decoded but these)."""
    if shstrtab is None:
        return -1
    want = name.encode()
    offs, p = [], shstrtab.find(want)
    while p >= 0:  # every place the name ends at a NUL or at the end: sh_name may share
        end = p + len(want)
        if end == len(shstrtab) or shstrtab[end] == 0:
            offs.append(p)
        p = shstrtab.find(want, p + 1)
    hit = np.flatnonzero(np.isin(sh["sh_name"], offs)) if offs else []
    return int(hit[0]) if len(hit) else -1


def _ksyms_info(data, path, sh, shstrtab, nsyms, order):
    """(.ksyms.info word per symbol, .ksyms.modules bytes) when both are present and
    match the symbol table, else (None, b"") (modules then come from section names)."""
    k_info = _section_index(sh, shstrtab, INFO_SECTION)
    k_mods = _section_index(sh, shstrtab, MODULES_SECTION)
    if k_info < 0 or k_mods < 0:
        return None, b""
    info = _section_bytes(data, path, sh, k_info, INFO_SECTION)
    mods = _section_bytes(data, path, sh, k_mods, MODULES_SECTION)
    if len(info) == 4 * (nsyms + 1) and len(mods) and mods[-1] == 0:
        words = info.view(word_dtype(order))[1:]
        if len(words) and int(words.max()) >> 8 >= len(mods):
            raise _fail(path, f"{INFO_SECTION} refers past end of {MODULES_SECTION}")
        return words, mods.tobytes()
    raise _fail(path, f"{INFO_SECTION} does not match .symtab")


def letter_of(img: Image, i: int) -> str:
    """The symbol's kallsyms letter (stored, or what nm would print)."""
    if img.letters is not None:
        return chr(int(img.letters[i]))
    s = img.syms[i]
    shndx, bind, typ = int(s["st_shndx"]), int(s["st_info"]) >> 4, int(s["st_info"]) & 15
    sh_type = sh_flags = 0
    sname = ""
    if 0 < shndx < len(img.shdrs):
        sh_type, sh_flags = int(img.shdrs[shndx]["sh_type"]), int(img.shdrs[shndx]["sh_flags"])
        sname = img.section_names[shndx]
    return lt.nm_letter(shndx, bind, typ, sh_type, sh_flags, sname)


def nlist_type(img: Image, i: int) -> int:
    """n_type exactly as libbsd's elf_sym_to_nlist() computes it."""
    s = img.syms[i]
    shndx, info = int(s["st_shndx"]), int(s["st_info"])
    sh_type = sh_flags = 0
    if 0 < shndx < len(img.shdrs):
        sh_type, sh_flags = int(img.shdrs[shndx]["sh_type"]), int(img.shdrs[shndx]["sh_flags"])
    return n_type_of(shndx, info >> 4, info & 15, len(img.shdrs), sh_type, sh_flags)


_FEW = 16  # candidates compared as bytes rather than array by array


def _find_name(img: Image, want: bytes) -> np.ndarray:
    """Indices of symbols named exactly ``want`` (st_name -> want, then a NUL, inside the
    string table): the first four bytes (NUL included) at once, then byte by byte."""
    if not want:
        return np.zeros(0, np.int64)
    pat = want + b"\0"
    head = pat[:4]
    key = int.from_bytes(head, "little")
    heads = img.name_heads()
    if len(head) == 4:
        cand = np.flatnonzero(heads == np.uint32(key))
    else:
        cand = np.flatnonzero((heads & np.uint32((1 << 8 * len(head)) - 1)) == np.uint32(key))
    if len(pat) <= 4 or len(cand) == 0:
        return cand
    off = img.syms["st_name"][cand].astype(np.int64)
    keep = off + len(want) < len(img.strtab)
    cand, off = cand[keep], off[keep]
    for j in [len(want), *range(4, len(want))]:  # the NUL first: it drops the most
        if len(cand) <= _FEW:
            break
        keep = img.strtab[off + j] == pat[j]
        cand, off = cand[keep], off[keep]
    tab = img.strtab
    found = [i for i, o in zip(cand.tolist(), off.tolist())
             if tab[o:o + len(pat)].tobytes() == pat]
    return np.array(found, np.int64)


def nlist(image: ImageLike | Image, names: Iterable[str]) -> dict[str, list[NlistHit]]:
    """BSD nlist(3): each name -> every matching symbol (``_foo`` also matches ``foo``).

    An empty list means not found (nlist(3) would leave n_type N_UNDF and n_value 0).
    """
    img = image if isinstance(image, Image) else parse_image(image)
    out: dict[str, list[NlistHit]] = {}
    for n in names:
        b = n.encode("utf-8", "surrogateescape")
        idx = _find_name(img, b)
        if b.startswith(b"_"):
            idx = np.union1d(idx, _find_name(img, b[1:]))
        out[n] = [NlistHit(n, img.name(i), int(img.syms["st_value"][i]), nlist_type(img, i),
                           img.module(i)) for i in sorted(idx.tolist())]
    return out


def locate(img: Image, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(symbol index or -1, offset) per uint64 address, by the rule of ``lookup``."""
    hit = np.full(len(addrs), -1, np.int64)
    off = np.zeros(len(addrs), np.uint64)
    for idx, vals in img.by_address():
        todo = np.flatnonzero(hit < 0)
        if len(todo) == 0 or len(vals) == 0:
            break
        q = addrs[todo]
        k = np.searchsorted(vals, q, side="right") - 1
        has = k >= 0
        todo, q, k = todo[has], q[has], k[has]
        k = np.searchsorted(vals, vals[k], side="left")  # first (global) at that value
        i = idx[k]
        o = q - vals[k]
        inside = o < np.maximum(img.syms["st_size"][i].astype(np.uint64), np.uint64(1))
        hit[todo[inside]] = i[inside]
        off[todo[inside]] = o[inside]
    return hit, off


def lookup(image: ImageLike | Image, addrs: Iterable[int]) -> list[Lookup | None]:
    """Symbol containing each address: greatest st_value <= addr with addr < value+size.

    Only symbols in address sections count (not SHN_ABS/SHN_UNDEF); among symbols at one
    address a global one is preferred. A size-0 symbol matches only its exact address.
    ARM/AArch64 mapping symbols ($a, $d, $x.N, ...) answer only where no other symbol
    does.
    """
    img = image if isinstance(image, Image) else parse_image(image)
    want = list(addrs)
    for a in want:
        check_address(a)
    hit, off = locate(img, np.array(want, np.uint64))
    res: list[Lookup | None] = []
    for a, i, o in zip(want, hit.tolist(), off.tolist()):
        res.append(None if i < 0 else
                   Lookup(a, img.name(i), o, int(img.syms["st_size"][i]), img.module(i)))
    return res


def dump_lines(image: ImageLike | Image, width: int | None = None) -> Iterable[str]:
    """The image back as kallsyms text lines (symtab order), module suffixes included."""
    img = image if isinstance(image, Image) else parse_image(image)
    w = width or img.address_width
    names = img.names()
    vals = img.syms["st_value"].tolist()
    if img.letters is not None:
        lets = [chr(c) for c in img.letters.tolist()]
    else:
        lets = [letter_of(img, i) for i in range(len(img))]
    info = img.syms["st_info"].tolist()
    for v, c, n, m, inf in zip(vals, lets, names, img.modules, info):
        if inf & 15 == STT_FILE and img.letters is None:
            continue
        yield f"{v:0{w}x} {c} {n}\t[{m}]" if m else f"{v:0{w}x} {c} {n}"
