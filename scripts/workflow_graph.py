"""Fill an API-format graph with one run's demo images, captions, prompt and seed (for scripts/run_workflow.py).

Nodes are found by class and by the links between them, not by id, so any graph built like
workflows/api/suti_your_photos.json works: Load Image nodes batched (Batch Images) into one SuTI
Demonstrations node, and one KSampler whose positive input is a CLIPTextEncode.
"""

from __future__ import annotations

import copy
from itertools import count

from .build_ui_workflows import graph_edges

EXAMPLE_GRAPH = "workflows/api/suti_your_photos.json"
DEMOS_NODE = "SuTIDemonstrations"
LOAD_IMAGE, BATCH_IMAGES = "LoadImage", "ImageBatch"
PROMPT_NODE = "CLIPTextEncode"
SEED_INPUT = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed"}
_CHAIN_FIX = f"Load Image nodes batched with Batch Images ({LOAD_IMAGE} / {BATCH_IMAGES}), as in {EXAMPLE_GRAPH}"


class GraphError(ValueError):
    """The graph lacks what the runner fills in; the message names the node and the fix."""


def fill_workflow(graph: dict, image_names: list[str], captions: list[str], prompt: str, seed: int) -> dict:
    """A copy of `graph` loading `image_names` (one Load Image each) with `captions`, `prompt` and `seed` set."""
    if not image_names:
        raise GraphError("no demo images: give the runner pictures of the subject (3-5 work best)")
    graph = copy.deepcopy(graph)
    demos = only_node(graph, {DEMOS_NODE}, "the demo images and captions")
    replace_demo_images(graph, demos, image_names)
    graph[demos]["inputs"]["captions"] = "\n".join(captions)
    sampler = only_node(graph, set(SEED_INPUT), "the prompt and seed")
    graph[sampler]["inputs"][SEED_INPUT[graph[sampler]["class_type"]]] = seed
    graph[prompt_node(graph, sampler)]["inputs"]["text"] = prompt
    return graph


def describe(graph: dict, node_id: str, class_type: str | None = None) -> str:
    """'node 7 (SuTIDemonstrations "title")' for messages; a node the graph lacks by id and `class_type`."""
    node = graph.get(node_id)
    if node is None:
        return f"node {node_id}" + (f" ({class_type})" if class_type else "")
    title = node.get("_meta", {}).get("title")
    return f'node {node_id} ({node["class_type"]}' + (f' "{title}")' if title else ")")


def only_node(graph: dict, class_types: set[str], role: str) -> str:
    """Id of the one node of `class_types`; a GraphError saying what the runner needs it for otherwise."""
    found = sorted((i for i, n in graph.items() if n["class_type"] in class_types), key=_id_order)
    if len(found) == 1:
        return found[0]
    kind = " or ".join(sorted(class_types))
    have = f"{len(found)} {kind} nodes ({', '.join(found)})" if found else f"no {kind} node"
    fix = "keep one" if found else "add one"
    raise GraphError(f"the graph has {have}, but the runner sets {role} on exactly one: {fix} in your graph, "
                     f"or start from {EXAMPLE_GRAPH}")


def linked_source(graph: dict, node_id: str, input_name: str) -> str | None:
    """Id of the node whose output feeds `input_name` of `node_id`, None when that input is not linked."""
    sources = [src for src, _slot, dst, name in graph_edges(graph) if dst == node_id and name == input_name]
    return sources[0] if sources else None


def prompt_node(graph: dict, sampler: str) -> str:
    """The CLIPTextEncode feeding the sampler's positive input."""
    source = linked_source(graph, sampler, "positive")
    if source is None or graph[source]["class_type"] != PROMPT_NODE:
        where = describe(graph, source) if source else "nothing"
        raise GraphError(
            f"the positive input of {describe(graph, sampler)} comes from {where}, not a {PROMPT_NODE}; the runner "
            f"writes the prompt there: connect a CLIP Text Encode to positive, as in {EXAMPLE_GRAPH}"
        )
    return source


def demo_image_chain(graph: dict, demos: str) -> tuple[str, set[str]]:
    """(id feeding the demos' images, ids of the Load Image / Batch Images nodes upstream of it)."""
    root = linked_source(graph, demos, "images")
    if root is None:
        raise GraphError(f"the images input of {describe(graph, demos)} is not connected; connect {_CHAIN_FIX}")
    chain, todo = set(), [root]
    while todo:
        node_id = todo.pop()
        if graph[node_id]["class_type"] not in (LOAD_IMAGE, BATCH_IMAGES):
            raise GraphError(f"the demo images of {describe(graph, demos)} pass through {describe(graph, node_id)}; "
                             f"the runner replaces only {_CHAIN_FIX}")
        chain.add(node_id)
        if graph[node_id]["class_type"] == BATCH_IMAGES:
            todo += [src for name in ("image1", "image2") if (src := linked_source(graph, node_id, name))]
    return root, chain


def replace_demo_images(graph: dict, demos: str, image_names: list[str]) -> None:
    """Swap the Load Image chain feeding `demos` for one Load Image per name, batched in order (in place)."""
    root, chain = demo_image_chain(graph, demos)
    start = 1 + max((int(i) for i in graph if i.isdigit()), default=0)
    new_nodes, new_root = image_batch_nodes(image_names, start)
    for node in graph.values():  # whoever read the old batch (the demos, a preview) reads the new one
        for name, value in node["inputs"].items():
            if value == [root, 0]:
                node["inputs"][name] = [new_root, 0]
    graph.update(new_nodes)
    while unused := (chain & set(graph)) - {src for src, _slot, _dst, _name in graph_edges(graph)}:
        for node_id in unused:  # old loaders nothing reads any more
            del graph[node_id]


def image_batch_nodes(image_names: list[str], first_id: int) -> tuple[dict, str]:
    """({id: node}, id of the last batch): a Load Image per name, batched left to right with Batch Images."""
    ids = (str(i) for i in count(first_id))
    nodes, root = {}, None
    for number, name in enumerate(image_names, start=1):
        load = next(ids)
        nodes[load] = {"class_type": LOAD_IMAGE, "inputs": {"image": name}, "_meta": {"title": f"Demo {number}"}}
        if root is not None:
            batch = next(ids)
            nodes[batch] = {"class_type": BATCH_IMAGES, "inputs": {"image1": [root, 0], "image2": [load, 0]},
                            "_meta": {"title": f"Batch demos 1-{number}"}}
            load = batch
        root = load
    return nodes, root


def _id_order(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)
