"""Asking an OpenAI-compatible chat-completions endpoint for prompt-file descriptions
(``clipinspect prompts generate``): one request per category, every answer validated against
the prompt-file schema (prompt_format.py) before the file is written.

The HTTP exchange is bounded as a whole (``timeout``: name lookup, connection, headers and
body), never follows a redirect (it would carry the API key) and reads at most
MAX_ANSWER_BYTES.
"""

from __future__ import annotations

import datetime as _dt
import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence

from clipinspect.runtime.core.errors import ClipInspectError
from clipinspect.runtime.core.manifest import is_category_name

from .prompt_format import PromptFileError, kind_of, parse_answer, write

SYSTEM_PROMPT = (
    "You write short visual descriptions for zero-shot industrial anomaly detection with CLIP. "
    "Answer with one JSON object only, no prose, of the form "
    '{"normal": ["..."], "anomalous": ["..."]}.')
USER_PROMPT = (
    "Product category: {category}. Write {n} distinct one-sentence descriptions of what a "
    "photo of a normal, defect-free {category} shows, and {n} of what a photo of a {category} "
    "with a defect shows (scratches, cracks, contamination, missing or deformed parts, as they "
    "occur on this product). Describe visible appearance only, each under 20 words, no "
    "numbering.")


class GenerationError(ClipInspectError, RuntimeError):
    """The endpoint could not be reached or answered something unusable."""


def chat_url(url: str) -> str:
    """A base URL (``http://host/v1``) or the full chat-completions URL -> the full URL."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise GenerationError(f"--url {url!r}: expected an http:// or https:// URL such as "
                              "https://api.openai.com/v1")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


MAX_ANSWER_BYTES = 4 << 20  # a chat answer with prompt lists is a few KB


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would resend the Authorization header (the API key) to
    wherever the Location points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise GenerationError(f"{req.full_url} answered HTTP {code}, a redirect to {newurl!r}; "
                              "redirects are not followed (they would carry the API key): if "
                              "you trust that address, give it with --url")


class _Connections(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's HTTP and HTTPS handlers, keeping each connection so that a request past its
    deadline can be cut off (its sockets shut down) from another thread."""

    def __init__(self):
        urllib.request.HTTPHandler.__init__(self)
        urllib.request.HTTPSHandler.__init__(self)
        self.opened: list[http.client.HTTPConnection] = []

    def _kept(self, connection_class):
        def make(*args, **kwargs):
            connection = connection_class(*args, **kwargs)
            self.opened.append(connection)
            return connection
        return make

    def http_open(self, req):
        return self.do_open(self._kept(http.client.HTTPConnection), req)

    def https_open(self, req):
        return self.do_open(self._kept(http.client.HTTPSConnection), req,
                            context=self._context)

    def cut_off(self) -> None:
        for connection in self.opened:
            sock = connection.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _exchange(request: urllib.request.Request, connections: _Connections,
              deadline: float) -> bytes:
    """Send ``request`` and read its answer, at most MAX_ANSWER_BYTES, in chunks until
    ``deadline`` (time.monotonic()); -> the body, or raises GenerationError."""
    url = request.full_url
    opener = urllib.request.build_opener(_NoRedirects, connections)
    try:
        with opener.open(request, timeout=max(deadline - time.monotonic(), 0.001)) as response:
            chunks, size = [], 0
            while size <= MAX_ANSWER_BYTES:
                if time.monotonic() >= deadline:
                    raise TimeoutError("the answer was still coming at the deadline")
                chunk = response.read1(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise GenerationError(f"{url} answered more than {MAX_ANSWER_BYTES} bytes; that "
                                      "is not a chat answer: check --url")
            if getattr(response, "length", None):  # Content-Length bytes still missing
                raise http.client.IncompleteRead(b"".join(chunks), response.length)
            return b"".join(chunks)
    except urllib.error.HTTPError as e:
        detail = e.read(300).decode("utf-8", "replace").strip()
        hint = " (check the API key variable)" if e.code in (401, 403) else ""
        raise GenerationError(f"{url} answered HTTP {e.code} {e.reason}{hint}: "
                              f"{detail or 'no body'}") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise TimeoutError(str(e.reason)) from e
        raise GenerationError(f"cannot reach {url}: {e.reason}") from e
    except TimeoutError:
        raise
    except (http.client.HTTPException, OSError) as e:  # e.g. the connection closed mid-answer
        raise GenerationError(f"{url} broke off its answer ({type(e).__name__}: {e}); check "
                              "the server") from e


def _post(url: str, body: dict, api_key: str | None, timeout: float) -> dict:
    """POST ``body`` as JSON; the answer's JSON. ``timeout`` bounds the whole request (name
    lookup, connection, headers and body): urllib's own timeout bounds each socket operation
    only, so a server sending a byte now and then would hold it for ever. The request runs in
    a daemon thread; at the deadline its connection is cut off and the caller gets the error."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    connections = _Connections()
    deadline = time.monotonic() + timeout
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["raw"] = _exchange(request, connections, deadline)
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=run, name="prompts-generate-request", daemon=True)
    worker.start()
    worker.join(timeout)
    late = f"{url} did not answer within {timeout:g} s; raise --timeout or check the server"
    if worker.is_alive() or isinstance(outcome.get("error"), (socket.timeout, TimeoutError)):
        connections.cut_off()
        raise GenerationError(late) from outcome.get("error")
    if "error" in outcome:
        raise outcome["error"]
    raw = outcome["raw"]
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenerationError(f"{url} answered something that is not JSON: "
                              f"{raw[:200]!r}") from e


def _answer_content(reply: Any, url: str) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise GenerationError(f"{url} answered without choices[0].message.content (not an "
                              f"OpenAI-compatible chat completion): {str(reply)[:200]}") from None
    if not isinstance(content, str):
        raise GenerationError(f"{url}: choices[0].message.content is {kind_of(content)}, not text")
    return content


def generate(url: str, model: str, categories: Sequence[str], out: str | os.PathLike, *,
             per_state: int = 10, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
             temperature: float = 0.7, progress: Callable[[str], None] = print) -> dict:
    """Ask the endpoint for each category's descriptions; write the validated prompt file
    atomically (nothing is written unless every category succeeded). Returns its content."""
    endpoint = chat_url(url)
    for name in categories:
        if not is_category_name(name):
            raise PromptFileError(f"invalid category name {name!r}: use 1-64 letters, digits, "
                                  "spaces, '_', '-' or '.'")
    api_key = os.environ.get(api_key_env) or None
    if api_key is None:
        progress(f"note: ${api_key_env} is not set; sending no Authorization header")
    result: dict[str, dict[str, list[str]]] = {}
    for i, name in enumerate(categories):
        progress(f"[{i + 1}/{len(categories)}] asking {model} at {endpoint} about {name!r}")
        body = {"model": model, "temperature": temperature,
                "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                             {"role": "user",
                              "content": USER_PROMPT.format(category=name, n=per_state)}]}
        result[name] = parse_answer(_answer_content(_post(endpoint, body, api_key, timeout),
                                                    endpoint), name)
    return write(out, result, {
        "generator": "clipinspect prompts generate", "url": endpoint, "model": model,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
