"""``clipinspect feedback``, ``memory show|log|undo``, ``promote`` and ``rollback``: what an
operator does to a bundle's few-shot memory and to a running service (docs/operations.md)."""

from __future__ import annotations

import argparse
import getpass
import json
import time
from pathlib import Path

from ..core.errors import UsageError
from .options import add_bundle, add_category, add_precision, one_of, positive_int

LABEL_WORDS = ("false-alarm", "confirmed-defect", "missed-defect")
POLICY_WORDS = ("keep", "refit")


def _who(args: argparse.Namespace) -> str:
    if args.who:
        return args.who
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _open(args: argparse.Namespace):
    from ..core.inspector import Inspector
    return Inspector.open(args.bundle, args.precision)


def cmd_feedback(args: argparse.Namespace) -> int:
    from ..core.memory_book import FeedbackPolicy, MemoryBook

    path = Path(args.image)
    if not path.is_file():
        raise UsageError(f"image {args.image!r} is not a file: give the image of the part the "
                         "verdict was about")
    inspector = _open(args)
    row = MemoryBook(inspector.bundle.root).feedback(
        inspector, args.category, path.read_bytes(), args.label.replace("-", "_"),
        who=_who(args), result_id=args.result_id,
        policy=FeedbackPolicy(args.threshold_policy, args.memory_max))
    _print_change(row)
    return 0


def _print_change(row: dict) -> None:
    b, a = row["before"], row["after"]
    print(f"#{row['id']} {row['action']} on {row['category']} by {row['who']}: memory "
          f"{_short(b['memory'])} ({b['shots']} shots) -> {_short(a['memory'])} "
          f"({a['shots']} shots)")
    for source in row.get("evicted") or []:
        print(f"  left the memory (full): {source}")
    for key in row.get("refit") or []:
        print(f"  threshold {key}: {b['thresholds'].get(key, {}).get('image')} -> "
              f"{a['thresholds'].get(key, {}).get('image')}")
    if row.get("image"):
        print(f"  image kept as {row['image']}")


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "none"


def cmd_memory(args: argparse.Namespace) -> int:
    from ..core.memory_book import MemoryBook

    inspector = _open(args)
    inspector.bundle.entry(args.category)
    book = MemoryBook(inspector.bundle.root)
    if args.action == "undo":
        _print_change(book.undo(inspector, args.category, who=_who(args)))
        return 0
    if args.action == "log":
        rows = book.entries(args.category)
        if args.json:
            print(json.dumps(rows, indent=2))
        for row in [] if args.json else rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["time"]))
            undoes = f" (undoes #{row['undoes']})" if row.get("undoes") else ""
            print(f"#{row['id']:<4} {when}  {row['action']:<16} {row['who']:<14} "
                  f"{_short(row['before']['memory'])} -> {_short(row['after']['memory'])}"
                  f"{undoes}  {row.get('result_id') or ''}")
        if not rows and not args.json:
            print(f"no feedback recorded for {args.category!r}")
        return 0
    state = book.state(inspector, args.category)
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    print(f"category   {args.category}: memory {_short(state['memory'])}, {state['shots']} "
          "reference images")
    for source in state["sources"]:
        print(f"  {'feedback' if source.startswith('feedback/') else 'fewshot '}  {source}")
    for key, t in sorted(state["thresholds"].items()):
        print(f"threshold  {key}: image {t.get('image')}, pixel {t.get('pixel')} "
              f"({t.get('method', '?')})")
    return 0


def cmd_swap(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    from .inspection import _api_key

    key = _api_key(args.api_key_file)
    url = args.url.rstrip("/") + ("/v1/admin/promote" if args.command == "promote"
                                  else "/v1/admin/rollback")
    headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key else {})}
    request = urllib.request.Request(url, json.dumps({"who": _who(args)}).encode(), headers,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            text = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise UsageError(f"{url} answered {e.code}: {text[:300]}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UsageError(f"{url}: {getattr(e, 'reason', e)}; is 'clipinspect serve' running "
                         "there?") from None
    print(f"{body['status']}: active {body['active']} (was {body['active_before']}), shadow "
          f"{body['shadow']}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    add_bundle(p)
    add_category(p)
    add_precision(p, help="the precision whose graphs encode the image (default fp32)")
    p.add_argument("--who", default=None, help="who gives the feedback (default: the user)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("feedback", help="an operator's verdict on a result: a false alarm "
                       "joins the few-shot memory")
    _common(p)
    p.add_argument("image", help="the part's image file")
    p.add_argument("--label", required=True, choices=LABEL_WORDS, type=one_of(LABEL_WORDS))
    p.add_argument("--result-id", default=None, help="the result's id (journal, page)")
    p.add_argument("--threshold-policy", default="keep", choices=POLICY_WORDS,
                   type=one_of(POLICY_WORDS),
                   help="keep the thresholds (default), or refit them from their normal images "
                        "and the references added by feedback")
    p.add_argument("--memory-max", type=positive_int, default=32,
                   help="most reference images; when full the oldest added by feedback leaves "
                        "(default 32)")
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("memory", help="a category's few-shot memory: show, log, undo")
    p.add_argument("action", choices=("show", "log", "undo"))
    _common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_memory)

    for name, text in (("promote", "make a running serve's shadow bundle the active one"),
                       ("rollback", "undo the last promote of a running serve")):
        p = sub.add_parser(name, help=text)
        p.add_argument("url", help="the server, e.g. http://127.0.0.1:8080")
        p.add_argument("--api-key-file", default=None,
                       help="file holding the server's API key (or set CLIPINSPECT_API_KEY)")
        p.add_argument("--who", default=None)
        p.add_argument("--timeout", type=float, default=120.0,
                       help="seconds to wait for the swap (default 120)")
        p.set_defaults(func=cmd_swap)

