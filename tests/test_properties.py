"""Property tests: random symbol tables round-trip; corrupted images fail only as KsymsError."""

from __future__ import annotations

import struct
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksymsfs import reader
from ksymsfs.builder import build_image
from ksymsfs.elfdefs import make_target
from ksymsfs.errors import KsymsError, ParseError
from ksymsfs.kallsyms import KSYM_NAME_LEN, parse_kallsyms
from ksymsfs.letters import LETTERS
from tests.helpers import parse_input

SETTINGS = settings(max_examples=200, deadline=2000,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# printable, no space: what a kallsyms name or module may hold (a few non-ASCII too)
NAME_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E) | st.sampled_from("éß€")
names = st.text(NAME_CHARS, min_size=1, max_size=KSYM_NAME_LEN - 1).filter(
    lambda s: len(s.encode()) < KSYM_NAME_LEN)
short_names = st.text(NAME_CHARS, min_size=1, max_size=12)
modules = st.sampled_from(["", "", "", "ext4", "nf_tables", "bpf", "__builtin__ftrace",
                           "snd-hda_intel", "x"]) | st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="[]"),
    min_size=1, max_size=16)

# addresses cluster (so sizes are inferred between neighbours) with zeros and extremes
def addresses(bits: int):
    top = (1 << bits) - 1
    base = 0xFFFFFFFF81000000 if bits == 64 else 0xC0008000
    return st.one_of(st.just(0), st.just(top), st.integers(0, top),
                     st.integers(base, min(base + 0x3000, top)))


@st.composite
def symbol_tables(draw):
    bits = draw(st.sampled_from([32, 64]))
    letter = st.sampled_from(sorted(LETTERS))
    sym = st.tuples(addresses(bits), letter, names | short_names, modules)
    syms = draw(st.lists(sym, min_size=1, max_size=40))
    if draw(st.booleans()) and len(syms) > 1:  # exact duplicate lines happen in real dumps
        syms.append(syms[0])
    arch = draw(st.sampled_from([None, "aarch64", "ppc64", "s390x"] if bits == 64
                                else [None, "mips", "arm", "mipsel"]))
    return bits, syms, arch


def kallsyms_text(bits: int, syms) -> tuple[bytes, list[str]]:
    w = bits // 4
    lines = [f"{a:0{w}x} {c} {n}" + (f"\t[{m}]" if m else "") for a, c, n, m in syms]
    return ("\n".join(lines) + "\n").encode(), lines


@SETTINGS
@given(symbol_tables(), st.booleans())
def test_roundtrip_random_tables(case, crlf: bool) -> None:
    bits, syms, arch = case
    data, lines = kallsyms_text(bits, syms)
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    table = parse_kallsyms(data, "<random>")
    assert len(table) == len(syms) and table.address_bits == bits
    load_order = sorted({m for *_, m in syms if m})  # some order: must not lose anything
    image = build_image(table, make_target(arch, None, None, bits), load_order)
    assert Counter(reader.dump_lines(image)) == Counter(lines)
    img = reader.parse_image(image)
    assert len(img) == len(syms)
    # every name is found by nlist, with every value it has
    want: dict[str, set[int]] = {}
    for a, _, n, _ in syms:
        want.setdefault(n, set()).add(a)
    sample = list(want)[:5]
    found = reader.nlist(img, sample)
    for n in sample:
        got = {h.n_value for h in found[n] if h.name == n}
        assert got == want[n]


# --- arbitrary text: the parser agrees with a plain regex, or fails with ParseError ------

_addr_field = st.sampled_from([b"ffffffff81000000", b"c0008000", b"FFFFFFFF81000000", b"00000000",
                               b"0000000000000000", b"ffffffff8100000", b"c000800g", b"HTTP/1.0"])
_letter_field = st.sampled_from([b"T", b"t", b"X", b"?", b"U", b"w", b"a", b" ", b"\t", b"", b"TT"])
_name_field = st.sampled_from([b"foo", b"_stext", b"a[b]", b"x\x00y", b"x y", b"\xff\xfe",
                               b"n" * 511, b"n" * 512, b"", b"a\tb", b"\x7f", b"\r", b"\x1b"])
_module_field = st.sampled_from([b"", b"", b"\t[ext4]", b"\t[ext4", b"\t[]", b"\t[a b]",
                                 b"\t[a]b]", b" [ext4]", b"\t[e\tx]", b"\t[bpf]", b"\t\t[x]"])
_sep = st.sampled_from([b" ", b" ", b" ", b"  ", b"\t"])
_line = st.builds(lambda a, s1, c, s2, n, m: a + s1 + c + s2 + n + m,
                  _addr_field, _sep, _letter_field, _sep, _name_field, _module_field)
_junk = st.sampled_from([b"", b"--", b"HTTP/1.0 200 OK\r", b"[+] x", b" ", b"\r"]) | st.binary(
    max_size=20)
_eol = st.sampled_from([b"\n", b"\n", b"\r\n", b"\r\r\n"])


