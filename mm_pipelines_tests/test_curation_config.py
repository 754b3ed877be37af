"""Curation configuration: the per-tenant policy, the subject's curation settings and the
manifest's labels, with clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from mm_pipelines.pipeline import subjects
from mm_pipelines.pipeline.curate.config import CurationPolicy, PolicyError
from mm_pipelines.storage.landing import LocalLanding


def test_a_tenant_policy_overrides_the_default_rule_by_rule(tmp_path):
    raw = {
        "default": {"flag_unsafe_at": 0.6},
        "tenants": {"acme": {"flag_aesthetic_below": 0.2, "flag_text_unsafe_at": None}},
    }
    policy = CurationPolicy.load(json.dumps(raw))
    assert policy.for_tenant("globex").rules() == [
        ("unsafe", ">=", 0.6),
        ("text_unsafe", ">=", 0.5),
    ]
    assert policy.for_tenant("acme").rules() == [("unsafe", ">=", 0.6), ("aesthetic", "<", 0.2)]
    path = tmp_path / "policy.yaml"
    path.write_text("tenants:\n  acme: {flag_unsafe_at: 0.3}\n")
    assert CurationPolicy.load(str(path)).for_tenant("acme").flag_unsafe_at == 0.3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"default": {"flag_nsfw_at": 0.5}}', r"default: unknown rule\(s\) \['flag_nsfw_at'\]"),
        ('{"tenants": {"acme": {"flag_unsafe_at": "high"}}}', r"tenants\.acme\.flag_unsafe_at"),
        ('{"default": ', "not valid JSON"),
    ],
)
def test_a_bad_policy_is_a_clear_error(text, message):
    with pytest.raises(PolicyError, match=message):
        CurationPolicy.load(text)


def test_subject_caption_settings_are_checked_and_part_of_the_fingerprint():
    base = dict(subjects.DEMO_SUBJECT)
    plain = subjects.parse_subject(base, "s")
    with_captions = subjects.parse_subject(
        {**base, "captions": {"use": True, "shuffle": True, "keep_tokens": 1}}, "s"
    )
    assert with_captions.captions.use and with_captions.captions.keep_tokens == 1
    assert with_captions.fingerprint() != plain.fingerprint()
    # default curation settings leave an existing subject's fingerprint (and runs) as they were
    assert (
        subjects.parse_subject({**base, "captions": {}}, "s").fingerprint() == plain.fingerprint()
    )
    with pytest.raises(subjects.SubjectConfigError, match=r"s \(orange-backdrop\)\.captions"):
        subjects.parse_subject({**base, "captions": {"dropout": 1.5}}, "s")
    with pytest.raises(subjects.SubjectConfigError, match="min_aesthetic must be a number"):
        subjects.parse_subject({**base, "min_aesthetic": "high"}, "s")


def test_manifest_labels_are_read_and_a_bad_one_names_the_line(tmp_path):
    batch = tmp_path / "b1"
    batch.mkdir()
    lines = [
        {"path": "a.png", "label": "unsafe"},
        {"path": "b.png", "label": ["safe", "high_quality"]},
        {"path": "c.png"},
    ]
    (batch / "_manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    entries = LocalLanding(tmp_path).manifest("b1")
    assert [entries[p].labels for p in ("a.png", "b.png", "c.png")] == [
        ("unsafe",),
        ("high_quality", "safe"),
        (),
    ]
    (batch / "_manifest.jsonl").write_text(json.dumps({"path": "a.png", "label": 3}))
    with pytest.raises(ValueError, match=r"_manifest.jsonl of batch 'b1', line 1: label must be"):
        LocalLanding(tmp_path).manifest("b1")
