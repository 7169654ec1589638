"""Stage `experts` (issue 13) on a tiny toy base, 2 fine-tune steps: every kept cluster's expert renders each of its
prompts that names its class word as one demos → target sample, clusters without prompts or with too few images are
dropped with their reason, the expert is stored as a ComfyUI LoRA with its cost, and a killed run resumes to the same
bytes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_stage_helpers import folder_bytes, run_killed
from safetensors import safe_open
from test_dreambooth import TINY

import training.data.experts as experts_stage
from training.data.__main__ import main
from training.data.cluster import ClusterSettings, cluster_crawl
from training.data.common import read_jsonl, write_jsonl
from training.data.crawl import NoiseRates, synth_crawl
from training.data.experts import ExpertStageSettings, make_experts
from training.data.prompts import PromptSettings, write_prompts
from training.dreambooth import DreamBoothRecipe
from training.shards import decode_images, read_members, sample_locations
from training.toy_base import ToyBaseTrainer

CLEAN = NoiseRates(0, 0, 0, 0, 0, 0, 0)
SETTINGS = ExpertStageSettings(DreamBoothRecipe(steps=2, rank=2, prior_weight=0.0), min_images=4, render_steps=2)
CLI = ["--steps", "2", "--rank", "2", "--prior-weight", "0.0", "--min-images", "4", "--render-steps", "2",
       "--device", "cpu"]  # as make_experts' default: the rerun test compares the two
TIMING = ("seconds", "prior_seconds", "render_seconds")
UNNAMED = "a painting of a sunset"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny toy base, 6 clean clusters of 3-6 images in 3 shards, and 2 prompts each, except that the first
    cluster has none and the second one more that names no class word."""
    root = tmp_path_factory.mktemp("experts_world")
    ToyBaseTrainer(TINY, root / "base_run", batch_size=2, seed=0, ae_batch_size=2).export(root / "toy.safetensors")
    synth_crawl(root / "crawl", pages=6, seed=0, per_shard=40, size=32, rates=CLEAN)
    cluster_crawl(root / "crawl", root / "clusters", ClusterSettings(clusters_per_shard=2))
    write_prompts(root / "clusters", root / "prompts", PromptSettings(per_cluster=2))
    rows = [row for path in sorted((root / "prompts").glob("shard-*.jsonl")) for row in read_jsonl(path)]
    first, second = list(dict.fromkeys(row["cluster"] for row in rows))[:2]
    extra = {**next(row for row in rows if row["cluster"] == second), "prompt": UNNAMED, "skill": "unspecified",
             "source": "command"}
    write_jsonl(root / "prompts" / "shard-000000.jsonl", [row for row in rows if row["cluster"] != first] + [extra])
    for path in sorted((root / "prompts").glob("shard-*.jsonl"))[1:]:
        path.unlink()
    return {"root": root, "base": root / "toy.safetensors", "clusters": root / "clusters",
            "prompts": root / "prompts", "first": first, "second": second}


@pytest.fixture(scope="module")
def run(world, tmp_path_factory) -> Path:
    """The stage through its command line."""
    out = tmp_path_factory.mktemp("experts_out")
    main(["experts", "--in", str(world["clusters"]), "--prompts", str(world["prompts"]), "--out", str(out),
          "--base", str(world["base"]), "--prior-cache", str(world["root"] / "prior"), *CLI])
    return out


def _clusters(directory: Path) -> dict[str, dict]:
    return {json.loads(read_members(loc)["json"])["cluster"]: json.loads(read_members(loc)["json"])
            for shard in sorted(directory.glob("*.tar")) for loc in sample_locations(shard)}


def _samples(directory: Path) -> dict[str, dict[str, bytes]]:
    return {loc.key: read_members(loc) for shard in sorted(directory.glob("*.tar")) for loc in sample_locations(shard)}


def _prompts(world) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in read_jsonl(world["prompts"] / "shard-000000.jsonl"):
        rows.setdefault(row["cluster"], []).append(row)
    return rows


def test_clusters_are_dropped_with_their_reason(world, run):
    clusters, prompts = _clusters(world["clusters"]), _prompts(world)
    manifest = {row["cluster"]: row for row in read_jsonl(run / "manifest.jsonl")}
    assert list(manifest) == list(clusters), "one manifest line per input cluster, in input order"
    for cluster, meta in clusters.items():
        expected = ("no prompts for cluster" if cluster not in prompts else
                    "too few images" if len(meta["images"]) < 4 else None)
        assert manifest[cluster]["reason"] == expected, (cluster, len(meta["images"]), manifest[cluster])
        assert manifest[cluster]["kept"] == (expected is None)
    assert manifest[world["second"]]["unnamed_prompts"] == [UNNAMED]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dropped"].get("too few images") and summary["dropped"]["no prompts for cluster"] == 1, summary
    assert summary["kept"] == sum(row["kept"] for row in manifest.values()) >= 3
    assert summary["renders"] == 2 * summary["kept"] == len(_samples(run))


