"""`uniformer sweep`: the search space and its errors, ASHA's decisions, and a sweep on the demo data
through the real CLI on a local Ray cluster with a real MLflow store (stopped, started again, finished)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.training.search_space import load_search_space, parse_search

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "infra" / "configs" / "demo.yaml"


# ---------------------------------------------------------------------------------------------
# The search space (no Ray)


def test_search_texts_give_typed_dimensions_and_tune_domains():
    space = parse_search(["optim.lr_per_32_videos=loguniform:1e-3:1e-2",
                          "data.rand_augment=choice:,rand-m7-n4-mstd0.5-inc1", "data.scale=grid:[0.5,1.0],[0.7,1.0]",
                          "train.seed=randint:0:3", "data.test_crops=choice:1,3"])
    dims = {d.key: d for d in space.dimensions}
    assert dims["optim.lr_per_32_videos"].values == (1e-3, 1e-2)
    assert dims["data.rand_augment"].values == ("", "rand-m7-n4-mstd0.5-inc1")
    assert dims["data.scale"].values == ((0.5, 1.0), (0.7, 1.0))
    assert dims["data.test_crops"].values == (1, 3)  # typed as the config's Literal[1, 3]
    assert space.grid_size() == 2
    assert space.specs()["optim.lr_per_32_videos"] == "loguniform:0.001:0.01"
    space.check(load_config(DEMO))
    domains = space.param_space()
    assert domains["data.scale"] == {"grid_search": [(0.5, 1.0), (0.7, 1.0)]}
    assert domains["train.seed"].upper == 4  # randint includes HIGH; Tune's upper bound excludes it
    assert 1e-3 <= domains["optim.lr_per_32_videos"].sample() <= 1e-2


def test_a_yaml_search_space_takes_text_or_a_mapping(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("optim.lr_per_32_videos: loguniform:1e-3:1e-2\n"
                    "data.rand_augment: {choice: ['', rand-m7-n4-mstd0.5-inc1]}\n"
                    "optim.weight_decay: {uniform: [1e-2, 0.1]}\n")  # YAML 1.1 reads 1e-2 as text
    space = load_search_space(path, ["train.seed=grid:0,1"])
    assert space.keys == ("optim.lr_per_32_videos", "data.rand_augment", "optim.weight_decay", "train.seed")
    assert space.dimensions[2].values == (0.01, 0.1)


@pytest.mark.parametrize("text, message", [
    ("optim.lr_per_32_videos", "is not of the form KEY=KIND:ARGS"),
    ("optim.lr_per_32_videos=normal:1:2",
     "unknown kind 'normal'; use one of loguniform, uniform, randint, choice, grid"),
    ("optim.bogus=choice:1,2", "search optim.bogus: unknown config key optim.bogus"),
    ("train.run_name=choice:a,b", "search train.run_name: not searchable"),
    ("data.manifest=choice:a,b", "search data.manifest: not searchable"),
    ("tracking.experiment=choice:a,b", "search tracking.experiment: not searchable"),
    ("optim.epochs=uniform:1:3", "uniform needs a float key, and optim.epochs is int; use randint"),
    ("data.rand_augment=loguniform:1:2", "is str; use choice or grid"),
    ("optim.lr_per_32_videos=loguniform:0:1e-3", "LOW must be > 0 (a log scale); use uniform"),
    ("optim.lr_per_32_videos=uniform:1e-2:1e-3", "LOW must be below HIGH"),
    ("optim.lr_per_32_videos=uniform:1e-3", "expected uniform:LOW:HIGH, got 1 value(s)"),
    ("data.hflip=choice:true,maybe", "data.hflip: expected true or false, got 'maybe'"),
    ("data.test_crops=grid:1,2", "data.test_crops: '2' is not one of 1, 3"),
    ("train.seed=grid:1,1", "a value is repeated"),
])
def test_bad_search_texts_are_refused_naming_the_key(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_search([text])


def test_values_that_give_an_invalid_config_are_refused_before_any_trial():
    with pytest.raises(ConfigError, match=r"search optim.lr_per_32_videos=choice:-1.0,0.01: the value '-1.0' gives an "
                                          r"invalid config: optim.lr_per_32_videos must be > 0"):
        parse_search(["optim.lr_per_32_videos=choice:-1,1e-2"]).check(load_config(DEMO))
    with pytest.raises(ConfigError, match="search train.seed: given twice"):
        parse_search(["train.seed=grid:0,1", "train.seed=choice:2,3"])


def test_several_texts_follow_one_search_flag():
    from jobs.sweep import _SEARCH_TEXT
    from pipeline.config import one_value_per_flag

    argv = ["--config", "x.yaml", "--search", "a.b=choice:1,2", "c.d=loguniform:1:2", "e.f=3", "--trials", "3"]
    assert one_value_per_flag(argv, "--search", _SEARCH_TEXT.fullmatch) == [
        "--config", "x.yaml", "--search", "a.b=choice:1,2", "--search", "c.d=loguniform:1:2", "e.f=3", "--trials", "3"]


def test_asha_stops_a_weak_trial_at_a_rung_but_never_at_the_last_epoch():
    from ray.tune.schedulers import TrialScheduler

    from pipeline.training.sweep import EarlyStopping

    scheduler = EarlyStopping(epochs=2, grace_epochs=1, reduction_factor=2)
    scheduler.set_search_properties("val_loss", "min")
    good, weak, late = (SimpleNamespace(trial_id=t, is_finished=lambda: False) for t in ("good", "weak", "late"))
    for trial in (good, weak, late):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good, {"epoch": 1, "val_loss": 1.0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, weak, {"epoch": 1, "val_loss": 5.0}) == TrialScheduler.STOP
    # ASHA itself stops every trial at max_t; the last epoch must go on to log the trial's models.
    assert scheduler.on_trial_result(None, good, {"epoch": 2, "val_loss": 0.9}) == TrialScheduler.CONTINUE
    # A trial that resumed past the first rung is judged at the last epoch, and goes on as well.
    assert scheduler.on_trial_result(None, late, {"epoch": 2, "val_loss": 9.0}) == TrialScheduler.CONTINUE


def test_the_schedulers_rungs_survive_a_restore_through_the_recorders_state():
    """Tune restores a sweep's trials and searcher, not its scheduler: the rungs ride in the callback's state.
    Both are pickled in one file (tuner.pkl), so the restored callback holds the restored scheduler."""
    import ray.cloudpickle as pickle
    from ray.tune.schedulers import TrialScheduler

    from pipeline.training.sweep import EarlyStopping, TrialRecorder

    def fresh():
        scheduler = EarlyStopping(epochs=3, grace_epochs=1, reduction_factor=2)
        scheduler.set_search_properties("val_loss", "min")
        recorder = TrialRecorder({}, sweep="s", parent_run_id="p", metric="val_loss", scheduler=scheduler)
        return pickle.loads(pickle.dumps({"scheduler": scheduler, "callbacks": [recorder]}))

    before = fresh()
    good = SimpleNamespace(trial_id="good", is_finished=lambda: False)
    before["scheduler"].on_trial_add(None, good)
    assert before["scheduler"].on_trial_result(None, good, {"epoch": 1, "val_loss": 1.0}) == TrialScheduler.CONTINUE
    saved = pickle.dumps(before["callbacks"][0].get_state())

    after = fresh()  # the experiment restored: a new scheduler from tuner.pkl, the callback's state set on it
    after["callbacks"][0].set_state(pickle.loads(saved))
    assert after["callbacks"][0].scheduler is after["scheduler"]
    weak = SimpleNamespace(trial_id="weak", is_finished=lambda: False)  # never added: a trial started anew
    assert after["scheduler"].on_trial_result(None, weak, {"epoch": 1, "val_loss": 5.0}) == TrialScheduler.STOP


def test_a_stopped_trial_stays_stopped_whichever_of_stop_and_teardown_error_is_recorded_first(tmp_path):
    """ASHA's stop kills the trial's Train controller, and the trial's fit() may raise for that in the
    moment before its actor ends: its failure must not replace the stop, in either order."""
    from pipeline.tracking import sweeps
    from pipeline.tracking.runs import client_for, find_or_create_run
    from tests.tracking.conftest import tiny_config

    cfg = tiny_config(f"sqlite:///{tmp_path / 'mlflow.db'}", run_name="sw")
    client = client_for(cfg)
    last = {"epoch": 1, "step": 2, "val_loss": 3.0}
    for trial_id, stop_first in (("t_00000", True), ("t_00001", False)):
        trial_cfg = tiny_config(cfg.tracking.tracking_uri, run_name=f"sw-{trial_id}")
        run_id = find_or_create_run(trial_cfg, sweeps.trial_tags("sw", "parent", trial_id, {"train.seed": 1}))
        teardown = RuntimeError("the Train controller died")
        if stop_first:
            sweeps.record_stopped(cfg, "sw", trial_id, last, "ASHA stopped it")
            sweeps.record_failed(cfg, run_id, teardown)
        else:
            sweeps.record_failed(cfg, run_id, teardown)
            sweeps.record_stopped(cfg, "sw", trial_id, last, "ASHA stopped it")
        run = client.get_run(run_id)
        assert (run.info.status, run.data.tags[sweeps.DECISION_TAG]) == ("KILLED", "stopped_early"), trial_id
        assert "sweep.error" not in run.data.tags and run.data.metrics["val_loss"] == 3.0


def test_the_best_completed_trial_is_registered_once_and_a_stopped_ones_better_value_does_not_count(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import sweeps
    from pipeline.tracking.runs import set_tags
    from tests.tracking.conftest import fake_training, tiny_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(uri, run_name="sw", extra=("tracking.registered_model=sweep-best",))
    parent_id, resumed = sweeps.find_or_create_parent(cfg, {"search.optim.weight_decay": "uniform:0.0:0.1"},
                                                      search_text="optim.weight_decay: uniform:0.0:0.1\n")
    assert not resumed
    client = MlflowClient(uri, registry_uri=uri)
    runs = {}
    # val_top1 after each trial's last validation; the stopped trial's is the highest, at an earlier epoch.
    for trial_id, val_top1, decision in (("t0", 0.5, sweeps.COMPLETED), ("t1", 0.7, sweeps.COMPLETED),
                                         ("t2", 0.9, sweeps.STOPPED_EARLY), ("t3", 0.0, sweeps.FAILED)):
        runs[trial_id] = fake_training(tiny_config(uri, run_name=f"sw-{trial_id}"), val_top1=val_top1,
                                       finish=decision == sweeps.COMPLETED)  # only completed trials log models
        set_tags(client, runs[trial_id], {**sweeps.trial_tags("sw", parent_id, trial_id, {"optim.weight_decay": 0.1}),
                                          sweeps.DECISION_TAG: decision})

    summary = sweeps.finish_sweep(cfg, parent_id, metric="val_top1", register_as="sweep-best")
    assert (summary["best_trial"], summary["best_run_id"]) == ("t1", runs["t1"])
    assert (summary["trials_completed"], summary["trials_stopped_early"], summary["trials_failed"]) == (2, 1, 1)
    challenger = client.get_model_version_by_alias("sweep-best", "challenger")
    assert challenger.run_id == runs["t1"] and challenger.tags["sweep_parent_run_id"] == parent_id
    assert client.get_run(parent_id).info.status == "FINISHED"
    # Finished again (a rerun of a finished sweep): the same version, nothing registered twice.
    assert sweeps.finish_sweep(cfg, parent_id, metric="val_top1", register_as="sweep-best")["registered_version"] == \
        int(challenger.version) == 1


def test_trials_in_flight_are_what_the_cluster_holds():
    from pipeline.training.sweep import concurrent_trials

    cpu = load_config(DEMO, ["train.num_workers=1"])  # 0.5 CPU worker + 0.5 decode + 0.25 trial actor
    assert concurrent_trials(cpu, {"CPU": 2.0}, 0.25) == 1
    assert concurrent_trials(cpu, {"CPU": 16.0}, 0.25) == 12
    gpu = load_config(DEMO, ["train.use_gpu=true", "train.num_workers=4"])
    assert concurrent_trials(gpu, {"CPU": 256.0, "GPU": 8.0}, 0.25) == 2
    assert concurrent_trials(gpu, {"CPU": 256.0, "GPU": 2.0}, 0.25) == 1  # one trial, waiting for its workers


def test_a_cluster_too_small_for_one_trial_is_named():
    from pipeline.training.sweep import one_trial_short

    # The demo's 2 workers x 0.5 CPU and the trial's 0.25 leave 0.75 CPU, and Ray Data's stream asks for 1.
    assert one_trial_short(load_config(DEMO, []), {"CPU": 2.0}, 0.25) == (
        "a trial needs 2.25 CPUs (1 for train.num_workers=2 x train.cpus_per_worker=0.5, 0.25 for its actor "
        "(--trial-cpus), 1 for Ray Data's stream) and the cluster has 2")
    assert one_trial_short(load_config(DEMO, ["train.num_workers=1"]), {"CPU": 2.0}, 0.25) == ""


@pytest.mark.parametrize("args, message", [
    (["--search", "train.seed=grid:0,1", "--trials", "3"],
     "--trials 3: the search's grid dimensions make 2 combinations, each run once per sample; give a multiple of 2"),
    (["--search", "train.seed=grid:0,1", "--trials", "2", "--grace-epochs", "12"],
     "--grace-epochs 12 leaves no epoch to stop a trial at"),
    (["--search", "train.seed=grid:0,1", "--trials", "2", "--metric", "train_loss"],
     "--metric train_loss: trials are compared on a validation metric"),
    ([], "the search space is empty"),
])
def test_bad_sweeps_fail_before_any_ray_work(tmp_path, args, message):
    cmd = [sys.executable, "-m", "jobs.sweep", "--config", str(DEMO), *args,
           f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})  # any Ray call would hang or fail
    assert proc.returncode == 2, proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and message in errors[0], proc.stderr


# ---------------------------------------------------------------------------------------------
# A sweep end to end


@pytest.fixture(scope="module")
def sweep_set(tmp_path_factory):
    """The demo's synthetic motion set, small (27 training and 9 validation videos)."""
    from tests.training.test_train import prepared_motion_set

    return prepared_motion_set(tmp_path_factory.mktemp("sweep_motion"), videos_per_class=6)


