"""Where training input comes from, and its bytes as lines of text, in bounded memory.

``input_files`` turns what the user named (a file, a folder of files, or a glob) into a sorted
list of files. ``TextFile`` reads one of them in blocks: it detects the encoding, decodes, turns
CRLF and CR line endings into LF, and yields ``(line number, text)``; however long a line is,
at most ``MAX_LINE`` characters of it are held at once. It notices a file that changes while
it is read. Nothing here needs a tokenizer; every problem is a ``TunesmithError`` that names
the file (and the line where there is one).

Encodings, by a fixed rule rather than a statistical guess, so the same bytes always decode the
same way: a UTF-16 byte-order mark means UTF-16; otherwise UTF-8 (a UTF-8 BOM is dropped) when
every byte decodes; otherwise Windows-1252 when every byte is defined there (a file with no byte
in 0x80-0x9F is reported as Latin-1, which decodes identically); anything else, and any NUL byte,
is rejected as binary.
"""

from __future__ import annotations

import codecs
import errno
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import TunesmithError
from .wording import counted

BLOCK = 1 << 20  # bytes read at a time
MAX_LINE = 1 << 20  # characters of one line held at once; a longer line is broken at spaces
_GLOB_CHARS = set("*?[")
# Bytes that Windows-1252 leaves undefined: a file with them is neither Windows-1252 nor text.
_CP1252_UNDEFINED = bytes([0x81, 0x8D, 0x8F, 0x90, 0x9D])
_C1 = bytes(range(0x80, 0xA0))


def input_files(spec: str | Path, suffixes: set[str], describe: str) -> tuple[Path, list[Path]]:
    """``(what the user named, the files it stands for)``: the file itself; a folder's files
    with one of ``suffixes``, recursively, hidden ones skipped; or a glob's matches. Sorted by
    path, so the order (and everything computed from it) is the same on every run."""
    path = Path(spec)
    text = str(spec)
    if not os.path.lexists(path) and _GLOB_CHARS & set(text):
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not matches:
            raise TunesmithError("no file matches this pattern", file=text, hint=f"a pattern such as 'books/*.txt' ({describe})")
        return path, matches
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.suffix.lower() in suffixes and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise TunesmithError(
                "this folder holds no file tunesmith can read", file=path, hint=f"put files of these types in it: {describe}"
            )
        return path, files
    require_file(path)
    return path, [path]


def require_file(path: Path) -> None:
    """Raise a ``TunesmithError`` unless ``path`` is an existing file; a broken link says why."""
    if not path.exists():
        if path.is_symlink():
            _raise_broken_link(path)
        raise TunesmithError("no such file", file=path, hint="check the path; it is relative to the current directory")
    if path.is_dir():
        raise TunesmithError("this is a directory, not a file", file=path, hint="pass one file, or the folder to prepare all of it")
    if not path.is_file():
        raise TunesmithError("this is not a regular file (a device, pipe or socket)", file=path, hint="pass a file")


def _raise_broken_link(path: Path) -> None:
    """A symbolic link that leads nowhere: say whether it loops or names a missing file."""
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python before 3.13 reports a loop this way
        looped = True
    except OSError as exc:
        looped = exc.errno == errno.ELOOP
    else:
        looped = False
    if looped:
        raise TunesmithError(
            "this is a symbolic link that leads back to itself (a symlink loop)", file=path,
            hint="point the link at a real file, or pass the file itself",
        )
    raise TunesmithError(
        f"this is a symbolic link to '{os.readlink(path)}', which does not exist", file=path,
        hint="point the link at a real file, or pass the file itself",
    )


