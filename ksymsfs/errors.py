"""The package's one error hierarchy: every failure a user can cause is a KsymsError."""

from __future__ import annotations

import errno


class KsymsError(Exception):
    """Base class. ``exit_status`` is what the CLI returns; ``errno`` what FUSE answers."""

    exit_status = 1
    errno = errno.EIO


class ParseError(KsymsError):
    """Malformed input text (kallsyms, /proc/modules): names the file and line."""

    exit_status = 2
    errno = errno.ENXIO

    def __init__(self, path: str, lineno: int | None, reason: str, line: bytes | None = None):
        self.path, self.lineno, self.reason, self.line = path, lineno, reason, line
        where = f"{path}:{lineno}" if lineno else str(path)
        text = f"{where}: {reason}"
        if line is not None:
            text += f": {ascii(line[:80].decode('latin-1'))}" + ("..." if len(line) > 80 else "")
        super().__init__(text)


class ImageError(KsymsError):
    """An ELF image that cannot be read (corrupt, truncated, not ours)."""

    exit_status = 2
    errno = errno.EIO


class ConfigError(KsymsError):
    """Bad option values (unknown --arch, conflicting flags)."""

    exit_status = 2
    errno = errno.EINVAL


class SnapshotError(KsymsError):
    """No consistent snapshot could be taken (sources kept changing): FreeBSD's ENXIO."""

    exit_status = 1
    errno = errno.ENXIO


class SourceError(KsymsError):
    """A source file cannot be read at all (missing, permission)."""

    exit_status = 1
    errno = errno.ENXIO


class MountPointError(KsymsError):
    """A path that must not be mounted on or unmounted (wrong file type, a foreign mount)."""

    exit_status = 2
    errno = errno.EINVAL
