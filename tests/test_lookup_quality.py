"""Lookup quality on real dumps: sizes by the documented rule, mapping symbols never win,
pseudo-modules' last symbols resolve, lenient terminal captures, and the symbolizer tools."""

from __future__ import annotations

import bisect
import random
from pathlib import Path

import pytest

from ksymsfs import reader
from tests.helpers import (
    DATA,
    DUMPS,
    LENIENT_DUMPS,
    build_ok,
    need_tool,
    parse_input,
    run_ksymsfs,
    run_tool,
    snapshot,
)
from tests.ksyms_ref import Reference, is_mapping


def _image(tmp_path_factory, name: str) -> Path:
    out = tmp_path_factory.mktemp(name) / "image.elf"
    modules = DATA / name / "modules"
    return build_ok(out, kallsyms=DATA / name / "kallsyms",
                    modules=modules if modules.exists() else None,
                    lenient=name in LENIENT_DUMPS)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    return {name: _image(tmp_path_factory, name) for name in DUMPS}


@pytest.fixture(scope="module")
def refs() -> dict[str, Reference]:
    return {name: Reference((DATA / name / "kallsyms").read_bytes()) for name in DUMPS}


def _ps(hit) -> str | None:
    return None if hit is None else f"{hit.name}+{hit.offset:#x}/{hit.size:#x}" + (
        f" [{hit.module}]" if hit.module else "")


@pytest.mark.parametrize("name", DUMPS)
def test_every_lone_symbol_resolves_by_the_reference_rule(name, images, refs):
    """addr+1 of every symbol alone at its address: same name, offset and size as the
    reference computed from the text (the image's sizes may only be smaller where a
    small image cannot hold a long section: README "Symbol sizes and lookup")."""
    ref, img = refs[name], reader.parse_image(images[name], engine="numpy")
    picks = [r for r in ref.syms if r.alone and r.size >= 2]
    assert picks
    got = reader.lookup(img, [r.addr + 1 for r in picks])
    for r, g in zip(picks, got):
        assert g is not None, r
        assert (g.name, g.offset, g.module) == (r.name, 1, r.module)
        assert 1 < g.size <= r.size, (r, g)
        if r.size < 0x800:
            assert g.size == r.size, (r, g)


@pytest.mark.parametrize("name", DUMPS)
def test_sizes_never_reach_another_symbol(name, images):
    """No real symbol's [value, value+size) holds the start of another real symbol (of any
    module); mapping symbols and symbols not in memory have size 0."""
    img = reader.parse_image(images[name], engine="numpy")
    rows = [(int(v), int(s), img.name(i)) for i, (v, s, sh) in enumerate(
        zip(img.syms["st_value"], img.syms["st_size"], img.syms["st_shndx"]))
        if 0 < int(sh) < 0xFF00]
    letters = [reader.letter_of(img, i) for i in range(len(img))]
    unsized = {i for i, (_, _, n) in enumerate(rows) if is_mapping(n)}
    assert all(rows[i][1] == 0 for i in unsized)
    starts = sorted({v for i, (v, _, n) in enumerate(rows) if i not in unsized
                     and letters[i] not in "?Nn"})
    for v, s, n in rows:
        k = bisect.bisect_right(starts, v)
        if k < len(starts) and s:
            assert v + s <= starts[k], (n, hex(v), hex(s))


def test_arm_mapping_symbols_never_answer_inside_a_function(images, refs):
    """d2000 (ARM, modules with $a/$d): at and after each mapping symbol inside a function,
    lookup names the function, never '$a'/'$d' (ksymsfs lookup before: '$d+0x4/0x..')."""
    name = "d2000-sep4020-arm32"
    syms, _ = parse_input((DATA / name / "kallsyms").read_bytes())
    maps = [s for s in syms if is_mapping(s.name)]
    assert len(maps) > 200
    ref = refs[name]
    addrs = [a for s in maps for a in (s.addr, s.addr + 2) if ref.containing(a)]
    assert len(addrs) > 100
    r = run_ksymsfs("lookup", images[name], *[f"{a:x}" for a in addrs])
    lines = r.stdout.decode().splitlines()
    assert len(lines) == len(addrs)
    for a, line in zip(addrs, lines):
        c = ref.containing(a)
        mod = f" [{c.module}]" if c.module else ""
        assert line == f"{a:08x} {c.name}+{a - c.addr:#x}/{c.size:#x}{mod}"
        assert " $" not in line


@pytest.fixture(scope="module")
def arm_image(tmp_path_factory) -> Path:
    """d2000 built for its own machine (EM_ARM): tools skip mapping symbols only there."""
    d = DATA / "d2000-sep4020-arm32"
    out = tmp_path_factory.mktemp("arm") / "image.elf"
    r = run_ksymsfs("snapshot", "--kallsyms", d / "kallsyms", "--modules", d / "modules",
                    "--arch", "arm", "-o", out)
    assert r.returncode == 0, r.stderr
    return out


