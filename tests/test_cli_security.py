"""Root footguns on the command line and around mounts: umask, isolated helper, SOURCE,
mount points, umount of foreign mounts, leftovers, daemon hygiene, no import circle."""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuse_harness import write_sources
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
