"""The subjects file: what a user declares, and the errors they get for mistakes."""

from __future__ import annotations

import copy

import pytest
import yaml

from mm_pipelines.pipeline import subjects


def write(path, *raw) -> None:
    path.write_text(yaml.safe_dump({"subjects": list(raw)}))


def test_the_demo_subject_round_trips_with_its_lora_settings(tmp_path):
    path = subjects.ensure_subject(subjects.DEMO_SUBJECT, tmp_path / "s.yaml")
    subject = subjects.get_subject("orange-backdrop", path)
    cfg = subjects.lora_config(subject, checkpoint_every=25)
    assert (cfg.rank, cfg.alpha, cfg.steps, cfg.checkpoint_every) == (4, 8, 300, 25)
    assert subject.generation_prompts == ("a photo of sks",)
    assert subject.score_prompt == "a shape on an orange background"
    assert subjects.ensure_subject(subjects.DEMO_SUBJECT, path) == path  # declared once
    assert list(subjects.load_subjects(path)) == ["orange-backdrop"]


def test_a_missing_file_means_no_subjects_and_an_unknown_name_is_a_clear_error(tmp_path):
    assert subjects.load_subjects(tmp_path / "none.yaml") == {}
    with pytest.raises(subjects.SubjectConfigError, match="'nope' is not declared"):
        subjects.get_subject("nope", tmp_path / "none.yaml")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "has space"}, "must be 1-64 letters"),
        ({"instance_prompt": ""}, "instance_prompt is required"),
        ({"select": {}}, "give at least one of"),
        ({"select": {"batch": "b1"}}, r"select: unknown field\(s\) \['batch'\]"),
        ({"lora": {"rnak": 4}}, r"unknown LoRA setting\(s\) \['rnak'\]"),
        ({"gates": {"max_fid": "low"}}, "max_fid must be a number or null"),
        ({"gates": {"decide_on": "upper"}}, "decide_on must be 'estimate' or 'interval'"),
        ({"gates": {"confidence": 1.5}}, "confidence must be between 0 and 1"),
        ({"colour": "red"}, r"unknown field\(s\) \['colour'\]"),
    ],
)
def test_mistakes_name_the_file_the_subject_and_the_field(tmp_path, change, message):
    raw = copy.deepcopy(subjects.DEMO_SUBJECT)
    raw.update(change)
    path = tmp_path / "s.yaml"
    write(path, raw)
    with pytest.raises(subjects.SubjectConfigError, match=message) as err:
        subjects.load_subjects(path)
    assert str(path) in str(err.value)


def test_a_subject_declared_twice_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    write(path, subjects.DEMO_SUBJECT, subjects.DEMO_SUBJECT)
    with pytest.raises(subjects.SubjectConfigError, match="declared twice"):
        subjects.load_subjects(path)


def test_the_fingerprint_changes_with_any_setting(tmp_path):
    a = subjects.parse_subject(subjects.DEMO_SUBJECT, "a")
    b = subjects.parse_subject({**subjects.DEMO_SUBJECT, "seeds": [0]}, "b")
    assert a.fingerprint() == subjects.parse_subject(subjects.DEMO_SUBJECT, "c").fingerprint()
    assert a.fingerprint() != b.fingerprint()


def test_prompts_come_from_the_config_and_a_prompts_file_next_to_it(tmp_path):
    (tmp_path / "prompts.txt").write_text("a photo of sks on a table\n\na sks poster\n")
    raw = {**subjects.DEMO_SUBJECT, "prompts": ["a photo of sks"], "prompts_file": "prompts.txt"}
    write(tmp_path / "s.yaml", raw)
    subject = subjects.get_subject("orange-backdrop", tmp_path / "s.yaml")
    assert subject.generation_prompts == (
        "a photo of sks",
        "a photo of sks on a table",
        "a sks poster",
    )
    write(tmp_path / "s.yaml", {**raw, "prompts_file": "missing.txt"})
    with pytest.raises(subjects.SubjectConfigError, match="missing.txt does not exist"):
        subjects.load_subjects(tmp_path / "s.yaml")
