"""``anyclf-ray``: the command line.

``anyclf-ray generate --config FILE [--set key=value ...] [--address ADDR]`` runs the generate job
on an embedded local Ray, or on the cluster at ``--address`` / ``RAY_ADDRESS``.

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anyclf-ray", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate a synthetic labelled dataset")
    generate.add_argument("--config", required=True, help="job spec YAML file")
    generate.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one field, e.g. --set engine.replicas=2 (repeatable)",
    )
    generate.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="anyclf-ray: %(message)s")
    try:
        spec = config.load(args.config, args.overrides)
        manifest = pipeline.run_generate(spec, address=args.address)
    except config.ConfigError as error:
        print(f"anyclf-ray: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    rows, failures = manifest["rows"], manifest["failures"]
    print(
        f"anyclf-ray: {manifest['status']}: {rows['written']} of {rows['expected']} rows at "
        f"{manifest['output']} ({failures['requests']} failed request(s), {failures['rows_lost']} rows lost)"
    )
    return 0 if manifest["status"] == "complete" else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
