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

The answers of an LLM (``clipinspect prompts generate``, llm_client.py) are checked against
this schema too (:func:`parse_answer`) before a file is written (:func:`write`). No torch here:
the runtime's CLI can load it.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Sequence

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


def kind_of(value: Any) -> str:
    """A value as an error message shows it: its repr and type, or what container it is."""
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (dict, list)) \
        else f"a {'JSON object' if isinstance(value, dict) else 'list'}"


def category_problems(entry: Any, where: str) -> list[str]:
    """Problems of one category entry {"normal": [...], "anomalous": [...]} (empty if valid)."""
    if not isinstance(entry, dict):
        return [f"{where}: expected an object with 'normal' and/or 'anomalous' lists, got "
                f"{kind_of(entry)}"]
    problems = [f"{where}.{key}: unknown key; expected 'normal' and/or 'anomalous'"
                for key in entry if key not in STATES]
    total = 0
    for state in STATES:
        items = entry.get(state, [])
        if not isinstance(items, list):
            problems.append(f"{where}.{state}: expected a list of descriptions, got "
                            f"{kind_of(items)}")
            continue
        seen: set[str] = set()
        for i, text in enumerate(items):
            at = f"{where}.{state}[{i}]"
            if not isinstance(text, str) or not text.strip():
                problems.append(f"{at}: expected a non-empty string, got {kind_of(text)}")
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
                              f"got {kind_of(data)}")
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
                        f"{'nothing' if categories is None else kind_of(categories)}")
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


def write(path: str | os.PathLike, categories: dict[str, dict[str, list[str]]],
          source: Any) -> dict:
    """Write a prompt file of ``categories`` atomically, validated first (nothing is written
    unless it follows the schema); returns its content."""
    data = {"format": FORMAT, "version": VERSION, "source": source, "categories": categories}
    validate(data, "generated prompts")
    atomic_write_bytes(Path(path), (json.dumps(data, indent=2, ensure_ascii=False)
                                    + "\n").encode())
    return data
