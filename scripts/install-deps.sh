#!/bin/sh
# System packages ksymsfs needs to run, build and test (Debian 12/13, Ubuntu). Idempotent.
# POSIX sh: runs on a bare machine before make or python3 exist. Set KSYMSFS_DEPS=run for the
# run-time set only (what `make install` needs); default: everything `make test` needs too.
set -eu

# run: FUSE (mount.fuse, fusermount, libfuse 2 for fusepy), a Python with venv, make,
# and the demo's tools (nm/readelf, cc + libbsd for the nlist(3) client)
RUN="fuse LIBFUSE2 python3 python3-venv make binutils gcc libc6-dev libbsd-dev"
# test: the readers the conformance tests run, systemd-analyze (unit tests), mount(8)
TEST="elfutils llvm systemd mount procps linux-perf gdb file"
# test: the VM tests (qemu under TCG, a busybox initramfs, depmod/modprobe for the guest)
TEST="$TEST qemu-system-x86 busybox-static kmod"

want="$RUN"
[ "${KSYMSFS_DEPS:-test}" = run ] || want="$want $TEST"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
# Debian 13 / Ubuntu 24.04 renamed libfuse2 for the 64-bit time_t transition
libfuse2_name() {
    if installed libfuse2t64 || apt-cache show libfuse2t64 >/dev/null 2>&1; then
        echo libfuse2t64
    else
        echo libfuse2
    fi
}

missing() {
    for p in $want; do
        [ "$p" = LIBFUSE2 ] && { installed libfuse2 || installed libfuse2t64 || echo LIBFUSE2; continue; }
        installed "$p" || echo "$p"
    done
}

need=$(missing | tr '\n' ' ')
if [ -n "${need% }" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-deps: need root to apt-get install: $need" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    echo "install-deps: apt-get install $need"
    apt-get update -qq
    need=$(echo "$need" | sed "s/LIBFUSE2/$(libfuse2_name)/")
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
# llvm-readelf is versioned on Debian (llvm-readelf-14, -19): give tests a stable name.
# `make uninstall` removes this link (only if it still points at a versioned llvm-readelf).
if installed llvm && ! command -v llvm-readelf >/dev/null 2>&1; then
    for v in /usr/bin/llvm-readelf-*; do
        [ -x "$v" ] && ln -sf "$v" /usr/local/bin/llvm-readelf && break
    done
fi
exit 0
