"""The one exception type a user is meant to see: it names the file, line and field at fault."""

from __future__ import annotations

import functools
import sys
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

    def render(self, option: str | None = None) -> str:
        """The message; ``option`` (such as ``--block-size``) names the field as the user typed it."""
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f", line {self.line}"
            if self.field:
                where += f", field '{self.field}'"
            where += ": "
        elif option:
            where = f"{option}: "
        elif self.field:
            where = f"field '{self.field}': "
        text = where + self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


def user_errors(command):
    """Wrap a CLI command: a TunesmithError becomes one message on stderr and its exit code,
    Ctrl-C exits 130; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import typer

        try:
            return command(*args, **kwargs)
        except TunesmithError as exc:
            option = None if exc.file else _option_for(command, exc.field)
            typer.secho(f"error: {exc.render(option)}", err=True, fg="red")
            _leave_process_group()
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("stopped.", err=True, fg="yellow")
            _leave_process_group()
            raise typer.Exit(130) from None

    return wrapper


def _leave_process_group() -> None:
    """In one process of a multi-process run, leave the process group before exiting on an error:
    a group still open when the interpreter exits can abort the process ("terminate called
    without an active exception", exit status -6) instead of exiting with the error's status."""
    dist = sys.modules.get("torch.distributed")  # only where the run imported it
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting on the error anyway
        pass


# Settings whose command-line option is not simply the field's name.
_OPTION_PARAMS = {"sample_prompts": "prompt", "out": "out_dir"}


def _option_for(command, field: str | None) -> str | None:
    """The command's option for a settings field (``block_size`` -> ``--block-size``), if it has one."""
    if not field:
        return None
    import inspect

    from typer.models import OptionInfo

    wanted = {field, _OPTION_PARAMS.get(field, field)}
    for name, param in inspect.signature(command).parameters.items():
        if name in wanted and isinstance(param.default, OptionInfo):
            longs = [d for d in param.default.param_decls or () if d.startswith("--")]
            return longs[0] if longs else "--" + name.replace("_", "-")
    return None
