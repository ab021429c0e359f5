"""The Model Registry: register a training's classifier as the `challenger`, promote it to `champion`
only when it is better than the champion with a paired test on the same videos. Aliases and tags,
never stages.

A version's tags say where it is to be judged (`eval_manifest_hash`, `eval_manifest_uri`,
`eval_split`: its training's validation data); its metrics are MLflow 3 model metrics of its logged
model (training validation and every evaluation, keyed by dataset), not version tags. The evidence
for promotion is the per-video prediction table (`predictions.parquet`) of the evaluation runs of
each version's logged model, keyed by manifest hash, split and views (`pipeline.tracking.predictions`).
Each decision is kept as its own JSON record in the challenger's run (`decisions` reads them back);
promoters apply decisions under `pipeline.tracking.promotion_lock`.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import Config
from pipeline.data.storage import StorageError
from pipeline.tracking import gate
from pipeline.tracking import predictions as pred
from pipeline.tracking.logged_models import PYFUNC_MODEL_NAME
from pipeline.tracking.promotion_lock import (LOCK_TTL_S, STOP_ENV, LockError, PromotionLock, holder,  # noqa: F401
                                              promotion_lock)
from pipeline.tracking.runs import param_value, client_for

CHALLENGER, CHAMPION = "challenger", "champion"
EVAL_KEYS = ("eval_manifest_hash", "eval_manifest_uri", "eval_split")
DECISIONS = "promotion"  # artifact folder of the challenger's run: <name>/v<version>/decision-<lock generation>.json
MAX_ATTEMPTS = 3  # decisions made again when the aliases moved while deciding


class RegistryError(RuntimeError):
    """A registry operation cannot go ahead; the message says why and what to do."""


def _find_logged_model(client: MlflowClient, run) -> Any:
    models = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{PYFUNC_MODEL_NAME}'")
    if not models:
        raise RegistryError(f"run {run.info.run_id} has no logged model {PYFUNC_MODEL_NAME!r}: was the "
                            "training finished (finish_training_run)?")
    return max(models, key=lambda m: m.creation_timestamp)


def model_metrics(client: MlflowClient, model_id: str) -> list[dict[str, Any]]:
    """The logged model's metrics (what the registry shows as a version's metrics), newest last."""
    metrics = sorted(client.get_logged_model(model_id).metrics or [], key=lambda m: m.timestamp)
    return [{"key": m.key, "value": m.value, "dataset": m.dataset_name, "run_id": m.run_id} for m in metrics]


def register(cfg: Config, run_id: str, name: str) -> dict[str, Any]:
    """A new version of `name` from the run's video classifier, tagged with its evaluation data, run id
    and code version; alias `challenger` moves to it."""
    client = client_for(cfg)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RegistryError(f"no run {run_id!r} at {client.tracking_uri}; pass the run_id printed by "
                            "`uniformer train`") from None
    logged = _find_logged_model(client, run)
    params = run.data.params
    tags: dict[str, Any] = {"run_id": run_id, "code_version": params.get("code.version", "unknown"),
                            "variant": params.get("model.variant", ""),
                            "eval_manifest_hash": params.get("data.manifest_hash", ""),
                            "eval_manifest_uri": params.get("data.manifest_uri", params.get("data.manifest", "")),
                            "eval_split": params.get("data.val_split", "val")}
    try:
        client.create_registered_model(name, description="UniFormer video classifier (pyfunc: video -> top-k labels)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=logged.model_uri, run_id=run_id,
                                          tags={k: param_value(v) for k, v in tags.items()},
                                          model_id=logged.model_id)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return {"name": name, "version": int(version.version), "alias": CHALLENGER, "run_id": run_id,
            "model_uri": f"models:/{name}@{CHALLENGER}", "source": logged.model_uri, "model_id": logged.model_id,
            **{k: tags[k] for k in ("code_version", "eval_manifest_hash", "eval_split")},
            **{k: v for k, v in run.data.metrics.items() if k.startswith("val_")},
            "model_metrics": model_metrics(client, logged.model_id)}


# ---------------------------------------------------------------------------------------------
# Evidence: the prediction tables of a version's evaluations


def _evaluation_runs(client: MlflowClient, version, manifest_hash: str, split: str) -> list:
    """FINISHED evaluation runs of the version's logged model on (manifest_hash, split), newest first."""
    from pipeline.tracking.inference import version_model_id

    model_id = version_model_id(version)
    if not model_id or not version.run_id:
        return []
    experiment = client.get_run(version.run_id).info.experiment_id
    return client.search_runs([experiment], filter_string=(
        f"tags.job = 'evaluate' AND tags.model_id = '{model_id}' AND attributes.status = 'FINISHED' "
        f"AND params.`eval.manifest_hash` = '{manifest_hash}' AND params.`eval.split` = '{split}'"),
        order_by=["attributes.start_time DESC"], max_results=50)


