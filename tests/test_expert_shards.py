"""Expert data for the apprentice: `python -m training.expert_shards` writes filtered and unfiltered shards that the
adapter trainer's ShardSampler reads, a report with the keep rate per skill and the drop reasons, skips finished
subjects on --resume, and never replaces an earlier run without --overwrite."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from suti_core.eval.skills import SKILLS
from suti_core.world import subject_from_id
from suti_core.world.captions import parse_caption
from training import expert_shards
from training.render_filter import REASONS, FilterDecision, RenderFilter
from training.shards import ShardSampler, iter_examples

TINY = ["--subjects", "2", "--prompts", "3", "--steps", "2", "--render-steps", "2", "--prior-weight", "0",
        "--threads", "1", "--device", "cpu"]


class KeepEveryOther(RenderFilter):
    """A stand-in filter: keeps renders 0, 2, 4, ... of each call (a 2-step expert's renders are all dropped by
    the real filter, which leaves no filtered shard to read back)."""

    def __init__(self):
        pass

    def decide(self, demos, prompts, renders):
        return [FilterDecision(i % 2 == 0, "keep" if i % 2 == 0 else "wrong subject", "", {}) for i in range(len(renders))]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The command at tiny size with the shipped toy base and render filter."""
    out = tmp_path_factory.mktemp("experts")
    expert_shards.main(["--out", str(out), *TINY])
    return out


def test_unfiltered_shards_round_trip_through_the_trainers_sampler(run):
    records = [json.loads(p.read_text()) for p in sorted((run / "subjects").glob("*.json"))]
    sampler = ShardSampler(run / "unfiltered", 3, 128, np.random.default_rng(0))
    assert len(sampler.locations) == 6, f"2 subjects x 3 prompts, read {len(sampler.locations)}"
    read = [example for _, example in iter_examples(run / "unfiltered")]
    by_subject = {r["subject"]: r for r in records}
    for example in read:
        record = by_subject[example.subject]
        assert example.target_caption in [r["prompt"] for r in record["renders"]]
        assert "sks" not in example.target_caption and example.target_mask.all()
        assert all(m is not None for m in example.demo_masks) and len(example.demo_captions) == 3
    assert {e.subject for e in read} == set(expert_shards.pick_subjects(2, 0))
    kept = sum(r["keep"] for rec in records for r in rec["renders"])
    filtered = len(list(iter_examples(run / "filtered"))) if any((run / "filtered").glob("shard-*.tar")) else 0
    assert filtered == kept, f"{kept} renders kept, {filtered} in the filtered shards"


def test_filtered_shards_hold_exactly_the_kept_renders(tmp_path):
    recipe = expert_shards.ExpertDataRecipe(expert_shards.DreamBoothRecipe(steps=2, prior_weight=0), prompts=3,
                                            render_steps=2)
    report = expert_shards.make_expert_data(tmp_path, 2, recipe, render_filter=KeepEveryOther())
    kept = ShardSampler(tmp_path / "filtered", 3, 128, np.random.default_rng(0))
    assert len(kept.locations) == 4 and report["filter"]["keep_rate"] == pytest.approx(4 / 6)
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "subjects").glob("*.json"))]
    expected = sorted(r["prompt"] for rec in records for r in rec["renders"] if r["keep"])
    assert sorted(e.target_caption for _, e in iter_examples(tmp_path / "filtered")) == expected


def test_report_has_cost_per_subject_keep_rate_per_skill_and_drop_reasons(run):
    report = json.loads((run / "report.json").read_text())
    assert [s["steps"] for s in report["subjects"]] == [2, 2]
    assert all(s["seconds"] > 0 and s["bytes"] > 0 for s in report["subjects"])
    summary = report["filter"]
    assert set(summary["per_skill"]) == set(SKILLS) and summary["n"] == 6
    assert sum(summary["drops"].values()) == round(6 * (1 - summary["keep_rate"]))
    assert set(summary["drops"]) <= set(REASONS) - {"keep"}


def test_prompts_cover_all_six_skills_and_name_the_subject_by_its_identifier(run):
    assert list(expert_shards.SKILL_EDITS) == list(SKILLS), "each skill of suti_core.eval.skills needs its edit"
    records = [json.loads(p.read_text()) for p in sorted((run / "subjects").glob("*.json"))]
    assert {r["skill"] for rec in records for r in rec["renders"]} == set(SKILLS)
    for rec in records:
        for r in rec["renders"]:
            assert SKILLS[r["skill"]](parse_caption(r["prompt"])[0]), f"{r['prompt']!r} does not use {r['skill']}"
            assert f"sks {rec['class_word']}" in r["expert_prompt"], r["expert_prompt"]
            assert r["expert_prompt"].replace("sks ", "", 1) == r["prompt"]


def test_resume_skips_finished_subjects_and_extends_the_pick(run, tmp_path, capsys):
    run = Path(shutil.copytree(run, tmp_path / "run"))  # mtimes copied too
    before = {p.name: p.stat().st_mtime_ns for p in (run / "unfiltered").glob("shard-*.tar")}
    expert_shards.main(["--out", str(run), *TINY[:1], "3", *TINY[2:], "--resume"])
    progress = capsys.readouterr().err
    assert progress.count("done before, skipped") == 2 and "[3/3] subject" in progress
    after = {p.name: p.stat().st_mtime_ns for p in (run / "unfiltered").glob("shard-*.tar")}
    assert {k: after[k] for k in before} == before, "resume rewrote a finished subject's shard"
    assert len(after) == 3 and json.loads((run / "report.json").read_text())["filter"]["n"] == 9
    third = expert_shards.pick_subjects(3, 0)[2]
    assert subject_from_id(third).shape == json.loads((run / f"subjects/subject-{third}.json").read_text())["class_word"]


def test_existing_output_is_kept_without_overwrite_and_other_settings_do_not_resume(run):
    shards = {p: p.read_bytes() for p in (run / "unfiltered").glob("shard-*.tar")}
    with pytest.raises(SystemExit, match="--resume .*--overwrite"):
        expert_shards.main(["--out", str(run), *TINY])
    with pytest.raises(SystemExit, match="prompts differ"):
        expert_shards.main(["--out", str(run), *TINY[:2], "--prompts", "4", *TINY[4:], "--resume"])
    assert {p: p.read_bytes() for p in shards} == shards, "a refused run changed the shards"


def test_overwrite_starts_over(tmp_path):
    (tmp_path / "unfiltered").mkdir()
    (tmp_path / "unfiltered/shard-000007.tar").write_bytes(b"stale")
    expert_shards.main(["--out", str(tmp_path), *TINY[:1], "1", *TINY[2:], "--overwrite"])
    assert sorted(p.name for p in (tmp_path / "unfiltered").glob("shard-*.tar")) == ["shard-000000.tar"]
