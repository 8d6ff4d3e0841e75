"""A virtual ELF image: a few stored byte runs (headers, symbol table, strings), zeros between.

The zeros are the contents of the address sections (``.text``, ``.data``, ...): they
occupy file space so that every section has its own file offset, but they are never
stored. Memory stays the size of the stored runs however large the address span is.
"""

from __future__ import annotations

import ctypes
import os

ZERO_CHUNK = 1 << 20  # zeros written at a time where a file cannot hold a hole


def _kept(data: object) -> tuple[bytes | memoryview, int]:
    """A part as the image keeps it, and its address: bytes as they are; any other writable
    buffer (a bytearray, a NumPy array's bytes) not copied, behind a read-only view, which
    also stops it being resized while the image lives; a read-only one as a bytes copy."""
    if not isinstance(data, bytes):
        view = memoryview(data)
        if not view.readonly:
            view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
            base = ctypes.addressof(ctypes.c_char.from_buffer(view)) if len(view) else 0
            return view.toreadonly(), base
        data = bytes(view)
    return data, ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


class VirtualImage:
    """``size`` bytes: the stored ``parts`` [(offset, bytes)] at their offsets, else zeros.
    A part given as a writable buffer is not copied: whoever made it must not change it."""

    __slots__ = ("parts", "size", "_bases")

    def __init__(self, parts: list[tuple[int, bytes | bytearray | memoryview]], size: int):
        stored = sorted(((off, *_kept(b)) for off, b in parts if len(b)),
                        key=lambda p: p[0])
        parts = [(off, b) for off, b, _ in stored]
        end = 0
        for off, b in parts:
            if off < end:
                raise ValueError("overlapping parts")
            end = off + len(b)
        if end > size:
            raise ValueError("virtual size smaller than the stored parts")
        self.parts = parts
        self.size = size
        self._bases = [base for _, _, base in stored]

    @classmethod
    def of(cls, data: bytes) -> VirtualImage:
        """A plain byte string as a VirtualImage (no zeros of its own)."""
        return cls([(0, data)], len(data))

    def __len__(self) -> int:
        return self.size

    @property
    def real_size(self) -> int:
        """Bytes actually stored (the rest reads as zeros)."""
        return sum(len(b) for _, b in self.parts)

    def __getitem__(self, key: slice) -> bytes:
        if not isinstance(key, slice):
            raise TypeError("VirtualImage supports slices only")
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise ValueError("VirtualImage slices must have step 1")
        if stop <= start:
            return b""
        out = bytearray(stop - start)
        for off, b in self.parts:
            lo, hi = max(start, off), min(stop, off + len(b))
            if lo < hi:
                out[lo - start:hi - start] = b[lo - off:hi - off]
        return bytes(out)

    def __bytes__(self) -> bytes:
        return self[0:self.size]

    def __contains__(self, sub: bytes) -> bool:
        sub = bytes(sub)
        zeros = self.size - self.real_size
        if sub.strip(b"\0") == b"":
            return len(sub) <= zeros or sub in bytes(self)
        # a match lies within runs closer together than its length and the zeros around
        spans: list[list[int]] = []  # [start, end] of each such group of runs
        for off, b in self.parts:
            if spans and off - spans[-1][1] < len(sub):
                spans[-1][1] = off + len(b)
            else:
                spans.append([off, off + len(b)])
        return any(sub in self[max(0, lo - len(sub)):min(self.size, hi + len(sub))]
                   for lo, hi in spans)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VirtualImage):
            return self.size == other.size and (self.parts == other.parts
                                                or bytes(self) == bytes(other))
        if isinstance(other, (bytes, bytearray, memoryview)):
            return len(other) == self.size and bytes(other) == bytes(self)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def copy_into(self, address: int, offset: int, n: int) -> int:
        """Copy up to ``n`` bytes from ``offset`` to the C buffer at ``address``; returns
        the count (0 at or past the end). No Python bytes are made: memset + memmove."""
        n = max(0, min(n, self.size - offset)) if offset >= 0 else 0
        if not n:
            return 0
        end, cur = offset + n, offset
        for (off, b), base in zip(self.parts, self._bases):
            lo, hi = max(cur, off), min(end, off + len(b))
            if lo >= hi:
                continue
            if lo > cur:
                ctypes.memset(address + cur - offset, 0, lo - cur)
            ctypes.memmove(address + lo - offset, base + lo - off, hi - lo)
            cur = hi
        if cur < end:
            ctypes.memset(address + cur - offset, 0, end - cur)
        return n

    def write_to(self, fd: int) -> None:
        """Write the image to ``fd`` from its current position: on a regular file the
        zeros become holes (seek + ftruncate); on a pipe or terminal they are written."""
        try:
            start = os.lseek(fd, 0, os.SEEK_CUR)
            seekable = os.fstat(fd).st_size <= start
        except OSError:
            seekable = False
        cur = 0
        for off, b in self.parts:
            _skip(fd, off - cur, seekable)
            _write_all(fd, b)
            cur = off + len(b)
        if cur < self.size:
            if seekable:
                os.ftruncate(fd, start + self.size)
                os.lseek(fd, start + self.size, os.SEEK_SET)
            else:
                _skip(fd, self.size - cur, False)


def _skip(fd: int, zeros: int, seekable: bool) -> None:
    if zeros <= 0:
        return
    if seekable:
        os.lseek(fd, zeros, os.SEEK_CUR)
        return
    chunk = bytes(min(ZERO_CHUNK, zeros))
    while zeros:
        k = min(zeros, len(chunk))
        _write_all(fd, memoryview(chunk)[:k])
        zeros -= k


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        k = os.write(fd, view)
        view = view[k:]
