"""Plan benchmark: time and driver peak RSS of ``anyclf-ray plan`` as the row count grows.

    python bench/plan.py                      # 100k, 1M and 10M rows, 20 labels
    python bench/plan.py --rows 1000000 10000000 --labels 20
    python bench/plan.py --rows 1000000 --max-labels 3   # multi-label: 1 to 3 labels a text

Each size runs in a fresh process (the CLI, as a user runs it), which reports its own wall time
and peak RSS; the ratio between the two largest sizes is the growth the issue bounds (1.2x).
The baseline row is a 2,000-row plan: what importing the package and its libraries costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Small, yet enough for a multi-label plan's floors (20 labels, 190 pairs, 5 rows each).
BASELINE_ROWS = 2_000
CHILD = """
import resource, sys, time
started = time.perf_counter()
from anyclf_ray import cli
code = cli.main(["plan", "--json", "--config", sys.argv[1]])
print("FIGURES", time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def spec(rows: int, labels: int, max_labels: int | None) -> dict:
    found = {
        "instruction": "classify a news article's topic",
        "labels": [{"id": f"t{i}", "desc": f"topic number {i}"} for i in range(labels)],
        "n_record_to_generate": rows,
        "model": {"name": "Qwen/Qwen2.5-7B-Instruct"},
        "engine": {"replicas": 8},
    }
    if max_labels:  # the stages that read one label a row are off
        found.update(multi_label={"enabled": True, "min_labels": 1, "max_labels": max_labels},
                     label_check={"enabled": False}, diversity={"enabled": False})
    return found


def measure(rows: int, labels: int, max_labels: int | None, folder: Path) -> dict:
    path = folder / f"spec-{rows}.yaml"
    path.write_text(json.dumps(spec(rows, labels, max_labels)))  # JSON is YAML
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    plan = json.loads(done.stdout)
    seconds, rss_kib = done.stderr.strip().splitlines()[-1].split()[1:]
    return {"rows": rows, "seconds": float(seconds), "rss_mib": int(rss_kib) / 1024,
            "leaves": plan["leaves"], "requests": plan["requests"]["total"],
            "label_sets": plan["rows"].get("label_sets")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--labels", type=int, default=20)
    parser.add_argument("--max-labels", type=int, help="plan a multi-label run of 1 to this many labels a text")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        found = [measure(rows, args.labels, args.max_labels, Path(folder)) for rows in [BASELINE_ROWS, *args.rows]]
    print(f"{'rows':>12} {'label sets':>10} {'leaves':>9} {'requests':>10} {'seconds':>8} {'peak RSS':>10}")
    for row in found:
        print(f"{row['rows']:>12,} {row['label_sets'] or '-':>10} {row['leaves']:>9,} {row['requests']:>10,} "
              f"{row['seconds']:>8.2f} {row['rss_mib']:>6.0f} MiB")
    last, before = found[-1], found[-2]
    print(f"peak RSS {before['rows']:,} -> {last['rows']:,} rows: {last['rss_mib'] / before['rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
