"""The web playground (``/`` and its files), ``/config`` for it, and ``/health``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from ...version import __version__
from ..config import ServerConfig
from ..deps import get_config
from ..errors import APIError
from ..store import TERMINAL

PLAYGROUND_DIR = Path(__file__).resolve().parents[1] / "playground"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index():
    return FileResponse(PLAYGROUND_DIR / "index.html", media_type="text/html",
                        headers={"content-security-policy": CSP, "cache-control": "no-cache"})


@router.get("/playground/{name}")
async def playground_asset(name: str):
    if name not in ASSETS:
        raise APIError(404, f"no such playground file: {name[:60]}", code="not_found")
    return FileResponse(PLAYGROUND_DIR / name, media_type=ASSETS[name], headers={"cache-control": "no-cache"})


@router.get("/favicon.ico")
async def favicon():
    return FileResponse(PLAYGROUND_DIR / "favicon.svg", media_type="image/svg+xml")


@router.get("/config")
async def server_config(config: ServerConfig = Depends(get_config)):
    return {"auth_required": bool(config.api_key), "max_tokens": config.max_tokens_cap,
            "max_upload_bytes": config.max_upload_bytes, "version": __version__,
            "job_final_statuses": list(TERMINAL)}


@router.get("/health")
async def health():
    return {"status": "ok"}
