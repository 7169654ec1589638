"""The data pipeline of issue 13: crawled image–text pairs in, apprenticeship training data out, one resumable
stage per module, each run as `python -m training.data <stage> --in DIR --out DIR`.

Built: `synth-crawl` (a synthetic img2dataset crawl with known noise, `crawl.py`) and `cluster` (subject clusters by
source page, `cluster.py`). Not yet: clip-filter, recaption, prompts, experts, filter, pack, and Ray scale-out.
Every stage writes WebDataset shards (whole or `.partial`), a JSONL manifest with each input sample's fate and
reason, a summary (in → kept → dropped by reason) and the settings a rerun must match to resume.
"""
