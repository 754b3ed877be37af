"""Subjects: what a LoRA adapter is trained on, declared in a small YAML file.

One subject = one `subject` partition. The file (`MM_SUBJECTS`, default
`$MM_HOME/subjects.yaml`) looks like:

    subjects:
      - name: orange-backdrop            # partition key: letters, digits, - and _
        instance_prompt: a photo of sks  # the rare-token prompt the adapter learns
        class_prompt: a shape            # optional: prior preservation with class images
        description: a shape on an orange background  # what CLIP scores against
        select:                          # which catalog images (all filters AND-ed)
          batches: [demo-0001]
          tenant: acme
          caption_contains: orange background
          query: a shape on an orange background   # top `limit` images by search
          limit: 16
        min_images: 4
        prompts: [a photo of sks]
        prompts_file: prompts.txt       # optional, one per line (relative to this file)
        seeds: [0, 1, 2, 3, 4, 5, 6, 7]
        lora: {rank: 4, alpha: 8, learning_rate: 0.01, steps: 150}  # any LoraTrainConfig
        # field, e.g. target_modules, gradient_checkpointing, nf4, optimizer: adamw8bit
        validation_metric: clip_distance
        min_aesthetic: 0.5               # optional: leave out images scored below (curation)
        captions:                        # optional: train on catalog captions (kohya style)
          use: true                      # manifest caption, else a generated one
          trigger: sks                   # prefix token; default: the instance prompt
          dropout: 0.1                   # whole caption dropped (unconditional) this often
          shuffle: true                  # shuffle comma-separated tokens ...
          keep_tokens: 1                 # ... after the first N (the trigger stays first)
          variants: 4                    # pre-drawn augmentations per image
        generation: {num_inference_steps: 20, guidance_scale: 3.0}  # FLUX: true_cfg_scale
        gates: {max_fid_ratio_to_base: 0.9, min_clip_score: 0, max_fid: null, max_kid: null,
                min_references: 5, min_generated: 8, decide_on: estimate, confidence: 0.9,
                bootstrap_resamples: 500}

Plain Python: the Dagster assets and the subjects sensor call `load_subjects`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mm_pipelines import settings

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class SubjectConfigError(ValueError):
    """The subjects file is unreadable or a subject is invalid (message names file and field)."""


@dataclass(frozen=True)
class Selection:
    batches: tuple[str, ...] = ()
    tenant: str | None = None
    caption_contains: str | None = None
    query: str | None = None
    content_hashes: tuple[str, ...] = ()
    limit: int = 32


@dataclass(frozen=True)
class QualityGates:
    """Thresholds of the blocking checks on `generation_quality` (None = not checked)."""

    max_fid: float | None = None
    max_kid: float | None = None
    min_clip_score: float | None = None
    # the adapter must move generations towards the references: FID(adapter) / FID(base)
    max_fid_ratio_to_base: float | None = 0.9
    # below these sample sizes no gate passes (None = no floor): FID/KID of a few images
    # say little (README "What FID/KID on a handful of images can tell")
    min_references: int | None = 5
    min_generated: int | None = 8
    # "estimate": thresholds on the numbers; "interval": on the bound of their bootstrap
    # interval (a max_* on the upper bound, a min_* on the lower one)
    decide_on: str = "estimate"
    confidence: float = 0.9
    bootstrap_resamples: int = 500


@dataclass(frozen=True)
class GenerationSettings:
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    scheduler: str | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None  # FLUX.1: real CFG, what its negative prompt needs
    batch_size: int = 8


@dataclass(frozen=True)
class CaptionSettings:
    """What a training image is captioned with. Off: the instance prompt alone (DreamBooth).
    On: `trigger, caption` with the catalog's caption (the manifest's, else a generated
    one from the `captions` asset), and kohya-ss's caption dropout / shuffle / keep_tokens."""

    use: bool = False
    trigger: str | None = None  # None: the instance prompt; "": no prefix
    dropout: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0
    variants: int = 4
    seed: int = 0


