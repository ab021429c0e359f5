"""One typed, frozen config tree for every job.

Loaded from YAML (`infra/configs/*.yaml`) and then `section.key=value` overrides; anything
unknown or of the wrong type is an error naming the key. The resolved config is logged whole
to MLflow and saved in every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.data.rand_augment import parse_rand_augment


class ConfigError(ValueError):
    """A bad config value; the message names the dotted key."""


@dataclass(frozen=True)
class StorageConfig:
    # S3-compatible endpoint (MinIO, Ceph, moto); empty means the AWS default for the region.
    # Credentials always come from the standard AWS chain, never from this config.
    endpoint_url: str = ""
    region: str = ""


@dataclass(frozen=True)
class MediaLimits:
    """What one untrusted video may cost, checked before anything large is allocated
    (`pipeline.data.media`). The defaults fit Kinetics and Something-Something (at most 1080p, seconds
    long, tens of MB) with a wide margin; a video over one is refused with the limit's name."""

    max_object_mb: float = 1024.0  # bytes of one video file or object, read before it is fetched
    max_pixels: int = 4096 * 4096  # per frame, stored and as displayed (sample aspect ratio applied)
    max_aspect: float = 8.0  # long side / short side of the displayed frame (cinema is 2.4)
    max_frames: int = 108_000  # frames of one video (an hour at 30 fps)
    max_duration_s: float = 3600.0  # declared or timestamped length of one video
    max_request_mb: float = 256.0  # model server: video bytes of one request
    max_request_rows: int = 64  # model server: rows of one request
    row_deadline_s: float = 120.0  # model server: seconds to open and decode one row's video


@dataclass(frozen=True)
class DataConfig:
    manifest: str = ""  # URI of `prepare`'s output folder or its manifest.parquet
    train_split: str = "train"
    val_split: str = "val"
    sampling: Literal["dense", "uniform"] = "dense"  # uniform = one frame per segment (SSv2)
    num_frames: int = 16
    sampling_rate: int = 4  # in frames of the original video
    crop_size: int = 224
    short_side: int = 224  # evaluation resize before the centre / 3 crops
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: bool = True
    # Official AUG.AA_TYPE, e.g. "rand-m7-n4-mstd0.5-inc1"; empty: off. Training clips only, before the crop.
    rand_augment: str = ""
    # Where training clips are augmented (RandAugment, crop, flip): "device" ships whole decoded frames with
    # the clip's draws and the trainer applies them on its GPU; "cpu" augments in the decode task.
    augment_on: Literal["device", "cpu"] = "device"
    # Official AUG.RE_PROB: chance per training clip of one erased box; runs on the device (recipe.random_erase).
    random_erasing: float = 0.0
    mean: tuple[float, float, float] = (0.45, 0.45, 0.45)
    std: tuple[float, float, float] = (0.225, 0.225, 0.225)
    repeated_aug: int = 1  # clips drawn per video per epoch (repeated augmentation, official NUM_SAMPLE)
    test_clips: int = 4
    test_crops: Literal[1, 3] = 1
    decode_cpus: float = 1.0  # CPUs reserved by each decode task
    decode_concurrency: int = 0  # 0 lets Ray Data choose
    # Ray node label (key=value) of CPU-only decode nodes (infra/cluster/aws.yaml, infra/k8s set it); empty:
    # the cluster has none. With decode_placement "trainers_first" decode tasks run on the other nodes (the
    # trainers' GPU nodes, whose clips then stay in local memory) while they have free CPUs, and the decode
    # nodes take the rest; "decode_nodes_only" keeps decoding off the GPU nodes when the cluster has decode nodes.
    decode_nodes: str = "uniformer.io/node-role=decode"
    decode_placement: Literal["trainers_first", "decode_nodes_only"] = "trainers_first"
    # Object store bytes (GB) the training's data stream may hold; 0: Ray Data's default share.
    object_store_budget_gb: float = 0.0
    # Inference (evaluate, predict): the network runs in a Ray Data actor pool, one actor per GPU of the
    # cluster, or this many actors on CPU when it has none.
    inference_cpu_actors: int = 1
    inference_actor_cpus: float = 1.0  # CPUs each inference actor reserves (on CPU, also its torch threads)
    inference_batch_size: int = 16  # views per forward pass of an inference actor
    limits: MediaLimits = field(default_factory=MediaLimits)  # every open of a video (prepare, training, serving)


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "uniformer_s"
    # 0: as many as the prepared data's labels.json names (set when a training starts, then logged and
    # checkpointed as that number); a recipe of a published dataset sets its own.
    num_classes: int = 0
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = False
    init_from: str = ""  # official or own checkpoint; ImageNet 2D weights are inflated
    # What init_from was trained on when its file name and head do not say (pipeline.data.official): its head
    # is kept only with the same labels as the data's (same names, same order, or the head reordered); "none":
    # not an official dataset, no label check. Empty: from the name, else the head's class count.
    init_dataset: Literal["", "k400", "k600", "ssv1", "ssv2", "imagenet", "none"] = ""
    # Drop init_from's classifier and train a new one for the data's classes (fine-tuning on own videos).
    new_head: bool = False
    # True in the published recipes: they fine-tune pretrained weights (K400 from ImageNet-1k,
    # SSv2 from K400), and from scratch they land far below the paper; refuse an empty init_from.
    require_init: bool = False


