"""Build UI-format (litegraph 0.4) workflows from the API-format graphs in workflows/api/.

ComfyUI's template browser serves `workflows/*.json` and loads them into the editor, which needs the
UI format; the API graphs in workflows/api/ are the source of truth. Node schemas come from
/object_info: a live server (`--server`, which also refreshes the snapshot) or the saved snapshot
scripts/workflow_object_info.json (the default, so the output is reproducible offline).

    python -m scripts.build_ui_workflows                          # rebuild from the snapshot
    python -m scripts.build_ui_workflows --server http://127.0.0.1:8188
    python -m scripts.build_ui_workflows --check                  # exit 1 if a UI file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
API_DIR = ROOT / "workflows" / "api"
UI_DIR = ROOT / "workflows"
SNAPSHOT = ROOT / "scripts" / "workflow_object_info.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}  # the frontend draws a widget for these
CONTROL_AFTER_GENERATE = "fixed"  # shipped seeds stay as written
UPLOAD_BUTTON = "image"  # the value the frontend saves for the upload button after an image_upload combo
NODE_WIDTH, COLUMN_GAP, ROW_GAP = 320, 60, 40  # px; a gap also clears the next node's title bar (30 px)
# The frontend (1.27) grows a node to fit what it draws: image_upload nodes get a preview widget of
# minHeight 220 below their upload button, and a title wider than the node widens it (litegraph's
# computeSize: 30 px left + text at 14 px + 10 px right). Estimates err on the large side: the frontend
# keeps a saved size that is larger than its own.
IMAGE_PREVIEW_HEIGHT, TITLE_HEIGHT = 220, 30
TITLE_PAD, TITLE_CHAR_WIDTH = 40, 8  # 8 px/char bounds a 14 px proportional font's average (measured ~7)
SCHEMA_KEYS = ("input", "input_order", "output", "output_name", "display_name")  # what the snapshot keeps


# ---------------------------------------------------------------- schemas


def spec_type(spec: list) -> str:
    """Socket type of an /object_info input spec; list-form combos are 'COMBO'."""
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def spec_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: list) -> bool:
    return spec_type(spec) in WIDGET_TYPES and not spec_options(spec).get("forceInput")


def ordered_inputs(schema: dict) -> list[tuple[str, list]]:
    """(name, spec) of required then optional inputs, in the schema's input_order (the frontend's order)."""
    out = []
    for section in ("required", "optional"):
        specs = schema["input"].get(section, {})
        order = schema.get("input_order", {}).get(section, list(specs))
        out += [(name, specs[name]) for name in order if name in specs]
    return out


def has_control_widget(name: str, spec: list) -> bool:
    """The frontend adds a control_after_generate combo after flagged INTs and INTs named seed/noise_seed."""
    flag = spec_options(spec).get("control_after_generate")
    return bool(flag) if flag is not None else spec_type(spec) == "INT" and name in ("seed", "noise_seed")


def default_value(spec: list):
    options = spec_options(spec)
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options") or [None]
    return choices[0]


def trim_object_info(object_info: dict, node_types: set[str]) -> dict:
    """The schema fields the generator reads, for the node types used, minus tooltips (the snapshot)."""
    missing = node_types - set(object_info)
    if missing:
        raise KeyError(f"/object_info lacks node types {sorted(missing)}: is the pack loaded?")
    trimmed = {}
    for node_type in sorted(node_types):
        schema = {key: object_info[node_type][key] for key in SCHEMA_KEYS if key in object_info[node_type]}
        schema["input"] = {
            section: {name: [spec[0], _strip_tooltip(spec_options(spec))] for name, spec in specs.items()}
            for section, specs in schema["input"].items()
            if section in ("required", "optional")
        }
        trimmed[node_type] = schema
    return trimmed


def _strip_tooltip(options: dict) -> dict:
    return {key: value for key, value in options.items() if key != "tooltip"}


# ---------------------------------------------------------------- layout


def graph_edges(api: dict) -> list[tuple[str, int, str, str]]:
    """(source id, source slot, target id, input name) of every link in an API graph."""
    return [
        (value[0], value[1], node_id, name)
        for node_id, node in api.items()
        for name, value in node["inputs"].items()
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
    ]


def columns(api: dict) -> dict[str, int]:
    """Column = longest path from a source; sources sit just left of their first consumer."""
    edges = graph_edges(api)
    depth = {node_id: 0 for node_id in api}
    for _ in api:  # relax; a DAG settles within len(api) passes
        for src, _slot, dst, _name in edges:
            depth[dst] = max(depth[dst], depth[src] + 1)
    for node_id in api:
        consumers = [depth[dst] for src, _s, dst, _n in edges if src == node_id]
        if consumers and not any(dst == node_id for _s, _sl, dst, _n in edges):
            depth[node_id] = min(consumers) - 1
    return depth


def estimated_height(schema: dict, n_sockets: int) -> int:
    """Litegraph node height (size[1]; the title bar sits above it): sockets, widgets, multiline text, image previews."""
    widgets = [spec for name, spec in ordered_inputs(schema) if is_widget(spec)]
    tall = sum(1 for spec in widgets if spec_options(spec).get("multiline"))
    uploads = sum(1 for spec in widgets if spec_options(spec).get("image_upload"))  # upload button + preview
    rows = 22 * max(n_sockets, len(schema["output"]), 1) + 26 * (len(widgets) - tall + uploads) + 90 * tall
    return 30 + rows + IMAGE_PREVIEW_HEIGHT * uploads


def estimated_width(title: str) -> int:
    """Node width: NODE_WIDTH, or wider where the title needs it (rounded up to 10 px)."""
    return max(NODE_WIDTH, -(-(TITLE_PAD + TITLE_CHAR_WIDTH * len(title)) // 10) * 10)


def node_boxes(ui: dict) -> list[tuple[str, float, float, float, float]]:
    """(name, x, y, w, h) of each node of a UI workflow with its title bar, as litegraph's boundingRect."""
    return [
        (node.get("title") or node["type"], node["pos"][0], node["pos"][1] - TITLE_HEIGHT,
         node["size"][0], node["size"][1] + TITLE_HEIGHT)
        for node in ui["nodes"]
    ]


