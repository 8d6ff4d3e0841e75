"""Rewrite kernel addresses in any text as the kernel's %pS prints them: sym+0xoff/0xsize [mod].

A candidate is a whole hex word of the image's address width (16 digits, or 8 for a
32-bit kernel), with or without ``0x``: not part of a longer word, not a small number
or a timestamp; exactly the words a regex ``\\b(0[xX])?[0-9a-fA-F]{W}\\b`` takes.
Candidates inside a symbol become ``name+0xoff/0xsize``, plus `` [mod]`` for a module
(not for pseudo-modules such as ``[bpf]``, as %pS); everything else, including
addresses outside every symbol and 0, stays byte for byte.

How it stays fast (README "symbolize"): no per-byte Python and no regex. A run of W
digits holds a whole aligned block of W/2 of them, so one vectorized pass over the
blocks (SWAR: all bytes hex digits?) finds the few places to look at closely. Values
come from the digits read as words (SWAR again); each distinct address is looked up and
formatted once (cached across calls, found again through a hash table). The output is
one ``%`` formatting of the text in which each candidate was overwritten in place by a
conversion of the same length (``%-...-s``: flags only, no width), with the text's own
``%`` doubled.
"""

from __future__ import annotations

import functools
import io
import re
import select
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .arrays import sorted_unique
from .kallsyms import is_pseudo_module
from .npreader import Image, locate
from .reader import parse_image

_HEX = b"0123456789abcdefABCDEF"
_WORD = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"  # a regex \w
# byte classes (a translate table): hex digit 1, "x"/"X" 4, other word byte 2, else 0
_CLASS = bytes(1 if c in _HEX else 4 if c in b"xX" else 2 if c in _WORD else 0
               for c in range(256))
_CLASS_NP = np.frombuffer(_CLASS, np.uint8)
_CACHE_MAX = 1 << 20  # distinct addresses remembered across calls (then start over)


def address_width(img: Image) -> int:
    """Hex digits of the kernel's addresses: 8 when every symbol fits 32 bits, else 16."""
    vals = img.syms["st_value"]
    return 8 if not len(vals) or int(vals.max()) <= 0xFFFFFFFF else 16


def _byte_index(y: np.ndarray, highest: bool) -> np.ndarray:
    """Index of the highest (or lowest) non-zero byte of each non-zero word ``y`` whose
    bytes are below 8 (so the float conversion below cannot reach the next byte)."""
    if not highest:
        y = y & (~y + np.uint64(1))  # lowest set bit alone
    return (np.frexp(y.astype(np.float64))[1] - 1) // 8


@functools.cache
def _bytes_of(c: int, b: int) -> np.uint64:
    """The byte ``c`` in each of the ``b`` low bytes of a word (a SWAR constant)."""
    return np.uint64(int.from_bytes(bytes([c]) * b, "little"))


def _hex_bits(x: np.ndarray, b: int) -> np.ndarray:
    """Bit 7 of each of the ``b`` low bytes of each word of ``x`` (uint64): a hex digit?

    SWAR: bit 7 of byte + 0x50 says byte >= "0", of byte + 0x46 byte > "9"; with 0x20
    or'ed in (lower case), + 0x1f and + 0x19 bound "a".."f". A byte >= 0x80 may carry
    into the next one, but then its own bit 7 (of ``~x``) is clear."""
    k50, k46, k20, k1f, k19, m80 = (_bytes_of(c, b) for c in (0x50, 0x46, 0x20, 0x1F, 0x19,
                                                              0x80))
    digit = (x + k50) & ~(x + k46)
    y = x | k20
    letter = (y + k1f) & ~(y + k19)
    return (digit | letter) & ~x & m80


