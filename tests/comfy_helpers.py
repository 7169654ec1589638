"""Helpers for testing the pack inside a real ComfyUI tree: locate it, tiny random models, a live server.

Nothing here needs weights or a GPU. Import ComfyUI modules inside functions (or after
`setup_comfyui`), never at module top: this file must import without a ComfyUI tree.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

# abspath, not resolve(): a checkout symlinked into custom_nodes/ must still see its enclosing ComfyUI.
PACK_ROOT = Path(os.path.abspath(__file__)).parent.parent
PACK_DIR_NAME = "ComfyUI-SuTI"  # the folder name under custom_nodes/
PACK_MODULE = "comfyui_suti"  # the name tests import the pack under (ComfyUI itself uses a path-derived one)
NO_COMFYUI_MESSAGE = (
    "SKIPPED real-ComfyUI tests: no ComfyUI tree found — set COMFYUI_PATH or materialize one "
    "at ~/comfy/ComfyUI (see README)"
)


# ---------------------------------------------------------------- locating ComfyUI


def is_comfyui_root(path: Path) -> bool:
    """True when `path` looks like a ComfyUI source tree (main.py + comfy/model_management.py)."""
    return (path / "main.py").is_file() and (path / "comfy" / "model_management.py").is_file()


def find_comfyui_root(pack_root: Path = PACK_ROOT) -> Path | None:
    """COMFYUI_PATH (an explicit override wins, even when it names no ComfyUI), else the enclosing
    ComfyUI when the pack sits in custom_nodes/, else ~/comfy/ComfyUI; None when none is found."""
    override = os.environ.get("COMFYUI_PATH")
    if override:
        path = Path(override).expanduser().absolute()
        return path if is_comfyui_root(path) else None
    enclosing = pack_root.parent.parent
    if pack_root.parent.name == "custom_nodes" and is_comfyui_root(enclosing):
        return enclosing
    home = Path.home() / "comfy" / "ComfyUI"
    return home if is_comfyui_root(home) else None


def comfyui_version(root: Path) -> str:
    """ComfyUI's version string from comfyui_version.py, without importing it."""
    text = (root / "comfyui_version.py").read_text() if (root / "comfyui_version.py").is_file() else ""
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def setup_comfyui(root: Path) -> None:
    """Make `import comfy`, `folder_paths`, `nodes` (ComfyUI's) importable and put ComfyUI in CPU mode.

    ComfyUI goes first on sys.path so its top-level `nodes.py` wins over the pack's `nodes/`
    package (import the pack's modules through `import_pack()`). Must run before anything
    imports comfy.model_management, which reads `args.cpu` at import time.
    """
    root_str = str(root)
    if root_str in sys.path:
        sys.path.remove(root_str)
    sys.path.insert(0, root_str)
    import comfy.cli_args  # parses no argv while comfy.options.args_parsing is False

    comfy.cli_args.args.cpu = True
    if "comfy.model_management" in sys.modules:
        import comfy.model_management as mm

        if mm.cpu_state != mm.CPUState.CPU:
            raise RuntimeError("comfy.model_management was imported before setup_comfyui(); CPU mode is not set")


def require_comfyui() -> Path:
    """For a test module that imports ComfyUI at top level: set it up, or skip the whole module."""
    import pytest

    root = find_comfyui_root()
    if root is None:
        pytest.skip(NO_COMFYUI_MESSAGE, allow_module_level=True)
    setup_comfyui(root)
    return root


def import_pack() -> ModuleType:
    """Import the checkout as a package named `comfyui_suti`, the way ComfyUI loads a custom node folder.

    Submodules then import as `comfyui_suti.nodes.apply`, `comfyui_suti.suti_core...`, which
    keeps the pack's `nodes` package apart from ComfyUI's `nodes` module.
    """
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"no package at {PACK_ROOT}/__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_MODULE]
        raise
    return module


def pack_node_classes() -> list[type]:
    """The node classes the pack's V3 `comfy_entrypoint` registers (what ComfyUI will list)."""
    import asyncio

    pack = import_pack()
    if not hasattr(pack, "comfy_entrypoint"):
        raise AssertionError(f"{PACK_ROOT}/__init__.py exports no comfy_entrypoint")

    async def collect() -> list[type]:
        extension = await pack.comfy_entrypoint()
        return list(await extension.get_node_list())

    return asyncio.run(collect())


def node_input_ids(node_cls: type) -> list[str]:
    """Input names of a V3 node, from its schema."""
    schema = node_cls.define_schema()
    return [inp.id for inp in (schema.inputs or [])]


# ---------------------------------------------------------------- tiny random UNets

