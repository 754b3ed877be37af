"""The unified space: every modality mapped into CLIP's embedding space.

Images, frames and texts are CLIP vectors already, so they map by identity. Audio
(pooled Whisper-encoder vectors) gets a small learned head trained contrastively
(InfoNCE) on pairs the data gives for free: a speech clip's audio vector and its
transcript's CLIP text vector, or a video's sound window and its frames' CLIP vector.

A projector is saved as a plain state dict (safetensors) + a JSON config; its version
string is derived from the saved weights, and every unified vector records it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IDENTITY_MODALITIES = ("image", "frame", "text")
AUDIO_MODALITIES = ("audio",)
CONFIG_FILENAME = "projector.json"
WEIGHTS_FILENAME = "projector.safetensors"


@dataclass
class ProjectorConfig:
    audio_dim: int
    clip_dim: int
    hidden_dim: int = 256
    clip_model_version: str = ""
    audio_model_version: str = ""
    version: str = ""  # set when saved: content hash of the weights + this config
    metrics: dict[str, float] = field(default_factory=dict)


class AudioHead(nn.Module):
    """Standardise -> MLP -> L2-normalise into CLIP space.

    Pooled Whisper vectors share a large common direction (cosine ~0.93 between unrelated
    clips); standardising with training statistics removes it before the MLP sees them.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.in_mean) / self.in_std
        return F.normalize(self.net(x), dim=-1)


