"""`uniformer bench ingest`: where the training's clip stream decodes, on a simulated multi-node
cluster, decode nodes only against the trainers' nodes first, side by side in one run.

The cluster (`ray.cluster_utils.Cluster`, every node a raylet on this machine): a head with no
CPUs, `gpu_nodes` "GPU" nodes (a `bench_gpu` resource per trainer slot; trainers need one each, and
each node has one CPU more than its trainers) and one CPU-only decode node labelled
`data.decode_nodes`. For each number of trainers both placements (`data.decode_placement`) feed the
same consumer loop, which runs no model: each batch costs `step_ms` of sleep, as a GPU step would,
so what is measured is the data path alone. The stream is the training's own
(`pipeline.training.ingest`: one stream, split by Ray Train with the trainers' nodes as locality hints).

Figures per run: clips/s reaching the trainers (all of them, over all epochs, start included),
the mean data-wait fraction, decode tasks per epoch (from Ray Data's own stats), peak object-store
bytes (sampled from the raylets every 0.5 s), the share of decode CPU-seconds spent on the
decode node (CPU time of the Ray worker processes seen running decode tasks, per node), and the
bytes of clips that crossed between nodes per clip (each clip carries the id of the node that
decoded it; the trainer compares it with its own).
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.config import Config, config_from_dict

DESIGNS = ("decode_nodes_only", "trainers_first")
_TASKS = re.compile(r"MapBatches\(_train_task_clips\)[^\n]*?:\s*\n?[^\n]*?(\d+) tasks executed")


# ---------------------------------------------------------------------------------------------
# What each trainer runs: take batches, pretend to step


def decode_tasks(stats: str) -> int:
    """Decode tasks executed, from a Ray Data stats text."""
    return sum(int(n) for n in _TASKS.findall(stats))


def consume(loop_config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    from pipeline.data.clips import node_tag, select_rows
    from pipeline.data.manifest import read_manifest
    from pipeline.training.ingest import TRAIN, steps_per_epoch

    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    manifest = read_manifest(cfg.data.manifest, storage=cfg.storage)
    rows = select_rows(manifest, split=cfg.data.train_split, training=True)
    steps = steps_per_epoch(cfg, rows.num_rows)
    micro = cfg.train.batch_size // world
    step_s = loop_config["step_ms"] / 1000
    node = node_tag()
    shard = ray.train.get_dataset_shard(TRAIN)
    batches = iter(shard.iter_batches(batch_size=micro, drop_last=True, batch_format="numpy", prefetch_batches=2))
    clips, clip_bytes, crossed_bytes, wait_s, t0 = 0, 0, 0, 0.0, time.perf_counter()
    for _ in range(cfg.optim.epochs * steps):
        t = time.perf_counter()
        batch = next(batches)
        wait_s += time.perf_counter() - t
        clips += len(batch["label"])
        for clip, decoded_on in zip(batch["clip"], batch["decode_node"]):
            clip_bytes += clip.nbytes
            crossed_bytes += clip.nbytes if decoded_on != node else 0
        time.sleep(step_s)
    seconds = time.perf_counter() - t0
    tasks = decode_tasks(shard.stats()) if rank == 0 else 0  # one stream: its stats are everyone's
    totals = torch.tensor([clips, wait_s / seconds, tasks, seconds, crossed_bytes, clip_bytes], dtype=torch.float64)
    dist.all_reduce(totals)
    figures = {"clips": totals[0].item(), "wait_fraction": totals[1].item() / world, "tasks": totals[2].item(),
               "seconds": totals[3].item() / world, "crossed_bytes": totals[4].item(), "clip_bytes": totals[5].item()}
    with tempfile.TemporaryDirectory() as tmp:  # Ray Train keeps the metrics of reports with a checkpoint
        Path(tmp, "figures.txt").write_text(repr(figures))
        ray.train.report(figures, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


# ---------------------------------------------------------------------------------------------
# The simulated cluster and what is sampled from it


@dataclasses.dataclass
class SimulatedCluster:
    gpu_nodes: int
    slots_per_gpu_node: int
    cpus_per_gpu_node: int
    decode_node_cpus: int
    decode_label: str

    def __enter__(self) -> "SimulatedCluster":
        import ray
        from ray.cluster_utils import Cluster

        key, value = self.decode_label.split("=", 1)
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        self.gpu = [self.cluster.add_node(num_cpus=self.cpus_per_gpu_node,
                                          resources={"bench_gpu": self.slots_per_gpu_node},
                                          labels={key: "gpu"}) for _ in range(self.gpu_nodes)]
        self.decode = self.cluster.add_node(num_cpus=self.decode_node_cpus, labels={key: value})
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False)
        return self

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()

    def worker_cpu_s(self) -> dict[tuple[str, int], tuple[float, str]]:
        """CPU seconds so far and process title of each Ray worker process of each node, trainers
        left out, keyed by (node, pid)."""
        import psutil

        out = {}
        for name, node in [("decode", self.decode)] + [(f"gpu{i}", n) for i, n in enumerate(self.gpu)]:
            raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
            for proc in raylet.children(recursive=True):
                try:
                    title = " ".join(proc.cmdline())
                    if "RayTrainWorker" in title:
                        continue
                    times = proc.cpu_times()
                    out[(name, proc.pid)] = times.user + times.system, title
                except psutil.Error:
                    continue
        return out


class CpuTally:
    """Decode CPU seconds per node since the first sample: the CPU time of the Ray worker processes
    seen running a decode task (Ray titles a busy worker `ray::MapBatches(...)`). Sampled, so that a
    process that ends meanwhile counts up to its last sample, and one that starts counts from zero
    (Ray starts, reuses and ends worker processes as it goes)."""

    def __init__(self, sample: Callable[[], dict[tuple[str, int], tuple[float, str]]]):
        self._sample = sample
        self.first: dict[tuple[str, int], float] | None = None
        self.last: dict[tuple[str, int], float] = {}
        self.decoders: set[tuple[str, int]] = set()

    def __call__(self) -> None:
        now = self._sample()
        if self.first is None:
            self.first = {key: cpu for key, (cpu, _) in now.items()}
        for key, (cpu, title) in now.items():
            self.last[key] = cpu
            if "MapBatches(" in title:
                self.decoders.add(key)

    def per_node(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (node, pid) in self.decoders:
            out[node] = out.get(node, 0.0) + self.last[(node, pid)] - (self.first or {}).get((node, pid), 0.0)
        return out


def object_store_bytes(address: str) -> int:
    """Bytes in the object stores of all nodes of the cluster at `address` (the raylets' own figure)."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=address, stats_only=True)
    found = re.search(r"Plasma memory usage (\d+) MiB", text)
    return int(found.group(1)) * 2**20 if found else 0


class Sampler:
    """Calls each of `probes` every `interval_s` seconds in a thread, once more on exit; keeps
    the peak of what `peak_of` returns."""

    def __init__(self, peak_of: Callable[[], int], *probes: Callable[[], None], interval_s: float = 0.5):
        self.peak_of, self.probes, self.interval_s, self.peak = peak_of, probes, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            self.peak = max(self.peak, self.peak_of())
            for probe in self.probes:
                probe()
        except Exception:  # noqa: BLE001 - a missed sample only lowers the figure's resolution
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "Sampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ---------------------------------------------------------------------------------------------
# The run


def run_design(cfg: Config, cluster: SimulatedCluster, *, design: str, workers: int, step_ms: float,
               storage_dir: str) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.training.ingest import TRAIN, ClipDataConfig, TrainStream

    name = f"ingest-{design}-{workers}-{time.strftime('%H%M%S')}"
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=workers, storage_path=storage_dir,
                                                             run_name=name),
                              data=dataclasses.replace(cfg.data, decode_placement=design))
    trainer = TorchTrainer(
        consume, train_loop_config={"config": cfg.to_dict(), "step_ms": step_ms},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1, "bench_gpu": 1}),
        datasets={TRAIN: TrainStream(cfg.to_dict(), name)}, dataset_config=ClipDataConfig(cfg.data.object_store_budget_gb),
        run_config=RunConfig(name=name, storage_path=storage_dir))
    cpu_tally = CpuTally(cluster.worker_cpu_s)
    with Sampler(lambda: object_store_bytes(cluster.cluster.address), cpu_tally) as sampler:
        metrics = trainer.fit().metrics
    cpu = cpu_tally.per_node()
    return {"clips_per_s": round(metrics["clips"] / metrics["seconds"], 1),
            "data_wait_fraction": round(metrics["wait_fraction"], 3),
            "decode_tasks_per_epoch": round(metrics["tasks"] / cfg.optim.epochs, 1),
            "peak_object_store_mb": round(sampler.peak / 2**20, 1),
            "decode_node_cpu_share": round(cpu.get("decode", 0.0) / max(sum(cpu.values()), 1e-9), 3),
            "clip_mb": round(metrics["clip_bytes"] / metrics["clips"] / 1e6, 3),
            "crossed_mb_per_clip": round(metrics["crossed_bytes"] / metrics["clips"] / 1e6, 3),
            "worker_cpu_s": {k: round(v, 1) for k, v in cpu.items()}}


