"""A subject's LoRA adapter as an MLflow logged model: `mlflow.pyfunc.load_model(
"models:/mm-lora-<subject>@candidate")` gives a model that turns (prompt, seed) rows into
PNG images, with a signature MLflow shows on the model's page.

Logged "from code" (`adapter_model_code.py` names this class): the model holds the
adapter's files; the base model it applies to is named in its config (a local folder, or
the model store version the adapter was trained on, resolved from the settings)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

CODE_PATH = Path(__file__).with_name("adapter_model_code.py")
# model config keys (the base model the adapter applies to)
BASE_DIR = "pyfunc_base_model_dir"
BASE_VERSION = "pyfunc_base_model_version"
BASE_STORE_VERSION = "pyfunc_base_store_version"


def signature(num_inference_steps: int, guidance_scale: float) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed")]),
        outputs=Schema(
            [
                ColSpec("string", "prompt"),
                ColSpec("long", "seed"),
                ColSpec("string", "image_png_base64"),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("num_inference_steps", "long", int(num_inference_steps)),
                ParamSpec("guidance_scale", "double", float(guidance_scale)),
            ]
        ),
    )


def _base_dir(config: dict[str, Any]) -> Path:
    local = Path(str(config.get(BASE_DIR, "")))
    if str(local) and local.is_dir():
        return local
    version = config.get(BASE_STORE_VERSION)
    if version:
        from mm_pipelines.pipeline import model_store as ms
        from mm_pipelines.pipeline.services import DEMO, Services

        return Services.from_settings().need_models().get(ms.DIFFUSION_BASE, DEMO, version).path
    raise FileNotFoundError(
        f"the adapter's base model {config.get(BASE_VERSION)!r} is not at {local} and is "
        f"not in the model store: point the model config's {BASE_DIR} at it"
    )


class LoraAdapterModel(mlflow.pyfunc.PythonModel):
    """(prompt, seed) rows -> the adapter's image for each, as base64 PNG."""

    def load_context(self, context: Any) -> None:
        from mm_pipelines.models.diffusion.lora import load_adapter
        from mm_pipelines.pipeline.services import Services

        svc = Services.from_settings()
        pipe = svc.load_base_pipeline(_base_dir(context.model_config or {}))
        self.pipe = load_adapter(pipe, context.artifacts["adapter"])

    # a DataFrame hint: MLflow warns on `Any` (it infers signatures from hints), and the
    # signature is given explicitly when the model is logged
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from mm_pipelines.models.common import encode_image
        from mm_pipelines.models.diffusion.generate import generate_images

        params = params or {}
        rows = []
        for prompt, seed in zip(model_input["prompt"], model_input["seed"], strict=True):
            (generated,) = generate_images(
                self.pipe,
                [str(prompt)],
                [int(seed)],
                num_inference_steps=int(params.get("num_inference_steps", 20)),
                guidance_scale=float(params.get("guidance_scale", 3.0)),
            )
            png = base64.b64encode(encode_image(generated.image, "png")).decode("ascii")
            rows.append({"prompt": str(prompt), "seed": int(seed), "image_png_base64": png})
        return pd.DataFrame(rows, columns=["prompt", "seed", "image_png_base64"])
