"""glibc malloc as ksymsfs builds: one arena, big buffers in the heap, trimmed when idle."""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt (glibc malloc.h)
MMAP_THRESHOLD = 1 << 30   # every buffer a build makes comes from the heap (the read cap is
#                            512 MiB): one freed is reused by the next, where a mapping of
#                            its own (glibc's default above 128 KiB) is fresh pages each time
TRIM_THRESHOLD = 1 << 30  # free() never trims the heap top itself: the daemon trims
ARENA_MAX = 1  # 2 kept 6 MB resident in the second arena after crowds (36 vs 42 MB idle)


def tune_malloc() -> ctypes.CDLL | None:
    """One malloc arena for FUSE's worker threads (malloc_trim then gives back what a crowd left;
    a second arena kept ~6 MB resident, and one arena did not slow a crowd); big buffers in the
    heap, not each in a mapping of its own. A build makes a hundred temporaries of 2-150 MB at
    3M symbols: each in its own mapping was fresh 4 KiB pages (page faults and zeroing, 45k
    faults and 40% of the image build at 3M, none at 300k, whose temporaries fitted under the
    old 2 MiB threshold); from the heap, one freed is reused by the next (3M: 565 -> 330 ms for
    the image, 45k -> 0.5k faults). Nor does free() give back the heap top between builds: with
    the 64 MiB it once had, a 3M build's heap (330 MB) was given back after each build and
    faulted in again by the next (19k faults, 75 ms), a 300k build's never. The daemon gives
    memory back itself when its last open closes (``malloc_trim``, which also frees the free
    pages inside the heap; at most every few seconds); meanwhile the heap stays within its
    busiest moment's peak, since a freed buffer is reused. Call it before a second thread
    allocates: one that did keeps an arena of its own, which glibc then hands to other threads
    too. Returns libc (None where it is not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, ARENA_MAX)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        return None
    return libc
