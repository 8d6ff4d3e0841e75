"""Parse /proc/kallsyms text into a SymbolTable, vectorized; errors name file:line."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .errors import ParseError
from .letters import LETTER_CLASS

KSYM_NAME_LEN = 512  # kernel limit including the NUL: names are at most 511 bytes
PSEUDO_MODULES = ("bpf",)  # and every "__builtin__*" ([__builtin__ftrace], ...)

_HEX_DIGITS = b"0123456789abcdefABCDEF"
_HEX = np.full(256, 255, np.uint8)  # byte -> its hex value, 255 if not a hex digit
for _c in _HEX_DIGITS:
    _HEX[_c] = int(chr(_c), 16)


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
    if not tab and _BLANK_MODULE.fullmatch(rest[2:]):
        return ("module suffix after spaces, not a TAB (a terminal capture? "
                "--lenient accepts it)")
    if not name or b" " in name:
        return "malformed symbol name"
    if len(name) >= KSYM_NAME_LEN:
        return f"symbol name is {len(name)} bytes, longer than {KSYM_NAME_LEN - 1}"
    if tab and (len(mod) < 3 or mod[:1] != b"[" or mod[-1:] != b"]" or b"\t" in mod
                or b" " in mod):
        return "malformed module suffix (expected TAB '[' MODULE ']')"
    return "malformed line"


# NAME, blanks, [MODULE]: a module line whose TAB became spaces (copied from a terminal)
_BLANK_MODULE = re.compile(rb"([^\x00-\x20\x7f]{1,%d})[ \t]+\[([^\x00-\x20\x7f]+)\]"
                           % (KSYM_NAME_LEN - 1))

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
    width = _address_width(data, path, lenient)
    out = _Collector(data, width)
    pos, line_base = 0, 0
    while pos < len(buf):
        end = min(pos + CHUNK, len(buf))
        if end < len(buf):
            cut = data.rfind(b"\n", pos, end)
            end = (cut if cut >= 0 else data.find(b"\n", end)) + 1
        chunk = _parse_chunk(data, buf[pos:end], pos, width, path, lenient, line_base)
        line_base += chunk["nlines"]
        out.add(buf[pos:end], pos, chunk)
        pos = end
    if out.count == 0:
        raise ParseError(path, None, "no symbol lines found")
    return out.table(width)


class _Collector:
    """Accumulates per-chunk results into the final arrays, string table and module list.

    The arrays are allocated once with room for the most lines ``data`` can hold (a line
    is at least ``width + 5`` bytes); pages never written cost no memory, and the arrays
    are shrunk in place at the end: no per-chunk parts, no concatenation copy.
    """

    def __init__(self, data: bytes, width: int):
        self.data = data
        cap = len(data) // (width + 5) + 1
        self.arrays = {"addr": np.empty(cap, np.uint64), "letter": np.empty(cap, np.uint8),
                       "module": np.empty(cap, np.uint32), "name_off": np.empty(cap, np.uint32)}
        self.strtab = bytearray(b"\0")
        self.names: dict[bytes, int] = {}
        self.count = self.skipped = 0

    def add(self, view: np.ndarray, pos: int, c: dict) -> None:
        """Take one chunk's lines; its positions are relative to ``view`` = data[pos:...]."""
        self.skipped += c["skipped"]
        lo = self.count
        self.count = hi = lo + len(c["addr"])
        out = self.arrays
        out["addr"][lo:hi] = c["addr"]
        out["letter"][lo:hi] = c["letter"]
        self._module_ids(out["module"][lo:hi], view, pos, c["tabpos"], c["ends"], c["hasmod"])
        out["name_off"][lo:hi] = self._names(view, c["name_start"], c["name_len"])

    def _module_ids(self, module, view, pos, tabpos, ends, has) -> None:
        """Module index per line (0 = kernel), names interned in first-appearance order.

        Lines with a module suffix come in runs of one module: runs are found vectorially
        (a run starts where the name's length or bytes differ from the line before), and
        only each run's first name is looked up. Written into ``module``.
        """
        module[:] = 0
        idx = np.flatnonzero(has)
        if len(idx) == 0:
            return
        a = tabpos[idx] + 2            # the name in "\t[name]"
        n = ends[idx] - 1 - a          # its length (>= 1)
        new = np.ones(len(idx), bool)
        if len(idx) > 1:
            same = np.flatnonzero(n[1:] == n[:-1])  # pair (j, j+1) of equal-length names
            if len(same):
                ln = n[same]
                off = np.cumsum(ln) - ln
                at = np.repeat(a[same + 1] - off, ln)
                at += np.arange(len(at), dtype=at.dtype)  # every byte of name j+1 ...
                differ = view[at] != view[at - np.repeat(a[same + 1] - a[same], ln)]  # ... vs j
                new[same + 1] = np.logical_or.reduceat(differ, off)
        first = np.flatnonzero(new)
        names, data = self.names, self.data
        ids = [names.setdefault(data[pos + i:pos + i + k], len(names) + 1)
               for i, k in zip(a[first].tolist(), n[first].tolist())]
        module[idx] = np.repeat(np.array(ids, np.uint32), np.diff(first, append=len(idx)))

    def _names(self, view, name_start, name_len) -> np.ndarray:
        """Append the chunk's names (each plus its terminator, made NUL) to the strtab."""
        base = len(self.strtab)
        k = len(name_start)
        if k == 0:
            return np.zeros(0, np.uint32)
        lo, hi = int(name_start[0]), int(name_start[-1] + name_len[-1]) + 1
        # keep-mask over view[lo:hi]: alternate runs of skipped bytes and name+terminator
        runs = np.empty(2 * k, name_len.dtype)
        runs[0] = 0
        runs[1::2] = name_len + 1
        runs[2::2] = name_start[1:] - name_start[:-1] - runs[1:-1:2]
        keep = np.empty(2 * k, bool)
        keep[0::2] = False
        keep[1::2] = True
        got = view[lo:hi][np.repeat(keep, runs)]
        stop = np.cumsum(runs[1::2])  # one past each terminator, within the chunk's part
        got[stop - 1] = 0
        self.strtab += got.data
        return (base + stop - runs[1::2]).astype(np.uint32)

    def table(self, width: int) -> SymbolTable:
        out = self.arrays
        for arr in out.values():
            arr.resize(self.count, refcheck=False)  # in place: frees the unused tail
        modules = [""] + [k.decode("utf-8", "surrogateescape") for k in self.names]
        return SymbolTable(addr=out["addr"], letter=out["letter"], module=out["module"],
                           name_off=out["name_off"], strtab=self.strtab, modules=modules,
                           address_bits=width * 4, skipped=self.skipped)


