"""Resume benchmark: the driver's peak memory for a run's committed request ids.

    python bench/resume.py                  # 2.3M ids (a 10M-row run), parts of 1,000 requests
    python bench/resume.py --ids 230000

It writes empty data parts whose footers hold the ids, as generation commits them, then reads
them back in a fresh process each way: as a source does (``sources.parts.committed``, one
16-byte id each, then the sorted array Ray gets), and as Python strings in a set, the earlier way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import pyarrow as pa

from anyclf_ray.core import config
from anyclf_ray.core.ids import stable_id
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.sources import parts

CHILD = """
import json, resource, sys, time
import numpy as np
from anyclf_ray.core import config
from anyclf_ray.core.ids import STABLE_ID
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.sources import parts
location = RunLocation(config.OutputSpec(path=sys.argv[1]), "resume")
started = time.perf_counter()
if sys.argv[2] == "array":
    found = parts.committed(location).values()
    committed = np.setdiff1d(np.concatenate([part.request_ids for part in found]), np.empty(0, STABLE_ID))
else:
    found = [json.loads(location.read_metadata(path)[parts.PART_METADATA_KEY]) for path in location.list("data")]
    committed = np.array(sorted({rid for part in found for rid in part["request_ids"]}), STABLE_ID)
print(len(committed), time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
BASELINE = ("import resource; from anyclf_ray.sources import parts; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def write_parts(folder: str, n_ids: int, per_part: int) -> None:
    location = RunLocation(config.OutputSpec(path=folder), "resume")
    empty = pa.table({"id": pa.array([], pa.string())})
    for first in range(0, n_ids, per_part):
        ids = [stable_id("generate", k) for k in range(first, min(first + per_part, n_ids))]
        footer = json.dumps({"rows": 0, "request_ids": ids, "usage": {}})
        location.write_table(f"data/part-{first:09d}.parquet",
                             empty.replace_schema_metadata({parts.PART_METADATA_KEY: footer}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=2_300_000)
    parser.add_argument("--per-part", type=int, default=1_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_parts(folder, args.ids, args.per_part)
        baseline = int(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                                      check=True).stdout) / 1024
        print(f"{args.ids:,} committed ids in {-(-args.ids // args.per_part):,} parts; "
              f"the imports alone: {baseline:.0f} MiB peak RSS")
        for way in ("array", "python set"):
            done = subprocess.run([sys.executable, "-c", CHILD, folder, way.split()[0]], capture_output=True,
                                  text=True, check=True)
            count, seconds, rss_kib = done.stdout.split()
            print(f"{way:>10}: {int(count):,} ids, {float(seconds):.1f} s, {int(rss_kib) / 1024:.0f} MiB peak RSS")


if __name__ == "__main__":
    main()
