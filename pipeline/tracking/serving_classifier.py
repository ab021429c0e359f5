"""MLflow "models from code" entry of the video classifier: loading the model runs this file, shipped
with it, instead of unpickling an object (which would run whatever the pickle holds)."""

import mlflow

from pipeline.tracking.serving import VideoClassifier

mlflow.models.set_model(VideoClassifier())
