"""Stage `filter` (issue 13) on samples in the experts stage's layout whose renders are renderer truth or another
subject of the same class: the shipped render filter keeps the truth, drops the wrong subjects as `wrong subject`
(the verdicts the filter gives directly), drops unreadable prompts and corrupt samples with their reason, reports
the keep rate per skill, resumes after a kill to the same bytes, and refuses the evaluation judge."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_stage_helpers import expert_sample, folder_bytes, folder_samples, run_killed, write_two_shards

import training.data.filter_renders as filter_stage
from training import render_filter as rf
from training.data.__main__ import main
from training.data.common import read_jsonl
from training.data.filter_renders import FilterSettings, filter_renders, load_filter_settings
from training.data.prompts import SKILLS

SUBJECTS = 24
CASES = ("truth", "wrong subject")


def _uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) in [-1, 1] -> (B, S, S, 3) uint8, the inverse of to_tensor."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def cases() -> dict:
    return rf.report_cases(SUBJECTS, seed=11)


@pytest.fixture(scope="module")
def experts(cases, tmp_path_factory) -> Path:
    """Per held-out subject a truth render and a wrong-subject render of its prompt, in 2 shards, then a sample with
    a prompt the world's vocabulary cannot read and one whose render is not a PNG."""
    folder = tmp_path_factory.mktemp("experts")
    samples = [(f"s{i:03d}_{case.replace(' ', '-')}",
                expert_sample(f"s{i:03d}", SKILLS[i % len(SKILLS)], _uint8(cases["demos"][i]), cases["prompts"][i],
                              _uint8(cases[case][i:i + 1])[0]))
               for i in range(SUBJECTS) for case in CASES]
    odd = dict(samples[0][1])
    samples.append(("odd_prompt", {**odd, "json": json.dumps({**json.loads(odd["json"]),
                                                                "target_caption": "my dog, sitting"}).encode()}))
    samples.append(("odd_render", {**odd, "target.png": b"not a png"}))
    return write_two_shards(folder, samples)


