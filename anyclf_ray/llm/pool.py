"""The engine pool: a run's LLM replicas, started once and shared by every LLM pass.

In: the model, engine and sampling settings (or any picklable factory of an ``engine.Engine``);
then, per pass, a Ray Dataset of requests. Out: the Dataset with its answers
(``engine.RESULT_FIELDS``), lazily; and the pool's figures for the manifest: engine starts, the
seconds spent starting, the requests each pass answered and, for an endpoint, its HTTP traffic.

Replicas are long-lived Ray actors (``Replica``), one engine each: a vLLM engine placed on
``engine.device`` (tensor-parallel replicas in a placement group of GPU bundles), or, with
``engine.kind: openai``, an HTTP client of the endpoint (``endpoint.py``) on a fraction of a CPU.
Named actors a run owns were chosen over a Ray Serve deployment: the same start-once reuse,
without Serve's controller and proxies taking cores from the engines, and with Ray's actor
restarts as the fault tolerance.

A pass streams through ``map_batches`` into a few ``PoolClient`` actors that reserve no CPU, on
the driver's node: each splits its batch evenly across the replicas and waits for the parts, so
every replica has the next part queued while it answers one, and Ray Data's backpressure still
bounds what is in flight. A replica that dies is restarted by Ray (up to ``engine.restarts``
times) and the call it was running is retried on the new one, so its requests are answered
once, never lost or duplicated. A ``Monitor`` actor, on the driver's node, counts engine starts
and answered requests; a pass given its ``total`` fails with ``EarlyStop`` once most of its
first ``EARLY_STOP_WINDOW`` answers failed, and ``run_pass`` can hand its counts to a ``report``
at a steady interval (``Watcher``, used for ``progress.py``'s status).
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from anyclf_ray.core import runtime
from anyclf_ray.core.config import EngineSpec, ModelSpec, SamplingSpec
from anyclf_ray.core.results import EngineFigures, HttpFigures
from anyclf_ray.llm import endpoint
from anyclf_ray.llm import engine as engines

log = logging.getLogger(__name__)

# Every Ray node carries its id as this label (Ray's label scheduling).
NODE_ID_LABEL = "ray.io/node-id"
# Client actors per pass: one batch being answered while the next waits on the replicas.
CLIENTS = 2
EARLY_STOP_WINDOW = 64
EARLY_STOP_RATE = 0.5


class EarlyStop(RuntimeError):
    """A pass whose first answers mostly failed was stopped; ``str()`` is the line to show."""


class Monitor:
    """Counts engine starts and each pass's answers; judges early stops."""

    def __init__(self) -> None:
        self.starts: list[dict] = []
        self.passes: dict[str, dict] = {}
        self.http: HttpFigures | None = None

    def started(self, replica: int, seconds: float, restarted: bool) -> None:
        self.starts.append({"replica": replica, "seconds": round(seconds, 3), "restarted": restarted})

    def answered(self, name: str, ok: int, errors: list[str], items: int, total: int | None) -> str | None:
        """Count a batch of answers (``items``: what the good ones hold) of a pass of ``total``
        requests (None: never stopped early); the reason to stop the pass, if it should stop."""
        state = self.passes.setdefault(
            name, {"requests": 0, "failed": 0, "items": 0, "errors": collections.Counter(), "stop": None})
        state["requests"] += ok + len(errors)
        state["failed"] += len(errors)
        state["items"] += items
        state["errors"].update(errors)
        # One verdict per pass, on its first EARLY_STOP_WINDOW answers (or the first batch past
        # them), and only while requests remain: a pass that is done is reported, not stopped.
        if total and state["stop"] is None and EARLY_STOP_WINDOW <= state["requests"] < total:
            bad = state["failed"] > EARLY_STOP_RATE * state["requests"]
            state["stop"] = (
                f"{state['failed']} of the first {state['requests']} requests failed "
                f"(most often: {state['errors'].most_common(1)[0][0]})" if bad else ""
            )
        return state["stop"] or None

    def sent(self, traffic: endpoint.Traffic) -> None:
        """Count an endpoint engine's HTTP traffic."""
        found = self.http or HttpFigures()
        retried = collections.Counter(found.retried) + traffic.retried
        self.http = HttpFigures(sent=found.sent + traffic.sent, retried=dict(sorted(retried.items())),
                                unanswered=found.unanswered + traffic.unanswered)

    def figures(self) -> dict[str, Any]:
        return {
            "starts": list(self.starts),
            "passes": {name: {"requests": s["requests"], "failed": s["failed"]} for name, s in self.passes.items()},
            "http": self.http,
        }

    def progress(self, name: str) -> dict:
        """Requests answered and failed so far in pass ``name``, and the items answered."""
        state = self.passes.get(name, {"requests": 0, "failed": 0, "items": 0})
        return {key: state[key] for key in ("requests", "failed", "items")}

    def stop_reason(self, name: str) -> str | None:
        return (self.passes.get(name) or {}).get("stop") or None


