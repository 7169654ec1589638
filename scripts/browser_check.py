"""Load every shipped UI workflow from ComfyUI's template browser in headless chromium and check it.

For each `workflows/*.json` (UI format) a fresh page opens the ComfyUI front end, opens the template
browser (sidebar "Templates"), picks this pack's category and clicks the workflow's card, as a user
does. The check fails when the card's thumbnail (`workflows/<name>.jpg`) does not load, a dialog opens
(missing nodes, missing models, ...), a toast appears (workflow validation, links fixed), the page
throws, a node is of an unknown type, two nodes overlap as drawn, or the front end's own
graph -> prompt conversion differs from the API graph in `workflows/api/`. A screenshot of each
loaded graph (fitted to the view, minimap hidden) is written as PNG. Against a running server it
changes nothing but what the front end itself stores when a new browser opens it (a few user settings).

    python -m scripts.browser_check                       # starts a ComfyUI server with this pack
    python -m scripts.browser_check --server http://127.0.0.1:8188 --out /tmp/shots

Needs chromium and Playwright: `apt-get install -y chromium && pip install -e ".[browser]"`
(Playwright drives the system chromium; `playwright install` is not needed). Env: SUTI_CHROMIUM
(the browser binary, default the first of chromium / chromium-browser / google-chrome on PATH).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from scripts.build_ui_workflows import overlapping_boxes

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW_DIR = ROOT / "workflows"  # the folder ComfyUI serves under /api/workflow_templates/<pack folder>
API_DIR = WORKFLOW_DIR / "api"
SCREENSHOT_DIR = ROOT / "docs" / "screenshots"
INSTALL_COMMAND = 'apt-get install -y chromium && pip install -e ".[browser]"'
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
VIEWPORT = {"width": 2200, "height": 1300}  # wide enough that a fitted graph stays readable
MAX_SCREENSHOT_BYTES = 200_000
SETTLE_S = 2.0  # after the graph is in: late dialogs (missing models are looked up asynchronously), toasts
TIMEOUT_MS = 60_000
FIRST_RUN_WAIT_MS = 3000  # how long the first-run template browser may take to open after the app is up
TEMPLATE_BROWSER = "[data-testid=template-workflows-content]"

# What the page shows after a load, read from the DOM and the graph (selectors of frontend 1.27).
PAGE_STATE_JS = """() => {
  const shown = el => el.getClientRects().length > 0;
  const texts = sel => [...document.querySelectorAll(sel)].filter(shown)
      .map(el => el.innerText.trim().replace(/\\s+/g, ' ').slice(0, 400));
  const nodes = window.app.graph._nodes;
  return {
    dialogs: texts('.p-dialog'),
    toasts: texts('.p-toast-message'),
    node_count: nodes.length,
    unknown_nodes: nodes.filter(n => !(n.type in LiteGraph.registered_node_types) || n.has_errors)
        .map(n => `${n.id} ${n.type}`),
  };
}"""
# Each named card's thumbnail (workflows/<name>.jpg): loaded, failed (the card's broken-image icon) or pending.
THUMBNAILS_JS = """names => Object.fromEntries(names.map(name => {
  const card = document.querySelector(`[data-testid='template-workflow-${name}']`);
  const img = card && card.querySelector('img');
  const state = !card ? 'no card' : img && img.complete && img.naturalWidth > 0 && img.getClientRects().length
      ? 'loaded' : card.querySelector('.pi-image, .pi-file') ? 'failed' : 'pending';
  return [name, state];
}))"""
THUMBNAIL_WAIT_MS = 15_000
NODE_BOXES_JS = "() => window.app.graph._nodes.map(n => [n.title || n.type, ...n.boundingRect])"
PROMPT_JS = "async () => (await window.app.graphToPrompt()).output"
APP_READY_JS = "() => !!(window.app && window.app.graph && window.app.extensionManager)"
# Fit the graph to the view and draw text at any zoom (this page only; the user's settings are untouched).
FIT_FULL_DETAIL_JS = """async () => {
  window.app.canvas.min_font_size_for_lod = 0;
  await window.app.extensionManager.command.execute('Comfy.Canvas.FitView');
  window.app.canvas.setDirty(true, true);
}"""
HIDE_MINIMAP_CSS = ".minimap-main-container { display: none !important; }"


@dataclass
class WorkflowCheck:
    """What loading one workflow in the browser showed."""

    name: str
    problems: list[str] = field(default_factory=list)  # the check fails on any
    screenshot: Path | None = None


# ---------------------------------------------------------------- what is needed


def find_chromium() -> str | None:
    """The browser binary: $SUTI_CHROMIUM, else the first of BROWSER_NAMES on PATH."""
    explicit = os.environ.get("SUTI_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((path for name in BROWSER_NAMES if (path := shutil.which(name))), None)


def missing_requirements() -> str | None:
    """None when chromium and Playwright are both there, else one line naming what is missing and the fix."""
    missing = []
    if find_chromium() is None:
        explicit = os.environ.get("SUTI_CHROMIUM")
        where = f"SUTI_CHROMIUM={explicit} is no file" if explicit else f"none of {', '.join(BROWSER_NAMES)} on PATH"
        missing.append(f"chromium ({where})")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the Python package playwright")
    if not missing:
        return None
    return f"need {' and '.join(missing)}; install with `{INSTALL_COMMAND}`"


def ui_workflows(folder: Path = WORKFLOW_DIR) -> list[Path]:
    """The UI-format workflows the template browser lists (API graphs live in workflows/api/)."""
    return sorted(p for p in folder.glob("*.json") if "nodes" in json.loads(p.read_text()))


def template_category(server: str, names: list[str]) -> str:
    """The template browser's category for this pack: the custom_nodes folder that serves `names`."""
    with urllib.request.urlopen(server.rstrip("/") + "/workflow_templates", timeout=30) as resp:
        listed = json.loads(resp.read())
    for folder, templates in listed.items():
        if set(names) <= set(templates):
            return folder
    raise LookupError(f"/workflow_templates on {server} lists no pack with all of {names}: {listed}; "
                      "is this pack in the server's custom_nodes/ folder?")