def _address_width(data: bytes, path: str, lenient: bool = False) -> int:
    """8 or 16: the address width of the first symbol line (strict: of the first line
    that starts with an address; lenient: of the first line that is a whole symbol line,
    so a junk line that merely starts with hex digits does not decide)."""
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        sp = data.find(b" ", pos, end)
        if sp - pos in (8, 16) and all(_HEX[b] != 255 for b in data[pos:sp]):
            line = data[pos:end + 1]
            if not lenient or len(_parse_chunk(line, np.frombuffer(line, np.uint8), 0,
                                               sp - pos, path, True, 0)["addr"]):
                return sp - pos
        pos = end + 1
    first = data[:data.find(b"\n")].rstrip(b"\r")
    raise ParseError(path, 1, _diagnose(first, 16), first)


def _parse_chunk(data, view, pos, width, path, lenient, line_base) -> dict:
    """Validate and split the whole lines in ``view`` = data[pos:...]; positions returned
    are relative to ``view``.

    Works on "tokens", the bytes <= 32 (space, TAB, CR, LF and the other controls): a good
    line ``ADDR TYPE NAME[\\tMODULE][\\r]\\n`` has exactly the tokens space at ADDR's end,
    space after TYPE, an optional TAB, an optional CR just before the LF, and the LF.
    """
    it = np.int32 if len(view) < 1 << 30 else np.int64
    tok = np.flatnonzero(view <= 32).astype(it)  # positions of the tokens
    kind = view[tok]
    nli = np.flatnonzero(kind == 10).astype(it)  # token index of each line's LF
    nl = tok[nli]
    nlines = len(nl)
    starts = np.empty(nlines, it)
    starts[0] = 0
    starts[1:] = nl[:-1] + 1
    first = np.empty(nlines, it)  # token index of each line's first token
    first[0] = 0
    first[1:] = nli[:-1] + 1
    cr = (nl > starts) & (view[nl - 1] == 13)  # CRLF: the CR is not part of the line
    ends = nl - cr
    inner = nli - first - cr  # tokens in [start, end)
    second = np.minimum(first + 1, len(tok) - 1)
    third = np.minimum(first + 2, len(tok) - 1)
    sp = starts + width
    hasmod = inner == 3
    ok = hasmod | (inner == 2)
    ok &= (tok[first] == sp) & (kind[first] == 32)
    ok &= (tok[second] == sp + 2) & (kind[second] == 32)
    ok &= (ends - starts >= width + 4)
    tabpos = np.where(hasmod, tok[third], ends)
    ok &= ~hasmod | (kind[third] == 9)
    letter = view[np.where(ok, sp + 1, 0)]
    ok &= (letter != 0) & (np.take(LETTER_CLASS, letter) != 255)
    name_start = sp + 3
    name_len = tabpos - name_start
    ok &= (name_len >= 1) & (name_len < KSYM_NAME_LEN)
    hasmod &= ok
    ok &= ~hasmod | ((ends - tabpos >= 4) & (view[np.where(hasmod, tabpos + 1, 0)] == 91)
                     & (view[np.where(hasmod, ends - 1, 0)] == 93))  # "[" ... "]"
    if data.find(b"\x7f", pos, pos + len(view)) >= 0:  # DEL is a control character too
        ok &= _count_in(np.flatnonzero(view == 127), starts, ends) == 0
    addr, hex_ok = _hex_column(view, np.where(ok, starts, 0), width)
    ok &= hex_ok
    if lenient and not ok.all():
        _rescue_blank_modules(data, pos, width, starts, ends, ok, addr, letter, name_len,
                              tabpos, hasmod)
    keep = np.flatnonzero(ok)
    if len(keep) < nlines and not lenient:
        i = int(np.argmin(ok))  # the first bad line
        line = data[pos + starts[i]:pos + ends[i]]
        raise ParseError(path, line_base + i + 1, _diagnose(line, width), line)
    if len(keep) < nlines:
        addr, letter, name_start, name_len, tabpos, ends, hasmod = (
            x[keep] for x in (addr, letter, name_start, name_len, tabpos, ends, hasmod))
    return {"addr": addr, "letter": letter, "name_start": name_start, "name_len": name_len,
            "tabpos": tabpos, "ends": ends, "hasmod": hasmod,
            "skipped": nlines - len(keep), "nlines": nlines}


