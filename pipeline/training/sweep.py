"""`uniformer sweep`: a Ray Tune search over the typed config, each trial one Ray Train training.

    summary = run_sweep(cfg, space, SweepOptions(trials=8))     # jobs/sweep.py

How it runs (Ray 2.60, Ray Train V2; Ray's "Hyperparameter Tuning with Ray Tune" pattern):

- The driver runs a `ray.tune.Tuner` over `run_trial`, a function Tune runs in one small actor per
  trial (`SweepOptions.trial_cpus` CPUs). The trial builds its config (the base config with the
  sampled values, `train.run_name` = `<sweep>-<trial id>`), opens its MLflow run under the sweep's
  parent and calls `TorchTrainer.fit()` from `driver.make_trainer`: the training `uniformer train`
  runs, its workers placed by Ray Train and its decode tasks by Ray Data as usual. A trial that
  cannot get its workers waits in Ray Train; `max_concurrent` (by default what the cluster's GPUs, or
  CPUs, hold at once) keeps the other trials queued in Tune instead.
- Metrics reach Tune through the Train run's reports: `ValidatedEpochs`, a Ray Train user callback
  (Ray's `TuneReportCallback`, kept to validated epochs), hands rank 0's report of each validated
  epoch to the trial's Tune session. `EarlyStopping` (ASHA on `epoch`) compares trials there and
  stops weak ones; it never stops a trial at its last epoch, which still logs its models. A stopped
  trial's actor ends, and its Train run with it; the driver's `TrialRecorder` callback records the
  decision on the trial's run. A trial that raises is recorded failed and Tune goes on with the others.
- Ray Train removes a run's worker placement group when its controller ends, and after an ungraceful
  end its detached `PlacementGroupCleaner` does, but only where Ray's State API answers (a cluster
  with its dashboard). A stopped trial's controller dies with the trial's actor, so the trial records
  its group (`trial_loop_per_worker`, rank 0, as the run's `sweep.placement_group` tag) and the
  driver removes it a few seconds after the stop: without that, a local sweep's next trial could
  wait forever for the CPUs the stopped one still held. Then it also records the stop again, over
  any failure the trial recorded while its Train run was torn down.
- When every trial is decided, the best completed trial by the metric is registered as the
  challenger (`pipeline.tracking.sweeps.finish_sweep`), for `uniformer promote` as usual.
- Stopped and started again (the same command), the sweep continues: Tune's experiment lives at
  `<train.storage_path>/<sweep>` and is restored (`Tuner.restore`); decided trials stay decided,
  unfinished ones start again, their Train runs (under `<train.storage_path>/<sweep>/trainings`,
  named after the trial) resume from their latest checkpoints and their MLflow runs continue.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import ray
import ray.train
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from pipeline.config import Config, ConfigError, checkpoint_order, config_from_dict, with_values
from pipeline.data.storage import absolute, join, ray_storage
from pipeline.tracking import sweeps
from pipeline.tracking.runs import with_resolved_tracking
from pipeline.training.search_space import SearchSpace, trial_values

log = logging.getLogger(__name__)

TRAININGS = "trainings"  # the trials' Ray Train runs, inside the sweep's Tune experiment folder
SETTLE_AFTER_S = 10.0  # a stopped trial's actor and Train controller are gone well within this


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    trials: int = 8  # the trial budget (a multiple of the grid's size when the space has grid dimensions)
    metric: str = ""  # a validation metric; "" = train.checkpoint_metric
    grace_epochs: int = 0  # ASHA's first rung; 0 = train.val_every_epochs (the first validation)
    reduction_factor: int = 3  # ASHA keeps the best 1/reduction_factor of the trials at each rung
    max_concurrent: int = 0  # trials in flight at once; 0 = what the cluster holds (`concurrent_trials`)
    trial_cpus: float = 0.25  # CPUs of each trial's actor (the Train run's driver), besides its workers
    register_as: str = ""  # registered model for the best trial; "" = tracking.registered_model
    seed: int = 0  # the random search's seed


class ValidatedEpochs(TuneReportCallback):
    """Ray Train user callback: rank 0's report of each validated epoch, to the trial's Tune session.

    The training loop reports every epoch, with the latest validation's metrics carried along; only
    the epochs it validated (every `train.val_every_epochs`, and the last) hold fresh ones, and those
    are what ASHA must compare. Runs in the Train controller; Tune's callback passes the metrics to
    the trial's actor through a Ray queue, as `ray.tune.report` there would."""

    def __init__(self, val_every_epochs: int, epochs: int):
        super().__init__()
        self.val_every_epochs, self.epochs = val_every_epochs, epochs

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        epoch = int(metrics[0].get("epoch", 0))
        if epoch % self.val_every_epochs == 0 or epoch == self.epochs:
            numbers = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}
            super().after_report(run_context, [numbers, *metrics[1:]], checkpoint)


