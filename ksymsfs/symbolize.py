"""Rewrite kernel addresses in any text as the kernel's %pS prints them: sym+0xoff/0xsize [mod].

A candidate is a whole hex word of the image's address width (16 digits, or 8 for a
32-bit kernel), with or without ``0x``: not part of a longer word, not a small number
or a timestamp. Candidates inside a symbol become ``name+0xoff/0xsize``, plus `` [mod]``
for a module (not for pseudo-modules such as ``[bpf]``, as %pS); everything else,
including addresses outside every symbol and 0, stays byte for byte.

Candidates are found with numpy over the bytes (runs of word bytes of the right length
and digits, exactly the words a regex ``\\b(0x)?[0-9a-f]{W}\\b`` takes); the distinct ones
are parsed and looked up together (searchsorted), then the pieces are joined again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from .kallsyms import is_pseudo_module
from .npreader import Image, locate
from .reader import parse_image

_HEXVAL = np.full(256, 255, np.uint8)
_IS_WORD = np.zeros(256, bool)  # what a regex \w is in bytes: letters, digits, "_"
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEXVAL[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEXVAL[_c] = 10 + _i
for _c in b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_":
    _IS_WORD[_c] = True


def address_width(img: Image) -> int:
    """Hex digits of the kernel's addresses: 8 when every symbol fits 32 bits, else 16."""
    vals = img.syms["st_value"]
    return 8 if not len(vals) or int(vals.max()) <= 0xFFFFFFFF else 16


class Symbolizer:
    """An image's lookup, ready to rewrite text (``rewrite``), with a count of rewrites."""

    def __init__(self, image, width: int | None = None):
        img = parse_image(image, engine="numpy")
        self.img = img
        self.width = width or address_width(img)
        self.rewritten = 0
        self._mods: dict[int, bytes] = {}
        self._nul = np.flatnonzero(img.strtab == 0)

    def candidates(self, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, end, value) of every whole word that is W hex digits, or 0x and W."""
        w = self.width
        word = _IS_WORD[buf]
        edge = np.flatnonzero(word[1:] != word[:-1]) + 1  # where runs of word bytes change
        if len(buf) and word[0]:
            edge = np.concatenate(([0], edge))
        if len(buf) and word[-1]:
            edge = np.concatenate((edge, [len(buf)]))
        starts, ends = edge[0::2], edge[1::2]
        n = ends - starts
        sel = np.flatnonzero((n == w) | (n == w + 2))
        starts, ends = starts[sel], ends[sel]
        prefixed = n[sel] == w + 2
        ok = ~prefixed | ((buf[starts] == 0x30) & ((buf[np.minimum(starts + 1, len(buf) - 1)]
                                                   | 0x20) == 0x78))
        digits = _HEXVAL[buf[ends[:, None] - np.arange(w, 0, -1)]]  # 255: not a hex digit
        ok &= (digits != 255).all(axis=1)
        starts, ends, digits = starts[ok], ends[ok], digits[ok]
        vals = np.zeros(len(ends), np.uint64)
        for j in range(w):
            vals <<= np.uint64(4)
            vals |= digits[:, j]
        return starts, ends, vals

    def _format(self, idx: np.ndarray, off: np.ndarray) -> list[bytes]:
        """%pS text per symbol index and offset."""
        img = self.img
        tab = img.data_strtab
        noff = img.syms["st_name"][idx].astype(np.int64)
        nend = self._nul[np.searchsorted(self._nul, noff)]
        mods = [self._module(k) for k in img.modkey[idx].tolist()]
        return [b"%s+0x%x/0x%x%s" % (tab[a:b], o, z, m) for a, b, o, z, m in zip(
            noff.tolist(), nend.tolist(), off.tolist(),
            img.syms["st_size"][idx].tolist(), mods)]

    def _module(self, key: int) -> bytes:
        if key not in self._mods:
            mod = self.img.modname(key)
            self._mods[key] = (b" [%s]" % mod.encode("utf-8", "surrogateescape")
                               if mod and not is_pseudo_module(mod) else b"")
        return self._mods[key]

    def rewrite(self, data: bytes) -> bytes:
        """``data`` with every kernel address inside a symbol replaced by its %pS form."""
        buf = np.frombuffer(data, np.uint8)
        starts, ends, vals = self.candidates(buf)
        if len(starts) == 0:
            return data
        uniq, inv = np.unique(vals, return_inverse=True)
        hit, off = locate(self.img, uniq)
        hit[uniq == 0] = -1  # 0 is a null pointer or a hidden address, never a symbol
        found = np.flatnonzero(hit >= 0)
        text = np.full(len(uniq), -1, np.int64)
        text[found] = np.arange(len(found))
        which = text[inv]
        keep = np.flatnonzero(which >= 0)  # the candidates that are rewritten
        if len(keep) == 0:
            return data
        self.rewritten += len(keep)
        reps = self._format(hit[found], off[found])
        cut_s, cut_e = starts[keep].tolist(), ends[keep].tolist()
        out: list[bytes] = [b""] * (2 * len(keep) + 1)
        out[0:-1:2] = map(data.__getitem__, map(slice, [0, *cut_e], cut_s))  # text between
        out[1::2] = map(reps.__getitem__, which[keep].tolist())
        out[-1] = data[cut_e[-1]:]
        return b"".join(out)

    def stream(self, src: BinaryIO, block: int = 1 << 20) -> Iterator[bytes]:
        """Rewritten text of ``src``, whole lines at a time as they arrive (a pipe too)."""
        read = getattr(src, "read1", src.read)
        tail = b""
        while True:
            chunk = read(block)
            if not chunk:
                break
            chunk = tail + chunk
            cut = chunk.rfind(b"\n") + 1
            tail = chunk[cut:]
            if cut:
                yield self.rewrite(chunk[:cut])
        if tail:
            yield self.rewrite(tail)


def symbolize_text(image, data: bytes) -> bytes:
    """Rewrite the kernel addresses in ``data`` (see the module docstring)."""
    return Symbolizer(image).rewrite(data)
