#!/bin/sh
# The run install's files (make install-files / make uninstall). POSIX sh.
#   layout.sh install | uninstall
# Paths come from the environment (the Makefile passes them): PYTHON VENV SBIN_LINK HELPER
# UNIT MANDIR LLVM_READELF_LINK KSYMS, and DESTDIR (a root to install under; the files
# written still name the real paths). Directories install creates are recorded in
# $VENV/installed-dirs so that uninstall removes them again, and only them.
set -eu
: "${PYTHON:=python3}" "${VENV:=/opt/ksymsfs}" "${SBIN_LINK:=/usr/local/sbin/ksymsfs}"
: "${HELPER:=/usr/sbin/mount.fuse.ksymsfs}" "${UNIT:=/etc/systemd/system/ksymsfs.service}"
: "${MANDIR:=/usr/local/share/man/man8}" "${LLVM_READELF_LINK:=/usr/local/bin/llvm-readelf}"
: "${KSYMS:=/dev/ksyms}" "${DESTDIR:=}"
D=$DESTDIR
MANIFEST="$D$VENV/installed-dirs"
FILES="$SBIN_LINK $HELPER $UNIT $MANDIR/ksymsfs.8 $MANDIR/ksyms.8"
systemd_running() { [ -z "$D" ] && [ -d /run/systemd/system ]; }

missing_dirs() {  # the directories (ancestors first) that installing $1... would create
    for f in "$@"; do
        d=$(dirname "$f") chain=""
        while [ "$d" != / ] && [ ! -d "$D$d" ]; do chain="$d $chain"; d=$(dirname "$d"); done
        for c in $chain; do echo "$c"; done
    done | awk '!seen[$0]++'
}

do_install() {
    [ -z "$D" ] || mkdir -p "$D"
    old=$(cat "$MANIFEST" 2>/dev/null || true)
    new=$(missing_dirs "$VENV/x" $FILES)
    rm -rf "$D$VENV"
    "$PYTHON" -m venv "$D$VENV"
    "$D$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input .
    rm -rf build/lib build/bdist.*  # setuptools' in-tree build output
    printf '%s\n' $old $new | awk 'NF && !seen[$0]++' > "$MANIFEST"
    for f in $FILES; do mkdir -p "$D$(dirname "$f")"; done
    printf '#!/bin/sh\nexec %s -I -m ksymsfs "$@"\n' "$VENV/bin/python" > "$D$SBIN_LINK"
    chmod 755 "$D$SBIN_LINK"
    cp "$D$SBIN_LINK" "$D$HELPER"
    sed "s|/opt/ksymsfs|$VENV|g" scripts/ksymsfs.service > "$D$UNIT"
    chmod 644 "$D$UNIT"
    cp man/ksymsfs.8 "$D$MANDIR/ksymsfs.8"
    printf '.so man8/ksymsfs.8\n' > "$D$MANDIR/ksyms.8"  # BSD users reach for ksyms
    chmod 644 "$D$MANDIR/ksymsfs.8" "$D$MANDIR/ksyms.8"
    if systemd_running; then systemctl daemon-reload; fi
    echo "installed: $VENV $FILES"
}

do_uninstall() {
    if systemd_running; then systemctl disable --now ksymsfs.service 2>/dev/null || true; fi
    if [ -z "$D" ] && [ -x "$VENV/bin/python" ]; then
        "$VENV/bin/python" -I -m ksymsfs umount "$KSYMS" >/dev/null 2>&1 || true
    fi
    dirs=$(cat "$MANIFEST" 2>/dev/null || true)
    rm -rf "$D$VENV"
    for f in $FILES; do rm -f "$D$f"; done
    rm -f "$D$(dirname "$UNIT")/multi-user.target.wants/ksymsfs.service"
    # made by install-deps.sh for the tests; only ours (a link to a versioned llvm-readelf)
    case $(readlink "$D$LLVM_READELF_LINK" 2>/dev/null || true) in
        /usr/bin/llvm-readelf-*) rm -f "$D$LLVM_READELF_LINK" ;;
    esac
    for d in $(printf '%s\n' $dirs | sort -r); do rmdir "$D$d" 2>/dev/null || true; done
    if systemd_running; then systemctl daemon-reload; fi
    echo "removed: $VENV $FILES"
}

case "${1:-}" in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) echo "usage: layout.sh install|uninstall" >&2; exit 2 ;;
esac
