"""Issue 13's pipeline end to end at tiny size, each stage through its CLI as scripts/synthetic_pipeline.sh runs it:
synthetic crawl → cluster → clip-filter → recaption (toy captioner) → prompts → experts → filter → pack, then one
train_adapter step on the packed shards. What a stage keeps is what the next takes in, and the adapter the trainer
exports loads. The random tiny CLIP and the zero filter thresholds keep everything: this proves the wiring, while each
stage's own test proves its judgement."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from data_stage_helpers import write_tiny_clip

from suti_core.adapter import load_adapter
from suti_core.demo_features import feature_source_of
from training import train_adapter
from training.data import report
from training.data.__main__ import main
from training.shards import sample_locations

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models/suti/suti_toy_adapter.safetensors"
STAGES = ("crawl", "cluster", "clip", "recaption", "prompts", "experts", "filter", "pack")


def _samples(folder: Path) -> int:
    return sum(1 for shard in folder.glob("shard-*.tar") for _ in sample_locations(shard))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The whole chain at tiny size (6 pages, 2-step experts), with its pipeline_summary.json."""
    d = tmp_path_factory.mktemp("pipeline")
    clip = write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
    main(["synth-crawl", "--out", str(d / "crawl"), "--pages", "6", "--size", "64"])
    main(["cluster", "--in", str(d / "crawl"), "--out", str(d / "cluster")])
    main(["clip-filter", "--in", str(d / "cluster"), "--out", str(d / "clip"), "--model", str(clip), "--device", "cpu",
          "--image-image", "-1", "--image-text", "-1"])
    main(["recaption", "--in", str(d / "clip"), "--out", str(d / "recaption"),
          "--command", f"{sys.executable} -m training.data.toy_captioner"])
    main(["prompts", "--in", str(d / "recaption"), "--out", str(d / "prompts"), "--per-cluster", "2"])
    main(["experts", "--in", str(d / "recaption"), "--prompts", str(d / "prompts"), "--out", str(d / "experts"),
          "--steps", "2", "--render-steps", "2", "--prior-weight", "0", "--device", "cpu"])
    main(["filter", "--in", str(d / "experts"), "--out", str(d / "filter"), "--min-prob", "0", "--min-confidence", "0"])
    main(["pack", "--in", str(d / "filter"), "--out", str(d / "pack"), "--demos", "2"])
    report.main([str(d / stage) for stage in STAGES] + ["--json", str(d / "pipeline_summary.json")])
    return d


def test_what_each_stage_keeps_is_what_the_next_takes_in(run):
    summaries = json.loads((run / "pipeline_summary.json").read_text())
    crawl, cluster, clip, recaption, prompts, experts, filtered, packed = summaries
    assert [s["stage"] for s in summaries] == ["synth-crawl", "cluster", "clip-filter", "recaption", "prompts",
                                               "experts", "filter", "pack"]
    assert cluster["in"] == crawl["samples"], "cluster judges every crawled image"
    assert clip["in"] == cluster["kept"] and recaption["in"] == clip["kept"], "images flow cluster → clip → recaption"
    clusters = _samples(run / "recaption")
    assert prompts["in"] == experts["in"] == clusters > 0, "prompts and experts see each recaptioned cluster"
    assert prompts["prompts"] == 2 * prompts["kept"] and experts["renders"] == 2 * experts["kept"] > 0, \
        "each kept cluster gets --per-cluster prompts, and its expert renders them all"
    assert filtered["in"] == experts["renders"] and packed["in"] == filtered["kept"], "renders flow filter → pack"
    assert packed["kept"] == _samples(run / "pack") > 0, "pack writes each sample it keeps"


def test_the_trainer_takes_a_step_on_the_packed_shards_and_its_adapter_loads(run, monkeypatch, tmp_path):
    export = tmp_path / "adapter_pipeline.safetensors"
    monkeypatch.setattr(sys, "argv", [
        "train_adapter", "--shards", str(run / "pack"), "--run-dir", str(tmp_path / "run"), "--init-from", str(SHIPPED),
        "--demo-features", "encoder+decoder", "--steps", "1", "--batch-size", "2", "--demos", "2", "--lr", "1e-3",
        "--warmup", "0", "--ema", "0", "--export", str(export)])
    train_adapter.main()
    trained, shipped = load_adapter(export), load_adapter(SHIPPED)
    assert feature_source_of(trained.metadata.block_map) == "encoder+decoder"
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, shipped.state_dict()[k])]
    assert changed, "one step on the packed shards should move the shipped adapter's weights"


def test_the_report_names_a_folder_without_a_summary(tmp_path):
    with pytest.raises(SystemExit, match="has no summary.json .*run its stage first"):
        report.main([str(tmp_path)])
