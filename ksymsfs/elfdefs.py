"""ELF names and record layouts (elf.h spelling), taken from pyelftools' enums."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from elftools.elf.constants import P_FLAGS, SH_FLAGS
from elftools.elf.enums import (
    ENUM_E_MACHINE,
    ENUM_E_TYPE,
    ENUM_EI_CLASS,
    ENUM_EI_DATA,
    ENUM_P_TYPE_BASE,
    ENUM_SH_TYPE_BASE,
    ENUM_ST_INFO_BIND,
    ENUM_ST_INFO_TYPE,
    ENUM_ST_SHNDX,
)

from .errors import ConfigError

ELFCLASS32 = ENUM_EI_CLASS["ELFCLASS32"]
ELFCLASS64 = ENUM_EI_CLASS["ELFCLASS64"]
ELFDATA2LSB = ENUM_EI_DATA["ELFDATA2LSB"]
ELFDATA2MSB = ENUM_EI_DATA["ELFDATA2MSB"]
ET_EXEC = ENUM_E_TYPE["ET_EXEC"]
EV_CURRENT = 1
PT_LOAD = ENUM_P_TYPE_BASE["PT_LOAD"]
PT_NOTE = ENUM_P_TYPE_BASE["PT_NOTE"]
PF_X, PF_W, PF_R = P_FLAGS.PF_X, P_FLAGS.PF_W, P_FLAGS.PF_R

SHT_PROGBITS = ENUM_SH_TYPE_BASE["SHT_PROGBITS"]
SHT_SYMTAB = ENUM_SH_TYPE_BASE["SHT_SYMTAB"]
SHT_STRTAB = ENUM_SH_TYPE_BASE["SHT_STRTAB"]
SHT_NOBITS = ENUM_SH_TYPE_BASE["SHT_NOBITS"]
SHT_NOTE = ENUM_SH_TYPE_BASE["SHT_NOTE"]
NT_GNU_BUILD_ID = 3
SHF_WRITE = SH_FLAGS.SHF_WRITE
SHF_ALLOC = SH_FLAGS.SHF_ALLOC
SHF_EXECINSTR = SH_FLAGS.SHF_EXECINSTR

STB_LOCAL = ENUM_ST_INFO_BIND["STB_LOCAL"]
STB_GLOBAL = ENUM_ST_INFO_BIND["STB_GLOBAL"]
STB_WEAK = ENUM_ST_INFO_BIND["STB_WEAK"]
STB_GNU_UNIQUE = ENUM_ST_INFO_BIND["STB_LOOS"]  # 10, elf.h's STB_GNU_UNIQUE
STT_NOTYPE = ENUM_ST_INFO_TYPE["STT_NOTYPE"]
STT_OBJECT = ENUM_ST_INFO_TYPE["STT_OBJECT"]
STT_FUNC = ENUM_ST_INFO_TYPE["STT_FUNC"]
STT_FILE = ENUM_ST_INFO_TYPE["STT_FILE"]
STT_GNU_IFUNC = ENUM_ST_INFO_TYPE["STT_LOOS"]  # 10, elf.h's STT_GNU_IFUNC
SHN_UNDEF = ENUM_ST_SHNDX["SHN_UNDEF"]
SHN_ABS = ENUM_ST_SHNDX["SHN_ABS"]
SHN_COMMON = ENUM_ST_SHNDX["SHN_COMMON"]
SHN_LORESERVE = 0xFF00


def ELF_ST_INFO(bind: int, typ: int) -> int:  # noqa: N802  (elf.h spelling)
    return (bind << 4) | typ


def _endian(data: int) -> str:
    return "<" if data == ELFDATA2LSB else ">"


def word_dtype(data: int) -> np.dtype:
    """An Elf_Word (32 bits) in the image's byte order."""
    return np.dtype(_endian(data) + "u4")


def ehdr_dtype(elfclass: int, data: int) -> np.dtype:
    """Elf32_Ehdr / Elf64_Ehdr, fields in elf.h order (addresses/offsets are word-sized)."""
    e, w = _endian(data), ("u4" if elfclass == ELFCLASS32 else "u8")
    return np.dtype([("e_ident", "V16"), ("e_type", e + "u2"), ("e_machine", e + "u2"),
                     ("e_version", e + "u4"), ("e_entry", e + w), ("e_phoff", e + w),
                     ("e_shoff", e + w), ("e_flags", e + "u4"), ("e_ehsize", e + "u2"),
                     ("e_phentsize", e + "u2"), ("e_phnum", e + "u2"),
                     ("e_shentsize", e + "u2"), ("e_shnum", e + "u2"), ("e_shstrndx", e + "u2")])


def phdr_dtype(elfclass: int, data: int) -> np.dtype:
    """Elf32_Phdr (p_flags 7th) and Elf64_Phdr (p_flags 2nd) differ in field order."""
    e = _endian(data)
    if elfclass == ELFCLASS32:
        return np.dtype([("p_type", e + "u4"), ("p_offset", e + "u4"), ("p_vaddr", e + "u4"),
                         ("p_paddr", e + "u4"), ("p_filesz", e + "u4"), ("p_memsz", e + "u4"),
                         ("p_flags", e + "u4"), ("p_align", e + "u4")])
    return np.dtype([("p_type", e + "u4"), ("p_flags", e + "u4"), ("p_offset", e + "u8"),
                     ("p_vaddr", e + "u8"), ("p_paddr", e + "u8"), ("p_filesz", e + "u8"),
                     ("p_memsz", e + "u8"), ("p_align", e + "u8")])


