"""Registry and tracking errors name the problem and the fix."""

from __future__ import annotations

import pytest

from pipeline.tracking import registry
from pipeline.tracking.logged_models import finish_training_run
from pipeline.tracking.runs import find_or_create_run
from tests.tracking.conftest import LABELS, tiny_config


def test_registry_errors_say_what_to_do(embedded):
    cfg = tiny_config()
    with pytest.raises(registry.RegistryError, match="has no 'challenger' version; register one with"):
        registry.promote(cfg, "never-registered")
    with pytest.raises(registry.RegistryError, match="no run 'nope' at sqlite:"):
        registry.register(cfg, "nope", "x")
    unfinished = find_or_create_run(cfg)
    with pytest.raises(registry.RegistryError, match="has no logged model 'video_classifier': was the training "
                                                     "finished"):
        registry.register(cfg, unfinished, "x")
    with pytest.raises(registry.RegistryError, match="metric 'val_top1' has no paired test; use eval_top1 or "
                                                     "eval_top5"):
        registry.promote(cfg, "x", metric="val_top1")
    with pytest.raises(registry.RegistryError, match=r"confidence 1.0 is outside \[0.5, 1\); 0.95 promotes when"):
        registry.promote(cfg, "x", confidence=1.0)


def test_finish_training_run_wants_one_label_per_class(embedded):
    cfg = tiny_config()
    with pytest.raises(ValueError, match="2 labels for a model of model.num_classes=3"):
        finish_training_run(cfg, "unused", {"model_state": {}}, LABELS[:2])
