"""GigE Vision / GenICam cameras through Aravis (PyGObject; the ``aravis`` extra and the
``gir1.2-aravis-0.8`` system package).

The camera is found by id, serial number or IP address (``[source] camera``; empty: the first
one), its pixel format, region, exposure and frame rate set from the station file, and frames
acquired continuously into ``buffers`` rotating buffers. A frame that arrives incomplete (any
status but success) is counted and not inspected; gaps in the frame ids (GigE Vision 1.x ids
count 1 to 65535 and wrap to 1) are counted as dropped. A camera that signals a lost control
connection, or sends nothing for ``frame_timeout_s`` while acquiring freely, raises
:class:`~.sources.SourceLost`; the station reconnects with back-off. With ``trigger = camera``
the station asks the camera for each part with a GenICam software trigger
(TriggerMode On, TriggerSource Software, TriggerSoftware).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..core.errors import UsageError
from .pixels import PIXEL_FORMATS_SUPPORTED, to_rgb
from .sources import Counters, Frame, SourceLost

ID_WRAP = 65535  # GigE Vision 1.x block ids: 1 .. 65535, then 1 again
SERIES_BREAK = 1000  # a larger jump in ids is a new series (a restarted camera), not drops


def aravis_module():
    """``gi.repository.Aravis``, or a one-line error naming what to install."""
    try:
        import gi
    except ImportError:
        raise UsageError("[source] kind = 'aravis' needs PyGObject: pip install "
                         "'clipinspect[aravis]' (it builds against the system's "
                         "libgirepository1.0-dev and libcairo2-dev; docs/station.md)") from None
    try:
        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ValueError, ImportError):
        raise UsageError("[source] kind = 'aravis' needs Aravis's GObject bindings, which are "
                         "not installed: apt-get install gir1.2-aravis-0.8 (Debian/Ubuntu; "
                         "aravis-tools has the fake camera for trying)") from None
    return Aravis


def dropped_between(last: int | None, frame_id: int) -> int:
    """Frames the ids say were skipped between ``last`` and ``frame_id`` (16-bit wrap
    aware); 0 for the first frame or a new series."""
    if last is None:
        return 0
    steps = (frame_id - last) % ID_WRAP if max(last, frame_id) <= ID_WRAP else frame_id - last
    return steps - 1 if 0 < steps <= SERIES_BREAK else 0


def find_camera(Aravis, wanted: str) -> str:
    """The Aravis device id of the camera whose id, serial number or address is ``wanted``."""
    Aravis.update_device_list()
    found = []
    for i in range(Aravis.get_n_devices()):
        ids = (Aravis.get_device_id(i), Aravis.get_device_serial_nbr(i),
               Aravis.get_device_address(i))
        found.append(f"{ids[0]} (serial {ids[1]}, {ids[2]})")
        if not wanted or wanted in ids:
            return ids[0]
    raise SourceLost(f"no GigE Vision camera {wanted!r} found" + (
        f"; found: {'; '.join(found)}" if found else
        " (none found: check the cable, the camera's power and that the host's network "
        "interface is on the camera's subnet)"))


@dataclass
class AravisSource:
    camera: str = ""
    pixel_format: str = ""
    frame_rate: float = 0.0
    exposure_us: float = 0.0
    region: list[int] = field(default_factory=list)
    buffers: int = 8
    frame_timeout_s: float = 2.0
    software_trigger: bool = False
    name: str = "aravis"
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self):
        self.Aravis = aravis_module()
        self._cam = self._stream = None
        self._last_id: int | None = None
        self._last_frame = 0.0
        self._lost = False
        self.device_id = ""

    def open(self) -> None:
        Aravis = self.Aravis
        self.device_id = find_camera(Aravis, self.camera)
        try:
            cam = Aravis.Camera.new(self.device_id)
            self._configure(cam)
            stream = cam.create_stream(None, None)
            for _ in range(self.buffers):
                stream.push_buffer(Aravis.Buffer.new_allocate(cam.get_payload()))
            cam.get_device().connect("control-lost", self._control_lost)
            cam.start_acquisition()
        except Exception as e:  # GLib.Error from the device
            raise SourceLost(f"camera {self.device_id!r} cannot be set up: {e}") from None
        self._cam, self._stream = cam, stream
        self.format = cam.get_pixel_format_as_string()
        self._last_id, self._lost = None, False
        self._last_frame = time.monotonic()

    def _configure(self, cam) -> None:
        if self.pixel_format:
            cam.set_pixel_format_from_string(self.pixel_format)
        if self.region:
            cam.set_region(*self.region)
        if self.exposure_us:
            cam.set_exposure_time(self.exposure_us)
        if self.frame_rate:
            cam.set_frame_rate(self.frame_rate)
        if self.software_trigger:
            if not cam.is_software_trigger_supported():
                raise UsageError(f"camera {self.device_id!r} has no software trigger; use "
                                 "[trigger] kind = 'free', 'opcua', 'mqtt' or 'http'")
            cam.set_trigger("Software")
        else:
            cam.clear_triggers()
        fmt = cam.get_pixel_format_as_string()
        if fmt not in PIXEL_FORMATS_SUPPORTED:
            raise UsageError(f"camera {self.device_id!r} sends {fmt}, which the station does not "
                             f"convert; set [source] pixel_format to one of "
                             f"{', '.join(PIXEL_FORMATS_SUPPORTED)}")

    def _control_lost(self, *args) -> None:
        self._lost = True  # a GLib thread: the reading thread raises

    def trigger(self) -> None:
        """Ask the camera for one frame (software trigger)."""
        if self._cam is not None:
            self._cam.software_trigger()

    def read(self, timeout_s: float) -> Frame | None:
        if self._lost:
            raise SourceLost(f"camera {self.device_id!r} lost its control connection")
        buf = self._stream.timeout_pop_buffer(int(timeout_s * 1e6))
        now = time.monotonic()
        if buf is None:
            # A slow frame rate is not a lost camera: wait at least three frame periods.
            patience = max(self.frame_timeout_s, 3.0 / self.frame_rate if self.frame_rate else 0)
            if not self.software_trigger and now - self._last_frame > patience:
                raise SourceLost(f"camera {self.device_id!r} sent no frame for "
                                 f"{now - self._last_frame:.1f} s")
            return None
        self._last_frame = now
        arrival_ns = time.time_ns()
        try:
            if buf.get_status() != self.Aravis.BufferStatus.SUCCESS:
                self.counters.incomplete += 1
                return None
            frame_id = buf.get_frame_id()
            self.counters.dropped += dropped_between(self._last_id, frame_id)
            self._last_id = frame_id
            rgb = to_rgb(buf.get_data(), self.format, buf.get_image_width(),
                         buf.get_image_height())
            self.counters.frames += 1
            return Frame(rgb, now, arrival_ns, frame_id=frame_id,
                         camera_timestamp_ns=buf.get_timestamp() or None)
        finally:
            self._stream.push_buffer(buf)

    def close(self) -> None:
        cam, self._cam, self._stream = self._cam, None, None
        if cam is not None:
            try:
                cam.stop_acquisition()
            except Exception:  # the camera is gone: nothing to stop
                pass
