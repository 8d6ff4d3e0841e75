"""``ksymsfs mount``/``umount``: checks, daemonizing, stale-mount recovery around fusefs.serve."""

from __future__ import annotations

import argparse
import errno
import logging
import logging.handlers
import os
import shutil
import subprocess
import sys
import threading
import time

from .device import Device
from .errors import ConfigError, KsymsError, MountPointError
from .malloc import tune_malloc
from .mountpoint import (
    FSTYPE,
    Created,
    PathLock,
    canonical,
    create_or_adopt,
    default_run_dir,
    mounted_fstype,
    remove_created,
)
from .options import ELFCLASS_OF, REOPEN_MODES, positive_int, sources_from_args

log = logging.getLogger("ksymsfs")
IGNORED_OPTIONS = {"ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto",
                   "noauto", "user", "users", "nouser", "_netdev", "defaults", "nofail",
                   "atime", "noatime", "relatime", "async", "sync"}
SYSLOG_SOCKET = "/dev/log"


def apply_options(a: argparse.Namespace, opts: str | None) -> None:
    """Fold ``-o a,b=c`` (mount.fuse / fstab style) into the parsed arguments."""
    for opt in filter(None, (opts or "").split(",")):
        key, _, val = opt.partition("=")
        if key in IGNORED_OPTIONS or key.startswith("x-"):
            continue
        if key in ("kallsyms", "modules", "sections"):
            if not val:
                raise ConfigError(f"mount option {key}= needs a path")
            setattr(a, key, val)
        elif key == "max_open":
            a.max_open = positive_int("mount option max_open", val)
        elif key == "reopen":
            if val not in REOPEN_MODES:
                raise ConfigError(f"mount option reopen= takes {' or '.join(REOPEN_MODES)}")
            a.reopen = val
        elif key in ("allow_other", "debug", "foreground", "passthrough") and not val:
            setattr(a, key, True)
        else:
            raise ConfigError(f"unknown mount option {opt!r}")


def _check_combination(a: argparse.Namespace) -> None:
    """Options that must not meet: passthrough serves one snapshot at a time (the kernel
    allows one backing file per inode), so with other users let in, any of them could
    hold the device open and make everyone else's opens fail after a kernel change."""
    if getattr(a, "passthrough", False) and getattr(a, "allow_other", False):
        raise ConfigError("--passthrough cannot be combined with --allow-other: it serves "
                          "one snapshot at a time, so any user holding the device open "
                          "would make every other user's opens fail (EBUSY) once the "
                          "kernel changes")


def mount_state(mountpoint: str) -> str:
    """'none', 'mounted' or 'stale' (a mount whose daemon is gone: ENOTCONN)."""
    path = canonical(mountpoint)
    mounted = mounted_fstype(path) is not None
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


def _named(given: str, path: str) -> str:
    """How messages name a mount point: the canonical path, and the given one if it differs."""
    return path if os.path.abspath(given) == path else f"{given} (= {path})"


def _run_dir(a: argparse.Namespace) -> str | None:
    if getattr(a, "run_dir", None):
        return os.path.abspath(a.run_dir)
    return default_run_dir(os.geteuid(), os.environ.get("XDG_RUNTIME_DIR"))


def run_umount(a: argparse.Namespace) -> int:
    """Unmount a ksymsfs mount (never another file system's) and remove the file the mount
    created."""
    path, run_dir = canonical(a.mountpoint), _run_dir(a)
    name = _named(a.mountpoint, path)
    with PathLock(run_dir, path):
        fstype = mounted_fstype(path)
        if fstype is None:
            gone = remove_created(path, run_dir)
            raise KsymsError(f"{name}: not mounted" + (" (removed the file a ksymsfs mount "
                                                       "had created)" if gone else ""))
        if fstype != FSTYPE:
            raise MountPointError(f"{name}: a {fstype} mount, not ksymsfs ({FSTYPE}): "
                                  "not unmounting it (use umount(8))")
        r = _fusermount(path)
        if r.returncode != 0:
            r = _fusermount(path, lazy=True)  # stale, or busy
        if r.returncode != 0:
            raise KsymsError(f"{name}: cannot unmount: {r.stderr.strip()}")
        remove_created(path, run_dir)
    return 0


def _check_not_mounted(a: argparse.Namespace, path: str) -> None:
    name = _named(a.mountpoint, path)
    fstype = mounted_fstype(path)
    if fstype is not None and fstype != FSTYPE:
        raise MountPointError(f"{name}: a {fstype} file system is mounted there")
    state = mount_state(path)
    if state == "stale":
        if not a.force:
            raise KsymsError(f"{name}: stale mount left by a daemon that died (Transport "
                             f"endpoint is not connected); run 'ksymsfs umount {path}' "
                             "or mount again with --force")
        log.warning("%s: removing stale mount", path)
        _fusermount(path, lazy=True)
    elif state == "mounted":
        raise KsymsError(f"{name}: already mounted; run 'ksymsfs umount {path}' first")


def _absolute_paths(a: argparse.Namespace) -> None:
    """The daemon runs in /: make every path it reads later absolute first."""
    for key in ("kallsyms", "modules", "sections", "sysctl_dir", "log_socket"):
        if getattr(a, key, None):
            setattr(a, key, os.path.abspath(getattr(a, key)))


def _make_device(a: argparse.Namespace) -> Device:
    return Device(sources_from_args(a), arch=a.arch, elfclass=ELFCLASS_OF[a.elfclass],
                  endian=a.endian, max_open=a.max_open, sysctl_dir=a.sysctl_dir,
                  max_memory=a.max_memory << 20, max_pending=a.max_pending,
                  reopen=a.reopen)


