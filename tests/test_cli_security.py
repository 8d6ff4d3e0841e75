"""Root footguns on the command line and around mounts: umask, isolated helper, SOURCE,
mount points, umount of foreign mounts, leftovers, daemon hygiene, no import circle."""

from __future__ import annotations

import ast
import errno
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ksymsfs import nlist
from ksymsfs.mount import mount_state
from tests.fuse_harness import Mount, ksymsfs_cmd, read_all, require_fuse, write_sources
from tests.helpers import IN_CI, REPO, cli_env, run_ksymsfs

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
@pytest.mark.parametrize("umask", [0o077, 0o022, 0o002], ids=lambda u: f"{u:03o}")
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
    # this worktree, and the running interpreter's own site-packages (numpy, fusepy...):
    # when it is itself a venv (build/venv), --system-site-packages only reaches its base
    deps = [p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)]
    (site / "000-ksymsfs-worktree.pth").write_text("".join(f"{d}\n" for d in [REPO, *deps]))
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


# -- nothing left behind (issue 12 item 4) -----------------------------------------------------
def test_mount_then_umount_leaves_no_file_and_keeps_a_preexisting_one(tmp_path, src):
    mp_ = tmp_path / "ksyms"
    for _ in range(2):
        assert _ks(tmp_path, ["mount", *src, mp_]).returncode == 0
        assert _serves_alpha(mp_)
        assert _ks(tmp_path, ["umount", mp_]).returncode == 0
        assert not mp_.exists()
    mp_.touch()
    ino = mp_.stat().st_ino
    assert _ks(tmp_path, ["mount", *src, mp_]).returncode == 0
    assert _ks(tmp_path, ["umount", mp_]).returncode == 0
    assert mp_.stat().st_ino == ino and mp_.stat().st_size == 0
    mp_.write_bytes(b"mine")  # a mount would hide it (libfuse 2 refuses it too)
    r = _ks(tmp_path, ["mount", *src, mp_])
    assert r.returncode == 2 and "non-empty file" in _one_line(r.stderr)
    assert mp_.read_bytes() == b"mine" and mp_.stat().st_ino == ino


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "fg"])
def test_failed_mount_leaves_no_file(tmp_path, src, foreground):
    bad = tmp_path / "bad"
    bad.write_text("ffffffff81000000 T ok\nthis is not a kallsyms line\n")
    fg = ["-f"] if foreground else []
    for args in (["--kallsyms", tmp_path / "missing"], ["--kallsyms", bad],
                 ["-o", "max_open=abc"]):
        mp_ = tmp_path / "ksyms"
        r = _ks(tmp_path, ["mount", *fg, *args, mp_])
        assert r.returncode in (1, 2), r.stderr
        _one_line(r.stderr)
        assert not os.path.lexists(mp_), args
        assert mount_state(str(mp_)) == "none"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_signal_unmounts_and_removes_the_created_file(tmp_path, src, sig):
    mp_ = tmp_path / "ksyms"
    m = Mount(mp_, *map(str, src))
    assert mp_.exists()
    m.proc.send_signal(sig)
    assert m.proc.wait(20) == 0
    m.stop()
    assert mount_state(str(mp_)) == "none" and not mp_.exists()


def _daemon_pid(out: str) -> int:
    return int(out.rsplit("daemon pid ", 1)[1].split(")")[0])


def test_sigterm_to_a_background_daemon_removes_the_file(tmp_path, src):
    mp_ = tmp_path / "ksyms"
    r = _ks(tmp_path, ["mount", *src, mp_])
    assert r.returncode == 0, r.stderr
    pid = _daemon_pid(r.stdout)
    os.kill(pid, signal.SIGTERM)
    for _ in range(1000):
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.02)
    assert mount_state(str(mp_)) == "none" and not mp_.exists()


def test_umount_immediately_followed_by_mount_never_races(tmp_path, src):
    mp_ = tmp_path / "ksyms"
    for i in range(30):
        r = _ks(tmp_path, ["mount", *src, mp_])
        assert r.returncode == 0, (i, r.stderr)
        assert mount_state(str(mp_)) == "mounted"
        r = _ks(tmp_path, ["umount", mp_])
        assert r.returncode == 0, (i, r.stderr)
    time.sleep(0.5)  # let the last daemons finish their own cleanup: it must not misfire
    assert not mp_.exists()
    r = _ks(tmp_path, ["mount", *src, mp_])
    assert r.returncode == 0 and _serves_alpha(mp_)
    assert _ks(tmp_path, ["umount", mp_]).returncode == 0 and not mp_.exists()


# -- daemon hygiene (issue 11 item 11) ---------------------------------------------------------
def test_daemon_closes_inherited_fds_chdirs_to_root_and_logs_to_syslog(tmp_path, src):
    sock_path = tmp_path / "log.sock"
    log_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log_sock.bind(str(sock_path))
    log_sock.settimeout(20)
    rfd, wfd = os.pipe()
    mp_ = tmp_path / "ksyms"
    try:
        r = subprocess.run(ksymsfs_cmd("mount", *map(str, src), "--log-socket", str(sock_path),
                                       str(mp_)),
                           capture_output=True, text=True, env=cli_env(), cwd=str(tmp_path),
                           pass_fds=(wfd,), timeout=60)
        os.close(wfd)
        assert r.returncode == 0, r.stderr
        pid = _daemon_pid(r.stdout)
        assert os.read(rfd, 1) == b""  # EOF: the daemon holds no copy of the pipe
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        fds = {int(f): os.readlink(f"/proc/{pid}/fd/{f}") for f in os.listdir(f"/proc/{pid}/fd")}
        assert {fds[0], fds[1], fds[2]} == {"/dev/null"}
        assert [t for f, t in fds.items() if f > 2 and t not in ("/dev/fuse",)
                and not t.startswith("socket:")] == []
        msg = log_sock.recv(4096).decode()
        assert f"ksymsfs[{pid}]: serving {mp_}" in msg and msg.startswith("<")
        assert _serves_alpha(mp_)
    finally:
        os.close(rfd)
        _ks(tmp_path, ["umount", mp_])
        log_sock.close()


