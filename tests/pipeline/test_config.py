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
    ("data.hflip=1", r"data\.hflip: expected true or false, got 1"),
    ("data.num_frames=7", r"data\.num_frames must be even"),
    ("data.crop_size=100", r"data\.crop_size must be a multiple of 32"),
    ("train.num_workers=0", r"train\.num_workers must be at least 1"),
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
