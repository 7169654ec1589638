"""WebDataset shards of adapter-training examples: round trip, skipped bad samples, exact resume, no overwrite."""
from __future__ import annotations

import io
import logging
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from suti_core.world.subjects import COLOR_NAMES
from training.examples import SubjectExample, collate
from training.shards import ShardSampler, ShardWriter, iter_examples
from training.train_adapter import AdapterRecipe, AdapterTrainer, SubjectDemoSampler
from training.write_shards import write_renderer_shards

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_BASE = ROOT / "models/toy/suti_toy_base.safetensors"
SMALL = AdapterRecipe(batch_size=2, n_demos=2, lr=1e-3, p_edit=0.3, caption_dropout=0.1)


def _write(out: Path, samples: int = 4, per_shard: int = 2, seed: int = 7) -> list[Path]:
    sampler = SubjectDemoSampler(SMALL.n_demos, 128, SMALL.p_edit, np.random.default_rng(0))
    return write_renderer_shards(sampler, out, samples, per_shard, seed)


def _drawn(index: int, seed: int = 7) -> SubjectExample:
    """Sample `index` as the producer promises it: SubjectDemoSampler's draw with its rng seeded by (seed, index)."""
    sampler = SubjectDemoSampler(SMALL.n_demos, 128, SMALL.p_edit, np.random.default_rng([seed, index]))
    return sampler.examples(1)[0]


def _keys(directory: Path) -> list[str]:
    return [location.key for location, _ in iter_examples(directory)]


def test_shards_give_back_the_examples_the_renderer_draws(tmp_path):
    paths = _write(tmp_path, samples=3)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar"]
    assert not list(tmp_path.glob("*.partial")), "a finished shard loses its .partial name"
    read, expected = collate([e for _, e in iter_examples(tmp_path)]), collate([_drawn(i) for i in range(3)])
    assert torch.equal(read.demo_images, expected.demo_images) and torch.equal(read.target_images, expected.target_images)
    assert torch.equal(read.target_masks, expected.target_masks)
    assert len(read.demo_masks) == 6 and all(torch.equal(a, b) for a, b in zip(read.demo_masks, expected.demo_masks))
    assert read.demo_captions == expected.demo_captions and read.target_captions == expected.target_captions
    assert read.subjects == expected.subjects


def test_shards_keep_the_webdataset_layout(tmp_path):
    _write(tmp_path, samples=3)
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:7] == ["000000.json", "000000.demo0.png", "000000.demo0.mask.png", "000000.demo1.png",
                         "000000.demo1.mask.png", "000000.target.png", "000000.target.mask.png"]
    keys = [n.split(".")[0] for n in names]
    assert keys == sorted(keys) and len(names) == 14, "each sample's members are contiguous"


def test_a_demo_without_a_mask_reads_back_as_none(tmp_path):
    example = _drawn(0)
    example.demo_masks[1] = None
    with ShardWriter(tmp_path, per_shard=1) as writer:
        writer.write(example)
    (_, read), = iter_examples(tmp_path)
    assert read.demo_masks[1] is None and np.array_equal(read.demo_masks[0], example.demo_masks[0])
    assert collate([read]).demo_masks[1] is None


