"""What both image readers share, importable without numpy: results, nlist(3) n_type rules."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, Union

from .errors import ConfigError, ImageError

# <nlist.h> / <a.out.h> n_type values, as libbsd's nlist(3) assigns them.
N_UNDF, N_ABS, N_TEXT, N_DATA, N_BSS, N_FN, N_EXT = 0x0, 0x2, 0x4, 0x6, 0x8, 0x1F, 0x1
N_TYPE_NAMES = {N_UNDF: "N_UNDF", N_ABS: "N_ABS", N_TEXT: "N_TEXT", N_DATA: "N_DATA",
                N_BSS: "N_BSS", N_FN: "N_FN"}

# elf.h values the pure-Python reader needs; spelled here so that it imports neither
# numpy nor pyelftools (tests/test_startup.py checks them against elfdefs).
ELFCLASS32, ELFCLASS64, ELFDATA2LSB, ELFDATA2MSB = 1, 2, 1, 2
SHT_PROGBITS, SHT_SYMTAB, SHT_NOBITS = 1, 2, 8
SHF_WRITE = 0x1
SHN_UNDEF, SHN_LORESERVE, SHN_ABS, SHN_COMMON = 0, 0xFF00, 0xFFF1, 0xFFF2
STB_GLOBAL, STB_WEAK, STT_FILE = 1, 2, 4
INFO_SECTION, MODULES_SECTION = ".ksyms.info", ".ksyms.modules"  # as builder.py writes them

ImageLike = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO]


def load_bytes(image: ImageLike) -> tuple[bytes, str]:
    """Bytes of an image given as bytes, a path (file, mount) or an open binary file."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), "<image>"
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with open(path, "rb") as f:
                return f.read(), path
        except OSError as e:
            raise ImageError(f"{path}: cannot read: {e.strerror}") from None
    return image.read(), getattr(image, "name", "<image>")


def fail(path: str, why: str) -> ImageError:
    return ImageError(f"{path}: not a readable ksyms ELF image: {why}")


def n_type_of(shndx: int, bind: int, typ: int, nsections: int, sh_type: int,
              sh_flags: int) -> int:
    """n_type exactly as libbsd's elf_sym_to_nlist() computes it."""
    if shndx in (SHN_UNDEF, SHN_COMMON):
        t = N_UNDF
    elif shndx == SHN_ABS:
        t = N_FN if typ == STT_FILE else N_ABS
    elif shndx >= nsections:
        t = N_UNDF
    elif sh_type == SHT_PROGBITS:
        t = N_DATA if sh_flags & SHF_WRITE else N_TEXT
    else:
        t = N_BSS if sh_type == SHT_NOBITS else 0
    if bind in (STB_GLOBAL, STB_WEAK):
        t |= N_EXT
    return t


def n_type_name(t: int) -> str:
    return N_TYPE_NAMES.get(t & ~N_EXT, hex(t & ~N_EXT)) + ("|N_EXT" if t & N_EXT else "")


def is_mapping_symbol(name: bytes | str) -> bool:
    """ARM/AArch64 ELF mapping symbol: ``$`` + one of a d t x, alone or before a ``.``.

    They mark where code and data start inside a function ($a ARM, $t Thumb, $x AArch64
    code, $d data); perf and the kernel's own kallsyms skip them.
    """
    b = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
    return len(b) >= 2 and b[0] == 0x24 and b[1] in b"adtx" and (len(b) == 2 or b[2] == 0x2E)


def check_address(a: int) -> None:
    if not 0 <= a <= 0xFFFFFFFFFFFFFFFF:
        raise ConfigError(f"address {a:#x} is not a 64-bit address")


@dataclass(frozen=True)
class NlistHit:
    """One symbol matching an nlist request."""

    n_name: str     # the name asked for
    name: str       # the symbol's name in the image
    n_value: int
    n_type: int
    module: str


@dataclass(frozen=True)
class Lookup:
    """An address resolved like the kernel's %pS: name+0xoff/0xsize [module]."""

    addr: int
    name: str
    offset: int
    size: int
    module: str

    def __str__(self) -> str:
        mod = f" [{self.module}]" if self.module else ""
        return f"{self.name}+{self.offset:#x}/{self.size:#x}{mod}"
