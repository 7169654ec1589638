"""The data pipeline of issue 13: crawled image–text pairs in, apprenticeship training data out, one resumable
stage per module, each run as `python -m training.data <stage> --in DIR --out DIR`.

Built: `synth-crawl` (a synthetic img2dataset crawl with known noise, `crawl.py`), `cluster` (subject clusters by
source page, `cluster.py`), `clip-filter` (open_clip image–image and image–text scores, `clip_filter.py`) and
`prompts` (new-context prompts by skill, `prompts.py`). Not yet: recaption, experts, filter, pack, Ray scale-out.
Every stage writes WebDataset shards (whole or `.partial`), a JSONL manifest with each input sample's fate and
reason, a summary (in → kept → dropped by reason) and the settings a rerun must match to resume.
"""
