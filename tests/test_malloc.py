"""The malloc policy builds run under (ksymsfs.malloc): big buffers reused, given back when idle."""

import subprocess
import sys

import pytest

# In a fresh process (mallopt is process-wide): a 96 MiB buffer (a temporary of a 3M-symbol
# build) is freed, a second one of the same size is written page by page,
# then freed and the heap trimmed. Prints the page
# faults of writing the second buffer and the resident set before and after the trim.
PROBE = r"""
import ctypes, resource, sys
from ksymsfs.malloc import tune_malloc
libc = tune_malloc() if sys.argv[1] == "tuned" else ctypes.CDLL("libc.so.6")
SIZE, PAGE = 96 << 20, 4096
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) << 10 for l in f if l.startswith("VmRSS:"))
def touch(b):
    for i in range(0, len(b), PAGE):
        b[i] = 1
a = bytearray(SIZE); touch(a); del a
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = bytearray(SIZE); touch(b)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
held = rss()
del b
libc.malloc_trim(0)
print(faults, held, rss())
"""


def _probe(mode: str) -> tuple[int, int, int]:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                       timeout=60, check=True)
    faults, held, trimmed = (int(x) for x in r.stdout.split())
    return faults, held, trimmed


@pytest.mark.parametrize("mode", ["tuned", "default"])
def test_a_freed_big_buffer_is_reused_and_given_back_when_trimmed(mode):
    faults, held, trimmed = _probe(mode)
    pages = (96 << 20) // 4096
    if mode == "default":  # glibc's own policy: a fresh mapping, every page faulted again
        assert faults > pages * 0.9
        return
    assert faults < pages * 0.05  # the freed buffer's pages, reused as they are
    assert held - trimmed > (96 << 20) * 0.9  # malloc_trim gives them back (idle RSS)
