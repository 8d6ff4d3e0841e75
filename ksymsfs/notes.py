"""ELF notes of the kernel (/sys/kernel/notes) and of modules (/sys/module/<m>/notes/)."""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field

from .elfdefs import NT_GNU_BUILD_ID
from .errors import SourceError
from .readfile import open_regular

NOTE_SECTION = ".note.gnu.build-id"  # build-id notes (a module's file in /sys is so named)
OTHER_NOTES_SECTION = ".ksyms.notes"  # the kernel's other notes (Linux, Xen), verbatim
MAX_NOTES = 1 << 20                  # bytes of notes accepted from one file


@dataclass
class Notes:
    """Raw ``Elf_Nhdr`` records: the kernel's, and each module's build-id note."""

    kernel: bytes = b""
    modules: dict[str, bytes] = field(default_factory=dict)


def note_records(data: bytes, order: str = "<") -> list[tuple[bytes, int, bytes]]:
    """(name without NUL, type, desc) per record; ValueError if the records are malformed.

    Linux writes 4-byte aligned records (``Elf_Nhdr``: namesz, descsz, type as 32-bit
    words) in its own byte order, ``order`` here ('<' or '>')."""
    out, i = [], 0
    while i < len(data):
        if i + 12 > len(data):
            raise ValueError(f"truncated note header at byte {i}")
        namesz, descsz, typ = struct.unpack_from(order + "III", data, i)
        name_at = i + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        end = desc_at + (descsz + 3) // 4 * 4
        if end > len(data) or namesz == 0 or data[name_at + namesz - 1] != 0:
            raise ValueError(f"malformed note at byte {i}")
        out.append((data[name_at:name_at + namesz - 1], typ, data[desc_at:desc_at + descsz]))
        i = end
    return out


def split_notes(data: bytes, order: str) -> tuple[bytes, bytes]:
    """(records owned by "GNU", the others), each as raw records in their original order.

    eu-elflint rejects note types it does not know (Linux's and Xen's) in an executable's
    notes, so only GNU notes (the build-id) go into SHT_NOTE; the rest are kept verbatim.
    """
    gnu, other, i = bytearray(), bytearray(), 0
    for name, _typ, _desc, end in _spans(data, order):
        (gnu if name == b"GNU" else other).extend(data[i:end])
        i = end
    return bytes(gnu), bytes(other)


def _spans(data: bytes, order: str):
    i = 0
    for name, typ, desc in note_records(data, order):
        namesz, descsz = len(name) + 1, len(desc)
        i += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
        yield name, typ, desc, i


def build_id(data: bytes, order: str = "<") -> bytes | None:
    """The NT_GNU_BUILD_ID descriptor in raw notes, if any."""
    try:
        recs = note_records(data, order)
    except ValueError:
        return None
    return next((d for n, t, d in recs if n == b"GNU" and t == NT_GNU_BUILD_ID), None)


def valid_notes(data: bytes, order: str) -> bool:
    try:
        return bool(note_records(data, order))
    except ValueError:
        return False


def _read(path: str, missing_ok: bool) -> bytes | None:
    try:
        with os.fdopen(open_regular(path), "rb") as f:  # a FIFO never blocks us
            data = f.read(MAX_NOTES + 1)
    except OSError as e:
        if missing_ok or e.errno in (errno.ENOENT, errno.EACCES, errno.EPERM):
            return None
        raise SourceError(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > MAX_NOTES:
        raise SourceError(f"{path}: more than {MAX_NOTES} bytes of notes")
    return data


def read_notes(kernel_path: str | None, sysmodule: str | None, modules: list[str],
               order: str = "<", strict: bool = False) -> tuple[Notes, list[str]]:
    """Notes from ``kernel_path`` (/sys/kernel/notes or a captured copy) and
    ``sysmodule/<m>/notes/.note.gnu.build-id``; unreadable module notes are skipped.

    ``strict`` (a file the user named): a missing or malformed kernel notes file is an
    error. Otherwise it is left out with a warning (returned, for the caller to log).
    """
    notes, warnings = Notes(), []
    if kernel_path:
        data = _read(kernel_path, missing_ok=not strict)
        if data is None and strict:
            raise SourceError(f"{kernel_path}: cannot read notes")
        if data:
            if valid_notes(data, order):
                notes.kernel = data
            elif strict:
                raise SourceError(f"{kernel_path}: not a sequence of ELF note records")
            else:
                warnings.append(f"{kernel_path}: not ELF note records; left out")
    for m in modules if sysmodule else []:
        data = _read(os.path.join(sysmodule, m, "notes", NOTE_SECTION), missing_ok=True)
        if data and valid_notes(data, order):
            notes.modules[m] = data
    return notes, warnings
