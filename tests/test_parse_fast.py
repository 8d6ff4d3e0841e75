"""Edge cases of the vectorized parser and builder helpers.

The parser works a chunk (``kallsyms.CHUNK`` bytes) at a time on "tokens" (bytes <= 32),
reads hex addresses two digits at a time, finds module runs vectorially and builds the
string table with one keep-mask per chunk; the builder sorts by packed keys and fills
sizes per run. Each test pins one of those against a plain per-line reference.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from ksymsfs import builder, kallsyms
from ksymsfs.errors import ParseError
from ksymsfs.kallsyms import parse_kallsyms
from ksymsfs.readbase import is_mapping_symbol
from ksymsfs.sizes import SIZE_CAP, infer_sizes, mapping_mask


def _reference(data: bytes) -> dict:
    """What a good kallsyms text must parse to, one line at a time (no junk lines)."""
    addr, letter, module, names, mods = [], [], [], [], {}
    for raw in data.split(b"\n")[:-1]:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        head, rest = line.split(b" ", 1)
        name, _, mod = rest[2:].partition(b"\t")
        addr.append(int(head, 16))
        letter.append(rest[0])
        names.append(name)
        module.append(mods.setdefault(mod[1:-1], len(mods) + 1) if mod else 0)
    return {"addr": addr, "letter": letter, "module": module, "names": names,
            "modules": [""] + [m.decode() for m in mods]}


def _check(data: bytes, **kw) -> kallsyms.SymbolTable:
    t = parse_kallsyms(data, **kw)
    ref = _reference(data)
    assert t.addr.tolist() == ref["addr"]
    assert t.letter.tolist() == ref["letter"]
    assert t.module.tolist() == ref["module"]
    assert t.modules == ref["modules"]
    assert [t.name(i).encode() for i in range(len(t))] == ref["names"]
    # the string table is exactly b"\0" + name + b"\0" per symbol, in order
    assert bytes(t.strtab) == b"\0" + b"".join(n + b"\0" for n in ref["names"])
    assert t.name_off.dtype == np.uint32 and t.module.dtype == np.uint32
    return t


def _table_tuple(t: kallsyms.SymbolTable) -> tuple:
    return (t.addr.tolist(), t.letter.tolist(), t.module.tolist(), t.name_off.tolist(),
            bytes(t.strtab), t.modules, t.address_bits, t.skipped)


def _mixed_text(n: int, seed: int = 0, width: int = 16) -> bytes:
    """Good lines: modules in runs and alternating, CRLF, hex case, names 1..511 bytes."""
    rng = random.Random(seed)
    mods = [b"", b"", b"\t[a]", b"\t[b]", b"\t[ab]", b"\t[ba]", b"\t[nf_conntrack_ipv6]",
            b"\t[nf_conntrack_ipv4]"]
    cur, out = b"", []
    for i in range(n):
        if rng.random() < 0.2:
            cur = rng.choice(mods)
        a = b"%0*x" % (width, rng.getrandbits(width * 4))
        if rng.random() < 0.3:
            a = a.upper()
        name = b"n" * rng.choice([1, 1, 2, 7, 30, 511]) if i % 5 == 0 else b"s%d" % i
        eol = b"\r\n" if rng.random() < 0.2 else b"\n"
        out.append(a + b" " + rng.choice(b"tTdDbBrRwW").to_bytes(1, "big") + b" " + name
                   + cur + eol)
    return b"".join(out)


@pytest.mark.parametrize("chunk", [1, 13, 64, 100, 4096])
def test_chunk_boundaries_do_not_change_the_result(monkeypatch, chunk):
    data = _mixed_text(400, seed=chunk)
    full = _table_tuple(_check(data))
    monkeypatch.setattr(kallsyms, "CHUNK", chunk)
    assert _table_tuple(_check(data)) == full


@pytest.mark.parametrize("chunk", [16, 64, 1 << 20])
def test_lenient_skips_and_line_numbers_across_chunks(monkeypatch, chunk):
    monkeypatch.setattr(kallsyms, "CHUNK", chunk)
    good = _mixed_text(50, seed=3).split(b"\n")[:-1]
    junk = [b"", b"# header", b"ffffffff81000000  t two_spaces", b"\r", b"x y z"]
    lines, bad_at = [], []
    for i, g in enumerate(good):
        if i % 7 == 3:
            bad_at.append(len(lines) + 1)
            lines.append(junk[i % len(junk)])
        lines.append(g)
    data = b"\n".join(lines) + b"\n"
    t = parse_kallsyms(data, lenient=True)
    assert t.skipped == len(bad_at)
    assert _table_tuple(t)[:6] == _table_tuple(_check(b"\n".join(good) + b"\n"))[:6]
    with pytest.raises(ParseError) as e:
        parse_kallsyms(data)
    assert e.value.lineno == bad_at[0]


def test_module_runs_alternating_and_equal_length_names():
    mods = [b"ab", b"ba", b"ab", b"", b"ab", b"abc", b"ab", b"xy", b"xy", b"", b"ba"]
    data = b"".join(b"ffffffffc0000%03x t s%d%s\n" % (i, i, b"\t[" + m + b"]" if m else b"")
                    for i, m in enumerate(mods * 3))
    t = _check(data)
    assert t.modules == ["", "ab", "ba", "abc", "xy"]
    assert t.module.tolist()[:11] == [1, 2, 1, 0, 1, 3, 1, 4, 4, 0, 2]


@pytest.mark.parametrize("chunk", [40, 1 << 20])
def test_module_runs_across_chunks(monkeypatch, chunk):
    monkeypatch.setattr(kallsyms, "CHUNK", chunk)
    data = b"".join(b"ffffffffc00%05x t s%d\t[%s]\n" % (i, i, b"m%d" % (i // 9 % 4))
                    for i in range(200))
    t = _check(data)
    assert t.modules == ["", "m0", "m1", "m2", "m3"]


@pytest.mark.parametrize("width", [8, 16])
def test_hex_digits_either_case(width):
    digits = "0123456789abcdefABCDEF"
    vals = ["".join(random.Random(k).choice(digits) for _ in range(width)) for k in range(200)]
    vals += ["0" * width, "f" * width, "F" * width, "9" * width, "a" * width]
    data = "".join(f"{v} T s{i}\n" for i, v in enumerate(vals)).encode()
    t = _check(data)
    assert t.addr.tolist() == [int(v, 16) for v in vals]
    assert t.address_bits == width * 4


@pytest.mark.parametrize("width", [8, 16])
def test_invalid_hex_digit_in_each_position(width):
    for pos in range(width):
        for bad in "gG/:@`xz.-":
            addr = "1" * pos + bad + "2" * (width - pos - 1)
            data = f"{'3' * width} T first\n{addr} T bad\n{'4' * width} t last\n".encode()
            with pytest.raises(ParseError, match="hex") as e:
                parse_kallsyms(data)
            assert e.value.lineno == 2
            t = parse_kallsyms(data, lenient=True)
            assert t.skipped == 1 and [t.name(0), t.name(1)] == ["first", "last"]


def test_crlf_lines_and_stray_cr():
    lf = _mixed_text(60, seed=9).replace(b"\r\n", b"\n")
    crlf = lf.replace(b"\n", b"\r\n")
    assert _table_tuple(_check(crlf)) == _table_tuple(_check(lf))
    for bad in (b"ffffffff81000000 T a\rb\n", b"ffffffff81000000 T ab\r\r\n",
                b"ffffffff81000000 T ab\t[m]\r\r\n", b"ffffffff81000000\r T ab\n"):
        with pytest.raises(ParseError, match="control character") as e:
            parse_kallsyms(b"ffffffff81000000 T ok\n" + bad)
        assert e.value.lineno == 2


def test_del_and_nul_are_control_characters():
    for bad in (b"ffffffff81000000 T a\x7fb\n", b"ffffffff81000000 T ab\t[m\x7f]\n",
                b"ffffffff81000000 T a\x00b\n", b"ffffffff81000000 T a\x01[m]\n",
                b"ffffffff81000000 T a\x0b\t[m]\n", b"ffffffff81000000 T a\t\x1f[m]\n"):
        with pytest.raises(ParseError, match="control character"):
            parse_kallsyms(b"ffffffff81000000 T ok\n" + bad)
        assert parse_kallsyms(b"ffffffff81000000 T ok\n" + bad, lenient=True).skipped == 1


def test_lenient_blank_module_lines_need_a_plain_hex_address():
    """--lenient takes ``ADDR T NAME  [mod]`` (blanks for the TAB) only with ADDR all hex
    digits, like every other line: "0x", "_" or a blank in it is a skipped line."""
    ok = b"ffffffff81000000 T ok\n"
    t = parse_kallsyms(ok + b"ffffffff81000010 T foo  [ext4]\n", lenient=True)
    assert (len(t), t.skipped, t.modules) == (2, 0, ["", "ext4"])
    assert int(t.addr[1]) == 0xffffffff81000010
    for bad in (b"0xffffff81000010 T foo  [ext4]\n", b"ffff_fff81000010 T foo  [ext4]\n",
                b"0Xffffff81000010 T foo\t[ext4]\n", b" fffffff81000010 T foo  [ext4]\n"):
        t = parse_kallsyms(ok + bad, lenient=True)
        assert (len(t), t.skipped) == (1, 1), bad


def test_name_lengths_1_and_511_but_not_512():
    for mod in (b"", b"\t[m]"):
        data = b"ffffffff81000000 T x%s\nffffffff81000001 t %s%s\n" % (mod, b"y" * 511, mod)
        t = _check(data)
        assert t.name(0) == "x" and t.name(1) == "y" * 511
        with pytest.raises(ParseError, match="512 bytes") as e:
            parse_kallsyms(data + b"ffffffff81000002 t %s%s\n" % (b"z" * 512, mod))
        assert e.value.lineno == 3


def test_module_suffix_shapes():
    ok = b"ffffffff81000000 T ok\n"
    for bad in (b"ffffffffc0000000 t a\t[]\n", b"ffffffffc0000000 t a\t[m\n",
                b"ffffffffc0000000 t a\tm]\n", b"ffffffffc0000000 t a\t\n",
                b"ffffffffc0000000 t a\t[m]\t\n", b"ffffffffc0000000 t \t[m]\n"):
        with pytest.raises(ParseError) as e:
            parse_kallsyms(ok + bad)
        assert e.value.lineno == 2
    t = _check(ok + b"ffffffffc0000000 t a\t[m]\n" + b"ffffffffc0000001 t b\t[[m]]\n")
    assert t.modules == ["", "m", "[m]"]


def test_short_last_chunk(monkeypatch):
    # a chunk that is only "\n" or a line shorter than an address must not index past it
    data = _mixed_text(30, seed=1, width=8)
    monkeypatch.setattr(kallsyms, "CHUNK", len(data))
    for tail in (b"\n", b"x\n", b"\r\n", b"1234\n"):
        t = parse_kallsyms(data + tail, lenient=True)
        assert t.skipped == 1 and len(t) == 30


def _infer_sizes_reference(addr, group, mapping):
    """The README rule, spelled out: next real symbol of any group; a group's last real
    symbol to its page end (but not past the next one); mapping symbols and address 0: 0."""
    real = [i for i in range(len(addr)) if not mapping[i]]
    out = [0] * len(addr)
    for i in real:
        later_any = [addr[j] for j in real if addr[j] > addr[i]]
        later_same = [addr[j] for j in real if addr[j] > addr[i] and group[j] == group[i]]
        end = min(later_same) if later_same else (addr[i] // 0x1000 + 1) * 0x1000
        if later_any:
            end = min(end, min(later_any))
        out[i] = 0 if addr[i] == 0 else min(end - addr[i], SIZE_CAP, 2**64 - 1 - addr[i])
    return out


def test_infer_sizes_alias_chains_group_ends_and_mapping_symbols():
    rng = np.random.default_rng(5)
    for k in range(400):
        n = int(rng.integers(0, 40))
        g = np.sort(rng.integers(0, 3, n))
        a = rng.integers(0, 12, n).astype(np.uint64) * np.uint64(rng.choice([1, 0x900, 0x9000]))
        if k % 2:  # disjoint group ranges (the usual case), else interleaved ones
            a += g.astype(np.uint64) * np.uint64(0x100000)
        o = np.lexsort((a, g))
        a, g = a[o], g[o]
        m = rng.random(n) < 0.2
        got = infer_sizes(a, g, m)
        assert got.dtype == np.uint64
        assert got.tolist() == _infer_sizes_reference(a.tolist(), g.tolist(), m.tolist())


def test_mapping_symbol_names():
    names = [b"$a", b"$d", b"$t", b"$x", b"$x.12", b"$d.0", b"$b", b"$LC0", b"$", b"a$",
             b"$ab", b"$x_", b"foo", b"$a.", b"$t.x"]
    want = [True, True, True, True, True, True, False, False, False, False,
            False, False, False, True, True]
    assert [is_mapping_symbol(n) for n in names] == want
    tab = b"\0" + b"\0".join(names) + b"\0"
    offs, pos = [], 1
    for n in names:
        offs.append(pos)
        pos += len(n) + 1
    assert mapping_mask(tab, np.array(offs)).tolist() == want
    assert mapping_mask(b"\0$", np.array([1])).tolist() == [False]  # "$" at the very end


def test_stable_order_is_lexsort():
    rng = np.random.default_rng(6)
    for _ in range(300):
        n = int(rng.integers(0, 50))
        rank = np.repeat(rng.integers(0, 5, 10), 5)[:n].astype(np.uint16)
        if rng.random() < 0.3:
            rank = rng.integers(0, 5, n).astype(np.uint16)
        glob = rng.random(n) < rng.random()
        assert builder._stable_order(rank, glob).tolist() == np.lexsort((rank, glob)).tolist()


def test_packed_sort_matches_lexsort_with_and_without_packing():
    rng = np.random.default_rng(7)
    for span in (0, 1 << 8, 1 << 40, 1 << 63):
        for _ in range(30):
            n = int(rng.integers(2, 60))
            base = np.uint64(0xffffffff80000000 if span < 1 << 40 else 0)
            addr = base + rng.integers(0, max(span, 1), n, dtype=np.uint64) // np.uint64(4)
            if span == 1 << 63:
                addr[0] = np.uint64(0xffffffffffffffff)  # a 64-bit span: lexsort fallback
            cls = rng.integers(2, 9, n).astype(np.uint8)
            rank = rng.integers(0, 4, n).astype(np.uint16)
            ref = np.lexsort((cls, addr, rank))
            got = builder._sort_sectioned(cls, addr.copy(), rank)
            assert got.tolist() == ref.tolist()
