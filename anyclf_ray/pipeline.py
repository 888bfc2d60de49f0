"""The run: the spec's stages, checked first, then run in order on one engine pool.

In: a validated ``JobSpec`` and, optionally, the one stage to run. Out: the run folder
``<output>/<run_id>/`` and every stage's manifest.

``stages(spec)`` is the list ``STAGES`` filtered by what the spec enables; each stage's
fingerprint is chained from the one before it. Before Ray starts, the output is checked
writable and every stage's ``check`` runs, so a bad eval set or model fails in a second, not
after the LLM has run. Stages whose output for their fingerprint is committed are skipped. The
LLM replicas start once, when the first LLM pass needs them, serve every later pass, and are
released after the last stage that uses them, before training takes the cores.
"""

from __future__ import annotations

import logging

from anyclf_ray.core import runtime
from anyclf_ray.core.config import JobSpec
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.core.stage import Context, Stage
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.filters.dedup import Dedup
from anyclf_ray.filters.label_check import LabelCheck
from anyclf_ray.filters.language_check import LanguageCheck
from anyclf_ray.llm import budgets
from anyclf_ray.llm.pool import EnginePool, vllm_factory
from anyclf_ray.reports.diversity import Diversity
from anyclf_ray.sources import estimate
from anyclf_ray.sources.generate import Generate
from anyclf_ray.training.train import Train

log = logging.getLogger(__name__)

# Every stage in run order; the spec enables them. A new stage is one module and one entry here.
STAGES: list[type[Stage]] = [Generate, LanguageCheck, LabelCheck, Dedup, Diversity, Train]


def stages(spec: JobSpec) -> list[Stage]:
    return [cls(spec) for cls in STAGES if cls.enabled(spec)]


def chain(plan: list[Stage]) -> tuple[dict[str, str], dict[str, Stage | None]]:
    """Each stage's fingerprint and input: the last stage before it that is not a report."""
    fingerprints, inputs, source = {}, {}, None
    for stage in plan:
        inputs[stage.name] = source
        fingerprints[stage.name] = stage.fingerprint(fingerprints[source.name] if source else None)
        source = source if stage.report_only else stage
    return fingerprints, inputs


def start_engines(spec: JobSpec, factory=None) -> EnginePool:
    """The run's engine pool, placed on what the cluster has, started."""
    engine = runtime.resolve_engine(spec.engine)
    log.info("engines: %d replica(s) of %s on %s, %s thread(s) each", engine.replicas, spec.model.name,
             engine.device, engine.threads or "GPU")
    return EnginePool(engine, spec.sampling, factory or vllm_factory(spec.model, engine, spec.sampling)).start()


def run(spec: JobSpec, only: str | None = None, address: str | None = None, verbose: bool = False,
        engine_factory=None, retry_failures: bool = False) -> dict[str, dict]:
    """Run the spec's stages (or ``only`` the one named, whose input must be committed); each
    stage's manifest by name. ``retry_failures`` asks again for the LLM requests that failed in
    a finished generation (and redoes the stages after it). ``engine_factory`` replaces vLLM (tests)."""
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
    estimate.estimate(spec)  # refuses a plan that leaves a label without the rows it needs
    budgets.check(spec)
    for stage in plan:  # every section, whichever stage runs: a bad one fails now, not in a later command
        stage.check(location)
    done: dict[str, dict | None] = {}
    for stage in plan:  # in order: a stage is done only on its input as committed now
        source = inputs[stage.name]
        done[stage.name] = stage.done(location, fingerprints[stage.name], done[source.name] if source else None)
        if done[stage.name] and retry_failures and stage in targets and stage.retries(done[stage.name]):
            log.info("%s: retrying its failed requests", stage.name)
            done[stage.name] = None
    first = plan.index(targets[0])
    before = inputs[targets[0].name]
    if before and not done[before.name]:
        raise ConfigError(
            f"run_id: {location.run_id!r} has no finished {before.name} stage for this spec; "
            f"run `anyclf-ray {before.name.replace('_', '-')}` (or `anyclf-ray run`) first"
        )

    ctx = Context(spec, location, lambda: start_engines(spec, engine_factory), retry_failures=retry_failures,
                  finished=[(stage, done[stage.name]) for stage in plan[:first] if done[stage.name]])
    last_llm = max((i for i, stage in enumerate(plan) if stage.uses_llm and not done[stage.name]), default=-1)
    manifests = {}
    try:
        for stage in targets:
            found = done[stage.name]
            if found:
                log.info("%s: already complete for this input and these settings; skipped", stage.name)
            else:
                runtime.connect(address, verbose)
                log.info("%s: running", stage.name)
                source = inputs[stage.name]
                found = stage.run(ctx, done[source.name] if source else None, fingerprints[stage.name])
                done[stage.name] = found
            if plan.index(stage) >= last_llm:
                ctx.close_engines()  # free the engines' cores for the stages after the last LLM pass
            ctx.finished.append((stage, found))
            manifests[stage.name] = found
    finally:
        ctx.close_engines()
    return manifests