def test_each_kept_cluster_has_one_sample_per_named_prompt_with_its_demos_and_render(world, run):
    clusters, prompts, samples = _clusters(world["clusters"]), _prompts(world), _samples(run)
    manifest = {row["cluster"]: row for row in read_jsonl(run / "manifest.jsonl")}
    for cluster in (c for c, row in manifest.items() if row["kept"]):
        images = clusters[cluster]["images"]
        mine = {key: members for key, members in samples.items() if key.startswith(cluster + "_")}
        named = [p for p in prompts[cluster] if p["prompt"] != UNNAMED]
        assert sorted(mine) == [f"{cluster}_{i:03d}" for i in range(len(named))]
        for (key, members), prompt in zip(sorted(mine.items()), named):
            meta = json.loads(members["json"])
            word = prompt["class_word"]
            assert (meta["target_caption"], meta["skill"], meta["class_word"]) == (prompt["prompt"], prompt["skill"],
                                                                                   word)
            assert f"sks {word}" in meta["expert_prompt"] and meta["expert_prompt"].replace("sks ", "", 1) == \
                prompt["prompt"]
            n = min(len(images), 5)
            assert meta["demo_keys"] == [image["key"] for image in images[:n]], "the first max_demos images"
            assert meta["demo_captions"] == [image["caption"] for image in images[:n]]
            demos, masks, target, target_mask = decode_images(members, n)
            assert demos.shape == (n, 64, 64, 3) and target.shape == (64, 64, 3), "the base's image size"
            assert all(m.all() for m in masks) and target_mask.all(), "unknown masks are all subject"
            assert meta["expert"] == f"experts/{cluster}.safetensors"


def test_each_expert_is_a_lora_file_with_its_cost(run):
    kept = [row for row in read_jsonl(run / "manifest.jsonl") if row["kept"]]
    assert sorted(p.stem for p in (run / "experts").glob("*.safetensors")) == sorted(row["cluster"] for row in kept)
    for row in kept:
        record = json.loads((run / "experts" / f"{row['cluster']}.json").read_text())
        lora = run / "experts" / f"{row['cluster']}.safetensors"
        assert record["steps"] == 2 and record["seconds"] > 0 and record["bytes"] == lora.stat().st_size
        with safe_open(str(lora), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert (meta["subject"], meta["class_word"], meta["mode"], meta["rank"]) == (row["cluster"], row["class_word"],
                                                                                    "lora", "2")
        assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
        assert any(k.startswith("text_encoders.") for k in keys), "the identifier row is part of the expert"


def _timeless(directory: Path) -> dict[str, object]:
    """The folder's bytes, but the records without their seconds (a run's only non-deterministic numbers) and the
    experts as metadata and tensor bytes (safetensors writes metadata keys in hash order)."""
    files: dict[str, object] = folder_bytes(directory)
    for name in [n for n in files if n.startswith("experts/")]:
        if name.endswith(".json"):
            files[name] = {k: v for k, v in json.loads(files[name]).items() if k not in TIMING}
        else:
            with safe_open(str(directory / name), "pt") as f:
                names = f.keys()  # a safetensors file, not a dict
                files[name] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in names})
    return files


def test_a_rerun_after_a_kill_writes_the_same_bytes(world, run, monkeypatch, tmp_path):
    expected = _timeless(run)
    killed = tmp_path / "killed"
    args = (world["clusters"], world["prompts"], killed, world["base"], SETTINGS, world["root"] / "prior")
    renders = json.loads((run / "summary.json").read_text())["renders"]
    run_killed(monkeypatch, experts_stage, renders, lambda: make_experts(*args))  # in the last shard's last sample
    assert not list(killed.glob("*.partial")) and not (killed / "manifest.jsonl").exists()
    done = sorted(p.name for p in (killed / "index").glob("*.jsonl"))
    assert done and len(done) < len(list(world["clusters"].glob("*.tar"))), f"killed mid-stage, done: {done}"
    assert all(f"index/{name}" in expected for name in done)
    make_experts(*args)
    assert _timeless(killed) == expected


def test_other_settings_missing_inputs_and_a_missing_base_are_explained(world, run, tmp_path):
    base = ["experts", "--in", str(world["clusters"]), "--prompts", str(world["prompts"]), "--out", str(run),
            "--base", str(world["base"]), "--prior-cache", str(world["root"] / "prior")]
    with pytest.raises(SystemExit, match="differing: expert.*--overwrite"):
        main([*base, *CLI[:1], "3", *CLI[2:]])
    with pytest.raises(SystemExit, match="no prompt files .*training.data prompts"):
        main([*base[:4], str(tmp_path), *base[5:], *CLI])
    with pytest.raises(SystemExit, match="no base at .*toy base file"):
        main([*base[:8], str(tmp_path / "none.safetensors"), *base[9:], *CLI])
    with pytest.raises(ValueError, match="--min-images <= --max-demos"):
        ExpertStageSettings(min_images=6, max_demos=5)


@pytest.mark.parametrize("device, gpus", [("cpu", 0), ("cuda", 1), ("cuda:1", 1)])
def test_ray_tasks_ask_for_a_gpu_only_when_the_experts_train_on_cuda(world, tmp_path, monkeypatch, device, gpus):
    asked = []
    monkeypatch.setattr(experts_stage, "run_tasks", lambda *args: asked.append(args[-1]) or [])
    main(["experts", "--in", str(world["clusters"]), "--prompts", str(world["prompts"]), "--out", str(tmp_path),
          "--base", str(world["base"]), *CLI[:-1], device])
    assert asked == [gpus], f"--device {device}: each Ray task asked for {asked} GPUs, not {gpus}"
