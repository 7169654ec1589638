"""The "your photos" workflow and its headless runner (scripts/run_workflow.py): the example demos are the
renders the script makes, the graph is filled by class and link (any number of demos), every error names its
node and fix, and against a real server the runner uploads, runs, follows and downloads without overwriting."""

from __future__ import annotations

import json
import re

import comfy_helpers as ch
import numpy as np
import pytest
import websocket
from PIL import Image

from scripts import run_workflow
from scripts.comfy_client import ServerError, execution_error_message, follow_progress, rejection_message
from scripts.make_example_demos import example_demo_paths, example_demos
from scripts.workflow_graph import GraphError, fill_workflow

API_DIR = ch.PACK_ROOT / "workflows" / "api"
YOUR_PHOTOS = API_DIR / "suti_your_photos.json"


def _graph(name: str = "suti_your_photos") -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


def _batched_images(graph: dict, node_id: str) -> list[str]:
    """The Load Image file names a Batch Images chain ending at `node_id` yields, in batch order."""
    node = graph[node_id]
    if node["class_type"] == "LoadImage":
        return [node["inputs"]["image"]]
    return _batched_images(graph, node["inputs"]["image1"][0]) + _batched_images(graph, node["inputs"]["image2"][0])


def _of_class(graph: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in graph.items() if node["class_type"] == class_type]


# ---------------------------------------------------------------- the shipped graph and its demos


def test_example_demos_are_the_scripts_renders_with_the_graphs_captions():
    demos = example_demos()
    for path, pixels in zip(example_demo_paths(), demos.images, strict=True):
        assert path.is_file(), f"{path} is missing: run `python -m scripts.make_example_demos`"
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), pixels), (
            f"{path.name} differs from its render: run `python -m scripts.make_example_demos`"
        )
    graph = _graph()
    (demos_node,) = _of_class(graph, "SuTIDemonstrations")
    assert _batched_images(graph, graph[demos_node]["inputs"]["images"][0]) == [p.name for p in example_demo_paths()]
    assert graph[demos_node]["inputs"]["captions"].splitlines() == demos.captions


def test_example_demos_stay_small():
    total = sum(p.stat().st_size for p in example_demo_paths())
    assert total < 100_000, f"example demos take {total} bytes; keep the shipped PNGs under 100 KB"


def test_shipped_graph_is_training_free():
    graph = _graph()
    assert not _of_class(graph, "SuTILoadAdapter")
    (apply,) = _of_class(graph, "SuTIApply")
    assert "adapter" not in graph[apply]["inputs"], "suti_your_photos must run without an adapter (training-free)"


# ---------------------------------------------------------------- filling a graph (no server)


@pytest.mark.parametrize("count", [1, 3, 5])
def test_fill_workflow_loads_each_demo_in_order_and_sets_captions_prompt_seed(count):
    graph = _graph()
    names = [f"suti_demos/photo_{i}.png" for i in range(count)]
    captions = [f"a photo of my dog number {i}" for i in range(count)]
    filled = fill_workflow(graph, names, captions, "a photo of my dog in the snow", 1234)
    assert graph == _graph(), "fill_workflow changed its input graph"
    (demos,) = _of_class(filled, "SuTIDemonstrations")
    assert _batched_images(filled, filled[demos]["inputs"]["images"][0]) == names
    assert len(_of_class(filled, "LoadImage")) == count, "the shipped Load Image nodes were not all replaced"
    assert len(_of_class(filled, "ImageBatch")) == count - 1, "stale Batch Images nodes left in the graph"
    assert filled[demos]["inputs"]["captions"] == "\n".join(captions)
    assert filled["12"]["inputs"]["seed"] == 1234
    assert filled["9"]["inputs"]["text"] == "a photo of my dog in the snow"
    assert filled["10"]["inputs"]["text"] == "", "the negative prompt must stay as it is"


def test_fill_workflow_relinks_other_readers_of_the_demo_batch():
    graph = _graph()
    graph["50"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "demos"}}
    filled = fill_workflow(graph, ["a.png", "b.png"], ["a dog", "a dog"], "a dog", 0)
    assert _batched_images(filled, filled["50"]["inputs"]["images"][0]) == ["a.png", "b.png"]
    assert not {"2", "3", "4", "5", "6"} & set(filled)


def _rename_class(graph: dict, old: str, new: str) -> dict:
    for node in graph.values():
        if node["class_type"] == old:
            node["class_type"] = new
    return graph


def _second_sampler(graph: dict) -> dict:
    graph["99"] = json.loads(json.dumps(graph["12"]))
    return graph


def _positive_from_combine(graph: dict) -> dict:
    combine = {"conditioning_1": ["9", 0], "conditioning_2": ["9", 0]}
    graph["20"] = {"class_type": "ConditioningCombine", "inputs": combine}
    graph["12"]["inputs"]["positive"] = ["20", 0]
    return graph