class EarlyStopping(AsyncHyperBandScheduler):
    """ASHA on the validated epochs (`time_attr="epoch"`), except that a trial at its last epoch goes on:
    it still has to log its models, and a stop there would kill it halfway.

    Tune restores a search's trials and searcher but not its scheduler, whose rungs hold what the trials
    reached: `state`/`set_state` carry them through `TrialRecorder`'s callback state, which Tune saves
    with the experiment and restores. A trial the restored records do not know is added on first sight."""

    def __init__(self, *, epochs: int, grace_epochs: int, reduction_factor: int):
        super().__init__(time_attr="epoch", max_t=epochs, grace_period=grace_epochs,
                         reduction_factor=reduction_factor)
        self.epochs, self.reduction_factor = epochs, reduction_factor

    def _known(self, trial) -> None:
        if trial.trial_id not in self._trial_info:
            self.on_trial_add(None, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._known(trial)
        decision = super().on_trial_result(tune_controller, trial, result)  # records the rung either way
        return TrialScheduler.CONTINUE if result.get("epoch", 0) >= self.epochs else decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._known(trial)
        super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._known(trial)
        super().on_trial_remove(tune_controller, trial)

    def state(self) -> dict:
        """Everything ASHA keeps (what its own `save` pickles): rungs with each trial's value, trials' brackets."""
        return dict(self.__dict__)

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)


class TrialRecorder(tune.Callback):
    """Runs in the sweep's driver: records the scheduler's stops and Tune's trial errors on the trials'
    MLflow runs (a stopped trial's actor is gone, so it cannot record its own end)."""

    def __init__(self, config: dict, *, sweep: str, parent_run_id: str, metric: str, scheduler: EarlyStopping):
        self.config, self.sweep, self.parent_run_id = config, sweep, parent_run_id
        # The same object as the Tuner's scheduler, also once restored (Tune pickles both in one file).
        self.metric, self.scheduler = metric, scheduler
        self.best_at: dict[int, float] = {}  # the best metric seen at each validated epoch, for the reason
        # Stopped trials to settle a few seconds later: (when, trial id, last result, stop reason).
        self.to_settle: list[tuple[float, str, dict, str]] = []

    def __setstate__(self, state: dict) -> None:
        # Restored from a sweep's tuner.pkl, which an older version of this class may have written.
        self.__dict__.update({"best_at": {}, "to_settle": [], **state})

    def get_state(self) -> dict:
        """Saved by Tune with the experiment's state: the scheduler's rungs and the best value per epoch."""
        return {"scheduler": self.scheduler.state(), "best_at": dict(self.best_at)}

    def set_state(self, state: dict) -> None:
        self.scheduler.set_state(state["scheduler"])
        self.best_at = dict(state["best_at"])

    def _cfg(self) -> Config:
        return config_from_dict(self.config)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        epoch, value = int(result.get("epoch", 0)), result.get(self.metric)
        if isinstance(value, (int, float)):
            better = max if checkpoint_order(self.metric) == "max" else min
            self.best_at[epoch] = better(value, self.best_at.get(epoch, value))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = dict(trial.last_result or {})
        epoch, epochs = int(last.get("epoch", 0)), self._cfg().optim.epochs
        if epoch >= epochs:
            return  # the trial ran every epoch and recorded that itself
        value, best = last.get(self.metric), self.best_at.get(epoch)
        value = f"{value:.4g}" if isinstance(value, (int, float)) else "?"
        reason = (f"ASHA stopped it after epoch {epoch} of {epochs}: {self.metric} {value} was not among the best "
                  f"1/{self.scheduler.reduction_factor} of the trials that reached that rung"
                  + (f" (best at epoch {epoch}: {best:.4g})" if best is not None else ""))
        self._record_stop(trial.trial_id, last, reason)
        self.to_settle.append((time.monotonic() + SETTLE_AFTER_S, trial.trial_id, last, reason))

    def _record_stop(self, trial_id: str, last: dict, reason: str):
        try:
            return sweeps.record_stopped(self._cfg(), self.sweep, trial_id, last, reason)
        except Exception as err:  # noqa: BLE001 - a tracking outage must not end the sweep
            log.warning("sweep %s: could not record the stop of trial %s: %s", self.sweep, trial_id,
                        sweeps.error_line(err))
            return None

    def on_step_begin(self, iteration, trials, **info) -> None:
        self._settle(time.monotonic())

    def on_experiment_end(self, trials, **info) -> None:
        self._settle(float("inf"))

    def _settle(self, now: float) -> None:
        """For stopped trials whose time has come (their actor and Train controller are gone): record the
        stop again (the trial may have recorded a failure as its Train run was torn down) and remove the
        Train run's worker placement group (see the module docstring)."""
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        due = [entry for entry in self.to_settle if entry[0] <= now]
        self.to_settle = [entry for entry in self.to_settle if entry[0] > now]
        for _, trial_id, last, reason in due:
            run = self._record_stop(trial_id, last, reason)
            group = run.data.tags.get(sweeps.PLACEMENT_GROUP_TAG) if run is not None else None
            if not group:
                continue
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))
                log.info(f"sweep {self.sweep}: removed placement group {group} of stopped trial {trial_id}")
            except Exception as err:  # noqa: BLE001 - already removed, or the cluster is going away
                log.debug("placement group %s not removed: %s", group, err)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = trial.get_error()
        sweeps.record_failed_trial(self._cfg(), self.sweep, self.parent_run_id, trial.trial_id,
                                   trial_values(trial.config), error if error is not None else "the trial failed")