# Block layouts exactly as ComfyUI's model_detection derives them from real SD1.5 / SD2.x / SDXL
# checkpoints; tests/test_comfy_helpers.py proves ComfyUI maps each back to its supported_models class.
_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
FULL_LAYOUTS: dict[str, dict] = {
    "sd15": {
        **_COMMON,
        "adm_in_channels": None,
        "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_linear_in_transformer": False,
        "context_dim": 768,
        "num_heads": 8,
    },
    "sdxl": {
        **_COMMON,
        "num_classes": "sequential",
        "adm_in_channels": 2816,
        "model_channels": 320,
        "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_middle": 10,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_linear_in_transformer": True,
        "context_dim": 2048,
        "num_head_channels": 64,
    },
}
# SD2.x: SD1.5's blocks with linear projections, a 1024-wide context and 64-channel heads.
FULL_LAYOUTS["sd20"] = {k: v for k, v in FULL_LAYOUTS["sd15"].items() if k != "num_heads"} | {
    "use_linear_in_transformer": True,
    "context_dim": 1024,
    "num_head_channels": 64,
}
ARCHS = ("sd15", "sd20", "sdxl")
SUPPORTED_MODEL_NAMES = {"sd15": "SD15", "sd20": "SD20", "sdxl": "SDXL"}  # classes in comfy/supported_models.py
# Only widths shrink; block layout, linear-vs-conv projections and adm_in_channels stay ComfyUI's.
TINY_DIMS: dict[str, dict] = {
    "sd15": {"model_channels": 32, "context_dim": 32, "num_heads": 2},
    "sd20": {"model_channels": 32, "context_dim": 48, "num_head_channels": 16},
    "sdxl": {"model_channels": 32, "context_dim": 64, "num_head_channels": 16},
}
POOLED_DIM = {"sdxl": 1280}  # SDXL's ADM: 1280 pooled + 6 * 256 size embeddings = 2816
LATENT_SIZE = 16  # latent pixels per side: SD1/2 reach 2x2 at the bottom, SDXL 4x4


def supported_model_class(arch: str) -> type:
    """ComfyUI's own model config class (comfy.supported_models.SD15 / SD20 / SDXL) for `arch`."""
    import comfy.supported_models

    return getattr(comfy.supported_models, SUPPORTED_MODEL_NAMES[arch])


def tiny_unet_config(arch: str, **overrides) -> dict:
    """ComfyUI's full `arch` layout with the tiny widths of TINY_DIMS (then `overrides`)."""
    config = {**FULL_LAYOUTS[arch], **TINY_DIMS[arch], **overrides}
    config["dtype"] = torch.float32
    return config


@torch.no_grad()
def randomize_weights_(module: torch.nn.Module, seed: int = 0, gain: float = 0.5) -> None:
    """Seeded init of every parameter: norms at identity, matrices ~N(0, gain^2/fan_in), biases small.

    Needed because ComfyUI builds layers with `disable_weight_init` (uninitialised memory).
    """
    generator = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        is_norm = "Norm" in type(sub).__name__
        for name, param in sub.named_parameters(recurse=False):
            if is_norm:
                values = torch.ones(param.shape) if name == "weight" else torch.zeros(param.shape)
            elif param.ndim >= 2:
                values = torch.randn(param.shape, generator=generator) * (gain / param[0].numel() ** 0.5)
            else:
                values = torch.randn(param.shape, generator=generator) * 0.02
            param.copy_(values.to(param.dtype))


