"""The VM tests boot a qemu guest (minutes): collected only by `make test-vm` (KSYMSFS_VM=1)."""

import os

collect_ignore = [] if os.environ.get("KSYMSFS_VM") else ["test_vm.py"]
