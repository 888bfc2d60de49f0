"""Where actors go with ``device: cuda``, checked without a GPU.

The README says the CPU/GPU difference is configuration, not code: this module builds the GPU
side of that configuration (replica options, tensor-parallel placement groups, the engines'
environment, Ray Train's GPU workers) and checks it against a Ray whose nodes declare logical
GPUs. Those stand in for real GPUs: Ray accounts for them the same way, but no actor is started
on them, since nothing here could run CUDA.
"""

from __future__ import annotations

import pytest
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from test_engine import SAMPLING, FakeEngine

from anyclf_ray.core import config, runtime
from anyclf_ray.core.config import EngineSpec, TrainSpec
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.llm import engine, pool
from anyclf_ray.training import train


def replica_options(placed: EngineSpec) -> dict:
    """The options ``EnginePool.start`` would give its first replica, built without starting it."""
    engines = pool.EnginePool(placed, SAMPLING, FakeEngine)
    engines.names = ["anyclf-test-engine-0"]
    return engines._actor_options(0)


def test_a_gpu_replica_takes_one_gpu_and_no_cpu_build_settings():
    placed = EngineSpec(device="cuda", replicas=2, cpus_per_replica=2, env={"HF_HOME": "/models"},
                        resources={"a10g": 1})
    options = replica_options(placed)
    assert options == {
        "num_cpus": 2, "num_gpus": 1, "resources": {"a10g": 1}, "max_restarts": 3, "max_task_retries": -1,
        "name": "anyclf-test-engine-0",
        # vLLM's CUDA build: none of the CPU build's settings, the user's variables kept.
        "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HOME": "/models"}},
    }
    assert engine.engine_env(placed.model_copy(update={"device": "cpu"}))["VLLM_TARGET_DEVICE"] == "cpu"


def test_model_actors_and_training_workers_take_a_gpu_each():
    options = runtime.actor_options(config.ActorPlacement(device="cuda", replicas=3, cpus_per_replica=2))
    assert (options["num_gpus"], options["num_cpus"], options["compute"].max_size) == (1, 2, 3)
    assert options["compute"].min_size == 1  # grown as the input allows
    assert runtime.actor_options(config.ActorPlacement(device="cpu"))["num_gpus"] == 0
    on_gpus = TrainSpec(use_gpu=True, num_workers=4, cpus_per_worker=2)
    scaling = train.scaling_config(on_gpus)
    assert (scaling.num_workers, scaling.use_gpu) == (4, True)
    assert scaling.resources_per_worker == {"CPU": 2, "GPU": 1}
    assert train.scaling_config(TrainSpec(num_workers=2)).resources_per_worker == {"CPU": 1}
    assert not train.scaling_config(TrainSpec(num_workers=2)).use_gpu
    assert train.embedding_placement(on_gpus) == config.ActorPlacement(device="cuda", replicas=4, cpus_per_replica=2)


@pytest.fixture(scope="module")
def gpu_ray():
    """An embedded Ray whose node declares 2 logical GPUs and one ``engine_node`` (no real GPU)."""
    ray.shutdown()  # the session's embedded Ray, which declares no GPUs
    ray.init(address="local", num_cpus=2, num_gpus=2, resources={"engine_node": 1}, include_dashboard=False,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_auto_picks_cuda_and_counts_gpus_per_replica(gpu_ray):
    resolved = runtime.resolve_engine(EngineSpec(device="auto", tensor_parallel_size=2))
    assert resolved.device == "cuda" and resolved.threads is None  # threads are the CPU build's
    with pytest.raises(ConfigError, match=r"^engine.replicas: 2 replica\(s\) need 4 GPU\(s\) but the cluster has 2; "):
        runtime.resolve_engine(EngineSpec(device="auto", replicas=2, tensor_parallel_size=2))
    train.check_workers(TrainSpec(use_gpu=True, num_workers=2))
    with pytest.raises(ConfigError, match=r"^train.num_workers: 3 worker\(s\) need 3 GPU\(s\) but the cluster has 2"):
        train.check_workers(TrainSpec(use_gpu=True, num_workers=3))


@pytest.mark.slow
def test_cpu_threads_divide_the_clusters_cores_among_the_replicas(gpu_ray):
    assert runtime.actor_threads(config.ActorPlacement(device="cpu")) == 2  # Ray alone would give it 1
    assert runtime.actor_threads(config.ActorPlacement(device="cpu", replicas=2)) == 1
    assert runtime.actor_threads(config.ActorPlacement(device="cpu", replicas=4)) == 1  # never below one
    assert runtime.actor_threads(config.ActorPlacement(device="cpu", replicas=2, cpus_per_replica=2)) == 2
    assert runtime.actor_threads(config.ActorPlacement(device="cpu", threads=3)) == 3  # as given
    assert runtime.resolve_engine(EngineSpec(device="cpu")).threads == 2


@pytest.mark.slow
def test_a_tensor_parallel_replica_reserves_its_shards_in_one_placement_group(gpu_ray):
    placed = EngineSpec(device="cuda", tensor_parallel_size=2, resources={"engine_node": 1})
    options = replica_options(runtime.resolve_engine(placed))
    strategy = options.pop("scheduling_strategy")
    # The replica itself takes nothing: vLLM's Ray executor starts a worker per shard in the group.
    assert (options["num_cpus"], options["num_gpus"], options["resources"]) == (0, 0, {})
    assert isinstance(strategy, PlacementGroupSchedulingStrategy) and strategy.placement_group_capture_child_tasks
    group = strategy.placement_group
    assert group.bundle_specs == [{"GPU": 1, "CPU": 1, "engine_node": 0.5}] * 2
    assert ray.util.placement_group_table(group)["strategy"] == "STRICT_PACK"
    ray.get(group.ready(), timeout=60)  # placeable: one node holds both shards
    ray.util.remove_placement_group(group)
