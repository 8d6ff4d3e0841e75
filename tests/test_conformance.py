"""Conformance: every captured dump and the live /proc/kallsyms, read back by real tools.

Each dataset is built once per session with the CLI (``ksymsfs snapshot``); the tests
then compare what nm, readelf, objdump, elfutils, LLVM, libbsd nlist(3), pyelftools, LIEF
and ksymsfs' own reader see against the input lines, parsed here by a plain regex.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pytest

from ksymsfs import letters as ksl
from ksymsfs import reader
from ksymsfs.kallsyms import is_pseudo_module
from tests.helpers import (
    DATA,
    DUMPS,
    LENIENT_DUMPS,
    Sym,
    build_ok,
    need_tool,
    parse_input,
    run_ksymsfs,
    run_nlist_client,
    run_tool,
    snapshot,
)
from tests.ksyms_ref import is_mapping

LIVE = "live"
DATASETS = [*DUMPS, LIVE]
LIVE_KALLSYMS = Path("/proc/kallsyms")

# What nm prints for letters that have no exact ELF encoding (documented in the README):
# undefined-like letters lose their address, the rest map to the nearest section class.
NM_APPROX = {"G": "D", "g": "d", "S": "B", "s": "b", "C": "B", "c": "b"}
NM_NO_ADDRESS = set("Uwv")

# libbsd nlist(3) n_type per kallsyms letter (before |N_EXT).
N_ABS, N_TEXT, N_DATA, N_BSS, N_EXT = 2, 4, 6, 8, 1
NLIST_TYPE = {**dict.fromkeys("TtWRr", N_TEXT), **dict.fromkeys("DdV", N_DATA),
              **dict.fromkeys("Bb", N_BSS), **dict.fromkeys("Aa", N_ABS)}
NLIST_LETTERS = "TtDdBbRrAaWV"

SHN_UNDEF, SHN_ABS, SHN_COMMON = 0, 0xFFF1, 0xFFF2
WARNING_RE = re.compile(r"(?i)\b(warning|error)s?\s*:")


@dataclass(frozen=True)
class RSym:
    """One row of ``readelf -sW``."""

    num: int
    value: int
    size: int
    type: str
    bind: str
    shndx: int
    name: str


def parse_readelf_syms(text: str) -> list[RSym]:
    """The .symtab rows of ``readelf -sW`` (entry 0 included)."""
    out: list[RSym] = []
    in_symtab = False
    for line in text.splitlines():
        if line.startswith("Symbol table "):
            in_symtab = "'.symtab'" in line
            continue
        m = re.match(r"^\s*(\d+): ([0-9a-f]+)\s+(0x[0-9a-f]+|\d+) (\S+)\s+(\S+)\s+(\S+)\s+"
                     r"(\S+) ?(.*)$", line)
        if not in_symtab or not m:
            continue
        size = int(m[3], 16) if m[3].startswith("0x") else int(m[3])
        ndx = {"UND": SHN_UNDEF, "ABS": SHN_ABS, "COM": SHN_COMMON}.get(m[7])
        out.append(RSym(int(m[1]), int(m[2], 16), size, m[4], m[5],
                        int(m[7]) if ndx is None else ndx, m[8]))
    return out


@dataclass
class Dataset:
    """One input built into an image; everything else is derived lazily and cached."""

    name: str
    kallsyms: Path           # the exact text the image was built from
    modules: Path | None
    lenient: bool
    image: Path
    tmp: Path
    syms: list[Sym] = field(repr=False)
    junk: list[int] = field(repr=False)

    @property
    def live(self) -> bool:
        return self.name == LIVE

    def rebuild(self, out: Path, **kw):
        """Build again from the same source (the live kernel for ``live``)."""
        if self.live:
            return snapshot(out, **kw)
        return snapshot(out, kallsyms=self.kallsyms, modules=self.modules,
                        lenient=self.lenient, **kw)

    @cached_property
    def readelf_syms(self) -> list[RSym]:
        r = run_tool(need_tool("readelf"), "-sW", self.image)
        assert r.returncode == 0 and not r.stderr, r.stderr
        return parse_readelf_syms(r.stdout.decode("utf-8", "surrogateescape"))

    @cached_property
    def dump(self) -> list[str]:
        """``ksymsfs dump`` lines, in symtab order (entry 1 first)."""
        r = run_ksymsfs("dump", self.image)
        assert r.returncode == 0 and not r.stderr, r.stderr
        return r.stdout.decode("utf-8", "surrogateescape").splitlines()

    @cached_property
    def dump_modules(self) -> list[str]:
        """Module of each symtab entry 1..N, from the dump lines."""
        return [ln.rsplit("\t[", 1)[1][:-1] if "\t[" in ln else "" for ln in self.dump]

    @cached_property
    def image64(self) -> Path:
        """An image libbsd nlist(3) accepts here: class and e_machine of this x86_64 host."""
        if reader.parse_image(self.image).elfclass == 2:
            return self.image
        out = self.tmp / "image64.elf"
        r = self.rebuild(out, elfclass="64")
        assert r.returncode == 0, r.stderr
        return out


def _read_live() -> bytes:
    with open(LIVE_KALLSYMS, "rb") as f:
        return f.read()


@pytest.fixture(scope="session", params=DATASETS)
def ds(request, tmp_path_factory) -> Dataset:
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    image = tmp / "image.elf"
    if name == LIVE:
        if not LIVE_KALLSYMS.exists():
            pytest.skip("no /proc/kallsyms")
        for _ in range(5):  # the kernel's symbols change when BPF programs come and go
            before = _read_live()
            build_ok(image)
            if _read_live() == before:
                break
        else:
            pytest.skip("/proc/kallsyms kept changing while the snapshot was taken")
        kallsyms = tmp / "kallsyms"
        kallsyms.write_bytes(before)
        syms, junk = parse_input(before)
        if not any(s.addr for s in syms):
            pytest.skip("/proc/kallsyms shows only zero addresses to this user")
        return Dataset(name, kallsyms, None, False, image, tmp, syms, junk)
    kallsyms = DATA / name / "kallsyms"
    modules = DATA / name / "modules"
    modules = modules if modules.exists() else None
    lenient = name in LENIENT_DUMPS
    build_ok(image, kallsyms=kallsyms, modules=modules, lenient=lenient)
    syms, junk = parse_input(kallsyms.read_bytes())
    assert bool(junk) == lenient, f"junk lines {junk[:5]} in a dump not marked lenient"
    return Dataset(name, kallsyms, modules, lenient, image, tmp, syms, junk)


# --- nm ------------------------------------------------------------------------------------

def test_nm_matches_input(ds: Dataset) -> None:
    """nm --no-sort prints each input symbol line back (as a multiset)."""
    r = run_tool(need_tool("nm"), "--no-sort", ds.image)
    assert r.returncode == 0 and not r.stderr, r.stderr
    got: Counter = Counter()
    for line in r.stdout.decode("utf-8", "surrogateescape").splitlines():
        if line.startswith(" "):  # undefined: "                 U name"
            letter, name = line.split()
            got[(None, letter, name)] += 1
        else:
            addr, letter, name = line.split(" ", 2)
            got[(int(addr, 16), letter, name)] += 1
    want: Counter = Counter()
    for s in ds.syms:
        if s.letter in ksl.NM_EXACT:
            want[(s.addr, s.letter, s.name)] += 1
        elif s.letter in NM_NO_ADDRESS:
            want[(None, s.letter, s.name)] += 1
        else:
            want[(s.addr, NM_APPROX[s.letter], s.name)] += 1
    assert sum(got.values()) == len(ds.syms)
    missing, extra = want - got, got - want
    assert not missing and not extra, (list(missing.items())[:10], list(extra.items())[:10])


def test_nm_exact_letters_cover_input(ds: Dataset) -> None:
    """Every letter in the input is one ksymsfs knows how to encode."""
    letters = Counter(s.letter for s in ds.syms)
    unknown = set(letters) - set(ksl.LETTERS)
    assert not unknown
    assert set(letters) <= ksl.NM_EXACT | NM_NO_ADDRESS | set(NM_APPROX)


# --- ksymsfs dump --------------------------------------------------------------------------

def test_dump_gives_back_input_lines(ds: Dataset) -> None:
    """ksymsfs dump == the input's symbol lines (CRLF stripped, junk excluded, [mod] kept)."""
    want = Counter(s.text for s in ds.syms)
    got = Counter(ds.dump)
    missing, extra = want - got, got - want
    assert not missing and not extra, (list(missing.items())[:10], list(extra.items())[:10])


