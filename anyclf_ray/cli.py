"""``anyclf-ray``: the command line.

``anyclf-ray COMMAND --config FILE [--set key=value ...] [--address ADDR]`` runs one job of a run
on an embedded local Ray, or on the cluster at ``--address`` / ``RAY_ADDRESS``: ``generate``
writes the synthetic data, ``label-check`` removes rows that do not say what their label says,
``dedup`` removes duplicates, ``diversity`` reports on the rows kept, ``train`` trains and
evaluates a SetFit classifier, ``run`` chains every stage the spec enables. ``anyclf-ray plan
--config FILE [--tokens-per-second N]`` prints what a spec will generate (and annotate) and cost, with no LLM
time, as a table (``--json``: as JSON). ``anyclf-ray schema`` prints the job spec's JSON Schema,
for editors. ``anyclf-ray predict --model DIR --input FILE --output DIR`` labels a table with a
trained model. ``anyclf-ray push RUN --repo OWNER/NAME [--model-repo OWNER/NAME] [--private]``
publishes a finished run's dataset (and model) on the Hugging Face Hub.

Exit codes: 0 the run is complete; 2 bad input (one line on stderr naming the field and the fix,
before any model is loaded); 3 the run finished but LLM failures left rows missing (counted in the
manifest, listed under ``failures/``); 4 stopped early because most of the first answers failed;
1 anything else. ``--retry-failures`` (generate, run) asks again for the generation requests that
failed in a finished run, and redoes the stages after it. ``--verbose`` shows engine and worker
logs, which otherwise go to Ray's log folder (named on the console).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from anyclf_ray import pipeline
from anyclf_ray.core import loading
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.llm.pool import EarlyStop

EXIT_BAD_INPUT = 2
EXIT_INCOMPLETE = 3
EXIT_STOPPED = 4
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)
ADDRESS_HELP = "Ray cluster address (default: RAY_ADDRESS, else embedded)"

# command → (help, the one stage it runs, or None for all of them)
COMMANDS = {
    "generate": ("generate a synthetic labelled dataset (tree, then examples)", "generate"),
    "annotate": ("label the texts of the annotate section with the LLM's calibrated judgement", "annotate"),
    "dev-leak": ("remove rows that copy a text of rounds.dev_set (rounds with a dev set)", "dev_leak"),
    "language-check": ("remove rows not written in the language they were asked in", "language_check"),
    "label-check": ("remove (or flag) rows whose text does not say what their label says", "label_check"),
    "dedup": ("remove exact and near-duplicate rows of what the last stage kept", "dedup"),
    "diversity": ("report the kept rows' diversity per label, with plots", "diversity"),
    "train": ("train and evaluate a SetFit classifier on what the last stage kept", "train"),
    "run": ("the whole job: every stage the spec enables, on one engine pool", None),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anyclf-ray", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", required=True, help="job spec YAML file")
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override one field, e.g. --set engine.replicas=2 (repeatable)",
        )
        command.add_argument("--address", help=ADDRESS_HELP)
        command.add_argument("--verbose", action="store_true", help="show engine and worker logs on the console")
        if name in ("generate", "run"):
            command.add_argument("--retry-failures", action="store_true",
                                 help="ask again for what failed in this run: the generation requests that failed, "
                                      "the rows a check could not judge (and redo the stages after them)")
    planned = commands.add_parser(
        "plan", help="print the plan of a spec (requests, rows, tokens, time), spending no LLM time")
    planned.add_argument("--config", required=True, help="job spec YAML file")
    planned.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    planned.add_argument("--tokens-per-second", type=float, help="tokens one replica decodes per second, for the time")
    planned.add_argument("--prompt-tokens-per-second", type=float,
                         help="prompt tokens one replica reads per second, for annotation's time")
    planned.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    commands.add_parser("schema", help="print the job spec's JSON Schema, for editors' completion and checks")
    predict = commands.add_parser("predict", help="predict labels for a Parquet/CSV/JSONL input with a trained model")
    predict.add_argument("--model", required=True, help="a trained model folder, e.g. runs/<run_id>/model")
    predict.add_argument("--input", required=True, help="Parquet, CSV or JSONL file (or Parquet folder), local or s3://")
    predict.add_argument("--output", required=True, help="a new folder for the Parquet predictions, local or s3://")
    predict.add_argument("--text-column", default="text")
    predict.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    predict.add_argument("--replicas", type=int, default=1)
    predict.add_argument("--cpus-per-replica", type=float, default=1.0)
    predict.add_argument("--address", help=ADDRESS_HELP)
    push = commands.add_parser(
        "push", help="publish a finished run on the Hugging Face Hub: its dataset (and model); token from HF_TOKEN")
    push.add_argument("run", metavar="RUN", help="a run folder, e.g. runs/<run_id> or s3://bucket/prefix/<run_id>")
    push.add_argument("--repo", required=True, metavar="OWNER/NAME", help="the dataset repo: card, configs, figures")
    push.add_argument("--model-repo", metavar="OWNER/NAME", help="the model repo: model/ with its model card")
    push.add_argument("--private", action="store_true", help="create new repos private (else the owner's default)")
    return parser


def _run(args) -> int:
    spec = loading.load(args.config, args.overrides)
    finished = pipeline.run(spec, only=COMMANDS[args.command][1], address=args.address, verbose=args.verbose,
                            retry_failures=getattr(args, "retry_failures", False))
    by_name = {stage.name: stage for stage in pipeline.stages(spec)}
    for name, found in finished.items():
        print(f"anyclf-ray: {by_name[name].describe(found)}")
    return 0 if all(found.complete for found in finished.values()) else EXIT_INCOMPLETE


def _plan(args) -> int:
    from anyclf_ray.llm import budgets
    from anyclf_ray.sources import estimate

    spec = loading.load(args.config, args.overrides)
    found = estimate.estimate(spec, args.tokens_per_second, args.prompt_tokens_per_second)
    stages = pipeline.stages(spec)
    location = RunLocation(spec.output, spec.resolved_run_id())
    for stage in stages:  # as every command checks them; a source's check is the plan above (metadata only)
        if not stage.source:
            stage.check(location)
    found["longest_prompt_tokens"] = budgets.check(spec, pipeline.longest_requests(stages))
    print(json.dumps(found, indent=2) if args.json else estimate.table(found))
    return 0


def _schema(args) -> int:
    print(json.dumps(loading.json_schema(), indent=2, ensure_ascii=False))
    return 0


def _predict(args) -> int:
    from anyclf_ray.core import runtime
    from anyclf_ray.core.config import ActorPlacement
    from anyclf_ray.training import predict

    paths = predict.check(args.model, args.input, args.output, args.text_column)
    runtime.connect(args.address)
    placement = runtime.resolve_placement(
        ActorPlacement(device=args.device, replicas=args.replicas, cpus_per_replica=args.cpus_per_replica), "predict"
    )
    counts = predict.predict(paths, args.text_column, placement)
    missing = f" ({counts['null_text']} row(s) without a text, predicted null)" if counts["null_text"] else ""
    print(f"anyclf-ray: wrote {counts['rows']} prediction(s) to {args.output}{missing}")
    return 0


def _push(args) -> int:
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import HfHubHTTPError

    from anyclf_ray import publish
    from anyclf_ray.core import storage

    try:
        uploaded = publish.push(storage.locate(args.run), args.repo, args.model_repo, args.private)
    except (HfHubHTTPError, ValueError) as error:  # the Hub refused (a token, a card's metadata): its words
        if isinstance(error, ValueError) and not isinstance(error.__cause__, HfHubHTTPError):
            raise
        print(f"anyclf-ray: error: the Hub refused: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except httpx2.TransportError as error:  # nothing answered; nothing was committed
        where = os.environ.get("HF_ENDPOINT") or "huggingface.co"
        print(f"anyclf-ray: error: the Hub at {where} did not answer ({type(error).__name__}: {error}); nothing "
              "was committed; check HF_ENDPOINT and the network, then push again", file=sys.stderr)
        return 1
    for (kind, repo), files in uploaded.items():
        print(f"anyclf-ray: {kind} repo {repo}: " + (f"{files} file(s) uploaded" if files else "up to date"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="anyclf-ray: %(message)s")
    try:
        return {"predict": _predict, "plan": _plan, "schema": _schema, "push": _push}.get(args.command, _run)(args)
    except loading.ConfigError as error:
        print(f"anyclf-ray: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except EarlyStop as error:
        print(f"anyclf-ray: error: {error}; committed parts are kept, fix the spec and re-run to resume",
              file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("anyclf-ray: interrupted; committed parts are kept, run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
