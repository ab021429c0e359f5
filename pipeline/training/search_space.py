"""The search space of a sweep: which config keys vary, and how, from `--search` or a YAML file.

    space = parse_search(["optim.lr_per_32_videos=loguniform:1e-5:1e-3",
                          "data.rand_augment=choice:,rand-m7-n4-mstd0.5-inc1"])
    space = load_search_space("search.yaml")
    space.check(cfg)            # every value a legal override of cfg (ConfigError naming the key)
    space.param_space()         # Ray Tune domains, keyed by the dotted config key

A dimension is `KEY=KIND:ARGS`, KEY a key of the typed config (`pipeline.config`):

    loguniform:LOW:HIGH   a float drawn log-uniformly from [LOW, HIGH]   (float keys, 0 < LOW < HIGH)
    uniform:LOW:HIGH      a float drawn uniformly from [LOW, HIGH]       (float keys)
    randint:LOW:HIGH      an integer drawn uniformly from LOW..HIGH, both included (integer keys)
    choice:A,B,...        one of the values, drawn uniformly (values as `key=value` overrides take them;
                          empty is a value: `choice:,rand-m7-n4` is "" or "rand-m7-n4")
    grid:A,B,...          every value, each in its own trials (grid dimensions multiply)

The YAML file maps keys to the same text, or to a mapping of one kind to its arguments:

    optim.lr_per_32_videos: loguniform:1e-5:1e-3
    data.rand_augment: {choice: ["", rand-m7-n4-mstd0.5-inc1]}
    optim.weight_decay: {uniform: [0.01, 0.1]}

Keys that name the sweep, where it stores and reports (`train.run_name`, `train.storage_path`,
`tracking.*`, `storage.*`) or what its trials are compared on (`data.manifest`, `data.val_split`,
`train.checkpoint_metric`) are not searchable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, ConfigError, key_type, typed_value, with_values

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
RANGE_KINDS = ("loguniform", "uniform", "randint")

# Set by the sweep for each trial, or shared by every trial so that their metrics compare.
NOT_SEARCHABLE = ("train.run_name", "train.storage_path", "tracking.", "storage.", "data.manifest", "data.val_split",
                  "train.checkpoint_metric")


@dataclass(frozen=True)
class Dimension:
    """One searched key: a range (`low`, `high` in `values`) or the values of a choice or grid."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def spec(self) -> str:
        """The dimension as `--search` text (what the sweep's parent run records)."""
        sep = ":" if self.kind in RANGE_KINDS else ","
        return f"{self.kind}:{sep.join(_text(v) for v in self.values)}"

    def domain(self):
        """The Ray Tune domain that samples this dimension."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper bound is excluded
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def endpoints(self) -> tuple[Any, ...]:
        """Values to check against the config: every value of a choice or grid, a range's bounds."""
        return self.values


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_text(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(d.key for d in self.dimensions)

    def grid_size(self) -> int:
        """Trials one sample of the space makes: the product of the grid dimensions' sizes (1 without)."""
        return math.prod(len(d.values) for d in self.dimensions if d.kind == "grid")

    def param_space(self) -> dict[str, Any]:
        return {d.key: d.domain() for d in self.dimensions}

    def specs(self) -> dict[str, str]:
        return {d.key: d.spec() for d in self.dimensions}

    def check(self, cfg: Config) -> None:
        """Each value of a choice or grid, and each bound of a range, applied alone to `cfg`, must give a
        valid config: a ConfigError names the key and value before any trial starts. (Values valid alone
        but not together fail their trial, which is recorded and does not stop the sweep.)"""
        for dim in self.dimensions:
            for value in dim.endpoints():
                try:
                    with_values(cfg, {dim.key: value})
                except ConfigError as err:
                    raise ConfigError(f"search {dim.key}={dim.spec()}: the value {_text(value)!r} gives an invalid "
                                      f"config: {err}") from None


def _check_key(key: str) -> Any:
    for fixed in NOT_SEARCHABLE:
        if key == fixed or (fixed.endswith(".") and key.startswith(fixed)):
            raise ConfigError(f"search {key}: not searchable: the sweep sets it for each trial, or its trials must "
                              f"share it to be compared (not searchable: {', '.join(NOT_SEARCHABLE)})")
    try:
        return key_type(key)
    except ConfigError as err:
        raise ConfigError(f"search {key}: {err}") from None


def dimension(key: str, kind: str, args: list[Any]) -> Dimension:
    """A checked dimension from its kind and arguments (text or YAML values)."""
    key = key.strip()
    hint = _check_key(key)
    if kind not in KINDS:
        raise ConfigError(f"search {key}: unknown kind {kind!r}; use one of {', '.join(KINDS)}, e.g. "
                          f"{key}=loguniform:1e-5:1e-3 or {key}=choice:a,b")
    if kind in RANGE_KINDS:
        want = int if kind == "randint" else float
        if hint is not want:
            other = "choice or grid" if hint not in (int, float) else ("randint" if hint is int else "uniform or "
                                                                        "loguniform")
            raise ConfigError(f"search {key}={kind}:...: {kind} needs a{'n integer' if want is int else ' float'} key, "
                              f"and {key} is {getattr(hint, '__name__', hint)}; use {other}")
        if len(args) != 2:
            raise ConfigError(f"search {key}={kind}:...: expected {kind}:LOW:HIGH, got {len(args)} value(s)")
        try:
            low, high = (typed_value(key, a) for a in args)
        except ConfigError as err:
            raise ConfigError(f"search {key}={kind}:...: {err}") from None
        if not low < high:
            raise ConfigError(f"search {key}={kind}:{low}:{high}: LOW must be below HIGH")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"search {key}=loguniform:{low}:{high}: LOW must be > 0 (a log scale); use uniform")
        return Dimension(key, kind, (low, high))
    if not args:
        raise ConfigError(f"search {key}={kind}:: give at least one value, e.g. {key}={kind}:a,b")
    try:
        values = tuple(typed_value(key, a) for a in args)
    except ConfigError as err:
        raise ConfigError(f"search {key}={kind}:...: {err}") from None
    if len(set(map(_text, values))) != len(values):
        raise ConfigError(f"search {key}={kind}:{','.join(map(_text, values))}: a value is repeated")
    return Dimension(key, kind, values)