def _unlinked_images(graph: dict) -> dict:
    del graph["7"]["inputs"]["images"]
    return graph


# (graph change, demo names, what the message must say)
BAD_GRAPHS = {
    "no demonstrations node": (lambda g: _rename_class(g, "SuTIDemonstrations", "Other"), ["a.png"],
                               ["no SuTIDemonstrations node", "suti_your_photos.json"]),
    "two samplers": (_second_sampler, ["a.png"], ["2 KSampler or KSamplerAdvanced nodes (12, 99)", "keep one"]),
    "no sampler": (lambda g: _rename_class(g, "KSampler", "SamplerCustom"), ["a.png"], ["no KSampler"]),
    "positive not a text encode": (_positive_from_combine, ["a.png"],
                                   ["node 20 (ConditioningCombine)", "CLIP Text Encode"]),
    "images not connected": (_unlinked_images, ["a.png"], ["images input of node 7", "not connected", "LoadImage"]),
    "images from another node": (lambda g: _rename_class(g, "ImageBatch", "ImageScale"), ["a.png"],
                                 ['pass through node 6 (ImageScale "Batch demos 1-3")', "Load Image"]),
    "no demo images": (lambda g: g, [], ["no demo images"]),
}


@pytest.mark.parametrize("case", BAD_GRAPHS)
def test_fill_workflow_error_names_the_node_and_the_fix(case):
    change, names, expected = BAD_GRAPHS[case]
    with pytest.raises(GraphError) as err:
        fill_workflow(change(_graph()), names, ["a dog"] * len(names), "a dog", 0)
    missing = [text for text in expected if text not in str(err.value)]
    assert not missing, f"{case}: message lacks {missing}: {err.value}"


def test_a_graph_built_from_toy_demos_is_refused_before_anything_is_uploaded():
    with pytest.raises(GraphError, match="SuTIToySubject"):
        fill_workflow(_graph("suti_basic"), ["a.png"], ["a dog"], "a dog", 0)


# ---------------------------------------------------------------- server messages (no server)


def test_rejection_message_lists_every_node_error_with_its_title():
    body = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
        "node_errors": {
            "12": {"class_type": "KSampler",
                   "errors": [{"message": "Value -1 smaller than min of 0", "details": "seed"}]},
            "15": {"class_type": "LoadImage", "errors": [{"message": "Custom validation failed for node",
                                                          "details": "image - Invalid image file: x.png"}]},
        },
    }
    text = rejection_message(body, _graph())
    assert text.splitlines() == [
        "ComfyUI rejected the graph: Prompt outputs failed validation",
        '  node 12 (KSampler "KSampler"): Value -1 smaller than min of 0: seed',
        "  node 15 (LoadImage): Custom validation failed for node: image - Invalid image file: x.png",
    ]


def test_execution_error_message_names_node_and_exception():
    data = {"node_id": "7", "node_type": "SuTIDemonstrations", "exception_type": "ValueError",
            "exception_message": "caption 2 of 3 is empty\n"}
    text = execution_error_message(data, _graph())
    assert text.startswith('node 7 (SuTIDemonstrations "SuTI Demonstrations: one caption per demo')
    assert "ValueError: caption 2 of 3 is empty" in text and "ComfyUI console" in text


class FakeSocket:
    """Replays websocket messages (dicts are sent as JSON text); an exception in the list is raised."""

    def __init__(self, messages: list):
        self.messages = list(messages)

    def recv(self):
        message = self.messages.pop(0)
        if isinstance(message, Exception):
            raise message
        return json.dumps(message) if isinstance(message, dict) else message

    def gettimeout(self) -> float:
        return 5.0


def _event(kind: str, prompt_id: str = "p1", **data) -> dict:
    return {"type": kind, "data": {"prompt_id": prompt_id, **data}}


def test_follow_progress_prints_this_runs_nodes_and_steps_until_it_ends(capsys):
    ws = FakeSocket([
        {"type": "status", "data": {"status": {}}},
        _event("executing", "other", node="3"),
        _event("execution_cached", nodes=["1", "9"]),
        _event("executing", node="12"),
        b"\x00\x00\x00\x01preview",
        _event("progress", node="12", value=1, max=16),
        _event("execution_success"),
        _event("executing", node=None),
    ])
    follow_progress(ws, "p1", _graph())
    assert capsys.readouterr().out.splitlines() == [
        "cached (unchanged since an earlier run): nodes 1, 9",
        'running node 12 (KSampler "KSampler")',
        '  node 12 (KSampler "KSampler"): step 1/16',
    ]
    assert not ws.messages


