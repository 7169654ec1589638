"""Stage `filter` scored by CLIP (real data, issue 13) with a tiny open_clip model made here with random weights
(never downloaded), loaded through clip-filter's path: the scores are the model's cosines of the render to its demos
and its prompt, a render identical to its demos keeps subject 1.0 while noise is dropped as `wrong subject`, the
text threshold drops as `wrong context`, kept samples gain the scores, thresholds come from the config, and the
scorer is one of two: both at once, another scorer on rerun and the evaluation judge are refused."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
import torch
from data_stage_helpers import TINY_CLIP, expert_sample, folder_samples, write_two_shards
from PIL import Image
from safetensors.torch import load_file, save_file

from training.data.__main__ import main
from training.data.clip_filter import GPUS_PER_TASK, ClipModel
from training.data.common import read_jsonl
from training.data.filter_renders import FilterSettings, as_scorer, clip_verdict, filter_renders, load_filter_settings

ROOT = Path(__file__).resolve().parents[1]
KEEP_ALL = FilterSettings(clip_subject=-1.0, clip_text=-1.0)
DOG, VASE = "my dog, running on a sunny beach", "a red vase in the snow"  # prompts no toy-world caption reads


def _images() -> dict[str, np.ndarray]:
    """Two drawn images and a noise image, 32 px (the tiny model's input)."""
    y, x = np.mgrid[:32, :32]
    square = np.zeros((32, 32, 3), np.uint8)
    square[8:24, 8:24] = (255, 40, 40)
    return {"gradient": np.stack([x * 8, y * 8, np.full_like(x, 128)], -1).astype(np.uint8), "square": square,
            "noise": np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)}


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> Path:
    """Renders identical to their 3 demos (two subjects, two prompts), a noise render of the first subject, and a
    sample whose render is not a PNG, in 2 shards."""
    im = _images()
    samples = [("same_dog", expert_sample("c0", "context", np.stack([im["gradient"]] * 3), DOG, im["gradient"])),
               ("noise_dog", expert_sample("c0", "context", np.stack([im["gradient"]] * 3), DOG, im["noise"])),
               ("same_vase", expert_sample("c1", "style", np.stack([im["square"]] * 3), VASE, im["square"]))]
    samples.append(("corrupt", {**samples[2][1], "target.png": b"not a png"}))
    return write_two_shards(tmp_path_factory.mktemp("experts"), samples)


@pytest.fixture(scope="module")
def scores(experts, tiny_clip, tmp_path_factory) -> dict[str, dict]:
    """Every sample's manifest row from a CLIP run that keeps everything."""
    out = tmp_path_factory.mktemp("keep_all")
    filter_renders(experts, out, ClipModel(tiny_clip), KEEP_ALL)
    return {row["key"]: row for row in read_jsonl(out / "manifest.jsonl")}


def test_scores_are_the_models_cosines_to_the_demos_and_the_prompt(experts, tiny_clip, scores):
    model = open_clip.model.CLIP(**TINY_CLIP).eval()
    model.load_state_dict(load_file(tiny_clip / "open_clip_model.safetensors"))
    transform, tokenizer = open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-B-32")
    for key, members in folder_samples(experts).items():
        if key == "corrupt":
            continue
        meta = json.loads(members["json"])
        names = [f"demo{i}.png" for i in range(len(meta["demo_captions"]))] + ["target.png"]
        pixels = torch.stack([transform(Image.open(io.BytesIO(members[n])).convert("RGB")) for n in names])
        with torch.no_grad():
            image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
            text = torch.nn.functional.normalize(model.encode_text(tokenizer([meta["target_caption"]])), dim=-1)
        subject, own = float((image[:-1] @ image[-1]).mean()), float(image[-1] @ text[0])
        row = scores[key]
        assert row["kept"] and row["reason"] is None, f"{key}: thresholds of -1 keep every scored render"
        assert row["scores"] == pytest.approx({"subject": subject, "text": own}, abs=2e-4), key
    assert scores["same_dog"]["scores"]["subject"] == scores["same_vase"]["scores"]["subject"] == 1.0
    assert scores["corrupt"]["reason"] == "corrupt sample" and scores["corrupt"]["scores"] is None


