"""The churn checker (tests/vm/churn.py) on the host, no VM: it passes clean images of the
captured Debian 6.1 kernel and rejects crafted mixed ones, read the way the guest reads
them (a served image's symbol parts; a snapshot's table with its module list)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ksymsfs.kallsyms import parse_kallsyms
from ksymsfs.snapshot import snapshot_image
from ksymsfs.sources import Snapshot, parse_modules
from tests.vm import churn
from tests.vm import images as im

DUMP = Path(__file__).resolve().parents[1] / "data" / "debian12-6.1-x86_64-qemu"
LINES = (DUMP / "kallsyms").read_bytes().decode("utf-8", "surrogateescape").splitlines()
MODULES = (DUMP / "modules").read_text().splitlines()
DUMMY = [ln for ln in LINES if ln.endswith("\t[dummy]")]
QUIET = [ln for ln in LINES if not ln.endswith("\t[dummy]")]
DUMMY_AT = int(next(ln for ln in MODULES if ln.startswith("dummy ")).split()[5], 16)
REL = Counter((int(a, 16) - DUMMY_AT, c, n) for a, c, n in
              (ln.split("\t")[0].split(" ", 2) for ln in DUMMY))


def moved(lines: list[str], by: int) -> list[str]:
    return [f"{int(ln[:16], 16) + by:016x}{ln[16:]}" for ln in lines]


def served(tmp_path: Path, lines: list[str], modules: list[str], how: str) -> im.Syms:
    """``lines`` as the guest sees them: through a served image, or a direct snapshot."""
    text = "".join(ln + "\n" for ln in lines).encode("utf-8", "surrogateescape")
    mods = parse_modules("".join(m + "\n" for m in modules).encode())
    table = parse_kallsyms(text)
    if how == "snapshot":
        return im.from_table(table, [m.name for m in mods])
    img = snapshot_image(Snapshot(table, mods))
    path = tmp_path / "image"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        img.write_to(fd)
    finally:
        os.close(fd)
    return im.from_image(str(path))


@functools.cache
def module_classifier():
    return churn.ModuleClassifier(QUIET, REL, set())


def module_verdict(tmp_path, lines, modules, how) -> str:
    return module_classifier()(os.urandom(8), served(tmp_path, lines, modules, how), 0.0, 0.0)


def block(mod: str) -> list[str]:
    return [ln for ln in LINES if ln.endswith(f"\t[{mod}]")]


MODS_WITHOUT_DUMMY = [m for m in MODULES if not m.startswith("dummy ")]
# dummy reloaded 0x7000 higher: its line moves to the head of the list (newest first)
DUMMY2 = moved(DUMMY, 0x7000)
MODS_DUMMY2 = [f"dummy 16384 0 - Live {DUMMY_AT + 0x7000:#x}"] + MODS_WITHOUT_DUMMY
FUSE, VXLAN = block("fuse"), block("vxlan")
CLEAN = {
    "quiet, no dummy": (QUIET, MODS_WITHOUT_DUMMY),
    "dummy loaded": (LINES, MODULES),
    "dummy reloaded elsewhere": (QUIET + DUMMY2, MODS_DUMMY2),
    "same symbols, other order": (QUIET[::-1] + DUMMY, MODULES),
}
MIXED = {
    "a module's block twice, another's partly missing (seen on 6.1)":
        ([ln for ln in QUIET if ln not in set(VXLAN[:56])] + FUSE[:79], MODS_WITHOUT_DUMMY),
    "one other module's line missing": ([ln for ln in LINES if ln != FUSE[0]], MODULES),
    "one letter changed": ([ln[:17] + ln[17].swapcase() + ln[18:] if ln == FUSE[0] else ln
                            for ln in LINES], MODULES),
    "dummy's block twice": (LINES + DUMMY, MODULES),
    "dummy of two instances": (QUIET + DUMMY[:10] + DUMMY2[10:], MODULES),
    "dummy's lines partly missing": (QUIET + DUMMY[:-3], MODULES),
}
LIST_MIXED = {   # only a direct snapshot has a module list to pair with
    "dummy's symbols, no dummy in the list": (LINES, MODS_WITHOUT_DUMMY),
    "dummy in the list, no dummy symbols": (QUIET, MODULES),
    "a listed module without symbols": (QUIET, MODS_WITHOUT_DUMMY + [
        "ghost 16384 0 - Live 0xffffffffc0900000"]),
}


@pytest.mark.parametrize("how", ["image", "snapshot"])
@pytest.mark.parametrize("case", sorted(CLEAN))
def test_clean_module_states_pass(tmp_path, case: str, how: str) -> None:
    assert module_verdict(tmp_path, *CLEAN[case], how) == ""


@pytest.mark.parametrize("how", ["image", "snapshot"])
@pytest.mark.parametrize("case", sorted(MIXED))
def test_mixed_module_images_are_caught(tmp_path, case: str, how: str) -> None:
    assert module_verdict(tmp_path, *MIXED[case], how) != ""
    assert coming_verdict(tmp_path, *MIXED[case], how) != ""  # knowing the .ko's names


@pytest.mark.parametrize("case", sorted(LIST_MIXED))
def test_module_list_of_another_moment_is_caught(tmp_path, case: str) -> None:
    assert module_verdict(tmp_path, *LIST_MIXED[case], "snapshot") != ""


def test_mixed_detail_names_the_symbols(tmp_path) -> None:
    why = module_verdict(tmp_path, *MIXED["one letter changed"], "image")
    name = FUSE[0].split("\t")[0].split(" ", 2)[2]
    assert name in why and "missing" in why and "extra" in why, why


# dummy while COMING: its whole .symtab (core lines as when live, init ones, imports as
# 'U' at the kernel's addresses, locals of unloaded sections at their load-time copy)
EXTRA = [f"{DUMMY_AT + 0x9000:016x} t dummy_init_module\t[dummy]",
         "ffffffff81a00010 U rtnl_lock\t[dummy]",
         "ffffffff81a00020 U __rtnl_link_register\t[dummy]",
         "ffffffffc1f00040 r ____versions\t[dummy]"]
FULL = Counter(n for (_, _, n), k in REL.items() for _ in range(k)) + Counter(
    ln.split("\t")[0].split(" ", 2)[2] for ln in EXTRA)


def coming_verdict(tmp_path, lines, modules, how) -> str:
    classify = churn.ModuleClassifier(QUIET, REL, set(), FULL)
    return classify(os.urandom(8), served(tmp_path, lines, modules, how), 0.0, 0.0)


COMING_MIXED = {
    "an import missing": QUIET + EXTRA[:-1] + DUMMY,
    "an import twice": QUIET + EXTRA + EXTRA[1:2] + DUMMY,
    "a name the module does not have": QUIET + EXTRA + DUMMY + [
        "ffffffff81a00030 U printk\t[dummy]"],
    "core lines of two instances": QUIET + EXTRA + DUMMY[:10] + DUMMY2[10:],
    "core lines twice": QUIET + EXTRA + DUMMY + DUMMY,
}


@pytest.mark.parametrize("how", ["image", "snapshot"])
def test_a_coming_module_whole_symtab_is_one_instance(tmp_path, how: str) -> None:
    """Seen on 6.1 (3 of 151 crowd images, the 70 named symbols of dummy.ko): a reading
    made while dummy was COMING has every named symbol of its .ko once, the core ones at
    one base. That is one kernel state; without the .ko's names it is not accepted."""
    assert coming_verdict(tmp_path, QUIET + EXTRA + DUMMY, MODULES, how) == ""
    assert module_verdict(tmp_path, QUIET + EXTRA + DUMMY, MODULES, how) != ""
    assert coming_verdict(tmp_path, LINES, MODULES, how) == ""  # live: core lines only