@pytest.mark.parametrize(
    "message, expected",
    [
        (_event("execution_error", node_id="12", node_type="KSampler", exception_type="RuntimeError",
                exception_message="boom"), 'node 12 (KSampler "KSampler") failed: RuntimeError: boom'),
        (_event("execution_interrupted"), "interrupted"),
        (websocket.WebSocketTimeoutException(), "raise --timeout"),
        (websocket.WebSocketConnectionClosedException(), "closed the connection"),
    ],
    ids=["node error", "interrupted", "timeout", "connection closed"],
)
def test_follow_progress_raises_what_went_wrong(message, expected):
    with pytest.raises(ServerError, match=re.escape(expected)):
        follow_progress(FakeSocket([message]), "p1", _graph())


# ---------------------------------------------------------------- the command line (no server)


def _args(tmp_path, *extra: str, demos: int = 3) -> list[str]:
    args = [arg for path in example_demo_paths()[:demos] for arg in ("--demo", str(path))]
    prompt = "a photo of a large dog on the beach in the center"
    return args + ["--prompt", prompt, "--out", str(tmp_path / "out"), *extra]


def _captions(count: int = 3) -> list[str]:
    return [arg for caption in example_demos().captions[:count] for arg in ("--caption", caption)]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--caption", "a dog"], "got 3 --demo but 1 --caption"),
        (["--caption", "a dog", "--caption", "a\ndog", "--caption", "a dog"], "--caption 2 must be one non-empty line"),
        (["--caption", "a dog", "--caption", "a dog", "--caption", "  "], "--caption 3 must be one non-empty line"),
        (["--demo", "missing.png", *(["--caption", "a dog"] * 4)], "no such file: missing.png"),
    ],
    ids=["caption count", "caption with a line break", "empty caption", "missing demo"],
)
def test_command_line_errors_say_what_to_give(tmp_path, capsys, extra, expected):
    with pytest.raises(SystemExit) as exit_info:
        run_workflow.parse_args(_args(tmp_path, *extra))
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_unreachable_server_says_to_start_comfyui_and_names_the_url(tmp_path, capsys):
    url = f"http://127.0.0.1:{ch.free_port()}"
    assert run_workflow.main(_args(tmp_path, "--server", url, *_captions())) == 1
    err = capsys.readouterr().err
    assert f"no ComfyUI server answers at {url}" in err and "start ComfyUI" in err
    assert not (tmp_path / "out").exists()


class FakeClient:
    def image_bytes(self, image: dict) -> bytes:
        return f"new {image['filename']}".encode()


def test_download_refuses_to_overwrite_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"mine")
    images = [{"filename": "a.png", "subfolder": "", "type": "output"}, {"filename": "b.png", "type": "output"}]
    with pytest.raises(FileExistsError, match="already holds b.png; nothing was written. Pass --overwrite"):
        run_workflow.download_images(FakeClient(), images, out, overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["b.png"] and (out / "b.png").read_bytes() == b"mine"
    written = run_workflow.download_images(FakeClient(), images, out, overwrite=True)
    assert [p.read_bytes() for p in written] == [b"new a.png", b"new b.png"]


def test_download_of_a_run_without_saved_images_says_why(tmp_path):
    with pytest.raises(ServerError, match="needs a Save Image node"):
        run_workflow.download_images(FakeClient(), [], tmp_path, overwrite=False)


# ---------------------------------------------------------------- against a real server


@pytest.mark.slow
def test_runner_uploads_runs_and_downloads_the_images(comfy_server, tmp_path, capsys):
    assert run_workflow.main(_args(tmp_path, "--server", comfy_server.url, "--seed", "11", *_captions())) == 0, (
        capsys.readouterr().err
    )
    out = capsys.readouterr().out
    assert "running node 7 (SuTIDemonstrations" in out and "step 16/16" in out, out
    written = sorted((tmp_path / "out").glob("*.png"))
    assert len(written) == 3, written  # the graph's batch of 3
    assert not ch.blank_images(written), f"blank images: {ch.blank_images(written)}"
    uploaded = sorted(p.name for p in (comfy_server.base_dir / "input" / run_workflow.UPLOAD_SUBFOLDER).iterdir())
    assert uploaded == [p.name for p in example_demo_paths()]

    before = {p: p.read_bytes() for p in written}  # the same run again (cached): nothing may be replaced
    assert run_workflow.main(_args(tmp_path, "--server", comfy_server.url, "--seed", "11", *_captions())) == 1
    assert "Pass --overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted((tmp_path / "out").glob("*.png"))} == before


@pytest.mark.slow
def test_runner_prints_the_servers_validation_errors(comfy_server, tmp_path, capsys):
    assert run_workflow.main(_args(tmp_path, "--server", comfy_server.url, "--seed", "-1", *_captions())) == 1
    err = capsys.readouterr().err
    assert "ComfyUI rejected the graph" in err and 'node 12 (KSampler "KSampler")' in err and "seed" in err, err
