"""Packaging rules: registry metadata, what ships, V3-only export, import boundaries, ComfyUI lookup."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import comfy_helpers as ch
import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = ch.PACK_ROOT
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SKIP_DIRS = {".venv", ".git", "__pycache__", "runs", "output"}


def _python_files(*parts: str) -> list[Path]:
    base = ROOT.joinpath(*parts)
    files = [base] if base.is_file() else base.rglob("*.py")
    return sorted(p for p in files if not SKIP_DIRS & set(p.relative_to(ROOT).parts))


def _imported_modules(path: Path) -> set[str]:
    """Absolute top-level module names and relative targets ('..training') imported by a file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or "").split(".")[0])
    return names


def test_project_metadata_for_the_registry():
    project = PYPROJECT["project"]
    assert project["name"] == "comfyui-suti"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), "version must be semver MAJOR.MINOR.PATCH"
    assert isinstance(project["license"], dict) and (ROOT / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert project["requires-python"] == ">=3.10"
    deps = {re.split(r"[<>=!~\[ ;]", d)[0].lower() for d in project["dependencies"]}
    assert {"torch", "torchvision", "diffusers", "safetensors", "einops", "numpy", "pillow"} <= deps
    extras = project["optional-dependencies"]
    assert extras["xformers"] == ["xformers"] and "comfy-cli" in extras["headless"] and "pytest" in extras["test"]
    assert {"accelerate", "transformers", "tqdm"} <= set(extras["train"])
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "ComfyUI-SuTI"
    assert comfy["requires-comfyui"].startswith(">=")


def test_torch_is_never_pinned_and_torchaudio_never_required():
    """Users bring their own torch build; torchaudio breaks transformers/diffusers on these machines."""
    lines = PYPROJECT["project"]["dependencies"] + (ROOT / "requirements.txt").read_text().splitlines()
    for line in lines:
        name = re.split(r"[<>=!~\[ ;]", line.strip())[0].lower()
        assert name != "torchaudio", line
        if name in ("torch", "torchvision"):
            assert line.strip().lower() == name, f"{line!r}: do not pin torch/torchvision"
    requirements = (ROOT / "requirements.txt").read_text().lower()
    assert not re.search(r"^\s*torch", requirements, re.MULTILINE), "requirements.txt must leave torch to ComfyUI"


def test_pytest_markers_are_declared():
    markers = " ".join(PYPROJECT["tool"]["pytest"]["ini_options"]["markers"])
    assert "slow:" in markers and "comfyui:" in markers


def test_comfyignore_keeps_dev_files_out_and_runtime_files_in():
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".comfyignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"tests", "training", "benchmarks", "docs"} <= ignored
    assert not {"nodes", "suti_core", "models", "workflows", "__init__.py", "pyproject.toml"} & ignored


def test_comfyui_reads_our_pyproject(comfyui):
    """ComfyUI's own parser (used when it loads the pack) sees the registry fields."""
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(ROOT))
    assert config is not None and config.project.name == "comfyui-suti"
    assert config.project.version == PYPROJECT["project"]["version"]
    assert config.tool_comfy.publisher_id == PYPROJECT["tool"]["comfy"]["PublisherId"]
    assert config.project.supported_comfyui_version == PYPROJECT["tool"]["comfy"]["requires-comfyui"]
    assert config.project.urls.repository == PYPROJECT["project"]["urls"]["Repository"]


def test_init_exports_only_the_v3_entrypoint():
    """With NODE_CLASS_MAPPINGS present ComfyUI never calls comfy_entrypoint (nodes.py load_custom_node)."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    top_level = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    top_level |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    assert "comfy_entrypoint" in top_level
    assert not {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"} & top_level


def test_suti_core_knows_no_host():
    """suti_core is plain torch: no ComfyUI, diffusers, node or training imports (DESIGN.md)."""
    banned = {
        "comfy",
        "comfy_api",
        "comfy_extras",
        "folder_paths",
        "nodes",
        "diffusers",
        "training",
        "..nodes",
        "..training",
    }
    offenders = {str(p.relative_to(ROOT)): sorted(_imported_modules(p) & banned) for p in _python_files("suti_core")}
    assert not {k: v for k, v in offenders.items() if v}


def test_shipped_code_does_not_import_training():
    """training/ is left out of the published archive (.comfyignore), so the runtime must not need it."""
    offenders = [
        str(p.relative_to(ROOT))
        for p in _python_files("nodes") + _python_files("suti_core") + _python_files("__init__.py")
        if {"training", "..training", ".training"} & _imported_modules(p)
    ]
    assert not offenders


def test_no_eval_or_exec():
    """The ComfyUI registry rejects packs that call eval/exec; so do we."""
    calls = [
        f"{p.relative_to(ROOT)}:{n.lineno}"
        for p in _python_files("")
        for n in ast.walk(ast.parse(p.read_text(), str(p)))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("eval", "exec")
    ]
    assert not calls


def test_entry_scripts_are_executable():
    for script in (".ci/run", "scripts/setup.sh", "scripts/test.sh"):
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"


def _shell_lookup(script: Path, env: dict) -> str:
    out = subprocess.run(["bash", str(script), "--print-comfyui"], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _fake_comfyui(path: Path) -> Path:
    (path / "comfy").mkdir(parents=True)
    (path / "main.py").write_text("")
    (path / "comfy" / "model_management.py").write_text("")
    return path


def test_setup_sh_and_tests_find_the_same_comfyui(tmp_path, monkeypatch):
    """COMFYUI_PATH wins (even pointing at nothing), then the enclosing custom_nodes/, then ~/comfy/ComfyUI."""
    home = tmp_path / "home"
    fake = _fake_comfyui(tmp_path / "ComfyUI")
    link = fake / "custom_nodes" / ch.PACK_DIR_NAME
    link.parent.mkdir()
    link.symlink_to(ROOT, target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))
    cases = [  # (COMFYUI_PATH or None, pack path used, expected root); HOME has no ComfyUI yet
        ("/nonexistent", ROOT, None),
        (str(fake), ROOT, fake),
        (None, link, fake),
        (None, ROOT, None),
        (str(tmp_path), link, None),  # an explicit override beats the enclosing tree
        (None, ROOT, home / "comfy" / "ComfyUI"),  # after creating ~/comfy/ComfyUI below
    ]
    for override, pack, expected in cases:
        if expected == home / "comfy" / "ComfyUI":
            _fake_comfyui(expected)
        if override is None:
            monkeypatch.delenv("COMFYUI_PATH", raising=False)
        else:
            monkeypatch.setenv("COMFYUI_PATH", override)
        shell = _shell_lookup(pack / "scripts" / "setup.sh", dict(os.environ))
        assert (Path(shell) if shell else None) == expected, (
            f"setup.sh, COMFYUI_PATH={override}, pack at {pack}: {shell!r}"
        )
        found = ch.find_comfyui_root(pack)
        assert found == expected, f"find_comfyui_root, COMFYUI_PATH={override}, pack at {pack}: {found}"


@pytest.mark.slow
def test_comfy_cli_validates_the_pack_for_publishing():
    """`comfy node validate`: the registry's own checks (metadata, security scan), without uploading."""
    comfy = Path(sys.executable).parent / "comfy"  # the venv's console script
    if not comfy.is_file():
        pytest.skip("comfy-cli is not installed (pip install -e '.[headless]')")
    out = subprocess.run(
        [str(comfy), "--skip-prompt", "node", "validate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert out.returncode == 0 and "passed" in out.stdout + out.stderr, out.stdout + out.stderr
