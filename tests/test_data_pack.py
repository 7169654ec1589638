"""Stage `pack` (issue 13): the filter stage's kept renders become exactly the adapter trainer's shards: N demos per
sample drawn from the seed, samples with fewer demos or undecodable ones dropped with their reason, images at the
trainer's size, a killed run resumed to the same bytes; ShardSampler reads the result and a train_adapter step runs
on it. The input is the experts stage's layout with world renders standing in for the experts' (a perfect expert),
judged by the real filter stage."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from data_stage_helpers import folder_bytes, run_killed

import training.data.pack as pack_stage
from suti_core.world import Context, caption_for, render, render_demos, subject_from_id, subject_ids
from training.data.__main__ import main
from training.data.common import read_jsonl, square_image
from training.data.filter_renders import filter_renders
from training.data.pack import PackSettings, pack, stand_in_subject, with_target_mask
from training.shards import (ShardSampler, add_sample, decode_example, decode_images, encode_images, read_members,
                             sample_locations, whole_shard)
from training.train_adapter import AdapterRecipe, AdapterTrainer

ROOT = Path(__file__).resolve().parents[1]
# (demos, whether the demos carry masks) per cluster, two clusters per shard, two prompts per cluster
CLUSTERS = [(4, True), (3, False), (2, True), (5, True), (3, True), (1, True)]
PROMPTS = (Context("beach", style="watercolor"), Context("snow", accessory="hat"))


def _experts_sample(cluster: str, subject_id: int, demos: int, masked: bool, p: int) -> dict[str, bytes]:
    """One sample in the experts stage's layout: the subject's demos, and a render of prompt p as the target."""
    subject = subject_from_id(subject_id)
    renders = render_demos(subject, demos, seed=subject_id)
    target = render(subject, PROMPTS[p], 128, seed=p)
    prompt = caption_for(subject.shape, PROMPTS[p], variant=p, pose=False)
    meta = {"cluster": cluster, "class_word": subject.shape, "skill": ["stylize", "accessory"][p],
            "source": "template", "target_caption": prompt, "demo_captions": renders.captions}
    masks = list(renders.masks) if masked else [None] * demos
    images = encode_images(renders.images, masks, target, np.ones((128, 128), dtype=bool))
    if not masked:
        images.pop("target.mask.png")  # a producer that knows no target mask: pack makes it all-True
    return {"json": json.dumps(meta).encode()} | images


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("experts")
    ids = subject_ids("train")
    for s in range(len(CLUSTERS) // 2):
        with whole_shard(out / f"shard-{s:06d}.tar") as tar:
            for c in (2 * s, 2 * s + 1):
                demos, masked = CLUSTERS[c]
                for p in range(len(PROMPTS)):
                    add_sample(tar, f"c{c:016x}_{p}", _experts_sample(f"c{c:016x}", ids[7 * c], demos, masked, p))
    return out


@pytest.fixture(scope="module")
def with_corrupt(experts, tmp_path_factory) -> Path:
    """The experts' shards, one sample of the last shard with a garbage target."""
    out = tmp_path_factory.mktemp("with_corrupt")
    for shard in sorted(experts.glob("*.tar")):
        samples = [(loc.key, read_members(loc)) for loc in sample_locations(shard)]
        if shard.name == "shard-000002.tar":
            samples[0][1]["target.png"] = b"garbage"
        with whole_shard(out / shard.name) as tar:
            for key, members in samples:
                add_sample(tar, key, members)
    return out


def _samples(directory: Path) -> dict[str, dict[str, bytes]]:
    return {loc.key: read_members(loc) for shard in sorted(directory.glob("shard-*.tar"))
            for loc in sample_locations(shard)}


def test_pack_keeps_n_demos_a_sample_and_drops_the_rest_with_their_reason(with_corrupt, tmp_path):
    summary = pack(with_corrupt, tmp_path, PackSettings(demos=3, size=128, seed=1))
    inputs, outputs = _samples(with_corrupt), _samples(tmp_path)
    manifest = read_jsonl(tmp_path / "manifest.jsonl")
    assert [row["key"] for row in manifest] == list(inputs), "one manifest line per input sample, in input order"
    expected = {key: "corrupt sample" if key == "c0000000000000004_0" else
                "too few demos" if CLUSTERS[int(key[1:17], 16)][0] < 3 else None for key in inputs}
    assert {row["key"]: row["reason"] for row in manifest} == expected
    assert dict(summary.dropped) == {"too few demos": 4, "corrupt sample": 1} and summary.kept == 7
    assert set(outputs) == {key for key, reason in expected.items() if reason is None}, "samples keep their keys"
    for key, members in outputs.items():
        example, meta, source = decode_example(members), json.loads(members["json"]), json.loads(inputs[key]["json"])
        chosen = meta["demos"]
        assert len(chosen) == 3 == len(set(chosen)) and chosen == sorted(chosen)
        assert meta["cluster"] == source["cluster"] and meta["source_key"] == key and meta["skill"] == source["skill"]
        assert example.subject == stand_in_subject(source["cluster"])
        assert example.demo_captions == [source["demo_captions"][i] for i in chosen]
        assert example.target_caption == source["target_caption"]
        demos, masks, target, _ = decode_images(with_target_mask(inputs[key]), len(source["demo_captions"]))
        assert np.array_equal(example.demo_images, demos[chosen]), "the chosen demos, as they were"
        assert np.array_equal(example.target_image, target)
        masked = CLUSTERS[int(key[1:17], 16)][1]
        assert all((m is not None) == masked for m in example.demo_masks), "a demo without a mask stays without"
        assert example.target_mask.all(), "an unknown target mask is all-True"
        if masked:
            assert all(np.array_equal(m, masks[i]) for m, i in zip(example.demo_masks, chosen))


