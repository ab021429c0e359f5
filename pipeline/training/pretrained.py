"""The weights a training starts from (`model.init_from`), checked against the data's labels.

A checkpoint's classifier is kept when its class count is the model's and `model.new_head` is off;
otherwise the model gets a new one (ImageNet weights, K400 weights for SSv2 or for a team's own classes).
A kept head of an official dataset's checkpoint (`pipeline.data.official.checkpoint_dataset`: the setting
`model.init_dataset`, else the file name, else the head's class count) must answer in the data's label
order: the data's labels.json is checked against the dataset's official list, the same list passes, the
same names in another order reorder the head's rows (and say so), anything else is a ConfigError naming
the first index where they differ. A training checkpoint of this project (`{"config", "model_state"}`)
was trained on classes of its own: its head is kept without a check, as `model.init_dataset=none` does.

Checkpoints are read through `pipeline.data.storage` (local or S3) with `weights_only=True`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from pipeline.config import Config, ConfigError
from pipeline.data import official
from pipeline.data import storage as st


@dataclass(frozen=True)
class InitPlan:
    """What happens to the checkpoint's head: kept as it is, kept with its rows in `order`, or replaced."""

    dataset: str  # an official dataset, "imagenet" or "none"
    head: str  # "kept", "reordered" or "new"
    order: list[int] | None = None  # the checkpoint's head row of each of the data's classes

    def describe(self) -> str:
        title = official.DATASETS[self.dataset].title if self.dataset in official.DATASETS else self.dataset
        if self.head == "reordered":
            moved = sum(1 for j, i in enumerate(self.order or []) if i != j)
            return (f"the data lists the {title} classes in another order: the checkpoint's head was reordered to "
                    f"match ({moved} of {len(self.order or [])} classes moved)")
        if self.head == "kept":
            return f"head kept ({title} checkpoint{', labels checked' if self.dataset in official.DATASETS else ''})"
        return f"new head for the data's classes ({title} checkpoint)"


def read_checkpoint(uri: str, cfg: Config) -> tuple[dict, bool]:
    """The bare state dict at `uri` and whether it is a training checkpoint of this project."""
    from model import unwrap_state_dict

    try:
        obj = torch.load(io.BytesIO(st.read_bytes(uri, storage=cfg.storage)), map_location="cpu", weights_only=True)
    except st.StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - not a checkpoint torch can read safely
        raise ConfigError(f"model.init_from={uri}: not a checkpoint of tensors ({type(err).__name__}: "
                          f"{(str(err).splitlines() or [''])[0][:200]})") from None
    own = isinstance(obj, dict) and "config" in obj and "model_state" in obj
    try:
        return unwrap_state_dict(obj), own
    except ValueError as err:
        raise ConfigError(f"model.init_from={uri}: {err}") from None


def plan_init(cfg: Config, state: dict, labels: list[str] | None, *, own: bool = False) -> InitPlan:
    """The InitPlan of `state` for a model of `cfg` on data labelled `labels` (index order; needed only
    when an official head is kept). Raises ConfigError on labels that are not the checkpoint's."""
    head = official.head_classes(state)
    try:
        dataset = official.checkpoint_dataset(cfg.model.init_from, head, "none" if own and not cfg.model.init_dataset
                                              else cfg.model.init_dataset)
    except official.LabelMapError as err:
        raise ConfigError(str(err)) from None
    if cfg.model.new_head or head != cfg.model.num_classes:
        return InitPlan(dataset, "new")
    if dataset not in official.DATASETS:
        return InitPlan(dataset, "kept")
    if labels is None:
        raise ValueError("the data's labels are needed to keep an official checkpoint's head")
    try:
        order = official.label_order(labels, dataset, what=f"the data ({cfg.data.manifest})")
    except official.LabelMapError as err:
        raise ConfigError(f"model.init_from={cfg.model.init_from}: {err}") from None
    return InitPlan(dataset, "kept" if order is None else "reordered", order)


def _data_labels(cfg: Config) -> list[str]:
    from pipeline.tracking.datasets import dataset_labels

    return dataset_labels(cfg)


def check_init(cfg: Config, labels: list[str]) -> InitPlan:
    """The driver's check, before any Ray work: reads `model.init_from` and plans it against `labels`."""
    state, own = read_checkpoint(cfg.model.init_from, cfg)
    return plan_init(cfg, state, labels, own=own)


def load_initial_weights(net: torch.nn.Module, cfg: Config) -> str:
    """Load `model.init_from` into `net` as planned (the data's labels read when a head is checked);
    returns one line saying what was loaded and what became of the head."""
    from model import load_pretrained

    state, own = read_checkpoint(cfg.model.init_from, cfg)
    needs_labels = not own and not cfg.model.new_head and official.head_classes(state) == cfg.model.num_classes
    plan = plan_init(cfg, state, _data_labels(cfg) if needs_labels else None, own=own)
    if plan.head == "new":
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    elif plan.head == "reordered":
        state = official.reorder_head(state, plan.order)
    return f"{load_pretrained(net, state)}; {plan.describe()}"
