"""Command line: snapshot, nlist, lookup, dump, mount, umount (and the mount.fuse form)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .errors import ConfigError, KsymsError, SourceError
from .options import ELFCLASS_OF, REOPEN_MODES, positive_int, sources_from_args

log = logging.getLogger("ksymsfs")
COMMANDS = ("snapshot", "nlist", "lookup", "dump", "symbolize", "mount", "umount")


def _add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sources (default: the live kernel)")
    g.add_argument("--kallsyms", metavar="PATH", help="kallsyms text (default /proc/kallsyms)")
    g.add_argument("--modules", metavar="PATH",
                   help="/proc/modules text (default /proc/modules when reading the live "
                        "kernel, none for a captured --kallsyms)")
    g.add_argument("--sections", metavar="DIR",
                   help="directory laid out like /sys/module (<module>/sections/<section>)")
    g.add_argument("--notes", metavar="FILE",
                   help="the kernel's ELF notes (a copy of /sys/kernel/notes; default: that "
                        "file for the live kernel); module build-ids come from "
                        "--sections DIR/<module>/notes/")
    g.add_argument("--lenient", action="store_true",
                   help="skip lines that are not symbol lines (headers, separators) "
                        "instead of failing on them")
    g.add_argument("--max-read", type=_positive_int, default=512, metavar="MIB",
                   help="refuse a source larger than this (default 512 MiB)")


def _add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ELF target (default: this machine)")
    g.add_argument("--arch", help="x86_64, i386, aarch64, arm, mips, mipsel, riscv64, ...")
    g.add_argument("--class", dest="elfclass", choices=("32", "64"),
                   help="ELF class (default: from the address width)")
    g.add_argument("--endian", choices=("little", "big"))


def _positive_int(text: str) -> int:
    try:
        return positive_int("--max-open", text)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1"
                                         ) from None


def _add_run_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", metavar="DIR",
                   help="where mount and umount keep per-mount-point locks and the record "
                        "of files a mount created (default /run/ksymsfs as root, "
                        "$XDG_RUNTIME_DIR/ksymsfs otherwise)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ksymsfs", description="BSD /dev/ksyms for Linux: "
                                "kernel symbols as an ELF image, as a file or a device.")
    p.add_argument("--version", action="version", version=f"ksymsfs {__version__}")
    p.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    s = sub.add_parser("snapshot", help="write one ELF snapshot of the symbol table")
    _add_source_args(s)
    _add_target_args(s)
    s.add_argument("-o", "--output", required=True, metavar="OUT", help="file, or - for stdout")
    s.add_argument("--hide-addresses", action="store_true",
                   help="zero every address, as /proc/kallsyms does for unprivileged readers")
    n = sub.add_parser("nlist", help="nlist(3): value and n_type of named symbols")
    n.add_argument("image", help="image file or mounted device")
    n.add_argument("names", nargs="+", metavar="NAME")
    lk = sub.add_parser("lookup", help="address -> name+0xoff/0xsize [module]")
    lk.add_argument("image")
    lk.add_argument("addrs", nargs="+", metavar="ADDR", help="hex address (0x optional)")
    d = sub.add_parser("dump", help="print the image back as kallsyms text")
    d.add_argument("image")
    d.add_argument("-o", "--output", default="-", metavar="OUT")
    y = sub.add_parser("symbolize", help="rewrite kernel addresses in text (an oops, a "
                       "stack, perf script output) as sym+0xoff/0xsize [module]")
    y.add_argument("image", help="image file or mounted device")
    y.add_argument("input", nargs="?", default="-", metavar="FILE",
                   help="text to rewrite (default -, standard input)")
    m = sub.add_parser("mount", help="serve a ksyms device node (FUSE)")
    _add_source_args(m)
    _add_target_args(m)
    m.add_argument("mountpoint", help="file path to serve, e.g. /dev/ksyms (created if absent)")
    m.add_argument("-f", "--foreground", action="store_true")
    m.add_argument("--allow-other", action="store_true",
                   help="let other users open it; each gets addresses only if the kernel "
                        "would show them (kallsyms_show_value)")
    m.add_argument("--max-open", type=_positive_int, default=64, metavar="N",
                   help="concurrent open snapshots before opens fail with ENOMEM (default 64)")
    m.add_argument("--max-memory", type=_positive_int, default=1024, metavar="MIB",
                   help="memory for snapshot images held at once; beyond it opens fail "
                        "with ENOMEM (default 1024 MiB)")
    m.add_argument("--max-pending", type=_positive_int, default=32, metavar="N",
                   help="opens being served at once; more fail at once with EAGAIN "
                        "(default 32)")
    m.add_argument("--reopen", choices=REOPEN_MODES, default="share",
                   help="a second open by a process that holds the device: 'share' its "
                        "snapshot (default; gdb and nm open files twice) or 'busy' "
                        "(EBUSY, as FreeBSD)")
    m.add_argument("--passthrough", action="store_true",
                   help="let the kernel read each snapshot from a memory file itself "
                        "(FUSE passthrough: kernel 6.9+, daemon as root; else ignored): "
                        "reads at local-file speed, but while one snapshot is open an "
                        "open that would get a different one waits, then fails EBUSY; "
                        "not with --allow-other")
    m.add_argument("--sysctl-dir", default="/proc/sys/kernel", metavar="DIR",
                   help="where kptr_restrict and perf_event_paranoid are read (tests)")
    m.add_argument("--force", action="store_true",
                   help="lazily unmount a stale mount at MOUNTPOINT first")
    m.add_argument("-o", dest="options", metavar="OPTS", help="comma-separated mount options")
    m.add_argument("--log-socket", metavar="PATH",
                   help="syslog socket the daemon logs to (default /dev/log)")
    _add_run_dir_arg(m)
    u = sub.add_parser("umount", help="unmount a ksyms device (only a ksymsfs mount)")
    u.add_argument("mountpoint")
    _add_run_dir_arg(u)
    return p


def _write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename: never a partial output. The
    file is created 0666 minus the umask, as a shell redirection would create it."""
    if path == "-":
        _write_data(sys.stdout.buffer, data)
        return
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".ksymsfs-{os.getpid()}-{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_data(f, data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_data(f, data) -> None:
    """bytes, or a VirtualImage written sparse (its zeros become a hole where they can)."""
    if hasattr(data, "write_to"):
        f.flush()
        data.write_to(f.fileno())
    else:
        f.write(data)
        f.flush()


