"""LoRA adapters on disk: diffusers format (any family), an exact peft copy for resume,
training checkpoints, and an optional kohya-format file for A1111/ComfyUI users.

- saved through the pipeline class's own `save_lora_weights(dir, <component>_lora_layers=...,
  <component>_lora_adapter_metadata=...)`, so a plain `pipeline.load_lora_weights(dir)` of a
  fresh pipeline of that class loads it. The metadata carries `lora_alpha`: without it
  diffusers assumes alpha == rank and an adapter with alpha != rank would load mis-scaled.
  UNet families store diffusers-style keys (as diffusers' SD/SDXL scripts do), transformer
  families peft keys (as its SD3/FLUX scripts do).
- checkpoints: adapter + optimizer + scaler + every RNG state + loop state, written under a
  temporary name and renamed (atomic), the oldest pruned.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mm_pipelines.models.diffusion.families import Family, family_of

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name
KOHYA_NAME = "kohya_lora.safetensors"
PEFT_STATE = "adapter_state.safetensors"  # exact peft-format copy, for resume
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def adapted_components(pipeline: Any, family: Family | None = None) -> list[str]:
    """Component names of the pipeline that carry our LoRA adapter ("default")."""
    family = family or family_of(pipeline)
    names = [family.denoiser_name, *family.trainable_text_encoder_names]
    return [
        n
        for n in names
        if "default" in (getattr(getattr(pipeline, n, None), "peft_config", None) or {})
    ]


def trainable_params(pipeline: Any) -> list[torch.nn.Parameter]:
    mods = [getattr(pipeline, n) for n in adapted_components(pipeline)]
    return [p for m in mods for p in m.parameters() if p.requires_grad]


def save_adapter(pipeline: Any, out_dir: str | Path, *, kohya: bool = False) -> Path:
    """Write the diffusers-format LoRA file (+ the exact peft copy used for resume)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    family = family_of(pipeline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    peft_state: dict[str, torch.Tensor] = {}
    for name in adapted_components(pipeline, family):
        module = getattr(pipeline, name)
        state = get_peft_model_state_dict(module)
        unet_style = family.denoiser_name == "unet" or name != family.denoiser_name
        kwargs[f"{name}_lora_layers"] = (
            convert_state_dict_to_diffusers(state) if unet_style else state
        )
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
        peft_state.update({f"{name}.{k}": v for k, v in state.items()})
    if not kwargs:
        raise ValueError("the pipeline carries no LoRA adapter to save")
    type(pipeline).save_lora_weights(out, safe_serialization=True, **kwargs)
    save_file(
        {k: v.detach().float().cpu().contiguous() for k, v in peft_state.items()}, out / PEFT_STATE
    )
    if kohya:
        save_kohya(pipeline, out / KOHYA_NAME)
    return out / WEIGHT_NAME


def restore_adapter(pipeline: Any, snapshot_dir: Path) -> None:
    """Load an adapter snapshot back into the live (already adapted) modules."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(snapshot_dir / PEFT_STATE)
    for name in adapted_components(pipeline):
        prefix = f"{name}."
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            set_peft_model_state_dict(getattr(pipeline, name), part, adapter_name="default")
    for p in trainable_params(pipeline):  # set_peft_model_state_dict may copy in base dtype
        p.data = p.data.float()


def load_adapter(pipeline: Any, adapter_dir: str | Path, adapter_name: str | None = None) -> Any:
    """Plain diffusers load (what any consumer of the adapter does)."""
    pipeline.load_lora_weights(str(adapter_dir), weight_name=WEIGHT_NAME, adapter_name=adapter_name)
    return pipeline


# --------------------------------------------------------------------------- kohya


_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def save_kohya(pipeline: Any, path: Path) -> Path:
    """The adapter in kohya-ss naming (`lora_unet_..._to_q.lora_down.weight` + `.alpha`),
    the format A1111 and ComfyUI load for SD 1.x / SDXL. Alpha is the trained one (a
    rank-valued alpha, as generic converters write, would rescale an alpha != rank LoRA).

    SD3 and FLUX are not converted: kohya's FLUX naming (BFL's fused qkv blocks) is a
    different layout, and ComfyUI loads the diffusers file of those families directly.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    family = family_of(pipeline)
    if family.name not in ("sd", "sdxl"):
        raise ValueError(
            f"kohya export covers sd and sdxl; {family.name} adapters are used in the "
            "diffusers format (ComfyUI and diffusers load it as is)"
        )
    out: dict[str, torch.Tensor] = {}
    for name in adapted_components(pipeline, family):
        module = getattr(pipeline, name)
        alpha = float(module.peft_config["default"].lora_alpha)
        for key, value in get_peft_model_state_dict(module).items():
            stem, kind = key.rsplit(".lora_", 1)  # "down_blocks.0...to_q", "A.weight"
            kohya = f"{_KOHYA_PREFIX[name]}_{stem.replace('.', '_')}"
            part = "lora_down" if kind.startswith("A") else "lora_up"
            out[f"{kohya}.{part}.weight"] = value.detach().float().cpu().contiguous()
            out[f"{kohya}.alpha"] = torch.tensor(alpha)
    save_file(out, str(path))
    return path


# --------------------------------------------------------------------------- checkpoints


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete checkpoint (incomplete ones never get their final name)."""
    ckpt_root = Path(output_dir) / "checkpoints"
    if not ckpt_root.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in ckpt_root.iterdir()
        if (m := _CKPT_RE.match(p.name)) and (p / "state.json").is_file()
    ]
    return max(found)[1] if found else None


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    state = {
        "generator": gen.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(gen: torch.Generator, state: dict[str, Any]) -> None:
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path,
    pipeline: Any,
    step: int,
    training_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Atomically write checkpoint-<step>: adapter, `training_state` (torch.save) and
    `meta` (state.json); keep the newest `keep`."""
    root = output_dir / "checkpoints"
    final = root / f"checkpoint-{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(pipeline, tmp)
    torch.save(training_state, tmp / "training_state.pt")
    (tmp / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)  # a replay after resume rewrites the same step
    os.replace(tmp, final)  # atomic: a crash never leaves a half checkpoint under its name
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    ckpts = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT_RE.match(p.name)))
    for _, p in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(ckpt: Path, pipeline: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore the adapter of `ckpt` into the pipeline; returns (meta, training_state)."""
    meta = json.loads((ckpt / "state.json").read_text())
    restore_adapter(pipeline, ckpt)
    # map to the CPU: a checkpoint written on a GPU resumes anywhere (the optimizer moves
    # its state to the parameters' device; RNG states are CPU tensors anyway)
    blob = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=False)
    return meta, blob