def overlapping_boxes(boxes: list, min_overlap: float = 0.0) -> list[str]:
    """Pairs of (name, x, y, w, h) boxes that overlap by more than `min_overlap` px both ways."""
    pairs = []
    for i, (name_a, xa, ya, wa, ha) in enumerate(boxes):
        for name_b, xb, yb, wb, hb in boxes[i + 1:]:
            dx, dy = min(xa + wa, xb + wb) - max(xa, xb), min(ya + ha, yb + hb) - max(ya, yb)
            if dx > min_overlap and dy > min_overlap:
                pairs.append(f"nodes overlap: {name_a!r} and {name_b!r} ({dx:.0f} x {dy:.0f} px)")
    return pairs


# ---------------------------------------------------------------- conversion


def api_to_ui(api: dict, object_info: dict, name: str) -> dict:
    """A UI-format (litegraph 0.4) workflow with the same nodes, links and widget values as `api`."""
    if not all(node_id.isdigit() for node_id in api):
        raise ValueError(f"{name}: UI node ids are integers; renumber the API graph's ids {sorted(api)}")
    ids = {node_id: int(node_id) for node_id in api}
    links, out_links, in_link = [], {}, {}
    for link_id, (src, slot, dst, input_name) in enumerate(sorted(graph_edges(api), key=_edge_key), start=1):
        link_type = object_info[api[src]["class_type"]]["output"][slot]
        links.append([link_id, ids[src], slot, ids[dst], None, link_type])  # target slot filled below
        out_links.setdefault((src, slot), []).append(link_id)
        in_link[(dst, input_name)] = links[-1]
    nodes = [_ui_node(node_id, api[node_id], object_info, in_link, out_links) for node_id in _topo_order(api)]
    _place(nodes, api, object_info)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-suti/workflows/{name}")),
        "revision": 0,
        "last_node_id": max(ids.values()),
        "last_link_id": len(links),
        "nodes": sorted(nodes, key=lambda n: n["id"]),
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": 0.4,
    }


def _edge_key(edge: tuple) -> tuple:
    src, slot, dst, name = edge
    return int(dst), name, int(src), slot


