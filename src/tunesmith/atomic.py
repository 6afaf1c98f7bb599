"""Atomic writes: readers see the old file or the whole new one, never half of one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import TunesmithError

FULL_BELOW = 1 << 20  # after a failed write, less free space than this means the disk filled up


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def disk_full(err: BaseException, where: Path) -> bool:
    """Whether ``err`` came from a full disk: ENOSPC or EDQUOT, or a library's own error (torch.save
    raises a bare RuntimeError) while the disk holding ``where`` is all but full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(err):
        return True
    try:
        return shutil.disk_usage(where).free < FULL_BELOW
    except OSError:
        return False


class DiskFull(TunesmithError):
    """A write failed because the disk is full; nothing was half-written."""

    def __init__(self, path: Path):
        super().__init__("the disk is full: this could not be written, and whatever was there before is kept as it was",
                         file=path, hint="free some space, then run the command again")


@contextmanager
def reporting_full_disk(path: Path) -> Iterator[None]:
    """Inside, a write that fails for lack of disk space becomes ``DiskFull`` naming ``path`` (also
    when it came from a temporary file inside ``path``: the user knows ``path``)."""
    try:
        yield
    except DiskFull as err:
        raise err if err.file == str(path) else DiskFull(path) from None
    except (TunesmithError, KeyboardInterrupt):
        raise
    except Exception as err:
        if not disk_full(err, path if path.exists() else path.parent):
            raise
        raise DiskFull(path) from None


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with reporting_full_disk(path):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one line and flush it; a crash loses at most this line."""
    with reporting_full_disk(Path(path)), open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


@contextmanager
def atomic_dir(
    path: str | Path, overwrite: bool = False, replace_if: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Build a directory under a temporary name, then move it to ``path`` in one rename.

    An existing ``path`` is replaced only with ``overwrite``, and then only a directory for which
    ``replace_if(path)`` holds (when given), checked just before the rename; else FileExistsError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should be an ordinary directory
    try:
        with reporting_full_disk(path):
            yield tmp
        if path.exists() or path.is_symlink():
            if not overwrite or (replace_if is not None and not replace_if(path)):
                raise FileExistsError(path)
            old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")  # unique, like tmp
            os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