def _predictions_of(client: MlflowClient, run):
    """The run's prediction table, or None for an evaluation logged before tables were kept."""
    if pred.ARTIFACT not in {a.path for a in client.list_artifacts(run.info.run_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return pred.read(client.download_artifacts(run.info.run_id, pred.ARTIFACT, tmp))


def find_evidence(client: MlflowClient, version, manifest_hash: str, split: str,
                  views: tuple[int, int] | None = None):
    """The newest prediction table of `version` on (manifest_hash, split) and, when given, views
    (test clips, test crops); None when there is none."""
    for run in _evaluation_runs(client, version, manifest_hash, split):
        params = run.data.params
        if views and (int(params.get("eval.test_clips", 0)), int(params.get("eval.test_crops", 0))) != views:
            continue
        table = _predictions_of(client, run)
        if table is not None:
            return table
    return None


def _evaluate_now(cfg: Config, name: str, version, manifest_uri: str, key_hash: str, split: str,
                  views: tuple[int, int] | None, *, log: bool):
    """Evaluate the version on the manifest when it is unchanged (logged unless `log` is false)."""
    from pipeline.data.manifest import manifest_hash, read_manifest
    from pipeline.tracking.evaluate import log_evaluation, run_evaluation

    table = read_manifest(manifest_uri, storage=cfg.storage)
    if manifest_hash(table) != key_hash:
        raise RegistryError(f"the challenger's evaluation manifest {manifest_uri} has changed since it was "
                            f"measured (hash {key_hash[:12]} then, {manifest_hash(table)[:12]} now); evaluate "
                            "both versions on one manifest with `uniformer evaluate` and register again")
    splits = set(table.column("split").to_pylist()) - {None}
    if split not in splits:  # before loading a model: a mistyped --eval-split is common
        raise RegistryError(f"the manifest {manifest_uri} has no split {split!r}; its splits: {', '.join(sorted(splits))}")
    evaluation = run_evaluation(cfg, f"models:/{name}/{version.version}", manifest_uri, split=split, views=views,
                                manifest=table)
    if log:
        log_evaluation(cfg, evaluation, manifest_uri=manifest_uri)
    return evaluation.predictions


# ---------------------------------------------------------------------------------------------
# Promotion


@dataclass
class Decision:
    decision: str  # promoted | rejected | refused | unchanged | lost_lock
    reason: str
    challenger: dict[str, Any]
    champion: dict[str, Any] | None
    test: dict[str, Any] | None = None  # the paired test: gate.PairedResult fields
    key: dict[str, Any] = field(default_factory=dict)  # manifest_hash, split, views


def _alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _decide(cfg: Config, client: MlflowClient, name: str, challenger, champion, *, metric: str, confidence: float,
            min_delta: float, eval_split: str | None, dry_run: bool) -> Decision:
    ch_info = {"version": int(challenger.version), "run_id": challenger.run_id}
    if champion is None:
        return Decision("promoted", "no champion yet", ch_info, None)
    champ_info = {"version": int(champion.version), "run_id": champion.run_id}
    if champion.version == challenger.version:
        return Decision("unchanged", f"version {challenger.version} is already {CHAMPION}", ch_info, champ_info)
    # A named held-out split of the same manifest when asked, else the challenger's own validation split.
    manifest_hash = challenger.tags.get("eval_manifest_hash", "")
    split = eval_split or challenger.tags.get("eval_split", "val")
    manifest_uri = challenger.tags.get("eval_manifest_uri", "")
    if not manifest_hash:
        return Decision("refused", f"challenger version {challenger.version} has no evaluation data (tag "
                        "eval_manifest_hash); register it from a training run with a manifest", ch_info, champ_info)
    try:
        # The challenger's own views unless it was evaluated already; the champion then on exactly those.
        ours = find_evidence(client, challenger, manifest_hash, split)
        if ours is None:
            ours = _evaluate_now(cfg, name, challenger, manifest_uri, manifest_hash, split, None, log=not dry_run)
            ch_info["evaluated_now"] = True
        key = pred.key_of(ours)
        theirs = find_evidence(client, champion, manifest_hash, split, (key.test_clips, key.test_crops))
        if theirs is None:
            theirs = _evaluate_now(cfg, name, champion, manifest_uri, manifest_hash, split,
                                   (key.test_clips, key.test_crops), log=not dry_run)
            champ_info["evaluated_now"] = True
        result = gate.compare(ours, theirs, metric=metric)
    except (RegistryError, StorageError, ValueError, OSError) as err:  # GateError and InferenceError too
        return Decision("refused", f"cannot compare version {challenger.version} with champion version "
                        f"{champion.version} on manifest {manifest_hash[:12]}, split {split!r}: {err}",
                        ch_info, champ_info)
    ch_info[metric], champ_info[metric] = result.challenger_value, result.champion_value
    better, reason = gate.decide(result, confidence=confidence, min_delta=min_delta)
    return Decision("promoted" if better else "rejected", reason, ch_info, champ_info, result.as_dict(),
                    {"manifest_hash": key.manifest_hash, "split": key.split, "views": key.views})


def _apply(client: MlflowClient, name: str, challenger, champion, decision: Decision) -> None:
    if decision.decision == "promoted":
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
        if champion is not None:
            client.set_model_version_tag(name, champion.version, "promotion.replaced_by", challenger.version)


def _record(client: MlflowClient, lock: PromotionLock, challenger, champion, decision: Decision, *, metric: str,
            confidence: float, min_delta: float) -> str:
    """Keep the decision as `promotion/<name>/v<version>/decision-<lock generation>.json` in the challenger's
    run (a new file per decision: generations of a name's lock are never reused, so a re-decision never
    overwrites an earlier one; a run may hold several versions) and, while the lock is ours, summarise it
    as the challenger's `promotion.*` tags. Returns the record's URI."""
    test = decision.test or {}
    record = {"promotion.decision": decision.decision, "promotion.reason": decision.reason,
              "promotion.metric": metric, "promotion.confidence": confidence, "promotion.min_delta": min_delta,
              "promotion.test": test.get("test", "none (no champion)" if champion is None else "none"),
              "promotion.p_value": test.get("p_value", ""), "promotion.paired_videos": test.get("paired_videos", ""),
              "promotion.challenger_value": test.get("challenger_value", ""),
              "promotion.champion_value": test.get("champion_value", ""),
              "promotion.manifest_hash": decision.key.get("manifest_hash",
                                                          challenger.tags.get("eval_manifest_hash", "")),
              "promotion.split": decision.key.get("split", challenger.tags.get("eval_split", "")),
              "promotion.views": decision.key.get("views", ""),
              "promotion.champion_version": "" if champion is None else int(champion.version),
              "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "promotion.record": f"{_decisions_folder(lock.name, challenger.version)}/decision-{lock.generation}.json"}
    evidence = {key.removeprefix("promotion."): value for key, value in record.items()}
    evidence.update(model=lock.name, challenger_version=int(challenger.version), test=decision.test,
                    lock={"generation": lock.generation, "owner": lock.token})
    client.log_text(challenger.run_id, json.dumps(evidence, indent=1, default=str), record["promotion.record"])
    if decision.decision != "lost_lock":  # a stalled promoter must not overwrite the holder's summary
        for key, value in record.items():
            client.set_model_version_tag(lock.name, challenger.version, key, param_value(value))
    return f"runs:/{challenger.run_id}/{record['promotion.record']}"


def _decisions_folder(name: str, version: int | str) -> str:
    return f"{DECISIONS}/{name}/v{version}"


def decisions(client: MlflowClient, name: str, version: int | str) -> list[dict[str, Any]]:
    """Every decision recorded on a version, oldest first (the lock generation orders them)."""
    run_id = client.get_model_version(name, str(version)).run_id
    files = [a.path for a in client.list_artifacts(run_id, _decisions_folder(name, version))
             if a.path.endswith(".json")]
    files.sort(key=lambda path: int(path.rsplit("-", 1)[-1].removesuffix(".json")))
    with tempfile.TemporaryDirectory() as tmp:
        return [json.loads(open(client.download_artifacts(run_id, path, tmp)).read()) for path in files]


def promote(cfg: Config, name: str, *, metric: str = "eval_top1", confidence: float = 0.95, min_delta: float = 0.0,
            eval_split: str | None = None, dry_run: bool = False, lock_timeout_s: float = 300.0,
            lock_ttl_s: float = LOCK_TTL_S) -> dict[str, Any]:
    """Move alias `champion` to the `challenger` when it is better on the videos both evaluated (one-sided
    McNemar exact test at `confidence`, and by at least `min_delta`); with no champion, the challenger
    becomes champion. Missing evaluations are run (on the challenger's manifest, views and split, or on
    `eval_split` of that manifest when given: a held-out split neither model was selected on).

    Deciding takes no lock (evaluations may run for minutes); applying it does. Holding `promotion_lock`,
    right before moving the alias, the promoter checks that both aliases are where it decided (else it
    decides again) and that the lock is still its own (else it moves nothing and reports `lost_lock`: it
    stalled past the lock's ttl and another promoter broke the lock). Each decision is kept as a record
    in the challenger's run (`_record`). `dry_run` decides the same way and writes nothing: no run, tag,
    alias, lock or artifact."""
    if metric not in gate.METRICS:
        raise RegistryError(f"metric {metric!r} has no paired test; use {' or '.join(gate.METRICS)} (top-1 or "
                            "top-5 correctness per video, from `uniformer evaluate`)")
    if not 0.5 <= confidence < 1:
        raise RegistryError(f"confidence {confidence} is outside [0.5, 1); 0.95 promotes when p <= 0.05")
    if not lock_ttl_s > 0:
        raise RegistryError(f"lock ttl {lock_ttl_s} s is not positive; the default {LOCK_TTL_S:g} s outlasts the few "
                            "writes a promoter does while holding the lock")
    client = client_for(cfg)
    notes: list[str] = []
    record = None
    for attempt in range(1, MAX_ATTEMPTS + 1):
        challenger = _alias(client, name, CHALLENGER)
        if challenger is None:
            raise RegistryError(f"model {name!r} has no {CHALLENGER!r} version; register one with "
                                f"`uniformer register --run RUN_ID --name {name}`")
        champion = _alias(client, name, CHAMPION)
        decision = _decide(cfg, client, name, challenger, champion, metric=metric, confidence=confidence,
                           min_delta=min_delta, eval_split=eval_split, dry_run=dry_run)
        if dry_run or decision.decision == "unchanged":
            break
        try:
            with promotion_lock(client, name, timeout_s=lock_timeout_s, ttl_s=lock_ttl_s) as lock:
                now_challenger, now_champion = _alias(client, name, CHALLENGER), _alias(client, name, CHAMPION)
                moved = ((now_challenger and now_challenger.version) != challenger.version
                         or (now_champion and now_champion.version) != (champion and champion.version))
                if not lock.held():  # the last read before the alias moves
                    decision = Decision(
                        "lost_lock", f"lost the promotion lock of {name!r} before moving {CHAMPION!r} (it stalled "
                        f"past the lock's {lock_ttl_s:g} s and another promoter broke it); moved nothing; its "
                        f"decision was {decision.decision}: {decision.reason}", decision.challenger,
                        decision.champion, decision.test, decision.key)
                elif not moved:
                    _apply(client, name, challenger, champion, decision)
                if decision.decision == "lost_lock" or not moved:
                    record = _record(client, lock, challenger, champion, decision, metric=metric,
                                     confidence=confidence, min_delta=min_delta)
                    break
        except LockError as err:
            raise RegistryError(str(err)) from None
        notes.append(f"attempt {attempt}: the aliases moved while deciding (challenger "
                     f"{challenger.version} -> {now_challenger and now_challenger.version}, champion "
                     f"{champion and champion.version} -> {now_champion and now_champion.version}); decided again")
    else:
        decision = Decision("refused", f"the aliases moved during each of {MAX_ATTEMPTS} decisions; nothing was "
                            "recorded, run promote again", decision.challenger, decision.champion)
    return {"name": name, "metric": metric, "confidence": confidence, "min_delta": min_delta, "dry_run": dry_run,
            "decision": decision.decision, "reason": decision.reason, "challenger": decision.challenger,
            "champion": decision.champion, "test": decision.test, **decision.key, "attempts": attempt,
            "notes": notes, "record": record, "model_uri": f"models:/{name}@{CHAMPION}"}
