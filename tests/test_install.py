"""The run install (make install-files / uninstall) and the systemd unit, tested for real."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ksymsfs import __version__
from ksymsfs.mount import mount_state
from tests.fuse_harness import require_fuse, write_sources
from tests.helpers import IN_CI, REPO, need_tool

VENV = "/opt/ksymsfs"
# what README "Uninstall" lists: every file install puts anywhere (besides the venv)
FILES = ["/usr/local/sbin/ksymsfs", "/usr/sbin/mount.fuse.ksymsfs",
         "/etc/systemd/system/ksymsfs.service", "/usr/local/share/man/man8/ksymsfs.8",
         "/usr/local/share/man/man8/ksyms.8"]
UNIT = "/etc/systemd/system/ksymsfs.service"
# unit options that give the service its own mount namespace: the FUSE mount would then
# stay inside it (systemd makes the namespace's root a slave mount)
NAMESPACING = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
               "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
               "ProtectControlGroups", "ProtectHostname", "ProtectProc", "ProcSubset",
               "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem",
               "BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage", "PrivateUsers"}


def make(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(["make", "-s", "-C", str(REPO), *args, f"PYTHON={sys.executable}"],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) + ("/" if p.is_dir() else "")
                  for p in root.rglob("*"))


@pytest.fixture(scope="module")
def destdir(tmp_path_factory) -> Path:
    """`make install-files DESTDIR=...`: the run install under a scratch root."""
    need_tool("make")
    root = tmp_path_factory.mktemp("destdir")
    make("install-files", f"DESTDIR={root}")
    return root


def unit_lines(path: Path) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            k, v = line.split("=", 1)
            keys.setdefault(k.strip(), []).append(v.strip())
    return keys


def in_root(root: Path, argv: list[str]) -> list[str]:
    """A command of the installed layout, run from the scratch root's copy."""
    return [str(root) + a if a.startswith(VENV + "/") else a for a in argv]


def test_install_upgrade_uninstall_leaves_root_as_it_was(tmp_path):
    """install, install again (an upgrade), uninstall: the scratch root is as before."""
    root = tmp_path / "root"
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/mount.fuse.other").write_text("#!/bin/sh\n")  # not ours: must stay
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/llvm-readelf").symlink_to("/usr/bin/llvm-readelf-14")
    (root / "usr/local/bin/keep").symlink_to("/usr/bin/true")
    before = tree(root)
    make("install-files", f"DESTDIR={root}")
    make("install-files", f"DESTDIR={root}")
    for f in FILES:
        assert (root / f.lstrip("/")).is_file(), f
    assert (root / VENV.lstrip("/") / "bin/python").exists()
    make("uninstall", f"DESTDIR={root}")
    # the llvm-readelf link install-deps.sh makes goes too; everything else is as before,
    # directories install created included
    assert tree(root) == [p for p in before if p != "usr/local/bin/llvm-readelf"]


def test_installed_files_name_the_real_paths(destdir):
    wrapper = (destdir / "usr/local/sbin/ksymsfs").read_text()
    assert wrapper == f'#!/bin/sh\nexec {VENV}/bin/python -I -m ksymsfs "$@"\n'
    assert (destdir / "usr/sbin/mount.fuse.ksymsfs").read_text() == wrapper
    assert os.access(destdir / "usr/local/sbin/ksymsfs", os.X_OK)
    assert (destdir / "usr/local/share/man/man8/ksymsfs.8").read_bytes() == \
        (REPO / "man/ksymsfs.8").read_bytes()
    # not an editable install: the package lives in the venv, not in this checkout
    r = subprocess.run([str(destdir / VENV.lstrip("/") / "bin/python"), "-I", "-c",
                        "import ksymsfs; print(ksymsfs.__file__)"],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(destdir / VENV.lstrip("/"))), r.stdout


def test_unit_has_no_mount_namespace_options():
    keys = unit_lines(REPO / "scripts/ksymsfs.service")
    assert not NAMESPACING & keys.keys()
    assert keys.get("MountFlags", ["shared"]) == ["shared"]


