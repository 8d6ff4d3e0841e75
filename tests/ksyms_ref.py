"""An independent reference for sizes and %pS lookup, computed from kallsyms text in plain Python.

It follows README "Symbol sizes and lookup" without any ksymsfs code: a real symbol ends
at the next greater address of any real symbol; the last one of its module at its 4 KiB
page end (not past the next symbol); mapping symbols ($a $d $t $x[.N]) and symbols not in
memory (? N n) get no size and end nothing; sizes are capped at 0x10000.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from tests.helpers import Sym, parse_input

NO_ADDRESS = set("AaUwv")   # no section: never a lookup answer
NOT_IN_MEMORY = set("?Nn")  # in a section, but not loaded: size 0
PSEUDO = ("bpf",)           # and __builtin__*: %pS prints no [module] for them
CAP = 0x10000


def is_mapping(name: str) -> bool:
    return len(name) >= 2 and name[0] == "$" and name[1] in "adtx" and name[2:3] in ("", ".")


@dataclass(frozen=True)
class RefSym:
    addr: int
    name: str
    module: str
    size: int
    alone: bool  # no other real symbol at this address


class Reference:
    """Sizes and lookups for one dump."""

    def __init__(self, data: bytes):
        syms, _ = parse_input(data)
        sectioned = [s for s in syms if s.letter not in NO_ADDRESS]
        real = [s for s in sectioned if s.letter not in NOT_IN_MEMORY and not is_mapping(s.name)]
        starts = sorted({s.addr for s in real})
        by_mod: dict[str, list[int]] = {}
        for s in real:
            by_mod.setdefault(s.module, []).append(s.addr)
        last = {m: max(v) for m, v in by_mod.items()}
        count: dict[int, int] = {}
        for s in real:  # mapping symbols and symbols not in memory never compete
            count[s.addr] = count.get(s.addr, 0) + 1
        self.syms = [RefSym(s.addr, s.name, s.module, self._size(s, starts, last),
                            count[s.addr] == 1) for s in real]
        self.syms.sort(key=lambda r: r.addr)
        self.starts = [r.addr for r in self.syms]
        self.width = syms[0].width

    @staticmethod
    def _size(s: Sym, starts: list[int], last: dict[str, int]) -> int:
        if s.addr == 0:
            return 0
        k = bisect.bisect_right(starts, s.addr)
        end = starts[k] if k < len(starts) else 1 << 64
        if s.addr == last[s.module]:
            end = min(end, (s.addr // 0x1000 + 1) * 0x1000)
        return min(end - s.addr, CAP, (1 << 64) - 1 - s.addr)

    def containing(self, addr: int) -> RefSym | None:
        """The real symbol whose [start, start+size) holds ``addr``, if it is alone there."""
        k = bisect.bisect_right(self.starts, addr) - 1
        if k < 0:
            return None
        r = self.syms[k]
        return r if r.alone and addr - r.addr < max(r.size, 1) else None

    def ps(self, addr: int) -> str | None:
        """%pS text for ``addr`` (None outside every symbol)."""
        r = self.containing(addr)
        if r is None:
            return None
        pseudo = r.module in PSEUDO or r.module.startswith("__builtin__")
        mod = f" [{r.module}]" if r.module and not pseudo else ""
        return f"{r.name}+{addr - r.addr:#x}/{r.size:#x}{mod}"