def trial_loop_per_worker(loop_config: dict) -> None:
    """`train_loop_per_worker`, after rank 0 has recorded its worker group's placement group on the trial's
    run, for the driver to remove if the trial is stopped (see the module docstring)."""
    from pipeline.tracking.runs import client_for, set_tags
    from pipeline.training.loop import train_loop_per_worker

    group = ray.util.get_current_placement_group()
    if ray.train.get_context().get_world_rank() == 0 and group is not None and loop_config.get("mlflow_run_id"):
        set_tags(client_for(config_from_dict(loop_config["config"])), loop_config["mlflow_run_id"],
                 {sweeps.PLACEMENT_GROUP_TAG: group.id.hex()})
    train_loop_per_worker(loop_config)


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def run_trial(sampled: dict, base: dict, sweep: dict) -> None:
    """One trial, in its Tune actor: the sampled config's training on Ray Train, tracked as a run under
    the sweep's parent. A trial decided before a restart reports its result again and trains nothing."""
    from pipeline.data.manifest import read_manifest
    from pipeline.tracking.datasets import dataset_labels
    from pipeline.tracking.logged_models import finish_training_run
    from pipeline.tracking.runs import client_for, find_or_create_run, ray_run_name
    from pipeline.training.driver import make_trainer
    from pipeline.training.loop import load_checkpoint_state

    trial_id = tune.get_context().get_trial_id()
    base_cfg, values = config_from_dict(base), trial_values(sampled)
    tags = sweeps.trial_tags(sweep["name"], sweep["parent_run_id"], trial_id, values)
    try:
        cfg = with_values(base_cfg, {**values, "train.run_name": trial_run_name(sweep["name"], trial_id),
                                     "train.storage_path": sweep["trainings"]})
    except ConfigError as err:  # values valid alone, not together
        sweeps.record_failed_trial(base_cfg, sweep["name"], sweep["parent_run_id"], trial_id, values, err)
        raise
    manifest = read_manifest(cfg.data.manifest, storage=cfg.storage)
    run_id = find_or_create_run(cfg, tags, manifest=manifest)
    decided = sweeps.decided_result(client_for(cfg), client_for(cfg).get_run(run_id))
    if decided is not None:
        tune.report(decided)
        return
    try:
        trainer = make_trainer(cfg, run_id, manifest=manifest, ray_run_name=ray_run_name(cfg, run_id),
                               callbacks=(ValidatedEpochs(cfg.train.val_every_epochs, cfg.optim.epochs),),
                               loop=trial_loop_per_worker)
        result = trainer.fit()
        state = load_checkpoint_state(result.checkpoint)
        finish_training_run(cfg, run_id, state, dataset_labels(cfg, manifest))
        sweeps.record_completed(cfg, run_id, state)
    except BaseException as err:
        sweeps.record_failed(cfg, run_id, err)
        raise


