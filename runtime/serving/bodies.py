"""Reading a request's body under the service's limits: its size, the time it may take to
arrive, and the image out of a multipart form."""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from .config import ServeConfig
from .errors import HTTPError


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit``, and with 408 if
    it has not all arrived within ``timeout_s`` (a client trickling bytes holds no slot)."""
    declared = request.headers.get("content-length", "")
    too_big = HTTPError(413, "body_too_large", f"request body over the limit of {limit} bytes; "
                        "send a smaller image or raise --max-body-mb")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPError(408, "body_timeout", f"the request body did not arrive within "
                        f"{timeout_s:g} s ({size} bytes received); send it at once") from None
    return b"".join(chunks)


async def image_and_fields(request: Request, config: ServeConfig) -> tuple[bytes, dict[str, str]]:
    """(image bytes, form fields): multipart with an ``image`` part, or the raw body."""
    body = await read_body(request, config.max_body_bytes, config.body_timeout_s)
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if ctype != "multipart/form-data":
        if not (ctype.startswith("image/") or ctype == "application/octet-stream"):
            raise HTTPError(415, "unsupported_media_type",
                            f"content type {ctype!r} is not accepted: send the image file as the "
                            "body (image/* or application/octet-stream) or as multipart/form-data "
                            "with an 'image' part")
        return body, {}

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8,
                                                           max_part_size=64 * 1024)
    except Exception as e:  # starlette raises its own HTTPException or MultiPartException
        raise HTTPError(400, "bad_multipart", f"the multipart body cannot be parsed: "
                        f"{getattr(e, 'detail', None) or e}") from None
    try:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPError(400, "missing_image", "the multipart body has no file part named "
                            "'image'")
        data = await upload.read()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    finally:
        await form.close()
    return data, fields
