"""Stage `prompts` (issue 13): every cluster gets prompts of every skill that name its class word (read from its
captions) and really edit that skill, the same ones per seed and worker count; an external command's prompts join
them, and a failing command stops the stage with its status and stderr."""
from __future__ import annotations

import json
import shlex
import sys
from collections import Counter
from pathlib import Path

import pytest

from suti_core.world import subject_from_id
from suti_core.world.captions import parse_caption
from training.data.__main__ import main
from training.data.cluster import ClusterSettings, cluster_crawl
from training.data.common import read_jsonl
from training.data.crawl import NoiseRates, synth_crawl
from training.data.prompts import SKILLS, PromptCommandError, PromptSettings, class_word, write_prompts
from training.shards import read_members, sample_locations

CLEAN = NoiseRates(0, 0, 0, 0, 0, 0, 0)
# A stand-in language model: one prompt per caption, echoing the caption count and the class word.
ECHO = ("import os, sys; lines = sys.stdin.read().splitlines(); w = os.environ['SUTI_CLASS_WORD']; "
        "[print(f'stylize\\tan oil painting of a {w}, caption {i} of {len(lines)}') for i in range(len(lines))]; "
        "print('a ' + w + ' on the moon')")


def _python(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


@pytest.fixture(scope="module")
def clusters(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Clean clusters and each one's true class word (its subject's shape)."""
    crawl, out = tmp_path_factory.mktemp("crawl"), tmp_path_factory.mktemp("clusters")
    synth_crawl(crawl, pages=16, seed=7, per_shard=40, size=32, rates=CLEAN)
    cluster_crawl(crawl, out, ClusterSettings(clusters_per_shard=5))
    subject = {row["key"]: row["subject"] for row in read_jsonl(crawl / "ground_truth.jsonl")}
    shapes = {}
    for shard in sorted(out.glob("*.tar")):
        for location in sample_locations(shard):
            meta = json.loads(read_members(location)["json"])
            shapes[meta["cluster"]] = subject_from_id(subject[meta["images"][0]["key"]]).shape
    return out, shapes


def _prompts(out: Path) -> list[dict]:
    return [row for path in sorted(out.glob("shard-*.jsonl")) for row in read_jsonl(path)]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_every_cluster_gets_every_skill_naming_its_class_word(clusters, tmp_path):
    folder, shapes = clusters
    summary = write_prompts(folder, tmp_path, PromptSettings(per_cluster=8))
    rows = _prompts(tmp_path)
    assert summary.kept == summary.total == len(shapes) and summary.notes["prompts"] == 8 * len(shapes) == len(rows)
    for cluster, shape in shapes.items():
        mine = [row for row in rows if row["cluster"] == cluster]
        assert {row["skill"] for row in mine} == set(SKILLS), f"{cluster}: skills {Counter(r['skill'] for r in mine)}"
        assert len({row["prompt"] for row in mine}) == len(mine), f"{cluster}: repeated prompts"
        for row in mine:
            assert row["class_word"] == shape and f" {shape}" in row["prompt"] and row["source"] == "template"
            context, stated = parse_caption(row["prompt"])  # the world's vocabulary: it reads back
            edited = {"recontext": context.style == "photo", "stylize": context.style != "photo",
                      "action": context.state == "upside_down", "view": {"position", "scale"} <= stated,
                      "attribute": context.recolor != "none", "accessory": context.accessory != "none"}[row["skill"]]
            assert edited, f"{row['prompt']!r} does not exercise {row['skill']}"


def test_prompts_depend_on_the_seed_alone_not_on_workers(clusters, tmp_path):
    folder, _ = clusters
    write_prompts(folder, tmp_path / "one", PromptSettings(seed=3), workers=1)
    write_prompts(folder, tmp_path / "two", PromptSettings(seed=3), workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    write_prompts(folder, tmp_path / "other", PromptSettings(seed=4))
    assert _prompts(tmp_path / "other") != _prompts(tmp_path / "one"), "another seed draws other prompts"
    expected = _files(tmp_path / "one")
    for name in ("shard-000001.jsonl", "manifest.jsonl"):  # a rerun makes lost files again, the same
        (tmp_path / "one" / name).unlink()
    write_prompts(folder, tmp_path / "one", PromptSettings(seed=3))
    assert _files(tmp_path / "one") == expected


def test_the_class_word_is_what_most_captions_name():
    assert class_word(["a photo of a dog", "a sketch of a cup", "a dog on the grass"], ("cup", "dog")) == "dog"
    assert class_word(["a photo of a dog", "a cup"], ("cup", "dog")) == "cup", "ties go to the list's order"
    assert class_word(["a hotdog stand"], ("dog",)) is None, "whole words only"


def test_clusters_naming_no_class_word_are_dropped(clusters, tmp_path):
    folder, shapes = clusters
    (tmp_path / "words.txt").write_text("# only one class\ndog\n")
    main(["prompts", "--in", str(folder), "--out", str(tmp_path / "out"), "--class-words", str(tmp_path / "words.txt")])
    manifest = {row["cluster"]: row for row in read_jsonl(tmp_path / "out" / "manifest.jsonl")}
    assert set(manifest) == set(shapes)
    for cluster, shape in shapes.items():
        assert manifest[cluster]["reason"] == (None if shape == "dog" else "no class word in captions")
    assert 0 < sum(row["kept"] for row in manifest.values()) < len(shapes), "the crawl should have dogs and others"
    assert {row["cluster"] for row in _prompts(tmp_path / "out")} == {c for c, s in shapes.items() if s == "dog"}


def test_a_command_adds_its_prompts_given_the_captions(clusters, tmp_path, capsys):
    folder, shapes = clusters
    main(["prompts", "--in", str(folder), "--out", str(tmp_path), "--per-cluster", "6", "--command", _python(ECHO)])
    assert capsys.readouterr().out.startswith("prompts: ")
    captions = {json.loads(read_members(loc)["json"])["cluster"]: len(json.loads(read_members(loc)["json"])["images"])
                for shard in sorted(folder.glob("*.tar")) for loc in sample_locations(shard)}
    rows = _prompts(tmp_path)
    for cluster, shape in shapes.items():
        command = [row for row in rows if row["cluster"] == cluster and row["source"] == "command"]
        n = captions[cluster]
        expected = [f"an oil painting of a {shape}, caption {i} of {n}" for i in range(n)]
        expected = (expected + [f"a {shape} on the moon"])[:6]  # at most --per-cluster from the command
        assert [row["prompt"] for row in command] == expected
        skills = ["stylize"] * min(n, 6) + ["unspecified"] * (len(expected) - min(n, 6))
        assert [row["skill"] for row in command] == skills
        assert sum(row["cluster"] == cluster and row["source"] == "template" for row in rows) == 6


def test_a_failing_command_stops_the_stage_with_its_status_and_stderr(clusters, tmp_path):
    folder, _ = clusters
    failing = _python("import sys; sys.stderr.write('no weights at /models/llm'); sys.exit(3)")
    with pytest.raises(PromptCommandError, match=r"exited with status 3 for cluster c[0-9a-f]+.*no weights at "
                                                 r"/models/llm.*leave --command out"):
        write_prompts(folder, tmp_path / "a", PromptSettings(command=failing))
    assert not list((tmp_path / "a").glob("shard-*.jsonl")) and not (tmp_path / "a" / "manifest.jsonl").exists()
    with pytest.raises(SystemExit, match="could not run"):
        main(["prompts", "--in", str(folder), "--out", str(tmp_path / "b"), "--command", "no-such-llm --model x"])