@dataclass(frozen=True)
class Subject:
    name: str
    instance_prompt: str
    select: Selection
    class_prompt: str | None = None
    description: str | None = None
    min_images: int = 3
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None  # one prompt per line, added after `prompts`
    seeds: tuple[int, ...] = tuple(range(8))
    lora: dict[str, Any] = field(default_factory=dict)  # LoraTrainConfig overrides
    validation_metric: str = "clip_distance"  # early stopping: clip_distance | color_distance
    generation: GenerationSettings = GenerationSettings()
    gates: QualityGates = QualityGates()
    captions: CaptionSettings = CaptionSettings()
    min_aesthetic: float | None = None  # curation: leave out images scored below

    @property
    def generation_prompts(self) -> tuple[str, ...]:
        from_file: tuple[str, ...] = ()
        if self.prompts_file:
            lines = Path(self.prompts_file).read_text(encoding="utf-8").splitlines()
            from_file = tuple(line.strip() for line in lines if line.strip())
        return (self.prompts + from_file) or (self.instance_prompt,)

    @property
    def score_prompt(self) -> str:
        """What CLIP scores generations against: words the scorer knows, not the rare token."""
        return self.description or self.instance_prompt

    def fingerprint(self) -> str:
        """Changes whenever anything that affects the subject's assets changes."""
        # the prompts themselves, so an edited prompts file counts as a change
        fields = {**dataclasses.asdict(self), "resolved_prompts": self.generation_prompts}
        # curation settings at their defaults leave the fingerprint of older subjects as it was
        for name in ("captions", "min_aesthetic"):
            if getattr(self, name) == getattr(Subject, name):
                fields.pop(name)
        blob = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def subjects_path() -> Path:
    return settings.subjects_file()


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise SubjectConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise SubjectConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise SubjectConfigError(f"{where}: {err}") from err


def parse_subject(raw: Any, where: str, base_dir: str | Path = ".") -> Subject:
    if not isinstance(raw, dict):
        raise SubjectConfigError(f"{where}: a subject must be a mapping")
    raw = dict(raw)
    name = str(raw.get("name", ""))
    if not _NAME_RE.match(name):
        raise SubjectConfigError(
            f"{where}: name {name!r} must be 1-64 letters, digits, '-' or '_' (a partition key)"
        )
    where = f"{where} ({name})"
    if not str(raw.get("instance_prompt", "")).strip():
        raise SubjectConfigError(f"{where}: instance_prompt is required")
    select = _build(Selection, raw.pop("select", None), f"{where}.select")
    if not (select.batches or select.caption_contains or select.query or select.content_hashes):
        raise SubjectConfigError(
            f"{where}.select: give at least one of batches, caption_contains, query, "
            "content_hashes (selecting the whole catalog is never what was meant)"
        )
    generation = _build(GenerationSettings, raw.pop("generation", None), f"{where}.generation")
    gates = _build(QualityGates, raw.pop("gates", None), f"{where}.gates")
    captions = _build(CaptionSettings, raw.pop("captions", None), f"{where}.captions")
    _check_captions(captions, f"{where}.captions")
    _check_gates(gates, f"{where}.gates")
    lora = raw.pop("lora", None) or {}
    _check_lora(lora, f"{where}.lora")
    subject = _build(Subject, {**raw, "select": None, "lora": None}, where)
    if subject.min_aesthetic is not None and (
        isinstance(subject.min_aesthetic, bool)
        or not isinstance(subject.min_aesthetic, int | float)
    ):
        raise SubjectConfigError(f"{where}: min_aesthetic must be a number")
    subject = dataclasses.replace(
        subject,
        select=select,
        generation=generation,
        gates=gates,
        lora=dict(lora),
        captions=captions,
    )
    if subject.min_images < 1 or not subject.seeds:
        raise SubjectConfigError(f"{where}: min_images must be >= 1 and seeds non-empty")
    if subject.prompts_file:
        prompts_file = Path(subject.prompts_file)
        if not prompts_file.is_absolute():  # relative to the subjects file
            prompts_file = Path(base_dir) / prompts_file
        if not prompts_file.is_file():
            raise SubjectConfigError(f"{where}.prompts_file: {prompts_file} does not exist")
        subject = dataclasses.replace(subject, prompts_file=str(prompts_file))
    return subject


def _check_captions(c: CaptionSettings, where: str) -> None:
    numbers = (c.dropout, c.keep_tokens, c.variants, c.seed)
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in numbers):
        raise SubjectConfigError(f"{where}: dropout, keep_tokens, variants, seed must be numbers")
    if not 0.0 <= c.dropout < 1.0 or c.keep_tokens < 0 or c.variants < 1:
        raise SubjectConfigError(f"{where}: dropout in [0, 1), keep_tokens >= 0, variants >= 1")
    if c.trigger is not None and not isinstance(c.trigger, str):
        raise SubjectConfigError(f"{where}: trigger must be text")


