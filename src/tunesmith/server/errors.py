"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, and the handlers
that turn every failure (ours, FastAPI's validation, Starlette's routing) into that shape."""

from __future__ import annotations

import json
import re
import sqlite3
import traceback

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import TunesmithError

# pydantic names union branches ("str", "list[str]", "function-after[...]"); they are not fields
_BRANCH_RE = re.compile(
    r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|literal\[.*\]|function-.*|union\[.*\]|json-or-python\[.*\])$"
)


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


class RequestTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body too large: the limit is {limit:,} bytes")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_bytes(message: str, type: str, param: str | None, code: str | None) -> bytes:
    return json.dumps(error_body(message, type, param, code)).encode()


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def param_from_loc(loc: tuple) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``messages[0].role``."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    parts = [p for p in parts if not _BRANCH_RE.match(p)]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def _required_fields(request: Request) -> list[str]:
    """The required top-level parameters of the JSON body the matched route expects."""
    route = request.scope.get("route")
    names: list[str] = []
    for param in getattr(getattr(route, "dependant", None), "body_params", []):
        model = param.field_info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names += [name for name, field in model.model_fields.items() if field.is_required()]
    return names


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(400, "We could not parse the JSON body of your request: "
                              f"{(first.get('ctx') or {}).get('error', 'invalid JSON')}. "
                              "Send a valid JSON object.", param=None, code="invalid_json")
    param = param_from_loc(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing" and param is None:
        required = _required_fields(request)
        needs = f" with at least {', '.join(repr(n) for n in required)}" if required else ""
        message = f"The request body is missing: send a JSON object{needs}."
        code = "missing_required_parameter"
    elif first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
        code = "missing_required_parameter"
    else:
        message = f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}."
        code = "invalid_value"
    return error_response(400, message, "invalid_request_error", param, code)


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, RequestTooLarge):
        exc = exc.__cause__
    if exc.status_code == 404 and exc.detail in ("Not Found", None):
        return error_response(404, f"Unknown request URL: {request.method} {request.url.path}. "
                              "Please check the URL for typos.", code="unknown_url")
    if exc.status_code == 405:
        return error_response(405, f"Method {request.method} is not allowed for {request.url.path}.",
                              code="method_not_allowed")
    if exc.status_code == 413:
        return error_response(413, str(exc.detail), code="request_too_large")
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(exc.status_code, str(exc.detail), kind)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(TunesmithError)
    async def _tunesmith_error(request: Request, exc: TunesmithError):
        return error_response(400, str(exc), "invalid_request_error", exc.field, None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _http_error(request, exc)

    @app.exception_handler(sqlite3.OperationalError)
    async def _database(request: Request, exc: sqlite3.OperationalError):
        text = str(exc)
        if "locked" in text or "busy" in text:  # another process held the write lock past the busy timeout
            return error_response(503, "the server's job database is busy (another process has held it too long); "
                                  "nothing was changed: try again", "server_error", code="database_busy",
                                  headers={"Retry-After": "1"})
        if "full" in text:
            return error_response(507, "the server's disk is full; nothing was changed", "server_error",
                                  code="insufficient_storage")
        return await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        traceback.print_exception(exc)
        return error_response(500, f"The server had an error while processing your request: "
                              f"{type(exc).__name__}: {exc}", "server_error")
