"""Bad input: malformed kallsyms text and unreadable images fail cleanly.

Contract (CLI): exit status 2, exactly one line on stderr naming ``FILE:LINE:`` and a
reason, no traceback, and no output file (an existing one is left untouched).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ksymsfs import reader
from ksymsfs.errors import KsymsError, ParseError
from ksymsfs.kallsyms import parse_kallsyms
from tests.helpers import BAD, DATA, LENIENT_DUMPS, build_ok, parse_input, run_ksymsfs, snapshot

# file -> (line number the error must name (None: whole file), words the reason must contain)
BAD_FILES = {
    "malformed_line": (3, "malformed"),
    "bad_hex": (3, "hex"),
    "unknown_letter": (3, "'X'"),
    "long_name": (3, "512 bytes"),
    "empty": (None, "empty"),
    "binary_garbage": (1, ""),
    "truncated_last_line": (3, "newline"),
    "mixed_widths": (3, "8 hex digits"),
    "nul_in_name": (3, "control character"),
    "module_unclosed": (3, "module"),
}


def _one_line_error(r, where: str, reason: str = "") -> str:
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert where in err, err
    assert reason in err[err.index(where) + len(where):], err
    after = err[err.index(where) + len(where):].strip(" :\n")
    assert after, f"no reason given: {err!r}"
    return err


def test_bad_files_all_present() -> None:
    have = {p.stem for p in BAD.glob("*.kallsyms")}
    assert set(BAD_FILES) | {"crlf_ok"} == have


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_kallsyms_rejected(name: str, tmp_path: Path) -> None:
    path = BAD / f"{name}.kallsyms"
    line, reason = BAD_FILES[name]
    out = tmp_path / "out.elf"
    r = snapshot(out, kallsyms=path)
    where = f"{path}:{line}:" if line else f"{path}:"
    _one_line_error(r, where, reason)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either
    assert r.stdout == b""


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_kallsyms_keeps_existing_output(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out.elf"
    old = b"previous image, must survive\n"
    out.write_bytes(old)
    r = snapshot(out, kallsyms=BAD / f"{name}.kallsyms")
    assert r.returncode == 2
    assert out.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["out.elf"]


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_kallsyms_parser_raises_parse_error(name: str) -> None:
    """The library raises ParseError (a KsymsError) with the line, never anything else."""
    path = BAD / f"{name}.kallsyms"
    line, _ = BAD_FILES[name]
    with pytest.raises(ParseError) as e:
        parse_kallsyms(path.read_bytes(), str(path))
    assert e.value.lineno == line
    assert "\n" not in str(e.value)


def test_crlf_accepted(tmp_path: Path) -> None:
    path = BAD / "crlf_ok.kallsyms"
    out = build_ok(tmp_path / "out.elf", kallsyms=path)
    syms, junk = parse_input(path.read_bytes())
    assert not junk and len(syms) == 5
    dump = run_ksymsfs("dump", out)
    assert dump.returncode == 0
    assert dump.stdout.decode().splitlines() == [
        "ffffffff81000010 t helper",
        "ffffffffa0000000 t modfunc\t[ext4]",
        "ffffffff81000000 T _stext",
        "ffffffff81000020 D some_data",
        "ffffffffa0000040 T modexp\t[ext4]",
    ]
    assert "\r" not in dump.stdout.decode()


# --- lenient mode --------------------------------------------------------------------------

@pytest.mark.parametrize("name,skipped", [
    ("malformed_line", 1), ("bad_hex", 1), ("unknown_letter", 1), ("long_name", 1),
    ("mixed_widths", 1), ("nul_in_name", 1), ("module_unclosed", 1),
    ("truncated_last_line", 0), ("crlf_ok", 0),
])
def test_lenient_counts_skipped_lines(name: str, skipped: int, tmp_path: Path) -> None:
    path = BAD / f"{name}.kallsyms"
    out = tmp_path / "out.elf"
    r = snapshot(out, kallsyms=path, lenient=True)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "Traceback" not in err
    if skipped:
        assert f"skipped {skipped} line" in err
    else:
        assert "skipped" not in err
    table = parse_kallsyms(path.read_bytes(), str(path), lenient=True)
    assert table.skipped == skipped
    syms, junk = parse_input(path.read_bytes())
    assert len(junk) == skipped
    dump = run_ksymsfs("dump", out).stdout.decode().splitlines()
    assert sorted(dump) == sorted(s.text for s in syms)


@pytest.mark.parametrize("name", ["empty", "binary_garbage"])
def test_lenient_nothing_left_is_an_error(name: str, tmp_path: Path) -> None:
    path = BAD / f"{name}.kallsyms"
    r = snapshot(tmp_path / "out.elf", kallsyms=path, lenient=True)
    _one_line_error(r, f"{path}:")
    assert not (tmp_path / "out.elf").exists()


@pytest.mark.parametrize("name", sorted(LENIENT_DUMPS))
def test_junk_dump_strict_names_first_junk_line(name: str, tmp_path: Path) -> None:
    """Without --lenient a dump with headers fails at its first non-symbol line."""
    path = DATA / name / "kallsyms"
    _, junk = parse_input(path.read_bytes())
    r = snapshot(tmp_path / "out.elf", kallsyms=path)
    _one_line_error(r, f"{path}:{junk[0]}:")
    r = snapshot(tmp_path / "out.elf", kallsyms=path, lenient=True)
    assert r.returncode == 0
    assert f"skipped {len(junk)} lines" in r.stderr.decode()


# --- unreadable images ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("img")
    return {
        "64": build_ok(d / "x64.elf", kallsyms=BAD / "crlf_ok.kallsyms"),
        "32": build_ok(d / "x32.elf", kallsyms=DATA / "d2000-sep4020-arm32" / "kallsyms",
                       modules=DATA / "d2000-sep4020-arm32" / "modules"),
    }


def _corrupt_shoff(src: Path, dst: Path, value: int) -> Path:
    data = bytearray(src.read_bytes())
    if data[4] == 1:  # ELFCLASS32: e_shoff at 0x20, 4 bytes
        data[0x20:0x24] = struct.pack("<I", value & 0xFFFFFFFF)
    else:             # ELFCLASS64: e_shoff at 0x28, 8 bytes
        data[0x28:0x30] = struct.pack("<Q", value)
    dst.write_bytes(bytes(data))
    return dst


def _bad_images(good: dict[str, Path], d: Path) -> dict[str, Path]:
    out = {}
    (d / "text").write_bytes((BAD / "crlf_ok.kallsyms").read_bytes())
    out["not-elf"] = d / "text"
    (d / "empty").write_bytes(b"")
    out["empty"] = d / "empty"
    (d / "magic-only").write_bytes(b"\x7fELF")
    out["magic-only"] = d / "magic-only"
    for cls, img in good.items():
        data = img.read_bytes()
        (d / f"trunc{cls}").write_bytes(data[:len(data) // 2])
        out[f"truncated-{cls}"] = d / f"trunc{cls}"
        (d / f"hdr{cls}").write_bytes(data[:40])
        out[f"header-only-{cls}"] = d / f"hdr{cls}"
        out[f"shoff-huge-{cls}"] = _corrupt_shoff(img, d / f"shoffh{cls}", 0xFFFFFFFFFFFFFFF0)
        out[f"shoff-past-end-{cls}"] = _corrupt_shoff(img, d / f"shoffp{cls}", len(data) - 8)
        out[f"shoff-zero-{cls}"] = _corrupt_shoff(img, d / f"shoff0{cls}", 0)
    return out


BAD_IMAGE_KINDS = ["not-elf", "empty", "magic-only"] + [
    f"{k}-{c}" for c in ("32", "64")
    for k in ("truncated", "header-only", "shoff-huge", "shoff-past-end", "shoff-zero")]


@pytest.fixture(scope="module")
def bad_images(good_images, tmp_path_factory) -> dict[str, Path]:
    return _bad_images(good_images, tmp_path_factory.mktemp("badimg"))


@pytest.mark.parametrize("kind", BAD_IMAGE_KINDS)
@pytest.mark.parametrize("cmd", ["nlist", "lookup", "dump"])
def test_bad_image_cli(kind: str, cmd: str, bad_images: dict[str, Path]) -> None:
    path = bad_images[kind]
    args = {"nlist": ["_stext"], "lookup": ["ffffffff81000001"], "dump": []}[cmd]
    r = run_ksymsfs(cmd, path, *args)
    _one_line_error(r, f"{path}:")
    assert r.stdout == b""


@pytest.mark.parametrize("kind", BAD_IMAGE_KINDS)
def test_bad_image_library(kind: str, bad_images: dict[str, Path]) -> None:
    path = bad_images[kind]
    with pytest.raises(KsymsError):
        reader.parse_image(path)
    with pytest.raises(KsymsError):
        reader.nlist(path, ["_stext"])
    with pytest.raises(KsymsError):
        reader.lookup(path, [0xFFFFFFFF81000001])
    with pytest.raises(KsymsError):
        list(reader.dump_lines(path))


def test_missing_image_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.elf"
    for cmd, args in (("nlist", ["x"]), ("lookup", ["1"]), ("dump", [])):
        r = run_ksymsfs(cmd, path, *args)
        assert r.returncode in (1, 2)
        err = r.stderr.decode()
        assert "Traceback" not in err and err.count("\n") == 1 and str(path) in err


@pytest.mark.parametrize("addr", ["zz", "0x", "-1", "1" + "0" * 16])
def test_lookup_bad_address(addr: str, good_images: dict[str, Path]) -> None:
    """Not a hex address, or not a 64-bit one: exit 2 with one line, no traceback."""
    r = run_ksymsfs("lookup", good_images["64"], "--", addr)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("ksymsfs: ")


def test_good_images_still_read(good_images: dict[str, Path]) -> None:
    """The corruption tests above start from images that do read fine."""
    for img in good_images.values():
        r = run_ksymsfs("dump", img)
        assert r.returncode == 0 and r.stdout and not r.stderr


def test_missing_kallsyms_file(tmp_path: Path) -> None:
    path = tmp_path / "no-such-kallsyms"
    out = tmp_path / "out.elf"
    r = snapshot(out, kallsyms=path)
    err = r.stderr.decode()
    assert r.returncode != 0 and "Traceback" not in err
    assert err.count("\n") == 1 and str(path) in err
    assert not out.exists()