# ---------------------------------------------------------------- the browser


@contextmanager
def chromium_browser():
    """Headless system chromium under Playwright (no sandbox: containers often run as root)."""
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    if executable is None:
        raise FileNotFoundError(missing_requirements())
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def comfy_page(browser, server: str):
    """A fresh page (own storage, no earlier tabs) on the ComfyUI front end, once the app is up.

    `page.page_errors` collects uncaught exceptions from then on; those of the front end's own start-up
    (1.27.10 throws one while registering settings) are kept apart in `page.startup_errors`."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.page_errors = []
    page.on("pageerror", lambda error: page.page_errors.append(str(error)))
    try:
        page.goto(server, timeout=TIMEOUT_MS)
        page.wait_for_function(APP_READY_JS, timeout=TIMEOUT_MS)
        try:  # a new user gets the template browser once the app is up: the start-up ends there
            page.locator(TEMPLATE_BROWSER).wait_for(timeout=FIRST_RUN_WAIT_MS)
        except PlaywrightTimeout:
            pass
        page.startup_errors, page.page_errors[:] = list(page.page_errors), []
        yield page
    finally:
        context.close()


def open_template_browser(page, category: str) -> None:
    """Open "Templates" (unless the first-run dialog already shows it) and pick the pack's category."""
    content = page.locator(TEMPLATE_BROWSER)
    if not content.is_visible():
        page.get_by_role("button", name="Templates", exact=True).click()
        content.wait_for(timeout=TIMEOUT_MS)
    content.get_by_role("option", name=category, exact=True).click()


def close_dialogs(page) -> None:
    """Close whatever dialog is open (the first-run template browser), as Escape does."""
    while page.locator(".p-dialog").first.is_visible():
        page.keyboard.press("Escape")
        page.locator(".p-dialog").first.wait_for(state="hidden", timeout=TIMEOUT_MS)


def template_names(page) -> list[str]:
    """The workflow names on the cards the template browser shows now."""
    ids = page.locator("[data-testid^=template-workflow-]").evaluate_all("els => els.map(e => e.dataset.testid)")
    return sorted(i.removeprefix("template-workflow-") for i in ids)


def thumbnail_problems(page, names: list[str]) -> list[str]:
    """Cards of the open template browser whose thumbnail (workflows/<name>.jpg) did not load."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"names => !Object.values(({THUMBNAILS_JS})(names)).includes('pending')",
                               arg=names, timeout=THUMBNAIL_WAIT_MS)
    except PlaywrightTimeout:
        pass
    states = page.evaluate(THUMBNAILS_JS, names)
    return [f"thumbnail workflows/{name}.jpg: {state} on its template card"
            for name, state in states.items() if state != "loaded"]


def load_from_template_browser(page, name: str, node_count: int) -> None:
    """Click the workflow's card in the open template browser and wait until its nodes are on the canvas."""
    page.locator(f"[data-testid='template-workflow-{name}']").click()
    page.locator(TEMPLATE_BROWSER).wait_for(state="detached", timeout=TIMEOUT_MS)
    page.wait_for_function(f"() => window.app.graph._nodes.length === {node_count}", timeout=TIMEOUT_MS)


def load_graph_data(page, workflow: dict) -> None:
    """Load a UI workflow through the front end's own API (as opening a file does)."""
    close_dialogs(page)
    page.evaluate("async w => { await window.app.loadGraphData(w); }", workflow)


def page_problems(page, workflow: dict) -> list[str]:
    """Dialogs, toasts, page errors and unknown nodes on the page after `workflow` loaded."""
    time.sleep(SETTLE_S)
    state = page.evaluate(PAGE_STATE_JS)
    problems = [f"dialog: {text}" for text in state["dialogs"]]
    problems += [f"toast: {text}" for text in state["toasts"]]
    problems += [f"page error: {text}" for text in page.page_errors]
    problems += [f"unknown node type: {node}" for node in state["unknown_nodes"]]
    if state["node_count"] != len(workflow["nodes"]):
        problems.append(f"{state['node_count']} nodes on the canvas, the workflow has {len(workflow['nodes'])}")
    return problems


