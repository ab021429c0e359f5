import numpy as np
import pytest
import torch

from pipeline.data.transforms import (center_crop, hflip, normalize_on_device, random_resized_crop_params, resize,
                                      short_side_resize, three_crops, train_augment)


def _clip(t=4, h=60, w=80, seed=0):
    """Frames whose pixels encode their coordinates: any crop can be located."""
    ys, xs = np.mgrid[0:h, 0:w]
    frame = np.stack([ys * 4 % 256, xs * 3 % 256, (ys + xs) % 256], axis=-1).astype(np.uint8)
    return np.stack([frame] * t)


def test_random_resized_crop_shape_and_same_crop_for_all_frames():
    clip = _clip()
    clip[1] = clip[0]  # identical frames must stay identical
    out = train_augment(clip, size=32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=False,
                        rng=np.random.default_rng(0))
    assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
    for t in range(1, 4):
        np.testing.assert_array_equal(out[t], out[0])


def test_random_resized_crop_params_follow_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(240, 320, scale=(0.25, 0.5), ratio=(0.75, 4 / 3), rng=rng)
        assert 0 <= top and top + h <= 240 and 0 <= left and left + w <= 320
        assert 0.2 <= h * w / (240 * 320) <= 0.55
        assert 0.7 <= w / h <= 1.4


def test_random_resized_crop_full_scale_is_the_frame():
    clip = _clip(h=64, w=64)
    out = train_augment(clip, size=64, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, clip)


def test_train_augment_is_deterministic_and_flips_sometimes():
    clip = _clip()
    a = train_augment(clip, size=32, scale=(0.5, 1), ratio=(0.75, 1.33), flip=True, rng=np.random.default_rng(3))
    b = train_augment(clip, size=32, scale=(0.5, 1), ratio=(0.75, 1.33), flip=True, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    full = dict(size=60, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole 60x60 frame
    flipped = [bool((train_augment(clip[:, :, 10:70], **full, flip=True, rng=np.random.default_rng(s))
                     != clip[:, :, 10:70]).any()) for s in range(20)]
    assert 3 < sum(flipped) < 17
    assert not any((train_augment(clip[:, :, 10:70], **full, flip=False, rng=np.random.default_rng(s))
                    != clip[:, :, 10:70]).any() for s in range(5))


def test_hflip():
    clip = _clip()
    np.testing.assert_array_equal(hflip(clip)[:, :, 0], clip[:, :, -1])
    np.testing.assert_array_equal(hflip(hflip(clip)), clip)


def test_short_side_resize_keeps_aspect():
    assert short_side_resize(_clip(h=60, w=80), size=30).shape == (4, 30, 40, 3)
    assert short_side_resize(_clip(h=80, w=60), size=30).shape == (4, 40, 30, 3)
    assert resize(_clip(), size=(60, 80)).shape == (4, 60, 80, 3)


def test_resize_is_close_to_the_picture():
    clip = np.full((2, 40, 40, 3), 100, np.uint8)
    clip[:, :, 20:] = 200
    out = resize(clip, size=20).astype(int)
    assert (out[:, :, :9] == 100).all() and (out[:, :, 11:] == 200).all()


def test_center_and_three_crops():
    clip = _clip(h=60, w=80)
    c = center_crop(clip, size=40)
    np.testing.assert_array_equal(c, clip[:, 10:50, 20:60])
    left, mid, right = three_crops(clip, size=40)
    np.testing.assert_array_equal(left, clip[:, 10:50, 0:40])
    np.testing.assert_array_equal(mid, c)
    np.testing.assert_array_equal(right, clip[:, 10:50, 40:80])
    top, _, bottom = three_crops(_clip(h=80, w=60), size=40)
    assert top.shape == bottom.shape == (4, 40, 40, 3)
    np.testing.assert_array_equal(top, _clip(h=80, w=60)[:, 0:40, 10:50])


def test_crop_larger_than_frame_is_a_clear_error():
    with pytest.raises(ValueError, match=r"cannot crop 64x64 from 60x80 frames; resize the short side"):
        center_crop(_clip(), size=64)


def test_bad_clip_is_a_clear_error():
    with pytest.raises(ValueError, match=r"clip must be uint8 \(T, H, W, C\), got float32"):
        hflip(np.zeros((2, 4, 4, 3), np.float32))


def test_normalize_on_device():
    batch = torch.randint(0, 256, (2, 4, 8, 8, 3), dtype=torch.uint8)
    out = normalize_on_device(batch, (0.45, 0.45, 0.45), (0.225, 0.225, 0.225))
    assert out.shape == (2, 3, 4, 8, 8) and out.dtype == torch.float32
    expected = (batch.float() / 255 - 0.45) / 0.225
    torch.testing.assert_close(out, expected.permute(0, 4, 1, 2, 3), rtol=1e-5, atol=1e-5)
    per_channel = normalize_on_device(batch, (0.1, 0.5, 0.9), (1.0, 1.0, 1.0))
    torch.testing.assert_close(per_channel[:, 2], batch[..., 2].float() / 255 - 0.9, rtol=1e-5, atol=1e-5)
    assert normalize_on_device(batch, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"expected a uint8 \(B, T, H, W, C\) batch"):
        normalize_on_device(batch.float())