def cmd_snapshot(a: argparse.Namespace) -> int:
    from .malloc import tune_malloc
    from .snapshot import make_image

    tune_malloc()  # a build's temporaries reuse each other's memory (malloc.py)
    src = sources_from_args(a)
    src.strict_modules = False
    img = make_image(src, a.hide_addresses, a.arch, ELFCLASS_OF[a.elfclass], a.endian)
    for w in img.snapshot.warnings:
        log.warning("%s", w)
    if img.snapshot.table.skipped:
        log.warning("%s: skipped %d lines that are not symbol lines", src.kallsyms,
                    img.snapshot.table.skipped)
    if img.snapshot.all_zero and not a.hide_addresses and a.kallsyms is None:
        log.warning("every address in %s is zero: the kernel hides them from this user "
                    "(see kernel.kptr_restrict); run as root for real addresses", src.kallsyms)
    _write_atomic(a.output, img.data)
    return 0


def cmd_nlist(a: argparse.Namespace) -> int:
    from .reader import n_type_name, nlist, parse_image

    img = parse_image(a.image)
    res = nlist(img, a.names)
    w = img.address_width
    missing = 0
    for name, hits in res.items():
        if not hits:
            missing += 1
            print(f"{'':>{w}} {'N_UNDF':<13} {name} (not found)")
        for h in hits:
            mod = f"\t[{h.module}]" if h.module else ""
            print(f"{h.n_value:0{w}x} {n_type_name(h.n_type):<13} {h.name}{mod}")
    return 1 if missing else 0


def cmd_lookup(a: argparse.Namespace) -> int:
    from .reader import lookup, parse_image

    addrs = []
    for s in a.addrs:
        try:
            addrs.append(int(s, 16))
        except ValueError:
            raise ConfigError(f"not a hex address: {s!r}") from None
    img = parse_image(a.image)
    w = img.address_width
    missing = 0
    for addr, r in zip(addrs, lookup(img, addrs)):
        missing += r is None
        print(f"{addr:0{w}x} {r if r else '(no symbol)'}")
    return 1 if missing else 0


def cmd_dump(a: argparse.Namespace) -> int:
    from .reader import dump_lines, parse_image

    text = "\n".join(dump_lines(parse_image(a.image))) + "\n"
    _write_atomic(a.output, text.encode("utf-8", "surrogateescape"))
    return 0


def cmd_symbolize(a: argparse.Namespace) -> int:
    from .symbolize import Symbolizer

    sym = Symbolizer(a.image)
    try:
        src = sys.stdin.buffer if a.input == "-" else open(a.input, "rb")  # noqa: SIM115
    except OSError as e:
        raise SourceError(f"{a.input}: cannot read: {e.strerror}") from None
    with src:
        for piece in sym.stream(src):
            sys.stdout.buffer.write(piece)
            sys.stdout.buffer.flush()
    return 0


def cmd_mount(a: argparse.Namespace) -> int:
    from .mount import run_mount

    return run_mount(a)


def cmd_umount(a: argparse.Namespace) -> int:
    from .mount import run_umount

    return run_umount(a)


def _mount_fuse_form(argv: list[str]) -> list[str]:
    """``ksymsfs SOURCE MOUNTPOINT -o opts`` (as mount.fuse calls it) -> ``mount`` argv."""
    if len(argv) >= 2 and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        source, rest, keep = argv[0], argv[1:], []
        while rest:  # mount(8) helpers also get -t TYPE and -n/-s/-v: not ours to use
            arg = rest.pop(0)
            if arg == "-t" and rest:
                rest.pop(0)
            elif arg not in ("-n", "-s", "-v"):
                keep.append(arg)
        del source  # a label only: a kallsyms file comes from -o kallsyms=PATH, never SOURCE
        return ["mount", *keep]
    return argv


def _setup_logging(debug: bool) -> None:
    """Our messages go to stderr as 'ksymsfs: ...', whatever the host program configured."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ksymsfs: %(message)s"))
    for name in ("ksymsfs", "fuse"):
        lg = logging.getLogger(name)
        lg.handlers = [handler]
        lg.propagate = False
        lg.setLevel(logging.DEBUG if debug else logging.INFO)


def cli(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit status (0 ok, 1 runtime failure, 2 bad input)."""
    argv = _mount_fuse_form(list(sys.argv[1:] if argv is None else argv))
    a = _parser().parse_args(argv)
    _setup_logging(a.debug)
    if a.cmd is None:
        _parser().print_help()
        return 2
    try:
        return globals()[f"cmd_{a.cmd}"](a)
    except KsymsError as e:
        if a.debug:
            raise
        print(f"ksymsfs: {e}", file=sys.stderr)
        return e.exit_status
    except BrokenPipeError:
        return 1
    except OSError as e:
        if a.debug:
            raise
        print(f"ksymsfs: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("ksymsfs: out of memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main() -> None:
    sys.exit(cli())