def test_thresholds_drop_noise_as_wrong_subject_and_a_far_prompt_as_wrong_context(experts, tiny_clip, scores,
                                                                                  tmp_path):
    texts = sorted((scores[k]["scores"]["text"], k) for k in ("same_dog", "same_vase"))
    assert texts[0][0] < texts[1][0], f"the two prompts score alike ({texts}); choose other prompts"
    assert scores["noise_dog"]["scores"]["subject"] < 0.99, "noise looks like the demos to this model"
    settings = FilterSettings(clip_subject=0.99, clip_text=(texts[0][0] + texts[1][0]) / 2)
    summary = filter_renders(experts, tmp_path, ClipModel(tiny_clip), settings)
    manifest = {row["key"]: row for row in read_jsonl(tmp_path / "manifest.jsonl")}
    expected = {"noise_dog": "wrong subject", texts[0][1]: "wrong context", texts[1][1]: None,
                "corrupt": "corrupt sample"}
    assert {key: row["reason"] for key, row in manifest.items()} == expected
    for key, row in manifest.items():
        if row["scores"] is not None:
            assert clip_verdict(**row["scores"], settings=settings)[0] == row["reason"], f"{key}: not the stated rule"
            assert row["scores"] == scores[key]["scores"], f"{key}: scores depend on the thresholds"
    assert summary.as_dict()["dropped"] == {"corrupt sample": 1, "wrong context": 1, "wrong subject": 1}
    kept = folder_samples(tmp_path)
    assert list(kept) == [texts[1][1]]
    assert json.loads(kept[texts[1][1]]["json"])["filter"] == manifest[texts[1][1]]["scores"]


def test_thresholds_come_from_the_config_file_and_flags_win(experts, tiny_clip, tmp_path, capsys):
    config = tmp_path / "filter.toml"
    config.write_text("clip_subject = 0.5\nclip_text = 0.1\nmin_prob = 0.2\n")
    assert load_filter_settings(config) == FilterSettings(min_prob=0.2, clip_subject=0.5, clip_text=0.1)
    assert load_filter_settings(config, clip_text=-0.5).clip_text == -0.5
    with pytest.raises(ValueError, match="--clip-subject is a cosine similarity in"):
        FilterSettings(clip_subject=1.5)
    out = tmp_path / "out"
    main(["filter", "--in", str(experts), "--out", str(out), "--clip", str(tiny_clip), "--device", "cpu",
          "--config", str(config), "--clip-text", "-1"])
    assert capsys.readouterr().out.startswith("filter: ")
    recorded = json.loads((out / "settings.json").read_text())
    assert (recorded["scorer"], recorded["clip_subject"], recorded["clip_text"]) == ("clip", 0.5, -1.0)
    assert recorded["clip"][0] == str(tiny_clip.resolve()) and "min_prob" not in recorded


def test_a_rerun_with_the_other_scorer_is_refused_without_overwrite(experts, tiny_clip, tmp_path):
    filter_renders(experts, tmp_path, ClipModel(tiny_clip), KEEP_ALL)
    with pytest.raises(FileExistsError, match="differing: .*scorer.*--overwrite"):
        filter_renders(experts, tmp_path, settings=KEEP_ALL)
    filter_renders(experts, tmp_path, settings=KEEP_ALL, overwrite=True)  # the render filter reads no such prompt
    assert {row["reason"] for row in read_jsonl(tmp_path / "manifest.jsonl")} == {"prompt not readable",
                                                                                  "corrupt sample"}
    assert json.loads((tmp_path / "settings.json").read_text())["scorer"] == "render filter"


def test_one_scorer_at_a_time_and_clip_flags_only_with_clip(experts, tiny_clip, tmp_path, capsys):
    base = ["filter", "--in", str(experts), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        main(base + ["--filter", str(ROOT / "models/filter/render_filter.safetensors"), "--clip", str(tiny_clip)])
    assert "argument --clip: not allowed with argument --filter" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--clip-name and --device go with --clip"):
        main(base + ["--clip-name", "ViT-B-32"])
    with pytest.raises(SystemExit, match="no open_clip checkpoint at .*pass --clip DIR"):
        main(base + ["--clip", str(tmp_path / "none")])
    assert not (tmp_path / "out").exists(), "nothing is written before the checks"
    assert as_scorer(ClipModel(tiny_clip, device="cuda")).gpus_per_task == GPUS_PER_TASK
    assert as_scorer(ClipModel(tiny_clip)).gpus_per_task == 0


def test_weights_of_another_network_are_refused_as_a_clip_model(experts, tiny_clip, tmp_path):
    """Only an open_clip model scores renders: another network's weights (a judge, a filter) fail before any work."""
    other = tmp_path / "other_network"
    other.mkdir()
    (other / "open_clip_config.json").write_bytes((tiny_clip / "open_clip_config.json").read_bytes())
    save_file({"head.weight": torch.zeros(4, 4)}, other / "model.safetensors")
    with pytest.raises(ValueError, match="does not hold an open_clip model"):
        filter_renders(experts, tmp_path / "a", ClipModel(other))
    with pytest.raises(SystemExit, match="pass --clip an open_clip folder"):
        main(["filter", "--in", str(experts), "--out", str(tmp_path / "b"), "--clip", str(other)])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists(), "nothing is written before the check"
