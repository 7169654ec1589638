"""The captioners `recaption` can use: a transformers image-to-text model from a local folder, or an external command.
Both take one input shard's images at once and return one caption per image ("" when they have none).

`ModelCaptioner`: `--model DIR`, a folder written by `save_pretrained` holding an image-to-text model that
`AutoModelForImageTextToText` loads (VisionEncoderDecoder, e.g. ViT-GPT2; BLIP; ...) with its image processor and
tokenizer (`huggingface-cli download Salesforce/blip-image-captioning-base --local-dir DIR`); nothing is downloaded.
It captions one cluster per batch with greedy decoding, so a caption depends on the image and its cluster alone.

`CommandCaptioner`: `--command "CMD ARGS"`, run without a shell once per input shard. Protocol: stdin has one JSON
object a line per image, `{"cluster": ..., "key": ..., "path": ...}` (`path`: a temporary copy of the image bytes as
stored, with their extension, removed afterwards); the environment has SUTI_SHARD and SUTI_IMAGES (the line count).
stdout must have exactly one line per image, in order: its caption (an empty line: none). A failure, or another line
count, stops the stage with a CaptionCommandError naming the cluster, the exit status and stderr.
`python -m training.data.toy_captioner` speaks it for the toy world.
"""
from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .common import decode_image


class CaptionCommandError(RuntimeError):
    """The external caption command failed; the message names the cluster, the exit status and stderr."""


@dataclass(frozen=True)
class CaptionRequest:
    """One image to caption: its cluster, crawl key and bytes as stored (with their file extension)."""

    cluster: str
    key: str
    data: bytes
    extension: str


class Captioner(Protocol):
    """What `recaption` needs of a captioner: a check before any work (raising with the fix), the settings a resumed
    run must match, one caption per request (in order, "" for none), and the GPUs a Ray task asks for."""

    def check(self) -> None: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def caption(self, shard: str, requests: list[CaptionRequest]) -> list[str]: ...

    def gpus_per_task(self) -> float: ...


@dataclass(frozen=True)
class ModelCaptioner:
    """A transformers image-to-text model from a local folder, decoded greedily."""

    path: Path
    device: str = "cpu"
    max_new_tokens: int = 30

    def check(self) -> None:
        """Fail before any work, saying how to get a usable folder."""
        fetch = ("save one with `model.save_pretrained(DIR)` (plus its image processor and tokenizer), or fetch one, "
                 "e.g. `huggingface-cli download Salesforce/blip-image-captioning-base --local-dir DIR`")
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"no transformers model folder at {self.path} (config.json missing); {fetch}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")

    def fingerprint(self) -> dict[str, Any]:
        """Folder, decoding length and every file's name and size: another model must not resume this run."""
        files = [[f.name, f.stat().st_size] for f in sorted(self.path.iterdir()) if f.is_file()]
        return {"model": str(self.path.resolve()), "max_new_tokens": self.max_new_tokens, "files": files}

    def gpus_per_task(self) -> float:
        """What a Ray task asks for: on cuda a BLIP-base-class model lets two tasks share a GPU."""
        return 0.5 if self.device.startswith("cuda") else 0

    def caption(self, shard: str, requests: list[CaptionRequest]) -> list[str]:
        captions: list[str] = []
        for _, cluster in itertools.groupby(requests, key=lambda r: r.cluster):
            captions += self._caption_batch([decode_image(r.data) for r in cluster])
        return captions

    def _caption_batch(self, images: list[Any]) -> list[str]:
        import torch

        model, processor, tokenizer = load_model(self)
        with torch.no_grad():
            pixels = processor(images=images, return_tensors="pt").pixel_values.to(self.device)  # (N, 3, H, W)
            tokens = model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [" ".join(text.split()) for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


_LOADED: dict[ModelCaptioner, tuple[Any, Any, Any]] = {}


def load_model(spec: ModelCaptioner) -> tuple[Any, Any, Any]:
    """(model in eval mode, image processor, tokenizer), once per process: workers load their own copy."""
    if spec not in _LOADED:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        spec.check()
        model = AutoModelForImageTextToText.from_pretrained(spec.path, local_files_only=True).to(spec.device).eval()
        _LOADED[spec] = (model, AutoImageProcessor.from_pretrained(spec.path, local_files_only=True),
                         AutoTokenizer.from_pretrained(spec.path, local_files_only=True))
    return _LOADED[spec]


@dataclass(frozen=True)
class CommandCaptioner:
    """An external command speaking the JSON-lines protocol of this module's docstring."""

    command: str
    timeout: float = 600.0

    def check(self) -> None:
        if not shlex.split(self.command):
            raise ValueError("--command is empty; give the caption program and its arguments")

    def fingerprint(self) -> dict[str, Any]:
        return {"command": self.command}

    def gpus_per_task(self) -> float:
        return 0  # the command finds its own devices

    def caption(self, shard: str, requests: list[CaptionRequest]) -> list[str]:
        """One run for the shard's images; CaptionCommandError if it cannot run, fails or miscounts."""
        if not requests:
            return []
        with tempfile.TemporaryDirectory(prefix="suti-recaption-") as folder:
            lines = []
            for i, request in enumerate(requests):
                path = Path(folder) / f"{i:06d}.{request.extension}"
                path.write_bytes(request.data)
                lines.append(json.dumps({"cluster": request.cluster, "key": request.key, "path": str(path)}) + "\n")
            done = self._run(shard, requests, "".join(lines))
        captions = done.stdout.splitlines()
        if done.returncode != 0:
            failed = requests[min(len(captions), len(requests) - 1)]
            raise CaptionCommandError(f"the caption command {self.command!r} exited with status {done.returncode} "
                                      f"while captioning cluster {failed.cluster} (shard {shard}, {len(captions)} of "
                                      f"{len(requests)} images answered); its stderr ends: "
                                      f"{done.stderr.strip()[-500:]!r}; {_FIX}")
        if len(captions) != len(requests):
            raise CaptionCommandError(f"the caption command {self.command!r} wrote {len(captions)} lines for the "
                                      f"{len(requests)} images of shard {shard} (clusters {requests[0].cluster}.."
                                      f"{requests[-1].cluster}); it must write one caption line per input line, in "
                                      f"order (an empty line for none); {_FIX}")
        return [" ".join(caption.split()) for caption in captions]

    def _run(self, shard: str, requests: list[CaptionRequest], stdin: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "SUTI_SHARD": shard, "SUTI_IMAGES": str(len(requests))}
        try:
            return subprocess.run(shlex.split(self.command), input=stdin, text=True, capture_output=True, env=env,
                                  timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CaptionCommandError(f"the caption command {self.command!r} could not run for cluster "
                                      f"{requests[0].cluster} (shard {shard}) ({e}); {_FIX}") from None


_FIX = "fix the command, or caption with a local model (--model DIR)"
