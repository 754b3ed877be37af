"""The code MLflow runs to build the logged adapter model ("models from code")."""

import mlflow.models

from mm_pipelines.pipeline.adapter_model import LoraAdapterModel

mlflow.models.set_model(LoraAdapterModel())
