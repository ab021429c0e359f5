"""Metrics: a training's step metrics off the step's path (`MetricQueue`), system metrics from the
workers, and metrics that belong to a logged model (MLflow 3 model metrics).

    metrics = MetricQueue(client, run_id); metrics.log({...}, step)   # rank 0
    with system_metrics(cfg, run_id): ...                             # each training worker (a sampler thread)
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.config import Config
from pipeline.tracking.redaction import redact
from pipeline.tracking.runs import tracking_uri

_log = logging.getLogger(__name__)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


class MetricQueue:
    """A training's metrics on their way to MLflow, off the training step's path.

    `log` only appends to an in-memory queue; a daemon thread sends it in batches. While the
    tracking server is down (MLflow's client gives up after about 4 minutes of its own retries)
    the thread keeps the metrics and tries again, so an outage neither stalls the step nor loses
    metrics. Past `max_pending` metrics the oldest are dropped, counted and warned about.
    `close` waits up to `timeout_s` for the queue to drain (retries keep their backoff), then stops
    the thread and returns what stayed undelivered.
    """

    BATCH = 1000  # MLflow's limit on metrics per log_batch

    def __init__(self, client: MlflowClient, run_id: str, *, max_pending: int = 1_000_000,
                 retry_s: tuple[float, float] = (1.0, 30.0)):
        import collections
        import threading

        self.client, self.run_id = client, run_id
        self.max_pending, self.retry_s = max_pending, retry_s
        self.pending: collections.deque[Metric] = collections.deque()
        self.dropped = 0
        self.cond = threading.Condition()
        self.closing = False  # close() called: deliver what is queued, then end
        self.abandoned = False  # close() timed out: end now, keep nothing more in flight
        self.thread = threading.Thread(target=self._send_forever, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def log(self, metrics: dict[str, float], step: int, *, timestamp_ms: int | None = None) -> None:
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        with self.cond:
            self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
            overflow = len(self.pending) - self.max_pending
            for _ in range(max(0, overflow)):
                self.pending.popleft()
            self.dropped += max(0, overflow)
            self.cond.notify()

    def _send_forever(self) -> None:
        delay, failing = self.retry_s[0], False
        while True:
            with self.cond:
                while not self.pending and not self.closing:
                    self.cond.wait()
                if not self.pending or self.abandoned:
                    return
                batch = [self.pending[i] for i in range(min(self.BATCH, len(self.pending)))]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as err:  # noqa: BLE001 - any failure to deliver: keep the metrics, retry
                if not failing:
                    _log.warning("tracking server unreachable, metrics kept and retried: %s",
                                 redact(str(err)).splitlines()[0][:300])
                failing = True
                # The backoff holds after close() too (a retry storm would meet a server coming
                # back); only abandonment cuts it short.
                with self.cond:
                    self.cond.wait_for(lambda: self.abandoned, timeout=delay)
                delay = min(delay * 2, self.retry_s[1])
                continue
            if failing:
                _log.warning("tracking server reachable again; delivering kept metrics")
            delay, failing = self.retry_s[0], False
            with self.cond:
                for _ in batch:
                    self.pending.popleft()
                self.cond.notify_all()

    def close(self, timeout_s: float = 600.0) -> int:
        """Deliver what is queued (waiting at most `timeout_s`); returns the undelivered count."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join(timeout=timeout_s)
        with self.cond:
            self.abandoned = True
            self.cond.notify_all()
        # Ends at once unless a request is in flight; that request is the last the thread makes.
        self.thread.join(timeout=5.0)
        with self.cond:
            undelivered = len(self.pending) + self.dropped
        if undelivered:
            _log.warning("%d metrics of run %s could not be delivered to the tracking server", undelivered,
                         self.run_id)
        return undelivered


class SystemMetricsSampler:
    """This node's CPU, memory, disk and network figures (and GPU with `nvidia-ml-py`) into a run as
    `<prefix><name>`, sampled every `sampling_interval_s` by MLflow's own collectors on a daemon thread.

    Nothing on the caller's thread waits on the tracking server: the thread hands each sample to a
    `MetricQueue`, which keeps it through an outage and sends it when the server is back, and the
    sampling itself never stops for a failed request (MLflow's `SystemMetricsMonitor` read the run
    on the caller's thread, and its thread ended at the first request that failed). Samples are
    numbered on from the prefix's last step in the run, so a worker that starts again continues its
    series; the thread reads that step, and holds the samples taken until the server answers.
    `close` stops the sampling and delivers what is queued (waiting at most `timeout_s`).
    """

    MAX_HELD = 10_000  # samples held while the run's last step is unknown (a day at 10 s)

    def __init__(self, client: MlflowClient, run_id: str, *, prefix: str, sampling_interval_s: float = 10.0,
                 retry_s: tuple[float, float] = (1.0, 30.0)):
        import threading

        self.client, self.run_id, self.prefix = client, run_id, prefix
        self.sampling_interval_s = sampling_interval_s
        self.queue = MetricQueue(client, run_id, retry_s=retry_s)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._sample_forever, name="system-metrics", daemon=True)
        self.thread.start()

    def _sample_forever(self) -> None:
        import collections

        monitors = metric_monitors()
        held: collections.deque[tuple[dict[str, float], int]] = collections.deque(maxlen=self.MAX_HELD)
        next_step, warned = None, False
        while not self.stopping.wait(self.sampling_interval_s):
            values: dict[str, float] = {}
            for monitor in monitors:
                try:
                    monitor.collect_metrics()
                    values.update(monitor.aggregate_metrics())
                except Exception as err:  # noqa: BLE001 - one failing collector never ends the sampling
                    if not warned:
                        _log.warning("system metrics: %s failed: %s", type(monitor).__name__, err)
                    warned = True
                finally:
                    monitor.clear_metrics()
            held.append(({self.prefix + k: v for k, v in values.items()}, int(time.time() * 1000)))
            if next_step is None:
                next_step = self._next_step()
            while next_step is not None and held:
                sample, timestamp_ms = held.popleft()
                self.queue.log(sample, next_step, timestamp_ms=timestamp_ms)
                next_step += 1

    def _next_step(self) -> int | None:
        """One past the prefix's last step in the run (0 for none), or None while the server fails."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(self.run_id)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return 0
            return None
        except Exception:  # noqa: BLE001 - unreachable or failing: asked again at the next sample
            return None
        steps = [m.step for m in run.data.to_proto().metrics if m.key.startswith(self.prefix)]
        return max(steps) + 1 if steps else 0

    def close(self, timeout_s: float = 60.0) -> int:
        """Stop sampling and deliver what is queued; returns the count of metrics left undelivered."""
        deadline = time.monotonic() + timeout_s
        self.stopping.set()
        # At once unless the thread is reading the run's last step from a server that does not answer.
        self.thread.join(timeout=timeout_s)
        return self.queue.close(timeout_s=max(0.0, deadline - time.monotonic()))


def metric_monitors() -> list:
    """MLflow's collectors for this machine: CPU and memory, disk, network, and NVIDIA (`nvidia-ml-py`)
    or AMD (`pyrsmi`) GPUs where their libraries and devices are present."""
    import psutil
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    psutil.cpu_percent()  # starts the CPU counter: the first sample covers its interval, not 0.0
    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for gpu in (GPUMonitor, ROCMMonitor):
        try:
            monitors.append(gpu())
            break
        except Exception:  # noqa: BLE001 - no library or no device: no GPU figures
            continue
    else:
        _log.info("system metrics: no GPU figures (needs nvidia-ml-py and an NVIDIA GPU, or pyrsmi)")
    return monitors


@contextlib.contextmanager
def system_metrics(cfg: Config, run_id: str, *, local_rank: int | None = None, node_rank: int | None = None,
                   sampling_interval_s: float = 10.0, retry_s: tuple[float, float] = (1.0, 30.0)) -> Iterator[None]:
    """CPU, memory, disk, network (and GPU with `nvidia-ml-py`) metrics of this node into the run,
    as `system/node_<rank>/...`, from the process with local rank 0 only; a no-op when
    `tracking.system_metrics` is false or there is no run. Ranks come from the Ray Train context when
    not given. A `SystemMetricsSampler`: entering makes no request to the tracking server, and an
    outage neither stalls the caller nor ends the sampling (`retry_s`: the queue's backoff)."""
    if not cfg.tracking.system_metrics or not run_id:
        yield
        return
    if local_rank is None or node_rank is None:
        try:
            import ray.train

            ctx = ray.train.get_context()
            local_rank = ctx.get_local_rank() if local_rank is None else local_rank
            node_rank = ctx.get_node_rank() if node_rank is None else node_rank
        except Exception:  # noqa: BLE001 - outside Ray Train: a single process
            local_rank = 0 if local_rank is None else local_rank
            node_rank = 0 if node_rank is None else node_rank
    if local_rank != 0:
        yield
        return
    sampler = SystemMetricsSampler(MlflowClient(tracking_uri(cfg)), run_id, prefix=f"system/node_{node_rank}/",
                                   sampling_interval_s=sampling_interval_s, retry_s=retry_s)
    try:
        yield
    finally:
        sampler.close()


def log_model_metrics(client: MlflowClient, run_id: str, model_id: str, metrics: dict[str, float], *,
                      dataset_name: str, dataset_digest: str, step: int = 0) -> None:
    """Metrics of the run that are also the logged model's (MLflow 3 model metrics): the registry shows
    them on every version of that model, keyed by the dataset, rather than as version tags."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step, model_id=model_id, dataset_name=dataset_name,
                                             dataset_digest=dataset_digest) for k, v in metrics.items()])