def test_images_are_resized_to_the_trainers_size(experts, tmp_path):
    pack(experts, tmp_path, PackSettings(demos=2, size=64))
    key, members = next(iter(_samples(tmp_path).items()))
    example, source = decode_example(members), _samples(experts)[key]
    assert example.demo_images.shape == (2, 64, 64, 3) and example.target_image.shape == (64, 64, 3)
    _, _, target, _ = decode_images(source, len(json.loads(source["json"])["demo_captions"]))
    assert np.array_equal(example.target_image, np.asarray(square_image(Image.fromarray(target), 64)))
    assert all(m is not None and m.shape == (64, 64) for m in example.demo_masks)


def test_a_shard_with_nothing_kept_is_not_written(experts, tmp_path):
    pack(experts, tmp_path, PackSettings(demos=5))
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-000001.tar"], "only cluster 3 has 5 demos"
    assert len(list((tmp_path / "index").glob("*.jsonl"))) == 3, "every input shard is done"


def test_the_demo_draw_depends_on_the_seed_and_a_killed_run_resumes_to_the_same_bytes(experts, monkeypatch, tmp_path):
    settings = PackSettings(demos=2, seed=3)
    pack(experts, tmp_path / "unbroken", settings)
    expected = folder_bytes(tmp_path / "unbroken")
    pack(experts, tmp_path / "other", PackSettings(demos=2, seed=4))
    draws = [{row["key"]: row["demos"] for row in read_jsonl(tmp_path / name / "manifest.jsonl")}
             for name in ("unbroken", "other")]
    assert draws[0] != draws[1], "another seed draws other demos"

    killed = tmp_path / "killed"
    run_killed(monkeypatch, pack_stage, 6, lambda: pack(experts, killed, settings))
    assert not list(killed.glob("*.partial")) and not (killed / "manifest.jsonl").exists()
    shards = sorted(p.name for p in killed.glob("shard-*"))
    assert shards and all(name in expected for name in shards), "only whole shards are left"
    unwritten = next(name for name in expected if name.startswith("shard-") and name not in shards)
    (killed / f"{unwritten}.partial").write_bytes(b"half a tar")  # what a SIGKILL leaves, replaced by the rerun
    pack(experts, killed, settings, workers=2)
    assert folder_bytes(killed) == expected, "a resumed run (here with 2 workers) writes what an unbroken one did"
    with pytest.raises(SystemExit, match="seed.*--overwrite"):
        main(["pack", "--in", str(experts), "--out", str(killed), "--demos", "2", "--seed", "5"])
    with pytest.raises(SystemExit, match="--demos must be at least 1"):
        main(["pack", "--in", str(experts), "--out", str(tmp_path / "none"), "--demos", "0"])


def test_the_trainer_reads_packed_filter_output_and_takes_a_step(experts, tmp_path, capsys):
    filter_renders(experts, tmp_path / "filtered")
    kept = sum(row["kept"] for row in read_jsonl(tmp_path / "filtered" / "manifest.jsonl"))
    assert kept >= 6, "the filter should keep most perfect renders"
    main(["pack", "--in", str(tmp_path / "filtered"), "--out", str(tmp_path / "packed"), "--demos", "2"])
    assert capsys.readouterr().out.startswith("pack: ")
    packed = sum(row["kept"] for row in read_jsonl(tmp_path / "packed" / "manifest.jsonl"))
    sampler = ShardSampler(tmp_path / "packed", n_demos=2, size=128, rng=np.random.default_rng(0))
    assert len(sampler.locations) == packed == kept - sum(CLUSTERS[int(k[1:17], 16)][0] < 2 for k in
                                                          _samples(tmp_path / "filtered"))
    torch.manual_seed(0)
    trainer = AdapterTrainer(ROOT / "models/toy/suti_toy_base.safetensors", Accelerator(cpu=True),
                             AdapterRecipe(batch_size=2, n_demos=2, lr=1e-3), shards=tmp_path / "packed")
    trainer.start_data_at(0, seed=0)
    before = [p.detach().clone() for p in trainer.adapter.parameters()]
    loss = trainer.loss()
    trainer.backward(loss)
    trainer.opt.step()
    trainer.after_step(0)
    assert torch.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, trainer.adapter.parameters()))
