"""Sources -> ELF image bytes: the one call the CLI and the device both use."""

from __future__ import annotations

from dataclasses import dataclass

from .builder import build_virtual
from .elfdefs import make_target
from .sources import Snapshot, Sources, take_snapshot
from .vimage import VirtualImage


@dataclass
class BuiltImage:
    """An image and what went into it."""

    data: VirtualImage
    snapshot: Snapshot


def snapshot_image(snap: Snapshot, hide_addresses: bool = False, arch: str | None = None,
                   elfclass: int | None = None, endian: str | None = None) -> VirtualImage:
    """A snapshot's image; unset target fields default to this machine at the dump's width."""
    target = make_target(arch, elfclass, endian, snap.table.address_bits)
    return build_virtual(snap.table, target, snap.load_order, hide_addresses,
                         snap.section_bases, snap.notes)


def make_image(src: Sources, hide_addresses: bool = False, arch: str | None = None,
               elfclass: int | None = None, endian: str | None = None) -> BuiltImage:
    """Take a consistent snapshot of ``src`` and build its image."""
    snap = take_snapshot(src)
    return BuiltImage(snapshot_image(snap, hide_addresses, arch, elfclass, endian), snap)
