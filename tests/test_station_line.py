"""The station end to end against real components on loopback: Aravis's fake GigE Vision camera
-> station -> a mosquitto broker and the station's OPC UA server, read back by independent
clients (mosquitto_sub; an OPC UA client). Faults: the broker killed and restarted, the camera
killed and restarted, a slow sink. Skipped, with the reason, where a component is missing
(.ci/run installs them all)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipinspect.runtime import Inspector
from clipinspect.runtime.station.build import build
from clipinspect.runtime.station.config import parse

from line_components import (MOSQUITTO, MOSQUITTO_SUB, Broker, FakeCamera, Subscriber,
                             aravis_missing, free_port)

CATEGORY = "weave"
ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.skipif(aravis_missing() is not None, reason=str(aravis_missing())),
    pytest.mark.skipif(MOSQUITTO is None or MOSQUITTO_SUB is None,
                       reason="mosquitto and mosquitto_sub not installed (Debian: apt-get "
                              "install mosquitto mosquitto-clients)"),
]
pytest.importorskip("asyncua")
pytest.importorskip("paho.mqtt")


@pytest.fixture(scope="module")
def inspector(tiny_bundle_path):
    return Inspector.open(tiny_bundle_path)


@pytest.fixture
def camera():
    cam = FakeCamera().start()
    yield cam
    cam.kill()


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def config(tmp_path, broker: Broker, opcua_port: int, extra: str = "", trigger="free",
           budget_ms=5000):
    text = textwrap.dedent(f"""
        [station]
        name = "line1"
        budget_ms = {budget_ms}
        archive = "archive"
        archive_verdicts = ["OK", "NG", "UNKNOWN"]
        [bundle]
        path = "bundle"
        category = "{CATEGORY}"
        image_threshold = 0.5
        [source]
        kind = "aravis"
        pixel_format = "RGB8"
        frame_rate = 20.0
        region = [0, 0, 96, 96]
        frame_timeout_s = 1.0
        reconnect_max_s = 0.5
        [trigger]
        kind = "{trigger}"
        [sinks.mqtt]
        port = {broker.port}
        topic = "line/line1"
        [sinks.opcua]
        endpoint = "opc.tcp://127.0.0.1:{opcua_port}/station/"
        [sinks.jsonl]
        path = "out.jsonl"
        """) + textwrap.dedent(extra)
    return parse(tomllib.loads(text), tmp_path / "station.toml")


def start(cfg, inspector):
    built = build(cfg, inspector)
    worker = threading.Thread(target=built.station.run, daemon=True)
    worker.start()
    return built.station, worker


def wait(condition, timeout_s=30.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def opcua_read(port: int, names: list[str], call: tuple | None = None) -> dict:
    """Read the station's variables (and call a method) with an OPC UA client."""
    from asyncua import Client, ua
    async with Client(f"opc.tcp://127.0.0.1:{port}/station/") as client:
        idx = await client.get_namespace_index("urn:clipinspect:station:line1")
        # One Read request: the station writes a result's variables in one Write call.
        nodes = [client.get_node(f"ns={idx};s=line1.{n}") for n in names]
        out = dict(zip(names, await client.read_values(nodes))) if nodes else {}
        if call:
            method, arg = call
            station = client.get_node(f"ns={idx};s=line1")
            out[method] = await station.call_method(f"{idx}:{method}",
                                                    ua.Variant(arg, ua.VariantType.String))
        return out


def offline_scores(inspector, tmp_path, results: list[dict]) -> list[float]:
    """The archived frames of ``results`` inspected offline, one at a time."""
    images = [np.asarray(Image.open(tmp_path / "archive" / f"{r['part_id']}.png"))
              for r in results]
    return [r.image_score for r in inspector.inspect(images, CATEGORY, batch_size=1)]