@pytest.mark.parametrize("how", ["image", "snapshot"])
@pytest.mark.parametrize("case", sorted(COMING_MIXED))
def test_mixed_coming_module_images_are_caught(tmp_path, case: str, how: str) -> None:
    assert coming_verdict(tmp_path, COMING_MIXED[case], MODULES, how) != ""


# --- eBPF churn ---------------------------------------------------------------------------

BPF_AT = 0xffffffffc0200000
SPANS = {"kc1": [1.0, 1.1, 9.0, 9.1], "kc2": [2.0, 2.1, 3.0, 3.1], "kc3": [4.0, 4.1, 9.0, 9.1]}


def prog(name: str, k: int) -> str:
    return f"{BPF_AT + 0x1000 * k:016x} t bpf_prog_6deef7357e7b4530_{name}\t[bpf]"


def bpf_verdict(tmp_path, lines: list[str], how: str, t0: float, t1: float) -> str:
    log = tmp_path / "bpf.log"
    log.write_text("".join(f"load {n} {s[0]} {s[1]}\nclose {n} {s[2]} {s[3]}\n"
                           for n, s in SPANS.items()))
    classify = churn.bpf_classifier(LINES, str(log))
    return classify(os.urandom(8), served(tmp_path, lines, MODULES, how), t0, t1)


@pytest.mark.parametrize("how", ["image", "snapshot"])
def test_bpf_programs_alive_together_pass(tmp_path, how: str) -> None:
    assert bpf_verdict(tmp_path, LINES + [prog("kc1", 1), prog("kc2", 2)], how, 2.5, 2.6) == ""
    assert bpf_verdict(tmp_path, LINES + [prog("kc1", 1)], how, 3.5, 3.6) == ""


def test_bpf_log_is_read_as_it_grows(tmp_path) -> None:
    """The classifier reads only what the churner appended since the last image; a line
    still being written counts once it is whole."""
    log = tmp_path / "bpf.log"
    log.write_text("load kc1 1.0 1.1\n")
    classify = churn.bpf_classifier(LINES, str(log))
    img = served(tmp_path, LINES + [prog("kc1", 1), prog("kc2", 2)], MODULES, "snapshot")
    assert "never alive together" in classify(None, img, 2.5, 2.6)  # kc2 not loaded yet
    with open(log, "a") as f:
        f.write("load kc2 2.0 2.1\nclose kc2 3.0")  # the close is half written
    assert classify(None, img, 2.5, 2.6) == ""
    assert classify(None, img, 3.5, 3.6) == ""  # no close seen: kc2 may still be alive...
    with open(log, "a") as f:
        f.write(" 3.1\n")
    assert "never alive together" in classify(None, img, 3.5, 3.6)  # ...now surely gone
    assert classify(None, img, 2.5, 2.6) == ""


