"""Scoring heads: small MLPs from an L2-normalised CLIP vector to one score.

Two ways to get one:
- a weights file from configuration. Our format is `<name>.safetensors` + `<name>.json`
  (the config below); a bare state dict of Linear layers (`.pth`, `.pt`, `.safetensors`)
  also loads, its layer sizes read from the weights, which is the layout of the LAION
  aesthetic predictor (five Linear layers, no activations, a 1-10 rating for ViT-L/14);
- trained here from labelled catalog vectors (`train_head`): positives vs negatives, a
  probability out of a sigmoid.

A head's version names its weights' content, so every score row says which head made it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

CONFIG_SUFFIX = ".json"
WEIGHTS_SUFFIX = ".safetensors"
ACTIVATIONS: dict[str, Callable[[], nn.Module] | None] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "none": None,
}


class HeadLoadError(ValueError):
    """A configured head file is missing or does not fit (names the file and why)."""


@dataclass
class HeadConfig:
    name: str  # aesthetic | unsafe | text_unsafe
    input_dim: int
    hidden: tuple[int, ...] = (32,)
    activation: str = "relu"  # relu | gelu | none (LAION's aesthetic MLP has none)
    output: str = "sigmoid"  # sigmoid: a probability; identity: a rating (LAION: 1-10)
    space: str = "image"  # which CLIP tower's vectors it reads: image | text
    encoder_version: str = ""  # the CLIP it was trained on ("" = any with input_dim)
    positive_label: str | None = None
    negative_label: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    version: str = ""  # set when saved/loaded: hash of the weights and this config


class ScoringHead(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}")
        self.cfg = cfg
        sizes = [cfg.input_dim, *cfg.hidden, 1]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
            layers.append(nn.Linear(a, b))
            act = ACTIVATIONS[cfg.activation]
            if act is not None and i < len(sizes) - 2:
                layers.append(act())
        self.net = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits(x)
        return torch.sigmoid(out) if self.cfg.output == "sigmoid" else out


@dataclass
class LoadedHead:
    head: ScoringHead
    config: HeadConfig
    path: Path

    @property
    def version(self) -> str:
        return self.config.version


def score(head: ScoringHead, vectors: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Scores of [n, dim] vectors (re-normalised: heads are trained on unit vectors)."""
    x = np.asarray(vectors, np.float32)
    if x.ndim != 2 or x.shape[1] != head.cfg.input_dim:
        raise ValueError(
            f"head {head.cfg.name!r} reads {head.cfg.input_dim}-d vectors, got {x.shape}"
        )
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    device = next(head.parameters()).device
    head.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            chunk = torch.from_numpy(x[start : start + batch_size]).to(device)
            out.append(head(chunk).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class HeadTrainConfig:
    hidden: tuple[int, ...] = (32,)
    steps: int = 300
    learning_rate: float = 1e-2
    weight_decay: float = 1e-3
    seed: int = 0


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """A head is a few thousand weights: intra-op threads only wait on each other (measured
    on a busy 2-core machine: 9-10 s per head with 2 threads, 0.5-1 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_head(
    x: np.ndarray,
    y: np.ndarray,
    cfg: HeadConfig,
    train: HeadTrainConfig = HeadTrainConfig(),
    progress: Callable[[int, float], None] | None = None,
) -> ScoringHead:
    """Full-batch AdamW on binary cross-entropy, positives re-weighted to balance the
    classes (labelled sets are small and lopsided)."""
    y = np.asarray(y, np.float32)
    if len(np.unique(y)) != 2:
        raise ValueError(f"head {cfg.name!r} needs positive and negative examples")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        head = ScoringHead(HeadConfig(**{**asdict(cfg), "hidden": tuple(train.hidden)}))
    xt = torch.from_numpy(_unit(x))
    yt = torch.from_numpy(y)
    pos_weight = torch.tensor((len(y) - y.sum()) / max(y.sum(), 1.0))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.AdamW(
        head.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay
    )
    head.train()
    with _one_thread():
        for step in range(1, train.steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(head.logits(xt), yt)
            loss.backward()
            opt.step()
            if progress is not None:
                progress(step, float(loss.detach()))
    head.eval()
    return head


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged)."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        raise ValueError("AUC needs positive and negative examples")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def cross_validated_auc(
    x: np.ndarray, y: np.ndarray, cfg: HeadConfig, train: HeadTrainConfig, folds: int = 5
) -> float | None:
    """Stratified k-fold AUC of heads trained like the final one (None: too few examples)."""
    y = np.asarray(y, int)
    folds = min(folds, int(y.sum()), int((1 - y).sum()))
    if folds < 2:
        return None
    rng = np.random.default_rng(train.seed)
    fold_of = np.empty(len(y), int)
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == cls))
        fold_of[idx] = np.arange(len(idx)) % folds
    scores = np.empty(len(y))
    for k in range(folds):
        test = fold_of == k
        head = train_head(x[~test], y[~test], cfg, train)
        scores[test] = score(head, x[test])
    return roc_auc(scores, y)


# --------------------------------------------------------------------------- files


def save_head(head: ScoringHead, folder: str | Path) -> str:
    """`<name>.safetensors` + `<name>.json` in `folder`; sets and returns the version."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{head.cfg.name}{WEIGHTS_SUFFIX}"
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(weights))
    head.cfg.version = _version(head.cfg, weights)
    (folder / f"{head.cfg.name}{CONFIG_SUFFIX}").write_text(json.dumps(asdict(head.cfg), indent=2))
    return head.cfg.version