def _rescue_blank_modules(data, pos, width, starts, ends, ok, addr, letter, name_len,
                          tabpos, hasmod) -> None:
    """Lenient mode: accept ``ADDR TYPE NAME<blanks>[MODULE]`` among the rejected lines,
    filling their fields in place (``tabpos`` = just before "[", as for a TAB)."""
    for i in np.flatnonzero(~ok).tolist():
        lo, hi = pos + int(starts[i]), pos + int(ends[i])
        line = data[lo:hi]
        if (len(line) < width + 4 or line[width:width + 1] != b" "
                or line[width + 2:width + 3] != b" " or LETTER_CLASS[line[width + 1]] == 255
                or b"\x7f" in line):
            continue
        m = _BLANK_MODULE.fullmatch(line, width + 3)
        if m is None or line[:width].translate(None, _HEX_DIGITS):  # not all hex digits
            continue  # (int(..., 16) alone would take "0x", "_" and blanks)
        ok[i], addr[i], letter[i], hasmod[i] = True, int(line[:width], 16), line[width + 1], True
        name_len[i] = m.end(1) - m.start(1)
        tabpos[i] = starts[i] + m.start(2) - 2


def _hex_pairs() -> np.ndarray:
    """Two hex digits, read as one native uint16 -> their value, or 0x100 if not hex."""
    pair = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    hi, lo = _HEX[pair[:, 0]].astype(np.uint16), _HEX[pair[:, 1]].astype(np.uint16)
    return np.where((hi != 255) & (lo != 255), hi << 4 | lo, 0x100).astype(np.uint16)


_PAIR = _hex_pairs()


def _hex_column(buf: np.ndarray, starts: np.ndarray, width: int):
    """Fixed-width hex at each start -> (uint64 values, all-digits-valid mask)."""
    n = len(starts)
    if len(buf) < width:
        return np.zeros(n, np.uint64), np.zeros(n, bool)
    # every width-byte window of buf as one item; take the ones at ``starts``
    win = np.ndarray((len(buf) - width + 1,), f"V{width}", buf, 0, (1,))
    val = np.take(_PAIR, win[np.minimum(starts, len(win) - 1)].view(np.uint16))
    bad = (val.view(np.uint64) & np.uint64(0xFF00FF00FF00FF00)).reshape(n, width // 8)
    valid = bad[:, 0] == 0 if width == 8 else (bad[:, 0] | bad[:, 1]) == 0
    digits = val.astype(np.uint8).view(f">u{width // 2}")  # byte k = digit pair k
    return digits.astype(np.uint64), valid