# --- third-party readers: no complaints ----------------------------------------------------

TOOLS = {
    "readelf": ("readelf", "-a", "-W"),
    "nm": ("nm",),
    "objdump": ("objdump", "-t"),
    "eu-readelf": ("eu-readelf", "-a"),
    "llvm-readelf": ("llvm-readelf", "-a"),
    "llvm-nm": ("llvm-nm",),
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tool_is_silent(ds: Dataset, tool: str) -> None:
    """Exit 0, empty stderr, and no 'warning:'/'error:' in what the tool prints."""
    exe, *args = TOOLS[tool]
    r = run_tool(need_tool(exe), *args, ds.image)
    err = r.stderr.decode("utf-8", "replace")
    out = r.stdout.decode("utf-8", "replace")
    assert r.returncode == 0, err
    assert err == ""
    bad = [ln for ln in out.splitlines() if WARNING_RE.search(ln)]
    assert not bad, bad[:5]
    assert out.strip()


def test_elflint_no_errors(ds: Dataset) -> None:
    r = run_tool(need_tool("eu-elflint"), "--gnu-ld", ds.image)
    assert r.stdout.decode().strip() == "No errors", (r.stdout, r.stderr)
    assert r.returncode == 0 and not r.stderr


# --- nlist(3) ------------------------------------------------------------------------------

def _nlist_sample(ds: Dataset, k: int = 20) -> list[Sym]:
    """~k names unique in the input, spread over the letters nlist distinguishes.

    Skips names nlist(3) would also match another way: "_foo" matches a symbol "foo" too.
    """
    counts = Counter(s.name for s in ds.syms)
    by_letter: dict[str, list[Sym]] = {}
    for s in ds.syms:
        if (s.letter in NLIST_LETTERS and counts[s.name] == 1
                and not (s.name.startswith("_") and s.name[1:] in counts)):
            by_letter.setdefault(s.letter, []).append(s)
    rnd = random.Random(ds.name)
    letters = [c for c in NLIST_LETTERS if c in by_letter]
    assert letters, "no nlist-able symbols"
    picked: list[Sym] = []
    per = max(1, k // len(letters))
    for c in letters:
        pool = by_letter[c]
        picked += rnd.sample(pool, min(per, len(pool)))
    rest = [s for c in letters for s in by_letter[c] if s not in picked]
    picked += rnd.sample(rest, min(max(0, k - len(picked)), len(rest)))
    return picked


MISSING_NAMES = ["ksymsfs_no_such_symbol", "zz_not_in_any_kernel_0"]


def test_nlist_client_libbsd(ds: Dataset, nlist_client) -> None:
    """libbsd nlist(3) finds each sampled name with the value and n_type its letter implies."""
    sample = _nlist_sample(ds)
    names = [s.name for s in sample] + MISSING_NAMES
    got, rc = run_nlist_client(nlist_client, ds.image64, names)
    assert rc == len(MISSING_NAMES)
    for s in sample:
        want_type = NLIST_TYPE[s.letter] | (N_EXT if s.letter.isupper() else 0)
        assert got[s.name] == (want_type, s.addr), (s, got[s.name])
    for n in MISSING_NAMES:
        assert got[n] == (0, 0)


def test_nlist_reader_agrees_with_libbsd(ds: Dataset, nlist_client) -> None:
    """ksymsfs.reader.nlist gives what libbsd gives, on the same image."""
    sample = _nlist_sample(ds)
    names = [s.name for s in sample] + MISSING_NAMES
    got, rc = run_nlist_client(nlist_client, ds.image64, names)
    ours = reader.nlist(ds.image64, names)
    assert sum(1 for n in names if not ours[n]) == rc
    for n in names:
        hits = ours[n]
        if not hits:
            assert got[n] == (0, 0)
            continue
        assert len(hits) == 1, hits
        assert (hits[0].n_type, hits[0].n_value) == got[n]
    # the 32-bit image (if any) answers the same through our reader
    if ds.image64 != ds.image:
        ours32 = reader.nlist(ds.image, names)
        assert {n: [(h.n_type, h.n_value) for h in v] for n, v in ours32.items()} == \
               {n: [(h.n_type, h.n_value) for h in v] for n, v in ours.items()}


def test_nlist_cli(ds: Dataset) -> None:
    """``ksymsfs nlist`` prints value and n_type name; exit 1 when some name is missing."""
    sample = _nlist_sample(ds, 6)
    r = run_ksymsfs("nlist", ds.image, *[s.name for s in sample])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert len(lines) == len(sample)
    for s, line in zip(sample, lines):
        assert line.startswith(f"{s.addr:0{s.width}x} ")
        assert line.split()[2] == s.name
    r = run_ksymsfs("nlist", ds.image, sample[0].name, MISSING_NAMES[0])
    assert r.returncode == 1 and not r.stderr
    assert "not found" in r.stdout.decode().splitlines()[-1]


# --- pyelftools and LIEF agree with readelf ------------------------------------------------

def _norm_shndx(x) -> int:
    return {"SHN_UNDEF": SHN_UNDEF, "SHN_ABS": SHN_ABS, "SHN_COMMON": SHN_COMMON}.get(x, x)


def test_readelf_lists_every_symbol(ds: Dataset) -> None:
    rows = ds.readelf_syms
    assert [r.num for r in rows] == list(range(len(ds.syms) + 1))
    assert Counter(r.name for r in rows[1:]) == Counter(s.name for s in ds.syms)


def test_pyelftools_agrees_with_readelf(ds: Dataset) -> None:
    from elftools.elf.elffile import ELFFile

    with open(ds.image, "rb") as f:
        elf = ELFFile(f)
        st = elf.get_section_by_name(".symtab")
        got = [(s.name, s["st_value"], s["st_size"], _norm_shndx(s["st_shndx"]))
               for s in st.iter_symbols()]
    want = [(r.name, r.value, r.size, r.shndx) for r in ds.readelf_syms]
    assert len(got) == len(want)
    assert got == want


def test_lief_agrees_with_readelf(ds: Dataset) -> None:
    lief = pytest.importorskip("lief")
    lief.logging.disable()
    binary = lief.parse(str(ds.image))
    assert binary is not None
    syms = binary.symtab_symbols if hasattr(binary, "symtab_symbols") else binary.symbols
    got = [(s.name, s.value, s.size, s.shndx) for s in syms]
    want = [(r.name, r.value, r.size, r.shndx) for r in ds.readelf_syms]
    assert len(got) == len(want)
    assert got == want


# --- lookup --------------------------------------------------------------------------------

def test_lookup_cli(ds: Dataset) -> None:
    """addr+1 of a sized symbol alone at its address resolves to name+0x1/0xSIZE [module]."""
    rows = ds.readelf_syms[1:]
    mods = ds.dump_modules
    assert len(mods) == len(rows)
    in_sec = [(r, m) for r, m in zip(rows, mods) if 0 < r.shndx < 0xFF00]
    at = Counter(r.value for r, _ in in_sec)
    cand = [(r, m) for r, m in in_sec if r.size >= 2 and at[r.value] == 1]
    assert cand
    rnd = random.Random(ds.name)
    pick = rnd.sample([c for c in cand if not c[1]], min(6, sum(1 for c in cand if not c[1])))
    modcand = [c for c in cand if c[1]]
    pick += rnd.sample(modcand, min(4, len(modcand)))
    # a symbol's inferred size never reaches the next symbol of its module (mapping
    # symbols and symbols not in memory end nothing: README "Symbol sizes and lookup")
    by_mod: dict[str, list[int]] = {}
    letters = [ln.split(" ", 2)[1] for ln in ds.dump]
    for r, m, c in zip(rows, mods, letters):
        if 0 < r.shndx < 0xFF00 and not is_mapping(r.name) and c not in "?Nn":
            by_mod.setdefault(m, []).append(r.value)
    for r, m in pick:
        nxt = [v for v in by_mod[m] if v > r.value]
        assert not nxt or r.value + r.size <= min(nxt), (r, m)
    width = 16 if reader.parse_image(ds.image).elfclass == 2 else 8
    res = run_ksymsfs("lookup", ds.image, *[f"{r.value + 1:x}" for r, _ in pick])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.decode().splitlines()
    want = [f"{r.value + 1:0{width}x} {r.name}+0x1/{r.size:#x}" + (f" [{m}]" if m else "")
            for r, m in pick]
    assert lines == want


# --- determinism and symbol order ----------------------------------------------------------

def test_deterministic(ds: Dataset) -> None:
    """The same input gives a byte-identical image."""
    second = ds.tmp / "second.elf"
    for _ in range(5):
        before = _read_live() if ds.live else None
        r = ds.rebuild(second)
        assert r.returncode == 0, r.stderr
        if not ds.live or (_read_live() == before == ds.kallsyms.read_bytes()):
            break
    else:
        pytest.skip("/proc/kallsyms kept changing")
    assert second.read_bytes() == ds.image.read_bytes()


def _load_order(modules_file: Path) -> list[str]:
    """/proc/modules lists newest first: load order is the reverse."""
    names = [ln.split()[0] for ln in modules_file.read_text().splitlines() if ln.strip()]
    return names[::-1]


def test_symtab_order(ds: Dataset) -> None:
    """Locals first (sh_info = first global); in each group kernel, then modules in load
    order (reverse /proc/modules), each module's symbols in their kallsyms order."""
    from elftools.elf.elffile import ELFFile

    rows = ds.readelf_syms
    with open(ds.image, "rb") as f:
        sh_info = ELFFile(f).get_section_by_name(".symtab")["sh_info"]
    binds = [r.bind for r in rows]
    n_local = sum(1 for b in binds if b == "LOCAL")
    assert sh_info == n_local  # entry 0 (LOCAL) counted: index of the first global
    assert all(b == "LOCAL" for b in binds[:sh_info])
    assert all(b != "LOCAL" for b in binds[sh_info:])
    mods = ds.dump_modules
    order = _load_order(ds.modules) if ds.modules else []
    listed = {m: i for i, m in enumerate(order, start=1)}
    in_input = list(dict.fromkeys(s.module for s in ds.syms if s.module))
    if ds.modules:  # every real module is listed; pseudo-modules ([bpf], ...) never are
        assert {m for m in in_input if not is_pseudo_module(m)} <= set(order)
    # modules absent from /proc/modules (pseudo-modules) come last, newest-first reversed
    unlisted = [m for m in in_input if m not in listed][::-1]
    rank = {"": 0, **listed, **{m: len(listed) + 1 + i for i, m in enumerate(unlisted)}}
    for lo, hi in ((1, sh_info), (sh_info, len(rows))):
        ranks = [rank[m] for m in mods[lo - 1:hi - 1]]
        assert ranks == sorted(ranks), f"module order broken in symtab[{lo}:{hi}]"
    # stable: within (group, module) the kallsyms order is kept
    is_local = [b == "LOCAL" for b in binds[1:]]
    got: dict[tuple[bool, str], list[str]] = {}
    for line, m, loc in zip(ds.dump, mods, is_local):
        got.setdefault((loc, m), []).append(line)
    want: dict[tuple[bool, str], list[str]] = {}
    for s, loc in zip(ds.syms, _input_is_local(ds)):
        want.setdefault((loc, s.module), []).append(s.text)
    assert got == want


def _input_is_local(ds: Dataset) -> list[bool]:
    """STB_LOCAL per input line, from the letter table (what the builder must do)."""
    return [ksl.LETTERS[s.letter][1] == 0 for s in ds.syms]


def test_local_modules_in_load_order(ds: Dataset) -> None:
    """Among the locals: the kernel's symbols, then each module's, oldest module first.

    Oldest first is the reverse of the modules file; without one (or for pseudo-modules
    it does not list) the reverse of the order modules first appear in kallsyms, which
    the kernel also lists newest first.
    """
    n_local = sum(1 for r in ds.readelf_syms[1:] if r.bind == "LOCAL")
    runs = [m for i, m in enumerate(ds.dump_modules[:n_local])
            if i == 0 or ds.dump_modules[i - 1] != m]
    with_locals = {s.module for s, loc in zip(ds.syms, _input_is_local(ds)) if loc}
    order = _load_order(ds.modules) if ds.modules else []
    appearance = list(dict.fromkeys(s.module for s in ds.syms if s.module))
    order += [m for m in appearance[::-1] if m not in order]
    assert runs == [""] * ("" in with_locals) + [m for m in order if m in with_locals]


# --- layout for run-time consumers (perf, gdb, libdwfl): README "The image" ---------------

def test_layout_sections_in_segments(ds: Dataset) -> None:
    """Each allocated section sits in a PT_LOAD at its own address and offset; PROGBITS
    sections own distinct file bytes (perf maps by offset); allocated sections do not
    overlap, except where two modules' symbols really interleave (the d2000 dump lists a
    module's stale init symbols where a later module was loaded)."""
    from elftools.elf.elffile import ELFFile

    with open(ds.image, "rb") as f:
        elf = ELFFile(f)
        secs = [s for s in elf.iter_sections() if s["sh_flags"] & 2]
        loads = [p for p in elf.iter_segments() if p["p_type"] == "PT_LOAD"]
        size = elf.stream.seek(0, 2)
    assert secs and loads
    for s in secs:
        a, o, n = s["sh_addr"], s["sh_offset"], s["sh_size"]
        seg = [p for p in loads if p["p_vaddr"] == a and p["p_offset"] == o
               and p["p_memsz"] >= max(n, 1)]
        assert len(seg) == 1, s.name
        if s["sh_type"] == "SHT_PROGBITS":
            assert o + n <= size and seg[0]["p_filesz"] == max(n, 1)
    prog = sorted((s["sh_offset"], s["sh_offset"] + s["sh_size"]) for s in secs
                  if s["sh_type"] == "SHT_PROGBITS")
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(prog, prog[1:]))
    spans = sorted((s["sh_addr"], s["sh_addr"] + s["sh_size"], s.name) for s in secs
                   if s["sh_size"])
    overlaps = [(x[2], y[2]) for x, y in zip(spans, spans[1:]) if y[0] < x[1]]
    if ds.name != "d2000-sep4020-arm32":
        assert not overlaps, overlaps[:5]
    assert len(overlaps) <= 12


def test_layout_main_text_is_one_section(ds: Dataset) -> None:
    """The kernel's main text (the biggest run of kernel text symbols) is the one
    section named ``.text``; other kernel text runs are named apart."""
    from elftools.elf.elffile import ELFFile

    with open(ds.image, "rb") as f:
        secs = [s for s in ELFFile(f).iter_sections() if s["sh_flags"] & 4]
    names = [s.name for s in secs if "[" not in s.name]
    assert names.count(".text") == 1, names[:10]
    main = next(s for s in secs if s.name == ".text")
    kernel_text = [s for s in ds.syms if not s.module and s.letter in "TtW"]
    inside = sum(1 for s in kernel_text
                 if main["sh_addr"] <= s.addr < main["sh_addr"] + main["sh_size"])
    assert inside > len(kernel_text) // 2


def test_layout_sparse_and_bounded(ds: Dataset) -> None:
    """Zeros are holes on disk; the virtual size stays bounded (layout.VIRTUAL_CAP)."""
    from ksymsfs.layout import VIRTUAL_CAP

    st = ds.image.stat()
    real = len(ds.syms) * 36 + 8 * 1024 * 1024  # symtab + strings + info, generously
    assert st.st_size <= VIRTUAL_CAP + real
    assert st.st_blocks * 512 <= real


# --- the virtual image (zeros never stored) ------------------------------------------------

def test_virtual_image_reads_like_its_bytes(tmp_path: Path) -> None:
    import ctypes
    import os
    import threading

    from ksymsfs.vimage import VirtualImage

    parts = [(0, b"head" * 100), (5000, b"tail" * 50)]
    v = VirtualImage(parts, 5200 + 3000)
    whole = bytes(v)
    assert len(whole) == len(v) == 8200 and whole[5000:5004] == b"tail"
    assert whole[400:5000] == bytes(4600) and whole[5200:] == bytes(3000)
    rnd = random.Random(1)
    buf = ctypes.create_string_buffer(9000)
    for _ in range(300):
        off, n = rnd.randrange(0, 8400), rnd.randrange(0, 9000)
        assert v[off:off + n] == whole[off:off + n]
        got = v.copy_into(ctypes.addressof(buf), off, n)
        assert buf.raw[:got] == whole[off:off + n]
    assert v.copy_into(ctypes.addressof(buf), -1, 10) == 0
    assert b"headhead" in v and b"\0tail" in v and b"nothere" not in v
    f = tmp_path / "sparse"
    with open(f, "wb") as out:
        v.write_to(out.fileno())
    assert f.read_bytes() == whole
    r, w = os.pipe()
    got = bytearray()
    def drain() -> None:
        for chunk in iter(lambda: os.read(r, 65536), b""):
            got.extend(chunk)
    t = threading.Thread(target=drain)
    t.start()
    v.write_to(w)
    os.close(w)
    t.join()
    os.close(r)
    assert bytes(got) == whole


def test_snapshot_to_stdout_equals_file(tmp_path: Path) -> None:
    """``snapshot -o -`` writes the zeros out (a pipe holds no hole): same bytes."""
    src = DATA / "binun-taiwan-x86_64"
    img = build_ok(tmp_path / "f.elf", kallsyms=src / "kallsyms", modules=src / "modules")
    r = run_ksymsfs("snapshot", "--kallsyms", src / "kallsyms", "--modules", src / "modules",
                    "-o", "-")
    assert r.returncode == 0 and r.stdout == img.read_bytes()