class Replica:
    """One engine in a long-lived actor; answers tables of requests (retries included).

    Actors are passed to each other by name, never by handle: a restarted actor is rebuilt from
    its constructor arguments, and handles among them would tie that to objects Ray may release.
    """

    def __init__(self, index: int, factory: Callable[[], engines.Engine], sampling: SamplingSpec, monitor: str):
        started = time.perf_counter()
        self.engine = factory()
        self.sampling = sampling
        self.monitor = ray.get_actor(monitor)
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        ray.get(self.monitor.started.remote(index, time.perf_counter() - started, restarted))

    def ready(self) -> bool:
        return True

    def answer(self, requests: pa.Table) -> pa.Table:
        answered = engines.answer(self.engine, requests, self.sampling)
        if isinstance(self.engine, endpoint.EndpointEngine):
            # Awaited: the pass's figures are read once its last answer is in.
            ray.get(self.monitor.sent.remote(self.engine.traffic()))
        return answered


class PoolClient:
    """Ray Data callable class: a batch of requests → answered, split across all replicas."""

    def __init__(self, replicas: list[str], monitor: str, name: str, total: int | None):
        self.replicas = [ray.get_actor(replica) for replica in replicas]
        self.monitor, self.name, self.total = ray.get_actor(monitor), name, total

    def __call__(self, batch: pa.Table) -> pa.Table:
        bounds = np.linspace(0, batch.num_rows, min(len(self.replicas), batch.num_rows) + 1).astype(int)
        parts = [
            replica.answer.remote(batch.slice(start, end - start))
            for replica, start, end in zip(self.replicas, bounds[:-1], bounds[1:])
        ]
        answered = pa.concat_tables(ray.get(parts))
        ok = answered["ok"].to_pylist()
        errors = [e for e, good in zip(answered["error"].to_pylist(), ok) if not good]
        items = sum(len(found) for found, good in zip(answered["items"].to_pylist(), ok) if good)
        verdict: ray.ObjectRef = self.monitor.answered.remote(self.name, sum(ok), errors, items, self.total)
        reason = cast("str | None", ray.get(verdict))
        if reason:
            raise EarlyStop(f"{self.name}: stopped early: {reason}")
        return answered


class Watcher:
    """A driver thread calling ``report(progress)`` on a pass every ``interval`` seconds, and
    once more when stopped."""

    def __init__(self, monitor, name: str, report: Callable[[dict], None], interval: float):
        self.monitor, self.name, self.report, self.interval = monitor, name, report, interval
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"watch-{name}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.wait(self.interval):
            self._report()

    def _report(self) -> None:
        try:
            self.report(ray.get(self.monitor.progress.remote(self.name)))
        except Exception as error:  # a report that fails (S3 briefly away) must not stop the pass
            log.warning("%s: progress report failed: %s", self.name, error)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self._report()


def vllm_factory(model: ModelSpec, engine: EngineSpec, sampling: SamplingSpec) -> Callable[[], engines.Engine]:
    return functools.partial(engines.VLLMEngine, model, engine, sampling)


def endpoint_factory(model: ModelSpec, engine: EngineSpec, sampling: SamplingSpec) -> Callable[[], engines.Engine]:
    """Replicas' clients of the endpoint; the API key is read here, on the driver (``endpoint.api_key``)."""
    return functools.partial(endpoint.EndpointEngine, model, engine, sampling, endpoint.api_key(engine))


