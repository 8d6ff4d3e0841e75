"""glibc malloc as the daemon runs it: one arena, big buffers in their own mappings."""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt (glibc malloc.h)
MMAP_THRESHOLD = 2 << 20   # above readfile's read chunk (1 MiB): procfs answers a page per
#                            read, and an mmap + munmap for each made opens slower
TRIM_THRESHOLD = 64 << 20  # bytes free at the heap top before free() gives them back
ARENA_MAX = 1  # 2 kept 6 MB resident in the second arena after crowds (36 vs 42 MB idle)


def tune_malloc() -> ctypes.CDLL | None:
    """One malloc arena for FUSE's worker threads (malloc_trim then gives back what a crowd
    left; a second arena kept ~6 MB resident, and one arena did not slow a crowd); big
    buffers (a kallsyms text, an image) always in their own mappings, so freeing them
    returns them to the system (a fixed threshold: glibc's sliding one keeps buffers up
    to 32 MiB in the heap after the first free, so only bigger inputs paid for fresh
    pages). Setting it also pins the trim threshold at 128 KiB, which gave back and
    faulted in again the heap top at every 1 MiB read buffer: it is raised, and the
    caller trims (``malloc_trim``) when idle. Call it before a second thread allocates:
    one that did keeps an arena of its own, which glibc then hands to other threads too.
    Returns libc (None where it is not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, ARENA_MAX)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        return None
    return libc
