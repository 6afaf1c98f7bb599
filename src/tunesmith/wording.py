"""Counts in user-facing messages, with the noun in the right number ("1 example", "2 examples")."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` with thousands separators and ``noun`` (or ``plural``, default noun + "s") as it agrees."""
    return f"{n:,} {noun if n == 1 else (plural or noun + 's')}"