@pytest.mark.parametrize("how", ["image", "snapshot"])
@pytest.mark.parametrize("case", ["never together", "twice", "other bpf line gone",
                                  "module line gone"])
def test_mixed_bpf_images_are_caught(tmp_path, case: str, how: str) -> None:
    churned = [prog("kc1", 1), prog("kc2", 2)]
    lines = {"never together": LINES + [prog("kc2", 2), prog("kc3", 3)],
             "twice": LINES + churned + [prog("kc2", 2)],
             "other bpf line gone": [ln for ln in LINES if not ln.endswith("\t[bpf]")] + churned,
             "module line gone": [ln for ln in LINES if ln != FUSE[3]] + churned}[case]
    assert bpf_verdict(tmp_path, lines, how, 2.5, 2.6) != ""


def test_image_reader_reads_only_symbol_parts(tmp_path) -> None:
    """from_image gives exactly the lines of the dump (names, letters, modules, order)."""
    s = served(tmp_path, LINES, MODULES, "image")
    assert s.key() == im.from_lines(LINES).key()


def test_names_without_the_canonical_string_table() -> None:
    """A string table that is not one name per symbol in order is read name by name."""
    tab = b"\0b\0a\0ab\0"
    assert im._names(tab, np.array([1, 3, 5])) == [b"b", b"a", b"ab"]
    assert im._names(tab, np.array([3, 1, 5])) == [b"a", b"b", b"ab"]
    assert im._names(tab, np.array([1, 6, 5])) == [b"b", b"b", b"ab"]
    assert im._names(tab, np.array([1, 3])) == [b"b", b"a"]


def test_boot_refuses_a_checkout_the_guest_cannot_see(tmp_path, monkeypatch) -> None:
    """The guest mounts its own /tmp (and /run, /dev, ...) over the shared host root: a
    checkout there would fail in the guest as 24 errors "can't open file guest.py"; the
    harness says why at once, before it prepares or boots anything."""
    from tests.vm import harness

    clone = tmp_path / "clone"
    clone.mkdir()
    monkeypatch.setattr(harness, "REPO", clone)
    monkeypatch.setattr(harness, "prepare", lambda: pytest.fail("prepared anyway"))
    with pytest.raises(harness.BootError) as e:
        harness.boot(tmp_path / "out")
    real = os.path.realpath(clone)
    assert f"the checkout {real} is under /" in str(e.value)
    assert harness.hidden_from_guest({"x": "/srv/ksymsfs", "y": "/tmpfs-not/x"}) == ""
    assert harness.hidden_from_guest({"Python": "/run/x/python3"}).startswith(
        "Python /run/x/python3 is under /run")


def test_guest_python_is_this_environment_not_its_base_interpreter() -> None:
    """The guest starts the interpreter by the path the harness gives, with an empty
    environment (PYTHONPATH = the checkout): that must be this venv, whose packages
    (pyelftools, NumPy) the guest imports; the file a venv's bin/python resolves to is the
    base interpreter, which on a machine whose Python is pyenv's had no pyelftools."""
    from tests.vm import harness

    py = harness.guest_python()
    assert os.path.isabs(py)
    r = subprocess.run(["/usr/bin/env", "-i", "PATH=/usr/bin:/bin", py, "-c",
                        "import sys, elftools, numpy; print(sys.prefix)"],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == sys.prefix


def test_the_module_classifier_counts_clean_images_by_state(tmp_path) -> None:
    """The guest's figures say how many clean images had dummy absent, live or COMING,
    so a run shows which states it exercised; a mixed image counts in none, and an image
    met again (its digest cached) counts again."""
    classify = churn.ModuleClassifier(QUIET, REL, set(), FULL)
    counted = churn.clean_states(classify)
    images = {"absent": (QUIET, MODS_WITHOUT_DUMMY), "live": (LINES, MODULES),
              "coming": (QUIET + EXTRA + DUMMY, MODULES),
              "mixed": (LINES + DUMMY, MODULES)}
    digests = {k: os.urandom(8) for k in images}
    for k, (lines, mods) in images.items():
        syms = served(tmp_path, lines, mods, "snapshot")
        assert (classify(digests[k], syms, 0.0, 0.0) == "") == (k != "mixed"), k
    syms = served(tmp_path, LINES, MODULES, "image")
    assert classify(None, syms, 0.0, 0.0) == ""
    assert classify(digests["live"], served(tmp_path, LINES, MODULES, "snapshot"),
                    0.0, 0.0) == ""
    assert counted() == {"absent": 1, "live": 3, "coming": 1}
    assert churn.clean_states(lambda *a: "")() == {}