def parse_dimension(text: str) -> Dimension:
    """`KEY=KIND:ARGS` (see the module docstring)."""
    key, sep, rest = text.partition("=")
    kind, colon, args = rest.partition(":")
    if not sep or not key or not colon:
        raise ConfigError(f"search {text!r} is not of the form KEY=KIND:ARGS, e.g. "
                          "optim.lr_per_32_videos=loguniform:1e-5:1e-3 or data.rand_augment=choice:,rand-m7-n4")
    if kind in RANGE_KINDS:
        return dimension(key, kind, args.split(":"))
    return dimension(key, kind, _split_values(args))


def _split_values(text: str) -> list[str]:
    """Comma-separated values; a bracketed list (`[0.5,1.0]`, for a tuple key) stays one value."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [*values, current]


def parse_search(texts: list[str]) -> SearchSpace:
    dims = [parse_dimension(t) for t in texts]
    return _space(dims)


def _space(dims: list[Dimension]) -> SearchSpace:
    seen = set()
    for d in dims:
        if d.key in seen:
            raise ConfigError(f"search {d.key}: given twice; give each key once")
        seen.add(d.key)
    if not dims:
        raise ConfigError("the search space is empty: pass --search KEY=KIND:ARGS or --search-space FILE.yaml")
    return SearchSpace(tuple(dims))


def load_search_space(path: str | Path, extra: list[str] = ()) -> SearchSpace:
    """The YAML search space at `path` (see the module docstring), plus `extra` `--search` texts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {path} does not exist")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"search space file {path} must map config keys to KIND:ARGS, got {type(loaded).__name__}")
    dims = []
    for key, value in loaded.items():
        if isinstance(value, str):
            dims.append(parse_dimension(f"{key}={value}"))
        elif isinstance(value, dict) and len(value) == 1:
            (kind, args), = value.items()
            dims.append(dimension(str(key), str(kind), list(args) if isinstance(args, (list, tuple)) else [args]))
        else:
            raise ConfigError(f"search space file {path}: {key} must be KIND:ARGS text or a mapping of one kind to its "
                              f"values, e.g. {{choice: [a, b]}}; got {value!r}")
    return _space([*dims, *(parse_dimension(t) for t in extra)])


def trial_values(sampled: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values as Tune hands them (floats of a range, the choice's values), keyed by config key."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in sampled.items()}
