"""The MQTT sink (paho-mqtt 2.x): one JSON result per part, nothing lost while the broker is down.

Topics, with ``T`` = ``[sinks.mqtt] topic`` (default ``clipinspect/STATION``):

- ``T/result``: every part's result, QoS 1, in part order;
- ``T/last``: the latest result, retained (a PLC connecting later reads the last verdict);
- ``T/state``: ``online`` (retained) while connected; the broker publishes the retained last
  will ``offline`` if the station disappears without saying goodbye, and the station publishes
  it itself when it stops;
- ``T/trigger``: with ``[trigger] kind = 'mqtt'``, each message triggers a part (its payload,
  if any, is the measurement id returned with the result).

Every result is first written to an outbox on disk (SQLite, synchronous commits), then
published one at a time; a row leaves the outbox only when the broker has acknowledged it
(PUBACK). While the broker is down results wait there, bounded by ``outbox_max`` (the oldest are
dropped beyond it, counted), and are delivered in order once it is back; a station restarted
with rows in its outbox delivers them first. Delivery is at least once, as QoS 1 is: a
result whose acknowledgement was lost with the connection is sent again, so readers that must
not count a part twice use its ``part_id``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from ..core.errors import UsageError
from .sinks import Record, Sink, log

STATE_ONLINE, STATE_OFFLINE = "online", "offline"


def paho():
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise UsageError("[sinks.mqtt] needs paho-mqtt: pip install 'clipinspect[station]'") \
            from None
    if not hasattr(mqtt, "CallbackAPIVersion"):
        raise UsageError("[sinks.mqtt] needs paho-mqtt 2.x (CallbackAPIVersion); pip install "
                         "'paho-mqtt>=2.2,<3'")
    return mqtt


class Outbox:
    """Results not yet acknowledged by the broker, on disk, oldest first."""

    def __init__(self, path: str | Path, max_rows: int):
        self.path, self.max_rows, self.dropped = Path(path), max_rows, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._left = 0  # rows left when it was closed
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY "
                         "AUTOINCREMENT, payload TEXT NOT NULL)")

    def append(self, payload: str) -> int:
        with self._lock:
            row = self._db.execute("INSERT INTO outbox (payload) VALUES (?)", (payload,)).lastrowid
            over = self._count() - self.max_rows
            if over > 0:
                self._db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY "
                                 "id LIMIT ?)", (over,))
                self.dropped += over
                log(f"sink mqtt: outbox over {self.max_rows} results: {self.dropped} oldest "
                    "dropped")
            return row

    def oldest(self) -> tuple[int, str] | None:
        with self._lock:
            return self._db.execute("SELECT id, payload FROM outbox ORDER BY id LIMIT 1"
                                    ).fetchone()

    def remove(self, row: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (row,))

    def _count(self) -> int:
        return self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def __len__(self) -> int:
        with self._lock:
            if self._db is not None:
                self._left = self._count()
            return self._left

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._left = self._count()
                self._db.close()
                self._db = None


class MqttSink(Sink):
    name = "mqtt"
    confirms_itself = True

    def __init__(self, options: dict, station: str, on_trigger=None, **kw):
        super().__init__(**kw)
        self.options, self.station, self.on_trigger = options, station, on_trigger
        self.topic = options["topic"].rstrip("/")
        self.outbox = Outbox(options["outbox"], options["outbox_max"])
        self.connected = threading.Event()
        self._wake = threading.Condition()
        self._records: dict[int, Record] = {}  # outbox row -> record of this run (latency)
        self._running = True
        self._client = self._make_client()
        self._delivery = threading.Thread(target=self._deliver, name="sink-mqtt-delivery",
                                          daemon=True)

    def _make_client(self):
        mqtt, o = paho(), self.options
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=o["client_id"] or f"clipinspect-{self.station}")
        if o["username"]:
            password = None
            if o["password_file"]:
                try:
                    password = Path(o["password_file"]).read_text().strip()
                except OSError as e:
                    raise UsageError(f"[sinks.mqtt] password_file {o['password_file']!r} "
                                     f"cannot be read: {e}") from None
            client.username_pw_set(o["username"], password)
        if o["tls"]:
            client.tls_set(ca_certs=o["ca_file"] or None, certfile=o["cert_file"] or None,
                           keyfile=o["key_file"] or None)
        client.will_set(f"{self.topic}/state", STATE_OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # ---------------------------------------------------------------- paho's thread
    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            self.up, self.reason = False, f"the broker refused the connection: {reason_code}"
            log(f"sink mqtt: {self.reason}")
            return
        client.publish(f"{self.topic}/state", STATE_ONLINE, qos=1, retain=True)
        if self.on_trigger is not None:
            client.subscribe(f"{self.topic}/trigger", qos=1)
        self.up, self.reason = True, ""
        self.connected.set()
        log(f"sink mqtt: connected to {self.options['host']}:{self.options['port']}, "
            f"{len(self.outbox)} result(s) waiting in the outbox")
        with self._wake:
            self._wake.notify()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        if self.connected.is_set():
            log(f"sink mqtt: disconnected from the broker ({reason_code}); results wait in "
                f"{self.outbox.path}")
        self.connected.clear()
        self.up, self.reason = False, f"disconnected from the broker ({reason_code})"

    def _on_message(self, client, userdata, message):
        text = message.payload.decode("utf-8", "replace").strip()
        try:
            meas_id = str(json.loads(text).get("meas_id", "")) if text.startswith("{") else text
        except (ValueError, AttributeError):
            meas_id = text
        self.on_trigger("mqtt", meas_id[:128])

    # ---------------------------------------------------------------- the sink
    def open(self) -> None:
        o = self.options
        self.up, self.reason = False, "connecting"
        self._client.connect_async(o["host"], o["port"], keepalive=o["keepalive_s"])
        self._client.loop_start()
        self._delivery.start()

    def publish(self, record: Record) -> None:
        row = self.outbox.append(json.dumps(record.payload, allow_nan=False))
        self._records[row] = record
        with self._wake:
            self._wake.notify()

    def _deliver(self) -> None:
        """Publish the outbox's oldest row, wait for its acknowledgement, remove it; again."""
        while self._running:
            row = self.outbox.oldest() if self.connected.is_set() else None
            if row is None:
                with self._wake:
                    self._wake.wait(0.5)
                continue
            row_id, payload = row
            info = self._client.publish(f"{self.topic}/result", payload, qos=1)
            while self._running and not info.is_published():
                time.sleep(0.002)  # paho sends it again itself after a reconnection
            if not info.is_published():
                return
            self._client.publish(f"{self.topic}/last", payload, qos=1, retain=True)
            self.outbox.remove(row_id)
            record = self._records.pop(row_id, None)
            if record is not None:
                self.published(self, record, time.monotonic())

    @property
    def backlog(self) -> int:
        return len(self.outbox)

    def stop(self, timeout_s: float) -> int:
        """Deliver what the outbox holds for at most ``timeout_s``; what is left stays there
        for the next start."""
        deadline = time.monotonic() + timeout_s
        super().stop(timeout_s)  # the records queued for the outbox are in it
        while len(self.outbox) and self.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._running = False
        self._delivery.join(1.0)
        left = len(self.outbox)
        if self.connected.is_set():
            self._client.publish(f"{self.topic}/state", STATE_OFFLINE, qos=1,
                                 retain=True).wait_for_publish(1.0)
            self._client.disconnect()
        self._client.loop_stop()
        self.outbox.close()
        return left

    def health(self) -> dict:
        h = super().health()
        h["dropped"] += self.outbox.dropped
        return h
