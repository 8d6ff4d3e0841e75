"""glibc malloc as the daemon runs it: few arenas, big buffers in their own mappings."""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt (glibc malloc.h)
MMAP_THRESHOLD = 2 << 20   # above readfile's read chunk (1 MiB): procfs answers a page per
#                            read, and an mmap + munmap for each made opens slower
TRIM_THRESHOLD = 64 << 20  # bytes free at the heap top before free() gives them back
ARENA_MAX = 2


def tune_malloc() -> ctypes.CDLL | None:
    """Few arenas for FUSE's worker threads; big buffers (a kallsyms text, an image)
    always in their own mappings, so freeing them returns them to the system (a fixed
    threshold: glibc's sliding one keeps buffers up to 32 MiB in the heap after the
    first free, so only bigger inputs paid for fresh pages). Setting it also pins the
    trim threshold at 128 KiB, which gave back and faulted in again the heap top at every
    1 MiB read buffer: it is raised, and the caller trims (``malloc_trim``) when idle.
    Returns libc (None where it is not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, ARENA_MAX)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        return None
    return libc
