"""Connecting to Ray: a running cluster when one is named, else an embedded local one.

In: an optional address (``--address`` or ``RAY_ADDRESS``, which ``ray job submit`` sets).
Out: an initialised Ray, and the engine settings resolved against what the cluster has.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TypeVar

import pyarrow as pa
import ray

from anyclf_ray.core import console
from anyclf_ray.core.config import ActorPlacement, EngineSpec
from anyclf_ray.core.loading import ConfigError

Placement = TypeVar("Placement", bound=ActorPlacement)

log = logging.getLogger(__name__)

# Ray Data steps that only move bytes (making requests, writing, joining verdicts): a small CPU
# share keeps them schedulable next to busy engines.
TASK_CPUS = 0.25


def connect(address: str | None = None, verbose: bool = False) -> None:
    """Join the cluster at ``address`` (or the one ``ray start`` left on this machine), else
    start an embedded Ray; say which. Worker and engine logs reach the console only if ``verbose``."""
    if ray.is_initialized():
        return
    from ray._private.services import canonicalize_bootstrap_address

    if not verbose:
        console.quiet_loggers()
    # The address ray.init() itself would join: given, RAY_ADDRESS, or a local `ray start` cluster.
    given = address or os.environ.get("RAY_ADDRESS")
    field = "--address" if address else "RAY_ADDRESS"
    if given and given.startswith("ray://"):
        raise ConfigError(f"{field}: {given} is a Ray Client address; give the cluster's GCS address (host:6379), "
                          "or submit the job with `ray job submit`")
    found = canonicalize_bootstrap_address(given)  # type: ignore[arg-type]  # None: a local cluster, if any
    if found:
        # Probed as given: Ray rewrites a loopback host to this node's address.
        reachable(given if given and ":" in given else found, field)
        ray.init(address=found, log_to_driver=verbose)
        log.info("joined the Ray cluster at %s (%g CPUs, %g GPUs)", found, *_cores())
    else:
        ray.init(include_dashboard=False, log_to_driver=verbose)
        log.info("started an embedded local Ray (%g CPUs, %g GPUs)", *_cores())
    if not verbose:  # after Ray's own processes started, so that none of them writes through it
        console.filter_stderr(console.FALSE_ALARMS)
    log.info("engine and worker logs: %s", logs_folder())


# Seconds a cluster's GCS port may take to accept a connection before the address is refused.
PROBE_SECONDS = 5


# The start of an HTTP/2 connection and an empty SETTINGS frame: a cluster's GCS speaks gRPC, so
# it answers with a SETTINGS frame of its own (frame type 4, the fourth byte of its header).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def reachable(address: str, field: str) -> None:
    """ConfigError naming ``field`` unless a gRPC server, as a cluster's GCS is, answers at
    ``address`` (``host:port``) within ``PROBE_SECONDS``: Ray itself would retry an address
    nobody answers, or something else answers, for minutes."""
    host, _, port = address.rpartition(":")
    fix = "start one (`ray start --head`), fix the address, or leave it out for an embedded Ray"
    try:
        probe = socket.create_connection((host, int(port)), timeout=PROBE_SECONDS)
    except (OSError, ValueError):
        raise ConfigError(f"{field}: no Ray cluster answers at {address}; {fix}") from None
    with probe:
        try:
            probe.sendall(HTTP2_PREFACE)
            answer = probe.recv(9)
        except OSError:  # reset or silent: whatever listens there is not a GCS
            answer = b""
    if len(answer) < 4 or answer[3] != 4:
        raise ConfigError(f"{field}: something answers at {address}, but not a Ray cluster's GCS; {fix}")


def _cores() -> tuple[float, float]:
    resources = ray.cluster_resources()
    return resources.get("CPU", 0), resources.get("GPU", 0)


def logs_folder() -> str:
    """This driver's Ray session log folder, where engine and worker output goes."""
    from ray._private.worker import _global_node

    return _global_node.get_logs_dir_path() if _global_node else "ray logs (see `ray job logs`)"


def require(unit: str, need: float, field: str, what: str, fix: str) -> None:
    """ConfigError naming ``field`` if the cluster has fewer than ``need`` of ``unit`` in all."""
    have = ray.cluster_resources().get(unit, 0)
    if need > have:
        raise ConfigError(f"{field}: {what} need {need:g} {unit}(s) but the cluster has {have:g}; {fix}")


