"""Clip rows in plain Python and as a Ray Dataset, from a tiny synthetic manifest."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import DataConfig, StorageConfig
from pipeline.data.clips import (epoch_order, make_clip_rows, node_tag, select_rows, stack_rows, training_stream,
                                 view_dataset)
from pipeline.data.manifest import to_table
from pipeline.data.synth import synth_dataset

# The CPU reference path (augmentation in the decode task); the device path is checked against it below.
DATA = DataConfig(num_frames=4, sampling_rate=2, crop_size=32, short_side=32, repeated_aug=2, test_clips=2,
                  test_crops=3, scale=(0.3, 1.0), augment_on="cpu")
ON_DEVICE = dataclasses.replace(DATA, augment_on="device")
STORAGE = StorageConfig()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> pa.Table:
    """3 classes x 3 videos (2 train, 1 val), one corrupt train video, one val row that prepare marked bad."""
    out = tmp_path_factory.mktemp("clips")
    summary = synth_dataset(str(out), num_classes=3, videos_per_class=3, seed=0, num_frames=12, size=48,
                            val_fraction=0.34)
    rows = []
    for split in ("train", "val"):
        for line in (out / f"{split}.txt").read_text().splitlines():
            path, name = line.split()
            rows.append({"path": str(out / path), "label": summary["labels"].index(name), "label_name": name,
                         "split": split, "status": "ok", "num_frames": 12, "frame_stride": 1})
    (out / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    rows.append({"path": str(out / "corrupt.mp4"), "label": 1, "split": "train", "status": "ok", "num_frames": 12})
    rows.append({"path": str(out / "gone.mp4"), "label": 2, "split": "val", "status": "missing",
                 "reason": "no such object"})
    rows = [dict(r, index=i) for i, r in enumerate(rows)]
    return to_table(rows)


def _row(manifest, i):
    return select_rows(manifest, split=manifest["split"][i].as_py(), training=False).to_pylist()[
        [r["video_id"] for r in select_rows(manifest, split=manifest["split"][i].as_py(), training=False)
         .to_pylist()].index(i)]


def test_make_clip_rows_training(manifest):
    rows = make_clip_rows(_row(manifest, 0), data=DATA, storage=STORAGE, training=True, seed=0, epoch=0)
    assert len(rows) == DATA.repeated_aug
    for view, row in enumerate(rows):
        assert row["clip"].shape == (4, 32, 32, 3) and row["clip"].dtype == np.uint8
        assert row["valid"] and row["view"] == view and row["video_id"] == 0 and row["label"] == 0
    again = make_clip_rows(_row(manifest, 0), data=DATA, storage=STORAGE, training=True, seed=0, epoch=0)
    np.testing.assert_array_equal(rows[1]["clip"], again[1]["clip"])  # reproducible
    other_epoch = make_clip_rows(_row(manifest, 0), data=DATA, storage=STORAGE, training=True, seed=0, epoch=1)
    assert not np.array_equal(rows[0]["clip"], other_epoch[0]["clip"])  # new clips each epoch


def test_make_clip_rows_rand_augment_is_training_only_and_seeded(manifest):
    augmented = dataclasses.replace(DATA, rand_augment="rand-m9-n4")
    plain = make_clip_rows(_row(manifest, 0), data=DATA, storage=STORAGE, training=True, seed=0, epoch=0)
    rows = make_clip_rows(_row(manifest, 0), data=augmented, storage=STORAGE, training=True, seed=0, epoch=0)
    again = make_clip_rows(_row(manifest, 0), data=augmented, storage=STORAGE, training=True, seed=0, epoch=0)
    assert all(np.array_equal(a["clip"], b["clip"]) for a, b in zip(rows, again))
    assert any(not np.array_equal(a["clip"], b["clip"]) for a, b in zip(rows, plain))
    val_id = manifest["split"].to_pylist().index("val")
    for a, b in zip(make_clip_rows(_row(manifest, val_id), data=augmented, storage=STORAGE, training=False, seed=0),
                    make_clip_rows(_row(manifest, val_id), data=DATA, storage=STORAGE, training=False, seed=0)):
        np.testing.assert_array_equal(a["clip"], b["clip"])


@pytest.mark.parametrize("rand_augment", ["", "rand-m9-n4-mstd0.5-inc1"])
def test_device_rows_ship_whole_frames_and_draws_that_give_the_cpu_clips(manifest, rand_augment):
    import torch

    from pipeline.training.ingest import TrainBatch, clips_on_device

    cpu, device = (dataclasses.replace(d, rand_augment=rand_augment, hflip=True) for d in (DATA, ON_DEVICE))
    for video in (0, 1, 2):
        reference = make_clip_rows(_row(manifest, video), data=cpu, storage=STORAGE, training=True, seed=3, epoch=1)
        shipped = make_clip_rows(_row(manifest, video), data=device, storage=STORAGE, training=True, seed=3, epoch=1)
        assert all(r["clip"].shape == (4, 48, 48, 3) for r in shipped)  # whole frames, not crops
        assert [r["valid"] for r in shipped] == [True, True] and shipped[0]["aug_ops"].shape == (4 if rand_augment else 1,)
        clips = clips_on_device(TrainBatch(pin=False)(stack_rows(shipped)), device, torch.device("cpu"))
        assert clips.dtype == torch.uint8 and clips.shape == (2, 4, 32, 32, 3)
        difference = np.abs(clips.numpy().astype(int) - np.stack([r["clip"] for r in reference]).astype(int))
        # The same draws: bilinear resizes in float vs uint8 differ by rounding; RandAugment's bicubic
        # geometric ops by kernel (see device_augment's tolerances).
        assert difference.max() <= (255 if rand_augment else 1) and difference.mean() < (4 if rand_augment else 0.5)


def test_device_rows_of_a_bad_video_are_invalid_and_shaped_like_crops(manifest):
    corrupt = manifest["path"].to_pylist().index(next(p for p in manifest["path"].to_pylist() if "corrupt" in p))
    rows = make_clip_rows(_row(manifest, corrupt), data=ON_DEVICE, storage=STORAGE, training=True, seed=0)
    assert not any(r["valid"] for r in rows) and all(r["clip"].shape == (4, 32, 32, 3) for r in rows)
    assert all(tuple(r["crop"]) == (0, 0, 32, 32) and (r["aug_ops"] == -1).all() for r in rows)


def test_make_clip_rows_evaluation_views(manifest):
    val_id = manifest["split"].to_pylist().index("val")
    rows = make_clip_rows(_row(manifest, val_id), data=DATA, storage=STORAGE, training=False, seed=0)
    assert [r["view"] for r in rows] == list(range(DATA.test_clips * DATA.test_crops))
    assert all(r["valid"] and r["clip"].shape == (4, 32, 32, 3) for r in rows)
    again = make_clip_rows(_row(manifest, val_id), data=DATA, storage=STORAGE, training=False, seed=5)
    for a, b in zip(rows, again):  # deterministic, whatever the seed
        np.testing.assert_array_equal(a["clip"], b["clip"])


def test_corrupt_and_bad_rows_yield_invalid_zero_clips(manifest):
    corrupt = manifest["path"].to_pylist().index(next(p for p in manifest["path"].to_pylist() if "corrupt" in p))
    rows = make_clip_rows(_row(manifest, corrupt), data=DATA, storage=STORAGE, training=True, seed=0)
    assert len(rows) == DATA.repeated_aug and not any(r["valid"] for r in rows)
    assert all(r["clip"].shape == (4, 32, 32, 3) and not r["clip"].any() for r in rows)
    missing = manifest["status"].to_pylist().index("missing")
    rows = make_clip_rows(_row(manifest, missing), data=DATA, storage=STORAGE, training=False, seed=0)
    assert len(rows) == 6 and not any(r["valid"] for r in rows) and rows[0]["label"] == 2


def test_frame_stride_mismatch_raises(manifest):
    row = dict(_row(manifest, 0), frame_stride=4)  # a copy at 1/4 frame rate cannot serve sampling_rate=2
    with pytest.raises(ValueError, match="frame_stride=4"):
        make_clip_rows(row, data=DATA, storage=STORAGE, training=True, seed=0)


def test_select_rows(manifest):
    train = select_rows(manifest, split="train", training=True)
    assert train.num_rows == 7 and set(train["status"].to_pylist()) == {"ok"}
    val = select_rows(manifest, split="val", training=False)
    assert val.num_rows == 4 and "missing" in val["status"].to_pylist()  # reported, not dropped
    every = select_rows(manifest, split=None, training=False)  # inference over a whole manifest
    assert every["video_id"].to_pylist() == list(range(manifest.num_rows))
    with pytest.raises(ValueError, match=r"no usable rows in split 'test'; the manifest has splits \['train', 'val'\]"):
        select_rows(manifest, split="test", training=True)


def test_epoch_order_reproducible_and_changes():
    assert (epoch_order(50, seed=1, epoch=0) == epoch_order(50, seed=1, epoch=0)).all()
    assert (epoch_order(50, seed=1, epoch=0) != epoch_order(50, seed=1, epoch=1)).any()
    assert sorted(epoch_order(50, seed=1, epoch=3)) == list(range(50))


def test_make_clip_rows_from_s3(manifest, s3_bucket):
    from pipeline.data import storage

    endpoint, bucket = s3_bucket
    cfg = StorageConfig(endpoint_url=endpoint)
    row = _row(manifest, 0)
    uri = f"s3://{bucket}/clips/video0.mp4"
    storage.upload_file(row["path"], uri, storage=cfg)
    local = make_clip_rows(row, data=DATA, storage=STORAGE, training=True, seed=0)
    remote = make_clip_rows(dict(row, path=uri), data=DATA, storage=cfg, training=True, seed=0)
    assert remote[0]["valid"]
    np.testing.assert_array_equal(local[0]["clip"], remote[0]["clip"])


# ---------------------------------------------------------------------------------------------
# Ray Data


def stream_rows(manifest, epochs: range, videos_per_epoch: int = 7, seed: int = 7) -> dict[tuple, np.ndarray]:
    """{(epoch, video_id, view): clip} of a training stream, checking that no key comes twice."""
    ds = training_stream(manifest, split="train", data=DATA, storage=STORAGE, seed=seed, epochs=epochs,
                         videos_per_epoch=videos_per_epoch)
    clips = {}
    for batch in ds.iter_batches(batch_size=4, batch_format="numpy"):
        for epoch, video, view, clip in zip(batch["epoch"], batch["video_id"], batch["view"], batch["clip"]):
            key = (int(epoch), int(video), int(view))
            assert key not in clips
            clips[key] = clip
    return clips


def test_training_stream_batches_convert_to_torch(manifest, ray_local):
    import torch

    ds = training_stream(manifest, split="train", data=DATA, storage=STORAGE, seed=0, epochs=range(1),
                         videos_per_epoch=7)
    batches = list(ds.iter_torch_batches(batch_size=4))
    clips = torch.cat([b["clip"] for b in batches])
    valid = torch.cat([b["valid"] for b in batches])
    assert clips.dtype == torch.uint8 and clips.shape == (7 * 2, 4, 32, 32, 3)
    assert batches[0]["label"].dtype == torch.int64 and batches[0]["video_id"].dtype == torch.int64
    assert valid.dtype == torch.bool
    assert int((~valid).sum()) == 2  # the corrupt video: counted, not dropped
    assert not clips[~valid].any()


def test_device_stream_batches_collate_to_clips_on_the_device(manifest, ray_local):
    import torch

    from pipeline.training.ingest import TrainBatch, clips_on_device

    ds = training_stream(manifest, split="train", data=ON_DEVICE, storage=STORAGE, seed=0, epochs=range(1),
                         videos_per_epoch=7)
    batches = list(ds.iter_torch_batches(batch_size=4, collate_fn=TrainBatch(pin=False)))
    assert all(isinstance(b["clip"], list) and b["flip"].dtype == torch.bool for b in batches)
    assert all((b["decode_node"] == node_tag()).all() for b in batches)  # one node here: decoded beside us
    clips = torch.cat([clips_on_device(b, ON_DEVICE, torch.device("cpu")) for b in batches])
    valid = torch.cat([b["valid"] for b in batches])
    assert clips.shape == (7 * 2, 4, 32, 32, 3) and int((~valid).sum()) == 2
    assert not clips[~valid].any()


def test_every_epoch_in_one_stream_and_a_clip_depends_on_seed_epoch_and_video_only(manifest, ray_local):
    whole = stream_rows(manifest, range(0, 3), videos_per_epoch=5)
    ids = sorted({(e, v) for e, v, _ in whole})
    for epoch in range(3):  # each epoch: the first 5 videos of its own order, repeated_aug clips each
        usable = select_rows(manifest, split="train", training=True)["video_id"].to_pylist()
        expected = {usable[i] for i in epoch_order(len(usable), seed=7, epoch=epoch)[:5]}
        assert {v for e, v in ids if e == epoch} == expected
        assert sorted(view for e, v, view in whole if e == epoch) == sorted([0, 1] * 5)
    # A resumed run streams from its checkpoint's epoch: the same clips, pixel for pixel.
    resumed = stream_rows(manifest, range(2, 3), videos_per_epoch=5)
    assert set(resumed) == {k for k in whole if k[0] == 2}
    for key, clip in resumed.items():
        np.testing.assert_array_equal(clip, whole[key])
    assert any((whole[k] != whole[(1, k[1], k[2])]).any() for k in whole if k[0] == 0 and (1, k[1], k[2]) in whole)


def test_no_epochs_left_is_an_empty_stream(manifest, ray_local):
    ds = training_stream(manifest, split="train", data=DATA, storage=STORAGE, seed=0, epochs=range(3, 3),
                         videos_per_epoch=7)
    assert ds.count() == 0


def test_evaluation_views_and_unusable_rows(manifest, ray_local):
    ds = view_dataset(manifest, split="val", data=DATA, storage=STORAGE)
    rows = ds.take_all()
    assert len(rows) == 4 * DATA.test_clips * DATA.test_crops
    by_video = {}
    for r in rows:
        by_video.setdefault(r["video_id"], []).append((r["view"], r["valid"]))
    missing = manifest["status"].to_pylist().index("missing")
    assert sorted(v for v, _ in by_video[missing]) == list(range(6)) and not any(ok for _, ok in by_video[missing])
    assert all(ok for vid, views in by_video.items() if vid != missing for _, ok in views)


def test_videos_per_task():
    from pipeline.data.clips import videos_per_task

    assert videos_per_task(7, 2) == 1  # every decode slot gets work
    assert videos_per_task(96, 2) == 12  # four rounds over two slots
    assert videos_per_task(240_000, 16) == 64  # capped
