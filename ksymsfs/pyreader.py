"""The pure-Python image reader (struct, no numpy): nlist and lookup on small images, fast to start.

It checks what npreader.parse_image checks, with the same messages, and answers
``nlist``/``lookup`` identically (tests/test_startup.py compares both on every dump).
Anything else asked of a PyImage is answered by the numpy reader, parsed on first use.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable
from typing import Any

from .readbase import (
    ELFCLASS32,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFDATA2MSB,
    INFO_SECTION,
    MODULES_SECTION,
    SHN_LORESERVE,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_SYMTAB,
    Lookup,
    NlistHit,
    check_address,
    fail,
    is_mapping_symbol,
    n_type_of,
)

# field layouts (elf.h order); _SHDR: name type flags addr offset size link info align entsize
_EHDR = {ELFCLASS32: "16xHHIIIIIHHHHHH", ELFCLASS64: "16xHHIQQQIHHHHHH"}
_SHDR = {ELFCLASS32: "IIIIIIIIII", ELFCLASS64: "IIQQQQIIQQ"}
_SYM = {ELFCLASS32: "IIIBBH", ELFCLASS64: "IBBHQQ"}  # reordered to one tuple shape below


class PyImage:
    """A parsed image as plain tuples: (name, value, size, info, shndx) per symbol."""

    def __init__(self, data: bytes, path: str):
        self.data, self.path = data, path
        if len(data) < 16 or data[:4] != b"\x7fELF":
            raise fail(path, "no ELF magic" if data else "empty file")
        cls, order = data[4], data[5]
        if cls not in (ELFCLASS32, ELFCLASS64) or order not in (ELFDATA2LSB, ELFDATA2MSB):
            raise fail(path, f"bad ELF class {cls} or byte order {order}")
        self.elfclass, self.byteorder = cls, order
        e = "<" if order == ELFDATA2LSB else ">"
        eh = struct.Struct(e + _EHDR[cls])
        if len(data) < eh.size:
            raise fail(path, "truncated ELF header")
        (_, self.machine, _, _, _, shoff, _, _, _, _, shentsize, shnum,
         shstrndx) = eh.unpack_from(data)
        sh = struct.Struct(e + _SHDR[cls])
        if shentsize != sh.size or shnum == 0 or shnum >= SHN_LORESERVE:
            raise fail(path, f"bad section header table (e_shentsize {shentsize}, "
                             f"e_shnum {shnum})")
        if shoff + shnum * shentsize > len(data):
            raise fail(path, "section header table extends past end of file")
        self._shdrs = [sh.unpack_from(data, shoff + k * sh.size) for k in range(shnum)]
        self._secnames = self._section_names(shstrndx)
        self._read_symtab(e)

    def _section_bytes(self, idx: int, what: str) -> bytes:
        if idx <= 0 or idx >= len(self._shdrs):
            raise fail(self.path, f"{what} section index {idx} out of range")
        s = self._shdrs[idx]
        off, size = s[4], s[5]
        if s[1] == SHT_NOBITS or off + size > len(self.data):
            raise fail(self.path, f"{what} extends past end of file")
        return self.data[off:off + size]

    def _section_names(self, shstrndx: int) -> list[str]:
        if shstrndx == 0:
            return [""] * len(self._shdrs)
        tab = self._section_bytes(shstrndx, ".shstrtab")
        out = []
        for s in self._shdrs:
            n = s[0]
            if n >= len(tab):
                raise fail(self.path, "section name offset past end of .shstrtab")
            end = tab.find(b"\0", n)
            out.append(tab[n:end if end >= 0 else len(tab)].decode("utf-8", "surrogateescape"))
        return out

    def _read_symtab(self, e: str) -> None:
        path, data, cls = self.path, self.data, self.elfclass
        symtabs = [k for k, s in enumerate(self._shdrs) if s[1] == SHT_SYMTAB]
        if not symtabs:
            raise fail(path, "no .symtab section")
        st = self._shdrs[symtabs[0]]
        sym = struct.Struct(e + _SYM[cls])
        off, size = st[4], st[5]
        if off + size > len(data) or size % sym.size or size == 0:
            raise fail(path, ".symtab extends past end of file or has a partial entry")
        rows = list(sym.iter_unpack(data[off + sym.size:off + size]))
        if cls == ELFCLASS32:  # (name, value, size, info, other, shndx)
            self._syms = [(r[0], r[1], r[2], r[3], r[5]) for r in rows]
        else:                  # (name, info, other, shndx, value, size)
            self._syms = [(r[0], r[4], r[5], r[1], r[3]) for r in rows]
        self._strtab = self._section_bytes(st[6], ".strtab")
        if len(self._strtab) == 0 or self._strtab[-1] != 0:
            raise fail(path, "string table is empty or not NUL-terminated")
        if self._syms and max(s[0] for s in self._syms) >= len(self._strtab):
            raise fail(path, "symbol name offset past end of string table")
        nsec = len(self._shdrs)
        for k, s in enumerate(self._syms):
            if nsec <= s[4] < SHN_LORESERVE:
                raise fail(path, f"symbol {k + 1} refers to section {s[4]} of {nsec}")
        self._module_of = self._ksyms_modules(e)

    def _ksyms_modules(self, e: str):
        """Module name per symbol, from .ksyms.info/.ksyms.modules or section names."""
        names = self._secnames
        if INFO_SECTION in names and MODULES_SECTION in names:
            info = self._section_bytes(names.index(INFO_SECTION), INFO_SECTION)
            mods = self._section_bytes(names.index(MODULES_SECTION), MODULES_SECTION)
            n = len(self._syms)
            if len(info) == 4 * (n + 1) and len(mods) and mods[-1] == 0:
                words = struct.unpack(f"{e}{n + 1}I", info)[1:]
                if words and max(words) >> 8 >= len(mods):
                    raise fail(self.path, f"{INFO_SECTION} refers past end of {MODULES_SECTION}")
                return lambda i: _cstr(mods, words[i] >> 8)
            raise fail(self.path, f"{INFO_SECTION} does not match .symtab")
        secmod = [n[n.rindex("[") + 1:-1] if n.endswith("]") and "[" in n else "" for n in names]
        return lambda i: secmod[self._syms[i][4]] if self._syms[i][4] < len(secmod) else ""

    def __len__(self) -> int:
        return len(self._syms)

    @property
    def address_width(self) -> int:
        """Hex digits of an address, as kallsyms prints them."""
        return 8 if self.elfclass == ELFCLASS32 else 16

    def name(self, i: int) -> str:
        return _cstr(self._strtab, self._syms[i][0])

    def module(self, i: int) -> str:
        return self._module_of(i)

    def nlist_type(self, i: int) -> int:
        _, _, _, info, shndx = self._syms[i]
        sh_type = sh_flags = 0
        if 0 < shndx < len(self._shdrs):
            sh_type, sh_flags = self._shdrs[shndx][1], self._shdrs[shndx][2]
        return n_type_of(shndx, info >> 4, info & 15, len(self._shdrs), sh_type, sh_flags)

    def nlist(self, names: Iterable[str]) -> dict[str, list[NlistHit]]:
        by_name: dict[bytes, list[int]] = {}
        tab = self._strtab
        for i, s in enumerate(self._syms):
            by_name.setdefault(tab[s[0]:tab.index(b"\0", s[0])], []).append(i)
        out: dict[str, list[NlistHit]] = {}
        for n in names:
            b = n.encode("utf-8", "surrogateescape")
            idx = set(by_name.get(b, [])) if b else set()
            if b.startswith(b"_") and len(b) > 1:
                idx |= set(by_name.get(b[1:], []))
            out[n] = [NlistHit(n, self.name(i), self._syms[i][1], self.nlist_type(i),
                               self.module(i)) for i in sorted(idx)]
        return out

    def _by_address(self) -> list[tuple[list[int], list[int]]]:
        """As npreader's Image.by_address: real symbols, then mapping symbols."""
        if not hasattr(self, "_by_addr"):
            real, mapping = [], []
            for i, (nm, value, _, info, shndx) in enumerate(self._syms):
                if shndx != SHN_UNDEF and shndx < SHN_LORESERVE:
                    mapping_name = is_mapping_symbol(_cbytes(self._strtab, nm))
                    (mapping if mapping_name else real).append((value, (info >> 4) == 0, i))
            self._by_addr = []
            for lst in (real, mapping):
                lst.sort()
                self._by_addr.append(([i for _, _, i in lst], [v for v, _, _ in lst]))
        return self._by_addr

    def lookup(self, addrs: Iterable[int]) -> list[Lookup | None]:
        res: list[Lookup | None] = []
        for a in addrs:
            check_address(a)
            res.append(None)
            for idx, vals in self._by_address():
                k = bisect.bisect_right(vals, a) - 1
                if k < 0:
                    continue
                k = bisect.bisect_left(vals, vals[k])
                i = idx[k]
                size = self._syms[i][2]
                if a - vals[k] < max(size, 1):
                    res[-1] = Lookup(a, self.name(i), a - vals[k], size, self.module(i))
                    break
        return res

    def full(self) -> Any:
        """The same image parsed by the numpy reader (cached)."""
        if "_full" not in self.__dict__:
            from .npreader import parse_image
            self._full = parse_image(self.data)
            self._full.path = self.path
        return self._full

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "data":  # private or not yet set: never delegated
            raise AttributeError(name)
        return getattr(self.full(), name)


def _cbytes(tab: bytes, off: int) -> bytes:
    return tab[off:tab.index(b"\0", off)]


def _cstr(tab: bytes, off: int) -> str:
    return _cbytes(tab, off).decode("utf-8", "surrogateescape")
