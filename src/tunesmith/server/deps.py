"""What the routes share, built once by ``create_app`` and kept on ``app.state``; routes receive
it through ``Depends``."""

from __future__ import annotations

from fastapi import Request

from .catalog import Catalog
from .config import ServerConfig
from .generation import Generator
from .store import Store
from .supervisor import Supervisor


async def get_config(request: Request) -> ServerConfig:
    return request.app.state.config


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


async def get_generator(request: Request) -> Generator:
    return request.app.state.generator


async def get_supervisor(request: Request) -> Supervisor:
    return request.app.state.supervisor
