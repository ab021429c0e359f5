"""Every config under infra/configs loads; the published recipes (DESIGN.md "The published recipe") hold the paper's
values; the commands in each recipe's header are valid commands of this project."""

import shlex
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "infra" / "configs"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))

# Values of the official exp/*/config.yaml + run.sh (github.com/Sense-X/UniFormer, video_classification).
OFFICIAL = dict(repeated_aug=2, rand_augment="rand-m7-n4-mstd0.5-inc1", random_erasing=0.25, crop_size=224,
                short_side=224, scale=(0.08, 1.0), min_lr=1e-6, clip_grad_norm=20.0, mixup_alpha=0.8,
                cutmix_alpha=1.0, mixup_prob=1.0, label_smoothing=0.1, weight_decay=0.05, betas=(0.9, 0.999))
K400 = dict(OFFICIAL, sampling="dense", sampling_rate=4, hflip=True, test_clips=4, test_crops=1, num_classes=400,
            lr_per_32_videos=1e-4, epochs=110, warmup_epochs=10)
SSV2 = dict(OFFICIAL, sampling="uniform", hflip=False, test_clips=1, test_crops=3, num_classes=174,
            lr_per_32_videos=2e-4, epochs=50, warmup_epochs=5)
K600 = dict(K400, num_classes=600)
SSV1 = dict(SSV2, epochs=60)
# batch_size counts clips: the official TRAIN.BATCH_SIZE videos x AUG.NUM_SAMPLE 2.
RECIPES = {
    "k400_uniformer_s16x4.yaml": dict(K400, variant="uniformer_s", num_frames=16, drop_path_rate=0.1, batch_size=64),
    "k400_uniformer_b16x4.yaml": dict(K400, variant="uniformer_b", num_frames=16, drop_path_rate=0.3, batch_size=80),
    "k400_uniformer_b32x4.yaml": dict(K400, variant="uniformer_b", num_frames=32, drop_path_rate=0.3, batch_size=64),
    "ssv2_uniformer_s16.yaml": dict(SSV2, variant="uniformer_s", num_frames=16, drop_path_rate=0.3, batch_size=64),
    "ssv2_uniformer_b16.yaml": dict(SSV2, variant="uniformer_b", num_frames=16, drop_path_rate=0.4, batch_size=80),
    "k600_uniformer_b16x4.yaml": dict(K600, variant="uniformer_b", num_frames=16, drop_path_rate=0.3, batch_size=80),
    # The released run: 4 nodes x 8 GPUs, TRAIN.BATCH_SIZE 32 videos per node.
    "k600_uniformer_b32x4.yaml": dict(K600, variant="uniformer_b", num_frames=32, drop_path_rate=0.3, batch_size=256,
                                      num_workers=32, grad_checkpointing=True),
    "ssv1_uniformer_s16.yaml": dict(SSV1, variant="uniformer_s", num_frames=16, drop_path_rate=0.2, batch_size=64),
    "ssv1_uniformer_b16.yaml": dict(SSV1, variant="uniformer_b", num_frames=16, drop_path_rate=0.6, batch_size=80),
    "ssv1_uniformer_b32.yaml": dict(SSV1, variant="uniformer_b", num_frames=32, drop_path_rate=0.6, batch_size=64,
                                    grad_checkpointing=True),
    "ssv2_uniformer_b32.yaml": dict(SSV2, variant="uniformer_b", num_frames=32, drop_path_rate=0.5, batch_size=64,
                                    grad_checkpointing=True),
}
# The official runs' learning rate at their batch, as their run.sh writes SOLVER.BASE_LR.
OFFICIAL_LR = {"k400_uniformer_s16x4.yaml": "1e-4", "k400_uniformer_b16x4.yaml": "1.25e-4",
               "k400_uniformer_b32x4.yaml": "1e-4", "ssv2_uniformer_s16.yaml": "2e-4",
               "ssv2_uniformer_b16.yaml": "2.5e-4", "k600_uniformer_b16x4.yaml": "1.25e-4",
               "k600_uniformer_b32x4.yaml": "4e-4",  # BASE_LR 1e-4 x 4 nodes (BASE_LR_SCALE_NUM_SHARDS)
               "ssv1_uniformer_s16.yaml": "2e-4", "ssv1_uniformer_b16.yaml": "2.5e-4",
               "ssv1_uniformer_b32.yaml": "2e-4", "ssv2_uniformer_b32.yaml": "2e-4"}
