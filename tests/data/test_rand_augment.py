import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from pipeline.config import ConfigError, load_config
from pipeline.data.rand_augment import OPS, RandAugmentSpec, apply_op, apply_plan, draw_plan, parse_rand_augment
from pipeline.data.transforms import train_augment

OFFICIAL = "rand-m7-n4-mstd0.5-inc1"


def textured_clip(frames: int = 3, height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    """Frames in [40, 200] (so that autocontrast and equalize have work) with a bright corner block."""
    clip = np.random.default_rng(seed).integers(40, 201, (frames, height, width, 3), dtype=np.uint8)
    clip[:, :10, :10] = 200
    return clip


def test_parse_official_spec_and_defaults():
    assert parse_rand_augment(OFFICIAL) == RandAugmentSpec(magnitude=7, num_ops=4, magnitude_std=0.5, increasing=True)
    assert parse_rand_augment("rand") == RandAugmentSpec(magnitude=10, num_ops=2, magnitude_std=0.0, increasing=False)
    assert parse_rand_augment("rand-inc0-n1") == RandAugmentSpec(magnitude=10, num_ops=1, increasing=False)


@pytest.mark.parametrize("text, message", [
    ("auto-m7", r"^'auto-m7' is not a RandAugment spec: it must start with 'rand', e\.g\. 'rand-m7-n4-mstd0\.5-inc1'$"),
    ("rand-m7-w0", r"^'rand-m7-w0': bad or repeated part 'w0'; the parts are m<0-10>, n<ops>, mstd<std>, inc<0\|1>"),
    ("rand-m7-m8", r"bad or repeated part 'm8'"),
    ("rand-m7.5", r"m and n take whole numbers"),
    ("rand-m11", r"needs m in \[0, 10\], n >= 1 and inc0 or inc1"),
    ("rand-n0", r"needs m in \[0, 10\], n >= 1"),
    ("rand-inc2", r"inc0 or inc1"),
])
def test_bad_spec_is_a_one_line_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_rand_augment(text)
    with pytest.raises(ConfigError, match=r"^data\.rand_augment: ") as info:
        load_config(None, [f"data.rand_augment={text}"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("increasing", [False, True])
def test_every_op_changes_the_clip_identically_on_every_frame(name, increasing):
    still = np.repeat(textured_clip(frames=1), 4, axis=0)  # four identical frames
    # Magnitude 9 (10 for the non-increasing posterize/solarize, which are strongest at 0, and 2 for
    # the non-increasing enhancers, whose no-change point is 5).
    magnitude = 0 if name in ("Posterize", "Solarize") and not increasing else 9
    magnitude = 2 if name in ("Color", "Contrast", "Brightness", "Sharpness") and not increasing else magnitude
    out = apply_op(still, name, magnitude=magnitude, increasing=increasing, rng=np.random.default_rng(0))
    assert out.dtype == np.uint8 and out.shape == still.shape
    assert not np.array_equal(out, still), f"{name} left the clip unchanged"
    assert all(np.array_equal(out[0], frame) for frame in out[1:]), f"{name} treated frames differently"


def test_ops_give_pils_official_pixels_per_frame():
    clip = textured_clip()
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(apply_op(clip, "Solarize", magnitude=7, increasing=True, rng=rng),
                                  np.stack([np.asarray(ImageOps.solarize(Image.fromarray(f), 256 - 179))
                                            for f in clip]))
    factor = 4 / 10 * 1.8 + 0.1
    np.testing.assert_array_equal(apply_op(clip, "Contrast", magnitude=4, increasing=False, rng=rng),
                                  np.stack([np.asarray(ImageEnhance.Contrast(Image.fromarray(f)).enhance(factor))
                                            for f in clip]))
    np.testing.assert_array_equal(apply_op(clip, "Posterize", magnitude=9, increasing=True, rng=rng),
                                  np.stack([np.asarray(ImageOps.posterize(Image.fromarray(f), 1)) for f in clip]))
    assert not apply_op(clip, "Posterize", magnitude=0, increasing=False, rng=rng).any()  # 0 bits kept: black
    # SolarizeAdd by hand: +int(0.7 * 110) = 77 below 128, capped at 255.
    expected = np.where(clip < 128, np.minimum(255, clip.astype(int) + 77), clip).astype(np.uint8)
    np.testing.assert_array_equal(apply_op(clip, "SolarizeAdd", magnitude=7, increasing=False, rng=rng), expected)


def test_magnitude_zero_geometry_is_the_identity():
    clip = textured_clip()
    for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        np.testing.assert_array_equal(apply_op(clip, name, magnitude=0, increasing=True,
                                               rng=np.random.default_rng(0)), clip)


def test_rand_augment_is_seeded_and_video_consistent():
    spec = parse_rand_augment(OFFICIAL)
    still = np.repeat(textured_clip(frames=1), 3, axis=0)
    outs = [apply_plan(still, draw_plan(spec, rng=np.random.default_rng(seed))) for seed in range(8)]
    again = [apply_plan(still, draw_plan(spec, rng=np.random.default_rng(seed))) for seed in range(8)]
    assert all(np.array_equal(a, b) for a, b in zip(outs, again))
    assert len({out.tobytes() for out in outs}) > 4  # the seed matters
    assert any(not np.array_equal(out, still) for out in outs)
    for out in outs:
        assert out.dtype == np.uint8 and out.shape == still.shape
        assert all(np.array_equal(out[0], frame) for frame in out[1:])


def test_train_augment_applies_rand_augment_from_the_same_rng():
    clip = textured_clip(frames=2, height=48, width=64)
    common = dict(size=32, scale=(0.5, 1), ratio=(0.75, 1.33), flip=False)
    spec = parse_rand_augment("rand-m9-n2")
    plain = [train_augment(clip, **common, rng=np.random.default_rng(s)) for s in range(6)]
    augmented = [train_augment(clip, **common, rng=np.random.default_rng(s), augment=spec) for s in range(6)]
    repeated = [train_augment(clip, **common, rng=np.random.default_rng(s), augment=spec) for s in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(augmented, repeated))
    assert any(not np.array_equal(a, b) for a, b in zip(plain, augmented))
    assert all(a.shape == (2, 32, 32, 3) and a.dtype == np.uint8 for a in augmented)
