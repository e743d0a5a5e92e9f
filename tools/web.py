"""``http_get``: fetch a URL over httpx with a size and a time limit.

Load it by path: ``--tools tools/web.py``. Only http and https; the body is read as a
stream and cut at ``max_bytes`` (the rest is never downloaded); redirects are followed
(at most 5); text is returned decoded, other content types as a short description.
"""

from __future__ import annotations

from typing import Annotated

import httpx
from pydantic import Field

from agentloop import tool

MAX_BYTES = 1_000_000


@tool(timeout=30)
async def http_get(url: str, max_bytes: Annotated[int, Field(ge=1, le=MAX_BYTES)] = 100_000,
                   timeout_s: Annotated[float, Field(gt=0, le=25)] = 10.0) -> str:
    """Fetch a web page or API response with HTTP GET.

    Args:
        url: An http:// or https:// URL.
        max_bytes: Read at most this many bytes of the body.
        timeout_s: Give up after this many seconds.
    """
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"only http and https URLs, not {parsed.scheme!r}")
    async with httpx.AsyncClient(follow_redirects=True, max_redirects=5, timeout=timeout_s) as client:
        async with client.stream("GET", url, headers={"user-agent": "agentloop-http-get/1"}) as r:
            body = bytearray()
            truncated = False
            async for chunk in r.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:  # stop reading: the rest is never downloaded
                    truncated = True
                    del body[max_bytes:]
                    break
            ctype = r.headers.get("content-type", "")
            head = f"HTTP {r.status_code} {r.reason_phrase}; {ctype or 'no content type'}; {len(body)} bytes" + (
                " (truncated)" if truncated else "")
            if ctype.startswith("text/") or "json" in ctype or "xml" in ctype or not ctype:
                return head + "\n" + bytes(body).decode(r.encoding or "utf-8", errors="replace")
            return head + " (binary body not shown)"
