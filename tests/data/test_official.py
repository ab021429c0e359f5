"""The official datasets' class lists, what an official checkpoint's name and head say, and the label
check that refuses a list in another order than the checkpoint's (or reorders the head to match it)."""

import random

import pytest
import torch

from pipeline.data import official
from pipeline.data.official import LabelMapError, checkpoint_dataset, class_list, label_order, parse_checkpoint_name


def test_class_lists_hold_the_official_indices():
    lists = {key: class_list(key) for key in official.DATASETS}
    assert {k: len(v) for k, v in lists.items()} == {"k400": 400, "k600": 600, "ssv1": 174, "ssv2": 174}
    assert all(len(set(v)) == len(v) and all(n == n.strip() and n for n in v) for v in lists.values())
    # Facts of the official repository's data lists (class_lists/README.md): its K400 val.csv labels
    # abseiling videos 341, its K600 val.csv feeding-fish videos 0, its SSv2 validation split video 74225
    # ("Spinning [something] that quickly stops spinning") 140.
    assert lists["k400"][341] == "abseiling" and lists["k400"][:2] == ["riding a bike", "marching"]
    assert lists["k400"] != sorted(lists["k400"])  # the trap: a sorted K400 list is another order
    assert lists["k600"][0] == "feeding fish" and "massaging person's head" in lists["k600"]
    assert lists["ssv1"] == sorted(lists["ssv1"]) and set(lists["ssv1"]) == set(lists["ssv2"])
    assert lists["ssv2"][140] == "Spinning something that quickly stops spinning"
    assert lists["ssv2"][127] == "Showing something on top of something"
    with pytest.raises(ValueError, match=r"^'k700' is not an official dataset; official: k400, k600, ssv1, ssv2$"):
        class_list("k700")


@pytest.mark.parametrize("uri, expected", [
    ("s3://b/ckpt/uniformer_small_k400_16x4.pth", ("k400", "uniformer_s", 16, 4, None)),
    ("uniformer_base_k600_32x4.pth", ("k600", "uniformer_b", 32, 4, None)),
    ("/w/uniformer_small_sthv2_16_prek400.pth", ("ssv2", "uniformer_s", 16, None, "k400")),
    ("uniformer_base_sthv1_32_prek600.pth", ("ssv1", "uniformer_b", 32, None, "k600")),
    ("uniformer_base_in1k.pth", ("imagenet", "uniformer_b", None, None, None)),
    ("my_model.pth", (None, None, None, None, None)),
])
def test_checkpoint_names(uri, expected):
    got = parse_checkpoint_name(uri)
    assert (got.dataset, got.variant, got.num_frames, got.sampling_rate, got.pretrained) == expected


def test_which_dataset_a_checkpoint_was_trained_on():
    assert checkpoint_dataset("uniformer_small_sthv2_16_prek400.pth", 174) == "ssv2"  # not K400: "pre"
    assert checkpoint_dataset("weights.pth", 400) == "k400" and checkpoint_dataset("weights.pth", 600) == "k600"
    assert checkpoint_dataset("weights.pth", 1000) == "imagenet" and checkpoint_dataset("weights.pth", 7) == "none"
    assert checkpoint_dataset("weights.pth", 174, "ssv1") == "ssv1"
    assert checkpoint_dataset("uniformer_small_k400_16x4.pth", 400, "none") == "none"  # the setting wins
    with pytest.raises(LabelMapError, match=r"^weights.pth has a head of 174 classes, Something-Something V1 or "
                       r"V2, and its name does not say which: set model.init_dataset=ssv1 or model.init_dataset=ssv2"):
        checkpoint_dataset("weights.pth", 174)
    with pytest.raises(LabelMapError, match=r"^the name of uniformer_base_k600_16x4.pth says k600 \(600 classes\) "
                       r"but its head has 400 classes; set model.init_dataset to what it was trained on"):
        checkpoint_dataset("uniformer_base_k600_16x4.pth", 400)
    with pytest.raises(LabelMapError, match=r"^--dataset=k400 has 400 classes but the checkpoint x.pth has a head of 174"):
        checkpoint_dataset("x.pth", 174, "k400", setting="--dataset")
    with pytest.raises(LabelMapError, match=r"^model.init_dataset='kinetics' is not one of k400, k600, ssv1, ssv2, "
                       r"imagenet, none$"):
        checkpoint_dataset("x.pth", 400, "kinetics")


def test_the_official_list_passes_and_a_list_of_other_names_is_refused_at_its_first_difference():
    k400 = class_list("k400")
    assert label_order(k400, "k400") is None
    renamed = k400[:5] + ["zumba dancing"] + k400[6:]
    with pytest.raises(LabelMapError, match=r"^the data has 400 labels, the Kinetics-400 checkpoint 400; they differ "
                       r"first at index 5: 'zumba dancing' where Kinetics-400 has 'roller skating'; 1 of its names "
                       r"are not Kinetics-400 classes, e.g. 'zumba dancing'. Prepare the data with `--labels k400`"):
        label_order(renamed, "k400")
    with pytest.raises(LabelMapError, match=r"has 3 labels, the Something-Something V2 checkpoint 174; they differ "
                       r"first at index 3: nothing \(the list ends\) where Something-Something V2 has"):
        label_order(class_list("ssv2")[:3], "ssv2")


def test_a_shuffled_list_reorders_the_head_so_that_each_name_keeps_its_scores():
    names = class_list("ssv2")
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    order = label_order(shuffled, "ssv2")
    assert order is not None and sorted(order) == list(range(174))
    state = {"head.weight": torch.randn(174, 8), "head.bias": torch.randn(174), "norm.weight": torch.ones(8)}
    features = torch.randn(3, 8)
    before = features @ state["head.weight"].T + state["head.bias"]
    moved = official.reorder_head(state, order)
    after = features @ moved["head.weight"].T + moved["head.bias"]
    for j, name in enumerate(shuffled):  # the score of a name is the same, at its index in the data's list
        assert torch.equal(after[:, j], before[:, names.index(name)])
    assert moved["norm.weight"] is state["norm.weight"]


def test_published_figures_and_protocol():
    assert official.published_top1("k400", "uniformer_s", 16, sampling_rate=4) == 80.8
    assert official.published_top1("k600", "uniformer_b", 32, sampling_rate=4) == 84.5
    assert official.published_top1("ssv1", "uniformer_b", 32, pretrained="k400") == 60.9
    assert official.published_top1("ssv2", "uniformer_b", 32, pretrained="k600") == 71.2
    assert official.published_top1("ssv2", "uniformer_xs", 16) is None
    k400 = official.official_preprocess("k400", variant="uniformer_s", num_frames=16, sampling_rate=4)
    ssv2 = official.official_preprocess("ssv2", variant="uniformer_s", num_frames=16, sampling_rate=4)
    assert (k400["sampling"], k400["test_clips"], k400["test_crops"], k400["num_classes"]) == ("dense", 4, 1, 400)
    assert (ssv2["sampling"], ssv2["test_clips"], ssv2["test_crops"], ssv2["num_classes"]) == ("uniform", 1, 3, 174)
    assert k400["short_side"] == k400["crop_size"] == 224
