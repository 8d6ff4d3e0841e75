"""Root footguns on the command line and around mounts: umask, isolated helper, SOURCE,
mount points, umount of foreign mounts, leftovers, daemon hygiene, no import circle."""

from __future__ import annotations

import ast
import errno
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ksymsfs import nlist, parse_image
from ksymsfs.mount import mount_state
from tests.fuse_harness import Mount, ksymsfs_cmd, read_all, require_fuse, write_sources
from tests.helpers import REPO, cli_env, run_ksymsfs

PKG = REPO / "ksymsfs"


# -- no module below the CLI imports it (issue 12 item 7) ----------------------------------
def _imported_modules(path: Path) -> set[str]:
    """Absolute names of every ksymsfs module that ``path`` imports (relative imports
    resolved), wherever the import statement is (function bodies included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "ksymsfs" if node.level else ""
            mod = ".".join(filter(None, [base, node.module or ""]))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_nothing_below_the_cli_imports_it():
    offenders = [p.name for p in sorted(PKG.glob("*.py"))
                 if p.name not in ("__main__.py", "cli.py")
                 and "ksymsfs.cli" in _imported_modules(p)]
    assert offenders == []
    # the check itself sees both spellings
    assert "ksymsfs.cli" in _imported_modules(PKG / "__main__.py")


# -- files honour the umask (issue 11 item 6) ----------------------------------------------
@pytest.mark.parametrize("umask", [0o077, 0o022, 0o002])
def test_output_files_honour_the_umask(tmp_path, umask):
    ks, mods = write_sources(tmp_path / "src", ["alpha"], nkernel=50)
    img, txt = tmp_path / "img.elf", tmp_path / "dump.txt"
    for args in (["snapshot", "--kallsyms", ks, "--modules", mods, "-o", img],
                 ["dump", img, "-o", txt]):
        r = run_ksymsfs(*args, preexec_fn=lambda: os.umask(umask))
        assert r.returncode == 0, r.stderr
    for p in (img, txt):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# -- helpers for real mounts ------------------------------------------------------------------
def _ks(tmp_path: Path, cmd: list, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """``python -m ksymsfs CMD`` (worktree package), text output."""
    return subprocess.run(ksymsfs_cmd(*map(str, cmd)), capture_output=True, text=True,
                          env=cli_env(), cwd=str(cwd or tmp_path), timeout=60, **kw)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if not ln.startswith("ksymsfs: no /dev/log")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def src(tmp_path):
    require_fuse()
    ks, mods = write_sources(tmp_path / "src", ["alpha"])
    return ["--kallsyms", ks, "--modules", mods]


def _serves_alpha(path: Path) -> bool:
    return bool(nlist(read_all(path), ["alpha_fn3"])["alpha_fn3"])


# -- SOURCE is a label, never a path (issue 11 item 7) ----------------------------------------
def test_mount_fuse_form_never_reads_source_as_a_path(tmp_path):
    require_fuse()
    (tmp_path / "ksymsfs").write_text("ffffffffdeadbeef T commit_creds\n")  # planted
    mp_ = tmp_path / "ksyms"
    r = _ks(tmp_path, ["ksymsfs", mp_, "-o", "ro,nosuid"])  # cwd holds the planted file
    try:
        assert r.returncode == 0, r.stderr
        hits = nlist(read_all(mp_), ["commit_creds"])["commit_creds"]
        assert hits and all(h.n_value != 0xffffffffdeadbeef for h in hits)
    finally:
        _ks(tmp_path, ["umount", mp_])
    assert mount_state(str(mp_)) == "none"


# -- the isolated interpreter imports nothing from the working directory ----------------------
PLANTED = ("argparse", "ksymsfs", "numpy", "fuse", "logging", "json")


def _isolated_python(tmp_path: Path) -> str:
    """A venv over this interpreter whose site-packages points at this worktree: under -I
    neither PYTHONPATH nor the working directory is on sys.path."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    str(venv)], check=True, capture_output=True)
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "000-ksymsfs-worktree.pth").write_text(f"{REPO}\n")
    return str(venv / "bin" / "python")


