"""Read a ksyms ELF image (ours or any ELF with a .symtab): nlist(3), address lookup, dump.

Images up to ``SMALL_IMAGE`` bytes are read in pure Python (pyreader: a CLI start
without numpy's ~100 ms import); larger ones with numpy (npreader). Both give the same
answers; a small image hands anything beyond nlist/lookup to the numpy reader.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .readbase import (  # noqa: F401 (re-exported: the reader's public names)
    N_ABS,
    N_BSS,
    N_DATA,
    N_EXT,
    N_FN,
    N_TEXT,
    N_TYPE_NAMES,
    N_UNDF,
    ImageLike,
    Lookup,
    NlistHit,
    load_bytes,
    n_type_name,
)

if TYPE_CHECKING:
    from .npreader import Image
    from .pyreader import PyImage

SMALL_IMAGE = 1 << 20  # bytes: up to ~20k symbols pure Python beats importing numpy


def parse_image(image: ImageLike | Image | PyImage, engine: str | None = None) -> Any:
    """Validate headers and bounds (every offset checked against the file size).

    ``engine``: "python" or "numpy" to force a reader; default by the image's size.
    """
    from .pyreader import PyImage
    if isinstance(image, PyImage):
        return image.full() if engine == "numpy" else image
    np_reader = sys.modules.get(f"{__package__}.npreader")  # an Image implies it is loaded
    if np_reader is not None and isinstance(image, np_reader.Image):
        return image
    data, path = load_bytes(image)
    if engine == "python" or (engine is None and len(data) <= SMALL_IMAGE):
        return PyImage(data, path)
    from . import npreader
    img = npreader.parse_image(data, path)
    img.path = path
    return img


def _numpy(image: Any) -> Any:
    """The numpy reader's Image for ``image`` (a PyImage parses its bytes again)."""
    img = parse_image(image)
    return img.full() if hasattr(img, "full") else img


def nlist(image: Any, names: Iterable[str]) -> dict[str, list[NlistHit]]:
    """BSD nlist(3): each name -> every matching symbol (``_foo`` also matches ``foo``).

    An empty list means not found (nlist(3) would leave n_type N_UNDF and n_value 0).
    """
    img = parse_image(image)
    if hasattr(img, "full"):
        return img.nlist(names)
    from . import npreader
    return npreader.nlist(img, names)


def lookup(image: Any, addrs: Iterable[int]) -> list[Lookup | None]:
    """Symbol containing each address, like the kernel's %pS (see npreader.lookup)."""
    img = parse_image(image)
    if hasattr(img, "full"):
        return img.lookup(addrs)
    from . import npreader
    return npreader.lookup(img, addrs)


def dump_lines(image: Any, width: int | None = None) -> Iterable[str]:
    """The image back as kallsyms text lines (symtab order), module suffixes included."""
    from . import npreader
    return npreader.dump_lines(_numpy(image), width)


def letter_of(image: Any, i: int) -> str:
    """The symbol's kallsyms letter (stored, or what nm would print)."""
    from . import npreader
    return npreader.letter_of(_numpy(image), i)


def nlist_type(image: Any, i: int) -> int:
    """n_type exactly as libbsd's elf_sym_to_nlist() computes it."""
    img = parse_image(image)
    if hasattr(img, "full"):
        return img.nlist_type(i)
    from . import npreader
    return npreader.nlist_type(img, i)
