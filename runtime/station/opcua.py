"""The OPC UA sink: an OPC UA server (asyncua) per station, for the PLC.

Its nodes follow the names of OPC 40100 (OPC UA for Machine Vision) where they fit (the state
machine's top-level states, StartSingleJob, PrepareProduct, ResultId / PartId / MeasId,
IsSimulated), in a namespace of our own, ``urn:clipinspect:station:STATION``; this is a subset
and not the companion specification's information model (no VisionSystemType, no ResultReady
events, no recipe transfer). docs/station.md lists every node id. String node ids are stable:
``ns=<index of our namespace>;s=STATION.LastResult.Verdict``.

A result's variables are written in one Write service call, so a client reading several of
them in one Read request sees one result; ``LastResult.Json`` also holds the whole result in one
string. The server runs its own asyncio
loop in its own thread; a write that does not finish within a second fails (and is retried
like any sink's).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from typing import Callable

from ..core.errors import UsageError
from .sinks import Record, Sink, log

STATES = ("Preoperational", "Operational", "Halted", "Error")  # OPC 40100's top-level states
WRITE_TIMEOUT_S = 1.0


def asyncua_module():
    try:
        import asyncua
    except ImportError:
        raise UsageError("[sinks.opcua] needs asyncua: pip install 'clipinspect[station]'") \
            from None
    return asyncua


# (name, variant type name, initial value) of the station object's variables
STATION_VARIABLES = (("State", "String", "Preoperational"), ("Heartbeat", "UInt64", 0),
                     ("Bundle", "String", ""), ("Precision", "String", ""),
                     ("IsSimulated", "Boolean", False), ("ActiveProduct", "String", ""),
                     ("PartsInspected", "UInt64", 0), ("BudgetMisses", "UInt64", 0))
RESULT_VARIABLES = (("Sequence", "UInt64", 0), ("ResultId", "String", ""),
                    ("PartId", "String", ""), ("MeasId", "String", ""),
                    ("Verdict", "String", "UNKNOWN"), ("Reason", "String", ""),
                    ("ImageScore", "Double", math.nan), ("MapMax", "Double", math.nan),
                    ("Threshold", "Double", math.nan), ("LatencyMs", "Double", math.nan),
                    ("FrameId", "Int64", -1), ("Json", "String", ""))

KINDS = {name: kind for name, kind, _ in STATION_VARIABLES + RESULT_VARIABLES}


class OpcUaSink(Sink):
    name = "opcua"

    def __init__(self, options: dict, station: str, identity: dict, *,
                 on_trigger: Callable[[str, str], str] | None,
                 on_product: Callable[[str], bool], **kw):
        super().__init__(**kw)
        self.ua = asyncua_module()
        self.options, self.station, self.identity = options, station, identity
        self.on_trigger, self.on_product = on_trigger, on_product
        self.loop = asyncio.new_event_loop()
        self.nodes: dict[str, object] = {}
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.namespace_index = -1

    # ------------------------------------------------------------ server thread
    def open(self) -> None:
        self._server_thread = threading.Thread(target=self._serve, name="opcua-server",
                                               daemon=True)
        self._server_thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise UsageError(f"[sinks.opcua] endpoint {self.options['endpoint']!r} cannot be "
                             f"served: {self._error}") from None
        log(f"OPC UA server on {self.options['endpoint']} (namespace "
            f"urn:clipinspect:station:{self.station}, index {self.namespace_index})")

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as e:  # reported by open()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        ua, o = self.ua.ua, self.options
        server = self.ua.Server()
        await server.init()
        server.set_endpoint(o["endpoint"])
        server.set_server_name(f"clipinspect station {self.station}")
        if o["certificate"]:
            await server.load_certificate(o["certificate"])
            await server.load_private_key(o["private_key"])
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(f"urn:clipinspect:station:{self.station}")
        self.namespace_index = idx
        s = self.station
        root = await server.nodes.objects.add_object(f"ns={idx};s={s}", f"{idx}:{s}")
        for name, kind, value in STATION_VARIABLES:
            self.nodes[name] = await root.add_variable(f"ns={idx};s={s}.{name}", f"{idx}:{name}",
                                                       value, getattr(ua.VariantType, kind))
        result = await root.add_object(f"ns={idx};s={s}.LastResult", f"{idx}:LastResult")
        for name, kind, value in RESULT_VARIABLES:
            self.nodes[f"LastResult.{name}"] = await result.add_variable(
                f"ns={idx};s={s}.LastResult.{name}", f"{idx}:{name}", value,
                getattr(ua.VariantType, kind))
        String, Boolean = ua.VariantType.String, ua.VariantType.Boolean
        await root.add_method(f"ns={idx};s={s}.StartSingleJob", f"{idx}:StartSingleJob",
                              self._start_single_job, [String], [String])
        await root.add_method(f"ns={idx};s={s}.PrepareProduct", f"{idx}:PrepareProduct",
                              self._prepare_product, [String], [Boolean])
        self.server = server
        await server.start()
        self._beat = self.loop.create_task(self._heartbeat())
        await self._write({"Bundle": self.identity.get("identity", ""),
                           "Precision": self.identity.get("precision", ""),
                           "IsSimulated": self.identity.get("weights") == "random",
                           "ActiveProduct": self.identity.get("category", "")})

    def _start_single_job(self, parent, meas_id):
        ua = self.ua.ua
        if self.on_trigger is None:
            raise ua.UaStatusCodeError(ua.StatusCodes.BadNotSupported)
        job = self.on_trigger("opcua", str(meas_id.Value or "")[:128])
        return [ua.Variant(job, ua.VariantType.String)]

    def _prepare_product(self, parent, product):
        ua = self.ua.ua
        done = self.on_product(str(product.Value or ""))
        return [ua.Variant(bool(done), ua.VariantType.Boolean)]

    async def _heartbeat(self) -> None:
        beat = 0
        while True:
            beat += 1
            await self._write({"Heartbeat": beat})
            await asyncio.sleep(1.0)

    async def _write(self, values: dict) -> None:
        """Every value in one Write service call: a client's one Read request of several of
        them sees them all from the same result."""
        ua = self.ua.ua
        params = ua.WriteParameters()
        for name, value in values.items():
            item = ua.WriteValue()
            item.NodeId = self.nodes[name].nodeid
            item.AttributeId = ua.AttributeIds.Value
            kind = getattr(ua.VariantType, KINDS[name.split(".")[-1]])
            item.Value = ua.DataValue(ua.Variant(value, kind))
            params.NodesToWrite.append(item)
        for status in await self.server.iserver.isession.write(params):
            status.check()

    def set(self, values: dict) -> None:
        """Write station variables from any thread (state, counters, active product); never
        waits: the inspection and acquisition threads call it."""
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self._write(values), self.loop
                                             ).add_done_callback(self._report)

    @staticmethod
    def _report(done) -> None:
        if not done.cancelled() and done.exception() is not None:
            log(f"OPC UA server: a station variable could not be written: {done.exception()}")

    # ------------------------------------------------------------ the sink
    def publish(self, record: Record) -> None:
        p = record.payload
        number = (lambda v: math.nan if v is None else float(v))
        values = {"LastResult.ResultId": p["part_id"], "LastResult.PartId": p["part_id"],
                  "LastResult.MeasId": p["meas_id"] or "", "LastResult.Verdict": p["verdict"],
                  "LastResult.Reason": p["reason"] or "",
                  "LastResult.ImageScore": number(p["image_score"]),
                  "LastResult.MapMax": number(p["map_max"]),
                  "LastResult.Threshold": number(p["threshold"]),
                  "LastResult.LatencyMs": float(p["latency_ms"]["decision"]),
                  "LastResult.FrameId": -1 if p["frame_id"] is None else int(p["frame_id"]),
                  "LastResult.Json": json.dumps(p, allow_nan=False),
                  "LastResult.Sequence": int(p["part"])}
        asyncio.run_coroutine_threadsafe(self._write(values), self.loop).result(WRITE_TIMEOUT_S)

    def close(self) -> None:
        if not self.loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._write({"State": "Halted"}), self.loop).result(
                WRITE_TIMEOUT_S)
            self.loop.call_soon_threadsafe(self._beat.cancel)
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(5)
        except Exception as e:  # stopping anyway
            log(f"OPC UA server: {type(e).__name__} while stopping: {e}")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._server_thread.join(5)
