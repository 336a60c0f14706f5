"""Reading the user's text files as UTF-8, with errors that name the file, the line and the byte.

A UTF-8 byte-order mark (what Windows editors write) is accepted and dropped. A file in another
encoding (Latin-1, cp1252) fails on its first undecodable line, never with Python's bare
``UnicodeDecodeError ... position 647``. Standard library only (a leaf of the import graph).
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Iterator, Union

from rlhf_lit.errors import InputFileError


def _decode_error(path: Path, lineno: int, line: bytes, e: UnicodeDecodeError) -> InputFileError:
    bad = line[e.start:e.end]
    hint = ""
    try:
        hint = f"; read as Latin-1/cp1252 it would be {line[max(0, e.start - 12):e.end + 12].decode('cp1252')!r}"
    except UnicodeDecodeError:
        pass
    return InputFileError(
        f"{path}:{lineno}: not UTF-8 text (byte {bad.hex(' ')} at column {e.start + 1}{hint}). Save the file as "
        f"UTF-8 (e.g. iconv -f cp1252 -t utf-8 {path.name} > fixed.jsonl)"
    )


def iter_lines(path: Union[str, Path]) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of a UTF-8 file (a leading BOM is dropped; 1-based numbers).

    Raises:
        InputFileError: naming ``file:line`` and the column of the first byte that is not UTF-8.
    """
    path = Path(path)
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            try:
                yield lineno, line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _decode_error(path, lineno, line, e) from None


def read_text(path: Union[str, Path], what: str = "") -> str:
    """The whole UTF-8 file (BOM dropped).

    Raises:
        InputFileError: as :func:`iter_lines`, prefixed with ``what`` (the option that names the file).
    """
    try:
        return "".join(text for _, text in iter_lines(path))
    except InputFileError as e:
        if what:
            raise InputFileError(f"{what}: {e}") from None
        raise
