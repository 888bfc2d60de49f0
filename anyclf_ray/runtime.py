"""Connecting to Ray: a running cluster when one is named, else an embedded local one.

In: an optional address (``--address`` or ``RAY_ADDRESS``, which ``ray job submit`` sets).
Out: an initialised Ray, and the engine settings resolved against what the cluster has.
"""

from __future__ import annotations

import logging
import os

import ray

from typing import TypeVar

import pyarrow as pa

from anyclf_ray.config import ActorPlacement, ConfigError

Placement = TypeVar("Placement", bound=ActorPlacement)

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


def actor_options(placement: ActorPlacement) -> dict:
    """``map_batches`` arguments for a pool of ``placement.replicas`` model actors."""
    if placement.device not in ("cpu", "cuda"):
        raise ValueError("device must be resolved (runtime.resolve_placement) before actors are placed")
    return {
        "compute": ray.data.ActorPoolStrategy(size=placement.replicas),
        "num_cpus": placement.cpus_per_replica,
        "num_gpus": 1 if placement.device == "cuda" else 0,
    }


def blocks_dataset(table: pa.Table, batch_size: int, replicas: int) -> ray.data.Dataset:
    """``table`` as a Dataset cut into enough blocks that every replica gets work."""
    rows_per_block = max(1, min(batch_size, -(-table.num_rows // replicas)))
    blocks = [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks)
