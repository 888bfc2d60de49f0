"""Stable ids: the same parts give the same id on any machine and in any run.

In: the parts that name a thing (a leaf's language, label and position; a request's stage and
leaf). Out: 16 hex characters; ``STABLE_ID``, the numpy type that holds many of them compactly
(16 bytes each, no Python object per id); ``hash64``, many values' 64-bit hashes at once (a row's
bucket, or its place in a sample).
"""

from __future__ import annotations

import hashlib

import numpy as np

STABLE_ID = "S16"


def stable_id(*parts: object) -> str:
    """16 hex characters, the same for the same parts on any machine."""
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).hexdigest()


def hash64(values: list[str], salt: str = "") -> np.ndarray:
    """A 64-bit hash of each value (uint64), salted, the same on every machine."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{salt}\x1f{v}".encode(), digest_size=8).digest(), "big")
                     for v in values], np.uint64)
