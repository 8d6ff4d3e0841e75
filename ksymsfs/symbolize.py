"""Rewrite kernel addresses in any text as the kernel's %pS prints them: sym+0xoff/0xsize [mod].

A candidate is a whole hex word of the image's address width (16 digits, or 8 for a
32-bit kernel), with or without ``0x``: not part of a longer word, not a small number
or a timestamp. Candidates inside a symbol become ``name+0xoff/0xsize``, plus `` [mod]``
for a module (not for pseudo-modules such as ``[bpf]``, as %pS); everything else,
including addresses outside every symbol and 0, stays byte for byte.

The text is split by one regex pass; the distinct candidates are parsed and looked up
together with numpy (searchsorted), then the pieces are joined again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from .kallsyms import is_pseudo_module
from .npreader import Image, locate
from .reader import parse_image

_HEXVAL = np.full(256, 0, np.uint64)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEXVAL[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEXVAL[_c] = 10 + _i


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
        self.pattern = re.compile(rb"(?<![0-9A-Za-z_])(0[xX])?([0-9a-fA-F]{%d})(?![0-9A-Za-z_])"
                                  % self.width)
        self.rewritten = 0

    def _values(self, hexes: list[bytes]) -> np.ndarray:
        digits = _HEXVAL[np.frombuffer(b"".join(hexes), np.uint8)].reshape(-1, self.width)
        vals = np.zeros(len(hexes), np.uint64)
        for j in range(self.width):
            vals <<= np.uint64(4)
            vals |= digits[:, j]
        return vals

    def _format(self, i: int, off: int) -> bytes:
        img = self.img
        mod = img.module(i)
        tail = f" [{mod}]" if mod and not is_pseudo_module(mod) else ""
        return (f"{img.name(i)}+{off:#x}/{int(img.syms['st_size'][i]):#x}{tail}"
                .encode("utf-8", "surrogateescape"))

    def rewrite(self, data: bytes) -> bytes:
        """``data`` with every kernel address inside a symbol replaced by its %pS form."""
        parts = self.pattern.split(data)  # text, 0x-or-None, hex, text, ...
        if len(parts) == 1:
            return data
        hexes = parts[2::3]
        uniq, inv = np.unique(self._values(hexes), return_inverse=True)
        hit, off = locate(self.img, uniq)
        hit[uniq == 0] = -1  # 0 is a null pointer or a hidden address, never a symbol
        found = np.flatnonzero(hit >= 0)
        repl: list[bytes | None] = [None] * len(uniq)
        for k, i, o in zip(found.tolist(), hit[found].tolist(), off[found].tolist()):
            repl[k] = self._format(i, o)
        new = [repl[k] for k in inv.tolist()]
        self.rewritten += sum(r is not None for r in new)
        parts[1::3] = [b"" if r is not None else (p or b"") for r, p in zip(new, parts[1::3])]
        parts[2::3] = [h if r is None else r for r, h in zip(new, hexes)]
        return b"".join(parts)

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
