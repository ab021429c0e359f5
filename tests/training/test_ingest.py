"""The training's datasets as Ray Train splits them: equal training shards, validation views
counted exactly once, and the epoch a restarted stream starts from."""

import dataclasses
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
