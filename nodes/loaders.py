"""SuTI Load Adapter: adapters from models/suti (safetensors only), or training-free mode."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..suti_core.adapter import load_adapter
from ..suti_core.adapter_format import ARCHITECTURES, AdapterMetadata
from ..suti_core.demo_features import feature_source_of
from .adapter_patch import adapter_model_patcher
from .feature_labels import LABEL_OF_SOURCE

SUTI_FOLDER = "suti"
PACK_ADAPTER_DIR = Path(__file__).resolve().parents[1] / "models" / SUTI_FOLDER
ADAPTER_EXTENSIONS = {".safetensors"}
TRAINING_FREE = "none (training-free)"
TRAINING_FREE_INFO = f"{TRAINING_FREE}: no learned weights; works with any SD1.x / SD2.x / SDXL model"
AdapterType = io.Custom("SUTI_ADAPTER")


def register_suti_folder() -> list[str]:
    """Register models/suti with folder_paths (safetensors only) and create its folders; returns them.

    Paths set up earlier (extra_model_paths.yaml, tests) are kept; only the extension set is enforced.
    """
    if SUTI_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(
            SUTI_FOLDER, os.path.join(folder_paths.models_dir, SUTI_FOLDER), is_default=True
        )
    paths = folder_paths.get_folder_paths(SUTI_FOLDER)
    folder_paths.folder_names_and_paths[SUTI_FOLDER] = (paths, set(ADAPTER_EXTENSIONS))
    for path in paths:
        os.makedirs(path, exist_ok=True)
    return paths


def adapter_from_file(path: str | os.PathLike):
    """The SUTI_ADAPTER of an adapter file: validated, wrapped for ComfyUI's model management."""
    return adapter_model_patcher(load_adapter(path))


def adapter_info(adapter_name: str, metadata: AdapterMetadata) -> str:
    """One line saying which base model a file is for (its name cannot: combo values are file names) and which
    demo_features it needs."""
    features = LABEL_OF_SOURCE[feature_source_of(metadata.block_map)]
    return (
        f"{adapter_name} is for {ARCHITECTURES[metadata.architecture]}: {metadata.describe()}, "
        f"trained with demo_features '{features}'"
    )


def register_pack_adapters() -> None:
    """List the pack's own adapters (the one trained for the toy base) in SuTI Load Adapter (idempotent)."""
    folder_paths.add_model_folder_path(SUTI_FOLDER, str(PACK_ADAPTER_DIR))


def adapter_choices() -> list[str]:
    register_suti_folder()  # a deleted folder comes back instead of breaking the node list
    return [TRAINING_FREE] + folder_paths.get_filename_list(SUTI_FOLDER)


def _missing_adapter_message(adapter_name: str) -> str:
    folders = ", ".join(register_suti_folder())
    return (
        f"SuTI adapter '{adapter_name}' was not found in {folders}; put the .safetensors file there and "
        f"refresh, or choose '{TRAINING_FREE}'"
    )


class SuTILoadAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SuTILoadAdapter",
            display_name="SuTI Load Adapter",
            category="SuTI/loaders",
            description="Load a trained SuTI neighbor-attention adapter, or pick training-free mode. An adapter "
            "is made for one base model: the info output (and the log) names it.",
            inputs=[
                io.Combo.Input(
                    "adapter_name",
                    options=adapter_choices(),
                    tooltip=f"A .safetensors adapter from models/suti, or '{TRAINING_FREE}' to attend to the demos "
                    "without learned weights (works with any SD checkpoint). Each adapter is for one base model "
                    "(SD1.x, SD2.x, SDXL or the toy base): the info output and the log say which, and SuTI Apply "
                    "refuses it on another.",
                ),
            ],
            outputs=[
                AdapterType.Output(display_name="adapter"),
                io.String.Output(
                    display_name="info",
                    tooltip="The adapter's base model, text width, blocks and the demo_features it was trained "
                    "with (wire it to a text preview).",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, adapter_name: str) -> bool | str:
        if adapter_name == TRAINING_FREE or folder_paths.get_full_path(SUTI_FOLDER, adapter_name) is not None:
            return True
        return _missing_adapter_message(adapter_name)

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        if adapter_name == TRAINING_FREE:
            return io.NodeOutput(None, TRAINING_FREE_INFO)
        path = folder_paths.get_full_path(SUTI_FOLDER, adapter_name)
        if path is None:
            raise FileNotFoundError(_missing_adapter_message(adapter_name))
        adapter = adapter_from_file(path)
        info = adapter_info(adapter_name, adapter.model.metadata)
        logging.info("SuTI: %s", info)
        return io.NodeOutput(adapter, info)