def run_ingest_bench(cfg: Config, *, manifest_uri: str, workers: tuple[int, ...] = (2, 4), gpu_nodes: int = 2,
                     decode_node_cpus: int = 4, step_ms: float = 50.0, epochs: int = 3,
                     progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Both placements for each number of trainers, on one simulated cluster; returns the table."""
    slots = -(-max(workers) // gpu_nodes)
    # Ray Data sizes the decode pool (decode_concurrency 0) from the cluster's CPUs.
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=manifest_uri, decode_concurrency=0),
                              optim=dataclasses.replace(cfg.optim, epochs=epochs))
    result: dict[str, Any] = {"gpu_nodes": gpu_nodes, "trainer_slots_per_gpu_node": slots,
                              "decode_node_cpus": decode_node_cpus, "step_ms": step_ms,
                              "batch_size": cfg.train.batch_size, "epochs": cfg.optim.epochs,
                              "object_store_budget_gb": cfg.data.object_store_budget_gb, "runs": []}
    with SimulatedCluster(gpu_nodes, slots, slots + 1, decode_node_cpus, cfg.data.decode_nodes) as cluster, \
            tempfile.TemporaryDirectory() as storage_dir:
        for n in workers:
            for design in DESIGNS:
                progress(f"{design} design, {n} trainers")
                figures = run_design(cfg, cluster, design=design, workers=n, step_ms=step_ms,
                                     storage_dir=str(Path(storage_dir)))
                result["runs"].append({"design": design, "workers": n, **figures})
                progress(f"  {figures}")
    return result
