#!/bin/bash
# CI: the README's two commands, as written, in a bare Debian root (mmdebstrap minbase + git +
# ca-certificates: what a fresh cloud image or container has), as root, with a clean
# environment. Then `make uninstall` must leave the real paths as they were before install.
# usage: scripts/ci-bare-root.sh [SUITE...]   (default: bookworm trixie; as root)
# Roots are cached as tarballs in $KSYMSFS_CI_CACHE (rebuilt after 7 days), with apt's and
# pip's download caches, so a second run does not download the distribution again.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${KSYMSFS_CI_CACHE:-/var/cache/ksymsfs-ci}
[ $# -gt 0 ] || set -- bookworm trixie
ROOT=""

log() { echo "ci-bare-root[${SUITE:-}]: $*" >&2; }

need_tools() {  # what this script itself runs: mmdebstrap (a fresh CI machine lacks it)
    command -v mmdebstrap >/dev/null && return 0
    log "apt-get install mmdebstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        mmdebstrap debian-archive-keyring >/dev/null
}

root_tarball() {  # cached minbase root of $SUITE
    local tar="$CACHE/$SUITE-minbase.tar"
    mkdir -p "$CACHE"
    if [ -z "$(find "$tar" -mtime -7 2>/dev/null)" ]; then
        log "building $tar"
        rm -f "$tar.tmp"
        # stdout is this function's answer: mmdebstrap's chatter goes to stderr
        mmdebstrap --quiet --variant=minbase --include=git,ca-certificates --format=tar \
            "$SUITE" "$tar.tmp" >&2 || return 1
        mv "$tar.tmp" "$tar" || return 1
    fi
    echo "$tar"
}

mounts_under() {  # mount points below $ROOT, deepest first
    awk -v r="$ROOT" '$5 == r || index($5, r "/") == 1 {print $5}' /proc/self/mountinfo | sort -r
}

cleanup() {
    [ -n "$ROOT" ] && [ -d "$ROOT" ] || return 0
    local p
    for p in /proc/[0-9]*; do  # processes this script started inside the root (FUSE daemons)
        [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ] && kill -9 "${p#/proc/}" 2>/dev/null
    done
    sleep 1
    for p in $(mounts_under); do umount -l "$p" || true; done
    if [ -n "$(mounts_under)" ]; then
        echo "ci-bare-root: mounts left under $ROOT, not deleting it" >&2
        return 1
    fi
    rm -rf --one-file-system "$ROOT"
    ROOT=""
}
trap cleanup EXIT

make_root() {  # $ROOT: unpacked root, the host's network environment, FUSE-capable mounts
    local tarball
    tarball=$(root_tarball)  # its own statement: a failure here stops the script (set -e)
    ROOT=$(mktemp -d "/var/tmp/ksymsfs-bare-$SUITE.XXXXXX")
    tar -C "$ROOT" -xf "$tarball"
    # environment, not the project: this workplace's CA certificates, pip config and DNS
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/" 2>/dev/null || true
    [ -f /etc/pip.conf ] && cp /etc/pip.conf "$ROOT/etc/pip.conf"
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
    mount -t proc proc "$ROOT/proc"
    mount --bind /sys "$ROOT/sys"
    mount -t tmpfs -o mode=1777 tmpfs "$ROOT/dev/shm"
    mount --bind /dev/pts "$ROOT/dev/pts"
    local d
    for d in null fuse; do
        [ -e "$ROOT/dev/$d" ] || touch "$ROOT/dev/$d"
        mount --bind "/dev/$d" "$ROOT/dev/$d"
    done
    mkdir -p "$CACHE/apt-$SUITE" "$CACHE/pip-$SUITE" "$ROOT/root/.cache/pip"
    mount --bind "$CACHE/apt-$SUITE" "$ROOT/var/cache/apt/archives"
    mount --bind "$CACHE/pip-$SUITE" "$ROOT/root/.cache/pip"
    in_root update-ca-certificates >/dev/null
    # the checkout under test: a clone of this commit, as a user would clone it
    git clone -q "$REPO" "$ROOT/root/ksymsfs"
    git -C "$ROOT/root/ksymsfs" checkout -q --detach "$(git -C "$REPO" rev-parse HEAD)"
}

in_root() {  # a command in the root with a clean environment (no PATH tricks, no PYTHONPATH)
    # Not chroot(2): the kernel refuses unshare(CLONE_NEWUSER) to a chrooted process, and
    # the user-namespace tests need it. A private mount namespace whose root *is* the
    # bare root (pivot_root) is what a real machine looks like. Mounts made inside (the
    # FUSE device) end with the command: each call must unmount what it mounted.
    unshare --mount --propagation private -- /bin/sh -ec '
        root=$1; shift
        mount --rbind "$root" "$root"
        cd "$root"
        mkdir -p .oldroot
        pivot_root . .oldroot
        cd /
        umount -l /.oldroot
        rmdir /.oldroot
        exec "$@"' sh "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb CI=true \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

timed() {  # label, command...
    local t0=$SECONDS label=$1
    shift
    if "$@"; then log "$label: ok in $((SECONDS - t0)) s"; return 0; fi
    log "$label: FAILED after $((SECONDS - t0)) s"
    return 1
}

layout_roundtrip() {  # install + uninstall of the real paths leaves them as they were
    in_root sh -ec '
        cd /root/ksymsfs
        make -s uninstall
        list() { find /opt /usr/local /usr/sbin /etc/systemd /usr/share/man -xdev 2>/dev/null | sort; }
        list > /tmp/before
        make -s install-files >/dev/null
        test -x /usr/local/sbin/ksymsfs && /usr/local/sbin/ksymsfs --version
        make -s uninstall
        list > /tmp/after
        diff /tmp/before /tmp/after'
}

need_tools
for SUITE in "$@"; do
    t0=$SECONDS
    make_root
    timed "./setup.sh run" in_root sh -c \
        'cd /root/ksymsfs && ./setup.sh run && /usr/local/sbin/ksymsfs umount /dev/ksyms'
    timed "./setup.sh test" in_root sh -c 'cd /root/ksymsfs && ./setup.sh test'
    "$REPO/scripts/check-junit.py" "$ROOT/root/ksymsfs/build/junit.xml"
    timed "make install + uninstall round trip" layout_roundtrip
    cleanup
    log "passed in $((SECONDS - t0)) s"
done
