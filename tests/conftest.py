"""Shared pytest fixtures: a clean environment, fake Ollama servers and tiny images."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for _p in (str(REPO_ROOT), str(TESTS_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from fake_ollama import FakeOllama
from images import jpeg_bytes, png_bytes
from traced import realistic_answer

# Proxy variables would make urllib send 127.0.0.1 traffic to a developer's proxy.
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's OLLAMA_* / NO_COLOR / proxy settings out of every test."""
    for name in list(os.environ):
        if name.startswith("OLLAMA_") or name in ("NO_COLOR", *_PROXY_VARS):
            monkeypatch.delenv(name, raising=False)
    # Counts are the estimate's unless a test gives a vocabulary: an installed open_clip or a
    # Hugging Face cache on a developer's machine must not change them.
    monkeypatch.setenv("OLLAMA_GENERATE_CLIP_VOCAB", "none")


def _stop_and_check(fake: FakeOllama) -> None:
    fake.stop()
    assert not fake.errors, "fake_ollama raised internally:\n" + "\n".join(fake.errors)


@pytest.fixture
def ollama(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOllama]:
    """A running FakeOllama with the default models; OLLAMA_HOST points at it."""
    fake = FakeOllama().start()
    fake.default_text = realistic_answer  # in-range answers: the real caption ranges apply
    monkeypatch.setenv("OLLAMA_HOST", fake.url)
    try:
        yield fake
    finally:
        _stop_and_check(fake)


@pytest.fixture
def make_ollama(clean_env: None) -> Iterator[Callable[..., FakeOllama]]:
    """Factory for extra/custom servers: make_ollama(**FakeOllama kwargs). Does not touch env."""
    made: list[FakeOllama] = []

    def factory(**kwargs: Any) -> FakeOllama:
        fake = FakeOllama(**kwargs).start()
        fake.default_text = realistic_answer
        made.append(fake)
        return fake

    try:
        yield factory
    finally:
        for fake in made:
            fake.stop()
        for fake in made:
            assert not fake.errors, "fake_ollama raised internally:\n" + "\n".join(fake.errors)


@pytest.fixture
def tiny_png() -> bytes:
    """A valid 2x2 RGB PNG."""
    return png_bytes()


@pytest.fixture
def tiny_jpeg() -> bytes:
    """A valid 2x2 JPEG."""
    return jpeg_bytes()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries do not sleep in tests; a test that checks the waits sets its own."""
    import ollama_generate

    monkeypatch.setattr(ollama_generate, "BACKOFF_SECONDS", 0.0)


@pytest.fixture(autouse=True)
def restore_prompts_override(monkeypatch):
    """main() sets the module's --prompts-dir global; put it back after each test."""
    import ollama_generate

    monkeypatch.setattr(ollama_generate, "PROMPTS_OVERRIDE", None)


@pytest.fixture
def photo(tmp_path):
    """A small real PNG to caption alone."""
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes())
    return path
