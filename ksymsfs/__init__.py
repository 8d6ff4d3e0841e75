"""ksymsfs: the BSD /dev/ksyms device for Linux (kallsyms as an ELF symbol table)."""

from __future__ import annotations

import importlib
from typing import Any

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

# The rest of the public API is imported on first use (PEP 562), so that `import ksymsfs`
# (and the CLI's --version/--help) does not pay for numpy.
_LAZY = {"SymbolTable": "kallsyms", "parse_kallsyms": "kallsyms", "Lookup": "reader",
         "NlistHit": "reader", "dump_lines": "reader", "lookup": "reader", "nlist": "reader",
         "parse_image": "reader", "symbolize_text": "symbolize"}

__all__ = [
    "KIOCGADDR", "KIOCGSIZE", "ConfigError", "ImageError", "KsymsError", "Lookup", "NlistHit",
    "ParseError", "SnapshotError", "SourceError", "SymbolTable", "dump_lines", "lookup",
    "nlist", "parse_image", "parse_kallsyms", "symbolize_text",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
