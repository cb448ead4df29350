"""Prompt files: per-category normal and anomalous descriptions written by a person or an LLM.

Schema (JSON, or YAML when PyYAML is installed; the same structure)::

    {
      "format": "clipinspect-prompts",     optional; if present, exactly this
      "version": 1,                        optional; if present, 1
      "source": "...",                     optional, free text or an object: who wrote it
      "categories": {                      required, at least one category
        "bottle": {                        a category name as given to export / add-category
          "normal":    ["a clean, intact glass bottle", ...],
          "anomalous": ["a {} with a cracked neck", ...]
        }
      }
    }

Every description is a whole prompt, not template-expanded; ``{}`` (at most once) is replaced by
the category name. A category needs at least one description in total; each list holds distinct,
non-empty strings of at most MAX_CHARS characters without other braces. At export the
descriptions are added to the compositional ensemble of their state.

Generation (``clipinspect prompts generate``) asks any OpenAI-compatible chat-completions
endpoint for such descriptions, one request per category, and validates every answer against
this schema before writing the file. No torch here: the runtime's CLI can load it.
"""

from __future__ import annotations

import datetime as _dt
import http.client
import json
import os
import re
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

from clipinspect.runtime.core.bundle import atomic_write_bytes
from clipinspect.runtime.core.errors import ClipInspectError
from clipinspect.runtime.core.manifest import is_category_name

FORMAT = "clipinspect-prompts"
VERSION = 1
STATES = ("normal", "anomalous")
MAX_CHARS = 300
MAX_PROBLEMS = 8


class PromptFileError(ClipInspectError, ValueError):
    """A prompt file or an LLM answer that does not follow the schema; says where and why."""


def _kind(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (dict, list)) \
        else f"a {'JSON object' if isinstance(value, dict) else 'list'}"


def category_problems(entry: Any, where: str) -> list[str]:
    """Problems of one category entry {"normal": [...], "anomalous": [...]} (empty if valid)."""
    if not isinstance(entry, dict):
        return [f"{where}: expected an object with 'normal' and/or 'anomalous' lists, got "
                f"{_kind(entry)}"]
    problems = [f"{where}.{key}: unknown key; expected 'normal' and/or 'anomalous'"
                for key in entry if key not in STATES]
    total = 0
    for state in STATES:
        items = entry.get(state, [])
        if not isinstance(items, list):
            problems.append(f"{where}.{state}: expected a list of descriptions, got {_kind(items)}")
            continue
        seen: set[str] = set()
        for i, text in enumerate(items):
            at = f"{where}.{state}[{i}]"
            if not isinstance(text, str) or not text.strip():
                problems.append(f"{at}: expected a non-empty string, got {_kind(text)}")
            elif len(text) > MAX_CHARS:
                problems.append(f"{at}: {len(text)} characters; at most {MAX_CHARS} (CLIP reads "
                                "77 tokens)")
            elif set("{}") & set(text.replace("{}", "", 1)):
                problems.append(f"{at}: {text!r} has braces other than one '{{}}' placeholder "
                                "for the category name")
            elif text.strip() in seen:
                problems.append(f"{at}: {text!r} appears twice")
            else:
                seen.add(text.strip())
                total += 1
    if total == 0 and not problems:
        problems.append(f"{where}: no descriptions; give at least one 'normal' or 'anomalous' one")
    return problems


