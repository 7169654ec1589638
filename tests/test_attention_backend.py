"""The attention backend's xformers choice: the host's switch is obeyed (ComfyUI's --disable-xformers), and a
broken xformers install falls back to SDPA with one warning. CPU-only: xformers and CUDA are simulated."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable

import pytest
import torch

import suti_core.attention_backend as backend


def _qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, n, 8, generator=gen) for n in (5, 7, 7))  # (B, N, H*D), heads=2


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int = 2, mask=None) -> torch.Tensor:
    return backend._sdpa_attention(q, k, v, heads, mask)


def _pretend_xformers(monkeypatch, module, kernel: Callable | None) -> list[tuple]:
    """Make `module` (a copy of attention_backend) see xformers on CUDA with `kernel`; returns the kernel's calls."""
    calls: list[tuple] = []

    def recording_kernel(*args):
        calls.append(args)
        return kernel(*args)

    ops = types.ModuleType("xformers.ops")
    if kernel is not None:  # None: an install whose ops lack the kernel (AttributeError)
        ops.memory_efficient_attention = recording_kernel
    fake = types.ModuleType("xformers")
    fake.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(module, "_xformers_can_run", lambda device: True)
    monkeypatch.setattr(module, "_xformers_failure", None)
    monkeypatch.setattr(module, "_xformers_allowed", True)
    return calls


def _working_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xformers' contract on (B, N, H, D), computed with SDPA; marked by +1000 so a test sees who ran."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2) + 1000.0


def _raising(err: BaseException) -> Callable:
    def kernel(*args):
        raise err

    return kernel


def _xformers_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "xformers" in r.getMessage()]


def test_working_xformers_is_used_on_cuda_when_allowed(monkeypatch):
    calls = _pretend_xformers(monkeypatch, backend, _working_kernel)
    q, k, v = _qkv()
    assert backend.attention_backend_name("cuda") == "xformers"
    torch.testing.assert_close(backend.attention(q, k, v, 2), _sdpa(q, k, v) + 1000.0)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "disable",
    [
        pytest.param(lambda: {"use_xformers": False}, id="per-call use_xformers=False"),
        pytest.param(lambda: backend.set_xformers_enabled(False) or {}, id="host default set_xformers_enabled(False)"),
    ],
)
def test_disabled_xformers_is_never_called(monkeypatch, disable):
    calls = _pretend_xformers(monkeypatch, backend, _working_kernel)
    q, k, v = _qkv()
    out = backend.attention(q, k, v, 2, **disable())
    torch.testing.assert_close(out, _sdpa(q, k, v))
    assert calls == [], "xformers ran although the host disabled it"


def test_per_call_choice_overrides_the_host_default(monkeypatch):
    calls = _pretend_xformers(monkeypatch, backend, _working_kernel)
    backend.set_xformers_enabled(False)
    q, k, v = _qkv()
    torch.testing.assert_close(backend.attention(q, k, v, 2, use_xformers=True), _sdpa(q, k, v) + 1000.0)
    assert len(calls) == 1


def test_masked_attention_always_uses_sdpa(monkeypatch):
    calls = _pretend_xformers(monkeypatch, backend, _working_kernel)
    q, k, v = _qkv()
    mask = torch.tensor([[True] * 4 + [False] * 3])
    torch.testing.assert_close(backend.attention(q, k, v, 2, mask=mask), _sdpa(q, k, v, mask=mask))
    assert calls == []


@pytest.mark.parametrize(
    "kernel",
    [
        pytest.param(_raising(RuntimeError("CUDA error: no kernel image is available")), id="RuntimeError"),
        pytest.param(_raising(NotImplementedError("No operator found for memory_efficient_attention")),
                     id="NotImplementedError"),
        pytest.param(None, id="AttributeError (ops without the kernel)"),
    ],
)
def test_broken_xformers_kernel_falls_back_to_sdpa_with_one_warning(monkeypatch, caplog, kernel):
    calls = _pretend_xformers(monkeypatch, backend, kernel)
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING):
        first, second = backend.attention(q, k, v, 2), backend.attention(q, k, v, 2)
    torch.testing.assert_close(first, _sdpa(q, k, v))
    torch.testing.assert_close(second, _sdpa(q, k, v))
    warnings = _xformers_warnings(caplog)
    assert len(warnings) == 1, f"want exactly one warning across two calls, got {warnings}"
    assert "falls back to PyTorch SDPA" in warnings[0] and "uninstall xformers" in warnings[0], warnings[0]
    assert len(calls) <= 1, "after the first failure xformers must not be tried again"
    assert backend.attention_backend_name("cuda") == "sdpa"


def test_xformers_that_fails_to_import_falls_back_to_sdpa_with_one_warning(monkeypatch, caplog):
    _pretend_xformers(monkeypatch, backend, _working_kernel)
    monkeypatch.setitem(sys.modules, "xformers", None)  # `import xformers.ops` now raises ImportError
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING):
        outs = [backend.attention(q, k, v, 2) for _ in range(2)]
    for out in outs:
        torch.testing.assert_close(out, _sdpa(q, k, v))
    warnings = _xformers_warnings(caplog)
    assert len(warnings) == 1 and "ModuleNotFoundError" in warnings[0], warnings


def test_out_of_memory_in_xformers_is_raised_not_blamed_on_the_install(monkeypatch, caplog):
    _pretend_xformers(monkeypatch, backend, _raising(torch.OutOfMemoryError("CUDA out of memory")))
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING), pytest.raises(torch.OutOfMemoryError):
        backend.attention(q, k, v, 2)
    assert _xformers_warnings(caplog) == []
    assert backend.attention_backend_name("cuda") == "xformers", "an OOM must not switch xformers off"


def test_float_bias_is_added_to_the_logits_by_sdpa(monkeypatch):
    calls = _pretend_xformers(monkeypatch, backend, _working_kernel)
    q, k, v = _qkv()
    bias = torch.linspace(-1.0, 0.0, 7)[None]  # (1, M)
    out = backend.attention(q, k, v, heads=2, mask=bias)
    qh, kh, vh = (t.view(2, -1, 2, 4).transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    logits = qh @ kh.transpose(-1, -2) / 2.0 + bias  # scale 1/sqrt(4)
    expected = (logits.softmax(-1) @ vh).transpose(1, 2).flatten(2)
    torch.testing.assert_close(out, expected)
    assert calls == [], "a bias, like a mask, always runs on SDPA"
