"""The training's datasets as Ray Train splits them: equal training shards, validation views
counted exactly once, and the epoch a restarted stream starts from."""

import dataclasses
import hashlib
import json
import threading

import pytest

from pipeline.config import Config, TrainConfig
from pipeline.data.clips import training_stream
from pipeline.training.ingest import TRAIN, VAL, ClipDataConfig, latest_checkpoint_epoch, validation_views
from tests.data.test_clips import DATA, STORAGE, manifest  # noqa: F401 - `manifest` is a fixture


def shards_of(name, dataset, world_size):
    import ray

    node = ray.get_runtime_context().get_node_id()
    shards = ClipDataConfig().configure({name: dataset}, world_size=world_size, worker_handles=None,
                                        worker_node_ids=[node] * world_size)
    return [s[name] for s in shards]


def consume_together(shards, batch_size):
    """What each worker reads, all reading at once (a streaming split waits for all its readers)."""
    got = [[] for _ in shards]

    def read(rank):
        for batch in shards[rank].iter_batches(batch_size=batch_size, batch_format="numpy"):
            got[rank] += list(zip(batch["video_id"].tolist(), batch["valid"].tolist()))

    threads = [threading.Thread(target=read, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return got


@pytest.mark.parametrize("world_size", [2, 3])
def test_validation_views_reach_exactly_one_worker_each_validation(manifest, ray_local, world_size):
    cfg = dataclasses.replace(Config(), data=DATA, storage=STORAGE)
    val_rows = [i for i, s in enumerate(manifest["split"].to_pylist()) if s == "val"]
    shards = shards_of(VAL, validation_views(cfg, manifest), world_size)
    for _ in range(2):  # a second validation counts the same videos again, once each
        got = consume_together(shards, batch_size=1)
        assert sorted(v for rank in got for v, _ in rank) == val_rows  # 4 views over 2 or 3 workers
        assert sum(not ok for rank in got for _, ok in rank) == 1  # the missing video, counted


def test_training_shards_are_equal(manifest, ray_local):
    stream = training_stream(manifest, split="train", data=DATA, storage=STORAGE, seed=0, epochs=range(2),
                             videos_per_epoch=5)
    got = consume_together(shards_of(TRAIN, stream, 2), batch_size=1)
    assert len(got[0]) == len(got[1]) == 2 * 5 * DATA.repeated_aug // 2


def test_an_unregistered_checkpoint_folder_is_not_resumed_from(tmp_path):
    # What a worker lost while reporting leaves: the folder, but no entry in Ray's checkpoint manager.
    folder = tmp_path / "run" / "checkpoint_2026-01-01_00-00-00.000000"
    folder.mkdir(parents=True)
    (folder / "progress.json").write_text(json.dumps({"epoch": 3, "step": 30}))
    cfg = dataclasses.replace(Config(), train=TrainConfig(storage_path=str(tmp_path)))
    assert latest_checkpoint_epoch(cfg, "run") == 0
    assert latest_checkpoint_epoch(cfg, "no-such-run") == 0


def stream_rows(cfg: Config, ray_run_name: str, world_size: int) -> list[list[tuple]]:
    """(epoch, video, view, clip digest) of what each of `world_size` workers reads from the
    stream Ray Train would build for `cfg`."""
    from pipeline.training.ingest import TrainStream

    shards = shards_of(TRAIN, TrainStream(cfg.to_dict(), ray_run_name)(), world_size)
    got = [[] for _ in shards]

    def read(rank):
        for batch in shards[rank].iter_batches(batch_size=4, batch_format="numpy"):
            got[rank] += [(int(e), int(v), int(w), hashlib.sha1(c.tobytes()).hexdigest()) for e, v, w, c in
                          zip(batch["epoch"], batch["video_id"], batch["view"], batch["clip"])]

    threads = [threading.Thread(target=read, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return got


def test_an_epoch_streams_the_same_clips_to_2_and_to_3_workers(tmp_path, manifest, ray_local):
    from pipeline.data.manifest import write_manifest

    write_manifest(manifest, str(tmp_path / "prepared"))
    seen = {}
    for workers in (2, 3):
        cfg = dataclasses.replace(
            Config(), data=dataclasses.replace(DATA, manifest=str(tmp_path / "prepared")), storage=STORAGE,
            train=TrainConfig(num_workers=workers, batch_size=6, storage_path=str(tmp_path / "ray_results")),
            optim=dataclasses.replace(Config().optim, epochs=2, warmup_epochs=0, mixup_alpha=0, cutmix_alpha=0))
        shards = stream_rows(cfg, "same-clips", workers)
        assert len({len(rows) for rows in shards}) == 1  # equal shards: DDP steps in lockstep
        seen[workers] = sorted(row for rows in shards for row in rows)
    # 2 epochs of 2 steps of 6 clips: 3 workers read the same 24 clips as 2, decoded and augmented alike.
    assert len(seen[2]) == 24 and seen[3] == seen[2]
    assert [e for e, *_ in seen[2]] == [0] * 12 + [1] * 12


@pytest.mark.parametrize("batch, world, accum", [(12, 3, 1), (12, 2, 2), (16, 3, 2), (64, 7, 3)])
def test_every_step_trains_the_global_batch_whatever_the_worker_count(batch, world, accum):
    from pipeline.training.ingest import WorkerShare

    shares = [WorkerShare(batch, world, rank, accum) for rank in range(world)]
    for step in range(2 * world):
        assert sum(share.clips(step) for share in shares) == batch
        for share in shares:
            sizes = share.micro_batches(step)
            assert len(sizes) == accum and sum(sizes) == share.clips(step)
            assert max(sizes) <= share.largest_micro_batch() and max(sizes) - min(sizes) <= 1
    # Over `world` steps every worker has taken the same number of clips.
    assert len({sum(share.clips(s) for s in range(world)) for share in shares}) == 1


def test_fewer_workers_accumulate_to_keep_the_batch_and_too_many_are_refused():
    from pipeline.config import ConfigError, accumulation, load_config

    cfg = load_config(None, ["train.num_workers=8", "train.batch_size=64", "train.min_workers=4"])
    assert [accumulation(cfg, world) for world in (8, 7, 6, 5, 4)] == [1, 2, 2, 2, 2]  # at most 8 clips at once
    assert accumulation(cfg, 1) == 8
    with pytest.raises(ConfigError, match="cannot be shared by 65 workers"):
        accumulation(cfg, 65)
    # Mixup blends pairs: at 5 workers 16 clips are shares of 3 or 4 in 2 micro-batches, some of 1 clip.
    with pytest.raises(ConfigError, match="at 5 workers a micro-batch holds 1 clip"):
        load_config(None, ["train.num_workers=8", "train.batch_size=16", "train.min_workers=5"])
    with pytest.raises(ConfigError, match="train.min_workers must be in"):
        load_config(None, ["train.num_workers=2", "train.min_workers=3"])


def host_batches(rows: list[int], size: int):
    import torch

    for start in range(0, len(rows), size):
        chunk = torch.tensor(rows[start:start + size])
        yield {"label": chunk, "clip": chunk[:, None].float(), "valid": torch.ones(len(chunk), dtype=torch.bool)}


def test_step_batches_cut_the_shard_to_each_steps_share_and_pad_one_row_at_most():
    import torch

    from pipeline.training.ingest import StepBatches, WorkerShare

    # 3 workers share 16 clips per step in 2 micro-batches; 6 steps: 96 rows, 32 per worker's shard.
    share = WorkerShare(16, 3, rank=0, accum=2)
    taken = []
    batches = StepBatches(host_batches(list(range(32)), share.largest_micro_batch()))
    for step in range(6):
        for size in share.micro_batches(step):
            batch = batches.take(size)
            assert len(batch["label"]) == size and batch["clip"].shape == (size, 1)
            taken += batch["label"][batch["valid"]].tolist()
    assert taken == list(range(sum(share.clips(s) for s in range(6))))
    # A shard one row short (Ray's equal split rounds down) gets one unusable row; more is an error.
    short = StepBatches(host_batches(list(range(5)), 3))
    assert short.take(6)["valid"].tolist() == [True] * 5 + [False]
    shorter = StepBatches(host_batches(list(range(4)), 3))
    with pytest.raises(RuntimeError, match="ended 2 rows short"):
        shorter.take(6)
    assert torch.equal(StepBatches(host_batches([7, 8], 2)).take(2)["label"], torch.tensor([7, 8]))


def test_a_training_without_validation_videos_says_so_before_it_starts(tmp_path, manifest, capsys):
    import pyarrow.compute as pc

    from pipeline.config import load_config
    from pipeline.data.manifest import write_manifest
    from pipeline.training.driver import checked_manifest

    write_manifest(manifest.filter(pc.equal(manifest["split"], "train")), str(tmp_path / "train-only"))
    cfg = load_config(None, [f"data.manifest={tmp_path / 'train-only'}", "model.num_classes=3", "train.batch_size=2",
                             "train.num_workers=1", "optim.mixup_alpha=0", "optim.cutmix_alpha=0"])
    checked_manifest(cfg)
    assert "no usable 'val' videos" in capsys.readouterr().err
    write_manifest(manifest, str(tmp_path / "with-val"))
    checked_manifest(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=str(tmp_path / "with-val"))))
    assert "no usable" not in capsys.readouterr().err
