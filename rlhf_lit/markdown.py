"""Markdown helpers shared by the reports (standard library only)."""

from __future__ import annotations

from typing import Any


def markdown_cell(text: Any, limit: int) -> str:
    """``text`` as the content of one markdown table cell.

    ``str(text)`` is cut to ``limit`` characters (plus ``…`` when cut) *before* escaping, so an
    escape is never split; then backslashes and ``|`` are escaped, ``\\r`` dropped and newlines
    become ``<br>``, so the text stays inside its cell and keeps its lines. An empty result is
    shown as ``*(empty)*`` so the cell is visibly empty rather than missing.
    """
    s = str(text)
    s = s if len(s) <= limit else s[:limit] + "…"
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "")
    return s.replace("\n", "<br>") or "*(empty)*"


__all__ = ["markdown_cell"]
