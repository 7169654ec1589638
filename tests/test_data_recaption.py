"""Stage `recaption` (issue 13): a command captioner gets every decodable image through its JSON-lines protocol and its
captions replace the alt text (kept as `alt_text`); empty captions, corrupt images and the clusters they leave too
small are dropped with their reason; a killed run resumes to the same bytes; a tiny transformers model captions from a
local folder; a failing command stops the stage naming the cluster, exit status and stderr; the toy captioner reads
the world's images with the render filter and refuses the evaluation judge."""
from __future__ import annotations

import hashlib
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
from data_stage_helpers import folder_bytes, run_killed

import training.data.common as per_image_stages  # clip-filter and recaption write their shards there (write_kept)
from suti_core.world import subject_from_id
from suti_core.world.captions import parse_caption
from training.data.__main__ import main
from training.data.captioners import CaptionCommandError, CommandCaptioner
from training.data.cluster import ClusterSettings, cluster_crawl
from training.data.common import decode_image, image_member, read_jsonl
from training.data.crawl import NoiseRates, synth_crawl
from training.data.recaption import RecaptionSettings, recaption
from training.shards import add_sample, read_members, sample_locations, whole_shard

CLEAN = NoiseRates(0, 0, 0, 0, 0, 0, 0)
# A stand-in captioner: the image's hash, or no caption for every third key (by the last digit of its hash).
HASHING = ("import hashlib, json, os, sys\n"
           "for line in sys.stdin:\n"
           "    r = json.loads(line); digest = hashlib.sha256(open(r['path'], 'rb').read()).hexdigest()\n"
           "    empty = int(hashlib.sha256(r['key'].encode()).hexdigest(), 16) % 3 == 0\n"
           "    print('' if empty else f\"  {r['cluster']} {r['key']} {digest}  {os.environ['SUTI_SHARD']}\")")