@SETTINGS
@given(st.lists(st.tuples(_line | _junk, _eol), max_size=12), st.booleans(), st.booleans())
def test_parser_matches_reference(lines, lenient: bool, cut_last_newline: bool) -> None:
    """parse_kallsyms accepts exactly the lines tests/helpers.parse_input calls symbols."""
    data = b"".join(text + eol for text, eol in lines)
    if cut_last_newline and data:
        data = data[:-1]
    syms, junk = parse_input(data, lenient)
    try:
        table = parse_kallsyms(data, "<fuzz>", lenient=lenient)
    except ParseError as e:
        assert "\n" not in str(e)
        assert lenient or junk or not syms or not data.endswith(b"\n"), str(e)
        assert not lenient or not syms, str(e)
        return
    assert lenient or not junk
    assert table.skipped == len(junk)
    image = build_image(table, make_target(None, None, None, table.address_bits))
    want = Counter(s.text[:s.width].lower() + s.text[s.width:] for s in syms)
    assert Counter(reader.dump_lines(image)) == want


# --- corrupted images ----------------------------------------------------------------------

def _base_images() -> list[bytes]:
    out = []
    cases = [
        (64, None, [(0xFFFFFFFF81000000, "T", "_stext", ""), (0xFFFFFFFF81000010, "t", "h", ""),
                    (0xFFFFFFFF81001000, "D", "data", ""), (0xFFFFFFFF81002000, "b", "bss", ""),
                    (0x0, "A", "per_cpu", ""), (0xFFFFFFFFA0000000, "t", "m", "ext4"),
                    (0xFFFFFFFFA0000040, "T", "mexp", "ext4"), (0, "U", "undef", "ext4"),
                    (0xFFFFFFFF81003000, "R", "ro", ""), (0xFFFFFFFF81000020, "W", "weak", "")]),
        (32, "mips", [(0xC0008000, "T", "_stext", ""), (0xC0008010, "t", "h", ""),
                      (0xC0100000, "d", "dd", ""), (0xBF000000, "t", "mf", "snd"),
                      (0xBF000100, "?", "odd", "snd"), (0, "a", "file.c", "snd")]),
    ]
    for bits, arch, syms in cases:
        data, _ = kallsyms_text(bits, syms)
        table = parse_kallsyms(data)
        out.append(build_image(table, make_target(arch, None, None, bits), ["ext4", "snd"]))
    return out


BASES = _base_images()


def _exercise(data: bytes) -> None:
    """Everything a reader does with an image; only KsymsError may escape."""
    try:
        img = reader.parse_image(data)
    except KsymsError:
        return
    try:
        reader.nlist(img, ["_stext", "stext", "m", "", "nope"])
        reader.lookup(img, [0, 1, 0xC0008001, 0xFFFFFFFF81000001, 0xFFFFFFFFFFFFFFFF])
        for _ in reader.dump_lines(img):
            pass
        for i in range(min(len(img), 50)):
            reader.letter_of(img, i)
            reader.nlist_type(img, i)
    except KsymsError:
        pass


@st.composite
def corruptions(draw):
    base = draw(st.sampled_from(BASES))
    data = bytearray(base)
    n = len(data)
    cls = data[4]
    e = "<" if data[5] == 1 else ">"
    shoff = struct.unpack_from(e + ("I" if cls == 1 else "Q"), data, 0x20 if cls == 1 else 0x28)[0]
    # mostly headers (keeping the magic), the section header table and the symbols
    region = st.one_of(st.integers(4, 63), st.integers(shoff, n - 1), st.integers(64, n - 1))
    for _ in range(draw(st.integers(1, 8))):
        off = draw(region)
        kind = draw(st.sampled_from(["byte", "word", "qword"]))
        if kind == "byte":
            data[off] = draw(st.integers(0, 255))
        else:
            size = 4 if kind == "word" else 8
            if off + size <= n:
                val = draw(st.sampled_from([0, 1, 0x7F, 0xFFFF, 0xFF00, 0xFFF1, 2**31, n, n - 1,
                                            2**(8 * size) - 1]) | st.integers(0, 2**(8 * size) - 1))
                data[off:off + size] = val.to_bytes(size, "little" if e == "<" else "big")
    if draw(st.integers(0, 4)) == 0:
        data = data[:draw(st.integers(0, n))]
    return bytes(data)


@SETTINGS
@given(corruptions())
def test_corrupted_image_fails_cleanly(data: bytes) -> None:
    _exercise(data)


@SETTINGS
@given(st.sampled_from(BASES), st.data())
def test_truncated_image_fails_cleanly(base: bytes, data) -> None:
    cut = data.draw(st.integers(0, len(base) - 1))
    _exercise(base[:cut])


@settings(max_examples=100, deadline=2000)
@given(st.binary(max_size=512))
def test_random_bytes_fail_cleanly(blob: bytes) -> None:
    _exercise(blob)
    _exercise(b"\x7fELF" + blob)


@settings(max_examples=50, deadline=2000)
@given(st.sampled_from(BASES), st.one_of(st.integers(max_value=-1), st.integers(min_value=2**64)))
def test_lookup_out_of_range_address(base: bytes, addr: int) -> None:
    try:
        reader.lookup(base, [addr])
    except KsymsError:
        return
