"""The training's metric queue: logging never waits on the tracking server, and keeps metrics
through an outage (a client that blocks or fails stands in for the server here; the real server
stopped mid-training is in test_outage.py)."""

from __future__ import annotations

import threading
import time

from pipeline.tracking.metrics import MetricQueue


class FlakyClient:
    """An MLflow client whose log_batch fails while `down` is set and hangs while `hold` is clear."""

    def __init__(self):
        self.delivered: list = []
        self.down = threading.Event()
        self.hold = threading.Event()
        self.hold.set()
        self.calls = 0

    def log_batch(self, run_id, metrics):
        self.calls += 1
        self.hold.wait()
        if self.down.is_set():
            raise ConnectionError("connection refused")
        self.delivered.extend((m.key, m.step, m.value) for m in metrics)


def test_log_returns_while_the_server_hangs_and_delivers_afterwards():
    client = FlakyClient()
    client.hold.clear()  # every request hangs, like a server that accepts and never answers
    queue = MetricQueue(client, "run", retry_s=(0.01, 0.05))
    t0 = time.perf_counter()
    for step in range(1, 201):
        queue.log({"train_loss": 1.0 / step, "lr": 1e-3}, step)
    assert time.perf_counter() - t0 < 1.0  # 200 steps queued while the server hangs
    client.hold.set()
    assert queue.close(timeout_s=30) == 0
    assert sorted(s for k, s, _ in client.delivered if k == "train_loss") == list(range(1, 201))


def test_an_outage_keeps_every_metric_and_delivers_them_when_the_server_is_back():
    client = FlakyClient()
    client.down.set()
    queue = MetricQueue(client, "run", retry_s=(0.01, 0.05))
    for step in range(1, 51):
        queue.log({"train_loss": float(step)}, step)
    deadline = time.monotonic() + 10
    while client.calls < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.calls >= 3 and client.delivered == []  # retried, nothing lost, nothing delivered yet
    client.down.clear()
    assert queue.close(timeout_s=30) == 0
    assert [(s, v) for _, s, v in client.delivered] == [(s, float(s)) for s in range(1, 51)]


def test_close_reports_what_could_not_be_delivered():
    client = FlakyClient()
    client.down.set()
    queue = MetricQueue(client, "run", max_pending=10, retry_s=(0.01, 0.05))
    for step in range(1, 21):
        queue.log({"train_loss": float(step)}, step)
    assert queue.close(timeout_s=0.5) == 20  # 10 kept but undelivered + 10 dropped past max_pending
    assert not queue.thread.is_alive()  # close() ended the thread: nothing retries behind the caller
    calls_at_close = client.calls
    # Backoff of 0.01 s doubling to 0.05 s within 0.5 s: about a dozen tries, not a storm.
    assert calls_at_close <= 15
    time.sleep(0.3)
    assert client.calls == calls_at_close


def test_close_keeps_the_backoff_while_the_server_stays_down():
    client = FlakyClient()
    client.down.set()
    queue = MetricQueue(client, "run", retry_s=(0.2, 0.2))
    queue.log({"train_loss": 1.0}, 1)
    assert queue.close(timeout_s=1.0) == 1
    assert client.calls <= 7  # one try per 0.2 s backoff over the second, none in a tight loop
    assert not queue.thread.is_alive()
