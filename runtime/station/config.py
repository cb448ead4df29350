"""The station file (TOML): what one inspection station runs, read and checked in one place.

Every key is declared once in :data:`SECTIONS` (its type, default and check); :func:`load`
reads a file against them, so a misspelt key, a wrong type or a value out of range is one line
naming the file, the key, the value and the fix, before anything is started. Relative paths
are relative to the station file's folder. docs/station.md describes every key.
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import UsageError
from ..core.names import ATTENTION_CHOICES, MODES, PRECISIONS, PROVIDERS
from .pixels import PIXEL_FORMATS_SUPPORTED as PIXEL_FORMATS

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (the station extra)
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

SOURCE_KINDS = ("aravis", "opencv", "folder")
TRIGGER_KINDS = ("free", "opcua", "mqtt", "http", "camera")
VERDICTS = ("OK", "NG", "UNKNOWN")
FAIL_SAFE_VERDICTS = ("NG", "UNKNOWN")  # a late part is never OK


class StationFileError(UsageError):
    """A station file that cannot run: one line with the file, key, value and fix."""


# ------------------------------------------------------------------------------ value checks
Check = Callable[[Any], str | None]  # -> None when fine, else what is expected


def one_of(choices) -> Check:
    def check(v):
        if v in choices:
            return None
        near = difflib.get_close_matches(str(v), choices, n=1)
        return f"one of {', '.join(choices)}" + (f" (did you mean {near[0]!r}?)" if near else "")
    return check


def at_least(low: float, *, above: bool = False) -> Check:
    def check(v):
        ok = v > low if above else v >= low
        return None if ok and math.isfinite(v) else f"a number {'>' if above else '>='} {low:g}"
    return check


def region(v) -> str | None:
    ok = (isinstance(v, list) and len(v) == 4 and all(isinstance(x, int) for x in v)
          and v[0] >= 0 and v[1] >= 0 and v[2] > 0 and v[3] > 0)
    return None if ok else "[x, y, width, height] in whole pixels, width and height > 0"


def endpoint(v) -> str | None:
    return None if v.startswith("opc.tcp://") else "an address opc.tcp://HOST:PORT/PATH"


@dataclass(frozen=True)
class Key:
    type: type | tuple[type, ...]
    default: Any = None  # REQUIRED: must be given
    check: Check | None = None
    fix: str = ""  # what to do, appended to the message
    path: bool = False  # a file path, relative to the station file


REQUIRED = object()
NUMBER = (int, float)

SECTIONS: dict[str, dict[str, Key]] = {
    "station": {
        "name": Key(str, REQUIRED, lambda v: None if v and v.replace("-", "").replace(
            "_", "").isalnum() else "letters, digits, '-' and '_' only (it names topics and "
            "OPC UA nodes)"),
        "budget_ms": Key(NUMBER, 1000.0, at_least(0, above=True),
                         "the most milliseconds from a part's trigger to its verdict"),
        "fail_safe": Key(str, "NG", one_of(FAIL_SAFE_VERDICTS),
                         "a part past its budget is NG or UNKNOWN, never OK"),
        "max_batch": Key(int, 1, at_least(1)),
        "max_queue": Key(int, 16, at_least(1),
                         "parts beyond this wait without their pixels and get the fail-safe"),
        "archive": Key(str, "", path=True),
        "archive_verdicts": Key(list, ["NG", "UNKNOWN"],
                                lambda v: None if set(v) <= set(VERDICTS) else
                                f"a list of {', '.join(VERDICTS)}"),
        "drain_s": Key(NUMBER, 10.0, at_least(0),
                       "seconds the sinks get to publish what is left at shutdown"),
    },
    "bundle": {
        "path": Key(str, REQUIRED, path=True, fix="the bundle folder 'clipinspect export' wrote"),
        "category": Key(str, REQUIRED),
        "precision": Key(str, "fp32", one_of(PRECISIONS)),
        "mode": Key(str, "auto", one_of(MODES)),
        "provider": Key(str, "cpu", one_of(PROVIDERS)),
        "threads": Key(int, 0, at_least(0), "0: one per physical core"),
        "attention": Key(str, "auto", one_of(ATTENTION_CHOICES)),
        "image_threshold": Key(NUMBER, math.nan,
                               fix="leave it out to use the bundle's fitted threshold"),
    },
    "source": {
        "kind": Key(str, REQUIRED, one_of(SOURCE_KINDS)),
        # aravis
        "camera": Key(str, "", fix="a camera id, serial number or IP address; '' for the first"),
        "pixel_format": Key(str, "", lambda v: None if not v else one_of(PIXEL_FORMATS)(v)),
        "frame_rate": Key(NUMBER, 0.0, at_least(0), "frames per second; 0 keeps the camera's"),
        "exposure_us": Key(NUMBER, 0.0, at_least(0), "microseconds; 0 keeps the camera's"),
        "region": Key(list, [], lambda v: None if v == [] else region(v)),
        "buffers": Key(int, 8, at_least(2)),
        "reconnect_max_s": Key(NUMBER, 5.0, at_least(0, above=True)),
        "frame_timeout_s": Key(NUMBER, 2.0, at_least(0, above=True),
                               "seconds without a frame before the camera counts as lost"),
        # opencv
        "url": Key(str, "", fix="a device index, an RTSP/HTTP URL or a video file"),
        # folder
        "folder": Key(str, "", path=True),
        "done": Key(str, "", path=True),
        "settle_s": Key(NUMBER, 1.0, at_least(0)),
        "loop": Key(bool, False),
    },
    "trigger": {
        "kind": Key(str, "free", one_of(TRIGGER_KINDS)),
        "every": Key(int, 1, at_least(1), "free-running: every n-th frame is a part"),
    },
    "http": {
        "host": Key(str, "127.0.0.1"),
        "port": Key(int, 8090, at_least(0), "0: any free port"),
        "enabled": Key(bool, True),
    },
    "sinks.jsonl": {"path": Key(str, REQUIRED, path=True)},
    "sinks.journal": {"path": Key(str, REQUIRED, path=True)},
    "sinks.mqtt": {
        "host": Key(str, "127.0.0.1"),
        "port": Key(int, 1883, at_least(1)),
        "topic": Key(str, "", fix="default clipinspect/STATION"),
        "client_id": Key(str, ""),
        "username": Key(str, ""),
        "password_file": Key(str, "", path=True, fix="a file holding only the password"),
        "tls": Key(bool, False),
        "ca_file": Key(str, "", path=True),
        "cert_file": Key(str, "", path=True),
        "key_file": Key(str, "", path=True),
        "outbox": Key(str, "", path=True, fix="default: STATION-mqtt-outbox.sqlite next to the "
                      "station file"),
        "outbox_max": Key(int, 100_000, at_least(1)),
        "keepalive_s": Key(int, 10, at_least(1)),
    },
    "sinks.opcua": {
        "endpoint": Key(str, "opc.tcp://127.0.0.1:4840/clipinspect/", endpoint),
        "certificate": Key(str, "", path=True),
        "private_key": Key(str, "", path=True),
    },
    "sinks.slow": {  # a test and demonstration sink: waits before each publish
        "delay_s": Key(NUMBER, 1.0, at_least(0)),
    },
}


@dataclass
class StationConfig:
    """The checked station file: one dict of values per section present (defaults filled)."""

    file: Path
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections[section]

    def get(self, section: str) -> dict[str, Any] | None:
        return self.sections.get(section)

    @property
    def name(self) -> str:
        return self.sections["station"]["name"]

    @property
    def sinks(self) -> list[str]:
        return [s.split(".", 1)[1] for s in self.sections if s.startswith("sinks.")]


def load(path: str | Path) -> StationConfig:
    """Read and check a station file; raises :class:`StationFileError` (one line)."""
    path = Path(path)
    if tomllib is None:
        raise StationFileError("reading a station file on Python 3.10 needs tomli: pip install "
                               "'clipinspect[station]'")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StationFileError(f"station file {str(path)!r} does not exist; docs/station.md "
                               "has an example for each source") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StationFileError(f"station file {str(path)!r} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise StationFileError(f"{path}: not valid TOML ({e}); fix the line it names") from None
    return parse(raw, path)


def parse(raw: dict, path: Path) -> StationConfig:
    config = StationConfig(path)
    tables = flatten(raw, path)
    for name, table in tables.items():
        if name not in SECTIONS:
            raise unknown(path, "section", f"[{name}]", [f"[{s}]" for s in SECTIONS],
                          "the sections are")
        config.sections[name] = section(name, table, path)
    for required in ("station", "bundle", "source"):
        if required not in config.sections:
            raise StationFileError(f"{path}: the [{required}] section is missing; "
                                   "docs/station.md has a complete example")
    for optional in ("trigger", "http"):
        config.sections.setdefault(optional, section(optional, {}, path))
    check_together(config)
    return config


def unknown(path: Path, what: str, name: str, known: list[str], listing: str
            ) -> StationFileError:
    """'unknown key [station] budgte_ms (did you mean 'budget_ms'?)', or the known names."""
    near = difflib.get_close_matches(name, known, n=1)
    if not near:
        return StationFileError(f"{path}: unknown {what} {name}; {listing} {', '.join(known)}")
    guess = near[0] if near[0].startswith("[") else repr(near[0])  # a [section] as written
    return StationFileError(f"{path}: unknown {what} {name} (did you mean {guess}?)")


def flatten(raw: dict, path: Path) -> dict[str, dict]:
    """{'sinks': {'mqtt': {...}}} -> {'sinks.mqtt': {...}}; top-level keys outside a table are
    refused."""
    tables: dict[str, dict] = {}
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise StationFileError(f"{path}: {name} = {value!r} is outside any section; put it "
                                   "under its [section]")
        if name == "sinks":
            for sink, table in value.items():
                if not isinstance(table, dict):
                    raise StationFileError(f"{path}: sinks.{sink} = {table!r}: a sink is a table"
                                           f", [sinks.{sink}]")
                tables[f"sinks.{sink}"] = table
        else:
            tables[name] = value
    return tables


def section(name: str, table: dict, path: Path) -> dict[str, Any]:
    keys = SECTIONS[name]
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in keys:
            raise unknown(path, f"key [{name}]", key, list(keys), f"[{name}] takes")
    for key, spec in keys.items():
        if key not in table:
            if spec.default is REQUIRED:
                raise StationFileError(f"{path}: [{name}] {key} is missing" + (
                    f"; give {spec.fix}" if spec.fix else ""))
            values[key] = spec.default
            continue
        values[key] = checked(name, key, table[key], spec, path)
    return values


def checked(name: str, key: str, value: Any, spec: Key, path: Path) -> Any:
    where = f"{path}: [{name}] {key} = {value!r}"
    flag = isinstance(value, bool)  # TOML true/false is not a number here
    if spec.type == NUMBER and isinstance(value, int) and not flag:
        value = float(value)
    if not isinstance(value, spec.type) or (flag and spec.type is not bool):
        kind = {str: "text in quotes", bool: "true or false", int: "a whole number",
                list: "a list [...]"}.get(spec.type, "a number")
        raise StationFileError(f"{where}: expected {kind}" + (f" ({spec.fix})" if spec.fix
                                                               else ""))
    expected = spec.check(value) if spec.check else None
    if expected:
        raise StationFileError(f"{where}: expected {expected}" + (f"; {spec.fix}" if spec.fix
                                                                   else ""))
    if spec.path and value:
        value = str((path.parent / value).resolve())
    return value


def check_together(config: StationConfig) -> None:
    """What one key cannot check alone: the keys a source kind needs, and trigger / sink
    pairs."""
    path, source, trigger = config.file, config["source"], config["trigger"]
    needs = {"opencv": "url", "folder": "folder"}.get(source["kind"])
    if needs and not source[needs]:
        raise StationFileError(f"{path}: [source] kind = {source['kind']!r} needs [source] "
                               f"{needs}" + (f" ({SECTIONS['source'][needs].fix})"
                                             if SECTIONS['source'][needs].fix else ""))
    if trigger["kind"] in ("opcua", "mqtt") and f"sinks.{trigger['kind']}" not in config.sections:
        raise StationFileError(f"{path}: [trigger] kind = {trigger['kind']!r} needs a "
                               f"[sinks.{trigger['kind']}] section: the trigger arrives through "
                               "that connection")
    if trigger["kind"] == "camera" and source["kind"] != "aravis":
        raise StationFileError(f"{path}: [trigger] kind = 'camera' needs [source] kind = "
                               f"'aravis' (a GenICam software trigger), not {source['kind']!r}")
    if trigger["kind"] == "http" and not config["http"]["enabled"]:
        raise StationFileError(f"{path}: [trigger] kind = 'http' needs [http] enabled = true")
    mqtt = config.get("sinks.mqtt")
    if mqtt and not mqtt["topic"]:
        mqtt["topic"] = f"clipinspect/{config.name}"
    if mqtt and not mqtt["outbox"]:
        mqtt["outbox"] = str(path.parent.resolve() / f"{config.name}-mqtt-outbox.sqlite")
    if mqtt and bool(mqtt["cert_file"]) != bool(mqtt["key_file"]):
        raise StationFileError(f"{path}: [sinks.mqtt] cert_file and key_file go together "
                               "(a client certificate and its key); give both or neither")
