"""What the benches share about their children: a size or a side runs in a fresh process, so its
peak RSS is its own, and prints its figures as one JSON line."""

from __future__ import annotations

import json


def child_result(stdout: str) -> dict:
    """The figures a child printed: its last line that is a JSON object (Ray may print after it)."""
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))
