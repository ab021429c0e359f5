import re

import pytest

from pipeline.config import Config, ConfigError, config_from_dict, load_config


def test_defaults_are_the_k400_recipe():
    cfg = load_config()
    assert (cfg.data.num_frames, cfg.data.sampling_rate, cfg.optim.lr_per_32_videos) == (16, 4, 1e-4)
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.clip_grad_norm == 20.0


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr_per_32_videos=2e-4", "data.scale=[0.2, 1]", "data.hflip=false",
                             "train.num_workers=4", "train.batch_size=8"])
    assert cfg.optim.lr_per_32_videos == 2e-4 and cfg.data.scale == (0.2, 1.0) and cfg.data.hflip is False
    assert cfg.train.num_workers == 4


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr_per_32_videos: 3e-4\n  epochs: 5\n  warmup_epochs: 1\n"
                    "model:\n  variant: uniformer_xs\n")
    cfg = load_config(path, ["optim.epochs=7"])
    assert (cfg.optim.lr_per_32_videos, cfg.optim.epochs, cfg.model.variant) == (3e-4, 7, "uniformer_xs")


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["data.sampling=uniform", "train.precision=fp16"])
    assert config_from_dict(cfg.to_dict()) == cfg
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "c.yaml") == cfg
    assert cfg.to_flat_dict()["data.sampling"] == "uniform"