def demo_init(path: Path, *, seed: int, confident_wrong: bool = False) -> Path:
    """A checkpoint of the demo's network, freshly initialised; `confident_wrong`: one that predicts class 0
    for everything with near certainty, whose validation loss stays about 25 whatever a step or two of
    training does, so that ASHA must stop it."""
    import torch

    from model import create_uniformer

    torch.manual_seed(seed)
    state = create_uniformer("uniformer_xs", num_classes=6).state_dict()
    if confident_wrong:
        state["head.bias"][0] = 30.0
    torch.save(state, path)
    return path


def wait_for(predicate, timeout_s: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        assert proc.poll() is None, log.read_text()[-5000:]
        time.sleep(2)
    raise AssertionError(f"timed out; log:\n{log.read_text()[-5000:]}")


def test_a_sweep_stops_weak_trials_records_failures_continues_after_a_stop_and_registers_the_best(
        tmp_path, sweep_set, two_cpu_cluster):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import sweeps

    bad_init = demo_init(tmp_path / "confident_wrong.pt", seed=0, confident_wrong=True)
    missing = tmp_path / "missing.pt"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # One search dimension, a grid, so that the trials and their order are known, one at a time: the plain
    # start (completes), a start ASHA must stop at the first rung, and one whose checkpoint is missing, which
    # fails on that only if the stopped trial's workers gave their CPUs back (else its workers never start).
    cmd = [sys.executable, "-m", "jobs.sweep", "--config", str(DEMO), f"data.manifest={sweep_set}",
           f"train.storage_path={tmp_path / 'ray_results'}", f"tracking.tracking_uri={uri}", "train.run_name=sw",
           "tracking.registered_model=sweep-demo", "optim.epochs=2", "optim.warmup_epochs=0",
           "train.max_steps_per_epoch=1", "train.val_every_epochs=1", "train.num_workers=1", "train.max_failures=0",
           "--search", f"model.init_from=grid:,{bad_init},{missing}", "--trials", "3",
           "--metric", "val_loss", "--reduction-factor", "2", "--max-concurrent", "1"]
    env = {**os.environ, "RAY_ADDRESS": two_cpu_cluster}
    client = MlflowClient(uri, registry_uri=uri)  # not the registry an earlier test set in this process

    def decided():
        experiment = client.get_experiment_by_name("uniformer-demo")
        if experiment is None:
            return []
        return [r for r in client.search_runs([experiment.experiment_id], "tags.job = 'sweep_trial'")
                if r.data.tags.get(sweeps.DECISION_TAG)]

    # Started, then stopped (Ctrl-C) once the first trial is decided.
    log1 = tmp_path / "first.log"
    with open(log1, "w") as out:
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(decided, 900, first, log1)
            first.send_signal(signal.SIGINT)
            assert first.wait(timeout=300) == 1, log1.read_text()[-5000:]
        finally:
            first.kill()
    summary1 = json.loads([line for line in log1.read_text().splitlines() if line.startswith("{")][-1])
    assert summary1["interrupted"] and summary1["trials_undecided"] >= 1, summary1
    before = {r.info.run_id: r for r in decided()}

    # Started again: it continues the same sweep to the end.
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert second.returncode == 0, second.stdout[-5000:] + second.stderr[-5000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["resumed"] and not summary["interrupted"] and summary["parent_run_id"] == summary1["parent_run_id"]
    counts = (summary["trials_completed"], summary["trials_stopped_early"], summary["trials_failed"])
    assert counts == (1, 1, 1), summary

    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["job"] == "sweep"
    assert parent.data.params["search.model.init_from"].startswith("grid:,")
    assert parent.data.tags["sweep.best_run_id"] == summary["best_run_id"]
    runs = {r.data.params["model.init_from"]: r for r in decided()}
    assert len(decided()) == 3 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs.values())

    best = runs[""]  # the one completed trial (which of several is best: the test above)
    assert best.data.tags[sweeps.DECISION_TAG] == "completed" and best.info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(best.info.run_id, "train_loss")} == {1, 2}
    assert best.info.run_id in before  # decided before the stop, and not trained again after it
    assert summary["best_run_id"] == best.info.run_id

    stopped = runs[str(bad_init)]
    assert stopped.info.status == "KILLED" and stopped.data.tags[sweeps.DECISION_TAG] == "stopped_early"
    assert stopped.data.tags["sweep.last_epoch"] == "1" and "ASHA stopped it after epoch 1 of 2" in \
        stopped.data.tags["sweep.stop_reason"]
    assert client.get_metric_history(stopped.info.run_id, "val_loss")[-1].value > 10  # its curve, up to the stop

    failed = runs[str(missing)]
    assert failed.info.status == "FAILED" and failed.data.tags[sweeps.DECISION_TAG] == "failed"
    error = failed.data.tags["sweep.error"]
    assert "NotFoundError" in error and "missing.pt: no such file" in error
    assert "error.txt" in {a.path for a in client.list_artifacts(failed.info.run_id)}

    challenger = client.get_model_version_by_alias("sweep-demo", "challenger")
    assert challenger.run_id == best.info.run_id and challenger.tags["sweep"] == "sw"
    assert summary["model_uri"] == "models:/sweep-demo@challenger"
