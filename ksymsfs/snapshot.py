"""Sources -> ELF image bytes: the one call the CLI and the device both use."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .builder import build_image
from .elfdefs import Target, make_target
from .sources import Snapshot, Sources, take_snapshot


@dataclass
class BuiltImage:
    """An image and what went into it."""

    data: bytes
    snapshot: Snapshot
    target: Target

    @property
    def all_zero(self) -> bool:
        return not bool(np.any(self.snapshot.table.addr))


def snapshot_image(snap: Snapshot, target: Target | None = None,
                   hide_addresses: bool = False) -> bytearray:
    """A snapshot's image; the target defaults to this machine at the dump's width."""
    target = target or make_target(address_bits=snap.table.address_bits)
    return build_image(snap.table, target, snap.load_order, hide_addresses,
                       snap.section_bases)


def make_image(src: Sources, target: Target | None = None, hide_addresses: bool = False,
               arch: str | None = None, elfclass: int | None = None,
               endian: str | None = None, section_cache: dict | None = None) -> BuiltImage:
    """Take a consistent snapshot of ``src`` and build its image."""
    snap = take_snapshot(src, section_cache=section_cache)
    if target is None:
        target = make_target(arch, elfclass, endian, snap.table.address_bits)
    return BuiltImage(snapshot_image(snap, target, hide_addresses), snap, target)
