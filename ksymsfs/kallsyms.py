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
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], nl[:-1] + 1))
    ends = nl.copy()
    has_cr = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13)
    ends -= has_cr
    return _parse_lines(data, buf, starts, ends, path, lenient)


def _parse_lines(data, buf, starts, ends, path, lenient) -> SymbolTable:
    spaces = np.flatnonzero(buf == 32)
    tabs = np.flatnonzero(buf == 9)
    ctrl = np.flatnonzero(((buf < 32) & (buf != 9) & (buf != 10)) | (buf == 127))
    # width of the address field = offset of the first space in the line
    si = np.searchsorted(spaces, starts)
    first_sp = spaces[np.minimum(si, len(spaces) - 1)] if len(spaces) else starts
    width_i = np.where(si < len(spaces), first_sp - starts, -1)
    cand = np.flatnonzero((width_i == 8) | (width_i == 16))
    if len(cand) == 0:
        raise ParseError(path, 1, _diagnose(data[starts[0]:ends[0]], 16),
                         data[starts[0]:ends[0]])
    width = int(width_i[cand[0]])
    ok = (width_i == width) & (ends - starts >= width + 4)
    ok &= _count_in(spaces, starts, ends) == 2
    ok &= _count_in(ctrl, starts, ends) == 0
    ntab = _count_in(tabs, starts, ends)
    ok &= ntab <= 1
    lp = np.where(ok, starts + width, 0)
    ok &= (buf[lp + 1] != 0) & (LETTER_CLASS[buf[lp + 1]] != 255) & (buf[lp + 2] == 32)
    name_start = starts + width + 3
    ti = np.searchsorted(tabs, starts)
    tabpos = np.where(ntab == 1, tabs[np.minimum(ti, max(len(tabs) - 1, 0))] if len(tabs)
                      else ends, ends)
    name_end = np.where(ntab == 1, tabpos, ends)
    name_len = name_end - name_start
    ok &= (name_len >= 1) & (name_len < KSYM_NAME_LEN)
    hasmod = ok & (ntab == 1)
    mp = np.where(hasmod, tabpos, 0)
    closing = buf[np.maximum(ends - 1, 0)] == 93  # "]"
    ok &= ~hasmod | ((ends - tabpos >= 4) & (buf[mp + 1] == 91) & closing)
    addr, hex_ok = _hex_column(buf, np.where(ok, starts, 0), width)
    ok &= hex_ok
    bad = np.flatnonzero(~ok)
    if len(bad) and not lenient:
        i = int(bad[0])
        line = data[starts[i]:ends[i]]
        raise ParseError(path, i + 1, _diagnose(line, width), line)
    keep = np.flatnonzero(ok)
    if len(keep) == 0:
        raise ParseError(path, None, "no symbol lines found")
    module, modules = _modules(data, tabpos[keep], ends[keep], ntab[keep] == 1)
    strtab, name_off = _strtab(buf, name_start[keep], name_len[keep])
    return SymbolTable(addr=addr[keep], letter=buf[starts[keep] + width + 1].copy(),
                       module=module, name_off=name_off, strtab=strtab, modules=modules,
                       address_bits=width * 4, skipped=len(bad))


def _hex_column(buf: np.ndarray, starts: np.ndarray, width: int):
    """Fixed-width hex at each start -> (uint64 values, all-digits-valid mask)."""
    acc = np.zeros(len(starts), np.uint64)
    valid = np.ones(len(starts), bool)
    for j in range(width):
        nib = _HEX[buf[np.minimum(starts + j, len(buf) - 1)]]
        valid &= nib != 255
        acc = (acc << np.uint64(4)) | (nib & 15).astype(np.uint64)
    return acc, valid


def _modules(data: bytes, tabpos, ends, has) -> tuple[np.ndarray, list[str]]:
    """Module index per line (0 = kernel), interning names in first-appearance order."""
    module = np.zeros(len(tabpos), np.uint32)
    idx = np.flatnonzero(has)
    if len(idx) == 0:
        return module, [""]
    names: dict[bytes, int] = {}
    ids = np.empty(len(idx), np.uint32)
    tp, en = tabpos[idx].tolist(), ends[idx].tolist()
    prev_key, prev_id = None, 0
    for k, (a, b) in enumerate(zip(tp, en)):
        key = data[a + 2:b - 1]
        if key != prev_key:
            prev_id = names.setdefault(key, len(names) + 1)
            prev_key = key
        ids[k] = prev_id
    module[idx] = ids
    return module, [""] + [k.decode("utf-8", "surrogateescape") for k in names]


def _strtab(buf: np.ndarray, name_start: np.ndarray, name_len: np.ndarray):
    """Gather every name plus its terminator byte, then turn terminators into NULs."""
    mark = np.zeros(len(buf) + 2, np.int8)
    mark[name_start] = 1
    mark[name_start + name_len + 1] -= 1
    np.cumsum(mark, out=mark)
    out = buf[mark[:len(buf)].view(bool)]
    ends = np.cumsum(name_len + 1)
    out[ends - 1] = 0
    name_off = (ends - name_len).astype(np.uint32)  # +1 for the leading NUL, -1 for end
    return b"\0" + out.tobytes(), name_off