def concurrent_trials(cfg: Config, resources: dict[str, float], trial_cpus: float) -> int:
    """Trials the cluster holds at once: by GPUs for GPU trainings, else by CPUs (each trial's workers,
    one decode task and the trial's own actor). At least 1: more trials than fit only wait for workers."""
    if cfg.train.use_gpu:
        return max(1, int(resources.get("GPU", 0) // cfg.train.num_workers))
    need = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.data.decode_cpus + trial_cpus
    return max(1, int(resources.get("CPU", 0) // need))


def one_trial_short(cfg: Config, resources: dict[str, float], trial_cpus: float) -> str:
    """Why the cluster's CPUs cannot hold one trial ("" when they can): its workers, its actor, and one
    whole CPU for Ray Data's stream (its step that cuts an epoch into one block per decode task asks for
    a CPU, and the stream never starts without one)."""
    workers = cfg.train.num_workers * cfg.train.cpus_per_worker
    need = workers + trial_cpus + max(1.0, cfg.data.decode_cpus)
    have = resources.get("CPU", 0)
    if have >= need:
        return ""
    return (f"a trial needs {need:g} CPUs ({workers:g} for train.num_workers={cfg.train.num_workers} x "
            f"train.cpus_per_worker={cfg.train.cpus_per_worker:g}, {trial_cpus:g} for its actor (--trial-cpus), "
            f"{max(1.0, cfg.data.decode_cpus):g} for Ray Data's stream) and the cluster has {have:g}")


def _options(cfg: Config, space: SearchSpace, opts: SweepOptions) -> SweepOptions:
    """`opts` with defaults filled in from `cfg`, checked against it and the space."""
    metric = opts.metric or cfg.train.checkpoint_metric
    allowed = ("val_top1", "val_top5", "val_mean_class", "val_loss")
    if metric not in allowed:
        raise ConfigError(f"--metric {metric}: trials are compared on a validation metric, one of {', '.join(allowed)}")
    grace = opts.grace_epochs or cfg.train.val_every_epochs
    if grace >= cfg.optim.epochs:
        raise ConfigError(f"--grace-epochs {grace} leaves no epoch to stop a trial at (optim.epochs="
                          f"{cfg.optim.epochs}); lower it or raise optim.epochs")
    if opts.reduction_factor < 2:
        raise ConfigError(f"--reduction-factor {opts.reduction_factor}: ASHA keeps 1/reduction_factor of the trials "
                          "at each rung; use 2 or more (3 is the default)")
    grid = space.grid_size()
    if opts.trials < 1 or opts.trials % grid:
        raise ConfigError(f"--trials {opts.trials}: the search's grid dimensions make {grid} combinations, each run "
                          f"once per sample; give a multiple of {grid}")
    if not opts.trial_cpus > 0:
        raise ConfigError(f"--trial-cpus {opts.trial_cpus} must be > 0 (each trial's actor reserves it)")
    return dataclasses.replace(opts, metric=metric, grace_epochs=grace,
                               register_as=opts.register_as or cfg.tracking.registered_model)


def parent_params(cfg: Config, space: SearchSpace, opts: SweepOptions, manifest) -> dict[str, Any]:
    """What the parent run records: the base config less the searched keys, the data, the space, ASHA."""
    from pipeline.tracking.datasets import manifest_params

    params = {k: v for k, v in cfg.to_flat_dict().items() if k not in space.keys}
    params.update(manifest_params(cfg.data.manifest, manifest))
    params.update({f"search.{k}": v for k, v in space.specs().items()})
    params.update({"sweep.trials": opts.trials, "sweep.metric": opts.metric,
                   "sweep.mode": checkpoint_order(opts.metric), "sweep.scheduler": "asha",
                   "sweep.grace_epochs": opts.grace_epochs,
                   "sweep.reduction_factor": opts.reduction_factor, "sweep.seed": opts.seed})
    return params


def run_sweep(cfg: Config, space: SearchSpace, opts: SweepOptions) -> dict[str, Any]:
    """Check the inputs, open (or continue) the parent run, run (or restore) the Tune experiment, then
    register the best trial. With trials left undecided (the sweep was stopped), returns
    `interrupted: true` and registers nothing: the same command continues it."""
    import yaml

    from pipeline.cluster.connect import init_ray
    from pipeline.training.driver import checked_manifest, with_absolute_inputs
    from pipeline.training.ingest import usable_rows

    cfg = with_absolute_inputs(with_resolved_tracking(cfg))  # trials run in other folders and processes
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, storage_path=absolute(cfg.train.storage_path)))
    space.check(cfg)
    opts = _options(cfg, space, opts)
    manifest = checked_manifest(cfg)
    if not usable_rows(manifest, cfg.data.val_split).num_rows:
        raise ConfigError(f"data.manifest has no usable {cfg.data.val_split!r} videos: a sweep compares its trials "
                          "on the validation split")
    name = cfg.train.run_name
    search_text = yaml.safe_dump(space.specs(), sort_keys=False)
    parent_id, resumed = sweeps.find_or_create_parent(cfg, parent_params(cfg, space, opts, manifest),
                                                      search_text=search_text)
    init_ray()
    resources = ray.cluster_resources()
    short = one_trial_short(cfg, resources, opts.trial_cpus)
    if short:  # an autoscaling cluster may still grow; a fixed one would wait forever
        log.warning(f"sweep {name}: {short}; its trials wait until the cluster grows (or lower "
                    "train.num_workers or train.cpus_per_worker)")
    max_concurrent = opts.max_concurrent or concurrent_trials(cfg, resources, opts.trial_cpus)
    experiment = join(cfg.train.storage_path, name)
    storage_path, storage_fs = ray_storage(cfg.train.storage_path, storage=cfg.storage)
    experiment_path, _ = ray_storage(experiment, storage=cfg.storage)
    sweep = {"name": name, "parent_run_id": parent_id, "trainings": join(experiment, TRAININGS)}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg.to_dict(), sweep=sweep),
                                    {"CPU": opts.trial_cpus})
    restoring = tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs)
    if restoring:
        log.info(f"sweep {name}: continuing the Tune experiment at {experiment}")
        tuner = tune.Tuner.restore(experiment_path, trainable, storage_filesystem=storage_fs)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        scheduler = EarlyStopping(epochs=cfg.optim.epochs, grace_epochs=opts.grace_epochs,
                                  reduction_factor=opts.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                metric=opts.metric, mode=checkpoint_order(opts.metric), num_samples=opts.trials // space.grid_size(),
                # The generator's own limit: Tune ignores max_concurrent_trials for a variant generator.
                search_alg=BasicVariantGenerator(max_concurrent=max_concurrent, random_state=opts.seed),
                scheduler=scheduler),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=0),  # Train retries workers (train.max_failures)
                callbacks=[TrialRecorder(cfg.to_dict(), sweep=name, parent_run_id=parent_id, metric=opts.metric,
                                         scheduler=scheduler)]))
    tuner.fit()
    common = {"sweep": name, "parent_run_id": parent_id, "tracking_uri": cfg.tracking.tracking_uri,
              "experiment_path": experiment, "resumed": resumed or restoring, "metric": opts.metric,
              # A restored sweep keeps the limit it started with (its search algorithm's state).
              "max_concurrent": None if restoring else max_concurrent, "trials_budget": opts.trials,
              "rung_epochs": rung_epochs(cfg.optim.epochs, opts.grace_epochs, opts.reduction_factor)}
    # Trials that Tune ends when the sweep is stopped count as terminated in its results: the decisions
    # recorded on the trials' runs say whether every trial ran its course.
    undecided = opts.trials - sweeps.decided_trials(cfg, parent_id)
    if undecided > 0:
        return {**common, "interrupted": True, "trials_undecided": undecided}
    return {**common, "interrupted": False, **sweeps.finish_sweep(cfg, parent_id, metric=opts.metric,
                                                                  register_as=opts.register_as)}


def rung_epochs(epochs: int, grace_epochs: int, reduction_factor: int) -> list[int]:
    """The epochs at which ASHA compares trials (its rungs below the last epoch), for the job's summary."""
    rungs, epoch = [], grace_epochs
    while epoch < epochs:
        rungs.append(epoch)
        epoch = int(math.ceil(epoch * reduction_factor))
    return rungs