def test_camera_to_mqtt_and_opcua_with_broker_and_camera_faults(tmp_path, inspector, camera,
                                                               broker):
    reader = Subscriber(broker, "line/line1/result")
    time.sleep(0.3)  # its persistent session exists before the station publishes
    opcua_port = free_port()
    station, worker = start(config(tmp_path, broker, opcua_port), inspector)
    wait(lambda: len(reader.messages) >= 10, what="10 results over MQTT")
    # The broker goes away: results wait in the outbox, inspection goes on.
    broker.stop()
    before = station.counts["parts"]
    wait(lambda: station.counts["parts"] >= before + 10, what="parts while the broker is down")
    broker.start()
    # The camera is unplugged, then back: the station reconnects, the gap is counted.
    camera.kill()
    wait(lambda: not station.source_up, what="the camera to count as lost")
    time.sleep(1.0)
    camera.start()
    wait(lambda: station.source_up and station.source.counters.reconnects == 1,
         what="the camera to reconnect")
    after = station.counts["parts"]
    wait(lambda: station.counts["parts"] >= after + 5, what="parts after the reconnection")
    values = asyncio.run(opcua_read(opcua_port, ["State", "PartsInspected", "IsSimulated",
                                                 "LastResult.Sequence", "LastResult.Json"]))
    station.stop()
    worker.join(30)
    assert not worker.is_alive()
    published = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    n = len(published)
    got = reader.wait_for(n)
    reader.stop()
    # Every part reached the MQTT reader, once (QoS 1 may repeat one whose PUBACK was lost with
    # the broker: counted by part id), in part order; none is invented.
    first = list(dict.fromkeys(m["part"] for m in got))
    assert first == list(range(1, n + 1)) == [r["part"] for r in published]
    assert len(got) - len(first) <= 2
    assert [m["image_score"] for m in got if m["part"] in first][:n] == [
        r["image_score"] for r in published][:len(got)]
    # Scores equal offline inspection of the same frames, bitwise; fail-safe parts excluded.
    inspected = [r for r in published if not r["reason"]]
    assert len(inspected) >= n - 2
    assert [r["image_score"] for r in inspected] == offline_scores(inspector, tmp_path, inspected)
    # The camera's own frame ids and time stamps are carried; the outage is counted.
    assert all(r["frame_id"] is not None and r["camera_timestamp_ns"] for r in published)
    c = station.source.counters
    assert c.reconnects == 1 and c.lost_s >= 1.0 and c.missed_estimate >= 10
    # OPC UA: the station's state and the last result, read by a client.
    assert values["State"] == "Operational" and values["IsSimulated"] is True
    assert values["PartsInspected"] >= after + 5
    last = json.loads(values["LastResult.Json"])
    assert last["part"] == values["LastResult.Sequence"] and last["station"] == "line1"
    # The retained last verdict and the station's offline state after a clean stop.
    retained = Subscriber(broker, "line/line1/#", client_id="late-reader")
    late = dict(retained.wait_for(2, timeout_s=10, every=True))
    retained.stop()
    assert late["line/line1/state"] == "offline"
    assert json.loads(late["line/line1/last"])["part"] == n


NODE_OPCUA = ROOT / ".ci" / "node" / "node_modules" / "node-opcua-client"


def node_reader(port: int, names: list[str], call: tuple = ()) -> dict:
    """tests/opcua_reader.js: node-opcua reads the variables (and calls a method)."""
    out = subprocess.run(["node", str(ROOT / "tests" / "opcua_reader.js"),
                          f"opc.tcp://127.0.0.1:{port}/station/", "line1", ",".join(names),
                          *call], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "NODE_PATH": str(NODE_OPCUA.parent)})
    assert out.returncode == 0, out.stderr[-2000:]
    # node-opcua logs on stdout too: the answer is the one line that is a JSON object
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.skipif(not NODE_OPCUA.is_dir() or shutil.which("node") is None,
                    reason="node-opcua-client not installed: .ci/run installs it with npm into "
                           ".ci/node (npm install --prefix .ci/node node-opcua-client@2)")
