"""``clipinspect station``: one long-running inspection station, from a camera to the PLC.

The parts, one module each: the station file (config.py), camera pixels to RGB (pixels.py),
the frame sources (sources.py; GigE Vision through Aravis in aravis.py), triggers and parts
(parts.py), the loop (station.py), the sinks (sinks.py; MQTT in mqtt.py, OPC UA in opcua.py),
metrics (metrics.py), the HTTP side (http.py) and putting them together (build.py).
docs/station.md is the user's description.
"""
