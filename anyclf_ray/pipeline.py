"""The run: the spec's stages, checked first, then run in order on one engine pool.

In: a validated ``JobSpec`` and, optionally, the one stage to run. Out: the run folder
``<output>/<run_id>/`` and every stage's result (``results.StageResult``, its manifest).

``stages(spec)`` is the list ``STAGES`` filtered by what the spec enables. The sources write the
rows of the run; the first stage after them reads every source's rows, and each later stage
reads the stage before it (a report's input is passed on). A stage's fingerprint is chained
from its input's. Before Ray starts, the output is checked writable, every enabled stage's
``check`` runs (whichever stage a command runs, so a bad section fails in a second, not after
the LLM has run) and every LLM pass's longest prompt is checked against the model's context; an
endpoint (``engine.kind: openai``) that a stage to run will ask is probed.
Stages whose output for their fingerprint is committed are skipped.
With ``rounds`` on, the rounds' stages follow (``round_stages``): each round measures the model
before it, generates for its weak spots (a source read with every earlier source) and reruns
the filters and training; the rounds stop at ``max_rounds`` or once the metric gains less than
``min_gain`` (``rounds.stages.stop``). Each round's fingerprints are chained from the round before.
The LLM replicas start once, when the first LLM pass needs them, serve every later pass, and are
released after the last stage that uses them, before training takes the cores (with rounds: once
a round, likewise). After each stage, the dataset card is written, then the stage's manifest
(last: it marks the stage done).
"""

from __future__ import annotations

import logging

from anyclf_ray.core import cards, runtime
from anyclf_ray.core.config import JobSpec
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.core.results import StageResult, WeakSpotsReport
from anyclf_ray.core.stage import Context, Input, Stage, input_fingerprint
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.filters.dedup import Dedup
from anyclf_ray.filters.label_check import LabelCheck
from anyclf_ray.filters.language_check import LanguageCheck
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.llm import budgets, endpoint
from anyclf_ray.llm.pool import EnginePool, endpoint_factory, vllm_factory
from anyclf_ray.reports.diversity import Diversity
from anyclf_ray.rounds import stages as rounds
from anyclf_ray.rounds.leak import DevLeak
from anyclf_ray.sources.annotate import Annotate
from anyclf_ray.sources.generate import Generate
from anyclf_ray.training.train import Train

log = logging.getLogger(__name__)

# Every stage in run order, sources first; the spec enables them. A new stage is one module and
# one entry here.
STAGES: list[type[Stage]] = [Generate, Annotate, DevLeak, LanguageCheck, LabelCheck, Dedup, Diversity, Train]


def round_stages(spec: JobSpec) -> list[type[Stage]]:
    """The rounds' stages in order (none with rounds off): round 0's measure, then per round its
    targeted source, every enabled filter, training and its measure."""
    if not spec.rounds.enabled:
        return []
    filters = [cls for cls in STAGES if cls.enabled(spec) and not cls.source and not cls.report_only
               and cls is not Train]
    found: list[type[Stage]] = [rounds.WeakSpots.in_round(0)]
    for k in range(1, spec.rounds.max_rounds + 1):
        found += [rounds.Targeted.in_round(k), *(cls.in_round(k) for cls in filters), Train.in_round(k),
                  rounds.WeakSpots.in_round(k)]
    return found


def stages(spec: JobSpec) -> list[Stage]:
    return [cls(spec) for cls in STAGES if cls.enabled(spec)] + [cls(spec) for cls in round_stages(spec)]


def chain(plan: list[Stage]) -> tuple[dict[str, str], dict[str, list[Stage]]]:
    """Each stage's fingerprint and inputs: every source so far for the first stage after them
    (a later round's source reads the stage before it, its round's measure), then the last stage
    before it that is not a report."""
    fingerprints: dict[str, str] = {}
    inputs: dict[str, list[Stage]] = {}
    sources: list[Stage] = []
    rows_of: list[Stage] = [stage for stage in plan if stage.source and not stage.round]
    for stage in plan:
        if stage.source:
            inputs[stage.name] = list(rows_of) if stage.round else []
            sources.append(stage)
            rows_of = list(sources) if stage.round else rows_of
        else:
            inputs[stage.name] = list(rows_of)
        upstream = input_fingerprint([fingerprints[source.name] for source in inputs[stage.name]])
        fingerprints[stage.name] = stage.fingerprint(upstream)
        if not stage.source and not stage.report_only:
            rows_of = [stage]
    return fingerprints, inputs


def longest_requests(plan: list[Stage]) -> dict:
    """Every LLM pass of the stages, with its longest requests, by pass name."""
    return {name: requests for stage in plan for name, requests in stage.longest_requests().items()}


