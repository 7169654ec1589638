"""The data pipeline of issue 13: crawled image–text pairs in, apprenticeship training data out, one resumable
stage per module, each run as `python -m training.data <stage> --in DIR --out DIR`.

Built: `synth-crawl` (a synthetic img2dataset crawl with known noise, `crawl.py`), `cluster` (subject clusters by
source page, `cluster.py`), `clip-filter` (open_clip image–image and image–text scores, `clip_filter.py`),
`prompts` (new-context prompts by skill, `prompts.py`), `experts` (a DreamBooth expert per cluster renders its
prompts, `experts.py`), `filter` (the toy world's render filter network, or on real data an open_clip model's
subject and text scores, keeps or drops each render, `filter_renders.py`),
`recaption` (a local transformers captioner or an external command replaces the alt text, `recaption.py`,
`captioners.py`; `toy_captioner.py` for the toy world) and `pack` (the kept renders as the adapter trainer's
`--shards`, `pack.py`).
`--workers N` runs a stage's tasks in N local processes; `--ray` (a local Ray) or `--ray-address ADDR` (a
cluster) runs them as Ray tasks (`pip install -e ".[ray]"`), with the same outputs byte for byte.
Every stage writes WebDataset shards (whole or `.partial`), a JSONL manifest with each input sample's fate and
reason, a summary (in → kept → dropped by reason) and the settings a rerun must match to resume.
"""