def make_tiny_unet(arch: str = "sd15", seed: int = 0, **overrides):
    """A randomly initialised tiny UNet in ComfyUI's `arch` layout, as a comfy ModelPatcher (CPU)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    model_config = supported_model_class(arch)(tiny_unet_config(arch, **overrides))
    for key, value in TINY_DIMS[arch].items():  # the class's unet_extra_config re-set full-size heads
        model_config.unet_config[key] = overrides.get(key, value)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=mm.unet_offload_device())  # empty state dict: no weights
    randomize_weights_(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


# ---------------------------------------------------------------- conditioning, VAE, sampling


class TinyCLIP:
    """Stand-in for comfy.sd.CLIP: deterministic per-word embeddings of the arch's context_dim.

    Has the methods stock nodes call (tokenize, encode_from_tokens, encode_from_tokens_scheduled,
    encode, clone); different captions give different conditioning, equal captions equal ones.
    """

    def __init__(self, arch: str = "sd15", seed: int = 0, length: int = 77, vocab: int = 4096,
                 context_dim: int | None = None):
        self.arch, self.length, self.vocab = arch, length, vocab
        self.context_dim = context_dim or TINY_DIMS[arch]["context_dim"]
        self.pooled_dim = POOLED_DIM.get(arch, self.context_dim)
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, self.context_dim, generator=generator)  # (V, C)
        self.pool_proj = torch.randn(self.context_dim, self.pooled_dim, generator=generator) / self.context_dim**0.5

    def clone(self) -> TinyCLIP:
        return self

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        ids = [zlib.crc32(word.encode()) % (self.vocab - 1) + 1 for word in text.lower().split()][: self.length]
        ids += [0] * (self.length - len(ids))  # 0 = padding
        return {"tiny": [[(i, 1.0) for i in ids]]}

    def encode_from_tokens(self, tokens: dict, return_pooled=False, return_dict: bool = False):
        ids = torch.tensor([[i for i, _ in chunk] for chunk in tokens["tiny"]])  # (1, L)
        cond = self.table[ids]  # (1, L, C)
        pooled = cond.mean(dim=1) @ self.pool_proj  # (1, P)
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(
        self, tokens: dict, unprojected=False, add_dict: dict | None = None, show_pbar=True
    ) -> list:
        out = self.encode_from_tokens(tokens, return_dict=True)
        cond = out.pop("cond")
        out.update(add_dict or {})
        return [[cond, out]]

    def encode(self, text: str) -> torch.Tensor:
        return self.encode_from_tokens(self.tokenize(text))


def tiny_cond(arch: str, text: str = "a photo", seed: int = 0) -> list:
    """ComfyUI CONDITIONING for `text` (what CLIPTextEncode would output) with TinyCLIP."""
    clip = TinyCLIP(arch, seed)
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def make_tiny_vae(seed: int = 0):
    """A real comfy.sd.VAE (TAESD architecture, 4 latent channels, /8) with seeded random weights."""
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    randomize_weights_(taesd, seed, gain=1.0)
    taesd.requires_grad_(False)
    with torch.no_grad():  # scalar latent scale/shift: keep them neutral
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)
    return comfy.sd.VAE(sd=taesd.state_dict())


def empty_latent(batch: int = 1, size: int = LATENT_SIZE) -> dict:
    """ComfyUI LATENT dict of zeros, (B, 4, size, size)."""
    return {"samples": torch.zeros(batch, 4, size, size)}


def run_ksampler(
    model_patcher,
    positive: list,
    negative: list,
    latent,
    steps: int = 2,
    seed: int = 0,
    sampler: str = "euler",
    scheduler: str = "normal",
    cfg: float = 4.0,
    denoise: float = 1.0,
) -> torch.Tensor:
    """What the stock KSampler node does (comfy.sample.sample), minus previews; returns the samples.

    Runs under torch.inference_mode(), as ComfyUI's executor does.
    """
    import comfy.sample

    samples = latent["samples"] if isinstance(latent, dict) else latent
    with torch.inference_mode():
        samples = comfy.sample.fix_empty_latent_channels(model_patcher, samples)
        noise = comfy.sample.prepare_noise(samples, seed)
        return comfy.sample.sample(
            model_patcher,
            noise,
            steps,
            cfg,
            sampler,
            scheduler,
            positive,
            negative,
            samples,
            denoise=denoise,
            disable_pbar=True,
            seed=seed,
        )


@dataclass
class TinyModel:
    """A tiny random UNet of one architecture plus matching conditioning helpers."""

    arch: str
    model: object  # comfy.model_patcher.ModelPatcher
    clip: TinyCLIP

    def cond(self, text: str = "a photo") -> list:
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))

    def latent(self, batch: int = 1, size: int = LATENT_SIZE) -> dict:
        return empty_latent(batch, size)

    def sample(
        self, model=None, positive: str = "a photo", negative: str = "", batch: int = 1, **kwargs
    ) -> torch.Tensor:
        """run_ksampler on `model` (default: the unpatched one) with text prompts."""
        return run_ksampler(model or self.model, self.cond(positive), self.cond(negative), self.latent(batch), **kwargs)


def make_tiny_model(arch: str = "sd15", seed: int = 0, **overrides) -> TinyModel:
    clip = TinyCLIP(arch, seed, context_dim=overrides.get("context_dim"))
    return TinyModel(arch, make_tiny_unet(arch, seed, **overrides), clip)


def full_widths(arch: str) -> dict:
    """The real model's widths (model_channels, context_dim, heads) for make_tiny_model(arch, **full_widths(arch))."""
    return {k: FULL_LAYOUTS[arch][k] for k in TINY_DIMS[arch]}


