"""``anyclf-ray``: the command line.

``anyclf-ray COMMAND --config FILE [--set key=value ...] [--address ADDR]`` runs one job of a run
on an embedded local Ray, or on the cluster at ``--address`` / ``RAY_ADDRESS``: ``generate``
writes the synthetic data, ``dedup`` removes its duplicates.

Exit codes: 0 the run is complete; 2 bad input (one line on stderr naming the field and the fix,
before any model is loaded); 3 the run finished but LLM failures left rows missing (counted in the
manifest, listed under ``failures/``); 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys

from anyclf_ray import config, pipeline

EXIT_BAD_INPUT = 2
EXIT_INCOMPLETE = 3


def _report_generate(manifest: dict) -> int:
    rows, failures = manifest["rows"], manifest["failures"]
    print(
        f"anyclf-ray: {manifest['status']}: {rows['written']} of {rows['expected']} rows at "
        f"{manifest['output']} ({failures['requests']} failed request(s), {failures['rows_lost']} rows lost)"
    )
    return 0 if manifest["status"] == "complete" else EXIT_INCOMPLETE


def _report_dedup(manifest: dict) -> int:
    rows, reasons = manifest["rows"], manifest["removed"]["by_reason"]
    print(
        f"anyclf-ray: dedup complete: kept {rows['kept']} of {rows['input']} rows at {manifest['output']} "
        f"(removed {', '.join(f'{n} {reason}' for reason, n in reasons.items())})"
    )
    return 0


# command → (help, job, report); every job takes a JobSpec and an optional Ray address.
COMMANDS = {
    "generate": ("generate a synthetic labelled dataset", pipeline.run_generate, _report_generate),
    "dedup": ("remove exact and near-duplicate rows of a generated run", pipeline.run_dedup, _report_dedup),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anyclf-ray", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _, _) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", required=True, help="job spec YAML file")
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override one field, e.g. --set engine.replicas=2 (repeatable)",
        )
        command.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="anyclf-ray: %(message)s")
    _, job, report = COMMANDS[args.command]
    try:
        spec = config.load(args.config, args.overrides)
        manifest = job(spec, address=args.address)
    except config.ConfigError as error:
        print(f"anyclf-ray: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return report(manifest)


if __name__ == "__main__":
    sys.exit(main())
