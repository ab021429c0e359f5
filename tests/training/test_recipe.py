import numpy as np
import pytest
import torch

from model import create_uniformer
from pipeline.training import recipe


def test_no_decay_on_biases_and_norms_only():
    model = create_uniformer("uniformer_xs", num_classes=6)
    names = {name for name, p in model.named_parameters() if recipe.is_no_decay(name, p)}
    pos_embed = {n for n, _ in model.named_parameters() if ".pos_embed." in n and n.endswith(".weight")}
    assert pos_embed and not pos_embed & names  # the DPE conv kernels decay, as in the official runs
    assert {n for n, _ in model.named_parameters() if n.endswith(".bias")} <= names
    assert {n for n, _ in model.named_parameters() if "norm" in n} <= names
    assert "blocks1.0.attn.weight" not in names and "head.weight" not in names
    decay, no_decay = recipe.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_then_cosine():
    lr = [recipe.warmup_cosine(s, warmup_steps=10, total_steps=110, base_lr=1e-3, min_lr=1e-6) for s in range(111)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert lr[10] == pytest.approx(1e-3) and lr[110] == pytest.approx(1e-6)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_lr_counts_videos_not_clips():
    from pipeline.config import load_config

    def lr(videos_lr, batch, clips_per_video):
        return load_config(None, [f"optim.lr_per_32_videos={videos_lr}", f"train.batch_size={batch}",
                                  f"data.repeated_aug={clips_per_video}", "optim.min_lr=0"]).base_lr()

    # The official K400 S16x4 run: 1e-4 for 32 videos of 2 clips each (64 clips per step).
    assert lr(1e-4, 64, 2) == pytest.approx(1e-4)
    assert lr(1e-4, 64, 1) == pytest.approx(2e-4)
    # The demo: 16 clips = 8 videos at 4e-3 per 32 videos.
    assert lr(4e-3, 16, 2) == pytest.approx(1e-3)


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mix_batch_targets_are_distributions(mixup, cutmix):
    clips = torch.rand(4, 3, 2, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    mixed, targets = recipe.mix_batch(clips, labels, num_classes=5, mixup_alpha=mixup, cutmix_alpha=cutmix,
                                      prob=1.0, smoothing=0.1, rng=np.random.default_rng(0))
    assert mixed.shape == clips.shape and not torch.equal(mixed, clips)
    torch.testing.assert_close(targets.sum(-1), torch.ones(4))
    assert (targets[:, 4] > 0).all()  # label smoothing reaches every class


def test_mix_batch_off_gives_smoothed_one_hot():
    clips = torch.rand(2, 3, 2, 32, 32)
    mixed, targets = recipe.mix_batch(clips, torch.tensor([1, 0]), num_classes=4, mixup_alpha=0, cutmix_alpha=0,
                                      prob=1.0, smoothing=0.0, rng=np.random.default_rng(0))
    assert mixed is clips and targets.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


def test_random_erase_boxes_are_cubes_of_noise_and_seeded():
    clips = torch.zeros(64, 3, 4, 32, 40)
    gen = torch.Generator().manual_seed(0)
    out = recipe.random_erase(clips, prob=0.25, rng=np.random.default_rng(0), generator=gen)
    assert out.shape == clips.shape and out.dtype == clips.dtype and not clips.any()  # the input is kept
    erased = out.ne(0)
    per_clip = erased.flatten(1).any(1)
    assert 6 <= int(per_clip.sum()) <= 26  # about a quarter of 64
    for index in torch.nonzero(per_clip).flatten():
        box = erased[index]  # (C, T, H, W)
        assert torch.equal(box, box[:1, :1].expand_as(box))  # the same box in every channel and frame
        rows, cols = torch.nonzero(box[0, 0].any(1)).flatten(), torch.nonzero(box[0, 0].any(0)).flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert box[0, 0].sum() == h * w and 0.02 * 32 * 40 * 0.5 <= h * w <= 32 * 40 / 3 * 1.2
        noise = out[index][:, :, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert not torch.equal(noise[:, 0], noise[:, 1])  # fresh noise per frame, as the official's
    again = recipe.random_erase(clips, prob=0.25, rng=np.random.default_rng(0),
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert recipe.random_erase(clips, prob=0.0, rng=np.random.default_rng(0)) is clips
    assert recipe.random_erase(clips, prob=1.0, rng=np.random.default_rng(1)).flatten(1).ne(0).any(1).all()


def test_ema_moves_towards_the_model_with_a_warm_up():
    model = torch.nn.Linear(3, 2)
    ema = recipe.ModelEMA(model, decay=0.5)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): warm-up caps the decay
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.module.weight.clone()
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, before + 0.9)
    late = recipe.ModelEMA(model, decay=0.5, updates=100)
    assert late.current_decay() == 0.5


def test_mix_batch_never_blends_unusable_clips():
    clips = torch.rand(5, 3, 2, 16, 16)
    clips[1] = 0  # an unusable video's blank clip
    valid = torch.tensor([True, False, True, True, True])
    for seed in range(20):
        for mixup, cutmix in [(0.8, 0.0), (0.0, 1.0)]:
            mixed, targets = recipe.mix_batch(clips, torch.arange(5), num_classes=5, mixup_alpha=mixup,
                                              cutmix_alpha=cutmix, prob=1.0, smoothing=0.0,
                                              rng=np.random.default_rng(seed), valid=valid)
            assert torch.equal(mixed[1], clips[1])
            for i in (0, 2, 3, 4):  # no usable clip takes pixels or label mass from the blank one
                assert targets[i, 1] == 0
                assert not torch.equal(mixed[i], clips[i]) or mixup == 0


def test_mix_partners():
    assert recipe.mix_partners(torch.tensor([True, False, True, True])).tolist() == [3, 1, 2, 0]
    assert recipe.mix_partners(torch.tensor([True, False])) is None