@dataclass(frozen=True)
class OptimConfig:
    # Per 32 VIDEOS, as the official configs count (their batch is videos x NUM_SAMPLE clips):
    # lr = lr_per_32_videos x (train.batch_size / data.repeated_aug) / 32.
    lr_per_32_videos: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 110
    warmup_epochs: float = 10
    min_lr: float = 1e-6
    clip_grad_norm: float = 20.0  # 0 disables
    grad_accum_steps: int = 1
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.8  # 0 disables
    cutmix_alpha: float = 1.0  # 0 disables
    mixup_prob: float = 1.0
    ema_decay: float = 0.0  # 0 disables the weight EMA


@dataclass(frozen=True)
class TrainConfig:
    run_name: str = "uniformer"
    storage_path: str = "work/ray_results"  # local folder or s3://bucket/prefix
    num_workers: int = 2  # one per GPU; the layout `train.batch_size` and `optim.grad_accum_steps` are set for
    # Elastic: with 1 <= min_workers < num_workers the run trains on as many workers as the cluster has between
    # the two (continuing from its checkpoint on fewer after a node is lost); 0: always num_workers.
    min_workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    batch_size: int = 32  # global clips per optimizer step (data.repeated_aug clips per video)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # How DDP sends gradients between workers: "bf16" halves the bytes of every all-reduce (86 MB -> 43 MB per
    # step for UniFormer-S) at bf16's 8-bit mantissa; worth it when nodes talk over TCP (see README).
    grad_compression: Literal["none", "bf16"] = "none"
    seed: int = 0
    val_every_epochs: int = 1
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 2
    # Ray keeps the best `keep_checkpoints` by this validation metric (and the latest): highest
    # first, lowest for val_loss (see `checkpoint_order`).
    checkpoint_metric: Literal["val_top1", "val_top5", "val_mean_class", "val_loss"] = "val_top1"
    max_failures: int = 0
    max_steps_per_epoch: int = 0  # 0 = the whole split


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite in the work folder
    experiment: str = "uniformer"
    registered_model: str = "uniformer"
    system_metrics: bool = False
    log_every_steps: int = 10  # per-step metrics are averaged on the device and read this often


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def base_lr(self) -> float:
        """The peak learning rate: optim.lr_per_32_videos scaled by the global batch in videos.

        The official recipes count videos (their batch is BATCH_SIZE videos x NUM_SAMPLE clips each):
        repeated clips of one video add augmentation, not new samples, so they do not raise the rate.
        """
        return self.optim.lr_per_32_videos * (self.train.batch_size // self.data.repeated_aug) / 32

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict[str, Any]:
        """`section.key -> value` (`section.group.key` for a group such as data.limits), the form
        logged as MLflow params."""
        def flat(prefix: str, tree: dict[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for k, v in tree.items():
                out.update(flat(f"{prefix}{k}.", v) if isinstance(v, dict) else {f"{prefix}{k}": v})
            return out

        return flat("", self.to_dict())

    def to_yaml(self) -> str:
        def plain(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return list(value) if isinstance(value, tuple) else value

        return yaml.safe_dump(plain(self.to_dict()), sort_keys=False)


def checkpoint_order(metric: str) -> Literal["max", "min"]:
    """How Ray ranks checkpoints by `metric`: a loss is better lower, an accuracy higher."""
    return "min" if metric.endswith("loss") else "max"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's type hint; return it in the field's type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        # Compared with types too: True == 1 would otherwise pass for Literal[1, 3].
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"{key}: union types are not supported in the config")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            value = _float_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer past float's range
            number = math.inf
        if not math.isfinite(number):  # YAML's .inf and .nan, or 1e999
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {hint!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; known keys in "
                          f"{prefix.rstrip('.') or 'the config'}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a mapping, got {value!r}")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


_INT_TEXT = re.compile(r"[+-]?[0-9]+")


# A decimal number, or inf/nan (parsed so that _coerce names them as not finite). Not float()'s own
# grammar, which also reads "1_0" as ten.
_FLOAT_TEXT = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.I)


def _float_text(text: str) -> float | str:
    """`text` as a float when it is a plain decimal number (or inf/nan), else the text itself."""
    return float(text) if _FLOAT_TEXT.fullmatch(text.strip()) else text


def _parse_text(key: str, raw: str, hint: Any) -> Any:
    """An override's text as a field's type. Strings are taken verbatim ("exp #3" stays whole);
    numbers and booleans are strict ("010" is ten, never YAML's octal eight; "1_0" is no number; only
    true/false are booleans); lists are comma-separated, with optional brackets."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        return next((a for a in allowed if str(a) == raw), raw)  # a miss is reported by _coerce
    if origin is tuple:
        items = [item.strip() for item in raw.strip().strip("[]()").split(",")]
        if items == [""]:
            items = []
        args = typing.get_args(hint)
        if len(items) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {raw!r}")
        return tuple(_parse_text(key, item, a) for item, a in zip(items, args))
    if hint is bool:
        return {"true": True, "false": False}.get(raw.lower(), raw)
    if hint is int:
        return int(raw) if _INT_TEXT.fullmatch(raw.strip()) else raw
    if hint is float:
        return _float_text(raw)
    return raw


def _field_hint(parts: list[str], override: str) -> Any:
    """The type hint of the dotted config key `parts`, or an error naming the unknown part."""
    cls: Any = Config
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            section = ".".join(parts[:depth])
            known = ", ".join(sorted(hints)) if hints else "none: it is not a section"
            raise ConfigError(f"unknown config key {'.'.join(parts[:depth + 1])}; known keys in "
                              f"{section or 'the config'}: {known}")
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"override {override!r}: {'.'.join(parts)} is a section, not a key")
    return cls


def _apply_override(tree: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    parts = key.split(".")
    hint = _field_hint(parts, override)
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = _parse_text(key, raw, hint)


def _check(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Range and consistency checks; the error names the key and the fix."""
    d, m, o, t, tr = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.tracking
    for key, value in [("data.num_frames", d.num_frames), ("data.sampling_rate", d.sampling_rate),
                       ("data.crop_size", d.crop_size), ("data.short_side", d.short_side),
                       ("data.repeated_aug", d.repeated_aug), ("data.test_clips", d.test_clips),
                       ("data.inference_cpu_actors", d.inference_cpu_actors),
                       ("data.inference_batch_size", d.inference_batch_size),
                       ("optim.epochs", o.epochs),
                       ("optim.grad_accum_steps", o.grad_accum_steps),
                       ("train.num_workers", t.num_workers), ("train.batch_size", t.batch_size),
                       ("train.val_every_epochs", t.val_every_epochs),
                       ("train.checkpoint_every_epochs", t.checkpoint_every_epochs),
                       ("train.keep_checkpoints", t.keep_checkpoints)]:
        _check(value >= 1, key, "must be at least 1", value)
    _check(d.num_frames % 2 == 0, "data.num_frames", "must be even (the stem halves time)", d.num_frames)
    _check(d.crop_size % 32 == 0, "data.crop_size", "must be a multiple of 32", d.crop_size)
    _check(d.short_side >= d.crop_size, "data.short_side", f"must be >= data.crop_size ({d.crop_size})",
           d.short_side)
    _check(0 < d.scale[0] <= d.scale[1] <= 1, "data.scale", "must be 0 < min <= max <= 1", d.scale)
    _check(0 < d.ratio[0] <= d.ratio[1], "data.ratio", "must be 0 < min <= max", d.ratio)
    _check(all(s > 0 for s in d.std), "data.std", "must be positive", d.std)
    _check(d.decode_cpus > 0, "data.decode_cpus", "must be > 0", d.decode_cpus)
    _check(d.decode_concurrency >= 0, "data.decode_concurrency", "must be >= 0", d.decode_concurrency)
    _check(not d.decode_nodes or re.fullmatch(r"[\w./-]+=[\w.-]+", d.decode_nodes) is not None, "data.decode_nodes",
           "must be a node label key=value, or empty", d.decode_nodes)
    _check(d.inference_actor_cpus > 0, "data.inference_actor_cpus", "must be > 0", d.inference_actor_cpus)
    _check(d.object_store_budget_gb >= 0, "data.object_store_budget_gb", "must be >= 0", d.object_store_budget_gb)
    lim = d.limits
    for key, value in [("max_object_mb", lim.max_object_mb), ("max_pixels", lim.max_pixels),
                       ("max_frames", lim.max_frames), ("max_duration_s", lim.max_duration_s),
                       ("max_request_mb", lim.max_request_mb), ("max_request_rows", lim.max_request_rows),
                       ("row_deadline_s", lim.row_deadline_s)]:
        _check(value > 0, f"data.limits.{key}", "must be > 0", value)
    _check(lim.max_aspect >= 1, "data.limits.max_aspect", "must be >= 1 (long side / short side)", lim.max_aspect)
    _check(0 <= d.random_erasing <= 1, "data.random_erasing", "must be a probability in [0, 1]", d.random_erasing)
    if d.rand_augment:
        try:
            parse_rand_augment(d.rand_augment)
        except ValueError as err:
            raise ConfigError(f"data.rand_augment: {err}") from None
    _check(m.num_classes >= 0, "model.num_classes", "must be >= 0 (0: as many as the data's labels.json names)",
           m.num_classes)
    _check(0 <= m.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)", m.drop_path_rate)
    _check(bool(m.init_from) or not m.require_init, "model.init_from",
           "is required by this recipe (model.require_init=true): pass model.init_from=URI of the pretrained "
           "checkpoint named in the recipe's header, or model.require_init=false to train from scratch", m.init_from)
    _check(o.lr_per_32_videos > 0, "optim.lr_per_32_videos", "must be > 0", o.lr_per_32_videos)
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _check(0 <= o.warmup_epochs < o.epochs, "optim.warmup_epochs", f"must be in [0, optim.epochs={o.epochs})",
           o.warmup_epochs)
    _check(all(0 <= b < 1 for b in o.betas), "optim.betas", "must be in [0, 1)", o.betas)
    _check(o.clip_grad_norm >= 0, "optim.clip_grad_norm", "must be >= 0 (0 disables)", o.clip_grad_norm)
    _check(0 <= o.label_smoothing < 1, "optim.label_smoothing", "must be in [0, 1)", o.label_smoothing)
    _check(o.mixup_alpha >= 0 and o.cutmix_alpha >= 0, "optim.mixup_alpha/cutmix_alpha", "must be >= 0",
           (o.mixup_alpha, o.cutmix_alpha))
    _check(0 <= o.mixup_prob <= 1, "optim.mixup_prob", "must be in [0, 1]", o.mixup_prob)
    _check(0 <= o.ema_decay < 1, "optim.ema_decay", "must be in [0, 1) (0 disables)", o.ema_decay)
    _check(t.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0", t.cpus_per_worker)
    _check(t.max_failures >= -1, "train.max_failures", "must be >= -1 (-1 retries forever)", t.max_failures)
    _check(t.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", "must be >= 0 (0 = whole split)",
           t.max_steps_per_epoch)
    _check(t.batch_size % d.repeated_aug == 0, "train.batch_size",
           f"counts clips and must hold whole videos: divisible by data.repeated_aug = {d.repeated_aug}",
           t.batch_size)
    _check(0 <= o.min_lr <= cfg.base_lr(), "optim.min_lr",
           f"must be in [0, the scaled learning rate {cfg.base_lr():.4g}] (optim.lr_per_32_videos x "
           f"{t.batch_size // d.repeated_aug} videos per step / 32)", o.min_lr)
    per_step = t.num_workers * o.grad_accum_steps
    _check(t.batch_size % per_step == 0, "train.batch_size",
           f"must be divisible by train.num_workers x optim.grad_accum_steps = {per_step}", t.batch_size)
    micro_batch = t.batch_size // per_step
    _check(micro_batch >= 2 or (o.mixup_alpha == 0 and o.cutmix_alpha == 0), "optim.mixup_alpha/cutmix_alpha",
           f"need at least 2 clips per micro-batch to blend (train.batch_size / (train.num_workers x "
           f"optim.grad_accum_steps) = {micro_batch}); set both to 0 or raise train.batch_size",
           (o.mixup_alpha, o.cutmix_alpha))
    _check(0 <= t.min_workers <= t.num_workers, "train.min_workers",
           f"must be in [0, train.num_workers={t.num_workers}] (0: always train.num_workers)", t.min_workers)
    for world in worker_counts(cfg):
        accumulation(cfg, world)
    _check(tr.log_every_steps >= 1, "tracking.log_every_steps", "must be at least 1", tr.log_every_steps)
    _check(bool(t.run_name) and "/" not in t.run_name, "train.run_name", "must be a non-empty name without '/'",
           t.run_name)
    return cfg


def worker_counts(cfg: Config) -> range:
    """The sizes the worker group may have: train.num_workers, or min_workers to it when elastic."""
    return range(cfg.train.min_workers or cfg.train.num_workers, cfg.train.num_workers + 1)


def accumulation(cfg: Config, world: int) -> int:
    """Micro-batches per optimizer step for a group of `world` workers. The global batch
    (`train.batch_size` clips, which sets the learning rate and schedule) never changes; the
    configured layout's micro-batch (`train.num_workers` x `optim.grad_accum_steps`) is the most a
    worker holds at once, so fewer workers accumulate more. Raises ConfigError naming why when
    `world` workers cannot keep the batch."""
    batch, cap = cfg.train.batch_size, cfg.train.batch_size // (cfg.train.num_workers * cfg.optim.grad_accum_steps)
    if world > batch:
        raise ConfigError(f"train.batch_size={batch} clips cannot be shared by {world} workers: some would get none")
    share = -(-batch // world)  # the most clips a worker takes in one step
    accum = -(-share // cap)
    smallest = batch // world // accum
    if smallest < 2 and (cfg.optim.mixup_alpha > 0 or cfg.optim.cutmix_alpha > 0):
        raise ConfigError(f"at {world} workers a micro-batch holds {smallest} clip(s) of train.batch_size={batch}, "
                          f"and mixup/cutmix blend pairs of clips: raise train.batch_size or train.min_workers")
    return accum


# What may change when a training resumes under the same train.run_name: how long it runs, how
# often it validates and checkpoints, how it survives failures, how many workers and CPUs it takes
# (the global batch stays: see `accumulation`), what it
# reports and how inference and the model server run (training never reads those). Anything else
# would make the run's params and checkpoints describe a training that did not happen.
RESUMABLE_KEYS = frozenset({"optim.epochs", "train.val_every_epochs", "train.checkpoint_every_epochs",
                            "train.max_failures", "train.keep_checkpoints", "train.cpus_per_worker",
                            "train.num_workers", "train.min_workers", "optim.grad_accum_steps",
                            "train.grad_compression",
                            "data.decode_cpus", "data.decode_concurrency", "data.decode_nodes", "data.decode_placement",
                            "data.object_store_budget_gb", "data.inference_cpu_actors",
                            "data.inference_actor_cpus", "data.inference_batch_size",
                            "data.limits.max_request_mb", "data.limits.max_request_rows",
                            "data.limits.row_deadline_s",
                            "tracking.system_metrics", "tracking.log_every_steps"})


def training_identity(cfg: Config, manifest_hash: str) -> dict[str, str]:
    """What a training is, as text: the flat config less RESUMABLE_KEYS, plus the manifest's hash."""
    flat = {k: str(list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_flat_dict().items()
            if k not in RESUMABLE_KEYS}
    return {**flat, "data.manifest_hash": manifest_hash}


def identity_digest(identity: dict[str, str]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def changed_keys(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """Keys of `now` whose value differs from `before` (keys that `before` lacks are skipped: an
    older version of the code did not know them)."""
    return sorted(k for k in now if k in before and before[k] != now[k])


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides; validated."""
    tree: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for override in overrides:
        _apply_override(tree, override)
    return validate(_build(Config, tree, ""))


def config_from_dict(tree: dict[str, Any]) -> Config:
    """The inverse of `Config.to_dict()` (how the config travels to workers and checkpoints)."""
    return validate(_build(Config, tree, ""))


def key_type(key: str) -> Any:
    """The type hint of the dotted config key (ConfigError naming an unknown key or a section)."""
    return _field_hint(key.split("."), key)


def override_value(key: str, raw: str) -> Any:
    """The typed value that the override `key=raw` sets (ConfigError naming the key when it is no value
    of the key's type)."""
    hint = key_type(key)
    return _coerce(key, _parse_text(key, raw, hint), hint)


def typed_value(key: str, value: Any) -> Any:
    """`value` as the key's type: text as an override gives it, anything else as a YAML value is checked
    (so YAML 1.1's `1e-4`, which it reads as text, is a number too)."""
    return override_value(key, value) if isinstance(value, str) else _coerce(key, value, key_type(key))


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """`cfg` with dotted keys set to values (typed as YAML or Python gives them: checked and converted
    like YAML values), validated."""
    tree = cfg.to_dict()
    for key, value in values.items():
        hint = key_type(key)
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node[section]
        node[name] = _coerce(key, value, hint)
    return config_from_dict(tree)


def int_at_least(minimum: int):
    """An argparse `type` for integers of at least `minimum`, with a message naming the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value
    return parse


def _is_override(text: str) -> bool:
    """`section.key=value` with a section of the config: an override, not a path or URI."""
    sections = "|".join(f.name for f in dataclasses.fields(Config))
    return re.fullmatch(rf"(?:{sections})\.[\w.]+=.*", text, flags=re.DOTALL) is not None


def one_value_per_flag(argv: list[str], flag: str, takes) -> list[str]:
    """`FLAG A B k=v` as `FLAG A FLAG B k=v`, for a flag of many values (argparse `action="append"`) ahead of
    the `key=value` overrides: the flag takes each argument after it that `takes(arg)` accepts, and the
    first one it does not (an override, another flag) ends its list."""
    out, taking = [], False
    for arg in argv:
        if arg == flag:
            taking = True
            continue
        if taking and takes(arg):
            out += [flag, arg]
            continue
        taking = False
        out.append(arg)
    return out


def is_override(text: str) -> bool:
    """`section.key=value` with a section of the config (not a path or a URI)."""
    return _is_override(text)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (infra/configs/...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.lr_per_32_videos=2e-4 train.num_workers=2")


def parse_job_args(parser: argparse.ArgumentParser, argv: list[str] | None,
                   flag_keys: dict[str, str] | None = None,
                   default_config: str | Path | None = None,
                   optional_positional: str | None = None) -> tuple[argparse.Namespace, Config]:
    """Parse a job's flags plus `--config` and overrides; a bad config exits with one line.

    `flag_keys` maps a flag's dest to the config key it sets (e.g. init_from -> model.init_from).
    `optional_positional` is the dest of the job's optional positional argument (predict's VIDEO_URI):
    when it is left out, argparse hands it the first override instead, which goes back to the overrides.
    """
    add_config_args(parser)
    parser.set_defaults(config=default_config)
    args = parser.parse_args(argv)
    if optional_positional and _is_override(getattr(args, optional_positional) or ""):
        args.overrides.insert(0, getattr(args, optional_positional))
        setattr(args, optional_positional, None)
    flag_overrides = [f"{key}={getattr(args, dest)}" for dest, key in (flag_keys or {}).items()
                      if getattr(args, dest) is not None]
    try:
        cfg = load_config(args.config, [*args.overrides, *flag_overrides])
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: config error: {err}\n")
    return args, cfg
