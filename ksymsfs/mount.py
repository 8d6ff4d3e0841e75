"""``ksymsfs mount``/``umount``: checks, daemonizing, stale-mount recovery around fusefs.serve."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import subprocess
import sys
import time

from .device import Device
from .errors import ConfigError, KsymsError

log = logging.getLogger("ksymsfs")
IGNORED_OPTIONS = {"ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto",
                   "noauto", "user", "users", "nouser", "_netdev", "defaults", "nofail",
                   "atime", "noatime", "relatime", "async", "sync"}


def apply_options(a: argparse.Namespace, opts: str | None) -> None:
    """Fold ``-o a,b=c`` (mount.fuse / fstab style) into the parsed arguments."""
    for opt in filter(None, (opts or "").split(",")):
        key, _, val = opt.partition("=")
        if key in IGNORED_OPTIONS or key.startswith("x-"):
            continue
        if key == "allow_other":
            a.allow_other = True
        elif key in ("kallsyms", "modules", "sections") and val:
            setattr(a, key, val)
        elif key == "max_open" and val.isdigit():
            a.max_open = int(val)
        elif key == "debug":
            a.debug = True
        elif key == "foreground":
            a.foreground = True
        else:
            raise ConfigError(f"unknown mount option {opt!r}")


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
                .replace("\\134", "\\")


def mount_state(mountpoint: str) -> str:
    """'none', 'mounted' or 'stale' (a mount whose daemon is gone: ENOTCONN)."""
    path = os.path.abspath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            mounted = any(_unescape(line.split()[4]) == path for line in f)
    except OSError:
        mounted = False
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            return "stale"
    return "mounted" if mounted else "none"


def _fusermount(mountpoint: str, lazy: bool = False) -> subprocess.CompletedProcess:
    """Unmount with fusermount (umount(8) if there is none); ``lazy`` detaches a busy or
    stale mount (-z / -l)."""
    tool = shutil.which("fusermount") or shutil.which("fusermount3")
    if tool:
        cmd = [tool, "-uz" if lazy else "-u", mountpoint]
    else:
        cmd = ["umount", *(["-l"] if lazy else []), mountpoint]
    return subprocess.run(cmd, capture_output=True, text=True)


def run_umount(mountpoint: str) -> int:
    state = mount_state(mountpoint)
    if state == "none":
        raise KsymsError(f"{mountpoint}: not mounted")
    r = _fusermount(mountpoint)
    if r.returncode != 0:
        r = _fusermount(mountpoint, lazy=True)  # stale, or busy
    if r.returncode != 0:
        raise KsymsError(f"{mountpoint}: cannot unmount: {r.stderr.strip()}")
    return 0


def _prepare_mountpoint(a: argparse.Namespace) -> None:
    mp = a.mountpoint
    state = mount_state(mp)
    if state == "stale":
        if not a.force:
            raise KsymsError(f"{mp}: stale mount left by a daemon that died (Transport "
                             f"endpoint is not connected); run 'ksymsfs umount {mp}' "
                             "or mount again with --force")
        log.warning("%s: removing stale mount", mp)
        _fusermount(mp, lazy=True)
    elif state == "mounted":
        raise KsymsError(f"{mp}: already mounted; run 'ksymsfs umount {mp}' first")
    if os.path.isdir(mp):
        raise ConfigError(f"{mp}: is a directory; the device is a file path such as "
                          "/dev/ksyms (created if absent)")
    if not os.path.exists(mp):
        fd = os.open(mp, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o444)
        os.close(fd)


def _make_device(a: argparse.Namespace) -> Device:
    from .cli import ELFCLASS_OF, sources_from_args

    return Device(sources_from_args(a), arch=a.arch, elfclass=ELFCLASS_OF[a.elfclass],
                  endian=a.endian, max_open=a.max_open, sysctl_dir=a.sysctl_dir,
                  max_memory=a.max_memory << 20, max_pending=a.max_pending)


def run_mount(a: argparse.Namespace) -> int:
    apply_options(a, a.options)
    _prepare_mountpoint(a)
    dev = _make_device(a)
    if dev.prime().all_zero and a.kallsyms is None:
        log.warning("every address in %s is zero for this daemon (uid %d): the kernel hides "
                    "them (kernel.kptr_restrict); every opener will see zeros. Run as root.",
                    dev.sources.kallsyms, os.getuid())
    uid, gid = os.getuid(), os.getgid()
    if a.foreground:
        return _serve(dev, a, uid, gid)
    return _daemonize(dev, a, uid, gid)


def _serve(dev: Device, a: argparse.Namespace, uid: int, gid: int) -> int:
    from .fusefs import serve

    log.info("serving %s (%d byte snapshot)", a.mountpoint, dev.latest_size)
    serve(dev, a.mountpoint, allow_other=a.allow_other, debug=a.debug, uid=uid, gid=gid)
    return 0


def _daemonize(dev: Device, a: argparse.Namespace, uid: int, gid: int) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            code = _serve(dev, a, uid, gid)
        except BaseException:  # noqa: BLE001  nobody to tell: exit non-zero
            code = 1
        os._exit(code)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise KsymsError(f"daemon exited (status {status >> 8}) before {a.mountpoint} "
                             "was mounted; run with -f to see why")
        if mount_state(a.mountpoint) == "mounted":
            print(f"ksymsfs: serving {a.mountpoint} (daemon pid {pid})")
            return 0
        time.sleep(0.02)
    raise KsymsError(f"{a.mountpoint}: not mounted after 30 s")