def test_unit_execstart_is_the_installed_layout_in_isolated_mode(destdir):
    keys = unit_lines(destdir / UNIT.lstrip("/"))
    (start,) = keys["ExecStart"]
    argv = shlex.split(start)
    assert argv[:4] == [f"{VENV}/bin/python", "-I", "-m", "ksymsfs"]
    assert argv[4:] == ["mount", "--foreground", "--force", "--allow-other", "/dev/ksyms"]
    pre = shlex.split(keys["ExecStartPre"][0].lstrip("-"))
    assert pre[:4] == argv[:4] and pre[4:] == ["umount", "/dev/ksyms"]
    r = subprocess.run(in_root(destdir, argv[:4]) + ["--version"], capture_output=True,
                       text=True, cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip() == f"ksymsfs {__version__}", r


def test_unit_verifies(destdir, tmp_path):
    tool = need_tool("systemd-analyze")
    unit = tmp_path / "ksymsfs.service"  # the installed unit, pointing at the scratch venv
    unit.write_text((destdir / UNIT.lstrip("/")).read_text()
                    .replace(f"{VENV}/", f"{destdir}{VENV}/"))
    r = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "ksymsfs" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_unit_exposure_at_most_6_5():
    tool = need_tool("systemd-analyze")
    r = subprocess.run([tool, "security", "--offline=yes", "--no-pager",
                        str(REPO / "scripts/ksymsfs.service")],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for ksymsfs\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 6.5, r.stdout


def _service_argv(destdir: Path, keys: dict[str, list[str]], mp: Path, ks: Path,
                  mods: Path) -> tuple[list[str], list[str]]:
    """The unit's ExecStartPre and ExecStart, serving captured files at ``mp``."""
    pre = shlex.split(keys["ExecStartPre"][0].lstrip("-"))
    start = shlex.split(keys["ExecStart"][0])
    assert pre[-1] == start[-1] == "/dev/ksyms"
    start = start[:-1] + ["--kallsyms", str(ks), "--modules", str(mods), str(mp)]
    return in_root(destdir, pre[:-1] + [str(mp)]), in_root(destdir, start)


def _capabilities(keys: dict[str, list[str]]) -> str:
    caps = " ".join(keys["CapabilityBoundingSet"]).split()
    return ",".join(["-all"] + ["+" + c.lower().removeprefix("cap_") for c in caps])


class _Service:
    """ExecStart run as systemd would: bounding set and no_new_privs from the unit."""

    def __init__(self, argv: list[str], keys: dict[str, list[str]], mp: Path):
        setpriv = need_tool("setpriv")
        self.mp = mp
        self.proc = subprocess.Popen(
            [setpriv, f"--bounding-set={_capabilities(keys)}", "--inh-caps=-all",
             "--no-new-privs", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd="/", env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        deadline = time.monotonic() + 60
        while mount_state(str(mp)) != "mounted":
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited: {self.proc.stdout.read()!r}")
            assert time.monotonic() < deadline, "not mounted after 60 s"
            time.sleep(0.05)

    def serves(self) -> bool:
        r = subprocess.run(["nm", str(self.mp)], capture_output=True, text=True, timeout=60)
        return "alpha_fn3" in r.stdout

    def kill(self, sig: int) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(30)
        self.proc.stdout.close()


def test_service_restart_after_daemon_death(destdir, tmp_path):
    """Restart=on-failure after kill -9, without systemd: the stale mount, then ExecStartPre
    and ExecStart of the unit (under its capabilities) bring the device back."""
    require_fuse()
    keys = unit_lines(destdir / UNIT.lstrip("/"))
    ks, mods = write_sources(tmp_path / "src", ["alpha"])
    mp = tmp_path / "ksyms"
    pre, start = _service_argv(destdir, keys, mp, ks, mods)
    svc = _Service(start, keys, mp)
    try:
        assert svc.serves()
        svc.kill(signal.SIGKILL)
        assert mount_state(str(mp)) == "stale"
        r = subprocess.run(pre, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert mount_state(str(mp)) == "none"
        svc = _Service(start, keys, mp)  # the restart
        assert svc.serves()
        svc.kill(signal.SIGKILL)
        assert mount_state(str(mp)) == "stale"
        svc = _Service(start, keys, mp)  # without ExecStartPre: --force recovers it too
        assert svc.serves()
        svc.kill(signal.SIGTERM)  # systemctl stop
        assert svc.proc.returncode == 0
        assert mount_state(str(mp)) == "none"
    finally:
        if svc.proc.poll() is None:
            svc.kill(signal.SIGKILL)
        if mount_state(str(mp)) != "none":
            subprocess.run(["fusermount", "-uz", str(mp)], capture_output=True)


def _real_install() -> Path:
    if not Path(UNIT).is_file():
        msg = "no run install on this machine (make install-files; make test does it)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return Path(UNIT)


def test_real_install_execstart_version():
    """The installed unit's ExecStart interpreter runs ksymsfs in the installed layout."""
    argv = shlex.split(unit_lines(_real_install())["ExecStart"][0])
    r = subprocess.run(argv[:4] + ["--version"], capture_output=True, text=True, cwd="/",
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip() == f"ksymsfs {__version__}", r


def test_real_install_command_ignores_cwd_and_pythonpath(tmp_path):
    """`ksymsfs` on root's PATH is isolated: a ksymsfs package in the working directory or
    on PYTHONPATH does not replace the installed one."""
    _real_install()
    fake = tmp_path / "ksymsfs"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = 'fake'\n")
    (fake / "__main__.py").write_text("print('fake ksymsfs')\n")
    r = subprocess.run(["/usr/local/sbin/ksymsfs", "--version"], capture_output=True, text=True,
                       cwd=str(tmp_path), env={"PATH": "/usr/bin:/bin",
                                               "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.strip() == f"ksymsfs {__version__}", r
