"""Everything recorded in MLflow: runs and their params (`runs`, `redaction`, `datasets`), metrics,
plots, the logged models and their serving (`logged_models`, `serving`), inference over a manifest on
Ray (`inference`), evaluation and the per-video table (`evaluate`, `predictions`), the registry and the
promotion gate (`registry`, `gate`).
Imports `pipeline.data` and `model`; never `pipeline.training`."""
