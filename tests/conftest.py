"""Session fixtures shared by the core test suites (helpers live in tests/helpers.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import IN_CI, TESTS


@pytest.fixture(scope="session")
def nlist_client(tmp_path_factory) -> Path:
    """tests/nlist_client.c compiled against libbsd (a CI machine must be able to)."""
    src = TESTS / "nlist_client.c"
    out = tmp_path_factory.mktemp("nlist") / "nlist_client"
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    why = "no C compiler"
    if cc:
        r = subprocess.run([cc, "-O", "-Wall", "-Werror", "-o", str(out), str(src), "-lbsd"],
                           capture_output=True, timeout=120)
        if r.returncode == 0:
            return out
        why = r.stderr.decode(errors="replace").strip()
    msg = f"cannot build nlist_client with libbsd: {why}"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def public_dir():
    """A directory every user can traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="ksymsfs-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)
