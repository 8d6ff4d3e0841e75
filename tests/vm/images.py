"""One kernel state's symbols in kallsyms order, from text lines, a SymbolTable or a served
image (its .symtab/.strtab/.ksyms.* only: never the zeros of the address sections)."""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ksymsfs.elfdefs import ehdr_dtype, shdr_dtype, sym_dtype, word_dtype
from ksymsfs.readbase import INFO_SECTION, MODULES_SECTION, SHT_SYMTAB

_MOD_IDS: dict[str, int] = {"": 0}   # module name -> id, shared by every Syms of a process


def mod_id(name: str) -> int:
    return _MOD_IDS.setdefault(name, len(_MOD_IDS))


def mod_name(i: int) -> str:
    return next(k for k, v in _MOD_IDS.items() if v == i)


@dataclass
class Syms:
    """Symbols in kallsyms order; ``modules``: the /proc/modules names read with them."""

    addr: np.ndarray      # uint64
    letter: np.ndarray    # uint8
    mod: np.ndarray       # uint32 mod_id()
    names: list[bytes]
    modules: list[str] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, idx: np.ndarray) -> list[tuple[int, str, str]]:
        """(address, letter, name) of a few symbols (the churned ones)."""
        return [(a, chr(c), self.names[i].decode("utf-8", "surrogateescape"))
                for i, a, c in zip(idx.tolist(), self.addr[idx].tolist(),
                                   self.letter[idx].tolist())]

    def key(self, keep: np.ndarray | None = None) -> tuple[bytes, ...]:
        """The kept symbols as bytes, order included: equal keys, equal symbol sequences."""
        if keep is None:
            return (self.addr.tobytes(), self.letter.tobytes(), self.mod.tobytes(),
                    b"\0".join(self.names))
        return (self.addr[keep].tobytes(), self.letter[keep].tobytes(),
                self.mod[keep].tobytes(),
                b"\0".join(itertools.compress(self.names, keep.tolist())))

    def counter(self, keep: np.ndarray | None = None) -> Counter:
        """The kept symbols as a multiset of (address, letter, name, module id)."""
        keep = np.ones(len(self), bool) if keep is None else keep
        return Counter(zip(self.addr[keep].tolist(), self.letter[keep].tolist(),
                           itertools.compress(self.names, keep.tolist()),
                           self.mod[keep].tolist()))


def from_lines(lines: list[str], modules: list[str] | None = None) -> Syms:
    """kallsyms text lines ("ADDR L NAME[\\tMODULE]"), parsed here, not by ksymsfs."""
    addr, letter, mod, names = [], [], [], []
    for ln in lines:
        head, _, tail = ln.partition("\t")
        a, c, n = head.split(" ", 2)
        addr.append(int(a, 16))
        letter.append(ord(c))
        names.append(n.encode("utf-8", "surrogateescape"))
        mod.append(mod_id(tail[1:-1]) if tail else 0)
    return Syms(np.array(addr, np.uint64), np.array(letter, np.uint8),
                np.array(mod, np.uint32), names, modules)


def from_table(table, modules: list[str] | None = None) -> Syms:
    """A ksymsfs SymbolTable (kallsyms order already; strtab = b"\\0" + b"name\\0" * N)."""
    ids = np.array([mod_id(m) for m in table.modules], np.uint32)
    names = _names(bytes(table.strtab), np.asarray(table.name_off))
    return Syms(np.asarray(table.addr, np.uint64), np.asarray(table.letter, np.uint8),
                np.take(ids, table.module), names, modules)