def validate(data: Any, source: str) -> dict[str, dict[str, list[str]]]:
    """A parsed prompt file -> {category: {"normal": [...], "anomalous": [...]}}; raises
    PromptFileError listing every problem (path, key, value, what is expected)."""
    if not isinstance(data, dict):
        raise PromptFileError(f"{source}: expected a JSON/YAML object with a 'categories' key, "
                              f"got {_kind(data)}")
    problems = []
    for key in data:
        if key not in ("format", "version", "source", "categories"):
            problems.append(f"{key}: unknown top-level key; expected format, version, source, "
                            "categories")
    if "format" in data and data["format"] != FORMAT:
        problems.append(f"format: {data['format']!r}; expected {FORMAT!r}")
    if "version" in data and data["version"] != VERSION:
        problems.append(f"version: {data['version']!r}; this clipinspect reads version {VERSION}")
    categories = data.get("categories")
    if not isinstance(categories, dict) or not categories:
        problems.append("categories: expected an object mapping category names to "
                        f"{{'normal': [...], 'anomalous': [...]}}, got "
                        f"{'nothing' if categories is None else _kind(categories)}")
        categories = {}
    for name, entry in categories.items():
        if not is_category_name(name):
            problems.append(f"categories.{name!r}: invalid category name; use 1-64 letters, "
                            "digits, spaces, '_', '-' or '.'")
        problems += category_problems(entry, f"categories.{name}")
    if problems:
        more = f" (and {len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
        raise PromptFileError(f"{source} does not follow the prompt-file schema{more}:\n  "
                              + "\n  ".join(problems[:MAX_PROBLEMS]))
    return {name: {s: [t.strip() for t in entry.get(s, [])] for s in STATES}
            for name, entry in categories.items()}


MAX_FILE_BYTES = 4 << 20  # descriptions of hundreds of categories take well under 1 MiB


def read_prompt_file(path: str | os.PathLike) -> bytes:
    """The bytes of a prompt file: only a regular file (opened without blocking, so a FIFO
    cannot hang the reader, then checked on the open descriptor) of at most MAX_FILE_BYTES (a
    device such as /dev/zero never ends)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {str(path)!r} does not exist") from None
    except OSError as e:
        raise PromptFileError(f"prompt file {str(path)!r} cannot be read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PromptFileError(f"prompt file {str(path)!r} is not a regular file (a folder, "
                                  "FIFO or device); give a JSON or YAML file")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise PromptFileError(f"prompt file {str(path)!r} is larger than {MAX_FILE_BYTES} bytes; "
                              "a prompt file is a few KB of descriptions: check the path")
    return data


def load(path: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """Read and validate a prompt file (.json, or .yaml / .yml with PyYAML)."""
    path = Path(path)
    try:
        text = read_prompt_file(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{str(path)!r} is not UTF-8 text: {e.reason} at byte "
                              f"{e.start}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise PromptFileError(f"{str(path)!r} is YAML, which needs PyYAML: pip install pyyaml "
                                  "(or write the file as JSON)") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PromptFileError(f"{str(path)!r} is not valid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{str(path)!r} is not valid JSON: {e.msg} at line {e.lineno} "
                                  f"column {e.colno}") from e
    return validate(data, repr(str(path)))


def expand(descriptions: Sequence[str], category: str) -> list[str]:
    """Descriptions -> prompts: the '{}' placeholder replaced by the category name."""
    return [d.replace("{}", category, 1) for d in descriptions]


# ----------------------------------------------------------------------------- generation
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
        raise GenerationError(f"{url}: choices[0].message.content is {_kind(content)}, not text")
    return content


def parse_answer(content: str, category: str) -> dict[str, list[str]]:
    """The model's text -> a validated category entry. Tolerates a Markdown code fence around
    the JSON, nothing else."""
    text = content.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    if fence:
        text = fence.group(1)
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"the answer for {category!r} is not a JSON object ({e.msg}): "
                              f"{content[:200]!r}") from e
    problems = category_problems(entry, f"answer for {category!r}")
    if not problems:
        problems = [f"answer for {category!r}.{s}: no descriptions" for s in STATES
                    if not entry.get(s)]
    if problems:
        raise PromptFileError("the model's answer does not follow the schema:\n  "
                              + "\n  ".join(problems[:MAX_PROBLEMS]))
    return {s: [t.strip() for t in entry[s]] for s in STATES}


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
    data = {"format": FORMAT, "version": VERSION,
            "source": {"generator": "clipinspect prompts generate", "url": endpoint,
                       "model": model,
                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
            "categories": result}
    validate(data, "generated prompts")
    atomic_write_bytes(Path(out), (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())
    return data