@pytest.fixture(scope="module")
def run(experts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("filtered")
    filter_renders(experts, out)
    return out


def test_truth_is_kept_and_another_subject_is_dropped_as_wrong_subject(cases, run):
    manifest = {row["key"]: row for row in read_jsonl(run / "manifest.jsonl")}
    shipped = rf.RenderFilter.load()
    for case in CASES:
        rows = [manifest[f"s{i:03d}_{case.replace(' ', '-')}"] for i in range(SUBJECTS)]
        direct = shipped.decide(cases["demos"], cases["prompts"], cases[case])
        assert [row["reason"] for row in rows] == [None if d.keep else d.reason for d in direct], \
            f"{case}: the stage's verdicts differ from the filter's own"
        for row, decision in zip(rows, direct):
            assert row["scores"] == pytest.approx(decision.scores, abs=1e-4) and row["detail"] == decision.detail
    truth = [manifest[f"s{i:03d}_truth"] for i in range(SUBJECTS)]
    assert sum(row["kept"] for row in truth) >= 0.8 * SUBJECTS, [row["detail"] for row in truth if not row["kept"]]
    shown = [manifest[f"s{i:03d}_wrong-subject"] for i in range(SUBJECTS) if rf.colour_styles([cases["prompts"][i]])[0]]
    assert len(shown) >= SUBJECTS // 3
    assert sum(row["reason"] == "wrong subject" for row in shown) >= 0.75 * len(shown), [r["reason"] for r in shown]


def test_unreadable_prompts_and_corrupt_samples_are_dropped_with_their_reason(run):
    manifest = {row["key"]: row for row in read_jsonl(run / "manifest.jsonl")}
    assert (manifest["odd_prompt"]["reason"], manifest["odd_render"]["reason"]) == ("prompt not readable",
                                                                                    "corrupt sample")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["in"] == 2 * SUBJECTS + 2 and summary["kept"] == sum(row["kept"] for row in manifest.values())
    assert summary["dropped"]["prompt not readable"] == summary["dropped"]["corrupt sample"] == 1


def test_kept_samples_keep_their_members_and_gain_the_filter_scores(experts, run):
    manifest = {row["key"]: row for row in read_jsonl(run / "manifest.jsonl")}
    inputs, outputs = folder_samples(experts), folder_samples(run)
    assert sorted(outputs) == sorted(key for key, row in manifest.items() if row["kept"])
    for key, members in outputs.items():
        assert list(members) == list(inputs[key]), "same members, same order"
        assert all(members[m] == inputs[key][m] for m in members if m != "json"), "images copied as they are"
        meta = json.loads(members["json"])
        assert meta == {**json.loads(inputs[key]["json"]), "filter": manifest[key]["scores"]}
        assert manifest[key]["out_shard"] in {p.name for p in run.glob("*.tar")}


def test_the_summary_has_the_keep_rate_per_skill(run):
    manifest = read_jsonl(run / "manifest.jsonl")
    rates = json.loads((run / "summary.json").read_text())["keep_rate_per_skill"]
    assert set(rates) == set(SKILLS)
    for skill, rate in rates.items():
        mine = [row["kept"] for row in manifest if row["skill"] == skill]
        assert rate == round(sum(mine) / len(mine), 4), skill


def test_a_rerun_after_a_kill_writes_the_same_bytes(experts, run, monkeypatch, tmp_path):
    expected = folder_bytes(run)
    assert sum(name.endswith(".tar") for name in expected) == 2
    killed = tmp_path / "killed"
    kept_first = sum(row["kept"] for row in read_jsonl(run / "manifest.jsonl") if row["in_shard"] == "shard-000000.tar")
    run_killed(monkeypatch, filter_stage, kept_first + 2, lambda: filter_renders(experts, killed))
    assert sorted(p.name for p in killed.glob("*.tar")) == ["shard-000000.tar"] and not list(killed.glob("*.partial"))
    filter_renders(experts, killed)
    assert folder_bytes(killed) == expected


def test_a_judge_file_is_refused_and_a_missing_filter_explained(experts, tmp_path, judge_format_file):
    with pytest.raises(ValueError, match="not a render filter"):
        filter_renders(experts, tmp_path / "a", judge_format_file)
    with pytest.raises(SystemExit, match="train_judge --role filter"):
        main(["filter", "--in", str(experts), "--out", str(tmp_path / "b"), "--filter", str(tmp_path / "none")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists(), "nothing is written before the check"


def test_thresholds_come_from_a_config_file_and_flags_win(experts, run, tmp_path, capsys):
    config = tmp_path / "filter.toml"
    config.write_text("min_prob = 0.2\nmin_confidence = 0.99\n")
    assert load_filter_settings(config) == FilterSettings(0.2, 0.99)
    assert load_filter_settings(config, min_prob=None, min_confidence=0.5) == FilterSettings(0.2, 0.5)
    (tmp_path / "bad.json").write_text('{"min_prb": 0.5}')
    with pytest.raises(ValueError, match="unknown setting.*min_prb"):
        load_filter_settings(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="probability in"):
        FilterSettings(min_prob=1.5)
    args = ["filter", "--in", str(experts), "--out", str(tmp_path / "out"), "--config", str(config)]
    main(args)
    assert capsys.readouterr().out.startswith("filter: ")
    strict = {row["key"]: row for row in read_jsonl(tmp_path / "out" / "manifest.jsonl")}
    default = {row["key"]: row for row in read_jsonl(run / "manifest.jsonl")}
    assert sum(r["kept"] for r in strict.values()) < sum(r["kept"] for r in default.values())
    assert any(row["reason"] == "unreadable" for row in strict.values())
    with pytest.raises(SystemExit, match="min_confidence.*--overwrite"):
        main(args + ["--min-confidence", "0.9"])
    main(args + ["--min-confidence", "0.9", "--overwrite"])
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["min_confidence"] == 0.9