def start_engines(spec: JobSpec, factory=None) -> EnginePool:
    """The run's engine pool, placed on what the cluster has, started."""
    engine = runtime.resolve_engine(spec.engine)
    if engine.kind == "openai":
        log.info("engines: %d client(s) of %s at %s, %d request(s) in flight at most", engine.replicas,
                 spec.model.name, engine.base_url, engine.max_concurrency // engine.replicas * engine.replicas)
        factory = factory or endpoint_factory(spec.model, engine, spec.sampling)
    else:
        log.info("engines: %d replica(s) of %s on %s, %s thread(s) each", engine.replicas, spec.model.name,
                 engine.device, engine.threads or "GPU")
    return EnginePool(engine, spec.sampling, factory or vllm_factory(spec.model, engine, spec.sampling)).start()


def run(spec: JobSpec, only: str | None = None, address: str | None = None, verbose: bool = False,
        engine_factory=None, retry_failures: bool = False) -> dict[str, StageResult]:
    """Run the spec's stages (or ``only`` the one named, whose input must be committed); each
    stage's result by name. ``retry_failures`` asks again for the LLM requests that failed in a
    finished source, or the rows a check could not judge (and redoes the stages after it).
    ``engine_factory`` replaces vLLM (tests)."""
    location = RunLocation(spec.output, spec.resolved_run_id())
    plan = stages(spec)
    names = [stage.name for stage in plan]
    if only is not None and only not in names:
        raise ConfigError(f"{only}.enabled: the {only} stage is off in this spec; set {only}.enabled: true")
    targets = plan if only is None else [plan[names.index(only)]]
    location.check_writable()
    for warning in spec.warnings():
        log.warning("warning: %s", warning)
    fingerprints, inputs = chain(plan)
    # Every section, whichever stage runs: a bad one fails now, not in a later command.
    checked = {stage.name: stage.check(location) for stage in plan}
    budgets.check(spec, longest_requests(plan))
    done: dict[str, StageResult | None] = {}

    def committed(stage: Stage) -> Input | None:
        """What ``stage`` reads as committed now; None for a source, or while any input is unfinished."""
        found = [done[source.name] for source in inputs[stage.name]]
        return Input([result for result in found if result]) if found and all(found) else None

    for stage in plan:  # in order: a stage is done only on its input as committed now
        upstream = committed(stage)
        result = (stage.done(location, fingerprints[stage.name], upstream)
                  if stage.source or upstream else None)
        if result and retry_failures and stage in targets and stage.retries(result):
            log.info("%s: retrying what it could not do", stage.name)
            result = None
        done[stage.name] = result
    first = plan.index(targets[0])
    missing = [source for source in inputs[targets[0].name] if not done[source.name]]
    if missing:
        raise ConfigError(
            f"run_id: {location.run_id!r} has no finished {missing[0].name} stage for this spec; "
            f"run `anyclf-ray {missing[0].command}` (or `anyclf-ray run`) first"
        )

    if spec.engine.kind == "openai" and any(stage.uses_llm and not done[stage.name] for stage in targets):
        endpoint.check(spec.model, spec.engine)  # a wrong URL, key or model name fails now, not in a replica
    finished = [(stage, result) for stage in plan[:first] if (result := done[stage.name])]
    ctx = Context(spec, location, lambda: start_engines(spec, engine_factory), retry_failures=retry_failures,
                  finished=[result for _, result in finished])
    # Per round: the engines are released after its last LLM stage (before training takes the
    # cores) and started again by the next round's generation.
    last_llm = {k: max((i for i, stage in enumerate(plan) if stage.round == k and stage.uses_llm
                        and not done[stage.name]), default=-1) for k in {stage.round for stage in plan}}
    found_by_name: dict[str, StageResult] = {}
    log.info("run %s at %s", location.run_id, location.uri())  # every check passed; the stages name folders in it
    try:
        for stage in targets:
            result = done[stage.name]
            if stage.source and stage.round and only is None:
                reason = rounds.stop(spec.rounds, [found.report for found in ctx.finished
                                                   if isinstance(found.report, WeakSpotsReport)])
                if reason:
                    log.info("rounds: no round %d: %s", stage.round, reason)
                    break
            if result:
                log.info("%s: already %s for this input and these settings%s; skipped", stage.name,
                         "finished" if result.complete else "finished, incomplete",
                         "; nothing of it can be asked again" if retry_failures and not result.complete else "")
            else:
                runtime.connect(address, verbose)
                log.info("%s: running", stage.name)
                ctx.last_llm_stage = plan.index(stage) >= last_llm[stage.round]
                result = stage.run(ctx, committed(stage), fingerprints[stage.name], checked[stage.name])
                card = cards.dataset_card(spec, location.run_id, [*finished, (stage, result)],
                                          scheme(spec).columns_text)
                location.write_bytes("README.md", card.encode())
                stage.commit(location, result)
                done[stage.name] = result
            if plan.index(stage) >= last_llm[stage.round]:
                ctx.close_engines()  # free the engines' cores for the stages after the last LLM pass
            ctx.finished.append(result)
            finished.append((stage, result))
            found_by_name[stage.name] = result
    finally:
        ctx.close_engines()
    return found_by_name