# ---------------------------------------------------------------- a real ComfyUI server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ComfyServer:
    """A running `main.py` with the pack linked into <base_dir>/custom_nodes/ComfyUI-SuTI."""

    url: str
    base_dir: Path
    log_path: Path
    proc: subprocess.Popen = field(repr=False)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, path: str, payload: dict | None = None, timeout: float = 30.0) -> tuple[int, object]:
        """(status, decoded JSON) for GET `path`, or POST of `payload` as JSON; HTTP errors are returned, not raised."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, body = err.code, err.read()
        try:
            return status, json.loads(body) if body else None
        except json.JSONDecodeError:
            return status, body.decode(errors="replace")

    def get_json(self, path: str):
        status, body = self.request(path)
        if status != 200:
            raise AssertionError(f"GET {path} -> HTTP {status}: {body}")
        return body


def start_comfy_server(
    comfy_root: Path, base_dir: Path, port: int | None = None, timeout: float = 180.0
) -> ComfyServer:
    """Start ComfyUI headless on CPU with the pack linked in `base_dir` and the example demos in its input
    folder (as a user copies them there for workflows/api/suti_your_photos.json); wait for GET /system_stats."""
    from scripts.make_example_demos import EXAMPLE_DEMOS_DIR

    link = base_dir / "custom_nodes" / PACK_DIR_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    shutil.copytree(EXAMPLE_DEMOS_DIR, base_dir / "input", dirs_exist_ok=True)
    port = port or free_port()
    log_path = base_dir / "comfyui.log"
    cmd = [
        sys.executable,
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base_dir),
    ]
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}  # threads: see conftest.py
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=comfy_root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = ComfyServer(f"http://127.0.0.1:{port}", base_dir, log_path, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {proc.returncode} before serving:\n{server.log_text()[-6000:]}")
        try:
            if server.request("/system_stats", timeout=2)[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.5)
    stop_comfy_server(server)
    raise TimeoutError(f"ComfyUI did not answer /system_stats within {timeout:.0f}s:\n{server.log_text()[-6000:]}")


def stop_comfy_server(server: ComfyServer, grace: float = 10.0) -> None:
    """Terminate the server process (and only its own process group)."""
    if server.proc.poll() is not None:
        return
    import signal

    os.killpg(server.proc.pid, signal.SIGTERM)
    try:
        server.proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


def pack_import_failures(log: str) -> list[str]:
    """Log lines where ComfyUI reports that our pack failed to import."""
    return [
        line
        for line in log.splitlines()
        if PACK_DIR_NAME in line and ("Cannot import" in line or "IMPORT FAILED" in line)
    ]


class PromptError(RuntimeError):
    """ComfyUI rejected a prompt or a node raised while running it."""


def queue_prompt_and_wait(server: ComfyServer, graph: dict, timeout: float = 120.0) -> dict:
    """POST an API-format graph to /prompt, poll /history/<id>; return its outputs or raise PromptError."""
    status, body = server.request("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
    if status != 200:
        raise PromptError(f"/prompt rejected the graph (HTTP {status}): {json.dumps(body, indent=1)[:4000]}")
    if body.get("node_errors"):  # ComfyUI still runs the valid outputs and answers 200: fail anyway
        raise PromptError(
            f"/prompt accepted the graph only in part; node errors: {json.dumps(body['node_errors'])[:4000]}"
        )
    prompt_id = body["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry is not None:
            state = entry.get("status", {})
            if state.get("status_str") == "error":
                raise PromptError(_execution_error(state))
            if state.get("completed"):
                return entry.get("outputs", {})
        time.sleep(0.25)
    raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f}s; queue: {server.get_json('/queue')}")


def _execution_error(state: dict) -> str:
    for kind, data in state.get("messages", []):
        if kind == "execution_error":
            return (
                f"node {data.get('node_id')} ({data.get('node_type')}) raised {data.get('exception_type')}: "
                f"{data.get('exception_message')}\n{''.join(data.get('traceback', []))[-3000:]}"
            )
    return f"prompt failed: {json.dumps(state)[:3000]}"


def blank_images(paths: list[Path], min_spread: float = 2.0) -> list[str]:
    """Names of the images whose 8-bit pixel values barely vary (std below `min_spread`): blank renders."""
    import numpy as np
    from PIL import Image

    return [p.name for p in paths if np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).std() < min_spread]


def image_panels(path: Path) -> list:
    """A saved image's pixels as its square panels: the image itself, or each column of a side-by-side grid
    (ImageStitch of square images, with or without a gap between them)."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB"))
    height, width = pixels.shape[:2]
    count = width // height
    if count < 2:
        return [pixels]
    step = height + (width - count * height) // (count - 1)
    return [pixels[:, i * step : i * step + height] for i in range(count)]


def identical_images(paths: list[Path]) -> list[str]:
    """'b = a' for each image (or grid panel, as name[i]) whose pixels equal an earlier one's."""
    seen, same = {}, []
    for path in paths:
        panels = image_panels(path)
        for index, panel in enumerate(panels):
            name = path.name if len(panels) == 1 else f"{path.name}[{index}]"
            key = (panel.shape, panel.tobytes())
            if key in seen:
                same.append(f"{name} = {seen[key]}")
            seen.setdefault(key, name)
    return same


def api_format(workflow: dict) -> bool:
    """True for an API-format graph ({id: {"class_type", "inputs"}}), False for UI format."""
    return bool(workflow) and all(isinstance(v, dict) and "class_type" in v for v in workflow.values())