def resolve_placement(placement: Placement, section: str) -> Placement:
    """Pick the device for ``auto`` and check the replicas can ever be placed on this cluster."""
    device = placement.device
    if device == "auto":
        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    per_replica = placement.gpus_per_replica if device == "cuda" else placement.cpus_per_replica
    require(
        "GPU" if device == "cuda" else "CPU", placement.replicas * per_replica, f"{section}.replicas",
        f"{placement.replicas} replica(s)",
        f"lower {section}.replicas (or cpus_per_replica / tensor_parallel_size) or add nodes",
    )
    return placement.model_copy(update={"device": device})


def resolve_engine(engine: EngineSpec) -> EngineSpec:
    """``resolve_placement`` for the LLM engines, plus their CPU threads when not given
    (``actor_threads``).
    An endpoint's clients (``kind: openai``) run on CPUs, with no threads of their own to set."""
    if engine.kind == "openai":
        engine = engine.model_copy(update={"device": "cpu"})
    engine = resolve_placement(engine, "engine")
    for name, amount in engine.resources.items():
        require(name, engine.replicas * amount, "engine.resources", f"{engine.replicas} replica(s)",
                f"start nodes with --resources '{{\"{name}\": ...}}' or remove it")
    if engine.threads is not None or engine.device != "cpu" or engine.kind == "openai":
        return engine
    return engine.model_copy(update={"threads": actor_threads(engine)})


def cpu_threads(replicas: int, reserved: float) -> int:
    """CPU threads for each of ``replicas`` processes that share the cluster's cores: the cores
    divided among them, at most one node's, at least the ``reserved`` CPUs. Ray would give a
    process as many threads as CPUs it reserves (``OMP_NUM_THREADS``), one by default, so that a
    single replica on a laptop would leave every other core idle."""
    node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
    share = int(ray.cluster_resources().get("CPU", 1) // replicas)
    return max(1, int(reserved), min(int(node_cpus), share))


def actor_threads(placement: ActorPlacement) -> int:
    """The CPU threads each of ``placement``'s actors runs: ``threads``, else ``cpu_threads``."""
    return placement.threads or cpu_threads(placement.replicas, placement.cpus_per_replica)


def use_threads(device: str, threads: int) -> None:
    """In a model actor or training worker: torch's CPU threads, where the device is the CPU."""
    if device == "cpu":
        import torch

        torch.set_num_threads(threads)


def actor_options(placement: ActorPlacement) -> dict:
    """``map_batches`` arguments for a pool of ``placement.replicas`` model actors."""
    if placement.device not in ("cpu", "cuda"):
        raise ValueError("device must be resolved (runtime.resolve_placement) before actors are placed")
    return {
        # Grown to replicas as the input allows: a small input (a few held-out rows in one
        # block) starts one actor, not replicas of them with nothing to do (Ray warns of those).
        "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=placement.replicas),
        "num_cpus": placement.cpus_per_replica,
        "num_gpus": 1 if placement.device == "cuda" else 0,
    }


def actor_map(dataset: ray.data.Dataset, actor_class: type, arguments: dict, placement: ActorPlacement,
              batch_size: int, batch_format: str) -> ray.data.Dataset:
    """``dataset`` through ``map_batches`` on a pool of ``placement.replicas`` model actors of
    ``actor_class`` (``actor_options``), each built with ``arguments`` plus its ``device`` and
    ``threads`` (``actor_threads``)."""
    return dataset.map_batches(
        actor_class, batch_size=batch_size, batch_format=batch_format,
        fn_constructor_kwargs={**arguments, "device": placement.device, "threads": actor_threads(placement)},
        **actor_options(placement),
    )


def blocks_dataset(table: pa.Table, batch_size: int, replicas: int) -> ray.data.Dataset:
    """``table`` as a Dataset cut into enough blocks that every replica gets work."""
    rows_per_block = max(1, min(batch_size, -(-table.num_rows // replicas)))
    blocks = [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
    # from_blocks reads each block's metadata here; from_arrow asks a task per block for it, and
    # a pass would start while those tasks' CPUs still look taken (Ray Data then warns that no
    # CPU is free and the job "will hang").
    return ray.data.from_blocks(blocks)
