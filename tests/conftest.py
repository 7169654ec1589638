"""Shared test setup: locate ComfyUI, the `comfyui` marker with its one-line skip, tiny models, a live server.

Tests that need ComfyUI request a fixture built on `comfyui` (`tiny_unet`, `tiny_sd15`, `suti_pack`,
`comfy_server`, ...) and are then marked `comfyui` automatically; without a ComfyUI tree they are
skipped and the run ends with ONE line saying how to enable them. A test module that must import
ComfyUI at top level calls `comfy_helpers.require_comfyui()` first. Import the pack's own modules
through `suti_pack` / `comfy_helpers.import_pack()` (as `comfyui_suti.nodes...`): ComfyUI's
top-level `nodes` module shadows the pack's `nodes/` package on sys.path.
"""

from __future__ import annotations

import os

import comfy_helpers as ch
import pytest
import torch

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning
# threads make them ~5x slower; OMP_NUM_THREADS, when set, still decides.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

COMFYUI_ROOT = ch.find_comfyui_root()
if COMFYUI_ROOT is not None:
    ch.setup_comfyui(COMFYUI_ROOT)  # now, so test modules may import comfy while being collected

_no_comfyui_key = pytest.StashKey[bool]()


def pytest_report_header(config):
    if COMFYUI_ROOT is None:
        return "comfyui: none found (real-ComfyUI tests will be skipped)"
    return f"comfyui: {COMFYUI_ROOT} (version {ch.comfyui_version(COMFYUI_ROOT)}, CPU mode)"


def pytest_collection_modifyitems(config, items):
    """Mark every test that needs ComfyUI; skip them all when it is absent (folded into one line below)."""
    for item in items:
        if "comfyui" in item.fixturenames or item.get_closest_marker("comfyui"):
            item.add_marker(pytest.mark.comfyui)
            if COMFYUI_ROOT is None:
                item.add_marker(pytest.mark.skip(reason=ch.NO_COMFYUI_MESSAGE))
                item.stash[_no_comfyui_key] = True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Fold all no-ComfyUI skips into ONE summary line; attach the server log to failures that used it."""
    report = yield
    if report.skipped and item.stash.get(_no_comfyui_key, False):
        report.longrepr = (__file__, None, ch.NO_COMFYUI_MESSAGE)  # same location + reason => one line
    server = item.funcargs.get("comfy_server") if hasattr(item, "funcargs") else None
    if report.failed and server is not None:
        report.sections.append(("ComfyUI server log (last 8000 chars)", server.log_text()[-8000:]))
    return report


@pytest.fixture
def judge_format_file(tmp_path):
    """A judge file written in tmp (what train_judge writes without --role filter): training code must refuse this
    format, and no test hands it the shipped evaluation judge."""
    from suti_core.eval.judge import Judge, save_judge

    path = tmp_path / "judge_like.safetensors"
    save_judge(Judge(), path)
    return path


# ---------------------------------------------------------------- ComfyUI in this process


@pytest.fixture(scope="session")
def comfyui():
    """Root of the ComfyUI tree, importable and in CPU mode (tests using it are marked `comfyui`)."""
    if COMFYUI_ROOT is None:
        pytest.skip(ch.NO_COMFYUI_MESSAGE)
    import comfy.model_management as mm

    assert mm.cpu_state == mm.CPUState.CPU, "ComfyUI was imported before CPU mode was set"
    return COMFYUI_ROOT


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random tiny open_clip model folder (data_stage_helpers.write_tiny_clip), built once per run."""
    from data_stage_helpers import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def suti_pack(comfyui):
    """The pack imported as package `comfyui_suti` (as ComfyUI imports custom_nodes/ComfyUI-SuTI)."""
    return ch.import_pack()


@pytest.fixture(scope="session")
def pack_nodes(suti_pack) -> dict[str, type]:
    """node_id -> node class, from the pack's `comfy_entrypoint`."""
    return {cls.define_schema().node_id: cls for cls in ch.pack_node_classes()}


@pytest.fixture
def suti_models_dir(suti_pack, tmp_path):
    """Point ComfyUI's `suti` model folder at an empty temp dir for one test (restored afterwards)."""
    import folder_paths

    previous = folder_paths.folder_names_and_paths.get("suti")
    extensions = previous[1] if previous else {".safetensors"}
    folder_paths.folder_names_and_paths["suti"] = ([str(tmp_path)], extensions)
    folder_paths.filename_list_cache.pop("suti", None)
    yield tmp_path
    folder_paths.filename_list_cache.pop("suti", None)
    if previous is None:
        folder_paths.folder_names_and_paths.pop("suti", None)
    else:
        folder_paths.folder_names_and_paths["suti"] = previous


# ---------------------------------------------------------------- tiny random models (fresh per test)


@pytest.fixture(params=ch.ARCHS)
def tiny_unet(request, comfyui) -> ch.TinyModel:
    """A tiny random UNet in ComfyUI's SD1.5 / SD2.x / SDXL layout (parametrised), with TinyCLIP."""
    return ch.make_tiny_model(request.param)


@pytest.fixture
def tiny_sd15(comfyui) -> ch.TinyModel:
    return ch.make_tiny_model("sd15")


@pytest.fixture
def tiny_sd20(comfyui) -> ch.TinyModel:
    return ch.make_tiny_model("sd20")


@pytest.fixture
def tiny_sdxl(comfyui) -> ch.TinyModel:
    return ch.make_tiny_model("sdxl")


@pytest.fixture(scope="session")
def tiny_vae(comfyui):
    """A real comfy.sd.VAE (TAESD layout) with random weights: IMAGE (B,H,W,3) <-> LATENT (B,4,H/8,W/8)."""
    return ch.make_tiny_vae()


# ---------------------------------------------------------------- a live ComfyUI server


@pytest.fixture(scope="session")
def comfy_server(comfyui, tmp_path_factory):
    """`main.py --cpu` on a free port, base dir in a temp folder with the pack linked into custom_nodes/."""
    server = ch.start_comfy_server(comfyui, tmp_path_factory.mktemp("comfyui_base"))
    yield server
    ch.stop_comfy_server(server)
