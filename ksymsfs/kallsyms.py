"""Parse /proc/kallsyms text into a SymbolTable, vectorized; errors name file:line."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ParseError
from .letters import LETTER_CLASS

KSYM_NAME_LEN = 512  # kernel limit including the NUL: names are at most 511 bytes
PSEUDO_MODULES = ("bpf", "__builtin__ftrace", "__builtin__kprobes")

_HEX = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def is_pseudo_module(name: str) -> bool:
    """Kernel-made module-like groups ([bpf], [__builtin__ftrace], ...) not in /proc/modules."""
    return name in PSEUDO_MODULES or name.startswith("__builtin__")


@dataclass
class SymbolTable:
    """Symbols in kallsyms order. ``strtab`` is an ELF string table holding every name."""

    addr: np.ndarray          # uint64 symbol addresses
    letter: np.ndarray        # uint8 ASCII type letter
    module: np.ndarray        # uint32 index into ``modules`` (0 = the kernel itself)
    name_off: np.ndarray      # uint32 offset of the NUL-terminated name in ``strtab``
    strtab: bytes             # b"\0" + b"name\0" * N
    modules: list[str] = field(default_factory=lambda: [""])
    address_bits: int = 64
    skipped: int = 0          # junk lines skipped in lenient mode

    def __len__(self) -> int:
        return int(self.addr.shape[0])

    def name(self, i: int) -> str:
        off = int(self.name_off[i])
        return self.strtab[off:self.strtab.index(b"\0", off)].decode("utf-8", "surrogateescape")


def _count_in(positions: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """How many of the sorted ``positions`` fall in each [start, end)."""
    return np.searchsorted(positions, ends) - np.searchsorted(positions, starts)


def _diagnose(line: bytes, width: int) -> str:
    """A human reason why one line is not ``ADDR TYPE NAME[\\t[MODULE]]`` (slow path, one line)."""
    if not line.strip():
        return "empty line"
    if any(b < 32 and b != 9 or b == 127 for b in line):
        return "control character in line"
    head, _, rest = line.partition(b" ")
    if len(head) not in (8, 16) or not rest:
        return "malformed line (expected 'ADDRESS TYPE NAME [MODULE]')"
    if any(_HEX[b] == 255 for b in head):
        return "bad hex address"
    if len(head) != width:
        return f"address is {len(head)} hex digits, earlier lines have {width}"
    if len(rest) < 3 or rest[1:2] != b" ":
        return "malformed line (expected 'ADDRESS TYPE NAME [MODULE]')"
    if LETTER_CLASS[rest[0]] == 255:
        return f"unknown symbol type letter {chr(rest[0])!r}"
    name, tab, mod = rest[2:].partition(b"\t")
    if not name or b" " in name:
        return "malformed symbol name"
    if len(name) >= KSYM_NAME_LEN:
        return f"symbol name is {len(name)} bytes, longer than {KSYM_NAME_LEN - 1}"
    if tab and (len(mod) < 3 or mod[:1] != b"[" or mod[-1:] != b"]" or b"\t" in mod
                or b" " in mod):
        return "malformed module suffix (expected TAB '[' MODULE ']')"
    return "malformed line"


CHUNK = 1 << 20  # lines are parsed a megabyte at a time: temporaries stay small


def parse_kallsyms(data: bytes, path: str = "<kallsyms>", lenient: bool = False) -> SymbolTable:
    """Parse kallsyms bytes. Strict: the first bad line raises ParseError(path:line).

    Lenient: lines that are not symbol lines (headers, separators, junk) are skipped and
    counted in ``skipped``. CRLF line ends are accepted in both modes.
    """
    if not data:
        raise ParseError(path, None, "empty file (no symbol lines)")
    if data[-1:] != b"\n":
        if not lenient:
            nlines = data.count(b"\n") + 1
            raise ParseError(path, nlines, "truncated last line (no newline at end of file)",
                             data[data.rfind(b"\n") + 1:])
        data = data + b"\n"
    buf = np.frombuffer(data, np.uint8)
    width = _address_width(data, path)
    out = _Collector(data, buf)
    pos, line_base = 0, 0
    while pos < len(buf):
        end = min(pos + CHUNK, len(buf))
        if end < len(buf):
            cut = data.rfind(b"\n", pos, end)
            end = (cut if cut >= 0 else data.find(b"\n", end)) + 1
        chunk = _parse_chunk(data, buf, pos, end, width, path, lenient, line_base)
        line_base += chunk["nlines"]
        out.add(chunk)
        pos = end
    if out.count == 0:
        raise ParseError(path, None, "no symbol lines found")
    return out.table(width)


class _Collector:
    """Accumulates per-chunk results into the final arrays, string table and module list."""

    def __init__(self, data: bytes, buf: np.ndarray):
        self.data, self.buf = data, buf
        self.parts: dict[str, list[np.ndarray]] = {"addr": [], "letter": [], "module": [],
                                                   "name_off": []}
        self.strtab = bytearray(b"\0")
        self.names: dict[bytes, int] = {}
        self.count = self.skipped = 0

    def add(self, c: dict) -> None:
        self.skipped += c["skipped"]
        self.count += len(c["addr"])
        self.parts["addr"].append(c["addr"])
        self.parts["letter"].append(c["letter"])
        self.parts["module"].append(self._module_ids(c["tabpos"], c["ends"], c["hasmod"]))
        self.parts["name_off"].append(self._names(c["name_start"], c["name_len"]))

    def _module_ids(self, tabpos, ends, has) -> np.ndarray:
        """Module index per line (0 = kernel), names interned in first-appearance order."""
        module = np.zeros(len(tabpos), np.uint32)
        idx = np.flatnonzero(has)
        if len(idx) == 0:
            return module
        ids = np.empty(len(idx), np.uint32)
        prev_key, prev_id = None, 0
        for k, (a, b) in enumerate(zip(tabpos[idx].tolist(), ends[idx].tolist())):
            key = self.data[a + 2:b - 1]
            if key != prev_key:
                prev_id = self.names.setdefault(key, len(self.names) + 1)
                prev_key = key
            ids[k] = prev_id
        module[idx] = ids
        return module

    def _names(self, name_start, name_len) -> np.ndarray:
        """Append the chunk's names (each plus its terminator, made NUL) to the strtab."""
        base = len(self.strtab)
        if len(name_start) == 0:
            return np.zeros(0, np.uint32)
        lo, hi = int(name_start[0]), int(name_start[-1] + name_len[-1]) + 1
        mark = np.zeros(hi - lo + 1, np.int8)
        mark[name_start - lo] = 1
        mark[name_start - lo + name_len + 1] -= 1
        np.cumsum(mark, out=mark)
        got = self.buf[lo:hi][mark[:-1].view(bool)]
        ends = np.cumsum(name_len + 1) - 1
        got[ends] = 0
        self.strtab += got.data
        return (base + ends - name_len).astype(np.uint32)

    def table(self, width: int) -> SymbolTable:
        cat = {k: np.concatenate(v) for k, v in self.parts.items()}
        modules = [""] + [k.decode("utf-8", "surrogateescape") for k in self.names]
        return SymbolTable(addr=cat["addr"], letter=cat["letter"], module=cat["module"],
                           name_off=cat["name_off"], strtab=self.strtab, modules=modules,
                           address_bits=width * 4, skipped=self.skipped)


