"""Boot Debian's own kernel under qemu, this checkout shared over 9p (kernel + initrd cached).

``python3 -m tests.vm.harness [--churn ci|long] [--out DIR]`` boots once, runs
tests/vm/guest.py inside and leaves ``results.json`` and ``serial.log`` in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KSYMSFS_VM_CACHE", REPO / "build" / "vm"))
META_PACKAGE = "linux-image-amd64"
# The kernel's own modules the initramfs needs to mount 9p over virtio, in load order.
INITRD_MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                  "virtio_pci", "netfs", "fscache", "9pnet", "9p", "9pnet_virtio"]
ALIVE = "ksymsfs-vm: init"     # first line init prints: the guest really booted
DONE = "ksymsfs-vm: guest exit"
# whole qemu run, then killed
TIMEOUT_S = {"none": 600.0, "ci": 900.0, "short": 1500.0, "long": 3300.0}
KVM_ALIVE_S = 60               # a KVM guest that has not printed ALIVE by then is dead
# The guest's /init mounts its own file systems here over the shared host root, so
# nothing of the host's below them is visible in the guest.
GUEST_OWN = ("/tmp", "/run", "/dev", "/proc", "/sys")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "ksymsfs-vm: init $(cat /proc/sys/kernel/osrelease)"
for m in MODULES; do insmod /lib/modules/$m.ko || echo "ksymsfs-vm: insmod $m failed"; done
n=0
while [ ! -e /sys/bus/virtio/drivers/9pnet_virtio/virtio1 ] && [ $n -lt 100 ]; do
    sleep 0.1; n=$((n+1))
done
O9P=trans=virtio,version=9p2000.L,msize=262144
R=/newroot
mkdir -p $R
mount -t 9p -o $O9P,cache=loose,ro hostroot $R || echo "ksymsfs-vm: mount hostroot failed"
mount -t proc proc $R/proc; mount -t sysfs sys $R/sys; mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts; mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs tmpfs $R/tmp; mount -t tmpfs tmpfs $R/run
mkdir -p $R/tmp/out
mount -t 9p -o $O9P,cache=none out $R/tmp/out || echo "ksymsfs-vm: mount out failed"
for a in $(cat /proc/cmdline); do
    case $a in ksymsfs.wt=*) WT=${a#*=};; ksymsfs.py=*) PY=${a#*=};; esac
done
chroot $R /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONPATH=$WT PYTHONDONTWRITEBYTECODE=1 $PY $WT/tests/vm/guest.py /tmp/out
echo "ksymsfs-vm: guest exit $?"
sync; umount $R/tmp/out
poweroff -f
"""


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel package: image, module tree (depmod'ed) and our initramfs."""

    version: str
    vmlinuz: Path
    modroot: Path   # holds lib/modules/<version>; `modprobe -d modroot`
    initrd: Path


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def kernel_package() -> str:
    """The package linux-image-amd64 depends on (e.g. linux-image-6.1.0-57-amd64)."""
    try:
        out = run(["apt-cache", "depends", META_PACKAGE]).stdout
    except subprocess.CalledProcessError:   # a fresh machine without package lists
        run(["apt-get", "update", "-qq"])
        out = run(["apt-cache", "depends", META_PACKAGE]).stdout
    for line in out.splitlines():
        dep = line.strip().partition("Depends: ")[2]
        if dep.startswith("linux-image-"):
            return dep
    raise RuntimeError(f"apt-cache depends {META_PACKAGE}: no linux-image dependency:\n{out}")


def prepare(cache: Path = CACHE) -> Kernel:
    """Download, unpack, depmod and build the initramfs once; later calls reuse the cache."""
    pkg = kernel_package()
    version = pkg.removeprefix("linux-image-")
    top = cache / pkg
    root = top / "root"
    ready = top / "ready"
    if not ready.exists():
        shutil.rmtree(top, ignore_errors=True)
        (top / "deb").mkdir(parents=True)
        print(f"vm: apt-get download {pkg}", file=sys.stderr)
        run(["apt-get", "download", pkg], cwd=top / "deb")
        deb = next((top / "deb").glob("*.deb"))
        run(["dpkg-deb", "-x", str(deb), str(root)])
        deb.unlink()
        run(["depmod", "-b", str(root), version])
        build_initramfs(root, version, top / "initrd.cpio")
        ready.write_text(pkg + "\n")
    return Kernel(version, root / "boot" / f"vmlinuz-{version}", root, top / "initrd.cpio")


def build_initramfs(root: Path, version: str, out: Path) -> None:
    """Static busybox + the INITRD_MODULES .ko files + our /init, as a newc cpio."""
    busybox = "/bin/busybox"   # busybox-static's: the initramfs has no libc
    with open(busybox, "rb") as f:
        from elftools.elf.elffile import ELFFile
        if any(s["p_type"] == "PT_INTERP" for s in ELFFile(f).iter_segments()):
            raise RuntimeError(f"{busybox} is dynamically linked: install busybox-static")
    tree = out.parent / "initrd"
    shutil.rmtree(tree, ignore_errors=True)
    for d in ("bin", "dev", "proc", "sys", "lib/modules"):
        (tree / d).mkdir(parents=True)
    shutil.copy(busybox, tree / "bin" / "busybox")
    for m in INITRD_MODULES:
        dep = run(["modprobe", "-d", str(root), "-S", version, "--show-depends", m]).stdout
        ko = Path(dep.strip().splitlines()[-1].split()[1])
        shutil.copy(ko, tree / "lib" / "modules" / f"{m}.ko")
    (tree / "init").write_text(INIT.replace("MODULES", " ".join(INITRD_MODULES)))
    (tree / "init").chmod(0o755)
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    with open(out, "wb") as f:
        subprocess.run([str(tree / "bin" / "busybox"), "cpio", "-o", "-H", "newc"],
                       input="\n".join(files).encode() + b"\n", stdout=f, cwd=tree,
                       check=True, stderr=subprocess.DEVNULL)


def kvm_usable() -> bool:
    """/dev/kvm opens and is not kvm_pvm (which cannot boot a stock kernel: see NOTES)."""
    if Path("/sys/module/kvm_pvm").exists():
        return False
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return False
    return True


def guest_python() -> str:
    """This interpreter as the guest must start it: by its own path, not the file that path
    resolves to, so a venv's ``bin/python`` (a symlink) finds its ``pyvenv.cfg`` and the
    venv's packages (the resolved file is the base interpreter, which may lack them)."""
    return os.path.abspath(sys.executable)


def qemu_cmd(k: Kernel, out: Path, accel: str, smp: int, mem_mb: int) -> list[str]:
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else \
          ["-accel", "tcg,thread=multi", "-cpu", "max"]
    cmdline = (f"console=ttyS0 loglevel=4 panic=-1 rdinit=/init "
               f"ksymsfs.wt={REPO} ksymsfs.py={guest_python()}")
    return ["qemu-system-x86_64", *cpu, "-smp", str(smp), "-m", str(mem_mb),
            "-kernel", str(k.vmlinuz), "-initrd", str(k.initrd), "-append", cmdline,
            "-display", "none", "-monitor", "none", "-no-reboot", "-nodefaults",
            "-serial", f"file:{out / 'serial.log'}",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                       "multidevs=remap",
            "-virtfs", f"local,path={out},mount_tag=out,security_model=none"]


class BootError(RuntimeError):
    """qemu did not finish the scenario; the message ends with the serial log's tail."""


def serial_tail(out: Path, lines: int = 40) -> str:
    try:
        text = (out / "serial.log").read_text(errors="replace")
    except OSError:
        return "(no serial log)"
    return "\n".join(text.splitlines()[-lines:])


def boot_once(k: Kernel, out: Path, accel: str, timeout: float, alive_s: float | None,
              smp: int = 2, mem_mb: int = 2048) -> str:
    """One qemu run. Returns "ok", or "dead" if ALIVE did not show within alive_s."""
    (out / "serial.log").unlink(missing_ok=True)
    p = subprocess.Popen(qemu_cmd(k, out, accel, smp, mem_mb), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    start = time.monotonic()
    try:
        while p.poll() is None:
            waited = time.monotonic() - start
            if alive_s is not None and waited > alive_s and ALIVE not in serial_tail(out, 10**6):
                return "dead"
            if waited > timeout:
                raise BootError(f"qemu ({accel}) still running after {timeout:.0f} s, killed;"
                                f" serial log tail:\n{serial_tail(out)}")
            time.sleep(0.5)
    finally:
        if p.poll() is None:
            p.kill()
        msg = p.communicate()[0].decode(errors="replace")
    if p.returncode != 0:
        raise BootError(f"qemu exited {p.returncode}: {msg.strip()}\n{serial_tail(out)}")
    if DONE not in serial_tail(out, 10**6):
        raise BootError(f"guest powered off without finishing; serial log tail:\n"
                        f"{serial_tail(out)}")
    return "ok"


def hidden_from_guest(paths: dict[str, str]) -> str:
    """Why the guest could not see one of ``paths`` ({what: host path}), or ""."""
    for what, path in paths.items():
        real = os.path.realpath(path)
        for own in GUEST_OWN:
            if real == own or real.startswith(own + "/"):
                return (f"{what} {real} is under {own}, which the guest mounts afresh "
                        f"(its own {', '.join(GUEST_OWN)}): the guest cannot see it; "
                        "use a checkout, Python and KSYMSFS_VM_CACHE elsewhere")
    return ""


def boot(out: Path, churn: str = "ci", timeout: float = 600.0,
         accel: str | None = None, capture: bool = False, churn_only: bool = False,
         profile: bool = False) -> dict:
    """Prepare (cached), boot the scenario once, return the guest's results.json."""
    why = hidden_from_guest({"the checkout": str(REPO), "Python": sys.executable,
                             "its environment": sys.prefix,
                             "the VM cache (kernel modules)": str(CACHE)})
    if why:
        raise BootError(why)
    k = prepare()
    out.mkdir(parents=True, exist_ok=True)
    for f in ("results.json", "guest.log"):
        (out / f).unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps({"churn": churn, "repo": str(REPO),
                                                 "modroot": str(k.modroot),
                                                 "version": k.version,
                                                 "capture": capture,
                                                 "churn_only": churn_only,
                                                 "profile": profile}))
    accel = accel or os.environ.get("KSYMSFS_VM_ACCEL") or "auto"
    state = "dead"
    if accel in ("auto", "kvm") and kvm_usable():
        state = boot_once(k, out, "kvm", timeout, KVM_ALIVE_S)
        if state == "dead":
            print("vm: KVM guest showed no sign of life, using TCG", file=sys.stderr)
    if state == "dead":
        boot_once(k, out, "tcg", timeout, None)
    try:
        return json.loads((out / "results.json").read_text())
    except (OSError, ValueError) as e:
        raise BootError(f"no results.json from the guest ({e}); serial log tail:\n"
                        f"{serial_tail(out)}") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--churn", default=os.environ.get("VM_CHURN", "ci"),
                    choices=["ci", "long", "short", "none"])
    ap.add_argument("--churn-only", action="store_true", help="skip the fidelity checks")
    ap.add_argument("--out", type=Path, default=CACHE / "out")
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile one open in the guest -> OUT/profile.txt")
    ap.add_argument("--capture", action="store_true",
                    help="also copy kallsyms, modules, /sys/module/*/sections to OUT/dump")
    a = ap.parse_args()
    t = time.monotonic()
    res = boot(a.out, a.churn, a.timeout or TIMEOUT_S[a.churn], capture=a.capture,
               churn_only=a.churn_only, profile=a.profile)
    bad = [n for n, c in res.get("checks", {}).items() if not c.get("ok")]
    print(f"vm: {len(res.get('checks', {}))} checks, failed: {bad or 'none'};"
          f" {time.monotonic() - t:.0f} s; {a.out}/results.json")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
