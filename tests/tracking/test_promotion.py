"""The promotion gate: the prediction table, McNemar's exact test, paired decisions on logged
evaluations, and a dry run that writes nothing."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.manifest import manifest_hash, read_manifest
from pipeline.tracking import gate
from pipeline.tracking import predictions as pred
from pipeline.tracking import registry
from pipeline.tracking.inference import version_model_id
from pipeline.tracking.runs import client_for
from tests.tracking.conftest import LABELS, ROOT, fake_evaluation, fake_training, tiny_config


def _table(outcomes: list[bool | None], *, views: int = 2, manifest: str = "h" * 64):
    """A prediction table of len(outcomes) videos: True/False top-1 outcome, None unusable."""
    rows = []
    for i, right in enumerate(outcomes):
        usable = right is not None
        rows.append({"video_id": i, "path": f"v{i}.mp4", "label": 0, "label_name": "right",
                     "prediction": (0 if right else 1) if usable else None, "correct": right,
                     "top5_correct": True if usable else None, "views": views if usable else 0,
                     "top_labels": [], "top_scores": [], "status": "ok" if usable else "unreadable",
                     "reason": "" if usable else "moov atom not found"})
    return pred.with_key(pa.Table.from_pylist(rows, schema=pred.SCHEMA), pred.EvidenceKey(manifest, "val", views, 1))


def test_mcnemar_exact_p_is_the_binomial_tail():
    assert gate.mcnemar_exact_p(5, 0) == 1 / 32
    assert gate.mcnemar_exact_p(0, 0) == 1.0  # no discordant video: no evidence
    assert gate.mcnemar_exact_p(3, 3) == sum(math.comb(6, k) for k in range(3, 7)) / 64 > 0.5  # a tie
    assert gate.mcnemar_exact_p(8, 2) == pytest.approx(56 / 1024)  # (45 + 10 + 1) / 2^10
    assert gate.mcnemar_exact_p(9, 1) == pytest.approx(11 / 1024)


def _log_space_tail(a: int, b: int) -> float:
    """P(X >= a), X ~ Binomial(a + b, 1/2), summed in log space (a reference that stays fast)."""
    n = a + b
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2) for k in range(a, n + 1)]
    top = max(logs)
    return math.exp(top) * sum(math.exp(x - top) for x in logs)


def test_mcnemar_exact_p_at_ten_thousand_discordant_videos():
    """At 10,000 discordant videos the tail agrees with a log-space sum, far into the tail too, and
    the two tails of one split add up to 1 (X >= a and X <= a - 1 = X >= b + 1 by symmetry)."""
    for a, b in ((5100, 4900), (5500, 4500)):
        assert gate.mcnemar_exact_p(a, b) == pytest.approx(_log_space_tail(a, b), rel=1e-9)
    assert 0.02 < gate.mcnemar_exact_p(5100, 4900) < 0.03 and 0 < gate.mcnemar_exact_p(5500, 4500) < 1e-20
    assert gate.mcnemar_exact_p(5100, 4900) + gate.mcnemar_exact_p(4901, 5099) == pytest.approx(1.0, abs=1e-12)


def test_paired_comparison_uses_videos_both_scored_and_ties_never_promote():
    ours = _table([True] * 10 + [False] * 5 + [True, None])
    theirs = _table([False] * 9 + [True] + [False] * 5 + [None, True])
    result = gate.compare(ours, theirs)
    assert (result.paired_videos, result.challenger_only, result.champion_only) == (15, 9, 0)
    assert result.challenger_value == 10 / 15 and result.champion_value == 1 / 15
    assert result.p_value == 1 / 512 and result.test == "mcnemar_exact_one_sided"
    assert gate.decide(result, confidence=0.95, min_delta=0.0)[0]
    assert not gate.decide(result, confidence=0.999, min_delta=0.0)[0]
    assert "not significant at confidence 0.999" in gate.decide(result, confidence=0.999, min_delta=0.0)[1]
    assert "< min_delta 0.7" in gate.decide(result, confidence=0.95, min_delta=0.7)[1]

    tie = gate.compare(_table([True, False] * 10), _table([False, True] * 10))
    assert tie.challenger_value == tie.champion_value and tie.p_value > 0.5
    assert not gate.decide(tie, confidence=0.5, min_delta=0.0)[0]
    assert "not better" in gate.decide(tie, confidence=0.5, min_delta=0.0)[1]
    one_video = gate.compare(_table([True] * 20), _table([True] * 19 + [False]))
    assert one_video.p_value == 0.5 and not gate.decide(one_video, confidence=0.95, min_delta=0.0)[0]


def test_paired_comparison_refuses_other_views_or_data_naming_both():
    with pytest.raises(gate.GateError, match=r"challenger was measured on manifest hhhhhhhhhhhh, split 'val', "
                                             r"4x1 views but the champion on manifest hhhhhhhhhhhh, split 'val', "
                                             r"1x1 views"):
        gate.compare(_table([True], views=4), _table([True], views=1))
    with pytest.raises(gate.GateError, match="manifest gggggggggggg.*manifest hhhhhhhhhhhh"):
        gate.compare(_table([True], manifest="g" * 64), _table([True]))
    with pytest.raises(gate.GateError, match="no video on .* was scored by both models"):
        gate.compare(_table([True, None]), _table([None, True]))
    with pytest.raises(gate.GateError, match="compares eval_top1, eval_top5, not 'eval_mean_class'"):
        gate.compare(_table([True]), _table([True]), metric="eval_mean_class")


def test_prediction_table_has_one_row_per_split_video_unusable_included(tiny_videos):
    table = read_manifest(tiny_videos["manifest"])
    split = table.column("split").to_pylist()
    val = [i for i, s in enumerate(split) if s == "val"]
    ok_val = [i for i in val if table.column("status")[i].as_py() == "ok"][:2]
    label0 = table.column("label")[ok_val[0]].as_py()
    scores = np.zeros(3)
    scores[label0] = 2.0
    videos = {ok_val[0]: {"scores": scores + 0.2, "views": 2}}
    key = pred.EvidenceKey(manifest_hash(table), "val", 2, 1)
    out = pred.prediction_table(table, videos, key=key, labels=LABELS)
    assert out.column("video_id").to_pylist() == val and pred.key_of(out) == key
    rows = {r["video_id"]: r for r in out.to_pylist()}
    first = rows[ok_val[0]]
    assert first["status"] == "ok" and first["correct"] and first["prediction"] == label0 and first["views"] == 2
    assert first["top_labels"][0] == LABELS[label0] and first["top_scores"][0] == pytest.approx(1.1)
    assert rows[ok_val[1]]["status"] == "undecodable" and rows[ok_val[1]]["correct"] is None
    broken = next(r for r in rows.values() if r["path"].endswith("broken.mp4"))
    assert (broken["status"], broken["reason"], broken["views"]) == ("unreadable", "moov atom not found", 0)
    back = pred.read(pred.to_parquet_bytes(out))
    assert back.equals(out) and pred.key_of(back) == key


def _snapshot(client, name: str, work: Path) -> dict:
    """Everything promote could write: runs, version tags and aliases, model tags, artifact files."""
    model = client.get_registered_model(name)
    versions = client.search_model_versions(f"name = '{name}'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {"runs": sorted(r.info.run_id for r in client.search_runs(experiments, max_results=1000)),
            "model_tags": dict(model.tags), "aliases": dict(model.aliases),
            "version_tags": {v.version: dict(v.tags) for v in versions},
            "files": sorted(str(p) for p in (work / "mlartifacts").rglob("*"))}


def test_promotion_is_a_paired_test_on_logged_evaluations(embedded, paired_manifest, capsys):
    from jobs import promote as promote_job

    name = "uniformer-paired"
    cfg = tiny_config(manifest=paired_manifest)
    client = client_for(cfg)
    run_a = fake_training(cfg, val_top1=0.5, seed=0)
    fake_evaluation(cfg, run_a, paired_manifest, [True] * 15 + [False] * 15)
    registry.register(cfg, run_a, name)
    assert registry.promote(cfg, name)["reason"] == "no champion yet"
    assert client.get_model_version(name, "1").tags["promotion.test"] == "none (no champion)"

    # Better by one video: not evidence.
    run_b = fake_training(cfg, val_top1=0.9, seed=1)
    fake_evaluation(cfg, run_b, paired_manifest, [True] * 16 + [False] * 14)
    registry.register(cfg, run_b, name)
    one_more = registry.promote(cfg, name)
    assert one_more["decision"] == "rejected" and "not significant at confidence 0.95" in one_more["reason"]
    assert one_more["test"]["p_value"] == 0.5 and one_more["test"]["paired_videos"] == 30
    assert one_more["views"] == "2x1" and one_more["manifest_hash"] == manifest_hash(read_manifest(paired_manifest))

    # A clear win, first as a dry run that writes nothing, then through the CLI.
    fake_evaluation(cfg, run_b, paired_manifest, [True] * 25 + [False] * 5)  # the newest evaluation counts
    before = _snapshot(client, name, embedded)
    dry = registry.promote(cfg, name, dry_run=True)
    assert dry["decision"] == "promoted" and dry["dry_run"]
    assert _snapshot(client, name, embedded) == before
    capsys.readouterr()
    promote_job.main(["--name", name, "--confidence", "0.99", "--min-delta", "0.2"])
    decided = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert decided["decision"] == "promoted" and decided["test"]["challenger_only"] == 10
    assert decided["test"]["p_value"] == 1 / 1024 and decided["confidence"] == 0.99
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.test"] == "mcnemar_exact_one_sided"
    assert float(tags["promotion.p_value"]) == 1 / 1024 and tags["promotion.views"] == "2x1"
    assert float(tags["promotion.challenger_value"]) == 25 / 30 and float(tags["promotion.champion_value"]) == 0.5
    assert tags["promotion.champion_version"] == "1" and tags["promotion.confidence"] == "0.99"
    assert client.get_model_version(name, "1").tags["promotion.replaced_by"] == "2"
    assert registry.holder(client, name) is None
    assert registry.promote(cfg, name)["decision"] == "unchanged"

    # Both decisions on version 2 are kept, in order; the tags summarise the newest.
    kept = registry.decisions(client, name, 2)
    assert [(d["decision"], d["p_value"], d["champion_version"]) for d in kept] == [("rejected", 0.5, 1),
                                                                                   ("promoted", 1 / 1024, 1)]
    assert kept[0]["lock"]["generation"] < kept[1]["lock"]["generation"] and kept[1]["test"]["challenger_only"] == 10
    assert tags["promotion.record"] == f"promotion/{name}/v2/decision-{kept[1]['lock']['generation']}.json"
    assert decided["record"] == f"runs:/{run_b}/{tags['promotion.record']}"

    # The version's metrics are its logged model's, keyed by dataset; no metric tags.
    metrics = registry.model_metrics(client, version_model_id(client.get_model_version(name, "2")))
    assert {(m["key"], m["dataset"]) for m in metrics} >= {("val_top1", "prepared/val/1x1"),
                                                          ("eval_top1", "prepared/val/2x1")}
    assert [m["value"] for m in metrics if m["key"] == "eval_top1"][-1] == 25 / 30
    assert not [k for k in tags if k.startswith(("metric.", "val_", "eval_top"))]


def test_eval_split_judges_both_versions_on_a_held_out_split(embedded, held_out_manifest, capsys):
    """Version 2 is clearly better on the validation split it was selected on, and no better on the
    held-out `test` split: promote judges on `val` by default and on `test` with --eval-split test."""
    from jobs import promote as promote_job

    name = "uniformer-held-out"
    cfg = tiny_config(manifest=held_out_manifest)
    client = client_for(cfg)
    run_id = fake_training(cfg, val_top1=0.5, seed=0)
    fake_evaluation(cfg, run_id, held_out_manifest, [True] * 15 + [False] * 15)
    fake_evaluation(cfg, run_id, held_out_manifest, [True] * 20 + [False] * 10, split="test")
    registry.register(cfg, run_id, name)
    registry.promote(cfg, name)
    fake_training(cfg, val_top1=0.9, seed=1)
    fake_evaluation(cfg, run_id, held_out_manifest, [True] * 25 + [False] * 5)
    fake_evaluation(cfg, run_id, held_out_manifest, [True] * 20 + [False] * 10, split="test")
    registry.register(cfg, run_id, name)

    on_val = registry.promote(cfg, name, dry_run=True)
    assert (on_val["decision"], on_val["split"], on_val["test"]["challenger_only"]) == ("promoted", "val", 10)
    capsys.readouterr()
    promote_job.main(["--name", name, "--eval-split", "test"])
    held_out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (held_out["decision"], held_out["split"]) == ("rejected", "test") and "not better" in held_out["reason"]
    assert held_out["test"]["paired_videos"] == 30 and held_out["test"]["challenger_only"] == 0
    assert client.get_model_version(name, "2").tags["promotion.split"] == "test"
    assert registry.decisions(client, name, 2)[-1]["split"] == "test"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    nowhere = registry.promote(cfg, name, eval_split="tset", dry_run=True)
    assert nowhere["decision"] == "refused" and "has no split 'tset'; its splits: test, train, val" in nowhere["reason"]


def first_champion(cfg, name: str, manifest: str) -> str:
    """Version 1 of `name`, right on half of the 30 paired videos, promoted to champion; its run id."""
    run_id = fake_training(cfg, val_top1=0.5, seed=0)
    fake_evaluation(cfg, run_id, manifest, [True, False] * 15)
    registry.register(cfg, run_id, name)
    registry.promote(cfg, name)
    return run_id


def test_two_promotes_at_once_leave_one_champion_and_truthful_decisions(mlflow_server, paired_manifest, tmp_path):
    """Both processes decide against champion 1 while the test holds the promotion lock; once it is free,
    one moves the alias and the other sees the champion moved, decides again and reports `unchanged`."""
    name = "uniformer-race"
    cfg = tiny_config(mlflow_server, manifest=paired_manifest)
    client = client_for(cfg)
    first_champion(cfg, name, paired_manifest)
    run_b = fake_training(cfg, val_top1=0.9, seed=1)
    fake_evaluation(cfg, run_b, paired_manifest, [True] * 28 + [False] * 2)
    registry.register(cfg, run_b, name)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "jobs.promote", "--name", name, f"tracking.tracking_uri={mlflow_server}"]
    with registry.promotion_lock(client, name, ttl_s=3600):  # held until both wait, however slow their start
        procs = []
        for i in range(2):
            err = open(tmp_path / f"promote{i}.err", "w")
            procs.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err,
                                           text=True), tmp_path / f"promote{i}.err"))
        deadline = time.monotonic() + 240
        while not all("waiting for the promotion lock" in path.read_text() for _, path in procs):
            assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), \
                [path.read_text()[-2000:] for _, path in procs]
            time.sleep(0.2)
    outs = []
    for proc, path in procs:
        stdout, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, path.read_text()[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    winner, loser = sorted(outs, key=lambda o: o["decision"] != "promoted")
    assert (winner["decision"], loser["decision"]) == ("promoted", "unchanged")
    assert winner["champion"]["version"] == 1 and winner["attempts"] == 1
    assert loser["attempts"] == 2 and "champion 1 -> 2" in loser["notes"][0]
    assert loser["reason"] == "version 2 is already champion"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert client.get_model_version(name, "2").tags["promotion.champion_version"] == "1"
    assert client.get_model_version(name, "1").tags["promotion.replaced_by"] == "2"
    assert registry.holder(client, name) is None


def test_the_lock_ignores_the_local_clock_and_is_broken_only_when_expired(mlflow_server, monkeypatch):
    """A host whose clock runs years ahead waits for a live lock (expiry is the server's clock); a
    crashed holder's generation past its ttl is taken over by creating the next one, and the older
    generations are cleaned up."""
    from pipeline.tracking.promotion_lock import generations, lock_name

    name = "uniformer-lock"
    client = client_for(tiny_config(mlflow_server))
    with registry.promotion_lock(client, name) as first:
        monkeypatch.setattr(time, "time", lambda: 4e9)  # year 2096 on this host only
        with pytest.raises(registry.LockError, match=f"lock of '{name}' stayed taken for 1 s .*generation "
                                                     f"{first.generation}"):
            with registry.promotion_lock(client, name, timeout_s=1):
                pass
        monkeypatch.undo()
        assert first.held()
    assert not first.held() and registry.holder(client, name) is None

    gone = first.generation + 1  # a promoter that crashed holding the lock, its ttl spent by any clock
    client.create_registered_model(lock_name(name, gone), tags={"owner": "x", "host": "gone", "pid": "1", "ttl_s": "-1"})
    assert registry.holder(client, name) is None
    with registry.promotion_lock(client, name, timeout_s=5) as second:
        assert second.generation == gone + 1 and second.held()
        assert set(generations(client, name)) == {second.generation}


def _stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (state T in /proc/<pid>/stat, after the command name)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_a_promoter_stalled_past_the_lock_ttl_loses_the_lock_and_moves_nothing(mlflow_server, paired_manifest,
                                                                               tmp_path, capsys):
    """Promoter A decides on version 2, takes the lock (3 s ttl) and stops itself right there (SIGSTOP, as a
    stalled host would). Version 3 is registered; promoter B (this process) waits until A's lock is
    expired by the server's clock, breaks it and promotes version 3. A, resumed by SIGCONT, finds the lock
    is no longer its own: it moves nothing, records lost_lock and exits 1. The champion is B's decision."""
    name = "uniformer-stall"
    cfg = tiny_config(mlflow_server, manifest=paired_manifest)
    client = client_for(cfg)
    run_id = first_champion(cfg, name, paired_manifest)
    fake_training(cfg, val_top1=0.8, seed=1)
    fake_evaluation(cfg, run_id, paired_manifest, [True] * 25 + [False] * 5)
    registry.register(cfg, run_id, name)
    fake_training(cfg, val_top1=0.9, seed=2)  # the logged model version 3 will be registered from
    fake_evaluation(cfg, run_id, paired_manifest, [True] * 30)

    err_path = tmp_path / "stalled.err"
    with open(err_path, "w") as err:
        stalled = subprocess.Popen(
            [sys.executable, "-m", "jobs.promote", "--name", name, "--lock-ttl", "3",
             f"tracking.tracking_uri={mlflow_server}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), registry.STOP_ENV: "1"})
    try:
        deadline = time.monotonic() + 240
        while not _stopped(stalled.pid):
            assert stalled.poll() is None and time.monotonic() < deadline, err_path.read_text()[-3000:]
            time.sleep(0.1)
        assert "holding the promotion lock" in err_path.read_text()
        assert registry.holder(client, name) is not None

        registry.register(cfg, run_id, name)
        capsys.readouterr()
        fresh = registry.promote(cfg, name)
        assert (fresh["decision"], fresh["challenger"]["version"], fresh["champion"]["version"]) == ("promoted", 3, 1)
        assert "broke the expired promotion lock" in capsys.readouterr().err
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    stdout, _ = stalled.communicate(timeout=120)
    assert stalled.returncode == 1, err_path.read_text()[-3000:]
    lost = json.loads(stdout.strip().splitlines()[-1])
    assert lost["decision"] == "lost_lock" and lost["challenger"]["version"] == 2
    assert "lost the promotion lock" in lost["reason"] and "its decision was promoted" in lost["reason"]
    assert "uniformer promote: lost_lock: lost the promotion lock" in err_path.read_text()

    # One coherent decision: B's. A wrote no summary tag and moved no alias; its attempt is on record.
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
    assert client.get_model_version(name, "1").tags["promotion.replaced_by"] == "3"
    assert client.get_model_version(name, "3").tags["promotion.champion_version"] == "1"
    assert "promotion.decision" not in client.get_model_version(name, "2").tags
    assert [d["decision"] for d in registry.decisions(client, name, 2)] == ["lost_lock"]
    assert [d["decision"] for d in registry.decisions(client, name, 3)] == ["promoted"]
    assert registry.holder(client, name) is None
