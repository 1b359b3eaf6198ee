"""Broken image files for the tests of every image opener: written in a few bytes, never downloaded."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

BROKEN_KINDS = ("corrupt", "truncated", "huge")


def huge_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (the pixels are never there: PIL refuses on open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def broken_image(path: Path, kind: str) -> Path:
    """``path`` written as a ``kind`` of bad image: ``corrupt`` (not an image), ``truncated`` (a PNG cut after its
    header: PIL opens it and fails on the pixels) or ``huge`` (a 20000x20000 decompression bomb)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "corrupt":
        path.write_bytes(b"not an image")
    elif kind == "truncated":
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
        path.write_bytes(buf.getvalue()[:60])
    elif kind == "huge":
        huge_png(path)
    else:
        raise ValueError(f"kind {kind!r}: one of {BROKEN_KINDS}")
    return path
