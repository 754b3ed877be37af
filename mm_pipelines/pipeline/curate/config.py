"""What curation is configured with: which heads, which captioner, and the per-tenant
policy that flags items.

The policy (`MM_CURATION_POLICY`: JSON, or the path of a JSON/YAML file):

    {"default": {"flag_unsafe_at": 0.5, "flag_text_unsafe_at": 0.5,
                 "flag_aesthetic_below": null},
     "tenants": {"acme": {"flag_unsafe_at": 0.3}}}

A tenant's entry overrides the default field by field; null turns a rule off. An item is
flagged when any of its parts (an image, a video's frames, a document's chunks, a
transcript's segments, a caption) reaches a threshold.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_pipelines import settings

# the scores heads give, and which tower's vectors each reads
AESTHETIC, UNSAFE, TEXT_UNSAFE = "aesthetic", "unsafe", "text_unsafe"
HEAD_SPACE = {AESTHETIC: "image", UNSAFE: "image", TEXT_UNSAFE: "text"}


class PolicyError(ValueError):
    """The curation policy cannot be read (names where and which field)."""


@dataclass(frozen=True)
class TenantPolicy:
    flag_unsafe_at: float | None = 0.5
    flag_text_unsafe_at: float | None = 0.5
    flag_aesthetic_below: float | None = None

    def rules(self) -> list[tuple[str, str, float]]:
        """(score name, direction, threshold) of the rules that are on."""
        out = []
        if self.flag_unsafe_at is not None:
            out.append((UNSAFE, ">=", self.flag_unsafe_at))
        if self.flag_text_unsafe_at is not None:
            out.append((TEXT_UNSAFE, ">=", self.flag_text_unsafe_at))
        if self.flag_aesthetic_below is not None:
            out.append((AESTHETIC, "<", self.flag_aesthetic_below))
        return out


@dataclass(frozen=True)
class CurationPolicy:
    default: TenantPolicy = TenantPolicy()
    tenants: dict[str, TenantPolicy] = field(default_factory=dict)

    def for_tenant(self, tenant: str) -> TenantPolicy:
        return self.tenants.get(tenant, self.default)

    @classmethod
    def parse(cls, raw: Any, where: str = "curation policy") -> CurationPolicy:
        if raw is None:
            return cls()
        if not isinstance(raw, dict) or set(raw) - {"default", "tenants"}:
            raise PolicyError(f"{where}: expected a mapping with `default` and/or `tenants`")
        default = _tenant(raw.get("default") or {}, TenantPolicy(), f"{where}.default")
        tenants_raw = raw.get("tenants") or {}
        if not isinstance(tenants_raw, dict):
            raise PolicyError(f"{where}.tenants: expected a mapping of tenant -> rules")
        tenants = {
            str(t): _tenant(v or {}, default, f"{where}.tenants.{t}")
            for t, v in tenants_raw.items()
        }
        return cls(default, tenants)

    @classmethod
    def load(cls, value: str) -> CurationPolicy:
        """JSON text, or the path of a JSON/YAML file; empty: the default policy."""
        import yaml

        value = (value or "").strip()
        if not value:
            return cls()
        if value.startswith("{"):
            try:
                return cls.parse(json.loads(value), "MM_CURATION_POLICY")
            except json.JSONDecodeError as err:
                raise PolicyError(f"MM_CURATION_POLICY is not valid JSON: {err}") from err
        path = Path(value)
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise PolicyError(f"{path}: cannot read the curation policy: {err}") from err
        return cls.parse(doc, str(path))

    def as_dict(self) -> dict[str, Any]:
        return {
            "default": dataclasses.asdict(self.default),
            "tenants": {t: dataclasses.asdict(p) for t, p in sorted(self.tenants.items())},
        }


def _tenant(raw: Any, base: TenantPolicy, where: str) -> TenantPolicy:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a mapping of rules")
    known = {f.name for f in dataclasses.fields(TenantPolicy)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PolicyError(f"{where}: unknown rule(s) {unknown}; known: {sorted(known)}")
    for name, value in raw.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise PolicyError(f"{where}.{name}: must be a number or null, got {value!r}")
    return dataclasses.replace(base, **raw)


@dataclass(frozen=True)
class CurationChoice:
    """Heads, captioner and policy. Empty head paths mean the heads `content_heads`
    trained from labelled catalog items (if any); an empty captioner means the CLIP
    zero-shot tagger over `caption_vocabulary` (empty: the demo's shapes vocabulary)."""

    aesthetic_head: str = ""
    safety_head: str = ""
    text_safety_head: str = ""
    captioner: str = ""
    caption_vocabulary: str = ""
    policy: CurationPolicy = CurationPolicy()

    @classmethod
    def from_settings(cls) -> CurationChoice:
        return cls(
            settings.aesthetic_head(),
            settings.safety_head(),
            settings.text_safety_head(),
            settings.captioner(),
            settings.caption_vocabulary(),
            CurationPolicy.load(settings.curation_policy()),
        )

    def configured_heads(self) -> dict[str, str]:
        paths = {
            AESTHETIC: self.aesthetic_head,
            UNSAFE: self.safety_head,
            TEXT_UNSAFE: self.text_safety_head,
        }
        return {name: path for name, path in paths.items() if path}