@pytest.mark.parametrize("override, message", [
    ("optim.lr=1", r"unknown config key optim\.lr; known keys in optim: .*lr_per_32_videos"),
    ("bogus.x=1", r"unknown config key bogus"),
    ("optim.lr_per_32_videos=-1", r"optim\.lr_per_32_videos must be > 0, got -1"),
    ("train.batch_size=3", r"train\.batch_size must be divisible by train\.num_workers"),
    ("data.repeated_aug=3", r"train\.batch_size counts clips and must hold whole videos: divisible by "
     r"data\.repeated_aug = 3, got 32"),
    ("model.require_init=true", r"model\.init_from is required by this recipe \(model\.require_init=true\)"),
    ("data.random_erasing=1.5", r"data\.random_erasing must be a probability in \[0, 1\], got 1\.5"),
    ("data.rand_augment=rand-x1", r"data\.rand_augment: 'rand-x1': bad or repeated part 'x1'"),
    ("train.precision=fp8", r"train\.precision: 'fp8' is not one of 'bf16', 'fp16', 'fp32'"),
    ("data.hflip=1", r"data\.hflip: expected true or false, got '1'"),
    ("data.num_frames=7", r"data\.num_frames must be even"),
    ("data.crop_size=100", r"data\.crop_size must be a multiple of 32"),
    ("train.num_workers=0", r"train\.num_workers must be at least 1"),
    ("data.inference_cpu_actors=0", r"data\.inference_cpu_actors must be at least 1, got 0"),
    ("data.inference_batch_size=0", r"data\.inference_batch_size must be at least 1, got 0"),
    ("data.inference_actor_cpus=0", r"data\.inference_actor_cpus must be > 0, got 0"),
    ("data.scale=[0.5]", r"data\.scale: expected a list of 2 numbers"),
    ("nonsense", r"not of the form section\.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match=r"config file nope\.yaml does not exist"):
        load_config("nope.yaml")


def test_frozen():
    with pytest.raises(AttributeError):
        Config().train.seed = 3


@pytest.mark.parametrize("override, field, expected", [
    ("train.run_name=exp #3", ("train", "run_name"), "exp #3"),  # YAML would cut at the comment
    ("train.run_name=010", ("train", "run_name"), "010"),  # a string field keeps the text
    ("train.seed=010", ("train", "seed"), 10),  # YAML 1.1 would read octal 8
    ("tracking.experiment=yes", ("tracking", "experiment"), "yes"),  # YAML would read True
    ("data.test_crops=3", ("data", "test_crops"), 3),
    ("data.scale=0.3,1", ("data", "scale"), (0.3, 1.0)),
    ("data.hflip=False", ("data", "hflip"), False),
    ("data.manifest=", ("data", "manifest"), ""),
])
def test_override_text_is_taken_by_the_field_type(override, field, expected):
    section, key = field
    value = getattr(getattr(load_config(None, [override]), section), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("override, message", [
    ("data.test_crops=true", r"data\.test_crops: 'true' is not one of 1, 3"),
    ("train.seed=1.5", r"train\.seed: expected an integer, got '1\.5'"),
    ("train.seed=0x10", r"train\.seed: expected an integer"),
    ("data.hflip=yes", r"data\.hflip: expected true or false, got 'yes'"),
    ("optim.epochs=true", r"optim\.epochs: expected an integer, got 'true'"),
    ("optim.weight_decay=off", r"optim\.weight_decay: expected a number, got 'off'"),
    ("train.checkpoint_metric=val_acc", r"train\.checkpoint_metric: 'val_acc' is not one of 'val_top1'"),
    ("tracking.log_every_steps=0", r"tracking\.log_every_steps must be at least 1"),
    ("train=1", r"override 'train=1': train is a section, not a key"),
    ("train.seed.x=1", r"unknown config key train\.seed\.x"),
])
def test_strict_override_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_booleans_are_not_integers_for_literals(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  test_crops: true\n")
    with pytest.raises(ConfigError, match=r"data\.test_crops: True is not one of 1, 3"):
        load_config(path)


def test_mixup_needs_two_clips_per_micro_batch():
    with pytest.raises(ConfigError, match=r"optim\.mixup_alpha/cutmix_alpha need at least 2 clips per micro-batch"):
        load_config(None, ["train.num_workers=2", "train.batch_size=2"])
    cfg = load_config(None, ["train.num_workers=2", "train.batch_size=2", "optim.mixup_alpha=0",
                             "optim.cutmix_alpha=0"])
    assert cfg.train.batch_size == 2


@pytest.mark.parametrize("metric, order", [("val_top1", "max"), ("val_mean_class", "max"), ("val_loss", "min")])
def test_checkpoint_order_follows_the_metric(metric, order):
    from pipeline.config import checkpoint_order

    assert checkpoint_order(load_config(None, [f"train.checkpoint_metric={metric}"]).train.checkpoint_metric) == order


def test_min_lr_is_checked_against_the_scaled_learning_rate():
    # 1e-4 per 32 videos at 8 videos per step is 2.5e-5: a min_lr of 5e-5 would make the cosine rise.
    with pytest.raises(ConfigError, match=r"optim\.min_lr must be in \[0, the scaled learning rate 2\.5e-05\]"):
        load_config(None, ["train.batch_size=8", "optim.min_lr=5e-5", "train.num_workers=1"])
    assert load_config(None, ["train.batch_size=8", "optim.min_lr=2e-5", "train.num_workers=1"]).base_lr() == 2.5e-5


def float_keys() -> list[tuple[str, int]]:
    """Every float key of the config with its arity (1, or the length of a tuple of floats)."""
    import dataclasses
    import typing

    keys = []
    for section, cls in typing.get_type_hints(Config).items():
        if not dataclasses.is_dataclass(cls):
            continue
        for name, hint in typing.get_type_hints(cls).items():
            args = typing.get_args(hint)
            if hint is float or (typing.get_origin(hint) is tuple and args and all(a is float for a in args)):
                keys.append((f"{section}.{name}", len(args) or 1))
    return keys


def test_float_keys_are_found():
    keys = dict(float_keys())
    assert keys["optim.lr_per_32_videos"] == 1 and keys["optim.weight_decay"] == 1 and keys["data.mean"] == 3


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e999"])
def test_every_float_key_refuses_non_finite_values(text):
    for key, arity in float_keys():
        value = ",".join([text] + ["1"] * (arity - 1))
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number, got "):
            load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", ".NaN", "1e999", "'inf'"])
def test_yaml_non_finite_numbers_are_refused(tmp_path, text):
    path = tmp_path / "c.yaml"
    for key in ("lr_per_32_videos", "weight_decay"):
        path.write_text(f"optim:\n  {key}: {text}\n")
        with pytest.raises(ConfigError, match=rf"^optim\.{key} must be a finite number, got "):
            load_config(path)
    path.write_text(f"optim:\n  betas: [0.9, {text}]\n")
    with pytest.raises(ConfigError, match=r"^optim\.betas must be a finite number, got "):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("optim.lr_per_32_videos=1_0", r"^optim\.lr_per_32_videos: expected a number, got '1_0'"),
    ("optim.weight_decay=0.0_5", r"^optim\.weight_decay: expected a number, got '0\.0_5'"),
    ("data.scale=0.08,1_0", r"^data\.scale: expected a number, got '1_0'"),
    ("optim.epochs=1_0", r"^optim\.epochs: expected an integer, got '1_0'"),
    ("optim.lr_per_32_videos=0x10", r"^optim\.lr_per_32_videos: expected a number, got '0x10'"),
])
def test_numbers_are_parsed_strictly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_number_strings_are_parsed_strictly(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr_per_32_videos: 2e-4\n  weight_decay: '1_0'\n")  # YAML 1.1: 2e-4 is a string
    with pytest.raises(ConfigError, match=r"^optim\.weight_decay: expected a number, got '1_0'"):
        load_config(path)
    path.write_text("optim:\n  lr_per_32_videos: 2e-4\n")
    assert load_config(path).optim.lr_per_32_videos == 2e-4