def _names(strtab: bytes, offs: np.ndarray) -> list[bytes]:
    """Names at ``offs``: one split when the table is exactly the names in this order (its
    only NULs are the leading one and one after each name, and each strictly increasing
    offset follows a NUL), else one slice per symbol."""
    tab = np.frombuffer(strtab, np.uint8)
    offs = offs.astype(np.int64)
    if (len(tab) and tab[0] == 0 and tab[-1] == 0
            and len(tab) - np.count_nonzero(tab) == len(offs) + 1
            and (len(offs) == 0 or (offs[0] >= 1 and bool((np.diff(offs) > 0).all())
                                    and not tab[offs - 1].any()))):
        return strtab[1:-1].split(b"\0") if len(offs) else []
    return [strtab[o:strtab.index(b"\0", o)] for o in offs.tolist()]


def _pread(fd: int, n: int, off: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = os.pread(fd, n - len(out), off + len(out))
        if not b:
            raise ValueError(f"short read at {off + len(out)}")
        out += b
    return bytes(out)


def from_image(path: str) -> Syms:
    """The symbols of one open of ``path``: its ELF header, section headers, .symtab, its
    strings, .ksyms.info and .ksyms.modules, each read with pread (nothing else)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _parse(lambda n, off: _pread(fd, n, off))
    finally:
        os.close(fd)


def from_bytes(data: bytes) -> Syms:
    """The symbols of an image held in memory (same parts as from_image)."""
    return _parse(lambda n, off: data[off:off + n])


def _parse(read) -> Syms:
    ident = read(16, 0)
    cls, order = ident[4], ident[5]
    eh = np.frombuffer(read(ehdr_dtype(cls, order).itemsize, 0), ehdr_dtype(cls, order))[0]
    sh_t = shdr_dtype(cls, order)
    sh = np.frombuffer(read(int(eh["e_shnum"]) * sh_t.itemsize, int(eh["e_shoff"])), sh_t)

    def part(i: int) -> bytes:
        return read(int(sh[i]["sh_size"]), int(sh[i]["sh_offset"]))
    shstr = part(int(eh["e_shstrndx"]))
    secnames = [shstr[o:shstr.index(b"\0", o)].decode() for o in sh["sh_name"].tolist()]
    st = int(np.flatnonzero(sh["sh_type"] == SHT_SYMTAB)[0])
    raw = [part(st), part(int(sh[st]["sh_link"])), part(secnames.index(INFO_SECTION)),
           part(secnames.index(MODULES_SECTION))]
    syms = np.frombuffer(raw[0], sym_dtype(cls, order))[1:]
    words = np.frombuffer(raw[2], word_dtype(order))[1:]
    if len(words) != len(syms):
        raise ValueError(f"{INFO_SECTION}: {len(words)} entries for {len(syms)} symbols")
    kallsyms_order = np.argsort(syms["st_name"], kind="stable")
    modoff, inverse = np.unique(words[kallsyms_order] >> 8, return_inverse=True)
    modtab = raw[3]
    ids = np.array([mod_id(modtab[o:modtab.index(b"\0", o)].decode("utf-8", "surrogateescape"))
                    for o in modoff.tolist()], np.uint32)
    return Syms(syms["st_value"][kallsyms_order].astype(np.uint64),
                        (words[kallsyms_order] & 0xFF).astype(np.uint8),
                        np.take(ids, inverse.reshape(-1)),
                        _names(raw[1], syms["st_name"][kallsyms_order].astype(np.int64)))


def same_symbols(got: Syms, keep: np.ndarray, want: Syms, want_key: tuple,
                 want_counter) -> str:
    """"" iff the kept symbols are ``want``'s: the same sequence (fast), else the same
    multiset (``want_counter()``, slow, only then); otherwise what differs."""
    if got.key(keep) == want_key:
        return ""
    have, base = got.counter(keep), want_counter()
    if have == base:
        return ""
    bad = (base - have) + (have - base)
    sample = [(f"{a:016x}", chr(c), n.decode("utf-8", "surrogateescape"), mod_name(m),
               "missing" if base[(a, c, n, m)] > have[(a, c, n, m)] else "extra")
              for a, c, n, m in list(bad)[:3]]
    return f"{sum(bad.values())} symbols differ from the quiet kernel's: {sample}"
