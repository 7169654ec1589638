"""The UI-format workflows in workflows/ (what ComfyUI's template browser serves) are generated from the
API graphs in workflows/api/ and cannot drift: regenerating from the saved /object_info snapshot gives
the committed files, comfy-cli converts each back to exactly its API graph, and the snapshot still
matches what a live server reports for the nodes used."""

from __future__ import annotations

import importlib.util
import json

import comfy_helpers as ch
import pytest

REFRESH = "run `python -m scripts.build_ui_workflows --server URL` against a ComfyUI with this pack"


def _load_builder():
    path = ch.PACK_ROOT / "scripts" / "build_ui_workflows.py"
    spec = importlib.util.spec_from_file_location("suti_build_ui_workflows", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()
API_GRAPHS = sorted(builder.API_DIR.glob("*.json"))


def _api_ids(paths):
    return [p.name for p in paths] or None


def _snapshot() -> dict:
    return json.loads(builder.SNAPSHOT.read_text())


def test_every_api_graph_has_a_ui_workflow_and_templates_are_ui_format():
    assert API_GRAPHS, "no API-format graph in workflows/api/"
    top_level = sorted(builder.UI_DIR.glob("*.json"))
    api_at_top = [p.name for p in top_level if ch.api_format(json.loads(p.read_text()))]
    assert not api_at_top, f"API-format graphs belong in workflows/api/, not the template folder: {api_at_top}"
    missing = sorted({p.name for p in API_GRAPHS} - {p.name for p in top_level})
    assert not missing, f"no UI workflow for workflows/api/{missing}: {REFRESH} (or without --server)"


def test_ui_workflows_are_up_to_date_with_the_generator():
    stale = [
        str(path.relative_to(ch.PACK_ROOT))
        for path, text in builder.build_all(_snapshot()).items()
        if not path.is_file() or path.read_text() != text
    ]
    assert not stale, f"{stale} differ from their API graphs: run `python -m scripts.build_ui_workflows`"


@pytest.mark.parametrize("api_path", API_GRAPHS, ids=_api_ids(API_GRAPHS))
def test_ui_workflow_converts_back_to_its_api_graph(api_path):
    """comfy-cli's UI -> API conversion (what `comfy run` does) gives the API graph: nodes, links, widgets, titles."""
    workflow_to_api = pytest.importorskip("comfy_cli.workflow_to_api", reason="comfy-cli not installed")
    ui = json.loads((builder.UI_DIR / api_path.name).read_text())
    converted = workflow_to_api.convert_ui_to_api(ui, _snapshot())
    assert converted == json.loads(api_path.read_text())


@pytest.mark.parametrize("api_path", API_GRAPHS, ids=_api_ids(API_GRAPHS))
def test_ui_workflow_layout_has_no_overlapping_nodes(api_path):
    """The generated boxes (title bar included) are apart; the browser test checks them as the front end draws them."""
    ui = json.loads((builder.UI_DIR / api_path.name).read_text())
    overlaps = builder.overlapping_boxes(builder.node_boxes(ui))
    assert not overlaps, f"{api_path.name}: {overlaps}; fix the size estimates in scripts/build_ui_workflows.py"


@pytest.mark.parametrize("api_path", API_GRAPHS, ids=_api_ids(API_GRAPHS))
def test_every_ui_workflow_has_a_template_thumbnail(api_path):
    """The template browser shows workflows/<name>.jpg on each card: a small square JPEG."""
    from PIL import Image

    path = builder.UI_DIR / f"{api_path.stem}.jpg"
    assert path.is_file(), f"no {path.name}: run `python -m scripts.gallery --thumbnails`"
    with Image.open(path) as image:
        assert (image.format, image.width == image.height) == ("JPEG", True), f"{path.name}: {image.format} {image.size}"
    assert path.stat().st_size <= 40_000, f"{path.name} is {path.stat().st_size} bytes (at most 40 KB)"


def _signature(object_info: dict, node_types: set[str]) -> dict:
    """What the generator's output depends on; combo option lists (model files, samplers) left out."""
    trimmed = builder.trim_object_info(object_info, node_types)
    for schema in trimmed.values():
        for specs in schema["input"].values():
            for name, spec in specs.items():
                options = {k: v for k, v in builder.spec_options(spec).items() if k != "options"}
                specs[name] = [builder.spec_type(spec), options, builder.default_value(spec)]
    return trimmed


@pytest.mark.slow
def test_object_info_snapshot_matches_the_live_server(comfy_server):
    live = comfy_server.get_json("/object_info")
    used = builder.used_node_types()
    assert _signature(live, used) == _signature(_snapshot(), used), f"node schemas changed: {REFRESH}"


@pytest.mark.slow
@pytest.mark.parametrize("api_path", API_GRAPHS, ids=_api_ids(API_GRAPHS))
def test_server_lists_and_serves_the_ui_workflow(comfy_server, api_path):
    """/workflow_templates lists it under the pack; the served file converts to the API graph with live schemas."""
    workflow_to_api = pytest.importorskip("comfy_cli.workflow_to_api", reason="comfy-cli not installed")
    templates = comfy_server.get_json("/workflow_templates")
    assert api_path.stem in templates.get(ch.PACK_DIR_NAME, []), f"/workflow_templates: {templates}"
    served = comfy_server.get_json(f"/api/workflow_templates/{ch.PACK_DIR_NAME}/{api_path.name}")
    converted = workflow_to_api.convert_ui_to_api(served, comfy_server.get_json("/object_info"))
    assert converted == json.loads(api_path.read_text())
