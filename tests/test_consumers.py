"""Run-time consumers on the image: perf, gdb, libdwfl (eu-addr2line), LIEF, addr2line,
llvm-symbolizer, file/readelf -n, on the live kernel, a real mount of it, and a dump with
modules (tests/data/binun-taiwan-x86_64). Every tool is the real one; a missing tool
fails under CI.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fuse_harness import Mount, require_fuse
from tests.helpers import DATA, IN_CI, build_ok, need_tool, run_ksymsfs, run_tool

LIVE_KALLSYMS = Path("/proc/kallsyms")
KERNEL_NOTES = Path("/sys/kernel/notes")
BINUN = DATA / "binun-taiwan-x86_64"
WARNING_RE = re.compile(r"(?i)\bwarning\b")


@dataclass(frozen=True)
class ESym:
    """A symbol as the image has it, with its section."""

    name: str
    value: int
    size: int
    section: str
    sh_addr: int
    sh_offset: int
    sh_type: str
    flags: int
    module: str


def image_symbols(path: Path) -> list[ESym]:
    from elftools.elf.elffile import ELFFile

    out = []
    with open(path, "rb") as f:
        elf = ELFFile(f)
        secs = list(elf.iter_sections())
        for s in elf.get_section_by_name(".symtab").iter_symbols():
            ndx = s["st_shndx"]
            if not isinstance(ndx, int) or ndx == 0:
                continue
            sec = secs[ndx]
            mod = sec.name[sec.name.index("[") + 1:-1] if sec.name.endswith("]") else ""
            out.append(ESym(s.name, s["st_value"], s["st_size"], sec.name, sec["sh_addr"],
                            sec["sh_offset"], sec["sh_type"], sec["sh_flags"], mod))
    return out


def unique_sample(syms: list[ESym], k: int, seed: str, min_size: int = 2,
                  pred=lambda s: True) -> list[ESym]:
    """Up to ``k`` symbols per section, alone at their address, sized, with unique names."""
    at = Counter(s.value for s in syms)
    names = Counter(s.name for s in syms)
    by_sec: dict[str, list[ESym]] = defaultdict(list)
    for s in syms:
        if (s.size >= min_size and at[s.value] == 1 and names[s.name] == 1
                and s.flags & 2 and pred(s) and not s.name.startswith("$")):
            by_sec[s.section].append(s)
    rnd = random.Random(seed)
    out = []
    for sec in sorted(by_sec):
        out += rnd.sample(by_sec[sec], min(k, len(by_sec[sec])))
    return out


def _fail_or_skip(msg: str) -> None:
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def live_image(tmp_path_factory) -> Path:
    if not LIVE_KALLSYMS.exists():
        _fail_or_skip("no /proc/kallsyms")
    out = build_ok(tmp_path_factory.mktemp("live") / "image.elf")
    if not any(s.value for s in image_symbols(out)[:100]):
        _fail_or_skip("/proc/kallsyms shows only zero addresses to this user")
    return out


@pytest.fixture(scope="module")
def live_mount(tmp_path_factory):
    require_fuse()
    m = Mount(tmp_path_factory.mktemp("mnt") / "ksyms")
    yield m
    m.stop()


@pytest.fixture(scope="module")
def binun_image(tmp_path_factory) -> Path:
    return build_ok(tmp_path_factory.mktemp("binun") / "image.elf",
                    kallsyms=BINUN / "kallsyms", modules=BINUN / "modules")


# --- notes ---------------------------------------------------------------------------------

def _build_id(raw: bytes) -> bytes | None:
    i = 0
    while i + 12 <= len(raw):
        namesz, descsz, typ = struct.unpack_from("<III", raw, i)
        name = raw[i + 12:i + 12 + namesz]
        d = i + 12 + (namesz + 3) // 4 * 4
        if name == b"GNU\0" and typ == 3:
            return raw[d:d + descsz]
        i = d + (descsz + 3) // 4 * 4
    return None


def test_live_build_id_in_readelf_and_file(live_image: Path) -> None:
    if not KERNEL_NOTES.exists():
        _fail_or_skip("no /sys/kernel/notes")
    want = _build_id(KERNEL_NOTES.read_bytes())
    assert want
    r = run_tool(need_tool("readelf"), "-n", live_image)
    assert r.returncode == 0 and not r.stderr
    assert f"Build ID: {want.hex()}" in r.stdout.decode()
    r = run_tool(need_tool("file"), live_image)
    assert f"BuildID[sha1]={want.hex()}" in r.stdout.decode(), r.stdout


def test_offline_notes_and_module_build_ids(tmp_path: Path) -> None:
    """--notes FILE and --sections DIR/<m>/notes/.note.gnu.build-id end up as notes."""
    def note(desc: bytes) -> bytes:
        return struct.pack("<III", 4, len(desc), 3) + b"GNU\0" + desc
    kid = bytes(range(20))
    (tmp_path / "notes").write_bytes(note(kid) + struct.pack("<III", 6, 4, 0x100)
                                     + b"Linux\0\0\0" + b"\1\0\0\0")
    mods = [ln.split()[0] for ln in (BINUN / "modules").read_text().splitlines()[:3]]
    for i, m in enumerate(mods):
        d = tmp_path / "sys" / m / "notes"
        d.mkdir(parents=True)
        (d / ".note.gnu.build-id").write_bytes(note(bytes([i]) * 20))
    out = tmp_path / "img.elf"
    r = run_ksymsfs("snapshot", "--kallsyms", BINUN / "kallsyms", "--modules",
                    BINUN / "modules", "--sections", tmp_path / "sys", "--notes",
                    tmp_path / "notes", "-o", out)
    assert r.returncode == 0, r.stderr
    text = run_tool(need_tool("readelf"), "-nW", out).stdout.decode()
    assert f"Build ID: {kid.hex()}" in text
    for i, m in enumerate(mods):
        assert f".note.gnu.build-id[{m}]" in text
        assert f"Build ID: {(bytes([i]) * 20).hex()}" in text
    r = run_tool(need_tool("eu-elflint"), "--gnu-ld", out)
    assert r.stdout.decode().strip() == "No errors", r.stdout
    # the kernel's other notes (Linux) are kept verbatim
    from elftools.elf.elffile import ELFFile
    with open(out, "rb") as f:
        assert ELFFile(f).get_section_by_name(".ksyms.notes").data()[12:18] == b"Linux\0"
    r = run_ksymsfs("snapshot", "--kallsyms", BINUN / "kallsyms", "--notes",
                    tmp_path / "missing", "-o", tmp_path / "x.elf")
    assert r.returncode != 0 and r.stderr.count(b"\n") == 1 and b"missing" in r.stderr


# --- perf ----------------------------------------------------------------------------------

KERNEL_FRAME = re.compile(r"^\s*([0-9a-f]{16}) (\S+)")


@pytest.fixture(scope="module")
def perf_data(tmp_path_factory, live_image: Path) -> Path:
    if os.geteuid() != 0:
        _fail_or_skip("perf record -a needs root here (perf_event_paranoid)")
    perf = need_tool("perf")
    out = tmp_path_factory.mktemp("perf") / "perf.data"
    work = "i=0; while [ $i -lt 400 ]; do cat /proc/self/status /proc/self/maps >/dev/null; " \
           "i=$((i+1)); done"
    r = run_tool(perf, "record", "-N", "-q", "-a", "-g", "-F", "2000", "-o", out, "--",
                 "sh", "-c", work, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def _frames(perf_data: Path, *args: str | Path) -> list[tuple[int, str]]:
    r = run_tool(need_tool("perf"), "script", "-v", "-i", perf_data, "-F", "ip,sym", *args,
                 timeout=600)
    assert r.returncode == 0, r.stderr
    if "--vmlinux" in args:  # perf used the image, it did not fall back to kallsyms
        vmlinux = args[args.index("--vmlinux") + 1]
        assert f"Using {vmlinux} for symbols" in r.stderr.decode(), r.stderr[-2000:]
    out = []
    for line in r.stdout.decode("utf-8", "replace").splitlines():
        m = KERNEL_FRAME.match(line)
        if m and int(m[1], 16) >= 0xFFFF800000000000:
            out.append((int(m[1], 16), m[2]))
    return out


def _perf_matches(perf_data: Path, vmlinux: Path) -> None:
    ref = _frames(perf_data, "--kallsyms", LIVE_KALLSYMS)
    got = _frames(perf_data, "--vmlinux", vmlinux)
    assert len(ref) == len(got) and len(ref) > 1000
    assert [a for a, _ in ref] == [a for a, _ in got]
    named = [(r, g) for (_, r), (_, g) in zip(ref, got) if r != "[unknown]"]
    assert len(named) > 0.95 * len(ref)
    same = sum(1 for r, g in named if r == g)
    assert same >= 0.99 * len(named), (same, len(named))
    # the rest are aliases: another name of the very same address, never a wrong function
    addrs: dict[str, set[int]] = defaultdict(set)
    for line in LIVE_KALLSYMS.read_text().splitlines():
        a, _, n = line.split()[:3]
        addrs[n].add(int(a, 16))
    wrong = [(r, g) for r, g in named if r != g and not addrs[r] & addrs[g]]
    assert not wrong, wrong[:10]


def test_perf_names_frames_like_kallsyms(perf_data: Path, live_image: Path) -> None:
    """perf script --vmlinux IMAGE (build-ids checked, no -f) names kernel frames as perf's
    own /proc/kallsyms path does."""
    _perf_matches(perf_data, live_image)


def test_perf_through_mount(perf_data: Path, live_mount) -> None:
    _perf_matches(perf_data, live_mount.path)


# --- gdb -----------------------------------------------------------------------------------

def _gdb(target: Path, *cmds: str, pre: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    argv = [need_tool("gdb"), "-batch", "-nx", "-iex", "set width 0", *pre]
    for c in cmds:
        argv += ["-ex", c]
    if target is not None:
        argv.append(str(target))
    return run_tool(*argv, timeout=300)


def _no_dot(s: ESym) -> bool:
    """gdb prints a local ``name.1234`` (a compiler-made static) as ``name``."""
    return "." not in s.name


def _gdb_symbols(target: Path, syms: list[ESym]) -> None:
    cmds = []
    for s in syms:
        cmds += [f"info symbol {s.value + 1:#x}", f"p/a {s.value + 1:#x}"]
    r = _gdb(target, *cmds)
    err = r.stderr.decode()
    out = r.stdout.decode().splitlines()
    assert r.returncode == 0 and not err, err
    assert not [ln for ln in out if WARNING_RE.search(ln)]
    assert len(out) == 2 * len(syms), out[:10]
    for s, info, pa in zip(syms, out[::2], out[1::2]):
        assert info == f"{s.name} + 1 in section {s.section}", (s, info)
        assert pa.endswith(f"{s.value + 1:#x} <{s.name}+1>"), (s, pa)


def test_gdb_info_symbol_every_section(live_image: Path) -> None:
    syms = image_symbols(live_image)
    sample = unique_sample(syms, 4, "gdb", pred=_no_dot)
    assert len({s.section for s in sample}) >= 3
    _gdb_symbols(live_image, sample)


def test_gdb_info_symbol_modules(binun_image: Path) -> None:
    sample = unique_sample(image_symbols(binun_image), 1, "gdb-mod", pred=_no_dot)
    assert sum(1 for s in sample if s.module) > 20
    _gdb_symbols(binun_image, sample)


def test_gdb_on_mount_no_warnings(live_mount) -> None:
    r = _gdb(live_mount.path, "info symbol _stext", "set complaints 100",
             "maint info sections")
    assert r.returncode == 0 and not r.stderr, r.stderr
    text = r.stdout.decode()
    assert not WARNING_RE.search(text) and "overlap" not in text
    assert " in section .text\n" in text  # _stext shares its address with other names


def test_gdb_memory_reads_as_zeros(live_image: Path) -> None:
    """Documented: address sections have no contents; gdb reads zeros, never the image's
    own bytes (an ELF header, the symbol table)."""
    syms = image_symbols(live_image)
    text = next(s for s in syms if s.name == "schedule")
    data = next((s for s in syms if s.sh_type == "SHT_PROGBITS" and s.flags & 1), None)
    cmds = [f"x/16xb {text.value:#x}", f"p/x *(long*){text.value:#x}"]
    if data is not None:
        cmds.append(f"x/16xb {data.value:#x}")
    r = _gdb(live_image, *cmds)
    assert r.returncode == 0 and not r.stderr, r.stderr
    out = r.stdout.decode()
    assert "0x7f\t0x45" not in out and "ELF" not in out
    assert "$1 = 0x0" in out
    assert all(int(v, 16) == 0 for line in out.splitlines() if ":" in line
               for v in re.findall(r"\t(0x[0-9a-f]{2})\b", line)), out
    assert out.count("\t0x00") >= 16


def test_gdb_add_symbol_file_moves_all_kernel_text(live_image: Path) -> None:
    """``add-symbol-file IMG ADDR`` relocates the first ``.text``: that is the whole
    main kernel text (one section from its first to its last text symbol)."""
    syms = image_symbols(live_image)
    main = [s for s in syms if s.section == ".text"]
    assert main
    base = main[0].sh_addr
    cand = unique_sample(main, 10, "reloc", pred=_no_dot)
    cand += [min(cand, key=lambda s: s.value), max(cand, key=lambda s: s.value)]
    new = 0x100000000
    cmds = [f"info symbol {new + s.value - base + 1:#x}" for s in cand]
    r = _gdb(None, *cmds, pre=("-ex", f"add-symbol-file {live_image} {new:#x}"))
    out = [ln for ln in r.stdout.decode().splitlines() if " in section " in ln]
    assert r.returncode == 0, r.stderr
    assert out == [f"{s.name} + 1 in section .text" for s in cand], out[:5]
    # every other kernel text section is named apart, so gdb cannot take it for .text
    from elftools.elf.elffile import ELFFile
    with open(live_image, "rb") as f:
        names = [s.name for s in ELFFile(f).iter_sections() if s["sh_flags"] & 4]
    assert names.count(".text") == 1, names


# --- libdwfl, LIEF, binutils, LLVM ---------------------------------------------------------

def _addr2line_eu(image: Path, syms: list[ESym]) -> None:
    r = run_tool(need_tool("eu-addr2line"), "-S", "-e", image,
                 *[f"{s.value + 1:#x}" for s in syms])
    assert r.returncode == 0 and not r.stderr, r.stderr
    lines = r.stdout.decode().splitlines()[::2]
    assert lines == [f"{s.name}+0x1" for s in syms], [
        (s, ln) for s, ln in zip(syms, lines) if ln != f"{s.name}+0x1"][:5]


def test_eu_addr2line_live(live_image: Path) -> None:
    _addr2line_eu(live_image, unique_sample(image_symbols(live_image), 5, "eu"))


def test_eu_addr2line_kernel_and_modules(binun_image: Path) -> None:
    syms = image_symbols(binun_image)
    sample = unique_sample(syms, 2, "eu-mod")
    assert any(s.module and s.flags & 4 for s in sample)
    assert any(s.module and s.flags & 1 for s in sample)
    assert any(not s.module and s.flags & 1 for s in sample)
    _addr2line_eu(binun_image, sample)


def test_lief_virtual_address_to_offset(binun_image: Path) -> None:
    import lief

    lief.logging.disable()
    b = lief.parse(str(binun_image))
    for s in unique_sample(image_symbols(binun_image), 3, "lief",
                           pred=lambda s: s.sh_type == "SHT_PROGBITS"):
        assert b.virtual_address_to_offset(s.value) == s.sh_offset + s.value - s.sh_addr, s


def test_addr2line_and_llvm_symbolizer(binun_image: Path) -> None:
    sample = unique_sample(image_symbols(binun_image), 2, "sym", pred=lambda s: s.flags & 4)
    addrs = [f"{s.value + 1:#x}" for s in sample]
    r = run_tool(need_tool("addr2line"), "-f", "-e", binun_image, *addrs)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines()[::2] == [s.name for s in sample]
    exe = next((n for n in ("llvm-symbolizer", "llvm-symbolizer-14") if shutil.which(n)),
               "llvm-symbolizer")
    r = run_tool(need_tool(exe), f"--obj={binun_image}", *addrs)
    assert r.returncode == 0, r.stderr
    names = [ln for ln in r.stdout.decode().splitlines() if ln and not ln.startswith("?")]
    assert names == [s.name for s in sample], names[:5]
