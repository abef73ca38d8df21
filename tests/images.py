"""Small, valid image files built in memory for tests."""

from __future__ import annotations

import hashlib
import struct
import zlib

__all__ = ["JPEG_2X2", "jpeg_bytes", "picture", "png_bytes"]

# A 2x2 baseline JFIF JPEG (made once with Pillow, quality 50, optimised Huffman tables).
JPEG_2X2 = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300100b0c0e0c0a10"
    "0e0d0e1211101318281a181616183123251d283a333d3c3933383740485c4e40"
    "4457453738506d51575f626768673e4d71797064785c656763ffdb0043011112"
    "121815182f1a1a2f634238426363636363636363636363636363636363636363"
    "636363636363636363636363636363636363636363636363636363636363ffc0"
    "0011080002000203012200021101031101ffc400150001010000000000000000"
    "0000000000000005ffc40014100100000000000000000000000000000000ffc4"
    "001501010100000000000000000000000000000406ffc4001411010000000000"
    "0000000000000000000000ffda000c03010002110311003f0090008a87ffd9"
)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int = 2, height: int = 2, seed: int = 0) -> bytes:
    """A valid 8-bit RGB PNG; different seeds give different pixels (and file hashes)."""
    if width < 1 or height < 1:
        raise ValueError("width and height must be >= 1")
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter type: none
        for x in range(width):
            rows += hashlib.sha256(f"{seed}:{x}:{y}".encode()).digest()[:3]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(bytes(rows))) + _png_chunk(b"IEND", b""))


def jpeg_bytes() -> bytes:
    """A tiny valid JPEG (2x2, starts with FF D8 FF, ends with FF D9)."""
    return JPEG_2X2


def picture(width: int, height: int, fmt: str = "JPEG", *, orientation: int = 1, mode: str = "RGB",
            **save: object) -> bytes:
    """An image made with Pillow: the left half red, the right half blue (so a turn shows), in any
    format Pillow writes; orientation != 1 stores that EXIF orientation (JPEG)."""
    import io

    from PIL import Image

    colour = {"RGB": (0, 0, 255), "RGBA": (0, 0, 255, 0), "L": 200, "P": 1}[mode]
    image = Image.new(mode, (width, height), colour)
    left = {"RGB": (255, 0, 0), "RGBA": (255, 0, 0, 255), "L": 50, "P": 2}[mode]
    image.paste(left, (0, 0, max(1, width // 2), height))
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif.tobytes()
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()
