"""The Model Registry: register a training's classifier as the `challenger`, promote it to `champion`
only when it beats the champion on the same evaluation data. Aliases and tags, never stages.

A version's metrics are version tags. Those measured on its own evaluation data carry plain names
(`val_top1`, `eval_top1`, ...) beside `eval_manifest_hash` / `eval_manifest_uri` / `eval_split`;
those measured later on other data (when a newer challenger was compared against it) are
`metric.<hash12>.<split>.<name>`. Promotion compares the two versions only on one manifest hash
and split: the champion is evaluated on the challenger's data when it has no such metric yet,
and the promotion is refused when that data cannot be found unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import Config

CHALLENGER, CHAMPION = "challenger", "champion"
EVAL_KEYS = ("eval_manifest_hash", "eval_manifest_uri", "eval_split")
_METRIC_PREFIXES = ("val_", "eval_")


class RegistryError(RuntimeError):
    """A registry operation cannot go ahead; the message says why and what to do."""


def _metric_tag(manifest_hash: str, split: str, metric: str) -> str:
    return f"metric.{manifest_hash[:12]}.{split}.{metric}"


def _find_logged_model(client: MlflowClient, run) -> Any:
    models = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{tracking.PYFUNC_MODEL_NAME}'")
    if not models:
        raise RegistryError(f"run {run.info.run_id} has no logged model {tracking.PYFUNC_MODEL_NAME!r}: was the "
                            "training finished (tracking.finish_training_run)?")
    return max(models, key=lambda m: m.creation_timestamp)


def _eval_runs(client: MlflowClient, run) -> list:
    """Evaluation runs of this training run (`uniformer evaluate`), newest first."""
    return client.search_runs([run.info.experiment_id],
                              filter_string=f"tags.source_run_id = '{run.info.run_id}' AND tags.job = 'evaluate'",
                              order_by=["attributes.start_time DESC"], max_results=50)


def register(cfg: Config, run_id: str, name: str) -> dict[str, Any]:
    """A new version of `name` from the run's video classifier, tagged with the run's validation
    metrics, evaluation manifest hash, run id and code version; alias `challenger` moves to it."""
    client = tracking.client_for(cfg)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RegistryError(f"no run {run_id!r} at {client.tracking_uri}; pass the run_id printed by "
                            "`uniformer train`") from None
    logged = _find_logged_model(client, run)
    params, metrics = run.data.params, run.data.metrics
    tags: dict[str, Any] = {"run_id": run_id, "code_version": params.get("code.version", "unknown"),
                            "variant": params.get("model.variant", ""),
                            "eval_manifest_hash": params.get("data.manifest_hash", ""),
                            "eval_manifest_uri": params.get("data.manifest_uri", params.get("data.manifest", "")),
                            "eval_split": params.get("data.val_split", "val")}
    tags.update({k: v for k, v in metrics.items() if k.startswith("val_")})
    # Multi-view evaluations of this run (`uniformer evaluate`) travel along, keyed by their data.
    for eval_run in reversed(_eval_runs(client, run)):
        h, split = eval_run.data.params.get("eval.manifest_hash"), eval_run.data.params.get("eval.split")
        if not h or not split:
            continue
        for k, v in eval_run.data.metrics.items():
            if k.startswith("eval_"):
                if h == tags["eval_manifest_hash"] and split == tags["eval_split"]:
                    tags[k] = v
                tags[_metric_tag(h, split, k)] = v
    try:
        client.create_registered_model(name, description="UniFormer video classifier (pyfunc: video -> top-k labels)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=logged.model_uri, run_id=run_id,
                                          tags={k: tracking._param_value(v) for k, v in tags.items()},
                                          model_id=logged.model_id)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return {"name": name, "version": int(version.version), "alias": CHALLENGER, "run_id": run_id,
            "model_uri": f"models:/{name}@{CHALLENGER}", "source": logged.model_uri,
            **{k: tags[k] for k in ("code_version", "eval_manifest_hash", "eval_split")},
            **{k: v for k, v in tags.items() if k.startswith(_METRIC_PREFIXES)}}


# ---------------------------------------------------------------------------------------------
# Promotion


@dataclass
class Decision:
    decision: str  # promoted | rejected | refused | unchanged
    reason: str
    challenger: dict[str, Any]
    champion: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "reason": self.reason, "challenger": self.challenger,
                "champion": self.champion}


def _alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def version_metric(version, metric: str, manifest_hash: str, split: str) -> float | None:
    """The version's `metric` measured on (manifest_hash, split), or None."""
    tags = version.tags
    if tags.get("eval_manifest_hash") == manifest_hash and tags.get("eval_split") == split and metric in tags:
        return float(tags[metric])
    value = tags.get(_metric_tag(manifest_hash, split, metric))
    return None if value is None else float(value)


