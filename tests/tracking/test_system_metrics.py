"""System metrics against a real `mlflow server` that is stopped under them: entering the sampler
makes no request on the caller's thread, and sampling goes on through an outage."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline.bench.train import LocalMlflowServer
from pipeline.tracking.metrics import system_metrics
from pipeline.tracking.runs import find_or_create_run
from tests.tracking.conftest import tiny_config


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One local server for the module, stopped (SIGSTOP or terminate) and started again by the tests."""
    server = LocalMlflowServer(tmp_path_factory.mktemp("system_metrics_server"))
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        signal_server(server, signal.SIGCONT)
    server.stop()


def signal_server(server, signum: int) -> None:
    """`signum` to the server and the processes it started (uvicorn serves from a child process)."""
    parent = psutil.Process(server.proc.pid)
    for proc in [parent, *parent.children(recursive=True)]:
        os.kill(proc.pid, signum)


@pytest.fixture
def sampling_run(server, monkeypatch):
    # No retries inside MLflow's client: a request to a stopped server fails at once, as one to a
    # server that stays down longer than those retries (about 4 minutes) fails in the end.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    cfg = tiny_config(server.url, extra=("tracking.system_metrics=true",))
    return cfg, find_or_create_run(cfg)


def history(server, run_id: str, key: str) -> list:
    return MlflowClient(server.url).get_metric_history(run_id, key)


def wait_for(condition, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return value


def new_threads(before: set) -> list:
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


def test_entering_makes_no_request_while_the_server_is_stopped(server, sampling_run):
    cfg, run_id = sampling_run
    before = set(threading.enumerate())
    stopped = threading.Event()

    def resume():
        stopped.clear()
        signal_server(server, signal.SIGCONT)

    # The server takes connections but answers nothing until SIGCONT: a request made while it is
    # stopped waits for it. A watchdog resumes it after 30 s so that code which waits (the old
    # monitor read the run on the caller's thread) fails this test rather than hanging it.
    stopped.set()
    signal_server(server, signal.SIGSTOP)
    watchdog = threading.Timer(30.0, resume)
    watchdog.start()
    try:
        with system_metrics(cfg, run_id, local_rank=0, node_rank=0, sampling_interval_s=0.2):
            assert stopped.is_set(), "entering system_metrics waited for the tracking server"
            watchdog.cancel()
            resume()
            # Samples taken while the server was stopped, and after, reach the run once it answers.
            wait_for(lambda: len(history(server, run_id, "system/node_0/cpu_utilization_percentage")) >= 3)
    finally:
        watchdog.cancel()
        watchdog.join()
        if stopped.is_set():
            resume()
    assert not new_threads(before), "system_metrics left a thread behind"


def test_sampling_goes_on_through_an_outage_and_numbers_on_after_a_restart(server, sampling_run):
    cfg, run_id = sampling_run
    key = "system/node_3/cpu_utilization_percentage"
    before = set(threading.enumerate())
    with system_metrics(cfg, run_id, local_rank=0, node_rank=3, sampling_interval_s=0.2, retry_s=(0.2, 0.5)):
        wait_for(lambda: history(server, run_id, key))
        server.stop()
        time.sleep(1.0)  # a few samples' time without a server
        server.start()
        back_ms = time.time() * 1000
        # Sampled after the outage: the old monitor's thread had ended at its first failed request.
        wait_for(lambda: [m for m in history(server, run_id, key) if m.timestamp > back_ms])
    assert not new_threads(before), "system_metrics left a thread behind"
    steps = sorted(m.step for m in history(server, run_id, key))
    assert steps == list(range(len(steps)))  # the samples of the outage too: none lost, none twice
    # A worker that starts again (a resumed run) numbers its samples on from the run's last one.
    with system_metrics(cfg, run_id, local_rank=0, node_rank=3, sampling_interval_s=0.2):
        wait_for(lambda: len(history(server, run_id, key)) > len(steps))
    again = sorted(m.step for m in history(server, run_id, key))
    assert again[:len(steps)] == steps and again == list(range(len(again)))
