"""Excel workbooks (.xlsx) as table records: the first sheet, its first non-empty row the header.

openpyxl reads the file in read-only mode, row by row. Cells become text as Excel shows them
in the simplest way (numbers without a trailing ".0", dates in ISO form); an empty cell is "".
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

from .errors import TunesmithError


def read_sheet(path: Path):
    """The records of the workbook's first sheet, checked like a CSV file's (corpus._read_table)."""
    from openpyxl import load_workbook

    from .corpus import _read_table

    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, TypeError) as exc:
        raise TunesmithError(
            f"not a readable .xlsx workbook ({type(exc).__name__}: {str(exc)[:120]})", file=path,
            hint="save it from Excel or LibreOffice as .xlsx, or export the sheet as CSV",
        ) from None
    try:
        sheet = book.worksheets[0] if book.worksheets else None
        if sheet is None:
            raise TunesmithError("the workbook has no sheet", file=path)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for row in sheet.iter_rows(values_only=True):
            writer.writerow(["" if v is None else _cell(v) for v in row])
    finally:
        book.close()
    text = buffer.getvalue()
    if not text.strip(","  "\n"):
        raise TunesmithError("the workbook's first sheet is empty", file=path)
    # Line numbers of the CSV rendering are the sheet's row numbers (a cell's line breaks are quoted).
    return _read_table(text, path, delimiter=",")


def _cell(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)