def _evaluate_champion(cfg: Config, name: str, champion, metric: str, manifest_uri: str, manifest_hash: str,
                       split: str) -> float:
    """Measure `metric` of the champion on the challenger's data with the metric's protocol:
    `val_*` as training validates (1 clip x 1 crop), `eval_*` with the model's test views."""
    from pipeline.evaluate import evaluate
    from pipeline.manifest import manifest_hash as hash_of
    from pipeline.manifest import read_manifest

    table = read_manifest(manifest_uri, storage=cfg.storage)
    if hash_of(table) != manifest_hash:
        raise RegistryError(f"the challenger's evaluation manifest {manifest_uri} has changed since it was "
                            f"measured (hash {manifest_hash[:12]} then, {hash_of(table)[:12]} now); evaluate "
                            "both versions on one manifest with `uniformer evaluate` and register again")
    views = (1, 1) if metric.startswith("val_") else None
    result = evaluate(cfg, f"models:/{name}/{champion.version}", manifest_uri, split=split, views=views,
                      manifest=table)
    key = "eval_" + metric.split("_", 1)[1]
    if key not in result:
        raise RegistryError(f"evaluation gives no {key!r} to compare as {metric!r}; metrics: "
                            f"{', '.join(k for k in result if k.startswith('eval_'))}")
    return float(result[key])


def promote(cfg: Config, name: str, *, metric: str = "val_top1", min_delta: float = 0.0, dry_run: bool = False,
            evaluate_champion: Callable[..., float] | None = None) -> dict[str, Any]:
    """Move alias `champion` to the `challenger` when challenger >= champion + min_delta on the same
    evaluation data; record the decision and both metrics as version tags (not on a dry run)."""
    if not metric.startswith(_METRIC_PREFIXES):
        raise RegistryError(f"metric {metric!r} is not a validation or evaluation metric; use val_top1, "
                            "val_top5, val_mean_class or their eval_* (multi-view) forms")
    client = tracking.client_for(cfg)
    challenger = _alias(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"model {name!r} has no {CHALLENGER!r} version; register one with "
                            f"`uniformer register --run RUN_ID --name {name}`")
    champion = _alias(client, name, CHAMPION)
    manifest_hash = challenger.tags.get("eval_manifest_hash", "")
    split = challenger.tags.get("eval_split", "val")
    ch_value = version_metric(challenger, metric, manifest_hash, split) if manifest_hash else None
    ch_info = {"version": int(challenger.version), metric: ch_value, "run_id": challenger.run_id}
    base = {"name": name, "metric": metric, "min_delta": min_delta, "manifest_hash": manifest_hash, "split": split,
            "dry_run": dry_run}

    if champion is None:
        decision = Decision("promoted", "no champion yet", ch_info, None)
    elif champion.version == challenger.version:
        decision = Decision("unchanged", f"version {challenger.version} is already {CHAMPION}", ch_info,
                            {"version": int(champion.version)})
    elif ch_value is None:
        decision = Decision("refused", f"challenger version {challenger.version} has no {metric} on its evaluation "
                            "data (tags eval_manifest_hash/eval_split); register it from a run that validated, or "
                            "evaluate it with `uniformer evaluate`", ch_info, {"version": int(champion.version)})
    else:
        champ_value = version_metric(champion, metric, manifest_hash, split)
        champ_info = {"version": int(champion.version), metric: champ_value, "run_id": champion.run_id}
        reason = ""
        if champ_value is None:
            manifest_uri = challenger.tags.get("eval_manifest_uri", "")
            if not manifest_uri:
                reason = (f"champion version {champion.version} was measured on other data than the challenger "
                          f"(manifest {champion.tags.get('eval_manifest_hash', '?')[:12]} vs {manifest_hash[:12]}) "
                          "and the challenger's manifest URI is unknown, so the champion cannot be evaluated on it")
            else:
                try:
                    champ_value = (evaluate_champion or _evaluate_champion)(
                        cfg, name, champion, metric, manifest_uri, manifest_hash, split)
                except (RegistryError, ValueError, OSError) as err:
                    reason = f"cannot evaluate champion version {champion.version} on {manifest_uri}: {err}"
                else:
                    champ_info[metric] = champ_value
                    champ_info["evaluated_now"] = True
                    if not dry_run:
                        client.set_model_version_tag(name, champion.version, _metric_tag(manifest_hash, split, metric),
                                                     str(champ_value))
        if champ_value is None:
            decision = Decision("refused", reason, ch_info, champ_info)
        elif ch_value >= champ_value + min_delta:
            decision = Decision("promoted", f"{metric} {ch_value:.4f} >= {champ_value:.4f} + {min_delta}",
                                ch_info, champ_info)
        else:
            decision = Decision("rejected", f"{metric} {ch_value:.4f} < {champ_value:.4f} + {min_delta}",
                                ch_info, champ_info)

    if not dry_run and decision.decision != "unchanged":
        record = {"promotion.decision": decision.decision, "promotion.reason": decision.reason,
                  "promotion.metric": metric, "promotion.min_delta": min_delta,
                  "promotion.manifest_hash": manifest_hash, "promotion.challenger_value": ch_value,
                  "promotion.champion_version": "" if champion is None else champion.version,
                  "promotion.champion_value": "" if decision.champion is None else decision.champion.get(metric),
                  "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for key, value in record.items():
            client.set_model_version_tag(name, challenger.version, key, tracking._param_value(
                "" if value is None else value))
        if decision.decision == "promoted":
            client.set_registered_model_alias(name, CHAMPION, challenger.version)
            if champion is not None:
                client.set_model_version_tag(name, champion.version, "promotion.replaced_by", challenger.version)
    return {**base, **decision.as_dict(), "model_uri": f"models:/{name}@{CHAMPION}"}
