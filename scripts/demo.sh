#!/bin/sh
# The main job: serve the live kernel's symbols at $KSYMS (default /dev/ksyms) and use it.
set -eu
KSYMS=${KSYMS:-/dev/ksyms}
PY=${PYTHON:-python3}
ksymsfs() { "$PY" -m ksymsfs "$@"; }
state=$("$PY" -c 'import sys; from ksymsfs.mount import mount_state; print(mount_state(sys.argv[1]))' "$KSYMS")
if [ "$state" = stale ]; then ksymsfs umount "$KSYMS"; state=none; fi
[ "$state" = mounted ] || ksymsfs mount "$KSYMS"
set -x
ls -l "$KSYMS"
nm "$KSYMS" | head -5
nm "$KSYMS" | wc -l
readelf -h "$KSYMS" | sed -n '1,8p'
readelf -sW "$KSYMS" | sed -n '1,6p'
ksymsfs nlist "$KSYMS" _stext schedule no_such_symbol || true
ksymsfs lookup "$KSYMS" "$(nm "$KSYMS" | awk '$3 == "schedule" {print $1; exit}')"
cc -o /tmp/ksymsfs-nlist tests/nlist_client.c -lbsd && /tmp/ksymsfs-nlist "$KSYMS" _stext schedule no_such_symbol || true
set +x
echo "ksymsfs: $KSYMS is mounted; unmount with: $PY -m ksymsfs umount $KSYMS"
