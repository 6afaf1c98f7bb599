"""``/v1/files``: uploads for fine-tuning, checked like ``tunesmith prepare`` checks a file."""

from __future__ import annotations

import os
import re
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import FileResponse

from ...atomic import DiskFull, reporting_full_disk
from ...corpus import validate_file
from ...errors import TunesmithError
from ..config import ServerConfig
from ..deps import get_config, get_store
from ..errors import APIError
from ..objects import file_object
from ..store import FILE_ID_RE, Store, new_id

EXT_RE = re.compile(r"^\.[a-z0-9]{1,10}$")

router = APIRouter()


def file_or_404(store: Store, file_id: str, param: str = "file_id") -> dict:
    if not FILE_ID_RE.match(file_id):
        raise APIError(400, f"invalid file id {file_id[:80]!r}: expected 'file-' and 24 hex digits",
                       param=param, code="invalid_file_id")
    row = store.get_file(file_id)
    if row is None:
        raise APIError(404, f"No such File object: {file_id}", param=param, code="file_not_found")
    return row


@router.post("/v1/files")
def upload_file(file: UploadFile = File(...), purpose: str = Form(...), store: Store = Depends(get_store),
                config: ServerConfig = Depends(get_config)):
    if purpose != "fine-tune":
        raise APIError(400, f"purpose '{purpose[:40]}' is not supported; tunesmith stores files for 'fine-tune'",
                       param="purpose")
    filename = Path((file.filename or "upload.txt").replace("\\", "/")).name[:255] or "upload.txt"
    ext = Path(filename).suffix.lower()
    if not EXT_RE.match(ext):
        raise APIError(400, f"{filename}: the file needs an extension that says its format "
                       "(.txt, .md, .jsonl, .json, .csv, .tsv or .xlsx)", param="file", code="invalid_file_format")
    file_id = new_id("file")
    store.files_dir.mkdir(parents=True, exist_ok=True)
    tmp = store.files_dir / f".upload-{file_id}{ext}"
    final = store.files_dir / f"{file_id}{ext}"
    try:
        with reporting_full_disk(final):
            size = _receive(file, tmp, filename, config.max_upload_bytes)
        if size == 0:
            raise APIError(400, f"{filename}: the file is empty", param="file", code="invalid_file_format")
        _validate_upload(tmp, filename)
        os.replace(tmp, final)
        return file_object(store.add_file(file_id, filename, final, size))  # acknowledged once it is on record
    except DiskFull:
        final.unlink(missing_ok=True)
        raise APIError(507, f"{filename}: the server's disk is full; the upload was not stored",
                       type="server_error", param="file", code="insufficient_storage") from None
    except BaseException:
        final.unlink(missing_ok=True)  # not on record (the database refused it): not kept either
        raise
    finally:
        tmp.unlink(missing_ok=True)


@router.get("/v1/files")
async def list_files(purpose: str | None = Query(default=None, max_length=40),
                     limit: int = Query(default=10000, ge=1, le=10000), store: Store = Depends(get_store)):
    rows = store.list_files(purpose)
    return {"object": "list", "data": [file_object(r) for r in rows[:limit]], "has_more": len(rows) > limit}


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, store: Store = Depends(get_store)):
    return file_object(file_or_404(store, file_id))


@router.get("/v1/files/{file_id}/content")
async def get_file_content(file_id: str, store: Store = Depends(get_store)):
    row = file_or_404(store, file_id)
    path = Path(row["path"])
    if path.parent.resolve() != store.files_dir.resolve() or not path.is_file():
        raise APIError(404, f"the content of {file_id} is missing", param="file_id", code="file_not_found")
    return FileResponse(path, media_type="application/octet-stream",
                        headers={"content-disposition": f'attachment; filename="{file_id}{path.suffix}"'})


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, store: Store = Depends(get_store)):
    file_or_404(store, file_id)
    users = store.jobs_using_file(file_id)
    if users:
        raise APIError(400, f"{file_id} is used by fine-tuning job {users[0]}, which has not finished; "
                       "cancel it first", param="file_id", code="file_in_use")
    store.delete_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


def _receive(file: UploadFile, target: Path, filename: str, limit: int) -> int:
    """Copy the upload to ``target`` in 1 MiB blocks; a file over ``limit`` bytes is a 413."""
    size = 0
    with open(target, "wb") as out:
        while True:
            block = file.file.read(1024 * 1024)
            if not block:
                return size
            size += len(block)
            if size > limit:
                raise APIError(413, f"{filename}: file too large: the limit is {limit:,} bytes",
                               param="file", code="file_too_large")
            out.write(block)


def _validate_upload(path: Path, filename: str) -> None:
    """Run the corpus checks on an upload; a problem becomes a 400 that names the line (and the
    user's file name, not our temporary one)."""
    try:
        validate_file(path)
    except TunesmithError as err:
        message = str(err).replace(str(path), filename).replace(path.name, filename)
        if err.file is None:
            message = f"{filename}: {message}"
        raise APIError(400, message, param="file", code="invalid_file_format") from None
