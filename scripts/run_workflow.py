"""Run a SuTI workflow headless on a running ComfyUI server, with your own demo photos.

    python -m scripts.run_workflow --server http://127.0.0.1:8188 \\
        --demo dog1.jpg --demo dog2.jpg --demo dog3.jpg \\
        --caption "a photo of my dog on the grass" --caption "a photo of my dog on a sofa" \\
        --caption "a photo of my dog at the beach" \\
        --prompt "a photo of my dog in the snow" --seed 7 --out output/my_dog

Uploads the demos (POST /upload/image), writes them, the captions (one per demo, same order), the prompt and
the seed into the API graph (default workflows/api/suti_your_photos.json; scripts/workflow_graph.py says what
a graph needs), queues it with /prompt, prints its progress from the websocket and downloads the saved
images into --out. Files already in --out are never replaced unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

from .comfy_client import ComfyClient, ServerError, follow_progress
from .workflow_graph import EXAMPLE_GRAPH, GraphError, fill_workflow

ROOT = Path(__file__).resolve().parent.parent
UPLOAD_SUBFOLDER = "suti_demos"  # in the server's input folder, so uploads stay apart from other inputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL (default %(default)s)")
    parser.add_argument("--workflow", type=Path, default=ROOT / EXAMPLE_GRAPH, help="API-format graph to run")
    parser.add_argument("--demo", type=Path, action="append", required=True, help="a demo photo (repeat, 3-5 typical)")
    parser.add_argument("--caption", action="append", required=True, help="the caption of each --demo, in order")
    parser.add_argument("--prompt", required=True, help="what to draw, naming the subject as the captions do")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed (default %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="folder to download the images into")
    parser.add_argument("--overwrite", action="store_true", help="replace files of the same name in --out")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait without news of the run")
    args = parser.parse_args(argv)
    if len(args.caption) != len(args.demo):
        parser.error(f"got {len(args.demo)} --demo but {len(args.caption)} --caption: give one caption per demo, "
                     "in the same order")
    for number, caption in enumerate(args.caption, start=1):
        if not caption.strip() or len(caption.splitlines()) > 1:
            parser.error(f"--caption {number} must be one non-empty line (SuTI Demonstrations reads one caption per "
                         f"line): describe demo {number}, e.g. 'a photo of my dog on the grass'")
    for path in [*args.demo, args.workflow]:
        if not path.is_file():
            parser.error(f"no such file: {path}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder")
    if "://" not in args.server:
        args.server = "http://" + args.server
    return args


def run(args: argparse.Namespace) -> list[Path]:
    """Upload, fill, queue, follow, download; the paths written."""
    graph = json.loads(args.workflow.read_text())
    fill_workflow(graph, [p.name for p in args.demo], args.caption, args.prompt, args.seed)  # fail before uploading
    client = ComfyClient(args.server)
    names = [client.upload_image(path, UPLOAD_SUBFOLDER) for path in args.demo]
    graph = fill_workflow(graph, names, args.caption, args.prompt, args.seed)
    client_id = uuid.uuid4().hex
    with client.progress_socket(client_id, args.timeout) as ws:  # open before queueing: no message is missed
        prompt_id = client.queue(graph, client_id)
        print(f"queued prompt {prompt_id} on {args.server}", flush=True)
        follow_progress(ws, prompt_id, graph)
    return download_images(client, client.saved_images(prompt_id), args.out, args.overwrite)


def download_images(client: ComfyClient, images: list[dict], out: Path, overwrite: bool) -> list[Path]:
    """Write each saved image to out/<its file name>; refuse (writing nothing) if one exists, unless `overwrite`."""
    if not images:
        raise ServerError("the run finished but saved no image: the graph needs a Save Image node")
    targets = [out / image["filename"] for image in images]
    taken = [target.name for target in targets if target.exists()]
    if taken and not overwrite:
        raise FileExistsError(
            f"{out} already holds {', '.join(taken)}; nothing was written. Pass --overwrite to replace them or "
            "choose another --out (this run's images stay in the server's output folder)"
        )
    out.mkdir(parents=True, exist_ok=True)
    for target, image in zip(targets, images):
        target.write_bytes(client.image_bytes(image))
    return targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        written = run(args)
    except (GraphError, ServerError, FileExistsError) as err:
        print(f"run_workflow: error: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
