"""Who may use the service: the API key (``X-API-Key`` on /v1/*, /metrics and the live page's
data) and the rule that an address other than loopback is served only with a key."""

from __future__ import annotations

import hmac
import ipaddress

from starlette.requests import Request

from ..core.errors import UsageError
from .errors import HTTPError

API_KEY_HEADER = "X-API-Key"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, api_key: str | None) -> str:
    """Refuse to serve another address without a key; returns the line to log about auth."""
    if api_key:
        return f"API key required in the {API_KEY_HEADER} header on /v1/* and /metrics"
    if not is_loopback(host):
        raise UsageError(f"--host {host} is reachable from other machines: an API key is "
                         "required there. Put one in a file and pass --api-key-file FILE (or set "
                         "CLIPINSPECT_API_KEY), or bind 127.0.0.1")
    return f"no API key: open to every process on this machine (loopback {host} only)"


def check_api_key(key: str | None) -> None:
    if key is not None and not (key.isascii() and key.isprintable() and key.strip() == key):
        # Header values are latin-1 on the wire; a key outside printable ASCII could never match.
        raise UsageError("the API key must be printable ASCII without surrounding spaces; "
                         "generate one with: python -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))'")


def authorized(request: Request, key: str | None) -> bool:
    """Whether ``request`` may see what the key protects (always, where no key is set)."""
    if key is None:
        return True
    given = request.headers.get(API_KEY_HEADER)
    # Header values arrive as latin-1; the key is ASCII (checked at start), compare bytes.
    return given is not None and hmac.compare_digest(given.encode("latin-1"), key.encode())


def authorize(request: Request, key: str | None) -> None:
    """Raises 401 (key missing, or wrong) unless ``request`` is :func:`authorized`."""
    if authorized(request, key):
        return
    if request.headers.get(API_KEY_HEADER) is None:
        raise HTTPError(401, "missing_api_key", f"this server requires an API key in the "
                        f"{API_KEY_HEADER} header")
    raise HTTPError(401, "wrong_api_key", f"the {API_KEY_HEADER} header does not match the "
                    "server's API key")
