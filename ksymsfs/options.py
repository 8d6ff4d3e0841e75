"""Parsed options -> the objects below the CLI (sources, ELF class); shared by cli and mount."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .errors import ConfigError
from .readbase import ELFCLASS32, ELFCLASS64  # (not elfdefs: no numpy for --help)

if TYPE_CHECKING:  # imported where used: the CLI starts without numpy
    from .sources import Sources

ELFCLASS_OF = {None: None, "32": ELFCLASS32, "64": ELFCLASS64}  # --class -> EI_CLASS
REOPEN_MODES = ("share", "busy")  # a process's second open: its held snapshot, or EBUSY


def sources_from_args(a: argparse.Namespace) -> Sources:
    """Live defaults; a captured --kallsyms only gets the module list it is given."""
    from .sources import Sources

    if a.kallsyms is None:
        src = Sources.live()
        if a.modules:
            src.modules, src.modules_optional = a.modules, False
        if a.sections:
            src.sections = a.sections
    else:
        src = Sources(a.kallsyms, a.modules, a.sections, modules_optional=False)
        src.notes = None
    if getattr(a, "notes", None):
        src.notes, src.notes_strict = a.notes, True
    src.lenient = a.lenient
    src.max_read = getattr(a, "max_read", 512) << 20
    return src


def positive_int(what: str, text: str) -> int:
    """``text`` as an integer >= 1, or a ConfigError naming the option."""
    try:
        n = int(text, 10)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{what}: {text!r} is not a whole number of at least 1")
    return n
