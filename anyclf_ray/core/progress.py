"""Progress of a long LLM pass: rows done of total, rows/s, ETA and failures, at a steady interval.

In: the pass's counts from the engine pool's monitor (``pool.Watcher`` calls a ``Progress``
every ``output.status_seconds``). Out: a log line each time, and ``<run>/status.json``
rewritten with the same figures, for another process or a dashboard to poll. Its ``state`` is
``running`` while the pass runs (``updated_at`` says it is alive), then ``finished`` or ``failed``.
"""

from __future__ import annotations

import logging
import time

from anyclf_ray.core.stage import now
from anyclf_ray.core.storage import RunLocation

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """The figures of one pass of ``requests`` requests towards ``rows_planned`` rows, of
    which ``rows_committed`` were committed before it started (a resumed run)."""

    def __init__(self, location: RunLocation, stage: str, requests: int, rows_planned: int, rows_committed: int):
        self.location, self.stage = location, stage
        self.requests, self.rows_planned, self.rows_committed = requests, rows_planned, rows_committed
        self.started, self.started_at = time.monotonic(), now()
        self.last = {"requests": 0, "failed": 0, "items": 0}

    def status(self, state: str) -> dict:
        elapsed = time.monotonic() - self.started
        answered = self.last["requests"]
        rate = self.last["items"] / elapsed if elapsed else 0.0
        eta = (self.requests - answered) * elapsed / answered if answered else None
        return {
            "run_id": self.location.run_id,
            "stage": self.stage,
            "state": state,
            "started_at": self.started_at,
            "updated_at": now(),
            "elapsed_seconds": round(elapsed, 1),
            "rows": {"planned": self.rows_planned, "done": self.rows_committed + self.last["items"],
                     "committed_before": self.rows_committed},
            "requests": {"total": self.requests, "answered": answered, "failed": self.last["failed"]},
            "rows_per_second": round(rate, 2),
            "eta_seconds": None if eta is None else round(eta, 1),
        }

    def __call__(self, progress: dict) -> None:
        """A report from the pass (``pool.Monitor.progress``): log it and rewrite the status."""
        self.last = progress
        self._write("running")

    def finish(self, state: str) -> None:
        self._write(state)

    def _write(self, state: str) -> None:
        status = self.status(state)
        rows = status["rows"]
        log.info("%s: %s: %d of %d rows (%.1f%%), %.1f rows/s, ETA %s, %d failed request(s)", self.stage, state,
                 rows["done"], rows["planned"], 100 * rows["done"] / max(rows["planned"], 1),
                 status["rows_per_second"], duration(status["eta_seconds"]), status["requests"]["failed"])
        self.location.write_json(STATUS_FILE, status)
