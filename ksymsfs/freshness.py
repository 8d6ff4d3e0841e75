"""When a kallsyms reading already in flight is as fresh for a later opener as a new one.

/proc/kallsyms is generated as it is read, in one order (kernel/kallsyms.c: ``s_show``,
``update_iter``, ``update_iter_mod``): the kernel's own symbols, then each module's,
ftrace's freed init functions, eBPF programs and trampolines, kprobe instruction pages.
The kernel's own symbols are compiled-in tables that never change after boot. So a
reading that, when an opener arrived, had not yet read the first line that is not the
kernel's own read everything that *can* change after that arrival: its snapshot is one
it would also have given had it begun then. Its consistency signals (both module lists,
the uevent seqnum, eBPF ids) still judge the reading as a whole, as for every reading.

Two more conditions keep it exact. The reading must show addresses: whether it does was
decided when it opened kallsyms (``kptr_restrict``, before the arrival; Linux 4.15+, so a
live source is kernel-first only there: ``shows_per_open``); each opener's
own address policy is decided at its own open anyway. And the bytes the kernel may have
generated before the arrival reach at most ``AHEAD`` beyond what the reader had received
(the read in progress, the reader's buffer, seq_file's page).

The same fact spares each open most of its identity check (``unchanging_span``): two
readings that both show addresses hold the same kernel's own symbols, byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

STEP = 256 << 10        # bytes a tracked reading may have received beyond what it told
READ_BUFFER = 64 << 10  # the reader's own buffer (io.BufferedReader) while tracked
SEQ_SLACK = 64 << 10    # seq_file's buffer: a page (it grows only for a longer record)
AHEAD = STEP + READ_BUFFER + SEQ_SLACK


class ReadProgress:
    """How far one reading has got: ``state`` is (try, bytes of kallsyms received), set
    by the reader as one tuple; ``final`` the try that gave the snapshot. ``made``: while
    not None, the kernel has made at most up to there (the reading paused, nothing read
    past it yet), which bounds the mark instead of ``AHEAD``. ``hold``: what a
    reader calls there before reading on (the Coalescer's: while openers keep coming)."""

    __slots__ = ("state", "final", "made", "hold")

    def __init__(self) -> None:
        self.state = (0, 0)
        self.final = 0
        self.made: int | None = None
        self.hold: Callable[[], None] | None = None

    def start_try(self, n: int) -> None:
        self.made = None
        self.state = (n, 0)

    def advance(self, nbytes: int) -> None:
        self.state = (self.state[0], nbytes)
        self.made = None

    def paused(self, offset: int) -> None:
        """The reading stopped at ``offset`` (read page by page up to it): the kernel made
        its records up to at most seq_file's page beyond it (SEQ_SLACK)."""
        self.made = offset + SEQ_SLACK

    def done(self, n: int) -> None:
        self.final = n


Mark = tuple[int, int]  # (try in progress at the arrival, bytes the kernel may have made)


class Reading(Protocol):
    """What the rule needs of a snapshot (sources.Snapshot)."""

    kernel_end: int
    all_zero: bool


def kernel_end(raw: bytes) -> int:
    """Offset in a kallsyms text of the first line that is not the kernel's own (a
    module's, or a kernel-made group's: those lines end in a tab and ``[name]``; the
    kernel's own never hold a tab), or its length."""
    tab = raw.find(b"\t")
    return len(raw) if tab < 0 else raw.rfind(b"\n", 0, tab) + 1


def shows_per_open(release: str) -> bool:
    """Whether a kernel of this ``uname -r`` decides once per open of kallsyms if its
    addresses print (``kallsyms_open`` calls ``kallsyms_show_value``, Linux 4.15+; before,
    ``%pK`` decided line by line, so one reading could switch mid-way). Both rules here
    rest on it."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (4, 15)


_SHOWN = re.compile(rb"^0*[1-9a-fA-F][0-9a-fA-F]* ", re.M)  # a line with an address > 0
SHOWN_WITHIN = 64 << 10  # how far into a reading that line is looked for


def unchanging_span(raw: bytes, end: int | None = None) -> tuple[int, int]:
    """(a, b): a later reading whose first ``a`` bytes equal this one's has the same bytes
    in ``[a, b)`` too, so they need no comparing (readfile.ReadBuffer.read_fd).

    ``b`` is ``kernel_end``: the kernel's own symbols never change after boot, and they
    print the same unless one reading shows addresses and the other does not (decided
    once per open of kallsyms). ``a`` ends the first line with an address other than 0:
    a reading equal to this one up to there shows addresses, as this one did. (0, 0)
    when no such line comes within SHOWN_WITHIN bytes (this reading hid addresses).
    ``end``: ``kernel_end(raw)`` if the caller has it."""
    end = kernel_end(raw) if end is None else end
    m = _SHOWN.search(raw, 0, min(end, SHOWN_WITHIN))
    if m is None:
        return 0, 0
    a = raw.find(b"\n", m.end()) + 1
    return (a, end) if 0 < a < end else (0, 0)


class KernelFirstJoin:
    """The Coalescer's rule for sharing a reading in flight (see the module docstring)."""

    def __init__(self) -> None:
        self.hint: int | None = None  # the last reading's kernel_end: the next is alike
        # (learnt from every reading, the mount's first included)

    @staticmethod
    def progress() -> ReadProgress:
        return ReadProgress()

    @staticmethod
    def mark(p: ReadProgress) -> Mark:
        made = p.made  # first: the reader clears it only after it set the state
        tried, received = p.state
        return tried, received + AHEAD if made is None else made

    def learn(self, snap: Reading) -> None:
        """Every reading's kernel part ends where the last one's did (the hint)."""
        self.hint = snap.kernel_end

    def may_serve(self, mark: Mark) -> bool:
        """Worth waiting for before starting a read of one's own."""
        return self.hint is None or mark[1] <= self.hint

    def serves(self, mark: Mark, p: ReadProgress, snap: Reading) -> bool:
        """The reading's snapshot is fresh for an opener who arrived at ``mark``."""
        if p.final > mark[0]:
            return True  # the try that gave it began after the arrival
        return p.final == mark[0] and mark[1] <= snap.kernel_end and not snap.all_zero