@dataclass
class TextFile:
    """One input file read as text, in blocks (see the module docstring)."""

    path: Path
    codec: str = ""
    fixes: list[str] = field(default_factory=list)
    size: int = 0
    done_bytes: int = 0  # of the pass now reading
    _stamp: tuple = ()

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        require_file(self.path)
        self._stamp = self._stat()
        self.size = self._stamp[0]
        self.codec = self._detect()

    def _stat(self) -> tuple:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise TunesmithError(f"cannot read the file: {exc.strerror or exc}", file=self.path) from None
        return st.st_size, st.st_mtime_ns, st.st_ino

    def check_unchanged(self) -> None:
        """Raise if the file was written to since it was opened (its size or time changed)."""
        if self._stat() != self._stamp:
            raise TunesmithError(
                "the file changed while it was being read", file=self.path,
                hint="run again once whatever writes it has finished (or prepare a copy of it)",
            )

    def _blocks(self) -> Iterator[bytes]:
        try:
            with open(self.path, "rb") as fh:
                self.done_bytes = 0
                while True:
                    block = fh.read(BLOCK)
                    if not block:
                        break
                    self.done_bytes += len(block)
                    yield block
        except OSError as exc:
            raise TunesmithError(f"cannot read the file: {exc.strerror or exc}", file=self.path) from None

    def _detect(self) -> str:
        """The codec of the file (see the module docstring), from one pass over its bytes."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = newlines = 0
        bad: tuple[int, int, int] | None = None  # (offset, line, byte) of the first non-UTF-8 byte
        undefined = c1 = False
        try:
            with open(self.path, "rb") as fh:
                first = fh.read(4096)
        except OSError as exc:
            raise TunesmithError(f"cannot read the file: {exc.strerror or exc}", file=self.path) from None
        if first.startswith((b"\xff\xfe", b"\xfe\xff")):
            order = "little-endian" if first.startswith(b"\xff\xfe") else "big-endian"
            self.fixes.append(f"decoded UTF-16 ({order}) text; UTF-8 is the usual encoding for training files")
            return "utf-16"
        for block in self._blocks():
            nul = block.find(b"\x00")
            if nul >= 0:
                self._raise_nul(first, block, offset + nul, newlines + block.count(b"\n", 0, nul) + 1)
            if bad is None:
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    at = offset + exc.start
                    bad = (at, newlines + block.count(b"\n", 0, exc.start) + 1, block[exc.start])
            undefined = undefined or any(b in block for b in _CP1252_UNDEFINED)
            c1 = c1 or any(b in block for b in _C1)
            newlines += block.count(b"\n")
            offset += len(block)
        if bad is None:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                bad = (offset - 1, newlines + 1, 0)
        if bad is None:
            if first.startswith(b"\xef\xbb\xbf"):
                self.fixes.append("removed UTF-8 BOM")
                return "utf-8-sig"
            return "utf-8"
        at, line, byte = bad
        if undefined:
            raise TunesmithError(
                f"not valid UTF-8 text (byte 0x{byte:02x} at byte offset {at}), nor Windows-1252 or Latin-1",
                file=self.path, line=line,
                hint="this looks like a binary file; give a text file, saved as UTF-8",
            )
        name = "Windows-1252" if c1 else "Latin-1 (ISO-8859-1)"
        self.fixes.append(
            f"decoded {name} text (not valid UTF-8 from byte offset {at}, line {line}); re-save it as UTF-8 to be sure"
        )
        return "cp1252"

    def _raise_nul(self, first: bytes, block: bytes, at: int, line: int) -> None:
        utf16 = _utf16_without_bom(first)
        if utf16:
            codec = "UTF-16LE" if utf16 == "little-endian" else "UTF-16BE"
            raise TunesmithError(
                f"this looks like UTF-16 ({utf16}) text without a byte-order mark, not UTF-8",
                file=self.path,
                hint=f"convert it to UTF-8, e.g. `iconv -f {codec} -t UTF-8 IN > OUT`, or re-save it as UTF-8",
            )
        raise TunesmithError(
            f"this looks like a binary file (NUL byte at byte offset {at})", file=self.path, line=line,
            hint="give a UTF-8 text file",
        )

    def chunks(self) -> Iterator[str]:
        """The decoded text in blocks, line endings as they are; the last check is that the
        file did not change."""
        decoder = codecs.getincrementaldecoder(self.codec)(errors="strict")
        try:
            for block in self._blocks():
                text = decoder.decode(block)
                if text:
                    yield text
            tail = decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise TunesmithError(
                f"this file is not valid {self.codec.upper()} text ({exc.reason})", file=self.path,
                hint="re-save the file as UTF-8",
            ) from None
        if tail:
            yield tail
        self.check_unchanged()

    def lines(self, max_line: int = MAX_LINE, refuse_over: int | None = None) -> Iterator[tuple[int, str]]:
        """``(line number, text)`` for each line (CRLF and CR are line ends too). A line longer
        than ``max_line`` characters comes as several pieces with the same number, broken at the
        last space before the limit (or at the limit where there is none); with ``refuse_over``,
        a line longer than that is an error instead. Each block is scanned once, so the time is
        linear in the size of the file however long its lines are."""
        crlf = cr = broken = broken_at = 0
        number = 1
        pending: list[str] = []  # the pieces of the line being read
        size = 0
        held = ""  # a CR at the end of a block: its LF may start the next one
        for chunk in self.chunks():
            chunk = held + chunk
            held = "\r" if chunk.endswith("\r") else ""
            if held:
                chunk = chunk[:-1]
            crlf += chunk.count("\r\n")
            chunk = chunk.replace("\r\n", "\n")
            cr += chunk.count("\r")
            chunk = chunk.replace("\r", "\n")
            parts = chunk.split("\n")
            for part in parts[:-1]:
                pending.append(part)
                yield number, "".join(pending)
                number += 1
                pending, size = [], 0
            pending.append(parts[-1])
            size += len(parts[-1])
            if refuse_over is not None and size > refuse_over:
                raise TunesmithError(
                    f"this line is over {refuse_over:,} characters long; one record cannot be that large",
                    file=self.path, line=number, hint="split the text into several records",
                )
            if size > max_line:
                carry = "".join(pending)
                broken += broken_at != number  # each line counted once
                broken_at = number
                while len(carry) > max_line:
                    piece, carry = _break(carry, max_line)
                    yield number, piece
                pending, size = [carry], len(carry)
        if held:
            cr += 1
            yield number, "".join(pending)
            number += 1
            pending = []
        yield number, "".join(pending)
        if crlf:
            self.fixes.append(f"normalised {counted(crlf, 'CRLF line ending')}")
        if cr:
            self.fixes.append(f"converted {counted(cr, 'CR line ending')}")
        if broken:
            self.fixes.append(
                f"broke {counted(broken, 'line')} over {max_line:,} characters long into pieces at spaces "
                "(a line that long is not prose)"
            )

    def read(self) -> str:
        """The whole text, line endings normalised to LF (for files read whole: JSON, CSV)."""
        return "\n".join(text for _, text in self.lines(max_line=1 << 62)).lstrip("\ufeff")


def _break(text: str, limit: int) -> tuple[str, str]:
    """The first piece of an over-long line (up to the last space before ``limit``) and the rest."""
    cut = text.rfind(" ", limit // 2, limit)
    if cut <= 0:
        return text[:limit], text[limit:]
    return text[:cut], text[cut + 1 :]


def _utf16_without_bom(data: bytes) -> str | None:
    """"little-endian" or "big-endian" when the bytes read as mostly-ASCII UTF-16, else None."""
    sample = data[:4096]
    if len(sample) < 4:
        return None
    sample = sample[: len(sample) // 2 * 2]
    half = len(sample) // 2
    odd_zero = sample[1::2].count(0) / half
    even_zero = sample[0::2].count(0) / half
    if odd_zero > 0.7 and even_zero < 0.1:
        return "little-endian"
    if even_zero > 0.7 and odd_zero < 0.1:
        return "big-endian"
    return None
