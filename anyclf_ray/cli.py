"""``anyclf-ray``: the command line.

``anyclf-ray COMMAND --config FILE [--set key=value ...] [--address ADDR]`` runs one job of a run
on an embedded local Ray, or on the cluster at ``--address`` / ``RAY_ADDRESS``: ``generate``
writes the synthetic data, ``dedup`` removes its duplicates, ``train`` trains and evaluates a
SetFit classifier, ``run`` chains all three. ``anyclf-ray predict --model DIR --input FILE
--output DIR`` labels a table with a trained model.

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
ADDRESS_HELP = "Ray cluster address (default: RAY_ADDRESS, else embedded)"


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


def _report_train(manifest: dict) -> int:
    scores = ", ".join(f"{split} accuracy {m['accuracy']:.3f} macro-F1 {m['macro_f1']:.3f}"
                       for split, m in manifest["metrics"].items())
    print(f"anyclf-ray: trained on {manifest['data']['train_rows']} rows: {manifest['model']} ({scores or 'no evaluation rows'})")
    return 0


def _report_run(stages: dict) -> int:
    codes = [REPORTS[name](manifest) for name, manifest in stages.items()]
    return max(codes)


REPORTS = {"generate": _report_generate, "dedup": _report_dedup, "train": _report_train}

# command → (help, job, report); every job takes a JobSpec and an optional Ray address.
COMMANDS = {
    "generate": ("generate a synthetic labelled dataset", pipeline.run_generate, _report_generate),
    "dedup": ("remove exact and near-duplicate rows of a generated run", pipeline.run_dedup, _report_dedup),
    "train": ("train and evaluate a SetFit classifier on a run's data", pipeline.run_train, _report_train),
    "run": ("the whole job: generate, dedup, train and evaluate", pipeline.run_all, _report_run),
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
        command.add_argument("--address", help=ADDRESS_HELP)
    predict = commands.add_parser("predict", help="predict labels for a Parquet/CSV/JSONL input with a trained model")
    predict.add_argument("--model", required=True, help="a trained model folder, e.g. runs/<run_id>/model")
    predict.add_argument("--input", required=True, help="Parquet, CSV or JSONL file (or Parquet folder), local or s3://")
    predict.add_argument("--output", required=True, help="a new folder for the Parquet predictions, local or s3://")
    predict.add_argument("--text-column", default="text")
    predict.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    predict.add_argument("--replicas", type=int, default=1)
    predict.add_argument("--cpus-per-replica", type=float, default=1.0)
    predict.add_argument("--address", help=ADDRESS_HELP)
    return parser


def _predict(args) -> int:
    from anyclf_ray import predict, runtime
    from anyclf_ray.config import ActorPlacement

    paths = predict.check(args.model, args.input, args.output)
    runtime.connect(args.address)
    placement = runtime.resolve_placement(
        ActorPlacement(device=args.device, replicas=args.replicas, cpus_per_replica=args.cpus_per_replica), "predict"
    )
    rows = predict.predict(paths, args.text_column, placement)
    print(f"anyclf-ray: wrote {rows} prediction(s) to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="anyclf-ray: %(message)s")
    try:
        if args.command == "predict":
            return _predict(args)
        _, job, report = COMMANDS[args.command]
        manifest = job(config.load(args.config, args.overrides), address=args.address)
    except config.ConfigError as error:
        print(f"anyclf-ray: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return report(manifest)


if __name__ == "__main__":
    sys.exit(main())