def _rewrite(shard: Path, change: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite a shard with each member's bytes passed through `change` (None drops the member)."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


CORRUPTIONS = {  # member of sample 000001 -> (its new bytes from the old, the logged reason)
    "garbage PNG": ("000001.demo0.png", lambda data: b"not a png at all", "demo0.png is not a readable PNG"),
    "cut PNG": ("000001.target.png", lambda data: data[:60], "target.png is not a readable PNG"),
    "missing member": ("000001.target.mask.png", lambda data: None, "target.mask.png is missing"),
    "bad JSON": ("000001.json", lambda data: data[:-5], "json is not valid JSON"),
    "JSON without captions": ("000001.json", lambda data: b'{"subject": 3}', "json needs subject"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_sample_is_skipped_with_its_reason_and_the_rest_read(tmp_path, caplog, corruption):
    member, change, reason = CORRUPTIONS[corruption]
    _write(tmp_path)
    _rewrite(tmp_path / "shard-000000.tar", lambda name, data: change(data) if name == member else data)
    with caplog.at_level(logging.WARNING, logger="training.shards"):
        assert _keys(tmp_path) == ["000000", "000002", "000003"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("000001" in m and "shard-000000.tar" in m and reason in m for m in messages), messages


def test_a_truncated_shard_keeps_the_samples_before_the_cut(tmp_path, caplog):
    _write(tmp_path)
    shard = tmp_path / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmember("000003.target.png").offset_data + 10  # inside the last sample's target image
    shard.write_bytes(shard.read_bytes()[:cut])
    with caplog.at_level(logging.WARNING, logger="training.shards"):
        assert _keys(tmp_path) == ["000000", "000001", "000002"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("000003" in m and "shard-000001.tar" in m and "truncated" in m for m in messages), messages


def test_the_sampler_skips_samples_that_do_not_fit_the_run(tmp_path, caplog):
    _write(tmp_path, samples=2)
    with caplog.at_level(logging.WARNING, logger="training.shards"), pytest.raises(ValueError, match="3 demos"):
        ShardSampler(tmp_path, n_demos=3, size=128, rng=np.random.default_rng(0))
    assert any("2 demos at 128px, the run needs 3" in r.getMessage() for r in caplog.records)


def _trainer(shards: Path) -> AdapterTrainer:
    """A trainer on `shards` starting from the shipped adapter, so the demos (not only the targets) move the loss."""
    torch.manual_seed(0)
    trainer = AdapterTrainer(SHIPPED_BASE, Accelerator(cpu=True), SMALL, shards=shards)
    trainer.init_from(ROOT / "models/suti/suti_toy_adapter.safetensors")
    return trainer


def test_a_resumed_run_from_shards_with_workers_computes_the_losses_an_unbroken_run_does(tmp_path):
    _write(tmp_path, samples=6, per_shard=4)
    unbroken_run, resumed_run = _trainer(tmp_path), _trainer(tmp_path)  # the resumed one indexes the shards anew
    assert isinstance(unbroken_run.sampler, ShardSampler) and len(unbroken_run.sampler.locations) == 6
    unbroken_run.start_data_at(0, seed=4)
    resumed_run.start_data_at(2, seed=4, workers=2)  # examples rendered ahead in 2 processes
    with torch.no_grad():
        unbroken = [unbroken_run.loss().item() for _ in range(3)]
        assert resumed_run.loss().item() == unbroken[2] and len(set(unbroken)) == 3
    batch = resumed_run.sampler.batch(2)
    written = {e.target_caption for _, e in iter_examples(tmp_path)}
    assert set(batch.target_captions) <= written, "a step's targets come from the shards"


def test_writing_never_overwrites_shards_unless_told(tmp_path):
    _write(tmp_path, samples=3, per_shard=1)
    result = subprocess.run([sys.executable, "-m", "training.write_shards", "--out", str(tmp_path), "--samples", "1",
                             "--demos", "2"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert len(list(tmp_path.glob("shard-*.tar"))) == 3
    sampler = SubjectDemoSampler(SMALL.n_demos, 128, SMALL.p_edit, np.random.default_rng(0))
    assert write_renderer_shards(sampler, tmp_path, 1, 1, seed=7, overwrite=True) == [tmp_path / "shard-000000.tar"]
    assert _keys(tmp_path) == ["000000"], "a shorter rewrite leaves no stale shards behind"


def test_the_shard_writer_takes_the_recolour_share_the_trainer_does(tmp_path):
    result = subprocess.run([sys.executable, "-m", "training.write_shards", "--out", str(tmp_path), "--samples", "3",
                             "--demos", "1", "--p-edit", "0", "--p-recolor", "1"], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    captions = [e.target_caption for _, e in iter_examples(tmp_path)]
    assert len(captions) == 3 and all(set(c.split()) & set(COLOR_NAMES) for c in captions), captions
