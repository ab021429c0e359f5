"""A sweep in MLflow: one parent run, one child run per trial, the decision on each trial, the best
trial's classifier registered as the challenger.

    parent_id = find_or_create_parent(cfg, params)          # the sweep's driver, before any trial
    run_id = find_or_create_run(trial_cfg, trial_tags(...))  # each trial: a training run under the parent
    record_completed / record_stopped / record_failed       # the decision on a trial, as tags
    summary = finish_sweep(cfg, parent_id, ...)              # best completed trial -> challenger

The parent (`tags.job = 'sweep'`, named after the sweep) holds the base config and the search space
as params (`search.<key>`: `loguniform:1e-05:0.001`), the sweep's settings (`sweep.*`), and at the
end the best trial, the registered version and the counts of trials by decision. Each trial is an
ordinary training run (its whole config as params, its curves, its logged models when it completed)
tagged `mlflow.parentRunId`, so the MLflow UI nests the trials under the parent and compares them
side by side; `sweep.decision` is `completed`, `stopped_early` (run status KILLED, with
`sweep.stop_reason`) or `failed` (status FAILED, with `sweep.error` and the traceback in `error.txt`).
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from typing import Any

from mlflow.tracking import MlflowClient

from pipeline.config import RESUMABLE_KEYS, Config, ConfigError, changed_keys, checkpoint_order
from pipeline.tracking.redaction import redact
from pipeline.tracking.runs import (client_for, code_version, experiment_id, log_params, log_text, param_value,
                                    set_tags)

_log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests child runs by
SWEEP_TAG = "uniformer.sweep"  # parent and trials: the sweep's name
TRIAL_TAG = "uniformer.sweep_trial"  # trials: the Ray Tune trial id
DECISION_TAG = "sweep.decision"  # trials: completed | stopped_early | failed
PLACEMENT_GROUP_TAG = "sweep.placement_group"  # trials: the Train run's worker placement group (hex id)
COMPLETED, STOPPED_EARLY, FAILED = "completed", "stopped_early", "failed"
# What may differ when a sweep starts again: what a training may change on resume, except its length
# (ASHA's rungs were laid out for it). Everything else would make the restored search another one.
SWEEP_RESUMABLE = RESUMABLE_KEYS - {"optim.epochs"}


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def find_parent(client: MlflowClient, exp_id: str, name: str):
    found = client.search_runs([exp_id], filter_string=f"tags.job = 'sweep' AND tags.`{SWEEP_TAG}` = '{_quote(name)}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def find_or_create_parent(cfg: Config, params: dict[str, Any], *, search_text: str) -> tuple[str, bool]:
    """The sweep's parent run (named `train.run_name`) and whether it existed. A sweep of that name that
    searched another space, or on another base config or data, is refused naming the changed keys."""
    client = client_for(cfg)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    name = cfg.train.run_name
    run = find_parent(client, exp_id, name)
    logged = {k: param_value(v) for k, v in params.items() if k not in SWEEP_RESUMABLE}
    if run is not None:
        changed = changed_keys(run.data.params, logged)
        added = sorted(k for k in logged if k.startswith("search.") and k not in run.data.params)
        removed = sorted(k for k in run.data.params if k.startswith("search.") and k not in logged)
        if changed or added or removed:
            raise ConfigError(f"sweep {name!r} (MLflow run {run.info.run_id}) was started with other values of "
                              f"{', '.join(changed + added + removed)}; run it again unchanged to continue it, or "
                              "choose another train.run_name for a new sweep")
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, True
    tags = {"job": "sweep", SWEEP_TAG: name, "code_version": code_version(), "variant": cfg.model.variant}
    run = client.create_run(exp_id, run_name=name, tags={redact(k): param_value(v) for k, v in tags.items()})
    log_params(client, run.info.run_id, params)
    log_text(client, run.info.run_id, cfg.to_yaml(), "config.yaml")
    log_text(client, run.info.run_id, search_text, "search_space.yaml")
    return run.info.run_id, False


def trial_tags(sweep: str, parent_run_id: str, trial_id: str, values: dict[str, Any]) -> dict[str, str]:
    """Tags of a trial's run: under the parent, with its sampled values in one readable tag."""
    return {PARENT_TAG: parent_run_id, SWEEP_TAG: sweep, TRIAL_TAG: trial_id, "job": "sweep_trial",
            "sweep.values": json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})}


