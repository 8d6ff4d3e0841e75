#!/bin/sh
# What the VM tests need on the host (Debian): qemu, a static busybox for the initramfs,
# kmod (depmod/modprobe on the unpacked kernel). The kernel itself is fetched by the test.
set -eu
need=""
for p in qemu-system-x86 busybox-static kmod; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ]; then echo "vm install-deps: need root for apt-get install$need" >&2; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
