"""Data pipeline stages (issue 13) on a tiny synthetic crawl: `cluster` drops exactly the injected noise with its
reason, resumes after a kill to the same bytes, and writes the same with 2 worker processes as with 1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_stage_helpers import folder_bytes, run_killed

import training.data.cluster as cluster_stage
from training.data.__main__ import main
from training.data.cluster import ClusterSettings, cluster_crawl, normalise_page_url
from training.data.common import read_jsonl
from training.data.crawl import NoiseRates, synth_crawl
from training.shards import read_members, sample_locations, whole_shard

NOISY = NoiseRates(singleton_page=0.1, catalogue_page=0.08, mismatched_caption=0.3, unrelated_image=0.3,
                   duplicate_url=0.3, corrupt_image=0.3, missing_field=0.4)
SMALL = ClusterSettings(clusters_per_shard=4)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crawl")
    synth_crawl(out, pages=36, seed=3, per_shard=50, size=32, rates=NOISY)
    return out


def test_cluster_drops_exactly_the_synthetic_noise_with_its_reason(crawl, tmp_path):
    summary = cluster_crawl(crawl, tmp_path, SMALL)
    truth = {row["key"]: row for row in read_jsonl(crawl / "ground_truth.jsonl")}
    manifest = read_jsonl(tmp_path / "manifest.jsonl")
    assert [row["key"] for row in manifest] == sorted(truth), "the manifest has one line per crawled sample, in order"
    wrong = [(row["key"], truth[row["key"]]["noise"], truth[row["key"]]["expect"]["cluster"], row["reason"])
             for row in manifest if (row["reason"] or "kept") != truth[row["key"]]["expect"]["cluster"]]
    assert not wrong, f"(key, noise, expected, got) where cluster disagrees with the ground truth: {wrong}"
    reasons = {row["reason"] for row in manifest}
    for reason in ("corrupt image", "duplicate image", "cluster too small", "cluster too large"):
        assert reason in reasons, f"the test crawl should exercise {reason!r}; change its seed"
    assert any(r and r.startswith("missing field: ") for r in reasons)
    assert summary.kept == sum(row["kept"] for row in manifest) and summary.total == len(truth)


def test_cluster_shards_hold_each_kept_sample_once_with_its_caption(crawl, tmp_path):
    cluster_crawl(crawl, tmp_path, SMALL)
    kept = {row["key"]: row for row in read_jsonl(tmp_path / "manifest.jsonl") if row["kept"]}
    truth = {row["key"]: row for row in read_jsonl(crawl / "ground_truth.jsonl")}
    captions = {loc.key: read_members(loc)["txt"].decode() for shard in sorted(crawl.glob("*.tar"))
                for loc in sample_locations(shard)}
    seen = []
    for shard in sorted(tmp_path.glob("shard-*.tar")):
        for location in sample_locations(shard):
            members = read_members(location)
            meta = json.loads(members["json"])
            assert location.key == meta["cluster"] and 3 <= len(meta["images"]) <= 10
            assert sorted(members) == sorted(["json"] + [f"img{i}.jpg" for i in range(len(meta["images"]))])
            assert len({truth[image["key"]]["page"] for image in meta["images"]}) == 1, "a cluster is one page"
            for image in meta["images"]:
                row = kept[image["key"]]
                assert row["cluster"] == meta["cluster"] and row["out_shard"] == shard.name
                assert image["caption"] == captions[image["key"]]
            seen += [image["key"] for image in meta["images"]]
    assert sorted(seen) == sorted(kept), "every kept sample is in exactly one cluster sample"


@pytest.mark.parametrize("url, page", [
    ("https://www.Shop-1.example/item/7/?ref=feed-3#img2", "shop-1.example/item/7"),
    ("http://shop-1.example/item/7", "shop-1.example/item/7"),
    ("https://SHOP-1.EXAMPLE:443/item/7//", "shop-1.example/item/7"),
    ("https://shop-1.example:8080/item/7", "shop-1.example:8080/item/7"),
    ("https://shop-1.example/Item/7", "shop-1.example/Item/7"),  # paths are case-sensitive: kept
])
def test_page_urls_normalise_to_one_spelling(url, page):
    assert normalise_page_url(url) == page


def test_a_rerun_after_a_kill_writes_the_same_bytes(crawl, tmp_path, monkeypatch):
    whole = tmp_path / "unbroken"
    cluster_crawl(crawl, whole, SMALL)
    expected = folder_bytes(whole)
    assert len([name for name in expected if name.startswith("shard-")]) >= 3

    killed = tmp_path / "killed"
    run_killed(monkeypatch, cluster_stage, 6, lambda: cluster_crawl(crawl, killed, SMALL))
    assert sorted(p.name for p in killed.glob("shard-*")) == ["shard-000000.tar"], "only the whole shard is left"
    assert not (killed / "manifest.jsonl").exists()
    # what a SIGKILL leaves: a half-written .partial next to the whole shards, which the rerun must replace
    (killed / "shard-000001.tar.partial").write_bytes(b"half a tar")
    first = (killed / "shard-000000.tar").stat().st_mtime_ns
    cluster_crawl(crawl, killed, SMALL)
    assert (killed / "shard-000000.tar").stat().st_mtime_ns == first, "a whole shard is skipped, not rewritten"
    assert folder_bytes(killed) == expected

    for name in ("shard-000002.tar", "manifest.jsonl", "index/00001.tar.jsonl"):  # lost files are made again
        (killed / name).unlink()
    cluster_crawl(crawl, killed, SMALL)
    assert folder_bytes(killed) == expected


def test_two_workers_write_what_one_does(crawl, tmp_path):
    cluster_crawl(crawl, tmp_path / "one", SMALL, workers=1)
    cluster_crawl(crawl, tmp_path / "two", SMALL, workers=2)
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")
    synth_crawl(tmp_path / "crawl2", pages=36, seed=3, per_shard=50, size=32, rates=NOISY, workers=2)
    assert folder_bytes(tmp_path / "crawl2") == folder_bytes(crawl), "the crawl too is the same with 2 workers, and per seed"


def test_a_rerun_with_other_settings_is_refused_unless_overwritten(crawl, tmp_path):
    cluster_crawl(crawl, tmp_path, SMALL)
    with pytest.raises(FileExistsError, match="max_size.*--overwrite"):
        cluster_crawl(crawl, tmp_path, ClusterSettings(max_size=4, clusters_per_shard=4))
    summary = cluster_crawl(crawl, tmp_path, ClusterSettings(max_size=4, clusters_per_shard=4), overwrite=True)
    assert summary.dropped["cluster too large"] > 0
    manifest = read_jsonl(tmp_path / "manifest.jsonl")
    assert {p.name for p in tmp_path.glob("shard-*.tar")} == {r["out_shard"] for r in manifest if r["kept"]}


def test_whole_shard_leaves_no_shard_when_writing_fails(tmp_path):
    with pytest.raises(RuntimeError), whole_shard(tmp_path / "shard-000000.tar"):
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_prints_the_summary_and_explains_a_missing_input(crawl, tmp_path, capsys):
    main(["cluster", "--in", str(crawl), "--out", str(tmp_path / "c"), "--clusters-per-shard", "4"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("cluster: ") and " in → " in line and "corrupt image" in line
    with pytest.raises(SystemExit, match="synth-crawl --out"):
        main(["cluster", "--in", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="--min-size <= --max-size"):
        main(["cluster", "--in", str(crawl), "--out", str(tmp_path / "e"), "--min-size", "5", "--max-size", "4"])