class EnginePool:
    """The replicas of one run. ``with EnginePool(...) as pool:`` starts them once, then any
    number of passes (``answer``, ``answer_table``) share them until the block ends."""

    def __init__(self, engine: EngineSpec, sampling: SamplingSpec, factory: Callable[[], engines.Engine]):
        if engine.device not in ("cpu", "cuda"):
            raise ValueError("device must be resolved (runtime.resolve_engine) before engines are placed")
        self.engine, self.sampling, self.factory = engine, sampling, factory
        self.replicas: list = []
        self.monitor: Any = None  # the Monitor actor's handle, once started
        self.start_wall_seconds = 0.0
        self.names: list[str] = []
        self.monitor_name = ""

    def _actor_options(self, index: int) -> dict[str, Any]:
        options: dict[str, Any] = {
            "num_cpus": self.engine.cpus_per_replica,
            "runtime_env": {"env_vars": engines.engine_env(self.engine)},
            "max_restarts": self.engine.restarts,
            "max_task_retries": -1,  # a call on a replica that died runs again on its replacement
            "name": self.names[index],
            "resources": self.engine.resources,
        }
        tp = self.engine.tensor_parallel_size
        if self.engine.device == "cuda" and tp > 1:
            # vLLM starts one Ray worker per GPU shard; they join this replica's placement group.
            shard = {"GPU": 1, "CPU": 1, **{name: amount / tp for name, amount in self.engine.resources.items()}}
            group = ray.util.placement_group([shard] * tp, strategy="STRICT_PACK")
            options.update(
                num_cpus=0, num_gpus=0, resources={},
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True),
            )
        elif self.engine.device == "cuda":
            options["num_gpus"] = 1
        return options

    def start(self) -> EnginePool:
        if self.replicas:
            return self
        started = time.perf_counter()
        prefix = f"anyclf-{uuid.uuid4().hex[:12]}"  # named, so actors find each other by name
        self.names = [f"{prefix}-engine-{i}" for i in range(self.engine.replicas)]
        self.monitor_name = f"{prefix}-monitor"
        # On the driver's node: a run outlives the loss of any other node, and only this actor
        # holds counts that a restart would lose.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        monitor_class = ray.remote(num_cpus=0)(Monitor)
        self.monitor = monitor_class.options(name=self.monitor_name, scheduling_strategy=here).remote()
        replica_class = ray.remote(Replica)
        self.replicas = [
            replica_class.options(**self._actor_options(i)).remote(i, self.factory, self.sampling, self.monitor_name)
            for i in range(self.engine.replicas)
        ]
        ray.get([replica.ready.remote() for replica in self.replicas])
        self.start_wall_seconds = time.perf_counter() - started
        log.info("engines: %d replica(s) ready in %.1f s", len(self.replicas), self.start_wall_seconds)
        return self

    def close(self) -> None:
        for actor in [*self.replicas, self.monitor]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.replicas, self.monitor = [], None

    def __enter__(self) -> EnginePool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def answer(self, requests: ray.data.Dataset, name: str, batch_size: int | None = None,
               total: int | None = None) -> ray.data.Dataset:
        """``requests`` answered by the replicas (lazy), ``batch_size`` requests at a time (default:
        ``engine.batch_size`` per replica); given the pass's ``total`` requests, it may stop early.
        Consume it through ``run_pass``."""
        return requests.map_batches(
            PoolClient,
            fn_constructor_kwargs={"replicas": self.names, "monitor": self.monitor_name, "name": name, "total": total},
            batch_size=batch_size or self.engine.batch_size * len(self.replicas),
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=CLIENTS),
            num_cpus=0,
            # Beside the monitor, on the driver's node: answered batches wait there for their
            # writer, so a lost node takes none with it to be asked again, only calls in flight.
            label_selector={NODE_ID_LABEL: ray.get_runtime_context().get_node_id()},
        )

    def run_pass(self, name: str, consume: Callable[[], Any], report: Callable[[dict], None] | None = None,
                 interval: float = 30.0) -> Any:
        """Run ``consume()`` (which executes a Dataset from ``answer``); an early stop becomes
        ``EarlyStop``. ``report`` is called with the pass's ``Monitor.progress`` every ``interval``
        seconds while it runs, from another thread, and once at the end."""
        watcher = Watcher(self.monitor, name, report, interval) if report else None
        try:
            return consume()
        except Exception:
            reason = ray.get(self.monitor.stop_reason.remote(name))
            if reason:
                raise EarlyStop(f"{name}: stopped early: {reason}") from None
            raise
        finally:
            if watcher:
                watcher.stop()

    def answer_table(self, requests: pa.Table, name: str) -> pa.Table:
        """A small pass (a tree level) answered and collected on the driver."""
        dataset = self.answer(self.requests_dataset(requests), name)
        return self.run_pass(name, lambda: pa.concat_tables(ray.get(dataset.to_arrow_refs())))

    def requests_dataset(self, requests: pa.Table) -> ray.data.Dataset:
        return runtime.blocks_dataset(requests, self.engine.batch_size, self.engine.replicas)

    def figures(self) -> EngineFigures:
        """Engine starts (first starts and replacements) and the time they took, per replica."""
        found = ray.get(self.monitor.figures.remote())
        starts = found["starts"]
        return EngineFigures(
            replicas=len(self.replicas), device=self.engine.device, threads_per_replica=self.engine.threads,
            starts=len(starts), restarts=sum(s["restarted"] for s in starts),
            start_seconds=round(sum(s["seconds"] for s in starts), 3),
            start_wall_seconds=round(self.start_wall_seconds, 3), passes=found["passes"], kind=self.engine.kind,
            http=found["http"],
        )