@pytest.mark.parametrize("opt", [["--max-open", "0"], ["--max-open", "-5"],
                                 ["--max-open", "x"], ["-o", "max_open=abc"],
                                 ["-o", "max_open=0"], ["-o", "kallsyms="], ["-o", "bogus"],
                                 ["-o", "reopen=maybe"]])
def test_bad_mount_options_are_one_line_exit_2(tmp_path, src, opt):
    mp_ = tmp_path / "ksyms"
    r = _ks(tmp_path, ["mount", "-f", *src, *opt, mp_])
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and ("max" in err or "option" in err), r.stderr
    assert not mp_.exists()


def test_foreground_fuse_failure_is_one_line_without_traceback(tmp_path, src):
    """As nobody with --allow-other (no user_allow_other in /etc/fuse.conf; on this machine
    /dev/fuse is root-only, which fails first): libfuse says why on its own line, we add
    one line, no traceback, no file left."""
    conf = Path("/etc/fuse.conf")
    text = conf.read_text(errors="replace") if conf.exists() else ""
    if any(ln.strip() == "user_allow_other" for ln in text.splitlines()):
        if IN_CI:
            pytest.fail("user_allow_other is set in /etc/fuse.conf on this CI machine")
        pytest.skip("user_allow_other is set in /etc/fuse.conf")
    import ksymsfs.fusefs  # noqa: F401  imported while still root (nobody may not read it)
    from ksymsfs.cli import cli

    d = Path(tempfile.mkdtemp(prefix="ksymsfs-test-", dir="/tmp"))
    try:
        os.chmod(d, 0o777)
        ks, mods = write_sources(d / "src", ["alpha"])
        for p in (d / "src", ks, mods):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        err = d / "stderr"
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                fd = os.open(err, os.O_WRONLY | os.O_CREAT, 0o666)
                os.dup2(fd, 2)
                sys.stderr = os.fdopen(fd, "w")
                code = cli(["mount", "-f", "--allow-other", "--kallsyms", str(ks),
                            "--modules", str(mods), "--run-dir", str(d / "run"),
                            str(d / "ksyms")])
            finally:
                sys.stderr.flush()
                os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        text = err.read_text()
        assert code == 1, text
        assert "Traceback" not in text and "fuse" in text.splitlines()[0]
        ours = [ln for ln in text.splitlines() if ln.startswith("ksymsfs:")]
        assert len(ours) == 1 and "FUSE mount failed" in ours[0], text
        assert not (d / "ksyms").exists()
    finally:
        subprocess.run(["fusermount", "-uz", str(d / "ksyms")], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def test_opener_of_a_daemon_killed_mid_build_gets_econnaborted(tmp_path):
    """What a killed daemon looks like: the open in flight fails with ECONNABORTED, every
    later open or stat with ENOTCONN (measured; README 'Reliability')."""
    require_fuse()
    ks, mods = write_sources(tmp_path / "src", [], nkernel=400000)
    m = Mount(tmp_path / "ksyms", "--kallsyms", str(ks), "--modules", str(mods))
    try:
        write_sources(tmp_path / "src", ["x"], nkernel=400001)  # the next open rebuilds
        pid = os.fork()
        if pid == 0:
            try:
                os.open(m.path, os.O_RDONLY)
                os._exit(0)
            except OSError as e:
                os._exit(e.errno)
        for _ in range(2000):  # until the opener waits in the kernel for our answer
            if Path(f"/proc/{pid}/wchan").read_text() == "request_wait_answer":
                break
            time.sleep(0.002)
        m.proc.kill()
        m.proc.wait(10)
        got = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        assert got == errno.ECONNABORTED, (errno.errorcode.get(got, got), m.output()[-2000:])
        for op in (lambda: os.open(m.path, os.O_RDONLY), lambda: os.stat(m.path)):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.ENOTCONN
    finally:
        m.stop()


def test_force_after_kill_adopts_the_created_file_and_umount_removes_it(tmp_path, src):
    mp_ = tmp_path / "ksyms"
    r = _ks(tmp_path, ["mount", *src, mp_])
    assert r.returncode == 0, r.stderr
    os.kill(_daemon_pid(r.stdout), signal.SIGKILL)
    for _ in range(500):
        if mount_state(str(mp_)) == "stale":
            break
        time.sleep(0.02)
    assert mount_state(str(mp_)) == "stale"
    r = _ks(tmp_path, ["mount", "--force", *src, mp_])
    assert r.returncode == 0, r.stderr
    assert _serves_alpha(mp_)
    assert _ks(tmp_path, ["umount", mp_]).returncode == 0
    assert mount_state(str(mp_)) == "none" and not mp_.exists()
