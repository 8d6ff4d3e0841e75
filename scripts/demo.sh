#!/bin/sh
# The main job (`make run`): serve the live kernel's symbols at $KSYMS (default /dev/ksyms)
# with the installed ksymsfs command ($KSYMSFS) and read them with nm, readelf and nlist(3).
set -eu
KSYMS=${KSYMS:-/dev/ksyms}
KSYMSFS=${KSYMSFS:-ksymsfs}
# --force: a stale mount (left by a daemon that died: ENOTCONN) is lazily unmounted first;
# a working mount (e.g. the systemd unit's) is used as it is
if ! out=$("$KSYMSFS" mount --force "$KSYMS" 2>&1); then
    case $out in
        *"already mounted"*) echo "ksymsfs: $KSYMS is already mounted; using it" ;;
        *) echo "$out" >&2; exit 1 ;;
    esac
else
    echo "$out"
fi
set -x
"$KSYMSFS" --version
ls -l "$KSYMS"
nm "$KSYMS" | head -5
nm "$KSYMS" | wc -l
readelf -h "$KSYMS" | sed -n '1,8p'
readelf -sW "$KSYMS" | sed -n '1,6p'
"$KSYMSFS" nlist "$KSYMS" _stext schedule no_such_symbol || true
"$KSYMSFS" lookup "$KSYMS" "$(nm "$KSYMS" | awk '$3 == "schedule" {print $1; exit}')"
cc -o /tmp/ksymsfs-nlist tests/nlist_client.c -lbsd && /tmp/ksymsfs-nlist "$KSYMS" _stext schedule no_such_symbol || true
set +x
echo "ksymsfs: $KSYMS is mounted; unmount with: ksymsfs umount $KSYMS"