def find_trial(client: MlflowClient, exp_id: str, sweep: str, trial_id: str):
    found = client.search_runs([exp_id], filter_string=(f"tags.`{SWEEP_TAG}` = '{_quote(sweep)}' AND "
                                                        f"tags.`{TRIAL_TAG}` = '{_quote(trial_id)}'"),
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def trial_runs(client: MlflowClient, exp_id: str, sweep: str, parent_run_id: str) -> list:
    """Every trial run of the sweep, in trial order."""
    runs = client.search_runs([exp_id], filter_string=(f"tags.`{SWEEP_TAG}` = '{_quote(sweep)}' AND "
                                                       f"tags.`{PARENT_TAG}` = '{parent_run_id}'"), max_results=10_000)
    return sorted(runs, key=lambda r: r.data.tags.get(TRIAL_TAG, ""))


def decided_trials(cfg: Config, parent_run_id: str) -> int:
    """Trials of the sweep with a decision recorded (completed, stopped early or failed)."""
    client = client_for(cfg)
    runs = trial_runs(client, experiment_id(client, cfg.tracking.experiment), cfg.train.run_name, parent_run_id)
    return sum(r.data.tags.get(DECISION_TAG) in (COMPLETED, STOPPED_EARLY, FAILED) for r in runs)


def _log_missing(client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Log the validation metrics that the run lacks at `step` (a trial stopped right after it reported
    them may not have delivered them: its worker's metric thread ended with it)."""
    from pipeline.tracking.metrics import log_metrics

    missing = {k: v for k, v in metrics.items() if k.startswith("val_") and isinstance(v, (int, float))
               and not any(m.step == step for m in client.get_metric_history(run_id, k))}
    if missing:
        log_metrics(client, run_id, missing, step)


def record_completed(cfg: Config, run_id: str, state: dict) -> None:
    """A trial that trained every epoch (its models are logged and its run FINISHED)."""
    client = client_for(cfg)
    last_val = {k: v for k, v in (state.get("last_val") or {}).items() if k != "confusion"}
    _log_missing(client, run_id, last_val, int(state.get("step", 0)))
    set_tags(client, run_id, {DECISION_TAG: COMPLETED, "sweep.last_epoch": state.get("epoch", 0)})


def record_stopped(cfg: Config, sweep: str, trial_id: str, last_result: dict, reason: str):
    """A trial the scheduler stopped: decision, reason and last epoch as tags, run KILLED. A decision the
    trial recorded itself (it completed before a restart) is kept; a failure it recorded as its Train run
    was torn down is overwritten (called again a little later, this settles that race). Returns the run
    as it was, if any."""
    client = client_for(cfg)
    run = find_trial(client, experiment_id(client, cfg.tracking.experiment), sweep, trial_id)
    if run is None:
        _log.warning("sweep %s: trial %s was stopped before it opened its run; nothing recorded", sweep, trial_id)
        return None
    if run.data.tags.get(DECISION_TAG) in (COMPLETED, STOPPED_EARLY):
        return run
    if "step" in last_result:
        _log_missing(client, run.info.run_id, last_result, int(last_result["step"]))
    set_tags(client, run.info.run_id, {DECISION_TAG: STOPPED_EARLY, "sweep.stop_reason": reason,
                                       "sweep.last_epoch": int(last_result.get("epoch", 0))})
    if "sweep.error" in run.data.tags:  # the teardown's error, not the trial's (its error.txt stays)
        client.delete_tag(run.info.run_id, "sweep.error")
    client.set_terminated(run.info.run_id, "KILLED")
    return run


_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b.*")


def error_line(err: BaseException | str) -> str:
    """One line for `sweep.error`: the error's type and first line, and when its text holds another error
    (a Ray Train WorkerGroupError quotes the worker's traceback) that innermost error's line too."""
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    lines = [line.strip() for line in redact(text).splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    inner = [line for line in lines[1:] if _EXCEPTION_LINE.fullmatch(line)]
    return (lines[0] + (f" ... {inner[-1]}" if inner else ""))[:500]


def record_failed(cfg: Config, run_id: str, err: BaseException | str) -> None:
    """A trial that failed: `sweep.error` (the error's first line), `error.txt` (all of it), run FAILED.
    A run already decided completed or stopped is left as it is: a trial the scheduler stops loses its
    Train controller, and `fit()` may still raise for that in the moment before its actor ends. Never
    raises: the trial's own error is what must surface."""
    try:
        client = client_for(cfg)
        if client.get_run(run_id).data.tags.get(DECISION_TAG) in (COMPLETED, STOPPED_EARLY):
            return
        detail = err if isinstance(err, str) else "".join(traceback.format_exception(err))
        log_text(client, run_id, detail, "error.txt")
        set_tags(client, run_id, {DECISION_TAG: FAILED, "sweep.error": error_line(err)})
        client.set_terminated(run_id, "FAILED")
    except Exception as record_err:  # noqa: BLE001 - a tracking outage must not hide the trial's error
        _log.warning("could not record the failure of run %s: %s", run_id, error_line(record_err))


def record_failed_trial(cfg: Config, sweep: str, parent_run_id: str, trial_id: str, values: dict[str, Any],
                        err: BaseException | str) -> None:
    """A failed trial with no run yet (its config was invalid, or its actor died first): a run under the
    parent with its sampled values as params, recorded failed. An existing run is marked instead, unless
    it holds a decision already."""
    try:
        client = client_for(cfg)
        exp_id = experiment_id(client, cfg.tracking.experiment)
        run = find_trial(client, exp_id, sweep, trial_id)
        if run is not None:
            if run.data.tags.get(DECISION_TAG) not in (COMPLETED, STOPPED_EARLY, FAILED):
                record_failed(cfg, run.info.run_id, err)
            return
        run = client.create_run(exp_id, run_name=f"{sweep}-{trial_id}", tags={
            redact(k): param_value(v) for k, v in trial_tags(sweep, parent_run_id, trial_id, values).items()})
        log_params(client, run.info.run_id, values)
        record_failed(cfg, run.info.run_id, err)
    except Exception as record_err:  # noqa: BLE001
        _log.warning("could not record the failure of trial %s: %s", trial_id, error_line(record_err))


def decided_result(client: MlflowClient, run) -> dict[str, Any] | None:
    """What a trial decided before a restart reported last (its latest metrics and epoch), or None when
    the run holds no completed or stopped decision."""
    if run.data.tags.get(DECISION_TAG) not in (COMPLETED, STOPPED_EARLY):
        return None
    metrics = dict(run.data.metrics)
    metrics["epoch"] = int(run.data.tags.get("sweep.last_epoch", metrics.get("epoch", 0)))
    return metrics


def finish_sweep(cfg: Config, parent_run_id: str, *, metric: str, register_as: str) -> dict[str, Any]:
    """Pick the best completed trial by `metric` (its final validation), register its classifier as
    `register_as`'s challenger (once: a sweep finished again reports the version it registered), and
    close the parent with the summary. Raises SweepError when no trial completed (parent FAILED)."""
    from pipeline.tracking.metrics import log_metrics
    from pipeline.tracking.registry import register

    client = client_for(cfg)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    sweep = cfg.train.run_name
    runs = trial_runs(client, exp_id, sweep, parent_run_id)
    trials = [{"trial_id": r.data.tags.get(TRIAL_TAG), "run_id": r.info.run_id, "status": r.info.status,
               "decision": r.data.tags.get(DECISION_TAG, "undecided"), "values": json.loads(r.data.tags.get(
                   "sweep.values", "{}")), "last_epoch": int(r.data.tags.get("sweep.last_epoch", 0) or 0),
               metric: r.data.metrics.get(metric), "stop_reason": r.data.tags.get("sweep.stop_reason"),
               "error": r.data.tags.get("sweep.error")} for r in runs]
    counts = {d: sum(t["decision"] == d for t in trials) for d in (COMPLETED, STOPPED_EARLY, FAILED)}
    log_text(client, parent_run_id, json.dumps(trials, indent=1, default=str) + "\n", "trials.json")
    log_metrics(client, parent_run_id, {f"trials_{k}": v for k, v in counts.items()}, 0)
    completed = [t for t in trials if t["decision"] == COMPLETED and t[metric] is not None]
    if not completed:
        client.set_terminated(parent_run_id, "FAILED")
        raise SweepError(f"sweep {sweep!r}: no trial completed ({counts[STOPPED_EARLY]} stopped early, "
                         f"{counts[FAILED]} failed); see the trials' runs under MLflow run {parent_run_id}")
    sign = 1 if checkpoint_order(metric) == "max" else -1
    best = max(completed, key=lambda t: sign * t[metric])  # ties: the earlier trial (max keeps the first)
    parent = client.get_run(parent_run_id)
    version = parent.data.tags.get("sweep.registered_version")
    if version and parent.data.tags.get("sweep.best_run_id") == best["run_id"]:
        registered = {"name": parent.data.tags.get("sweep.registered_model"), "version": int(version),
                      "model_uri": f"models:/{parent.data.tags.get('sweep.registered_model')}/{version}"}
    else:
        registered = register(cfg, best["run_id"], register_as)
        client.set_model_version_tag(register_as, str(registered["version"]), "sweep", sweep)
        client.set_model_version_tag(register_as, str(registered["version"]), "sweep_parent_run_id", parent_run_id)
    set_tags(client, parent_run_id, {"sweep.best_run_id": best["run_id"], "sweep.best_trial": best["trial_id"],
                                     "sweep.best_values": json.dumps(best["values"]),
                                     "sweep.registered_model": registered["name"],
                                     "sweep.registered_version": registered["version"]})
    log_metrics(client, parent_run_id, {f"best_{metric}": best[metric]}, 0)
    client.set_terminated(parent_run_id, "FINISHED")
    return {"best_run_id": best["run_id"], "best_trial": best["trial_id"], f"best_{metric}": best[metric],
            "best_values": best["values"], "registered_model": registered["name"],
            "registered_version": registered["version"], "model_uri": registered["model_uri"],
            "trials_completed": counts[COMPLETED], "trials_stopped_early": counts[STOPPED_EARLY],
            "trials_failed": counts[FAILED], "trials": trials}


class SweepError(RuntimeError):
    """A sweep that cannot end with a registered model; the message says why."""
