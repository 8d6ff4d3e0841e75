"""How each kallsyms/nm type letter is encoded in ELF, and decoded back the way nm does."""

from __future__ import annotations

import numpy as np

from .elfdefs import (
    ELF_ST_INFO,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_WRITE,
    SHN_ABS,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_PROGBITS,
    STB_GLOBAL,
    STB_GNU_UNIQUE,
    STB_LOCAL,
    STB_WEAK,
    STT_FUNC,
    STT_GNU_IFUNC,
    STT_NOTYPE,
    STT_OBJECT,
)

# Section classes. A symbol lands in a section of its class; ABS and UNDEF take no section.
UNDEF, ABS, TEXT, RODATA, DATA, BSS, UNKNOWN, DEBUG, NONALLOC = range(9)

# class -> (section base name, sh_type, sh_flags). nm's letter comes from these flags
# (bfd/syms.c): EXECINSTR -> t, PROGBITS+ALLOC+WRITE -> d, PROGBITS+ALLOC -> r,
# NOBITS -> b, ".debug*" -> N, other read-only -> n, other writable -> '?'.
SECTION_KINDS = {
    TEXT: (".text", SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR),
    RODATA: (".rodata", SHT_PROGBITS, SHF_ALLOC),
    DATA: (".data", SHT_PROGBITS, SHF_ALLOC | SHF_WRITE),
    BSS: (".bss", SHT_NOBITS, SHF_ALLOC | SHF_WRITE),
    UNKNOWN: (".unknown", SHT_PROGBITS, SHF_WRITE),
    DEBUG: (".debug_ksyms", SHT_PROGBITS, 0),
    NONALLOC: (".nonalloc", SHT_PROGBITS, 0),
}

# letter -> (class, st_bind, st_type). Exact under nm: T t D d B b R r A a W V U ? N n i u
# (U prints without its address). Approximate: G g -> D d, S s -> B b, C c -> B b,
# w v -> weak undefined (nm w/v, address not shown).
LETTERS = {
    "T": (TEXT, STB_GLOBAL, STT_FUNC), "t": (TEXT, STB_LOCAL, STT_FUNC),
    "W": (TEXT, STB_WEAK, STT_FUNC), "i": (TEXT, STB_GLOBAL, STT_GNU_IFUNC),
    "R": (RODATA, STB_GLOBAL, STT_OBJECT), "r": (RODATA, STB_LOCAL, STT_OBJECT),
    "D": (DATA, STB_GLOBAL, STT_OBJECT), "d": (DATA, STB_LOCAL, STT_OBJECT),
    "G": (DATA, STB_GLOBAL, STT_OBJECT), "g": (DATA, STB_LOCAL, STT_OBJECT),
    "V": (DATA, STB_WEAK, STT_OBJECT), "u": (DATA, STB_GNU_UNIQUE, STT_OBJECT),
    "B": (BSS, STB_GLOBAL, STT_OBJECT), "b": (BSS, STB_LOCAL, STT_OBJECT),
    "S": (BSS, STB_GLOBAL, STT_OBJECT), "s": (BSS, STB_LOCAL, STT_OBJECT),
    "C": (BSS, STB_GLOBAL, STT_OBJECT), "c": (BSS, STB_LOCAL, STT_OBJECT),
    "A": (ABS, STB_GLOBAL, STT_NOTYPE), "a": (ABS, STB_LOCAL, STT_NOTYPE),
    "U": (UNDEF, STB_GLOBAL, STT_NOTYPE),
    "w": (UNDEF, STB_WEAK, STT_NOTYPE), "v": (UNDEF, STB_WEAK, STT_OBJECT),
    "?": (UNKNOWN, STB_LOCAL, STT_NOTYPE),
    "N": (DEBUG, STB_LOCAL, STT_NOTYPE), "n": (NONALLOC, STB_LOCAL, STT_NOTYPE),
}
# Letters whose nm output is byte-identical to the input line (address, letter, name).
NM_EXACT = set("TtDdBbRrAaWV?Nniu")

# Lookup tables indexed by the letter's byte value (255 = not a letter we accept).
LETTER_CLASS = np.full(256, 255, np.uint8)
LETTER_INFO = np.zeros(256, np.uint8)
for _ch, (_cls, _bind, _typ) in LETTERS.items():
    LETTER_CLASS[ord(_ch)] = _cls
    LETTER_INFO[ord(_ch)] = ELF_ST_INFO(_bind, _typ)


def nm_letter(shndx: int, bind: int, typ: int, sh_type: int, sh_flags: int, sh_name: str) -> str:
    """The letter binutils nm prints for an ELF symbol (bfd_decode_symclass, defined symbols)."""
    if shndx == SHN_UNDEF:
        if bind == STB_WEAK:
            return "v" if typ == STT_OBJECT else "w"
        return "U"
    if typ == STT_GNU_IFUNC:
        return "i"
    if bind == STB_WEAK:
        return "V" if typ == STT_OBJECT else "W"
    if bind == STB_GNU_UNIQUE:
        return "u"
    if shndx == SHN_ABS:
        c = "a"
    elif sh_flags & SHF_EXECINSTR:
        c = "t"
    elif sh_type == SHT_NOBITS:
        c = "b"
    elif sh_flags & SHF_ALLOC:
        c = "d" if sh_flags & SHF_WRITE else "r"
    elif sh_name.startswith(".debug"):
        return "N"
    elif sh_flags & SHF_WRITE:
        return "?"
    else:
        c = "n"
    return c.upper() if bind != STB_LOCAL else c