def test_a_node_opcua_client_triggers_a_part_through_the_cameras_software_trigger(
        tmp_path, inspector, camera, broker):
    opcua_port = free_port()
    station, worker = start(config(tmp_path, broker, opcua_port, trigger="camera"), inspector)
    wait(lambda: station.source_up, what="the camera")
    time.sleep(0.5)  # no frame comes without a trigger
    out = node_reader(opcua_port, ["ActiveProduct"], ("StartSingleJob", "m-17"))
    wait(lambda: station.counts["parts"] >= 1, what="the triggered part")
    refused = node_reader(opcua_port, [], ("PrepareProduct", "nope"))
    values = node_reader(opcua_port, ["LastResult.MeasId", "LastResult.PartId",
                                      "LastResult.Verdict", "LastResult.Sequence", "State"])
    station.stop()
    worker.join(30)
    assert out["ActiveProduct"] == CATEGORY and out["StartSingleJob"] == [
        values["LastResult.PartId"]]
    assert values["LastResult.MeasId"] == "m-17" and values["LastResult.Verdict"] in ("OK", "NG")
    assert values["LastResult.Sequence"] == 1 and values["State"] == "Operational"
    assert refused["PrepareProduct"] == [False]
    (r,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert r["trigger"] == "opcua" and r["frame_id"] is not None and not r["reason"]
    # The camera's software trigger: one frame for the one trigger, none free-running.
    assert station.source.counters.frames == 1 and station.triggers.frames_unused == 0


def test_a_slow_sink_delays_neither_inspection_nor_mqtt(tmp_path, inspector, camera, broker):
    reader = Subscriber(broker, "line/line1/result", client_id="slow-test")
    time.sleep(0.3)
    cfg = config(tmp_path, broker, free_port(), extra="[sinks.slow]\ndelay_s = 1.0\n")
    cfg["station"]["drain_s"] = 0.5
    station, worker = start(cfg, inspector)
    wait(lambda: len(reader.messages) >= 15, what="15 results over MQTT")
    station.stop()
    worker.join(30)
    reader.stop()
    slow = next(s for s in station.sinks if s.name == "slow")
    assert slow.count <= 3 and station.counts["fail_safe"] == 0
    mqtt = station.metrics.latencies.percentiles("publish:mqtt")
    assert mqtt["n"] >= 15 and mqtt["p50_ms"] < 500


def test_an_mqtt_message_triggers_a_part_and_the_outbox_survives_a_restart(
        tmp_path, inspector, camera, broker):
    cfg = config(tmp_path, broker, free_port(), trigger="mqtt")
    station, worker = start(cfg, inspector)
    wait(lambda: station.source_up, what="the camera")
    subprocess.run([shutil.which("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(broker.port),
                    "-t", "line/line1/trigger", "-q", "1", "-m", '{"meas_id": "lot-9"}'],
                   check=True, timeout=10)
    wait(lambda: station.counts["parts"] >= 1, what="the part the message triggered")
    # The broker goes away; the next part's result waits in the outbox on disk, through a
    # station restart, and is delivered once the broker is back.
    broker.stop()
    station.trigger("http", "while-down")
    wait(lambda: station.counts["parts"] >= 2, what="the second part")
    station.stop()
    worker.join(30)
    assert next(s for s in station.sinks if s.name == "mqtt").backlog == 1
    reader = Subscriber(broker.start(), "line/line1/result", client_id="after-restart")
    time.sleep(0.3)
    station, worker = start(config(tmp_path, broker, free_port(), trigger="mqtt"), inspector)
    got = reader.wait_for(1, timeout_s=20)
    station.stop()
    worker.join(30)
    reader.stop()
    first = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert first[0]["meas_id"] == "lot-9" and first[0]["trigger"] == "mqtt"
    assert [m["meas_id"] for m in got] == ["while-down"]


@pytest.mark.parametrize("fmt", ["Mono8", "Mono16", "BayerRG8"])
def test_the_fake_cameras_pixel_formats_arrive_as_rgb(camera, fmt):
    from clipinspect.runtime.station.aravis import AravisSource
    source = AravisSource(pixel_format=fmt, frame_rate=20.0, region=[0, 0, 64, 48])
    source.open()
    try:
        frame = None
        deadline = time.monotonic() + 10
        while frame is None and time.monotonic() < deadline:
            frame = source.read(0.2)
    finally:
        source.close()
    assert source.format == fmt and frame is not None
    assert frame.image.shape == (48, 64, 3) and frame.image.dtype == np.uint8
    if fmt.startswith("Mono"):
        assert (frame.image[..., 0] == frame.image[..., 2]).all()
    assert frame.frame_id and frame.camera_timestamp_ns
