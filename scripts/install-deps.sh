#!/bin/sh
# System packages ksymsfs needs at run and test time (Debian/Ubuntu). Idempotent.
set -eu
need=""
for p in fuse libfuse2 elfutils libbsd-dev binutils gcc make llvm linux-perf gdb file; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ]; then echo "install-deps: need root for apt-get install$need" >&2; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq $need >/dev/null
fi
# llvm-readelf is versioned on Debian (llvm-readelf-14): give tests a stable name
if ! command -v llvm-readelf >/dev/null 2>&1; then
    for v in /usr/bin/llvm-readelf-*; do [ -x "$v" ] && ln -sf "$v" /usr/local/bin/llvm-readelf && break; done
fi
