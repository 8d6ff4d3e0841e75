#!/bin/sh
# Bootstrap on a bare Debian/Ubuntu machine, as root: installs what make needs, then hands over.
#   ./setup.sh run    install ksymsfs (/opt/ksymsfs) and mount the live kernel at /dev/ksyms
#   ./setup.sh test   install, then run the whole test suite (real FUSE mounts included)
# Assumes only a POSIX sh and apt-get: no make, python3, pip or venv.
set -eu
cd "$(dirname "$0")"
case "${1:-}" in
    run | test) ;;
    *) echo "usage: ./setup.sh run|test" >&2; exit 2 ;;
esac
if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run me as root (apt-get install, FUSE mount at /dev/ksyms)" >&2
    exit 1
fi
# the run command needs only the run-time packages; the test command everything
if [ "$1" = run ]; then KSYMSFS_DEPS=run ./scripts/install-deps.sh; else ./scripts/install-deps.sh; fi
exec make "$1"