# The published recipes refuse to start without pretrained weights (model.require_init).
INIT = ["model.init_from=s3://BUCKET/checkpoints/pretrained.pth"]
# What each recipe starts from, as the official configs' UNIFORMER.PRETRAIN_NAME says.
PRETRAINED = {"k400_uniformer_s16x4.yaml": "uniformer_small_in1k",
              "k400_uniformer_b16x4.yaml": "uniformer_base_in1k",
              "k400_uniformer_b32x4.yaml": "uniformer_base_in1k",
              "ssv2_uniformer_s16.yaml": "uniformer_small_k400_16x4",
              "ssv2_uniformer_b16.yaml": "uniformer_base_k400_16x4",
              "k600_uniformer_b16x4.yaml": "uniformer_base_in1k",
              "k600_uniformer_b32x4.yaml": "uniformer_base_in1k",
              "ssv1_uniformer_s16.yaml": "uniformer_small_k400_16x4",
              "ssv1_uniformer_b16.yaml": "uniformer_base_k400_16x4",
              "ssv1_uniformer_b32.yaml": "uniformer_base_k400_16x4",
              "ssv2_uniformer_b32.yaml": "uniformer_base_k600_16x4"}
# The top-1 the official README reports for each run (video_classification/README.md, Model Zoo).
PUBLISHED = {"k400_uniformer_s16x4.yaml": 80.8, "k400_uniformer_b16x4.yaml": 82.0, "k400_uniformer_b32x4.yaml": 82.9,
             "k600_uniformer_b16x4.yaml": 84.0, "k600_uniformer_b32x4.yaml": 84.5, "ssv1_uniformer_s16.yaml": 57.2,
             "ssv1_uniformer_b16.yaml": 59.1, "ssv1_uniformer_b32.yaml": 60.9, "ssv2_uniformer_s16.yaml": 67.7,
             "ssv2_uniformer_b16.yaml": 70.4, "ssv2_uniformer_b32.yaml": 71.2}


def flat(cfg) -> dict:
    return {key.split(".", 1)[1]: value for key, value in cfg.to_flat_dict().items()}


