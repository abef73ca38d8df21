"""Datasets whose captions can be traced back to their images, for folder-run tests."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import zlib

from images import png_bytes

VISION = "qwen3-vl:32b"
TEXT = "qwen3-30b-a3b:latest"
CACHE = os.path.join(".ollama-generate", "descriptions.jsonl")

def tag_of(data: bytes) -> str:
    """A short fingerprint of an image's bytes."""
    return hashlib.sha256(data).hexdigest()[:12]


def derived_answer(rec) -> str:
    """default_text for the fake: the vision answer names the image it was sent, the text answer
    echoes the description it was given, so every caption can be traced back to its own image."""
    if rec.path == "/api/chat":
        image = base64.b64decode(rec.body["messages"][1]["images"][0])
        return f"Picture {tag_of(image)} seen."
    found = re.search(r"Picture ([0-9a-f]{12}) seen\.", rec.body.get("prompt", ""))
    return f"caption of {found.group(1) if found else 'NO DESCRIPTION'}"


def expected_caption(image) -> str:
    return f"Caption of {tag_of(image.read_bytes())}\n"


def make_images(folder, names):
    """Distinct valid PNGs (names may contain subfolders); 'bad' in a name makes an empty file."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"" if "bad" in name else png_bytes(seed=zlib.crc32(str(path).encode())))
    return folder
