"""Stable ids: the same parts give the same id on any machine and in any run.

In: the parts that name a thing (a leaf's language, label and position; a request's stage and
leaf). Out: 16 hex characters; ``STABLE_ID``, the numpy type that holds many of them compactly
(16 bytes each, no Python object per id).
"""

from __future__ import annotations

import hashlib

STABLE_ID = "S16"


def stable_id(*parts: object) -> str:
    """16 hex characters, the same for the same parts on any machine."""
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).hexdigest()
