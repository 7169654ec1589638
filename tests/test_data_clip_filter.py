"""Stage `clip-filter` (issue 13) with a tiny open_clip model made here with random weights (never downloaded),
loaded through the stage's own path: the scores are what the model says, the thresholds drop exactly the images
and clusters whose scores fall below them with their reason, a killed run resumes to the same bytes, 2 workers
write what 1 does, and a missing or incomplete checkpoint is explained."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
import torch
from data_stage_helpers import TINY_CLIP, folder_bytes, run_killed
from safetensors.torch import load_file

import training.data.common as per_image_stages  # clip-filter and recaption write their shards there (write_kept)
from training.data.__main__ import main
from training.data.clip_filter import ClipFilterSettings, ClipModel, clip_filter, load_settings
from training.data.cluster import ClusterSettings, cluster_crawl
from training.data.common import read_jsonl
from training.data.crawl import NoiseRates, synth_crawl
from training.shards import read_members, sample_locations

KEEP_ALL = ClipFilterSettings(image_image=-1.0, image_text=-1.0, min_size=1)


@pytest.fixture(scope="module")
def clusters(tmp_path_factory) -> Path:
    crawl, out = tmp_path_factory.mktemp("crawl"), tmp_path_factory.mktemp("clusters")
    synth_crawl(crawl, pages=24, seed=5, per_shard=40, size=32,
                rates=NoiseRates(mismatched_caption=0.3, unrelated_image=0.3))
    cluster_crawl(crawl, out, ClusterSettings(clusters_per_shard=4))
    return out


@pytest.fixture(scope="module")
def scores(clusters, tiny_clip, tmp_path_factory) -> dict[str, dict]:
    """Every input image's manifest row from a run that keeps everything."""
    out = tmp_path_factory.mktemp("keep_all")
    clip_filter(clusters, out, ClipModel(tiny_clip), KEEP_ALL)
    return {row["key"]: row for row in read_jsonl(out / "manifest.jsonl")}


def _cluster_samples(directory: Path) -> dict[str, dict[str, bytes]]:
    return {loc.key: read_members(loc) for shard in sorted(directory.glob("*.tar")) for loc in sample_locations(shard)}


def _decode(data: bytes):
    import io

    from PIL import Image
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_scores_are_the_models_cosines(clusters, tiny_clip, scores):
    model = open_clip.model.CLIP(**TINY_CLIP).eval()
    model.load_state_dict(load_file(tiny_clip / "open_clip_model.safetensors"))
    transform = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    checked = 0
    for cluster, members in _cluster_samples(clusters).items():
        meta = json.loads(members["json"])
        pixels = torch.stack([transform(_decode(members[f"img{i}.jpg"])) for i in range(len(meta["images"]))])
        with torch.no_grad():
            image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
            text = torch.nn.functional.normalize(model.encode_text(tokenizer([m["caption"] for m in meta["images"]])),
                                                 dim=-1).numpy()
        cosine = image @ image.T
        for i, entry in enumerate(meta["images"]):
            row = scores[entry["key"]]
            others = (cosine[i].sum() - cosine[i, i]) / (len(cosine) - 1)
            assert row["cluster"] == cluster and row["kept"] and row["reason"] is None
            assert abs(row["image_image"] - others) < 2e-4, f"{entry['key']}: {row['image_image']} vs {others}"
            assert abs(row["image_text"] - float(image[i] @ text[i])) < 2e-4, f"{entry['key']}: image_text"
            checked += 1
    assert checked == len(scores) > 50


def test_thresholds_drop_exactly_the_images_and_clusters_below_them(clusters, tiny_clip, scores, tmp_path):
    image_image = float(np.quantile([r["image_image"] for r in scores.values()], 0.2))
    image_text = float(np.quantile([r["image_text"] for r in scores.values()], 0.4))
    settings = ClipFilterSettings(image_image, image_text, min_size=3)
    summary = clip_filter(clusters, tmp_path, ClipModel(tiny_clip), settings)
    manifest = read_jsonl(tmp_path / "manifest.jsonl")
    assert [r["key"] for r in manifest] == list(scores), "one manifest line per input image, in input order"
    expected = {}
    for key, row in scores.items():
        expected[key] = ("off-subject image" if row["image_image"] < image_image else
                         "caption mismatch" if row["image_text"] < image_text else None)
    survivors = {c: sum(expected[k] is None for k, r in scores.items() if r["cluster"] == c)
                 for c in {r["cluster"] for r in scores.values()}}
    for key, row in scores.items():
        if expected[key] is None and survivors[row["cluster"]] < 3:
            expected[key] = "cluster too small after filtering"
    wrong = [(r["key"], expected[r["key"]], r["reason"]) for r in manifest if r["reason"] != expected[r["key"]]]
    assert not wrong, f"(key, expected reason, got): {wrong}"
    assert all((r["image_image"], r["image_text"]) == (scores[r["key"]]["image_image"], scores[r["key"]]["image_text"])
               for r in manifest), "scores do not depend on the thresholds"
    for reason in ("off-subject image", "caption mismatch", "cluster too small after filtering"):
        assert reason in summary.dropped, f"the test should exercise {reason!r}; change the quantiles or the seed"
    assert summary.kept == sum(r["kept"] for r in manifest) > 0

    inputs, outputs = _cluster_samples(clusters), _cluster_samples(tmp_path)
    kept = {r["cluster"] for r in manifest if r["kept"]}
    assert set(outputs) == kept, "exactly the clusters with a kept image are written"
    for cluster, members in outputs.items():
        meta, source = json.loads(members["json"]), json.loads(inputs[cluster]["json"])
        rows = [r for r in manifest if r["cluster"] == cluster]
        assert [m["key"] for m in meta["images"]] == [r["key"] for r in rows if r["kept"]]
        for i, image in enumerate(meta["images"]):
            j = [m["key"] for m in source["images"]].index(image["key"])
            assert members[f"img{i}.jpg"] == inputs[cluster][f"img{j}.jpg"], "kept images keep their bytes"
            assert image["clip"] == {"image_image": scores[image["key"]]["image_image"],
                                     "image_text": scores[image["key"]]["image_text"]}