def _check_gates(gates: QualityGates, where: str) -> None:
    for f in dataclasses.fields(QualityGates):
        value = getattr(gates, f.name)
        if f.name == "decide_on":
            if value not in ("estimate", "interval"):
                raise SubjectConfigError(f"{where}: decide_on must be 'estimate' or 'interval'")
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SubjectConfigError(f"{where}: {f.name} must be a number or null")
    if gates.confidence is None or gates.bootstrap_resamples is None:
        raise SubjectConfigError(f"{where}: confidence and bootstrap_resamples cannot be null")
    if not 0 < gates.confidence < 1:
        raise SubjectConfigError(f"{where}: confidence must be between 0 and 1")
    if gates.bootstrap_resamples < 100:
        raise SubjectConfigError(f"{where}: bootstrap_resamples must be >= 100")


def _check_lora(lora: Any, where: str) -> None:
    from mm_pipelines.models.diffusion.lora import LoraTrainConfig

    if not isinstance(lora, dict):
        raise SubjectConfigError(f"{where}: expected a mapping")
    known = {f.name for f in dataclasses.fields(LoraTrainConfig)}
    unknown = sorted(set(lora) - known)
    if unknown:
        raise SubjectConfigError(f"{where}: unknown LoRA setting(s) {unknown}")


def load_subjects(path: str | Path | None = None) -> dict[str, Subject]:
    """All subjects of the file by name; a missing file means no subjects."""
    path = Path(path) if path is not None else subjects_path()
    if not path.is_file():
        return {}
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SubjectConfigError(f"{path}: cannot read the subjects file: {err}") from err
    items = doc.get("subjects", []) if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise SubjectConfigError(f"{path}: expected a top-level 'subjects:' list")
    subjects: dict[str, Subject] = {}
    for index, raw in enumerate(items):
        subject = parse_subject(raw, f"{path}: subjects[{index}]", path.parent)
        if subject.name in subjects:
            raise SubjectConfigError(f"{path}: subject {subject.name!r} is declared twice")
        subjects[subject.name] = subject
    return subjects


def get_subject(name: str, path: str | Path | None = None) -> Subject:
    subjects = load_subjects(path)
    if name not in subjects:
        where = Path(path) if path is not None else subjects_path()
        raise SubjectConfigError(
            f"subject {name!r} is not declared in {where} (declared: {sorted(subjects)})"
        )
    return subjects[name]


def lora_config(subject: Subject, **defaults: Any) -> Any:
    """The subject's LoraTrainConfig: `defaults` first, the subject's overrides on top."""
    from mm_pipelines.models.diffusion.lora import LoraTrainConfig

    values = {**defaults, **subject.lora}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return LoraTrainConfig(**values)


# The demo's subject: the five sample-batch product shots on the orange backdrop.
# Settings measured on the demo's tiny base model: noise_offset + Min-SNR let a background
# colour move; lr 3e-3 x 300 steps took the validation colour distance from 111 to 68
# (lr 1e-2: 123 -> 79, noisier; 100 steps at either: no reliable move).
DEMO_SUBJECT: dict[str, Any] = {
    "name": "orange-backdrop",
    "instance_prompt": "a photo of sks",
    "description": "a shape on an orange background",
    "select": {"tenant": "acme", "caption_contains": "on an orange background"},
    "min_images": 4,
    "seeds": list(range(16)),
    # a backdrop colour is what this subject is: mean-colour distance to the five shots
    "validation_metric": "color_distance",
    "lora": {
        "rank": 4,
        "alpha": 8,
        "learning_rate": 0.003,
        "steps": 300,
        "batch_size": 4,
        "noise_offset": 0.1,
        "snr_gamma": 5.0,
    },
    "generation": {"num_inference_steps": 20, "guidance_scale": 3.0},
    "gates": {"max_fid_ratio_to_base": 0.9},
}


def ensure_subject(raw: dict[str, Any], path: str | Path | None = None) -> Path:
    """Add the subject `raw` to the subjects file unless one of that name is declared."""
    path = Path(path) if path is not None else subjects_path()
    if raw["name"] in load_subjects(path):
        return path
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    doc = doc or {}
    doc.setdefault("subjects", []).append(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path