@dataclass
class UnifiedProjector:
    config: ProjectorConfig
    audio_head: AudioHead
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def version(self) -> str:
        return self.config.version

    def project(self, modality: str, vectors: np.ndarray) -> np.ndarray:
        """Map [n, dim] vectors of a modality into the unified space (L2-normalised float32)."""
        x = np.asarray(vectors, np.float32)
        if x.ndim == 1:
            return self.project(modality, x[None])[0]
        if modality in IDENTITY_MODALITIES:
            if x.shape[-1] != self.config.clip_dim:
                raise ValueError(f"{modality} vectors must have dim {self.config.clip_dim}")
            return _l2(x)
        if modality in AUDIO_MODALITIES:
            return self.project_tensor(modality, torch.from_numpy(x)).cpu().numpy()
        raise ValueError(f"unknown modality {modality!r}")

    def project_tensor(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """The same on tensors: [n, dim] from any device -> float32 on the head's device."""
        if modality in IDENTITY_MODALITIES:
            if x.shape[-1] != self.config.clip_dim:
                raise ValueError(f"{modality} vectors must have dim {self.config.clip_dim}")
            return F.normalize(x.to(self.device).float(), dim=-1)
        if modality not in AUDIO_MODALITIES:
            raise ValueError(f"unknown modality {modality!r}")
        self.audio_head.eval()
        with torch.inference_mode():
            return self.audio_head(x.to(self.device, torch.float32, non_blocking=True)).float()


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class ProjectorTrainConfig:
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-2
    temperature: float = 0.05
    hidden_dim: int = 256
    heldout_fraction: float = 0.25
    seed: int = 0


@dataclass
class ProjectorTrainResult:
    projector: UnifiedProjector
    metrics: dict[str, float]  # held-out retrieval before/after, final loss, pair counts
    train_index: np.ndarray
    heldout_index: np.ndarray
    losses: list[tuple[int, float]] = field(default_factory=list)


def split_by_group(
    groups: Sequence[str], heldout_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole groups (a clip, a video), so no held-out pair leaks into training."""
    unique = sorted(set(groups))
    rng = np.random.default_rng(seed)
    rng.shuffle(unique)
    n_held = max(1, int(round(len(unique) * heldout_fraction))) if heldout_fraction > 0 else 0
    held = set(unique[:n_held])
    g = np.array(groups)
    mask = np.isin(g, list(held))
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def retrieval_metrics(
    queries: np.ndarray, targets: np.ndarray, prefix: str = ""
) -> dict[str, float]:
    """Query i's correct answer is target row i; duplicate target rows count as correct.

    Candidates are the distinct target vectors, so two clips of the same transcript
    compete against the other transcripts, not against each other.
    """
    uniq, target_id = np.unique(np.round(targets, 5), axis=0, return_inverse=True)
    scores = _l2(queries) @ _l2(uniq).T
    correct = scores[np.arange(len(queries)), target_id]
    rank = (scores > correct[:, None]).sum(axis=1)  # 0 = top
    return {
        f"{prefix}recall_at_1": float(np.mean(rank < 1)),
        f"{prefix}recall_at_5": float(np.mean(rank < 5)),
        f"{prefix}mean_rank": float(np.mean(rank) + 1),
        f"{prefix}candidates": float(len(uniq)),
    }


def train_projector(
    audio_vectors: np.ndarray,
    target_vectors: np.ndarray,
    groups: Sequence[str] | None = None,
    config: ProjectorTrainConfig = ProjectorTrainConfig(),
    clip_model_version: str = "",
    audio_model_version: str = "",
    device: str | torch.device = "cpu",
    progress: Callable[[int, float], None] | None = None,
) -> ProjectorTrainResult:
    """Train the audio head on (audio vector, CLIP vector) pairs; report held-out retrieval.

    ``groups`` names each pair's source (clip id, video id); held-out pairs come from
    groups never trained on. Without groups each pair is its own group.
    """
    a = np.asarray(audio_vectors, np.float32)
    t = _l2(np.asarray(target_vectors, np.float32))
    if len(a) != len(t) or len(a) < 2:
        raise ValueError("need at least two aligned (audio, target) pairs")
    groups = list(groups) if groups is not None else [str(i) for i in range(len(a))]
    train_idx, held_idx = split_by_group(groups, config.heldout_fraction, config.seed)
    dev = torch.device(device)
    torch.manual_seed(config.seed)
    head = AudioHead(a.shape[1], config.hidden_dim, t.shape[1]).to(dev)
    _fit_standardiser(head, a[train_idx])
    pcfg = ProjectorConfig(
        audio_dim=a.shape[1],
        clip_dim=t.shape[1],
        hidden_dim=config.hidden_dim,
        clip_model_version=clip_model_version,
        audio_model_version=audio_model_version,
    )
    projector = UnifiedProjector(pcfg, head, dev)
    metrics = _heldout_metrics(projector, a, t, held_idx, "untrained_")
    losses = _fit(head, a[train_idx], t[train_idx], config, dev, progress)
    metrics.update(_heldout_metrics(projector, a, t, held_idx, "heldout_"))
    metrics.update(_heldout_metrics(projector, a, t, train_idx, "train_"))
    metrics.update(
        {
            "final_loss": losses[-1][1] if losses else math.nan,
            "train_pairs": float(len(train_idx)),
            "heldout_pairs": float(len(held_idx)),
        }
    )
    pcfg.metrics = metrics
    return ProjectorTrainResult(projector, metrics, train_idx, held_idx, losses)


def _heldout_metrics(projector, a, t, idx, prefix) -> dict[str, float]:
    if len(idx) == 0:
        return {}
    return retrieval_metrics(projector.project("audio", a[idx]), t[idx], prefix)


def _fit_standardiser(head: AudioHead, a: np.ndarray) -> None:
    x = torch.from_numpy(a)
    std = x.std(0).clamp_min(1e-4) if len(x) > 1 else torch.ones(x.shape[1])
    head.in_mean.copy_(x.mean(0).to(head.in_mean.device))
    head.in_std.copy_(std.to(head.in_std.device))


def _fit(head, a, t, cfg: ProjectorTrainConfig, dev, progress) -> list[tuple[int, float]]:
    """InfoNCE against every distinct training target (small sets: the full softmax)."""
    uniq, target_id = np.unique(np.round(t, 5), axis=0, return_inverse=True)
    candidates = torch.from_numpy(_l2(uniq)).to(dev)
    x_all = torch.from_numpy(a).to(dev)
    y_all = torch.from_numpy(target_id.astype(np.int64)).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # indices from a CPU generator: the same batches on every device (reproducible runs)
    gen = torch.Generator().manual_seed(cfg.seed)
    logged: list[tuple[int, torch.Tensor]] = []
    head.train()
    for step in range(cfg.steps):
        lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(x_all), (min(cfg.batch_size, len(x_all)),), generator=gen)
        loss = projector_train_step(head, opt, x_all, y_all, candidates, idx, cfg.temperature)
        if step % 20 == 0 or step == cfg.steps - 1:
            logged.append((step, loss))
            if progress is not None:  # only a caller that wants live values pays the sync
                progress(step, loss.item())
    head.eval()
    values = torch.stack([v for _, v in logged]).tolist() if logged else []
    return [(step, v) for (step, _), v in zip(logged, values, strict=True)]


def projector_train_step(
    head: AudioHead,
    opt: torch.optim.Optimizer,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    candidates: torch.Tensor,
    idx: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """One InfoNCE step on rows `idx` (any device); returns the detached loss on the
    head's device (reading it is the caller's choice: it costs a device sync)."""
    idx = idx.to(x_all.device, non_blocking=True)
    z = head(x_all[idx])
    logits = z @ candidates.T / temperature
    loss = F.cross_entropy(logits, y_all[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def save_projector(projector: UnifiedProjector, folder: str | Path) -> str:
    """Write weights + config; sets and returns the version (hash of both)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in projector.audio_head.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILENAME))
    cfg = asdict(projector.config)
    cfg.pop("version")
    h = hashlib.sha256((folder / WEIGHTS_FILENAME).read_bytes())
    h.update(json.dumps({k: v for k, v in cfg.items() if k != "metrics"}, sort_keys=True).encode())
    projector.config.version = f"unified-proj@sha256:{h.hexdigest()[:16]}"
    (folder / CONFIG_FILENAME).write_text(json.dumps(asdict(projector.config), indent=2))
    return projector.config.version


def load_projector(folder: str | Path, device: str | torch.device = "cpu") -> UnifiedProjector:
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = ProjectorConfig(**json.loads((folder / CONFIG_FILENAME).read_text()))
    head = AudioHead(cfg.audio_dim, cfg.hidden_dim, cfg.clip_dim)
    head.load_state_dict(load_file(str(folder / WEIGHTS_FILENAME)))
    dev = torch.device(device)
    head.to(dev).eval()
    return UnifiedProjector(cfg, head, dev)


def mean_text_vectors(bundle, texts: Sequence[str]) -> np.ndarray:
    """One CLIP vector per text (renormalised mean of its chunks): transcript targets."""
    from mm_pipelines.models.clip.encode import encode_texts

    result = encode_texts(bundle, texts)
    out = np.zeros((len(texts), bundle.embed_dim), np.float32)
    for row, chunk in zip(result.vectors, result.chunks, strict=True):
        out[chunk.text_index] += row
    return _l2(out)