def prompt_differences(page, api_graph: dict) -> list[str]:
    """Nodes whose class or inputs differ between the front end's prompt for the graph and `api_graph`."""
    prompt = page.evaluate(PROMPT_JS)
    differ = []
    for node_id in sorted(set(prompt) | set(api_graph), key=lambda i: (len(i), i)):
        got, want = prompt.get(node_id, {}), api_graph.get(node_id, {})
        if (got.get("class_type"), got.get("inputs")) != (want.get("class_type"), want.get("inputs")):
            differ.append(f"node {node_id}: front end queues {_brief(got)}, workflows/api has {_brief(want)}")
    return differ


def overlapping_nodes(page, min_overlap: float = 4.0) -> list[str]:
    """Pairs of nodes whose boxes (title included, as drawn after load) overlap by more than `min_overlap` px."""
    return overlapping_boxes(page.evaluate(NODE_BOXES_JS), min_overlap)  # boxes: [title, x, y, w, h]


def _brief(node: dict) -> str:
    return json.dumps({"class_type": node.get("class_type"), "inputs": node.get("inputs")})[:300] if node else "nothing"


def save_screenshot(page, path: Path, max_bytes: int = MAX_SCREENSHOT_BYTES) -> Path:
    """The whole graph fitted to the view, minimap hidden, as a palette PNG of at most `max_bytes`."""
    from PIL import Image

    page.add_style_tag(content=HIDE_MINIMAP_CSS)
    page.evaluate(FIT_FULL_DETAIL_JS)
    time.sleep(0.5)
    image = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    for colors in (128, 64, 32):
        data = io.BytesIO()
        image.quantize(colors=colors).save(data, format="PNG", optimize=True)
        if data.tell() <= max_bytes:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.getvalue())
    return path


# ---------------------------------------------------------------- one workflow, all workflows


def check_workflow(browser, server: str, category: str, path: Path, out_dir: Path | None) -> WorkflowCheck:
    """Load `path` from the template browser on a fresh page; its problems and (with out_dir) screenshot."""
    workflow = json.loads(path.read_text())
    check = WorkflowCheck(path.stem)
    with comfy_page(browser, server) as page:
        try:
            open_template_browser(page, category)
            check.problems += thumbnail_problems(page, [path.stem])
            load_from_template_browser(page, path.stem, len(workflow["nodes"]))
        except Exception as error:  # noqa: BLE001 - report it with whatever the page shows
            check.problems.append(f"did not load from the template browser: {str(error).splitlines()[0]}")
        check.problems += page_problems(page, workflow)
        api_path = API_DIR / path.name
        if api_path.is_file():
            check.problems += prompt_differences(page, json.loads(api_path.read_text()))
        check.problems += overlapping_nodes(page)
        if out_dir is not None:
            check.screenshot = save_screenshot(page, out_dir / f"{path.stem}.png")
    return check


def check_all(server: str, paths: list[Path], out_dir: Path | None) -> list[WorkflowCheck]:
    category = template_category(server, [p.stem for p in paths])
    with chromium_browser() as browser:
        return [check_workflow(browser, server, category, path, out_dir) for path in paths]


@contextmanager
def started_server():
    """A headless ComfyUI (CPU) with this pack, as the tests start it (needs the checkout's tests/)."""
    tests_dir = ROOT / "tests"
    if not (tests_dir / "comfy_helpers.py").is_file():
        raise SystemExit("no tests/comfy_helpers.py here (the node archive leaves tests out): pass --server URL")
    sys.path.insert(0, str(tests_dir))
    import comfy_helpers as ch

    comfy_root = ch.find_comfyui_root()
    if comfy_root is None:
        raise SystemExit(ch.NO_COMFYUI_MESSAGE)
    with tempfile.TemporaryDirectory(prefix="suti-browser-") as base:
        server = ch.start_comfy_server(comfy_root, Path(base))
        try:
            yield server.url
        finally:
            ch.stop_comfy_server(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="URL of a running ComfyUI with this pack (default: start one)")
    parser.add_argument("--out", type=Path, default=SCREENSHOT_DIR, help="screenshot folder (default: %(default)s)")
    parser.add_argument("workflows", nargs="*", type=Path, help="UI workflows of workflows/ (default: all)")
    args = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"browser check: {missing}", file=sys.stderr)
        return 2
    paths = [p.resolve() for p in args.workflows] or ui_workflows()
    with started_server() if args.server is None else nullcontext(args.server.rstrip("/")) as server:
        checks = check_all(server, paths, args.out)
    for check in checks:
        status = "ok" if not check.problems else "FAILED"
        print(f"{check.name}: {status} (screenshot {check.screenshot})")
        for problem in check.problems:
            print(f"  {problem}")
    return 1 if any(check.problems for check in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
