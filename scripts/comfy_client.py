"""A client for a running ComfyUI server: upload images, queue a graph, follow its progress, fetch its images.

Speaks ComfyUI's own HTTP routes (/upload/image, /prompt, /history, /view) and its websocket (/ws?clientId=).
Every failure is a ServerError whose message says what went wrong and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
import websocket  # websocket-client

from .workflow_graph import describe


class ServerError(RuntimeError):
    """ComfyUI could not be reached, rejected the graph, or failed while running it."""


@dataclass(frozen=True)
class ComfyClient:
    """One ComfyUI server, by its base URL (http://host:port)."""

    url: str
    timeout: float = 30.0  # seconds per HTTP request

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            return requests.request(method, self.url.rstrip("/") + path, timeout=self.timeout, **kwargs)
        except requests.ConnectionError as err:
            raise ServerError(unreachable_message(self.url)) from err
        except requests.Timeout as err:
            raise ServerError(f"{method} {path} on {self.url} got no answer within {self.timeout:.0f} s: "
                              "is the server stuck? check its console") from err

    def _json(self, method: str, path: str, **kwargs) -> dict:
        resp = self._call(method, path, **kwargs)
        if resp.status_code != 200:
            raise ServerError(f"{method} {path} on {self.url} answered HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def upload_image(self, path: Path, subfolder: str) -> str:
        """Put a local image into the server's input folder; returns the name Load Image takes.

        The server never overwrites: a different file of the same name is stored as 'name (1).png'."""
        with open(path, "rb") as image:
            body = self._json("POST", "/upload/image", files={"image": (path.name, image)},
                              data={"type": "input", "subfolder": subfolder})
        return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]

    def queue(self, graph: dict, client_id: str) -> str:
        """POST the graph to /prompt; its prompt id, or a ServerError listing each node's validation errors."""
        resp = self._call("POST", "/prompt", json={"prompt": graph, "client_id": client_id})
        try:
            body = resp.json()
        except ValueError:
            raise ServerError(f"/prompt answered HTTP {resp.status_code}: {resp.text[:500]}") from None
        if resp.status_code != 200 or body.get("node_errors"):  # a 200 with node errors runs only part
            raise ServerError(rejection_message(body, graph))
        return body["prompt_id"]

    @contextmanager
    def progress_socket(self, client_id: str, timeout: float) -> Iterator:
        """The websocket on which the server reports the runs queued with `client_id`; open it before queueing."""
        ws_url = "ws" + self.url.rstrip("/").removeprefix("http") + f"/ws?clientId={client_id}"
        try:
            ws = websocket.create_connection(ws_url, timeout=timeout)
        except (OSError, websocket.WebSocketException) as err:
            raise ServerError(unreachable_message(self.url)) from err
        try:
            yield ws
        finally:
            ws.close()

    def saved_images(self, prompt_id: str) -> list[dict]:
        """{filename, subfolder, type} of every image the run's save nodes wrote (not temporary previews)."""
        entry = self._json("GET", f"/history/{prompt_id}").get(prompt_id, {})
        return [image for output in entry.get("outputs", {}).values() for image in output.get("images", [])
                if image.get("type") == "output"]

    def image_bytes(self, image: dict) -> bytes:
        resp = self._call("GET", "/view", params={k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        if resp.status_code != 200:
            raise ServerError(f"/view could not send {image.get('filename')} (HTTP {resp.status_code})")
        return resp.content


def unreachable_message(url: str) -> str:
    return (f"no ComfyUI server answers at {url}: start ComfyUI with this pack in custom_nodes/ (e.g. "
            "`python main.py --listen 127.0.0.1 --port 8188` in your ComfyUI folder), or pass its URL with --server")


def rejection_message(body: dict, graph: dict) -> str:
    """The server's validation errors, one line per problem, each naming its node."""
    error = body.get("error") or {}
    message = error.get("message", "node errors") if isinstance(error, dict) else str(error)
    lines = [f"ComfyUI rejected the graph: {message}"]
    if isinstance(error, dict) and error.get("details"):
        lines.append(f"  {error['details']}")
    for node_id, info in sorted(body.get("node_errors", {}).items()):
        where = describe(graph, node_id, info.get("class_type"))
        for problem in info.get("errors", []):
            details = f": {problem['details']}" if problem.get("details") else ""
            lines.append(f"  {where}: {problem.get('message')}{details}")
    return "\n".join(lines)


def execution_error_message(data: dict, graph: dict) -> str:
    """One node's exception during the run, as the server reported it."""
    where = describe(graph, data.get("node_id"), data.get("node_type"))
    return (f"{where} failed: {data.get('exception_type')}: "
            f"{data.get('exception_message', '').strip()}\n(the full traceback is in the ComfyUI console)")


def follow_progress(ws, prompt_id: str, graph: dict) -> None:
    """Print the run's node and step progress from ComfyUI's websocket until it ends; raise if it fails.

    The run ends with 'executing' for node None, which the server sends once the run's history is stored."""
    while True:
        try:
            message = ws.recv()
        except websocket.WebSocketTimeoutException:
            raise ServerError(f"no news of prompt {prompt_id} for {ws.gettimeout():.0f} s; the server may be busy "
                              "with another queue: check its console, or raise --timeout") from None
        except websocket.WebSocketConnectionClosedException:
            raise ServerError(f"the server closed the connection while running prompt {prompt_id}: check the "
                              "ComfyUI console (did it stop or crash?)") from None
        if not isinstance(message, str):
            continue  # binary frames are sampler previews
        event = json.loads(message)
        kind, data = event.get("type"), event.get("data") or {}
        if data.get("prompt_id") != prompt_id:
            continue
        if kind == "execution_error":
            raise ServerError(execution_error_message(data, graph))
        if kind == "execution_interrupted":
            raise ServerError(f"prompt {prompt_id} was interrupted on the server; no images were fetched")
        if kind == "executing" and data.get("node") is None:
            return
        if line := progress_line(kind, data, graph):
            print(line, flush=True)


def progress_line(kind: str, data: dict, graph: dict) -> str | None:
    """A line for a node start, a sampler step or the cached nodes; None for other messages."""
    where = describe(graph, data.get("node"))
    if kind == "executing":
        return f"running {where}"
    if kind == "progress":
        return f"  {where}: step {data.get('value')}/{data.get('max')}"
    if kind == "execution_cached" and data.get("nodes"):
        return f"cached (unchanged since an earlier run): nodes {', '.join(map(str, data['nodes']))}"
    return None
