"""Datasets whose captions can be traced back to their images, for folder-run tests."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import zlib

from fake_ollama import request_text
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
        return f"Picture {tag_of(image)} seen. {DESCRIPTION}"
    found = re.search(r"Picture ([0-9a-f]{12}) seen\.", rec.body.get("prompt", ""))
    return f"Picture {found.group(1) if found else 'NO DESCRIPTION'} seen. {TRAINING}"


def expected_caption(image) -> str:
    return f"Picture {tag_of(image.read_bytes())} seen. {TRAINING}\n"


def make_images(folder, names):
    """Distinct valid PNGs (names may contain subfolders); 'bad' in a name makes an empty file."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"" if "bad" in name else png_bytes(seed=zlib.crc32(str(path).encode())))
    return folder


# In-range answers, as a good model gives them: the real ranges apply in every test.
DESCRIPTION = (
    "A young woman with short black hair stands in a snowy park at dusk. She wears a long red wool coat, "
    "a grey knitted scarf and black leather gloves, and holds a paper cup of coffee in her right hand. "
    "Bare birch trees and a wooden bench covered in snow stand behind her, and a row of lit street lamps "
    "runs along a path. The sky is deep blue, the light is soft and cold, and snowflakes fall. The photograph "
    "is taken at eye level with a shallow depth of field.")
TRAINING = (
    "A young woman with short black hair stands in a snowy park at dusk, wearing a long red wool coat, a grey "
    "knitted scarf and black leather gloves. She holds a paper cup of coffee in her right hand. Bare birch "
    "trees and a wooden bench covered in snow stand behind her, and lit street lamps run along a path. "
    "Snowflakes fall under a deep blue sky in soft, cold light.")
TAGS = ("1girl, solo, short hair, black hair, red coat, long coat, wool coat, grey scarf, knitted scarf, "
        "black gloves, leather gloves, holding cup, paper cup, coffee, snow, snowing, park, bench, birch, "
        "tree, street lamp, path, dusk, blue sky")
DETAILED = (
    "A young woman with short black hair stands in a snowy park at dusk in a long red wool coat and a grey "
    "knitted scarf. She holds a paper cup of coffee in one gloved hand while snowflakes fall around her. "
    "Bare birch trees, a snow-covered bench and a row of lit street lamps fill the background under a deep "
    "blue sky.")
SHORT = "A young woman with short black hair in a red wool coat holds a paper cup of coffee in a snowy park at dusk."
ANSWERS = {"caption_short": SHORT, "caption_training": TRAINING, "caption_training_creative": TRAINING, "caption_tags": TAGS,
           "caption_tags_creative": TAGS + ", cold, quiet, winter, serene, soft light, cinematic lighting",
           "caption_detailed": DETAILED, "caption_detailed_creative": DETAILED}


def realistic_answer(rec) -> str:
    """default_text for the fake: a description for the vision model, and for the text model an
    in-range caption in the style its prompt asks for (a JSON list where a schema was sent), on
    Ollama's API and on the OpenAI-compatible one alike."""
    if rec.path == "/api/chat" or sees_an_image(rec):
        return DESCRIPTION
    prompt = request_text(rec)
    for name, answer in ANSWERS.items():
        if og_render(name) in prompt:
            wants_json = rec.body.get("format") or rec.body.get("response_format")
            return json.dumps(answer.split(", ")) if wants_json else answer
    return "A fake answer."


def sees_an_image(rec) -> bool:
    """A /v1/chat/completions request with an image_url part: the vision model's."""
    return any(isinstance(part, dict) and part.get("type") == "image_url"
               for message in (rec.body or {}).get("messages") or []
               if isinstance(message.get("content"), list) for part in message["content"])


def og_render(name: str) -> str:
    """The fixed opening of a caption template (before its $description)."""
    import ollama_generate

    return ollama_generate.load_template(name)[1].split("$description")[0]
