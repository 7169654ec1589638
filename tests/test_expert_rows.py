"""Per-subject baselines in the quality table: an expert row trains on the subject's demos, reports its adaptation
seconds and bytes, samples through the stock LoraLoader, and a second run takes the expert from the cache; SuTI
rows report their demo-encoding seconds and 0 bytes, rows that adapt nothing 0 and 0."""
from __future__ import annotations

import pytest
import torch

from training.dreambooth import DreamBoothRecipe
from training.expert_prior import PriorSettings

TINY_RECIPE = DreamBoothRecipe(steps=2, prior=PriorSettings(count=2, steps=1))  # a few-step LoRA expert


def test_expert_row_reports_its_cost_and_reuses_the_cached_expert(suti_pack, tmp_path, monkeypatch):
    from benchmarks import expert_rows, quality

    prompts = quality.held_out_prompts(1, 1, seed=0, p_edit=0.15)
    sid = prompts[0].subject.id

    def row() -> expert_rows.ExpertRow:
        return expert_rows.ExpertRow(quality.DEFAULT_BASE, TINY_RECIPE, tmp_path / "experts", tmp_path / "prior",
                                     steps=2)

    first = row()
    images = first(prompts)
    cost = first.adaptation[sid]
    assert images.shape == (1, 3, 128, 128) and images.abs().max() <= 1
    assert cost.seconds > 0 and cost.bytes_stored > 0 and not cost.cached, cost
    path = first.expert_path(sid)
    assert cost.bytes_stored == path.stat().st_size and first.loader.loaded_lora[0] == str(path), \
        "the row did not sample with the expert it trained, loaded by ComfyUI's LoraLoader"

    def no_training(*args, **kwargs):
        raise AssertionError("the expert was trained again although the cache holds it")

    monkeypatch.setattr(expert_rows, "fit_expert", no_training)
    second = row()
    torch.testing.assert_close(second(prompts), images)
    assert second.adaptation[sid] == quality.AdaptationCost(cost.seconds, cost.bytes_stored, cached=True)

    suti = quality.SuTIWithDemos(quality.DEFAULT_BASE, quality.SuTISetting.parse(
        "adapter=models/suti/suti_toy_adapter.safetensors,masks=1"), steps=2)
    suti(prompts)
    costs = quality.adaptation_costs({"truth": quality.renderer_truth, "suti": suti, "expert": second}, prompts)
    assert costs["truth"]["seconds"] == [0.0] and costs["truth"]["bytes"] == [0]
    assert costs["suti"]["seconds"][0] > 0 and costs["suti"]["bytes"] == [0], costs["suti"]
    assert costs["expert"]["bytes"] == [cost.bytes_stored] and costs["expert"]["cached"] == [True]
    table = quality.adaptation_table(costs)
    assert f"| expert | {cost.seconds:.2f} ± 0.00 | {cost.bytes_stored:,} |" in table and "from the cache" in table


def test_method_factories_get_the_sampling_settings_and_expert_steps(suti_pack, tmp_path):
    from benchmarks import quality

    name, row = quality.load_method("TI=benchmarks.expert_rows:textual_inversion", quality.DEFAULT_BASE,
                                    steps=3, cfg=2.0, expert_steps=7)
    assert name == "TI" and row.recipe.mode == "textual-inversion" and row.recipe.steps == 7
    assert (row.steps, row.cfg) == (3, 2.0)
    assert quality.load_method("base=benchmarks.quality:BaseTextOnly", quality.DEFAULT_BASE, steps=3,
                               expert_steps=7)[1].steps == 3, "a factory without expert_steps must still load"
    with pytest.raises(SystemExit, match="NAME=package.module:factory"):
        quality.load_method("benchmarks.expert_rows:lora", quality.DEFAULT_BASE)
