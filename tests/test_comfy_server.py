"""The pack inside a real ComfyUI server (main.py --cpu): it imports cleanly, /object_info lists every
node it registers with its inputs, and API-format graphs run to completion through /prompt."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import comfy_helpers as ch
import pytest

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

CORE_NODES = {"SuTILoadAdapter", "SuTIDemonstrations", "SuTIApply"}  # the rest is read from the pack
TOY_LOADER = "SuTILoadToyBase"
PYTHON_MODULE = f"custom_nodes.{ch.PACK_DIR_NAME}"
API_WORKFLOWS = sorted(
    p for p in (ch.PACK_ROOT / "workflows").rglob("*.json") if ch.api_format(json.loads(p.read_text()))
)


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get_json("/object_info")


def test_server_log_has_no_import_failure_for_the_pack(comfy_server):
    failures = ch.pack_import_failures(comfy_server.log_text())
    assert not failures, "ComfyUI could not import the pack:\n" + "\n".join(failures)


def test_pack_registers_the_core_nodes(pack_nodes):
    missing = CORE_NODES - set(pack_nodes)
    assert not missing, f"comfy_entrypoint does not register {sorted(missing)}"


def test_object_info_lists_every_pack_node_with_its_inputs(object_info, pack_nodes):
    problems = []
    for node_id, node_cls in pack_nodes.items():
        info = object_info.get(node_id)
        if info is None:
            problems.append(f"{node_id}: not in /object_info")
            continue
        if info.get("python_module") != PYTHON_MODULE:
            problems.append(f"{node_id}: python_module {info.get('python_module')!r}, want {PYTHON_MODULE!r}")
        listed = set(info["input"].get("required", {})) | set(info["input"].get("optional", {}))
        missing = set(ch.node_input_ids(node_cls)) - listed
        if missing:
            problems.append(f"{node_id}: inputs {sorted(missing)} missing from /object_info")
    assert not problems, "\n".join(problems)


def _unique_prefixes(graph: dict) -> dict:
    """Give every save node a fresh filename_prefix so ComfyUI's cache cannot skip the run."""
    tag = uuid.uuid4().hex[:8]
    for node in graph.values():
        if "filename_prefix" in node.get("inputs", {}):
            node["inputs"]["filename_prefix"] = f"suti_test_{tag}"
    return graph


def _saved_images(server: ch.ComfyServer, outputs: dict) -> list[Path]:
    images = [img for out in outputs.values() for img in out.get("images", [])]
    return [server.base_dir / img.get("type", "output") / img.get("subfolder", "") / img["filename"] for img in images]


def test_prompt_with_stock_nodes_runs(comfy_server):
    """/prompt round trip with stock nodes only (independent of the pack's models)."""
    graph = _unique_prefixes(
        {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 1234}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
        }
    )
    saved = _saved_images(comfy_server, ch.queue_prompt_and_wait(comfy_server, graph, timeout=60))
    assert len(saved) == 1 and saved[0].is_file(), saved


def _default_inputs(node_id: str, info: dict) -> dict:
    """Required widget inputs of a node filled from /object_info (combo: first option, else default)."""
    values = {}
    for name, spec in info["input"].get("required", {}).items():
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
        if choices is not None:
            assert choices, (
                f"{node_id}.{name} offers no choice, so no graph can use it: the model files the pack ships under "
                f"{ch.PACK_ROOT / 'models'} are missing; restore them with `git checkout models`"
            )
            values[name] = choices[0]
        elif "default" in options:
            values[name] = options["default"]
    return values


def test_toy_base_generates_with_stock_nodes(comfy_server, object_info, pack_nodes):
    """SuTILoadToyBase -> stock CLIPTextEncode / KSampler / VAEDecode / SaveImage runs to PNGs."""
    assert TOY_LOADER in pack_nodes, (
        f"comfy_entrypoint does not register {TOY_LOADER} (nodes/toy_base.py); the shipped workflows need it"
    )
    info = object_info[TOY_LOADER]
    slot = {t: info["output"].index(t) for t in ("MODEL", "CLIP", "VAE")}
    graph = _unique_prefixes(
        {
            "base": {"class_type": TOY_LOADER, "inputs": _default_inputs(TOY_LOADER, info)},
            "pos": {
                "class_type": "CLIPTextEncode",
                "inputs": {"clip": ["base", slot["CLIP"]], "text": "a star on a beach"},
            },
            "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["base", slot["CLIP"]], "text": ""}},
            # VAEEncode of a blank image gives a latent of whatever shape the toy VAE uses.
            "img": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 2, "color": 0}},
            "lat": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["base", slot["VAE"]]}},
            "ks": {
                "class_type": "KSampler",
                "inputs": {
                    "model": ["base", slot["MODEL"]],
                    "positive": ["pos", 0],
                    "negative": ["neg", 0],
                    "latent_image": ["lat", 0],
                    "seed": 7,
                    "steps": 4,
                    "cfg": 4.0,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                },
            },
            "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["base", slot["VAE"]]}},
            "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "x"}},
        }
    )
    saved = _saved_images(comfy_server, ch.queue_prompt_and_wait(comfy_server, graph, timeout=300))
    assert len(saved) == 2 and all(p.is_file() for p in saved), saved


@pytest.mark.parametrize(
    "workflow",
    API_WORKFLOWS or [None],
    ids=lambda p: str(p.relative_to(ch.PACK_ROOT / "workflows")) if p else "none-shipped",
)
def test_shipped_api_workflow_runs(comfy_server, workflow):
    """Every API-format graph in workflows/ runs to completion and saves at least one image, none blank and no two
    alike (a side-by-side grid counts per panel: suti_compare's base, training-free and adapter columns)."""
    assert workflow is not None, (
        f"no API-format workflow under {ch.PACK_ROOT / 'workflows'}: the pack ships workflows/api/*.json; "
        "restore them with `git checkout workflows`"
    )
    graph = _unique_prefixes(json.loads(workflow.read_text()))
    saved = _saved_images(comfy_server, ch.queue_prompt_and_wait(comfy_server, graph, timeout=300))
    assert saved and all(p.is_file() for p in saved), f"{workflow.name} saved no image: {saved}"
    assert not ch.blank_images(saved), f"{workflow.name} saved blank images: {ch.blank_images(saved)}"
    assert not ch.identical_images(saved), f"{workflow.name} saved identical images: {ch.identical_images(saved)}"