def _address_width(data: bytes, path: str) -> int:
    """8 or 16: the address width of the first line that looks like a symbol line."""
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        sp = data.find(b" ", pos, end)
        if sp - pos in (8, 16) and all(_HEX[b] != 255 for b in data[pos:sp]):
            return sp - pos
        pos = end + 1
    first = data[:data.find(b"\n")].rstrip(b"\r")
    raise ParseError(path, 1, _diagnose(first, 16), first)


def _parse_chunk(data, buf, pos, end, width, path, lenient, line_base) -> dict:
    """Validate and split the whole lines in buf[pos:end]; positions returned are absolute."""
    view = buf[pos:end]
    nl = np.flatnonzero(view == 10)
    starts = np.concatenate(([0], nl[:-1] + 1))
    ends = nl.copy()
    ends -= (ends > starts) & (view[np.maximum(ends - 1, 0)] == 13)  # CRLF
    spaces = np.flatnonzero(view == 32)
    tabs = np.flatnonzero(view == 9)
    ctrl = np.flatnonzero((view < 32) & (view != 9) & (view != 10) | (view == 127))
    si = np.searchsorted(spaces, starts)
    first_sp = spaces[np.minimum(si, len(spaces) - 1)] if len(spaces) else starts
    ok = (si < len(spaces)) & (first_sp - starts == width) & (ends - starts >= width + 4)
    ok &= _count_in(spaces, starts, ends) == 2
    ok &= _count_in(ctrl, starts, ends) == 0
    ntab = _count_in(tabs, starts, ends)
    ok &= ntab <= 1
    lp = np.where(ok, starts + width, 0)
    ok &= (view[lp + 1] != 0) & (LETTER_CLASS[view[lp + 1]] != 255) & (view[lp + 2] == 32)
    name_start = starts + width + 3
    ti = np.minimum(np.searchsorted(tabs, starts), max(len(tabs) - 1, 0))
    tabpos = np.where(ntab == 1, tabs[ti] if len(tabs) else ends, ends)
    name_len = tabpos - name_start
    ok &= (name_len >= 1) & (name_len < KSYM_NAME_LEN)
    hasmod = ok & (ntab == 1)
    mp = np.where(hasmod, tabpos, 0)
    closing = view[np.maximum(ends - 1, 0)] == 93  # "]"
    ok &= ~hasmod | ((ends - tabpos >= 4) & (view[mp + 1] == 91) & closing)
    addr, hex_ok = _hex_column(view, np.where(ok, starts, 0), width)
    ok &= hex_ok
    bad = np.flatnonzero(~ok)
    if len(bad) and not lenient:
        i = int(bad[0])
        line = data[pos + starts[i]:pos + ends[i]]
        raise ParseError(path, line_base + i + 1, _diagnose(line, width), line)
    keep = np.flatnonzero(ok)
    return {"addr": addr[keep], "letter": view[starts[keep] + width + 1].copy(),
            "name_start": pos + name_start[keep], "name_len": name_len[keep],
            "tabpos": pos + tabpos[keep], "ends": pos + ends[keep], "hasmod": hasmod[keep],
            "skipped": len(bad), "nlines": len(starts)}


def _hex_column(buf: np.ndarray, starts: np.ndarray, width: int):
    """Fixed-width hex at each start -> (uint64 values, all-digits-valid mask)."""
    acc = np.zeros(len(starts), np.uint64)
    valid = np.ones(len(starts), bool)
    for j in range(width):
        nib = _HEX[buf[np.minimum(starts + j, len(buf) - 1)]]
        valid &= nib != 255
        acc = (acc << np.uint64(4)) | (nib & 15).astype(np.uint64)
    return acc, valid