def _python(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


def _silent(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 3 == 0


def _samples(directory: Path) -> dict[str, dict[str, bytes]]:
    return {loc.key: read_members(loc) for shard in sorted(directory.glob("*.tar")) for loc in sample_locations(shard)}


@pytest.fixture(scope="module")
def clusters(tmp_path_factory) -> Path:
    """Clean cluster shards, but one image of the first cluster has garbage bytes."""
    crawl, out = tmp_path_factory.mktemp("crawl"), tmp_path_factory.mktemp("clusters")
    synth_crawl(crawl, pages=14, seed=2, per_shard=40, size=32, rates=CLEAN)
    cluster_crawl(crawl, out, ClusterSettings(clusters_per_shard=4))
    first = min(out.glob("shard-*.tar"))
    samples = [(loc.key, read_members(loc)) for loc in sample_locations(first)]
    samples[0][1][image_member(samples[0][1], 1)] = b"not an image"
    first.unlink()
    with whole_shard(first) as tar:
        for key, members in samples:
            add_sample(tar, key, members)
    return out


def test_command_captions_replace_the_alt_text_and_drops_have_their_reason(clusters, tmp_path):
    summary = recaption(clusters, tmp_path, CommandCaptioner(_python(HASHING)), RecaptionSettings(min_size=3))
    inputs, outputs = _samples(clusters), _samples(tmp_path)
    manifest = read_jsonl(tmp_path / "manifest.jsonl")
    expected = {}
    for cluster, members in inputs.items():
        images = json.loads(members["json"])["images"]
        reasons = ["corrupt image" if members[image_member(members, i)] == b"not an image" else
                   "empty caption" if _silent(image["key"]) else None for i, image in enumerate(images)]
        small = sum(r is None for r in reasons) < 3
        expected |= {image["key"]: "cluster too small after recaptioning" if small and r is None else r
                     for image, r in zip(images, reasons)}
    assert [row["key"] for row in manifest] == list(expected), "one manifest line per input image, in input order"
    wrong = [(row["key"], expected[row["key"]], row["reason"]) for row in manifest if row["reason"] != expected[row["key"]]]
    assert not wrong, f"(key, expected reason, got): {wrong}"
    for reason in ("corrupt image", "empty caption", "cluster too small after recaptioning"):
        assert reason in summary.dropped, f"the test should exercise {reason!r}; change the crawl's seed"
    assert summary.kept == sum(row["kept"] for row in manifest) > 0

    assert set(outputs) == {row["cluster"] for row in manifest if row["kept"]}
    for cluster, members in outputs.items():
        meta, source = json.loads(members["json"]), json.loads(inputs[cluster]["json"])
        rows = {row["key"]: row for row in manifest if row["cluster"] == cluster}
        assert [image["key"] for image in meta["images"]] == [k for k, row in rows.items() if row["kept"]]
        for i, image in enumerate(meta["images"]):
            j = [s["key"] for s in source["images"]].index(image["key"])
            data = members[f"img{i}.jpg"]
            assert data == inputs[cluster][f"img{j}.jpg"], "kept images keep their bytes"
            shard = rows[image["key"]]["in_shard"]
            assert image["caption"] == f"{cluster} {image['key']} {hashlib.sha256(data).hexdigest()} {shard}", \
                "the command got the image's own bytes, and its line (whitespace folded) is the caption"
            assert image["alt_text"] == source["images"][j]["caption"] == rows[image["key"]]["alt_text"]
            assert rows[image["key"]]["caption"] == image["caption"]


def test_a_rerun_after_a_kill_writes_the_same_bytes(clusters, monkeypatch, tmp_path):
    captioner, settings = CommandCaptioner(_python(HASHING)), RecaptionSettings(min_size=2)
    recaption(clusters, tmp_path / "unbroken", captioner, settings)
    expected = folder_bytes(tmp_path / "unbroken")
    assert sum(name.startswith("shard-") for name in expected) >= 3

    killed = tmp_path / "killed"
    run_killed(monkeypatch, per_image_stages, 5, lambda: recaption(clusters, killed, captioner, settings))
    assert not list(killed.glob("*.partial")) and not (killed / "manifest.jsonl").exists()
    shards = sorted(p.name for p in killed.glob("shard-*"))
    assert shards and all(name in expected for name in shards), "only whole shards are left"
    unwritten = next(name for name in expected if name.startswith("shard-") and name not in shards)
    (killed / f"{unwritten}.partial").write_bytes(b"half a tar")  # what a SIGKILL leaves, replaced by the rerun
    recaption(clusters, killed, captioner, settings, workers=2)
    assert folder_bytes(killed) == expected, "a resumed run (here with 2 workers) writes what an unbroken one did"

    for name in (shards[0], "manifest.jsonl", "index/shard-000001.tar.jsonl"):  # lost files are made again
        (killed / name).unlink()
    recaption(clusters, killed, captioner, settings)
    assert folder_bytes(killed) == expected
    with pytest.raises(FileExistsError, match="min_size.*--overwrite"):
        recaption(clusters, killed, captioner, RecaptionSettings(min_size=4))


def test_a_failing_or_miscounting_command_stops_the_stage_naming_the_cluster(clusters, tmp_path):
    first = json.loads(next(iter(_samples(clusters).values()))["json"])["cluster"]
    failing = _python("import sys; sys.stdin.read(); sys.stderr.write('CUDA out of memory'); sys.exit(3)")
    with pytest.raises(CaptionCommandError, match=rf"exited with status 3 while captioning cluster {first} \(shard "
                                                  r"shard-000000.tar, 0 of \d+ images answered\).*CUDA out of memory"
                                                  r".*--model DIR"):
        recaption(clusters, tmp_path / "a", CommandCaptioner(failing))
    assert not list((tmp_path / "a").glob("shard-*")) and not (tmp_path / "a" / "manifest.jsonl").exists()
    with pytest.raises(CaptionCommandError, match=r"wrote 1 lines for the \d+ images of shard shard-000000.tar.*one "
                                                  "caption line per input line"):
        recaption(clusters, tmp_path / "b", CommandCaptioner(_python("print('one caption for all')")))
    with pytest.raises(SystemExit, match="could not run for cluster c[0-9a-f]+"):
        main(["recaption", "--in", str(clusters), "--out", str(tmp_path / "c"), "--command", "no-such-captioner -x"])
    with pytest.raises(SystemExit, match="no transformers model folder at .*save_pretrained"):
        main(["recaption", "--in", str(clusters), "--out", str(tmp_path / "d"), "--model", str(tmp_path)])


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory) -> Path:
    """A VisionEncoderDecoder (ViT + GPT-2, random weights) with its image processor and a word-level tokenizer,
    saved with save_pretrained: the layout of a captioner fetched from the hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        PreTrainedTokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    folder = tmp_path_factory.mktemp("tiny_captioner")
    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "a", "photo", "of", "star", "cup", "dog", "on", "the", "grass"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                            unk_token="[UNK]").save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32,
                  patch_size=16),
        GPT2Config(vocab_size=len(words), n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0))
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config=config)
    model.generation_config.decoder_start_token_id, model.generation_config.pad_token_id = 1, 0
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    return folder


def test_a_tiny_transformers_model_captions_from_a_local_folder(clusters, tiny_captioner, tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    main(["recaption", "--in", str(clusters), "--out", str(tmp_path), "--model", str(tiny_captioner), "--device",
          "cpu", "--max-new-tokens", "6", "--min-size", "1"])
    assert capsys.readouterr().out.startswith("recaption: ")
    model = AutoModelForImageTextToText.from_pretrained(tiny_captioner).eval()
    processor, tokenizer = AutoImageProcessor.from_pretrained(tiny_captioner), AutoTokenizer.from_pretrained(
        tiny_captioner)
    manifest = {row["key"]: row for row in read_jsonl(tmp_path / "manifest.jsonl")}
    checked = 0
    for members in _samples(clusters).values():
        images = json.loads(members["json"])["images"]
        usable = [(image["key"], decode_image(members[image_member(members, i)]))
                  for i, image in enumerate(images)]
        usable = [(key, image) for key, image in usable if image is not None]
        with torch.no_grad():  # one batch per cluster, as the stage does
            tokens = model.generate(pixel_values=processor(images=[i for _, i in usable], return_tensors="pt")
                                    .pixel_values, max_new_tokens=6, do_sample=False)
        for (key, _), caption in zip(usable, tokenizer.batch_decode(tokens, skip_special_tokens=True)):
            caption = " ".join(caption.split())
            assert manifest[key]["caption"] == caption
            assert manifest[key]["reason"] == (None if caption else "empty caption")
            checked += 1
    assert checked == sum(row["reason"] != "corrupt image" for row in manifest.values()) > 40
    assert any(row["kept"] for row in manifest.values())
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["captioner"]["max_new_tokens"] == 6 and ["config.json", (tiny_captioner / "config.json").stat()
                                                              .st_size] in settings["captioner"]["files"]


@pytest.fixture(scope="module")
def world_clusters(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """Clusters of a small clean crawl at the world's size, and each image's true subject."""
    crawl, out = tmp_path_factory.mktemp("world_crawl"), tmp_path_factory.mktemp("world_clusters")
    synth_crawl(crawl, pages=5, seed=11, per_shard=40, size=128, rates=CLEAN)
    cluster_crawl(crawl, out, ClusterSettings(clusters_per_shard=8))
    return out, {row["key"]: row["subject"] for row in read_jsonl(crawl / "ground_truth.jsonl")}


def test_the_toy_captioner_writes_world_captions_with_the_render_filter(world_clusters, tmp_path):
    folder, subjects = world_clusters
    command = shlex.join([sys.executable, "-m", "training.data.toy_captioner"])
    recaption(folder, tmp_path, CommandCaptioner(command))
    rows = read_jsonl(tmp_path / "manifest.jsonl")
    assert len(rows) >= 15 and all(row["kept"] for row in rows), [row["reason"] for row in rows]
    shapes = [subject_from_id(subjects[row["key"]]).shape for row in rows]
    right = [shape in row["caption"].split() for row, shape in zip(rows, shapes)]
    assert sum(right) >= len(rows) - 1, f"the filter named the wrong shape: {[r for r, ok in zip(rows, right) if not ok]}"
    for row in rows:
        context, _ = parse_caption(row["caption"])  # the world's vocabulary: it reads back
        assert context.background == parse_caption(row["alt_text"])[0].background, row


def test_the_toy_captioner_refuses_a_judge_file(judge_format_file):
    from training.data import toy_captioner

    with pytest.raises(ValueError, match="evaluation judge must not choose training data"):
        toy_captioner.main(["--filter", str(judge_format_file)])