def run_mount(a: argparse.Namespace) -> int:
    """Check and prepare the mount point under its lock, prime the device, then serve in the
    foreground or in a daemon; a failure removes a mount point this mount created."""
    apply_options(a, a.options)
    _check_combination(a)
    _absolute_paths(a)
    path, run_dir = canonical(a.mountpoint), _run_dir(a)
    lock = PathLock(run_dir, path)
    created: Created | None = None
    try:
        _check_not_mounted(a, path)
        created = create_or_adopt(path, run_dir)
        dev = _make_device(a)
        if dev.prime().all_zero and a.kallsyms is None:
            log.warning("every address in %s is zero for this daemon (uid %d): the kernel "
                        "hides them (kernel.kptr_restrict); every opener will see zeros. "
                        "Run as root.", dev.sources.kallsyms, os.getuid())
        daemon = _Daemon(dev, a, path, run_dir, lock, created)
        return daemon.serve() if a.foreground else daemon.start()
    except BaseException:
        if created is not None and lock.fd is not None:
            remove_created(path, run_dir, created)
        raise
    finally:
        lock.release()


class _Daemon:
    """The serving process: releases the path lock once mounted, removes the mount point it
    created when the FUSE loop ends (umount, SIGTERM/SIGINT/SIGHUP, failure)."""

    def __init__(self, dev: Device, a: argparse.Namespace, path: str, run_dir: str | None,
                 lock: PathLock, created: Created | None):
        self.dev, self.a, self.path, self.run_dir = dev, a, path, run_dir
        self.lock, self.created = lock, created
        self.detached = False

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(0.02):
            if mounted_fstype(self.path) == FSTYPE:
                self.lock.release()
                if self.detached:  # the caller's stderr stays open only until mounted
                    null = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(null, 2)
                    os.close(null)
                log.info("serving %s (%d byte snapshot)", self.path, self.dev.latest_size)
                return

    def serve(self) -> int:
        from .fusefs import serve

        tune_malloc()  # before the watcher's first malloc: a thread that allocates before
        #                the arena limit is set gets an arena of its own (7 MB kept idle)
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(stop,), daemon=True)
        watcher.start()
        try:
            serve(self.dev, self.path, allow_other=self.a.allow_other, debug=self.a.debug,
                  uid=os.getuid(), gid=os.getgid(),
                  passthrough=getattr(self.a, "passthrough", False))
        except RuntimeError as e:  # fusepy: fuse_main failed; libfuse said why on stderr
            raise KsymsError(f"{self.path}: FUSE mount failed (libfuse status {e}; its "
                             "reason is the 'fuse:' line above)") from None
        finally:
            stop.set()
            watcher.join()
            self._cleanup()
        log.info("%s unmounted", self.path)
        return 0

    def _cleanup(self) -> None:
        if self.created is None:
            return
        if self.lock.fd is not None:  # never mounted: we still hold the lock
            remove_created(self.path, self.run_dir, self.created)
            return
        try:
            with PathLock(self.run_dir, self.path):
                remove_created(self.path, self.run_dir, self.created)
        except (OSError, KsymsError) as e:
            log.warning("%s: could not remove the mount point: %s", self.path, e)

    def start(self) -> int:
        """Fork the daemon; return once it has mounted (or say why it could not)."""
        from . import fusefs  # noqa: F401  import errors are told here, not in the daemon

        sock = self.a.log_socket or SYSLOG_SOCKET
        if not os.path.exists(sock):
            log.warning("no %s (no syslog or journal here): the daemon's log is discarded; "
                        "run with -f to keep it on stderr", sock)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._child(sock)
        self.lock.release()  # close our copy: the daemon's copy keeps it locked until mounted
        self.created = None  # the daemon owns it now
        return _wait_mounted(pid, self.path)

    def _child(self, sock: str) -> None:
        code = 1
        try:
            _detach(keep=self.lock.fd)
            self.detached = True
            _log_to_syslog(sock)
            code = self.serve()
        except KsymsError as e:
            log.error("%s", e)
        except BaseException:  # noqa: BLE001  logged; the parent reports the exit
            log.exception("daemon failed")
        finally:
            os._exit(code)


def _detach(keep: int | None) -> None:
    """A daemon's hygiene: new session, working directory /, stdin/stdout on /dev/null,
    every inherited descriptor closed but ``keep`` (stderr is kept until mounted)."""
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    top = os.sysconf("SC_OPEN_MAX") if keep is None else keep
    os.closerange(3, top)
    if keep is not None:
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


def _log_to_syslog(sock: str) -> None:
    """Daemon logs go to syslog/the journal (LOG_DAEMON) as 'ksymsfs[PID]: ...'."""
    if not os.path.exists(sock):
        return
    try:
        h = logging.handlers.SysLogHandler(address=sock,
                                           facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError as e:
        log.warning("cannot log to %s: %s", sock, e)
        return
    h.setFormatter(logging.Formatter("ksymsfs[%(process)d]: %(message)s"))
    for name in ("ksymsfs", "fuse"):
        logging.getLogger(name).addHandler(h)


def _wait_mounted(pid: int, path: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise KsymsError(f"daemon exited (status {os.waitstatus_to_exitcode(status)}) "
                             f"before {path} was mounted")
        if mounted_fstype(path) == FSTYPE:
            print(f"ksymsfs: serving {path} (daemon pid {pid})")
            return 0
        time.sleep(0.02)
    raise KsymsError(f"{path}: not mounted after {timeout:.0f} s (daemon pid {pid})")
