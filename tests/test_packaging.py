"""Packaging rules: registry metadata, what ships, V3-only export, import boundaries, ComfyUI lookup."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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
        line.strip().strip("/")
        for line in (ROOT / ".comfyignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"tests", "training", "benchmarks", "docs"} <= ignored
    assert not {"nodes", "suti_core", "models", "workflows", "__init__.py", "pyproject.toml"} & ignored


def _node_archive_names(monkeypatch, tmp_path) -> set[str]:
    """The names `comfy node pack` would archive, chosen by comfy-cli's own `zip_files` (nothing written).

    Git listing is switched off, so comfy-cli walks every file on disk minus .comfyignore, as it does outside
    a git checkout: a superset of the tracked files, so whatever is kept out here is kept out of a publish too.
    """
    file_utils = pytest.importorskip("comfy_cli.file_utils", reason="comfy-cli is not installed ('[headless]')")
    names: set[str] = set()

    class RecordingZip:  # stands in for zipfile.ZipFile
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, path, arcname=None):
            names.add(str(arcname or path))

        def writestr(self, arcname, data):
            names.add(str(arcname))

    monkeypatch.setattr(file_utils, "zipfile", SimpleNamespace(ZipFile=RecordingZip, ZIP_DEFLATED=8))
    monkeypatch.setattr(file_utils, "list_git_tracked_files", lambda base_path=".": [])
    monkeypatch.chdir(ROOT)
    file_utils.zip_files(str(tmp_path / "node.zip"), includes=PYPROJECT["tool"]["comfy"].get("includes", []))
    return names


def test_node_archive_holds_the_nodes_and_leaves_dev_files_out(monkeypatch, tmp_path):
    """What the registry / ComfyUI-Manager installs: code, shipped weights and workflows; no tests, training, venv."""
    names = _node_archive_names(monkeypatch, tmp_path)
    runtime = [p for d in ("nodes", "suti_core") for p in _python_files(d)]
    runtime += [p for d in ("toy", "suti", "controlnet") for p in (ROOT / "models" / d).glob("*.safetensors")]
    runtime += [p for p in (ROOT / "workflows").rglob("*") if p.is_file()]
    needed = {str(p.relative_to(ROOT)) for p in runtime}
    needed |= {"__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md"}
    assert not needed - names, f"missing from the node archive: {sorted(needed - names)}"
    left_out = (
        "tests/",
        "training/",
        "benchmarks/",
        "docs/",
        ".ci/",
        "output/",
        "runs/",
        ".venv/",
        "models/eval/",
        "models/filter/",
        "models/clip/",
        ".git/",
    )
    bad = sorted(
        n
        for n in names
        if n.startswith(left_out) or {"__pycache__", ".pytest_cache", ".ruff_cache"} & set(n.split("/"))
    )
    bad += sorted(n for n in names if ".egg-info" in n)
    assert not bad, f".comfyignore lets these into the node archive: {bad[:20]}"


@pytest.mark.slow
def test_node_archive_unpacked_in_custom_nodes_loads_every_node(monkeypatch, tmp_path, comfyui, pack_nodes):
    """The archive alone, as custom_nodes/ComfyUI-SuTI: imports, lists every node and its shipped weights,
    and `pip install -r requirements.txt` has nothing left to fetch in ComfyUI's environment."""
    pack = tmp_path / "custom_nodes" / ch.PACK_DIR_NAME
    for name in _node_archive_names(monkeypatch, tmp_path):
        (pack / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, pack / name)
    probe = (
        "import asyncio, importlib.util, json, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import comfy.cli_args\n"
        "comfy.cli_args.args.cpu = True\n"
        "import folder_paths\n"
        "folder_paths.models_dir = sys.argv[3]  # the pack creates models/suti: here, not in the ComfyUI tree\n"
        "spec = importlib.util.spec_from_file_location('suti_archive', sys.argv[2] + '/__init__.py',"
        " submodule_search_locations=[sys.argv[2]])\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules['suti_archive'] = pack; spec.loader.exec_module(pack)\n"
        "async def nodes():\n"
        "    return [n.define_schema().node_id for n in await (await pack.comfy_entrypoint()).get_node_list()]\n"
        "ids = asyncio.run(nodes())\n"
        "print(json.dumps({'nodes': ids, 'suti': folder_paths.get_filename_list('suti'),"
        " 'controlnet': folder_paths.get_filename_list('controlnet')}))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", probe, str(comfyui), str(pack), str(tmp_path / "models")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(seen["nodes"]) == sorted(pack_nodes), seen["nodes"]
    assert (
        "suti_toy_adapter.safetensors" in seen["suti"] and "suti_toy_pose_controlnet.safetensors" in seen["controlnet"]
    )
    pip_args = ["-m", "pip", "install", "--dry-run", "--no-index", "--disable-pip-version-check", "-r"]
    pip = subprocess.run(
        [sys.executable, *pip_args, str(pack / "requirements.txt")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert pip.returncode == 0 and "Would install" not in pip.stdout, pip.stdout + pip.stderr


# Provided by ComfyUI itself (torch comes with it), or used only when installed (xformers, attention_backend.py).
HOST_MODULES = {
    "torch",
    "comfy",
    "comfy_api",
    "comfy_extras",
    "folder_paths",
    "nodes",
    "node_helpers",
    "latent_preview",
}
OPTIONAL_MODULES = {"xformers"}
DIST_NAMES = {"PIL": "pillow"}


def test_requirements_txt_is_what_the_nodes_import():
    """ComfyUI-Manager installs requirements.txt: exactly the third-party modules the shipped code imports."""
    shipped = _python_files("nodes") + _python_files("suti_core") + _python_files("__init__.py")
    imported = set().union(*(_imported_modules(p) for p in shipped))
    needed = {
        DIST_NAMES.get(m, m).lower()
        for m in imported
        if m
        and not m.startswith(".")
        and m not in sys.stdlib_module_names
        and m not in HOST_MODULES | OPTIONAL_MODULES | {"suti_core"}
    }
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    listed = {
        re.split(r"[<>=!~\[ ;]", line.strip())[0].lower() for line in lines if line.strip() and not line.startswith("#")
    }
    assert listed == needed, f"requirements.txt lists {sorted(listed)}, the nodes import {sorted(needed)}"


def test_registry_icon_is_a_small_image_in_this_repo():
    """[tool.comfy] Icon: a raw URL of this repository's own file (the registry shows it at <= 400 px)."""
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    repo = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    match = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(repo)}/[^/]+/(.+)", icon)
    assert match, f"Icon {icon!r} is not a raw.githubusercontent.com URL of {repo}"
    path = ROOT / match.group(1)
    assert path.is_file() and path.suffix in {".svg", ".png"}, f"{path} missing or not SVG/PNG"
    assert path.stat().st_size < 20_000, f"{path} is {path.stat().st_size} bytes"


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
    for script in (".ci/run", "scripts/setup.sh", "scripts/test.sh", "scripts/get_comfyui.sh"):
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


# ---------------------------------------------------------------- from nothing: scripts/get_comfyui.sh

GET_COMFYUI = ROOT / "scripts" / "get_comfyui.sh"
PINNED_COMFYUI = re.search(r'^COMFYUI_VERSION="([^"]+)"', GET_COMFYUI.read_text(), re.MULTILINE).group(1)
# Stands in for git: `ls-remote` answers as SUTI_SHIM_NET says (up, hang, else down); `clone` writes a
# ComfyUI-shaped tree into its last argument, or half of one and fails (SUTI_SHIM_CLONE=fail).
GIT_SHIM = """#!/usr/bin/env bash
echo "$*" >>"$SUTI_SHIM_LOG"
case " $* " in
  *" ls-remote "*)
    case "$SUTI_SHIM_NET" in up) exit 0 ;; hang) exec sleep 60 ;; esac
    echo "fatal: unable to access: Could not resolve host" >&2; exit 128 ;;
  *" clone "*)
    dest="${@: -1}"
    mkdir -p "$dest/comfy" && echo partial >"$dest/README.md"
    [[ "${SUTI_SHIM_CLONE:-}" == fail ]] && exit 128
    touch "$dest/main.py" "$dest/comfy/model_management.py"; exit 0 ;;
esac
exit 1
"""


def _lay_out_scripts(tmp_path: Path) -> Path:
    """A copy of the pack's scripts outside any custom_nodes/, an empty HOME and the git shim, in tmp_path."""
    scripts = tmp_path / "pack" / "scripts"
    if not scripts.is_dir():
        scripts.mkdir(parents=True)
        for name in ("setup.sh", "get_comfyui.sh", "main.sh"):
            shutil.copy2(ROOT / "scripts" / name, scripts / name)
        shim = tmp_path / "bin" / "git"
        shim.parent.mkdir()
        shim.write_text(GIT_SHIM)
        shim.chmod(0o755)
        (tmp_path / "home").mkdir()
    return scripts


def _run_get_comfyui(tmp_path: Path, net: str, *args: str, script: str = "get_comfyui.sh", **env: str):
    """Run the copied `script` with HOME in tmp_path, COMFYUI_PATH unset (unless given) and git shimmed."""
    scripts = _lay_out_scripts(tmp_path)
    full_env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    full_env.update(
        HOME=str(tmp_path / "home"),
        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        SUTI_SHIM_LOG=str(tmp_path / "git.log"),
        SUTI_SHIM_NET=net,
        SUTI_NET_TIMEOUT="2",
        **env,
    )
    return subprocess.run(
        ["bash", str(scripts / script), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _git_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "git.log"
    return log.read_text().splitlines() if log.is_file() else []


ONE_COMMAND = (
    f"git clone --depth 1 --branch v{PINNED_COMFYUI} https://github.com/comfyanonymous/ComfyUI ~/comfy/ComfyUI"
)


@pytest.mark.parametrize("net", ["down", "hang"])
def test_main_sh_offline_without_comfyui_says_the_one_command(tmp_path, net):
    """No tree, no network (or one that never answers): main.sh stops within seconds, before any set-up,
    prints the one command that gets a tree, and leaves HOME as it was."""
    start = time.monotonic()
    out = _run_get_comfyui(tmp_path, net, str(ROOT / "workflows" / "api" / "suti_basic.json"), script="main.sh")
    assert out.returncode != 0, out.stdout + out.stderr
    assert time.monotonic() - start < 20, "the reachability check is not bounded by SUTI_NET_TIMEOUT"
    assert ONE_COMMAND in out.stderr, out.stderr
    assert "not reachable" in out.stderr and "[setup]" not in out.stderr, out.stderr
    assert not list((tmp_path / "home").iterdir()), "a half-made tree (or its folder) was left in HOME"
    assert [c.split()[0] for c in _git_calls(tmp_path)] == ["ls-remote"]


def test_get_comfyui_installs_the_pinned_tag_into_home_when_reachable(tmp_path):
    out = _run_get_comfyui(tmp_path, "up")
    tree = tmp_path / "home" / "comfy" / "ComfyUI"
    assert out.returncode == 0 and out.stdout.strip() == str(tree), out.stderr
    assert ch.is_comfyui_root(tree)
    assert f"--depth 1 --branch v{PINNED_COMFYUI} https://github.com/comfyanonymous/ComfyUI" in _git_calls(tmp_path)[-1]
    assert [p.name for p in tree.parent.iterdir()] == ["ComfyUI"], "the partial clone folder was left behind"
    calls = len(_git_calls(tmp_path))
    again = _run_get_comfyui(tmp_path, "down")  # found now: no network needed, nothing cloned again
    assert again.returncode == 0 and again.stdout.strip() == str(tree) and len(_git_calls(tmp_path)) == calls


def test_get_comfyui_failed_clone_leaves_no_half_made_tree(tmp_path):
    out = _run_get_comfyui(tmp_path, "up", SUTI_SHIM_CLONE="fail")
    assert out.returncode != 0 and out.stdout == ""
    assert list((tmp_path / "home" / "comfy").iterdir()) == [], "a half-made tree was left in ~/comfy"


@pytest.mark.parametrize("case", ["not a tree at ~/comfy/ComfyUI", "COMFYUI_PATH names no tree"])
def test_get_comfyui_never_touches_what_is_there(tmp_path, case):
    """An existing ~/comfy/ComfyUI that is no tree, or an explicit COMFYUI_PATH, is reported, never written."""
    env = {}
    if case.startswith("not a tree"):
        keep = tmp_path / "home" / "comfy" / "ComfyUI" / "keep.txt"
        _lay_out_scripts(tmp_path)
        keep.parent.mkdir(parents=True)
        keep.write_text("mine")
    else:
        env["COMFYUI_PATH"] = str(tmp_path / "nowhere")
    out = _run_get_comfyui(tmp_path, "up", **env)
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert _git_calls(tmp_path) == [], "git ran although nothing may be installed"
    if case.startswith("not a tree"):
        assert keep.read_text() == "mine" and sorted(p.name for p in keep.parent.iterdir()) == ["keep.txt"]
        assert "left as it is" in out.stderr
    else:
        assert "COMFYUI_PATH" in out.stderr and not (tmp_path / "nowhere").exists()


def test_pinned_comfyui_meets_requires_comfyui_and_readme_says_the_command():
    assert ONE_COMMAND in (ROOT / "README.md").read_text(), "README's one command differs from get_comfyui.sh's pin"
    minimum = PYPROJECT["tool"]["comfy"]["requires-comfyui"].removeprefix(">=")
    pinned, least = (tuple(int(x) for x in v.split(".")) for v in (PINNED_COMFYUI, minimum))
    assert pinned >= least, f"get_comfyui.sh pins {PINNED_COMFYUI} < requires-comfyui {minimum}"


def test_pinned_comfyui_is_the_tree_the_tests_run_on(comfyui):
    version = ch.comfyui_version(comfyui)
    assert version == PINNED_COMFYUI, (
        f"the tests ran on ComfyUI {version} ({comfyui}), scripts/get_comfyui.sh installs {PINNED_COMFYUI}: "
        "move the pin to the version the pack was checked on"
    )