def _version(cfg: HeadConfig, weights: Path) -> str:
    h = hashlib.sha256(weights.read_bytes())
    fixed = {k: v for k, v in asdict(cfg).items() if k not in ("version", "metrics")}
    h.update(json.dumps(fixed, sort_keys=True).encode())
    return f"head-{cfg.name}@sha256:{h.hexdigest()[:16]}"


def load_head(path: str | Path, name: str | None = None, device: str = "cpu") -> LoadedHead:
    """A head from `<dir>/<name>.safetensors|json`, `<file>.safetensors` with a `.json`
    beside it, or a bare state dict of Linear layers (LAION aesthetic predictor layout)."""
    path = Path(path)
    if path.is_dir():
        if name is None:
            raise HeadLoadError(f"{path}: a folder of heads needs the head's name")
        path = path / f"{name}{WEIGHTS_SUFFIX}"
    if not path.is_file():
        raise HeadLoadError(f"{path}: no such head weights file")
    state = _read_state(path)
    config_file = path.with_suffix(CONFIG_SUFFIX)
    if config_file.is_file():
        cfg = HeadConfig(**json.loads(config_file.read_text()))
        cfg.hidden = tuple(cfg.hidden)
    else:
        cfg = _config_from_state(state, name or path.stem, path)
        state = _renumber(state)
    head = ScoringHead(cfg)
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise HeadLoadError(f"{path}: weights do not fit the head's config: {err}") from err
    cfg.version = _version(cfg, path)
    return LoadedHead(head.to(device).eval(), cfg, path)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == WEIGHTS_SUFFIX:
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise HeadLoadError(f"{path}: not a readable weights file ({err})") from err
    if not isinstance(state, dict):
        raise HeadLoadError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _linear_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """Prefixes of 2-d `.weight` tensors (Linear layers), in numeric module order."""

    def order(key: str) -> list:
        return [int(p) if p.isdigit() else p for p in re.split(r"[.]", key)]

    return sorted(
        (
            k.removesuffix(".weight")
            for k, v in state.items()
            if k.endswith(".weight") and v.ndim == 2
        ),
        key=order,
    )


def _config_from_state(state: dict[str, torch.Tensor], name: str, path: Path) -> HeadConfig:
    keys = _linear_keys(state)
    if not keys or state[f"{keys[-1]}.weight"].shape[0] != 1:
        raise HeadLoadError(f"{path}: not an MLP with one output (Linear layers ending in 1)")
    dims = [state[f"{k}.weight"].shape for k in keys]
    for (out_a, _), (_, in_b) in zip(dims, dims[1:], strict=False):
        if out_a != in_b:
            raise HeadLoadError(f"{path}: Linear layer sizes do not chain: {dims}")
    hidden = tuple(int(d[0]) for d in dims[:-1])
    # a bare state dict is the LAION layout: no activations, a rating out
    return HeadConfig(name, int(dims[0][1]), hidden, activation="none", output="identity")


def _renumber(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the file's Linear layers, in order, onto ScoringHead's `net.<i>` (no activation
    modules in between when activation is none)."""
    out = {}
    for i, key in enumerate(_linear_keys(state)):
        out[f"net.{i}.weight"] = state[f"{key}.weight"]
        out[f"net.{i}.bias"] = state[f"{key}.bias"]
    return out
