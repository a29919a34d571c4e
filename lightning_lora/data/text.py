"""Text users bring (JSON lines, captions, CSV, source files) decoded so that a bad byte is named by its place.

Python's own ``UnicodeDecodeError`` names neither the file nor the line, and a file read in chunks reports an
offset into the chunk. Here text is read as bytes and decoded line by line: an undecodable byte is one
``UserError`` naming the file, the line and the byte offset from the start of the file.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

from lightning_lora.errors import UserError


def undecodable(where: str, data: bytes, exc: UnicodeDecodeError, start: int = 0, line: int | None = None,
                encoding: str = "UTF-8") -> UserError:
    """The one line for ``exc`` raised decoding ``data`` (which begins at byte ``start`` of its file, on ``line``;
    the line is counted from ``data`` when not given)."""
    if line is None:
        line = data.count(b"\n", 0, exc.start) + 1
    offset = start + exc.start
    byte = data[exc.start]
    return UserError(f"{where} line {line}: not {encoding} text (byte 0x{byte:02x} at byte offset {offset}); "
                     f"save the file as {encoding}")


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as UTF-8 (a leading byte-order mark dropped); an undecodable byte names ``where``, line and offset."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
        if bom:  # utf-8-sig counts positions after the mark
            exc = UnicodeDecodeError(exc.encoding, data, exc.start + bom, exc.end + bom, exc.reason)
        raise undecodable(where, data, exc) from None


def read_utf8(path: Path) -> str:
    """The whole of a UTF-8 text file; an undecodable byte names the file, line and byte offset."""
    return decode_utf8(Path(path).read_bytes(), str(path))


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a UTF-8 file, read as it goes (large JSON-lines files stay cheap);
    an undecodable byte names the file, line and byte offset."""
    offset = 0
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            data = raw[len(codecs.BOM_UTF8):] if lineno == 1 and raw.startswith(codecs.BOM_UTF8) else raw
            skipped = len(raw) - len(data)
            try:
                yield lineno, data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise undecodable(str(path), data, exc, offset + skipped, lineno) from None
            offset += len(raw)
