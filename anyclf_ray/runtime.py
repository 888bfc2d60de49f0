"""Connecting to Ray: a running cluster when one is named, else an embedded local one.

In: an optional address (``--address`` or ``RAY_ADDRESS``, which ``ray job submit`` sets).
Out: an initialised Ray, and the engine settings resolved against what the cluster has.
"""

from __future__ import annotations

import logging
import os

import ray

from anyclf_ray.config import ConfigError, EngineSpec

log = logging.getLogger(__name__)


def connect(address: str | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        log.info("starting an embedded local Ray")
        ray.init(include_dashboard=False)


def resolve_engine(engine: EngineSpec) -> EngineSpec:
    """Pick the device for ``auto`` and check the replicas can ever be placed."""
    resources = ray.cluster_resources()
    device = engine.device
    if device == "auto":
        device = "cuda" if resources.get("GPU", 0) > 0 else "cpu"
    if device == "cuda":
        need, have, unit = engine.replicas * engine.tensor_parallel_size, resources.get("GPU", 0), "GPU"
    else:
        need, have, unit = engine.replicas * engine.cpus_per_replica, resources.get("CPU", 0), "CPU"
    if need > have:
        raise ConfigError(
            f"engine.replicas: {engine.replicas} replica(s) need {need:g} {unit}(s) but the cluster "
            f"has {have:g}; lower engine.replicas (or cpus_per_replica / tensor_parallel_size) or add nodes"
        )
    return engine.model_copy(update={"device": device})
