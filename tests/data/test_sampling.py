import numpy as np
import pytest

from pipeline.data.sampling import dense_indices, effective_sampling_rate, uniform_indices


def test_dense_training_in_range_with_exact_stride():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        idx = dense_indices(300, num_frames=16, sampling_rate=4, rng=rng)
        assert idx.dtype == np.int64 and idx.shape == (16,)
        assert idx.min() >= 0 and idx.max() <= 299
        assert (np.diff(idx) == 4).all()
        starts.add(int(idx[0]))
    assert min(starts) <= 10 and max(starts) >= 225  # the start covers [0, 300 - 61]


def test_dense_training_is_deterministic_per_rng_seed():
    a = dense_indices(300, num_frames=16, sampling_rate=4, rng=np.random.default_rng(5))
    b = dense_indices(300, num_frames=16, sampling_rate=4, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)


def test_dense_test_clips_evenly_spaced_from_first_to_last_frame():
    clips = [dense_indices(301, num_frames=16, sampling_rate=4, clip_index=c, num_clips=4) for c in range(4)]
    assert clips[0][0] == 0 and clips[-1][-1] == 300  # span 61 frames: slack 240, starts 0, 80, 160, 240
    assert [int(c[0]) for c in clips] == [0, 80, 160, 240]
    single = dense_indices(301, num_frames=16, sampling_rate=4)
    assert single[0] == 120  # the middle window
    np.testing.assert_array_equal(single, dense_indices(301, num_frames=16, sampling_rate=4, clip_index=0))


def test_dense_frame_stride_of_prepared_copy():
    # A copy keeping every 4th frame: 16x4 is 16 consecutive frames of the copy.
    idx = dense_indices(75, num_frames=16, sampling_rate=4, frame_stride=4, clip_index=0)
    assert (np.diff(idx) == 1).all()
    idx = dense_indices(150, num_frames=8, sampling_rate=8, frame_stride=2, rng=np.random.default_rng(0))
    assert (np.diff(idx) == 4).all()


@pytest.mark.parametrize("rate, stride, match", [
    (4, 3, r"sampling_rate=4 .* frame_stride=3"),
    (2, 4, r"sampling_rate=2 .* frame_stride=4"),
    (0, 1, r"must be >= 1"),
])
def test_frame_stride_mismatch_is_a_clear_error(rate, stride, match):
    with pytest.raises(ValueError, match=match):
        effective_sampling_rate(sampling_rate=rate, frame_stride=stride)
    if rate:
        with pytest.raises(ValueError, match=match):
            dense_indices(100, num_frames=8, sampling_rate=rate, frame_stride=stride)


def test_short_video_repeats_last_frame():
    idx = dense_indices(10, num_frames=16, sampling_rate=4, rng=np.random.default_rng(0))
    assert idx[0] == 0 and idx.max() == 9 and (idx[3:] == 9).all()
    idx = dense_indices(1, num_frames=4, sampling_rate=2)
    np.testing.assert_array_equal(idx, [0, 0, 0, 0])
    idx = uniform_indices(3, num_frames=8)
    assert idx.min() >= 0 and idx.max() <= 2 and (np.diff(idx) >= 0).all()


def test_uniform_one_frame_per_segment():
    n, t = 100, 8
    seg = (n - 1) / t
    test = uniform_indices(n, num_frames=t)
    for i, v in enumerate(test):  # the middle of each segment
        lo, hi = round(seg * i), round(seg * (i + 1))
        assert v == (lo + hi) // 2
    rng = np.random.default_rng(0)
    draws = np.stack([uniform_indices(n, num_frames=t, rng=rng) for _ in range(300)])
    for i in range(t):
        lo, hi = round(seg * i), round(seg * (i + 1))
        assert draws[:, i].min() == lo and draws[:, i].max() == hi


def test_uniform_multi_clip_offsets_differ():
    clips = [uniform_indices(100, num_frames=8, clip_index=c, num_clips=3) for c in range(3)]
    assert (clips[0] <= clips[1]).all() and (clips[1] <= clips[2]).all() and (clips[0] < clips[2]).any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip_index=4, num_clips=4), r"clip_index=4 must be in \[0, num_clips=4\)"),
    (dict(rng=np.random.default_rng(0), clip_index=0), "not both"),
    (dict(num_clips=0), "num_clips=0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dense_indices(100, num_frames=8, sampling_rate=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        uniform_indices(100, num_frames=8, **kwargs)


def test_empty_video_is_an_error():
    with pytest.raises(ValueError, match="num_frames_in_video=0"):
        dense_indices(0, num_frames=8, sampling_rate=2)