def test_llvm_symbolizer_names_functions_not_mapping_symbols(arm_image, refs):
    """llvm-symbolizer (symbol table only) inside functions with $a/$d in them."""
    tool = need_tool("llvm-symbolizer")
    name = "d2000-sep4020-arm32"
    ref = refs[name]
    syms, _ = parse_input((DATA / name / "kallsyms").read_bytes())
    addrs = [s.addr + 2 for s in syms if is_mapping(s.name) and ref.containing(s.addr + 2)]
    r = run_tool(tool, f"--obj={arm_image}", *[hex(a) for a in addrs])
    assert r.returncode == 0, r.stderr
    names = r.stdout.decode().split("\n\n")
    got = [block.splitlines()[0] for block in names if block.strip()]
    assert len(got) == len(addrs)
    # alone at its address or not, the function's name (aliases: any of them)
    for a, g in zip(addrs, got):
        at = {s.name for s in syms if s.addr == ref.containing(a).addr and not is_mapping(s.name)}
        assert g in at, (hex(a), g, at)


def test_addr2line_names_functions_by_their_sizes(images, refs):
    """binutils addr2line -f (no DWARF: function symbols and st_size) on the x86_64 dump
    (the ARM dump with mapping symbols: the test below)."""
    tool = need_tool("addr2line")
    name = "binun-taiwan-x86_64"
    ref = refs[name]
    rnd = random.Random(3)
    text = {s.addr for s in parse_input((DATA / name / "kallsyms").read_bytes())[0]
            if s.letter in "TtW"}
    picks = rnd.sample([r for r in ref.syms if r.alone and r.size >= 8 and r.addr in text], 300)
    addrs = [r.addr + rnd.randrange(1, r.size) for r in picks]
    r = run_tool(tool, "-f", "-e", images[name], *[hex(a) for a in addrs])
    assert r.returncode == 0, r.stderr
    funcs = r.stdout.decode().splitlines()[0::2]
    assert funcs == [p.name for p in picks]


def _one_section(image: Path, addrs: list[int]) -> list[int]:
    """The addresses that lie in exactly one allocated section: d2000 lists a module's
    freed init text at the address another module reuses (sep4020_graylcd's
    .text.1 and sep4020_key's .text both at bf004000), where tools pick either one."""
    img = reader.parse_image(image, engine="numpy")
    spans = [(int(s["sh_addr"]), int(s["sh_addr"] + s["sh_size"]))
             for s in img.shdrs if s["sh_flags"] & 2 and s["sh_size"]]
    return [a for a in addrs if sum(lo <= a < hi for lo, hi in spans) == 1]


@pytest.mark.parametrize("machine", ["host", "arm"])
def test_addr2line_names_functions_around_arm_mapping_symbols(machine, images, arm_image,
                                                              refs):
    """binutils addr2line -f on the ARM dump with $a/$d in its modules, built for this
    machine and for EM_ARM (which this host's binutils reads with its generic ELF
    backend: no ARM one): at and after each mapping symbol inside a function, and at
    random addresses of functions, it names the function, never a mapping symbol.

    Its symbol-table lookup takes the nearest symbol at or below the address whatever
    its size (bfd/dwarf2.c better_fit), except a local, STT_NOTYPE, STV_HIDDEN symbol of
    size 0 (bfd/elf.c _bfd_elf_maybe_function_sym): that is how mapping symbols are
    written (before, as STT_FUNC: 72 of 420 of these addresses answered $d)."""
    tool = need_tool("addr2line")
    name = "d2000-sep4020-arm32"
    image = images[name] if machine == "host" else arm_image
    ref = refs[name]
    syms, _ = parse_input((DATA / name / "kallsyms").read_bytes())
    rnd = random.Random(4)
    near = sorted({a for s in syms if is_mapping(s.name) for a in (s.addr, s.addr + 2)
                   if ref.containing(a)})
    code = {s.addr for s in syms if s.letter in "Tt"}
    text = [r for r in ref.syms if r.alone and r.size >= 4 and r.addr in code]
    funcs = [r.addr + rnd.randrange(r.size) for r in rnd.sample(text, 300)]
    addrs = _one_section(image, near + funcs)
    assert len(addrs) > 600
    r = run_tool(tool, "-f", "-e", image, *[hex(a) for a in addrs])
    assert r.returncode == 0, r.stderr
    got = r.stdout.decode().splitlines()[0::2]
    assert len(got) == len(addrs)
    for a, g in zip(addrs, got):
        at = {s.name for s in syms if s.addr == ref.containing(a).addr and not is_mapping(s.name)}
        assert g in at, (hex(a), g, at)


