"""ksymsfs: the BSD /dev/ksyms device for Linux (kallsyms as an ELF symbol table)."""

__version__ = "0.1.0"

# FreeBSD <sys/ksyms.h> ioctls, in Linux _IOR encoding: dir(2) << 30 | size << 16 | 'l' << 8 | nr.
KIOCGSIZE = (2 << 30) | (8 << 16) | (ord("l") << 8) | 1  # _IOR('l', 1, size_t) = 0x80086c01
KIOCGADDR = (2 << 30) | (8 << 16) | (ord("l") << 8) | 2  # _IOR('l', 2, void *) = 0x80086c02

from .errors import (  # noqa: E402
    ConfigError,
    ImageError,
    KsymsError,
    ParseError,
    SnapshotError,
    SourceError,
)
from .kallsyms import SymbolTable, parse_kallsyms  # noqa: E402
from .reader import Lookup, NlistHit, dump_lines, lookup, nlist, parse_image  # noqa: E402

__all__ = [
    "KIOCGADDR", "KIOCGSIZE", "ConfigError", "ImageError", "KsymsError", "Lookup", "NlistHit",
    "ParseError", "SnapshotError", "SourceError", "SymbolTable", "dump_lines", "lookup",
    "nlist", "parse_image", "parse_kallsyms",
]