def _hex_blocks(raw: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Per block of ``raw`` (uint32 or uint64 words of text): all its bytes hex digits?
    A cache-sized chunk at a time: 2.3x a ``translate`` of the text into byte classes."""
    b = raw.dtype.itemsize
    m80 = _bytes_of(0x80, b)
    out = np.empty(len(raw), bool)
    for lo in range(0, len(raw), chunk):
        np.equal(_hex_bits(raw[lo:lo + chunk].astype(np.uint64, copy=False), b), m80,
                 out=out[lo:lo + chunk])
    return out


def find_words(data: bytes, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of every whole word of ``width`` (8 or 16) hex digits, or ``0x`` and
    them: what ``\\b(0[xX])?[0-9a-fA-F]{width}\\b`` matches, without a regex.

    With b = width/2, such a word holds a whole aligned block of b digits: one pass over
    the text's blocks finds them (``_hex_blocks``). For the first such block q of a run
    of digits, the run starts after the last non-digit of block q-1 and must end within
    block q+1 or just after it; the bytes just before and after it must not be word bytes.
    """
    b = width // 2
    ones = _bytes_of(1, b)
    raw = np.frombuffer(data, np.dtype(f"<u{b}"), len(data) // b)
    full = np.flatnonzero(_hex_blocks(raw))
    q = full[np.concatenate(([True], np.diff(full) != 1))] if len(full) else full
    tail = len(q) - np.searchsorted(q, len(raw) - 2)  # too near the end: a regex
    q = q[:len(q) - tail]
    near = raw[np.concatenate((np.maximum(q - 1, 0), q + 1))].astype(np.uint64)
    # per byte, so no carries: bit 7 cleared first, then bytes that had it refused
    bits = _hex_bits(near & _bytes_of(0x7F, b), b) & ~near
    prev, n1 = np.split(bits >> np.uint64(7), 2)  # 1 in each digit byte
    prev[q == 0] = 0  # no block before: as if no digit
    i = _byte_index(prev ^ ones, True)  # the last byte that is not a digit
    start = (q - 1) * b + i + 1
    buf = np.frombuffer(data, np.uint8)
    before = np.where(q > 0, _CLASS_NP[buf[np.maximum(start - 1, 0)]], 0)
    nxt = n1 ^ ones
    full2 = nxt == 0  # block q+1 is all digits too
    k = np.where(full2, b, _byte_index(np.where(full2, 1, nxt), False))
    end = q * b + b + k
    after = _CLASS_NP[buf[end]]
    ok = (end - start == width) & (after == 0) & ((before == 0) | (before == 4))
    start, end, before = start[ok], end[ok], before[ok]
    # "x" before: a word unless it is "0x" with no word byte before that
    px = np.flatnonzero(before == 4)
    s = start[px]
    good = (s >= 2) & (buf[np.maximum(s - 2, 0)] == 0x30)
    good &= (_CLASS_NP[buf[np.maximum(s - 3, 0)]] == 0) | (s == 2)
    start[px[good]] -= 2
    keep = np.ones(len(start), bool)
    keep[px[~good]] = False
    start, end = start[keep], end[keep]
    if tail:  # the words that may start from block len-3 on, after the last one found
        lo = max((len(raw) - 3) * b - 2, int(end[-1]) if len(end) else 0, 0)
        more = [(m.start(), m.end()) for m in _regex(width).finditer(data, lo)]
        if more:
            extra = np.array(more, np.int64)
            start = np.concatenate((start, extra[:, 0]))
            end = np.concatenate((end, extra[:, 1]))
    return start, end


_NIBBLE, _BIT6 = _bytes_of(0x0F, 8), _bytes_of(0x01, 8)
_PAIRS, _QUADS = np.uint64(0x00FF00FF00FF00FF), np.uint64(0x0000FFFF0000FFFF)


def _pack8(x: np.ndarray) -> np.ndarray:
    """The value of 8 hex digits read as a little-endian uint64 (first digit in the low
    byte), SWAR: each byte to its nibble ("a"/"A" have bit 6: + 9), then pairs, quads."""
    n = (x & _NIBBLE) + np.uint64(9) * ((x >> np.uint64(6)) & _BIT6)
    t = ((n << np.uint64(4)) | (n >> np.uint64(8))) & _PAIRS
    t = ((t << np.uint64(8)) | (t >> np.uint64(16))) & _QUADS
    return ((t << np.uint64(16)) | (t >> np.uint64(32))) & np.uint64(0xFFFFFFFF)


def hex_values(data: bytes, end: np.ndarray, width: int) -> np.ndarray:
    """The value of the ``width`` (8 or 16) hex digits that end at each of ``end``."""
    words = np.ndarray((max(len(data) - 7, 0),), np.uint64, data, 0, (1,))  # one per byte
    vals = _pack8(words[end - 8])
    if width == 16:
        vals |= _pack8(words[end - 16]) << np.uint64(32)
    return vals


_REGEX: dict[int, re.Pattern[bytes]] = {}


def _regex(width: int) -> re.Pattern[bytes]:
    """The regex that find_words matches (used for the last few bytes of a text)."""
    if width not in _REGEX:
        _REGEX[width] = re.compile(rb"(?<![0-9A-Za-z_])(?:0[xX])?[0-9a-fA-F]{%d}"
                                   rb"(?![0-9A-Za-z_])" % width)
    return _REGEX[width]


_FIB = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: multiplicative hashing


class _Cache:
    """Addresses looked up so far: sorted ``keys``, their %pS ``texts`` (None: in no
    symbol) and whether each is ``found`` in a symbol, with a multiplicative hash table
    that finds most of them without a binary search (~100 ns each on random addresses)."""

    def __init__(self, keys: np.ndarray | None = None, texts: np.ndarray | None = None,
                 found: np.ndarray | None = None):
        self.keys = np.zeros(0, np.uint64) if keys is None else keys
        self.texts = np.empty(0, object) if texts is None else texts
        self.found = np.zeros(0, bool) if found is None else found
        bits = min(max((8 * len(self.keys)).bit_length(), 4), 20)
        self._shift = np.uint64(64 - bits)
        self._table = np.zeros(1 << bits, np.intp)  # slot -> a key's position (the last)
        self._table[(self.keys * _FIB) >> self._shift] = np.arange(len(self.keys))

    def index(self, vals: np.ndarray) -> np.ndarray:
        """Position of each of ``vals`` in ``keys``; -1 for those not there."""
        keys = self.keys
        if not len(keys):
            return np.full(len(vals), -1, np.intp)
        idx = self._table[(vals * _FIB) >> self._shift]
        miss = np.flatnonzero(keys[idx] != vals)
        if len(miss):  # not cached, or another key took its slot: a binary search
            mv = vals[miss]
            p = np.minimum(np.searchsorted(keys, mv), len(keys) - 1)
            idx[miss] = np.where(keys[p] == mv, p, -1)
        return idx

    def add(self, keys: np.ndarray, texts: np.ndarray, found: np.ndarray) -> _Cache:
        """A cache that also holds these (sorted, not yet cached) addresses."""
        at = np.searchsorted(self.keys, keys)
        return _Cache(np.insert(self.keys, at, keys), np.insert(self.texts, at, texts),
                      np.insert(self.found, at, found))


class Symbolizer:
    """An image's lookup, ready to rewrite text (``rewrite``), with a count of rewrites."""

    def __init__(self, image, width: int | None = None):
        img = parse_image(image, engine="numpy")
        self.img = img
        self.width = width or address_width(img)
        if self.width not in (8, 16):
            raise ValueError(f"address width {self.width}: 8 or 16 hex digits")
        self.rewritten = 0
        self._mods: dict[int, bytes] = {}
        self._nul = np.flatnonzero(img.strtab == 0)
        self.forget()

    def forget(self) -> None:
        """Drop the addresses looked up so far (they are remembered across ``rewrite``)."""
        self._cache = _Cache()

    def candidates(self, data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, end, value) of every whole word that is W hex digits, or 0x and W."""
        w = self.width
        start, end = find_words(data, w)
        return start, end, hex_values(data, end, w)

    def _known(self, vals: np.ndarray) -> np.ndarray:
        """Position of each address of ``vals`` in the cache, after adding those not in
        it: only the distinct new ones are looked up and formatted (a log repeats its call
        sites, so most texts find all of theirs there, with no sort of the addresses)."""
        idx = self._cache.index(vals)
        new = idx < 0
        if new.any():
            nv, cache = sorted_unique(vals[new]), self._cache
            if len(cache.keys) + len(nv) > _CACHE_MAX:  # start over: this text's only
                nv, cache = sorted_unique(vals), _Cache()
            self._cache = cache.add(nv, *self._look_up(nv))
            idx = self._cache.index(vals)
        return idx

    def _look_up(self, nv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(%pS text or None, found?) per address of ``nv``, looked up in the image."""
        hit, off = locate(self.img, nv)
        hit[nv == 0] = -1  # 0 is a null pointer or a hidden address, never a symbol
        ok = hit >= 0
        nt = np.empty(len(nv), object)
        nt[np.flatnonzero(ok)] = self._format(hit[ok], off[ok])
        return nt, ok

    def _format(self, idx: np.ndarray, off: np.ndarray) -> list[bytes]:
        """%pS text per symbol index and offset: one ``%`` formatting for all of them.
        Names are sliced from ``.strtab`` for these symbols only (splitting a 1M-symbol
        table into its names took 0.19 s, for a log that names 20k of them)."""
        img = self.img
        tab = img.data_strtab
        noff = img.syms["st_name"][idx].astype(np.int64)
        nend = self._nul[np.searchsorted(self._nul, noff)]  # the NUL that ends each name
        mkey = img.modkey[idx]
        keys = sorted_unique(mkey)
        mk = np.searchsorted(keys, mkey)
        mods = np.array([self._module(int(m)) for m in keys] + [b""], object)
        args = np.empty((len(idx), 4), object)
        args[:, 0] = [tab[a:b] for a, b in zip(noff.tolist(), nend.tolist())]
        args[:, 1] = off.tolist()
        args[:, 2] = img.syms["st_size"][idx].tolist()
        args[:, 3] = mods[mk]
        text = b"%s+0x%x/0x%x%s\0" * len(idx) % tuple(args.ravel().tolist())
        return text.split(b"\0")[:-1]

    def _module(self, key: int) -> bytes:
        if key not in self._mods:
            mod = self.img.modname(key)
            self._mods[key] = (b" [%s]" % mod.encode("utf-8", "surrogateescape")
                               if mod and not is_pseudo_module(mod) else b"")
        return self._mods[key]

    def rewrite(self, data: bytes) -> bytes:
        """``data`` with every kernel address inside a symbol replaced by its %pS form."""
        out = self._rewrite(data)
        return out if isinstance(out, bytes) else bytes(out)

    def _rewrite(self, data: bytes | bytearray, own: bool = False) -> bytes | bytearray:
        """rewrite, as bytes or (spared a copy) a bytearray. ``own``: ``data`` is a
        bytearray nobody else holds, overwritten in place (a stream's piece)."""
        text = data.replace(b"%", b"%%") if b"%" in data else data  # "%" is not a word byte
        own = isinstance(text, bytearray) and (own or text is not data)
        starts, ends, vals = self.candidates(text)
        if len(starts) == 0:
            return data
        idx = self._known(vals)
        keep = np.flatnonzero(self._cache.found[idx])  # the candidates that are rewritten
        if len(keep) == 0:
            return data
        self.rewritten += len(keep)
        reps = self._cache.texts[idx[keep]].tolist()
        return self._template(text, starts[keep], ends[keep], own) % tuple(reps)

    def _template(self, text: bytes | bytearray, starts: np.ndarray, ends: np.ndarray,
                  in_place: bool = False) -> bytearray:
        """``text`` with each [start, end) overwritten by ``%-...-s`` of the same length:
        flags only ("-" may repeat), no width, so it prints its argument as it is.
        ``in_place``: ``text`` is a bytearray of ours, written over instead of copied."""
        out = text if in_place else bytearray(text)
        t = np.frombuffer(out, np.uint8)
        w = self.width
        prefixed = ends - starts != w
        for length, sel in ((w, ~prefixed), (w + 2, prefixed)):
            if np.any(sel):
                spec = np.frombuffer(b"%" + b"-" * (length - 2) + b"s", np.uint8)
                as_strided(t, (len(t) - length + 1, length), (1, 1))[starts[sel]] = spec
        del t  # the bytearray may be formatted (%) only once no view holds it
        return out

    def stream(self, src: BinaryIO, block: int = 1 << 23) -> Iterator[bytes | bytearray]:
        """Rewritten text of ``src``, whole lines at a time: as much as is there at once
        (up to ``block`` bytes: a file in big pieces), what has arrived (a pipe that
        delivers a line at a time gets each line back at once)."""
        read = getattr(src, "read1", src.read)
        tail, eof = b"", False
        while not eof:
            parts, size = [tail], len(tail)
            while True:
                chunk = read(block)
                if not chunk:
                    eof = True
                    break
                parts.append(chunk)
                size += len(chunk)
                if size >= block or not _ready(src):
                    break
            data = bytearray().join(parts)  # ours: its lines are rewritten in place
            cut = data.rfind(b"\n") + 1
            tail = bytes(data[cut:])
            del data[cut:]
            if cut:
                yield self._rewrite(data, own=True)
        if tail:
            yield self._rewrite(tail)


def _ready(src: BinaryIO) -> bool:
    """More to read from ``src`` without waiting (always, for what select cannot tell)."""
    try:
        fd = src.fileno()
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return True


def symbolize_text(image, data: bytes) -> bytes:
    """Rewrite the kernel addresses in ``data`` (see the module docstring)."""
    return Symbolizer(image).rewrite(data)
