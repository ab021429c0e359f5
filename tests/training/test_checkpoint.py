"""Checkpoints off the step path: `report_with_checkpoint` returns before the checkpoint is
written, and what it writes is the state as it was when reported."""

import json
from pathlib import Path

import torch

WAIT_S = 120


def train_fn(config: dict) -> None:
    """One Ray Train worker: report a checkpoint whose write waits until the report has returned, then
    change the weights in place, as the next training step would."""
    import json
    import threading

    from pipeline.training import loop

    report_returned, written = threading.Event(), threading.Event()
    outcome = {}
    write = loop.write_checkpoint

    def write_after_the_report_returned(directory, state):
        outcome["write_waited_for_report"] = report_returned.wait(timeout=WAIT_S)
        write(directory, state)
        written.set()

    loop.write_checkpoint = write_after_the_report_returned
    weights = {"w": torch.zeros(4)}
    timings: dict = {}
    loop.report_with_checkpoint({"epoch": 1}, {"model_state": weights, "epoch": 1, "step": 3}, timings)
    report_returned.set()
    weights["w"].add_(1.0)  # the next step: must not reach the checkpoint
    written.wait(timeout=WAIT_S)
    outcome["blocking_s_recorded"] = "blocking_s" in timings
    Path(config["outcome"]).write_text(json.dumps(outcome))


def test_a_checkpoint_is_written_after_the_report_returns_and_holds_the_reported_state(tmp_path, ray_local):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.training.loop import load_checkpoint_state

    outcome = tmp_path / "outcome.json"
    result = TorchTrainer(train_fn, train_loop_config={"outcome": str(outcome)}, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                          run_config=RunConfig(name="async", storage_path=str(tmp_path))).fit()
    # Synchronous, the write would have waited WAIT_S for a report that could not return before it.
    assert json.loads(outcome.read_text()) == {"write_waited_for_report": True, "blocking_s_recorded": True}
    state = load_checkpoint_state(result.checkpoint)
    assert (state["epoch"], state["step"]) == (1, 3)
    assert torch.equal(state["model_state"]["w"], torch.zeros(4))  # the snapshot, not the weights changed after
    assert Path(result.checkpoint.path).is_relative_to(tmp_path / "async")
