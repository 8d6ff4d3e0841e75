"""Backing files for FUSE passthrough: one image's bytes in a memfd (its zeros are holes).

The kernel reads a passthrough open's data from such a file itself (fs/fuse/passthrough.c),
so its size must be what every stat says (the device's served size): ``BackingFile.fit``
sets it before each open that names the file. Nothing here knows FUSE: registering the
file with the kernel (an ioctl on /dev/fuse) is the adapter's.
"""

from __future__ import annotations

import os


class BackingFile:
    """An image written once into an anonymous memory file; resized, never rewritten."""

    __slots__ = ("fd", "image", "size")

    def __init__(self, image: object, size: int):
        fd = os.memfd_create("ksyms", os.MFD_CLOEXEC)
        try:
            write = getattr(image, "write_to", None)
            if write is not None:  # a VirtualImage: its zeros become holes (no memory)
                write(fd)
            else:
                view = memoryview(image)
                while view:
                    view = view[os.write(fd, view):]
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.image, self.size = fd, image, size

    def fit(self, size: int) -> None:
        """Make the file ``size`` bytes: the image, then zeros (or the image cut short,
        which only happens while nothing holds it: the served size never shrinks then)."""
        if size != self.size:
            os.ftruncate(self.fd, size)
            self.size = size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
