"""Packaging: sdist + wheel into a clean venv, the man page against --help, the license."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from ksymsfs import __version__
from tests.helpers import DATA, IN_CI, REPO, run_ksymsfs

DUMP = DATA / "binun-taiwan-x86_64"


def _help(*cmd: str) -> str:
    r = run_ksymsfs(*cmd, "--help")
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


def subcommands() -> list[str]:
    """The subcommands `ksymsfs --help` lists (argparse: 4-space indented names)."""
    names = re.findall(r"^ {4}([a-z][\w-]*)(?: {2,}.*)?$", _help(), re.M)
    assert names, _help()
    return names


def options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))


def man_text() -> str:
    """man/ksymsfs.8 with roff escapes removed (\\- is a minus, \\fB... are fonts)."""
    t = (REPO / "man/ksymsfs.8").read_text()
    return re.sub(r"\\f[BIRP]|\\&", "", t).replace("\\-", "-")


def test_man_page_names_every_subcommand_and_option():
    """Generic: a new subcommand or option in --help fails here until the page has it."""
    man = man_text()
    missing = []
    for opt in options(_help()):
        if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", man):
            missing.append(opt)
    for cmd in subcommands():
        if not re.search(rf"^\.SS {re.escape(cmd)}$", man, re.M):
            missing.append(f".SS {cmd}")
        for opt in options(_help(cmd)):
            if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", man):
                missing.append(f"{cmd} {opt}")
    assert not missing, f"man/ksymsfs.8 lacks: {sorted(missing)}"


def test_man_page_documents_no_missing_subcommand():
    documented = re.findall(r"^\.SS (\S+)$", man_text(), re.M)
    assert set(documented) <= set(subcommands())


def test_man_page_version_is_the_package_version():
    assert re.search(rf'^\.TH KSYMSFS 8 \S+ "ksymsfs {re.escape(__version__)}"',
                     man_text(), re.M)


def test_license_matches_pyproject():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^license = "BSD-2-Clause"$', pyproject, re.M)
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("BSD 2-Clause License")
    assert "Redistributions in binary form must reproduce" in text
    assert "Neither the name" not in text  # the endorsement clause makes it BSD-3-Clause


def test_readme_names_the_supported_python_floor():
    floor = re.search(r'^requires-python = ">=(\d+\.\d+)"$',
                      (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert sys.version_info[:2] >= tuple(map(int, floor.split(".")))
    assert f"Python {floor}" in (REPO / "README.md").read_text()


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """`python -m build`: the sdist, then the wheel built from it."""
    try:
        import build  # noqa: F401
    except ImportError:
        msg = "the 'build' package is missing (pip install -e '.[test]')"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_sdist_and_wheel_contents(dist):
    (sdist,) = dist.glob("ksymsfs-*.tar.gz")
    (wheel,) = dist.glob("ksymsfs-*.whl")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"LICENSE", "man/ksymsfs.8", "pyproject.toml", "ksymsfs/cli.py"} <= names
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    v = __version__
    assert f"ksymsfs-{v}.dist-info/licenses/LICENSE" in names
    assert f"ksymsfs-{v}.data/data/share/man/man8/ksymsfs.8" in names


def test_wheel_in_clean_venv_runs_the_cli(dist, tmp_path):
    """`pip install ksymsfs` for people who manage Python themselves."""
    (wheel,) = dist.glob("ksymsfs-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    r = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    exe = venv / "bin/ksymsfs"
    env = {"PATH": f"{venv}/bin:/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env,
                              cwd=str(tmp_path), timeout=120)
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ksymsfs {__version__}"
    img = tmp_path / "taiwan.elf"
    r = run("snapshot", "--kallsyms", str(DUMP / "kallsyms"), "--modules",
            str(DUMP / "modules"), "-o", str(img))
    assert r.returncode == 0, r.stderr
    r = run("nlist", str(img), "uinput_poll", "jiffies")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == [
        "ffffffffa04b2000 N_TEXT        uinput_poll\t[uinput]",
        "ffffffff81c0d000 N_DATA|N_EXT  jiffies"]
    r = run("lookup", str(img), "ffffffffa04b2051")
    assert r.stdout.strip() == "ffffffffa04b2051 uinput_request_done+0x1/0x50 [uinput]"
    assert (venv / "share/man/man8/ksymsfs.8").read_bytes() == \
        (REPO / "man/ksymsfs.8").read_bytes()
    # the package came from the wheel, not from this checkout
    r = subprocess.run([str(venv / "bin/python"), "-I", "-c",
                        "import ksymsfs; print(ksymsfs.__file__)"],
                       capture_output=True, text=True, cwd=str(REPO))
    assert r.stdout.startswith(str(venv)), r.stdout