def test_a_rerun_after_a_kill_writes_the_same_bytes(clusters, tiny_clip, scores, monkeypatch, tmp_path):
    settings = ClipFilterSettings(float(np.median([r["image_image"] for r in scores.values()])), -1.0, min_size=2)
    clip_filter(clusters, tmp_path / "unbroken", ClipModel(tiny_clip), settings)
    expected = folder_bytes(tmp_path / "unbroken")
    assert sum(name.startswith("shard-") for name in expected) >= 3

    killed = tmp_path / "killed"
    run_killed(monkeypatch, per_image_stages, 4, lambda: clip_filter(clusters, killed, ClipModel(tiny_clip), settings))
    assert not list(killed.glob("*.partial")) and not (killed / "manifest.jsonl").exists()
    shards = sorted(p.name for p in killed.glob("shard-*"))
    assert shards and all(name in expected for name in shards), "only whole shards are left"
    unwritten = next(name for name in expected if name.startswith("shard-") and name not in shards)
    (killed / f"{unwritten}.partial").write_bytes(b"half a tar")  # what a SIGKILL leaves, replaced by the rerun
    clip_filter(clusters, killed, ClipModel(tiny_clip), settings)
    assert folder_bytes(killed) == expected

    for name in (shards[0], "manifest.jsonl", "index/shard-000001.tar.jsonl"):  # lost files are made again
        (killed / name).unlink()
    clip_filter(clusters, killed, ClipModel(tiny_clip), settings)
    assert folder_bytes(killed) == expected


def test_two_workers_write_what_one_does(clusters, tiny_clip, scores, tmp_path):
    settings = ClipFilterSettings(float(np.median([r["image_image"] for r in scores.values()])), -1.0)
    clip_filter(clusters, tmp_path / "one", ClipModel(tiny_clip), settings, workers=1)
    clip_filter(clusters, tmp_path / "two", ClipModel(tiny_clip), settings, workers=2)
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")


def test_a_weights_file_with_a_registered_architecture_scores_the_same(clusters, tiny_clip, scores, tmp_path):
    (tmp_path / "suti-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "suti-tiny-clip.json")  # the architecture name is the file's stem
    spec = ClipModel(tiny_clip / "open_clip_model.safetensors", "suti-tiny-clip")
    clip_filter(clusters, tmp_path / "out", spec, KEEP_ALL)
    assert {r["key"]: r for r in read_jsonl(tmp_path / "out" / "manifest.jsonl")} == scores


def test_a_missing_or_incomplete_checkpoint_is_explained(clusters, tiny_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="no open_clip checkpoint at .*huggingface-cli download"):
        clip_filter(clusters, tmp_path / "a", ClipModel(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="has no open_clip_config.json.*--model-name"):
        clip_filter(clusters, tmp_path / "b", ClipModel(tmp_path))
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "open_clip_config.json").write_bytes((tiny_clip / "open_clip_config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="but no weights file"):
        clip_filter(clusters, tmp_path / "e", ClipModel(config_only))
    with pytest.raises(ValueError, match="weights file: name its open_clip architecture with --model-name"):
        clip_filter(clusters, tmp_path / "c", ClipModel(tiny_clip / "open_clip_model.safetensors"))
    with pytest.raises(SystemExit, match="huggingface-cli download"):
        main(["clip-filter", "--in", str(clusters), "--out", str(tmp_path / "d"), "--model", str(tmp_path / "no")])


def test_thresholds_come_from_a_config_file_and_flags_win(clusters, tiny_clip, tmp_path, capsys):
    config = tmp_path / "clip.toml"
    config.write_text("image_image = 0.5\nimage_text = -1.0\nmin_size = 2\n")
    assert load_settings(config) == ClipFilterSettings(0.5, -1.0, 2)
    assert load_settings(config, image_text=0.1, min_size=None) == ClipFilterSettings(0.5, 0.1, 2)
    (tmp_path / "bad.json").write_text('{"image_imge": 0.5}')
    with pytest.raises(ValueError, match="unknown setting.*image_imge"):
        load_settings(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cosine similarity in"):
        ClipFilterSettings(image_text=2.0)
    args = ["clip-filter", "--in", str(clusters), "--out", str(tmp_path / "out"), "--model", str(tiny_clip),
            "--config", str(config), "--device", "cpu"]
    main(args)
    line = capsys.readouterr().out.strip()
    assert line.startswith("clip-filter: ") and " in → " in line and "clusters " in line
    with pytest.raises(SystemExit, match="image_image.*--overwrite"):
        main(args + ["--image-image", "0.6"])
    main(args + ["--image-image", "0.6", "--overwrite"])
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["image_image"] == 0.6
