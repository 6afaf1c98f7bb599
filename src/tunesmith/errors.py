"""The one exception type a user is meant to see: it names the file, line and field at fault."""

from __future__ import annotations

import functools
from pathlib import Path


class TunesmithError(Exception):
    """A problem with the user's input or settings, reported without a traceback.

    The CLI prints ``str(err)`` and exits with ``err.exit_code``.
    """

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f", line {self.line}"
            if self.field:
                where += f", field '{self.field}'"
            where += ": "
        elif self.field:
            where = f"field '{self.field}': "
        text = where + self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


def reported(command):
    """Wrap a CLI command: a TunesmithError becomes one message on stderr and its exit code,
    Ctrl-C exits 130; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import typer

        try:
            return command(*args, **kwargs)
        except TunesmithError as exc:
            typer.secho(f"error: {exc}", err=True, fg="red")
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            typer.secho("stopped.", err=True, fg="yellow")
            raise typer.Exit(130)

    return wrapper
