"""nlist's name matching on hand-made string tables: shared suffixes, prefixes, duplicates,
names at offset 0/1, short names, a string table at the very end of the file.

Each image is written here byte by byte (not by ksymsfs), and the expected hits come from a
plain reading of every symbol's name; both readers (numpy and pure Python) must give them.
"""

from __future__ import annotations

import struct

import pytest

from ksymsfs import reader
from ksymsfs.elfdefs import ELFCLASS32, ELFCLASS64, ELFDATA2LSB, ELFDATA2MSB

SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_NOBITS = 1, 2, 3, 8
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
SHN_ABS = 0xFFF1
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
# (name, type, flags) of sections 1..3; .symtab, .strtab, .shstrtab follow
SECTIONS = [(".text", SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR),
            (".data", SHT_PROGBITS, SHF_ALLOC | SHF_WRITE), (".bss", SHT_NOBITS, SHF_ALLOC)]


def elf(strtab: bytes, syms: list[tuple[int, int, int, int]], cls: int, order: int,
        tail: bytes = b"") -> bytes:
    """An ET_EXEC image: ehdr, shdrs, .shstrtab, .symtab, then .strtab (then ``tail``).

    ``syms``: (st_name, bind, st_shndx, st_value) per symbol after the null entry.
    """
    e = "<" if order == ELFDATA2LSB else ">"
    is64 = cls == ELFCLASS64
    ehsize, shentsize, symsize = (64, 64, 24) if is64 else (52, 40, 16)
    names = [s[0] for s in SECTIONS] + [".symtab", ".strtab", ".shstrtab"]
    shstr, name_off = b"\0", []
    for n in names:
        name_off.append(len(shstr))
        shstr += n.encode() + b"\0"
    nsec = 1 + len(names)
    shoff = ehsize
    shstr_off = shoff + nsec * shentsize
    sym_off = shstr_off + len(shstr)
    sym_off += -sym_off % 8
    nlocal = 1 + sum(1 for s in syms if s[1] == STB_LOCAL)
    ordered = sorted(syms, key=lambda s: s[1] != STB_LOCAL)  # locals first, stable
    assert ordered == syms, "write locals first"
    symtab = bytes(symsize)
    for name, bind, shndx, value in syms:
        info = bind << 4 | (2 if shndx == 1 else 1)  # FUNC in .text, else OBJECT
        symtab += (struct.pack(e + "IBBHQQ", name, info, 0, shndx, value, 0) if is64 else
                   struct.pack(e + "IIIBBH", name, value, 0, info, 0, shndx))
    str_off = sym_off + len(symtab)
    shdr = (lambda *f: struct.pack(e + "IIQQQQIIQQ", *f)) if is64 else \
        (lambda *f: struct.pack(e + "IIIIIIIIII", *f))
    hdrs = [shdr(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    for k, (_, typ, flags) in enumerate(SECTIONS):
        hdrs.append(shdr(name_off[k], typ, flags, 0x1000 * (k + 1), 0, 0, 0, 0, 1, 0))
    k = len(SECTIONS)
    hdrs.append(shdr(name_off[k], SHT_SYMTAB, 0, 0, sym_off, len(symtab), nsec - 2, nlocal,
                     8, symsize))
    hdrs.append(shdr(name_off[k + 1], SHT_STRTAB, 0, 0, str_off, len(strtab), 0, 0, 1, 0))
    hdrs.append(shdr(name_off[k + 2], SHT_STRTAB, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0))
    ident = b"\x7fELF" + bytes([cls, order, 1, 0]) + bytes(8)
    if is64:
        eh = ident + struct.pack(e + "HHIQQQIHHHHHH", 2, 62, 1, 0, 0, shoff, 0, ehsize, 0, 0,
                                 shentsize, nsec, nsec - 1)
    else:
        eh = ident + struct.pack(e + "HHIIIIIHHHHHH", 2, 3, 1, 0, 0, shoff, 0, ehsize, 0, 0,
                                 shentsize, nsec, nsec - 1)
    out = eh + b"".join(hdrs) + shstr
    out += bytes(sym_off - len(out)) + symtab + strtab + tail
    assert len(out) == str_off + len(strtab) + len(tail)
    return out


def name_at(strtab: bytes, off: int) -> bytes:
    return strtab[off:strtab.index(b"\0", off)]


def expected(strtab: bytes, syms, want: str) -> list[int]:
    """st_value of every symbol nlist must return for ``want``, in symtab order."""
    b = want.encode()
    keys = {b} | ({b[1:]} if b.startswith(b"_") else set())
    keys.discard(b"")
    return [v for name, _, _, v in syms if name_at(strtab, name) in keys]


def table() -> tuple[bytes, list[tuple[int, int, int, int]], list[str]]:
    """A string table whose strings overlap on purpose, the symbols pointing into it, and
    the names to ask for."""
    parts = [b"", b"foo", b"barfoo", b"foobar", b"fo", b"f", b"o", b"_foo", b"__foo",
             b"ab", b"abc", b"abcd", b"abcde", b"abcdx", b"foo", b"x" * 40]
    parts += [b"same_prefix_%03d" % k for k in range(60)] + [b"same_prefix_0420"]
    parts += [b"same_prefiy_%03d" % k for k in range(30)]
    strtab, at = b"", {}
    for p in parts:
        at.setdefault(p, len(strtab))
        if p == b"foo" and p in at and at[p] != len(strtab):
            at[b"foo#2"] = len(strtab)  # the second copy of "foo": another offset
        strtab += p + b"\0"
    strtab += b"tail"  # the last string ends at the table's last byte
    strtab += b"\0"
    at[b"tail"] = len(strtab) - 5
    at[b"ail"] = len(strtab) - 4   # a suffix of the last string, 3 bytes before the end
    at[b"l"] = len(strtab) - 2
    at[b"oo(barfoo)"] = at[b"barfoo"] + 4   # "oo" as the tail of "barfoo"
    at[b"foo(barfoo)"] = at[b"barfoo"] + 3  # "foo" shared with "barfoo"
    at[b"bar(foobar)"] = at[b"foobar"] + 3
    refs = [b"foo", b"foo(barfoo)", b"barfoo", b"foobar", b"bar(foobar)", b"fo", b"f",
            b"o", b"oo(barfoo)", b"_foo", b"__foo", b"ab", b"abc", b"abcd", b"abcde",
            b"abcdx", b"foo#2", b"foo", b"x" * 40, b"tail", b"ail", b"l", b""]
    refs += [b"same_prefix_%03d" % k for k in range(60)] + [b"same_prefix_0420"]
    refs += [b"same_prefiy_%03d" % k for k in range(30)] + [b"same_prefix_042"]
    syms = []
    for k, r in enumerate(refs):
        bind = STB_LOCAL if k < 8 else (STB_GLOBAL, STB_WEAK)[k % 2]
        shndx = (1, 2, 3, SHN_ABS)[k % 4]
        syms.append((at[r], bind, shndx, 0x100000 + 16 * k))
    asks = ["foo", "_foo", "__foo", "___foo", "barfoo", "bar", "oo", "o", "f", "fo", "_fo",
            "ab", "abc", "abcd", "abcde", "abcdx", "abcdy", "abx", "a", "b", "x" * 40,
            "x" * 39, "x" * 41, "tail", "ail", "il", "l", "_l", "", "_", "same_prefix_042",
            "same_prefix_0420", "_same_prefix_007", "same_prefix_04", "same_prefiy_029",
            "same_prefix_", "no_such", "foo\0bar", "\u00e9t\u00e9"]
    return strtab, syms, asks


@pytest.mark.parametrize("cls,order", [(ELFCLASS64, ELFDATA2LSB), (ELFCLASS32, ELFDATA2MSB)])
@pytest.mark.parametrize("tail", [b"", b"\xff" * 64], ids=["strtab-at-eof", "bytes-after"])
def test_nlist_matches_exact_names_only(cls, order, tail) -> None:
    """Each name finds exactly the symbols whose string at st_name is that name (and
    ``_name`` also ``name``), all of them in symtab order, whatever else shares its bytes."""
    strtab, syms, asks = table()
    data = elf(strtab, syms, cls, order, tail)
    want = {a: expected(strtab, syms, a) for a in asks if "\0" not in a}
    assert want["foo"] == [0x100000, 0x100010, 0x100100, 0x100110]  # the table is as meant
    assert want["_foo"] == [0x100000, 0x100010, 0x100090, 0x100100, 0x100110]
    assert want["oo"] == [0x100080] and want["bar"] == [0x100040] and want["l"] == [0x100150]
    for engine in ("numpy", "python"):
        img = reader.parse_image(data, engine=engine)
        got = reader.nlist(img, asks)
        assert list(got) == asks
        for a in want:
            assert [h.n_value for h in got[a]] == want[a], (engine, a)
            assert all(h.n_name == a for h in got[a])
            assert all(h.name.encode() in (a.encode(), a.encode()[1:]) for h in got[a])
    py = reader.parse_image(data, engine="python")
    np_ = reader.parse_image(data, engine="numpy")
    sample = [a for a in asks if "\0" not in a]
    assert reader.nlist(py, sample) == reader.nlist(np_, sample)  # n_type, module too


def test_nlist_name_at_offset_zero() -> None:
    """A string table that does not start with a NUL: st_name 0 is a name like any other."""
    strtab = b"abc\0zabc\0abc\0"
    syms = [(0, STB_GLOBAL, 1, 0x10), (5, STB_GLOBAL, 2, 0x20), (9, STB_GLOBAL, 1, 0x30),
            (4, STB_GLOBAL, 1, 0x40)]
    data = elf(strtab, syms, ELFCLASS64, ELFDATA2LSB)
    for engine in ("numpy", "python"):
        got = reader.nlist(reader.parse_image(data, engine=engine), ["abc", "zabc", "bc"])
        assert [h.n_value for h in got["abc"]] == [0x10, 0x20, 0x30]
        assert [h.n_value for h in got["zabc"]] == [0x40]
        assert got["bc"] == []
