"""``clipinspect station FILE``: one inspection station, from a camera to the PLC."""

from __future__ import annotations

import argparse
import math


def cmd_station(args: argparse.Namespace) -> int:
    from ..station.build import check_bundle, plan, run_station
    from ..station.config import load

    config = load(args.file)
    if args.check:
        inspector = check_bundle(config)
        from ..station.station import image_threshold
        b = config["bundle"]
        override = None if math.isnan(b["image_threshold"]) else b["image_threshold"]
        threshold = image_threshold(inspector, b["category"], b["mode"], override)
        for line in plan(config):
            print(line)
        print(f"image threshold: {threshold:.6g}" + (" (from the file)" if override is not None
                                                     else " (the bundle's)"))
        print(f"{args.file}: OK")
        return 0
    return run_station(config)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("station", help="run an inspection station (camera -> verdicts -> PLC) "
                                       "from a station file (docs/station.md)")
    p.add_argument("file", help="the station file (TOML)")
    p.add_argument("--check", action="store_true",
                   help="check the file and the bundle, print what would run, start nothing")
    p.set_defaults(func=cmd_station)
