"""From a checked station file to a running station: :func:`plan` says what would run
(``station --check``), :func:`build` makes the pieces, :func:`run_station` runs them until
SIGTERM or Ctrl-C."""

from __future__ import annotations

import difflib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import StationConfig, StationFileError
from .parts import Triggers
from .sinks import ArchiveSink, JournalSink, JsonlSink, PageSink, Sink, SlowSink, log
from .sources import FolderSource, OpenCVSource, Source
from .station import Settings, Station


def plan(config: StationConfig) -> list[str]:
    """Lines describing what the file would run."""
    st, b, src, trg = config["station"], config["bundle"], config["source"], config["trigger"]
    where = {"aravis": f"camera {src['camera'] or '(the first found)'}",
             "opencv": src["url"], "folder": src["folder"]}[src["kind"]]
    settings = [f"{k} {src[k]}" for k in ("pixel_format", "frame_rate", "exposure_us", "region")
                if src[k]] if src["kind"] == "aravis" else []
    lines = [f"station {config.name}: budget {st['budget_ms']:g} ms, fail-safe {st['fail_safe']}"
             f", batch <= {st['max_batch']}, queue <= {st['max_queue']}",
             f"bundle {b['path']}: category {b['category']}, {b['precision']}, mode {b['mode']}, "
             f"provider {b['provider']}" + ("" if math.isnan(b["image_threshold"]) else
                                            f", image threshold {b['image_threshold']:g}"),
             f"source {src['kind']}: {where}" + (f" ({', '.join(settings)})" if settings else ""),
             f"trigger {trg['kind']}" + (f", every {trg['every']} frame(s)"
                                         if trg["kind"] == "free" else "")]
    for sink in config.sinks:
        options = config[f"sinks.{sink}"]
        detail = {"jsonl": lambda o: o["path"], "journal": lambda o: o["path"],
                  "mqtt": lambda o: f"{o['host']}:{o['port']} topic {o['topic']}/result, outbox "
                                    f"{o['outbox']}",
                  "opcua": lambda o: o["endpoint"],
                  "slow": lambda o: f"{o['delay_s']:g} s per record"}[sink](options)
        lines.append(f"sink {sink}: {detail}")
    if st["archive"]:
        lines.append(f"archive: {', '.join(st['archive_verdicts'])} frames to {st['archive']}")
    http = config["http"]
    lines.append(f"http: http://{http['host']}:{http['port']} (/healthz /readyz /metrics /ui)"
                 if http["enabled"] else "http: off")
    return lines


def check_bundle(config: StationConfig):
    """Open the bundle and check the category, mode and threshold: -> the Inspector."""
    from ..core.inspector import Inspector
    b = config["bundle"]
    if not Path(b["path"]).is_dir():
        raise StationFileError(f"{config.file}: [bundle] path = {b['path']!r} is not a folder; "
                               "give the bundle folder 'clipinspect export' wrote")
    inspector = Inspector.open(b["path"], b["precision"], b["provider"], b["threads"] or None,
                               batch_size=config["station"]["max_batch"],
                               attention=b["attention"])
    inspector.stream()  # line mode: a MuSc pool learns from the parts judged normal
    categories = inspector.bundle.categories
    if b["category"] not in categories:
        near = difflib.get_close_matches(b["category"], categories, n=1)
        raise StationFileError(f"{config.file}: [bundle] category = {b['category']!r} is not in "
                               "the bundle" + (f" (did you mean {near[0]!r}?)" if near else "")
                               + f"; it has: {', '.join(categories)}")
    return inspector


def make_source(config: StationConfig) -> Source:
    src = config["source"]
    if src["kind"] == "folder":
        return FolderSource(Path(src["folder"]), Path(src["done"]) if src["done"] else None,
                            src["settle_s"], src["loop"])
    if src["kind"] == "opencv":
        return OpenCVSource(src["url"])
    from .aravis import AravisSource
    return AravisSource(src["camera"], src["pixel_format"], src["frame_rate"], src["exposure_us"],
                        src["region"], src["buffers"], src["frame_timeout_s"],
                        software_trigger=config["trigger"]["kind"] == "camera")


@dataclass
class Built:
    station: Station
    feed: object


def build(config: StationConfig, inspector=None, source: Source | None = None) -> Built:
    """Every piece of the station, not started (``inspector`` and ``source`` for tests)."""
    from ..serving.ui import LiveFeed
    st, b = config["station"], config["bundle"]
    inspector = inspector or check_bundle(config)
    source = source or make_source(config)
    threshold = None if math.isnan(b["image_threshold"]) else b["image_threshold"]
    settings = Settings(config.name, b["category"], b["mode"], st["budget_ms"] / 1e3,
                        st["fail_safe"], st["max_batch"], st["max_queue"], st["drain_s"],
                        config["source"]["reconnect_max_s"], config["source"]["frame_rate"],
                        threshold)
    kind = config["trigger"]["kind"]
    camera_trigger = getattr(source, "trigger", None) if kind == "camera" else None
    run_id = time.strftime("%Y%m%dT%H%M%S")
    triggers = Triggers(kind, config["trigger"]["every"], run_id, camera_trigger)
    feed = LiveFeed()
    sinks: list[Sink] = []
    station = Station(settings, inspector, source, triggers, sinks)
    fire = station.trigger
    for name in config.sinks:
        o = config[f"sinks.{name}"]
        if name == "jsonl":
            sinks.append(JsonlSink(o["path"]))
        elif name == "journal":
            sinks.append(JournalSink(o["path"], config.name))
        elif name == "slow":
            sinks.append(SlowSink(o["delay_s"]))
        elif name == "mqtt":
            from .mqtt import MqttSink
            sinks.append(MqttSink(o, config.name, fire if kind in ("mqtt", "camera") else None))
        elif name == "opcua":
            from .opcua import OpcUaSink
            identity = {"identity": inspector.bundle.identity, "precision": inspector.precision,
                        "weights": inspector.bundle.manifest.model.weights.kind,
                        "category": b["category"]}
            sinks.append(OpcUaSink(o, config.name, identity,
                                   on_trigger=fire if kind in ("opcua", "camera") else None,
                                   on_product=station.prepare_product))
    if st["archive"]:
        sinks.append(ArchiveSink(st["archive"], st["archive_verdicts"]))
    sinks.append(PageSink(feed))
    feed.health = station.health_rows
    from ..serving.drift_watch import DriftWatch
    station.drift = DriftWatch(station.metrics.registry, name="station")
    feed.providers["drift"] = station.drift.state
    opcua = next((s for s in sinks if s.name == "opcua"), None)
    if opcua is not None:
        station.on_state = opcua.set
    return Built(station, feed)


def run_station(config: StationConfig) -> int:
    built = build(config)
    station, http = built.station, None
    if config["http"]["enabled"]:
        from .http import HttpThread, create_app
        app = create_app(station, built.feed, os.environ.get("CLIPINSPECT_API_KEY") or None,
                         config["trigger"]["kind"] in ("http", "camera"))
        http = HttpThread(app, config["http"]["host"], config["http"]["port"])
        port = http.start()
        log(f"http://{config['http']['host']}:{port}/ui (live page), /metrics, /readyz")

    def on_signal(signum, frame):
        log(f"{signal.Signals(signum).name}: finishing the parts acquired, then stopping")
        station.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        station.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if http is not None:
            http.stop()
    print(f"clipinspect station: {station.counts['parts']} part(s), "
          f"{station.counts['fail_safe']} fail-safe", file=sys.stderr)
    return 0