def _topo_order(api: dict) -> list[str]:
    depth = columns(api)
    return sorted(api, key=lambda node_id: (depth[node_id], int(node_id)))


def _ui_node(node_id: str, node: dict, object_info: dict, in_link: dict, out_links: dict) -> dict:
    schema = object_info[node["class_type"]]
    inputs, widgets = [], []
    for name, spec in ordered_inputs(schema):
        link = in_link.get((node_id, name))
        if is_widget(spec):
            value = node["inputs"].get(name, default_value(spec))
            widgets.append(default_value(spec) if link else value)
            if has_control_widget(name, spec):
                widgets.append(CONTROL_AFTER_GENERATE)
            if spec_options(spec).get("image_upload"):
                widgets.append(UPLOAD_BUTTON)
            if not link:
                continue
        if link:
            link[4] = len(inputs)  # the target slot is the index in the node's inputs list
        entry = {"name": name, "type": spec_type(spec), "link": link[0] if link else None}
        if is_widget(spec):
            entry["widget"] = {"name": name}
        inputs.append(entry)
    outputs = [
        {"name": out_name, "type": out_type, "links": out_links.get((node_id, slot), [])}
        for slot, (out_type, out_name) in enumerate(zip(schema["output"], schema["output_name"]))
    ]
    ui = {"id": int(node_id), "type": node["class_type"], "pos": [0, 0], "size": [NODE_WIDTH, 0], "flags": {}}
    ui.update(order=0, mode=0, inputs=inputs, outputs=outputs)
    ui["properties"] = {"Node name for S&R": node["class_type"]}
    ui["widgets_values"] = widgets
    title = node.get("_meta", {}).get("title")
    if title and title != schema.get("display_name"):
        ui["title"] = title
    return ui


def _place(nodes: list[dict], api: dict, object_info: dict) -> None:
    """Columns by graph depth, rows in id order; a node drops level with its highest source one column left."""
    depth = columns(api)
    sources = {int(dst): [int(src) for src, _s, d, _n in graph_edges(api) if d == dst] for dst in api}
    for order, node in enumerate(nodes):  # nodes come in topological order
        node["order"] = order
        schema = object_info[node["type"]]
        sockets = sum(1 for i in node["inputs"] if "widget" not in i)
        title = node.get("title") or schema.get("display_name") or node["type"]
        node["size"] = [estimated_width(title), estimated_height(schema, sockets)]
    y_of: dict[int, int] = {}
    x = 0
    for column in sorted(set(depth.values())):
        in_column = sorted((n for n in nodes if depth[str(n["id"])] == column), key=lambda n: n["id"])
        y = 0
        for node in in_column:
            left = [y_of[s] for s in sources[node["id"]] if depth[str(s)] == column - 1]
            node["pos"] = [x, max(y, min(left, default=0))]
            y_of[node["id"]] = node["pos"][1]
            y = node["pos"][1] + node["size"][1] + ROW_GAP
        x += max(n["size"][0] for n in in_column) + COLUMN_GAP


# ---------------------------------------------------------------- files


def load_object_info(server: str | None, refresh_snapshot: bool = True) -> dict:
    """/object_info from a live server (refreshing the snapshot unless told not to), else the snapshot."""
    if server is None:
        return json.loads(SNAPSHOT.read_text())
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=60) as resp:
        live = json.loads(resp.read())
    if refresh_snapshot:
        SNAPSHOT.write_text(dumps(trim_object_info(live, used_node_types())))
    return live


def used_node_types() -> set[str]:
    return {node["class_type"] for path in sorted(API_DIR.glob("*.json")) for node in _read(path).values()}


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def dumps(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def build_all(object_info: dict) -> dict[Path, str]:
    """UI file path -> its text, for every API graph in workflows/api/."""
    return {
        UI_DIR / path.name: dumps(api_to_ui(_read(path), object_info, path.stem))
        for path in sorted(API_DIR.glob("*.json"))
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="ComfyUI URL to read /object_info from (refreshes the snapshot)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a UI file is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in build_all(load_object_info(args.server, refresh_snapshot=not args.check)).items():
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text)
    verb = "stale" if args.check else "wrote"
    for path in stale:
        print(f"{verb}: {path.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
