"""MLflow "models from code" entry of the bare network: loading the model runs this file, shipped with
it, and reads the weights with `weights_only=True`; no pickle."""

import mlflow

from pipeline.tracking.serving import Network

mlflow.models.set_model(Network())