def header_command(path: Path, program: str) -> list[str]:
    """The `uniformer <program> ...` command in the file's leading comment, continuation lines joined."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = "\n".join(lines).replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith(f"uniformer {program} "):
            return shlex.split(line)[2:]
    raise AssertionError(f"{path.name}: no `uniformer {program}` command in the header")


def test_every_config_is_found():
    assert set(RECIPES) <= {p.name for p in ALL_CONFIGS}


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads(path):
    cfg = load_config(path, INIT)
    from model import list_variants

    assert cfg.model.variant in list_variants()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_values(name):
    got = flat(load_config(CONFIGS / name, INIT))
    expected = RECIPES[name]
    assert {k: got[k] for k in expected} == expected
    assert tuple(got["mean"]) == (0.45,) * 3 and tuple(got["std"]) == (0.225,) * 3 and got["require_init"] is True
    assert got["use_gpu"] is True and got["precision"] == "bf16"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_learning_rate_is_the_official_one(name):
    cfg = load_config(CONFIGS / name, INIT)
    lr = cfg.base_lr()
    assert lr == pytest.approx(float(OFFICIAL_LR[name]))
    assert f"-> lr {OFFICIAL_LR[name]};" in (CONFIGS / name).read_text()  # the header says it


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_in_the_comparison_table(name):
    table = (CONFIGS / "README.md").read_text()
    assert f"`{name}`" in table and "not implemented" not in (CONFIGS / name).read_text().lower()
    row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
    assert f"`{PRETRAINED[name]}`" in row and f"| {PUBLISHED[name]} (" in row


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_header_names_the_published_figure_and_the_start(name):
    from pipeline.data.official import parse_checkpoint_name, published_top1

    lines = (CONFIGS / name).read_text().splitlines()
    assert f"{PUBLISHED[name]} top-1" in " ".join(lines[:2])
    header = " ".join(line for line in lines if line.startswith("#"))
    start = {"in1k": "ImageNet-1k", "k400": "official K400", "k600": "official K600"}[PRETRAINED[name].split("_")[2]]
    assert f"starting from the {start}" in header
    cfg = load_config(CONFIGS / name, INIT)
    dataset = name.split("_")[0]
    pretrained = parse_checkpoint_name(PRETRAINED[name] + ".pth").dataset
    assert published_top1(dataset, cfg.model.variant, cfg.data.num_frames, sampling_rate=cfg.data.sampling_rate,
                          pretrained=pretrained) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_header_train_command_is_valid(name):
    args = header_command(CONFIGS / name, "train")
    assert args[:2] == ["--config", f"infra/configs/{name}"]
    overrides, flags = [], args[2:]
    while flags:
        token = flags.pop(0)
        assert "=" in token and not token.startswith("-"), f"{name}: unexpected {token!r} in the train command"
        overrides.append(token)
    cfg = load_config(ROOT / args[1], overrides)
    assert cfg.data.manifest.startswith("s3://") and cfg.train.storage_path.startswith("s3://")
    assert cfg.model.init_from == f"s3://BUCKET/checkpoints/{PRETRAINED[name]}.pth"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_refuses_to_train_from_scratch(name):
    with pytest.raises(ConfigError, match=r"^model\.init_from is required by this recipe \(model\.require_init=true\): "
                       r"pass model\.init_from=URI .*, or model\.require_init=false to train from scratch, got ''$"):
        load_config(CONFIGS / name)
    assert load_config(CONFIGS / name, ["model.require_init=false"]).model.init_from == ""


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_header_prepare_command_is_valid(name):
    from jobs.prepare import build_parser

    args = build_parser().parse_args(header_command(CONFIGS / name, "prepare"))
    assert args.output.startswith("s3://")
    if name.startswith(("k400", "k600")):  # prepared copies keep every 4th frame: the recipe's sampling stride
        assert args.frame_stride == load_config(CONFIGS / name, INIT).data.sampling_rate == 4
    if name.startswith(("k400", "k600", "ssv1")):  # the official checkpoints' class indices
        assert args.labels == name[:4]
    if name.startswith("ssv1"):  # JPEG frames at the dataset's 12 fps
        assert args.frames_fps == 12


def test_the_finetune_recipe_starts_from_k400_with_a_new_head_for_the_datas_classes():
    """Settings of the official HMDB51/UCF101 fine-tunes from K400 (exp/uniformer_s16x4_hmdb51_prek400)."""
    name = "finetune_uniformer_s16x4.yaml"
    got = flat(load_config(CONFIGS / name, INIT))
    expected = dict(variant="uniformer_s", num_classes=0, new_head=True, require_init=True, drop_path_rate=0.2,
                    rand_augment="rand-m5-n2-mstd0.25", lr_per_32_videos=1.25e-5, epochs=25, warmup_epochs=5,
                    test_clips=5, test_crops=3, val_every_epochs=1, checkpoint_metric="val_top1", sampling="dense",
                    num_frames=16, sampling_rate=4, repeated_aug=2, use_gpu=True)
    assert {k: got[k] for k in expected} == expected
    cfg = load_config(CONFIGS / name, INIT)
    assert cfg.base_lr() * 128 / (cfg.train.batch_size // cfg.data.repeated_aug) == pytest.approx(5e-5)  # official
    args = header_command(CONFIGS / name, "train")
    assert load_config(ROOT / args[1], args[2:]).model.init_from == "s3://BUCKET/checkpoints/uniformer_small_k400_16x4.pth"
    from jobs.prepare import build_parser

    prepare = build_parser().parse_args(header_command(CONFIGS / name, "prepare"))
    assert prepare.annotations is None and prepare.frame_stride == cfg.data.sampling_rate  # class folders
    assert f"`{name}`" in (CONFIGS / "README.md").read_text()
