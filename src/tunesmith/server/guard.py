"""What every request passes before it reaches a route: the host and origin checks (DNS rebinding,
other web pages), the API key, and the body size limits.

A pure ASGI middleware, so it also guards unknown routes and bodies that arrive while streaming.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from .config import ServerConfig
from .errors import RequestTooLarge, error_bytes

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MULTIPART_SLACK = 64 * 1024  # an upload's multipart framing on top of the file itself


class GuardMiddleware:
    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refusal(path, headers)
        if refusal is not None:
            status, body, extra = refusal
            return await _send_json(send, status, body, extra)
        upload = path.rstrip("/") == "/v1/files"
        limit = self.config.max_upload_bytes if upload else self.config.max_body_bytes
        slack = MULTIPART_SLACK if upload else 0
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit + slack:
                    raise RequestTooLarge(limit)
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        return await self.app(scope, limited_receive, guarded_send)

    def _refusal(self, path: str, headers: dict) -> tuple[int, bytes, list] | None:
        """(status, body, extra headers) when the request must not go further, else None."""
        config = self.config
        host = headers.get("host", "")
        if config.allowed_hosts is not None and hostname(host) not in config.allowed_hosts:
            return 403, error_bytes(
                f"requests addressed to host '{hostname(host)[:100]}' are not accepted: this server listens on "
                "a loopback address", "invalid_request_error", None, "forbidden_host"), []
        origin = headers.get("origin")
        if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host.lower()):
            # Browsers send Origin on cross-site requests: another web page must not drive this API.
            return 403, error_bytes("cross-origin requests are not accepted", "invalid_request_error", None,
                                    "cross_origin"), []
        if config.api_key and (path == "/v1" or path.startswith("/v1/")):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode("utf-8", "replace"), config.api_key.encode("utf-8")
            )
            if not ok:
                message = ("Incorrect API key provided." if auth else
                           "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.")
                return 401, error_bytes(message, "invalid_request_error", None, "invalid_api_key"), \
                    [(b"www-authenticate", b"Bearer")]
        upload = path.rstrip("/") == "/v1/files"
        limit = config.max_upload_bytes if upload else config.max_body_bytes
        length = headers.get("content-length")
        try:
            too_big = length is not None and int(length) > limit + (MULTIPART_SLACK if upload else 0)
        except ValueError:
            too_big = False
        if too_big:
            return 413, error_bytes(f"request body too large: the limit is {limit:,} bytes",
                                    "invalid_request_error", None, "request_too_large"), []
        return None


def hostname(host: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _send_json(send, status: int, body: bytes, extra: list | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
