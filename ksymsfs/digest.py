"""Digests without OpenSSL: ``hashlib`` maps libcrypto, 3.6 MB of the daemon's resident memory."""

from __future__ import annotations

try:
    from _sha2 import sha256  # CPython >= 3.12
except ImportError:
    try:
        from _sha256 import sha256  # CPython 3.11
    except ImportError:  # another Python: OpenSSL's
        from hashlib import sha256
try:
    from _blake2 import blake2b  # CPython's own
except ImportError:
    from hashlib import blake2b

# imported at start: a daemon that dropped privileges may not read these modules later


def sha256_hex(data: bytes) -> str:
    return sha256(data).hexdigest()


def image_digest(image: object) -> bytes:
    """BLAKE2b-256 of the bytes an image serves: a VirtualImage's size, where each stored
    run lies and the runs themselves (zeros elsewhere), or a plain byte string."""
    parts = getattr(image, "parts", None)
    if parts is None:
        parts = [(0, image)]
    h = blake2b(digest_size=32)
    h.update(b"%d:%d;" % (len(image), len(parts)))
    for off, data in parts:
        h.update(b"%d+%d;" % (off, len(data)))
        h.update(data)
    return h.digest()
