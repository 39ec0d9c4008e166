"""Checks on a user's data files before any work: a message naming the file and the line."""

from __future__ import annotations

from pathlib import Path

from ..errors import MaskSubError


def check_utf8(path: str | Path) -> None:
    """Refuse a text file that is not UTF-8, naming the line and the byte (a file saved as
    Latin-1 or cp1252 by a spreadsheet is the usual cause)."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MaskSubError(f"{path}, line {line}: byte 0x{data[e.start]:02x} is not UTF-8; save the file as "
                           "UTF-8 (e.g. iconv -f cp1252 -t utf-8)") from None
