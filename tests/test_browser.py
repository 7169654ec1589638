"""The real front end: headless chromium opens the ComfyUI page of a real server with the pack; every
shipped UI workflow has a card with a thumbnail that loads, and loads from the template browser with no
missing-node or validation dialog or toast, no unknown node, no overlapping nodes, and queues exactly its
API graph (scripts/browser_check.py does the driving)."""

from __future__ import annotations

import json

import pytest

from scripts import browser_check as bc

MISSING = bc.missing_requirements()
if MISSING:  # one line in the summary, with the command that installs what is missing
    pytest.skip(f"SKIPPED browser tests: {MISSING}", allow_module_level=True)

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
WORKFLOWS = bc.ui_workflows()


@pytest.fixture(scope="module")
def browser():
    with bc.chromium_browser() as browser:
        yield browser


@pytest.fixture(scope="module")
def category(comfy_server) -> str:
    return bc.template_category(comfy_server.url, [p.stem for p in WORKFLOWS])


def test_template_browser_shows_a_card_with_a_thumbnail_for_every_shipped_workflow(browser, comfy_server, category):
    names = [p.stem for p in WORKFLOWS]
    with bc.comfy_page(browser, comfy_server.url) as page:
        bc.open_template_browser(page, category)
        page.locator("[data-testid^=template-workflow-]").first.wait_for(timeout=bc.TIMEOUT_MS)
        shown = bc.template_names(page)
        unloaded = bc.thumbnail_problems(page, names)
    assert shown == sorted(names), f"template browser category {category!r} shows {shown}"
    assert not unloaded, f"{unloaded}: run `python -m scripts.gallery --thumbnails`"


def test_the_check_sees_a_thumbnail_that_does_not_load(browser, comfy_server, category):
    """The detector itself: a card whose workflows/<name>.jpg answers 404 is reported, the others are not."""
    missing, *others = [p.stem for p in WORKFLOWS]
    with bc.comfy_page(browser, comfy_server.url) as page:
        page.route(f"**/workflow_templates/*/{missing}.jpg", lambda route: route.fulfill(status=404))
        bc.open_template_browser(page, category)
        problems = bc.thumbnail_problems(page, [missing, *others])
    assert [p.split(":")[0] for p in problems] == [f"thumbnail workflows/{missing}.jpg"], problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_from_the_template_browser_without_dialogs(browser, comfy_server, category, path, tmp_path):
    check = bc.check_workflow(browser, comfy_server.url, category, path, tmp_path)
    assert not check.problems, f"{path.name} in the browser:\n" + "\n".join(check.problems)
    size = check.screenshot.stat().st_size
    assert size <= bc.MAX_SCREENSHOT_BYTES, f"screenshot {check.screenshot.name} is {size} bytes"


def _broken(workflow: dict, how: str) -> dict:
    """A copy of `workflow` with an unknown node type, or with a link its source node does not list."""
    broken = json.loads(json.dumps(workflow))
    if how == "unknown node":
        broken["nodes"][0]["type"] = "SuTINoSuchNode"
    else:
        output = next(out for node in broken["nodes"] for out in node.get("outputs") or [] if out.get("links"))
        output["links"] = []
    return broken


BROKEN = [
    ("unknown node", ["dialog: Some Nodes Are Missing", "unknown node type: "]),  # the missing-nodes dialog
    ("bad link", ["toast: Workflow Validation"]),  # the front end's link check on load
]


@pytest.mark.parametrize(("how", "expected"), BROKEN, ids=[how for how, _ in BROKEN])
def test_the_check_sees_what_a_broken_workflow_shows(browser, comfy_server, how, expected):
    """The detector itself: the missing-nodes dialog and the validation toast of a broken workflow are reported."""
    workflow = _broken(json.loads(WORKFLOWS[0].read_text()), how)
    with bc.comfy_page(browser, comfy_server.url) as page:
        bc.load_graph_data(page, workflow)
        problems = bc.page_problems(page, workflow)
    unseen = [start for start in expected if not any(p.startswith(start) for p in problems)]
    assert not unseen, f"{how}: {unseen} not reported; reported: {problems}"