def test_mapping_symbols_are_local_notype_hidden_size_0(images):
    """How the image writes $a/$d (readelf), while nm still prints their kallsyms letter."""
    name = "d2000-sep4020-arm32"
    r = run_tool(need_tool("readelf"), "-sW", images[name])
    rows = [ln.split() for ln in r.stdout.decode().splitlines()]
    maps = [x for x in rows if len(x) == 8 and is_mapping(x[7])]
    assert len(maps) == 270
    assert {tuple(x[2:6]) for x in maps} == {("0", "NOTYPE", "LOCAL", "HIDDEN")}
    others = [x for x in rows if len(x) == 8 and x[5] == "HIDDEN" and not is_mapping(x[7])]
    assert not others
    nm = run_tool(need_tool("nm"), images[name]).stdout.decode().splitlines()
    assert sum(1 for ln in nm if ln.split()[1:] in (["t", "$a"], ["t", "$d"])) == 270


def test_pseudo_modules_last_symbols_resolve(images):
    """[bpf] and [__builtin__kprobes] (arm64 excerpt): each one's only or last symbol
    covers +0x10 (their size was 0), within its page, and no section of one module lies
    inside another module's."""
    img = reader.parse_image(images["ebpfexp-arm64-excerpt"], engine="numpy")
    want = {"bpf_prog_ab4bc4523b7fe6b4": 0xFFFFFFC08071046C,
            "kprobe_insn_page": 0xFFFFFFC080B89000,
            "bpf_trampoline_6442507883": 0xFFFFFFC08012D000}
    got = reader.lookup(img, [v + 0x10 for v in want.values()])
    for (n, v), g in zip(want.items(), got):
        assert g is not None and (g.name, g.offset) == (n, 0x10)
        assert 0x10 < g.size <= 0x1000 - (v & 0xFFF)
    spans = [(int(s["sh_addr"]), int(s["sh_addr"] + s["sh_size"]), n)
             for s, n in zip(img.shdrs, img.section_names) if s["sh_flags"] & 2]
    for lo, hi, n in spans:
        for lo2, hi2, n2 in spans:
            mod, mod2 = n.partition("[")[2], n2.partition("[")[2]
            if mod != mod2 and hi > lo:
                assert not lo2 <= lo < hi2 or lo2 == hi2, (n, n2)


def test_ftrace_trampoline_resolves(tmp_path):
    """A [__builtin__ftrace] trampoline as the live kernel lists it (a page of its own,
    after the modules; here added to the x86_64 dump in a gap between two modules): +0x10
    names it, with its page as its size; the module symbol before it stops at its own
    page end, so the gap between them stays unnamed."""
    src = (DATA / "binun-taiwan-x86_64" / "kallsyms").read_bytes()
    line = b"ffffffffa0005000 t ftrace_trampoline\t[__builtin__ftrace]\n"
    (tmp_path / "k").write_bytes(src + line)
    img = build_ok(tmp_path / "i.elf", kallsyms=tmp_path / "k")
    r = run_ksymsfs("lookup", img, "ffffffffa0005010", "ffffffffa0002470", "ffffffffa0004ff0")
    assert r.stdout.decode().splitlines() == [
        "ffffffffa0005010 ftrace_trampoline+0x10/0x1000 [__builtin__ftrace]",
        "ffffffffa0002470 __this_module+0x10/0xba0 [pata_acpi]",
        "ffffffffa0004ff0 (no symbol)"]
    assert r.returncode == 1  # one address had no symbol


def test_lenient_accepts_module_after_blanks_strict_names_it(tmp_path):
    """A terminal capture (TAB -> two spaces before [module]): --lenient keeps every
    symbol (the dump round trip is exact); strict mode names the first such line."""
    src = (DATA / "binun-taiwan-x86_64" / "kallsyms").read_bytes()
    captured = src.replace(b"\t[", b"  [")
    (tmp_path / "k").write_bytes(captured)
    (tmp_path / "orig").write_bytes(src)
    r = snapshot(tmp_path / "i.elf", kallsyms=tmp_path / "k", lenient=True)
    assert r.returncode == 0 and b"skipped" not in r.stderr, r.stderr
    build_ok(tmp_path / "o.elf", kallsyms=tmp_path / "orig")
    assert (tmp_path / "i.elf").read_bytes() == (tmp_path / "o.elf").read_bytes()
    r = snapshot(tmp_path / "s.elf", kallsyms=tmp_path / "k")
    first = next(no for no, ln in enumerate(captured.splitlines(), 1) if b"  [" in ln)
    err = r.stderr.decode()
    assert r.returncode == 2 and f"k:{first}: module suffix after spaces" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "s.elf").exists()
