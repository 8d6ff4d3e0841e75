"""Start-up: the CLI imports only what a command needs; the pure-Python small-image reader
answers exactly as the numpy reader. (Timings live in scripts/bench.py, not here.)"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from ksymsfs import elfdefs, readbase, reader
from tests.helpers import DATA, DUMPS, LENIENT_DUMPS, REPO, build_ok, cli_env

HEAVY = ("numpy", "elftools")


def _imported_after(code: str) -> set[str]:
    r = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                        "print(' '.join(m for m in sys.modules))"],
                       capture_output=True, env=cli_env(), cwd=str(REPO), timeout=60)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.decode().split())


@pytest.mark.parametrize("code", [
    "import ksymsfs",
    "import ksymsfs.cli",
    "from ksymsfs.cli import cli\ntry:\n    cli(['--version'])\nexcept SystemExit:\n    pass",
    "from ksymsfs.cli import cli\ntry:\n    cli(['--help'])\nexcept SystemExit:\n    pass",
])
def test_cheap_entry_points_import_no_numpy(code):
    mods = _imported_after(code)
    assert not {m for m in mods if m.split(".")[0] in HEAVY}


def test_nlist_and_lookup_on_a_small_image_import_no_numpy(tmp_path):
    img = build_ok(tmp_path / "i.elf", kallsyms=DATA / "bad" / "crlf_ok.kallsyms")
    for args in (["nlist", str(img), "_stext"], ["lookup", str(img), "ffffffff81000001"]):
        mods = _imported_after(f"from ksymsfs.cli import cli\ncli({args!r})")
        assert "numpy" not in mods and "ksymsfs.npreader" not in mods, args


def test_public_api_is_still_there():
    import ksymsfs
    for name in ksymsfs.__all__:
        assert getattr(ksymsfs, name) is not None
    assert set(ksymsfs.__all__) <= set(dir(ksymsfs))
    with pytest.raises(AttributeError):
        ksymsfs.no_such_name  # noqa: B018


def test_pure_reader_constants_match_elf_h():
    for name in ("ELFCLASS32", "ELFCLASS64", "ELFDATA2LSB", "ELFDATA2MSB", "SHT_PROGBITS",
                 "SHT_SYMTAB", "SHT_NOBITS", "SHF_WRITE", "SHN_UNDEF", "SHN_LORESERVE",
                 "SHN_ABS", "SHN_COMMON", "STB_GLOBAL", "STB_WEAK", "STT_FILE"):
        assert getattr(readbase, name) == getattr(elfdefs, name), name
    from ksymsfs import builder
    assert (readbase.INFO_SECTION, readbase.MODULES_SECTION) == (
        builder.INFO_SECTION, builder.MODULES_SECTION)


@pytest.fixture(scope="module", params=DUMPS)
def dump_image(request, tmp_path_factory):
    name = request.param
    modules = DATA / name / "modules"
    img = build_ok(tmp_path_factory.mktemp(name) / "i.elf", kallsyms=DATA / name / "kallsyms",
                   modules=modules if modules.exists() else None, lenient=name in LENIENT_DUMPS)
    return name, img


def test_both_readers_agree_on_every_dump(dump_image):
    """nlist of a sample of names (and _names, and misses) and lookup of every symbol's
    address, +1 and -1, and of random addresses: identical from both readers."""
    name, path = dump_image
    py = reader.parse_image(path, engine="python")
    np_ = reader.parse_image(path, engine="numpy")
    assert type(py).__name__ == "PyImage" and type(np_).__name__ == "Image"
    assert (py.elfclass, py.byteorder, py.machine, len(py), py.address_width) == (
        np_.elfclass, np_.byteorder, np_.machine, len(np_), np_.address_width)
    rnd = random.Random(name)
    names = np_.names()
    sample = rnd.sample(names, min(300, len(names))) + ["_" + n for n in names[:50]]
    sample += ["", "_", "no_such_symbol", "$a", "$d"]
    assert reader.nlist(py, sample) == reader.nlist(np_, sample)
    vals = [int(v) for v in np_.syms["st_value"]]
    top = (1 << (8 * np_.address_width // 2)) - 1
    addrs = [a for v in vals for a in (v, v + 1, v - 1) if 0 <= a <= top]
    addrs += [rnd.randrange(0, top) for _ in range(2000)]
    assert reader.lookup(py, addrs) == reader.lookup(np_, addrs)
    assert [reader.nlist_type(py, i) for i in range(0, len(py), 97)] == [
        reader.nlist_type(np_, i) for i in range(0, len(np_), 97)]


def test_small_image_answers_numpy_questions_too(dump_image):
    """A PyImage hands what it does not know itself (syms, dump) to the numpy reader."""
    _, path = dump_image
    py = reader.parse_image(path, engine="python")
    assert list(reader.dump_lines(py)) == list(reader.dump_lines(path))
    assert len(py.syms) == len(py)