def shdr_dtype(elfclass: int, data: int) -> np.dtype:
    """Elf32_Shdr / Elf64_Shdr: same field order, word-sized flags/addr/offset/size."""
    e, w = _endian(data), ("u4" if elfclass == ELFCLASS32 else "u8")
    return np.dtype([("sh_name", e + "u4"), ("sh_type", e + "u4"), ("sh_flags", e + w),
                     ("sh_addr", e + w), ("sh_offset", e + w), ("sh_size", e + w),
                     ("sh_link", e + "u4"), ("sh_info", e + "u4"), ("sh_addralign", e + w),
                     ("sh_entsize", e + w)])


def sym_dtype(elfclass: int, data: int) -> np.dtype:
    """Field order differs by class.

    Elf32_Sym: st_name, st_value, st_size, st_info, st_other, st_shndx
    Elf64_Sym: st_name, st_info, st_other, st_shndx, st_value, st_size
    """
    e = _endian(data)
    if elfclass == ELFCLASS32:
        return np.dtype([("st_name", e + "u4"), ("st_value", e + "u4"), ("st_size", e + "u4"),
                         ("st_info", "u1"), ("st_other", "u1"), ("st_shndx", e + "u2")])
    return np.dtype([("st_name", e + "u4"), ("st_info", "u1"), ("st_other", "u1"),
                     ("st_shndx", e + "u2"), ("st_value", e + "u8"), ("st_size", e + "u8")])


@dataclass(frozen=True)
class Target:
    """What machine the image claims to be for: ELF class, byte order, e_machine."""

    elfclass: int
    data: int
    machine: int

    @property
    def word_max(self) -> int:
        return 0xFFFFFFFF if self.elfclass == ELFCLASS32 else 0xFFFFFFFFFFFFFFFF


# --arch NAME -> (e_machine name, class, byte order)
ARCHES = {
    "x86_64": ("EM_X86_64", ELFCLASS64, ELFDATA2LSB),
    "i386": ("EM_386", ELFCLASS32, ELFDATA2LSB),
    "aarch64": ("EM_AARCH64", ELFCLASS64, ELFDATA2LSB),
    "arm": ("EM_ARM", ELFCLASS32, ELFDATA2LSB),
    "mips": ("EM_MIPS", ELFCLASS32, ELFDATA2MSB),
    "mipsel": ("EM_MIPS", ELFCLASS32, ELFDATA2LSB),
    "mips64": ("EM_MIPS", ELFCLASS64, ELFDATA2MSB),
    "mips64el": ("EM_MIPS", ELFCLASS64, ELFDATA2LSB),
    "riscv64": ("EM_RISCV", ELFCLASS64, ELFDATA2LSB),
    "ppc64": ("EM_PPC64", ELFCLASS64, ELFDATA2MSB),
    "ppc64le": ("EM_PPC64", ELFCLASS64, ELFDATA2LSB),
    "s390x": ("EM_S390", ELFCLASS64, ELFDATA2MSB),
}
ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "i686": "i386", "armv7l": "arm",
                "armv6l": "arm", "armhf": "arm"}
# The 32-bit sibling of a 64-bit machine, for a 32-bit dump read on a 64-bit host.
# (Machines not listed keep their own e_machine with ELFCLASS32.)
MACHINE32 = {"x86_64": "i386", "aarch64": "arm", "mips64": "mips", "mips64el": "mipsel"}


def host_arch() -> str:
    import platform

    m = platform.machine()
    m = ARCH_ALIASES.get(m, m)
    if m.startswith("mips"):
        m = m + ("el" if sys.byteorder == "little" and not m.endswith("el") else "")
    return m if m in ARCHES else "x86_64"


def make_target(arch: str | None = None, elfclass: int | None = None,
                endian: str | None = None, address_bits: int | None = None) -> Target:
    """Resolve CLI overrides. Default: the host machine; a 32-bit dump gets a 32-bit class."""
    if arch is None:
        arch = host_arch()
        if address_bits == 32 and ARCHES[arch][1] == ELFCLASS64 and elfclass is None:
            arch = MACHINE32.get(arch, arch)
    arch = ARCH_ALIASES.get(arch, arch)
    if arch not in ARCHES:
        raise ConfigError(f"unknown --arch {arch!r}; known: {', '.join(sorted(ARCHES))}")
    em_name, cls, data = ARCHES[arch]
    if elfclass is not None:
        cls = elfclass
    elif address_bits == 32:
        cls = ELFCLASS32
    if endian is not None:
        if endian not in ("little", "big"):
            raise ConfigError(f"--endian must be 'little' or 'big', not {endian!r}")
        data = ELFDATA2LSB if endian == "little" else ELFDATA2MSB
    return Target(cls, data, ENUM_E_MACHINE[em_name])