def test_isolated_helper_form_ignores_modules_planted_in_cwd(tmp_path):
    require_fuse()
    py = _isolated_python(tmp_path)
    ks, mods = write_sources(tmp_path / "src", ["alpha"])
    cwd = tmp_path / "planted"
    cwd.mkdir()
    marker = tmp_path / "PLANTED-CODE-RAN"
    for name in PLANTED:
        (cwd / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    env = {"PATH": os.environ["PATH"]}
    # the attack is real: without -I the planted argparse.py runs
    subprocess.run([py, "-m", "ksymsfs", "--version"], cwd=cwd, env=env, capture_output=True)
    assert marker.exists()
    marker.unlink()
    where = subprocess.run([py, "-I", "-c", "import ksymsfs; print(ksymsfs.__file__)"],
                           cwd=cwd, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(REPO / "ksymsfs" / "__init__.py")
    mp_ = tmp_path / "ksyms"
    r = subprocess.run([py, "-I", "-m", "ksymsfs", "ksymsfs", str(mp_), "-t", "fuse.ksymsfs",
                        "-o", f"ro,nosuid,nodev,kallsyms={ks},modules={mods}"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert _serves_alpha(mp_)
        for args in (["--version"], ["nlist", str(mp_), "alpha_fn3"]):
            r2 = subprocess.run([py, "-I", "-m", "ksymsfs", *args], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=60)
            assert r2.returncode == 0, r2.stderr
    finally:
        subprocess.run([py, "-I", "-m", "ksymsfs", "umount", str(mp_)], cwd=cwd, env=env)
    assert not marker.exists()
    assert not mp_.exists()


# -- mount points (issue 11 item 8) -------------------------------------------------------------
def test_symlinked_mount_point_is_resolved_once_and_used_throughout(tmp_path, src):
    target, link = tmp_path / "real-ksyms", tmp_path / "ksyms"
    link.symlink_to(target)
    r = _ks(tmp_path, ["mount", *src, link])
    try:
        assert r.returncode == 0, r.stderr
        assert str(target) in r.stdout
        assert mount_state(str(link)) == mount_state(str(target)) == "mounted"
        assert _serves_alpha(link)
        u = _ks(tmp_path, ["umount", link])
        assert u.returncode == 0, u.stderr
    finally:
        subprocess.run(["fusermount", "-uz", str(target)], capture_output=True)
    assert mount_state(str(target)) == "none"
    assert link.is_symlink() and not target.exists()  # the file it created is gone


def _odd_nodes(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "nodes"
    d.mkdir()
    os.mkfifo(d / "fifo")
    os.mknod(d / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(d / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock"))
    sock.close()
    (d / "dir").mkdir()
    return {"FIFO": d / "fifo", "character device": d / "chr", "block device": d / "blk",
            "socket": d / "sock", "directory": d / "dir"}


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "fg"])
def test_mount_point_must_be_a_regular_file_or_absent(tmp_path, src, foreground):
    for kind, node in _odd_nodes(tmp_path).items():
        before = os.lstat(node)
        link = tmp_path / f"link-to-{node.name}"
        link.symlink_to(node)
        for p in (node, link):
            r = _ks(tmp_path, ["mount", *(["-f"] if foreground else []), *src, p])
            assert r.returncode == 2, (kind, r.stderr)
            line = _one_line(r.stderr)
            assert f"{node}: is a {kind}" in line and "regular file" in line
            assert mount_state(str(node)) == "none"
        after = os.lstat(node)
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)


# -- umount touches only ksymsfs mounts (issue 11 item 9) ---------------------------------------
def test_umount_refuses_a_busy_tmpfs(tmp_path):
    require_fuse()
    d = tmp_path / "tmpfs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(d)], check=True)
    try:
        with open(d / "busy", "w"):
            r = _ks(tmp_path, ["umount", d])
            assert r.returncode == 2
            assert "tmpfs mount, not ksymsfs" in _one_line(r.stderr)
            assert mount_state(str(d)) == "mounted"
    finally:
        subprocess.run(["umount", "-l", str(d)])
    assert (tmp_path / "tmpfs").is_dir() and mount_state(str(d)) == "none"
