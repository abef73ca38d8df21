"""Tests of the fake Ollama server itself, talking to it with plain urllib."""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fake_ollama import (
    FakeOllama,
    Recorded,
    Reply,
    b64,
    describe_image,
    go_b64decode,
    go_parse_duration,
    request_text,
)
from images import jpeg_bytes, png_bytes

THINK = "qwen3-30b-a3b:latest"  # completion, tools, thinking
VISION = "qwen3-vl:32b"  # completion, vision, tools
METRICS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
           "eval_count", "eval_duration")
_NO_BODY = object()


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[Any]:
        text = self.body.decode()
        assert text.endswith("\n"), text
        return [json.loads(line) for line in text.splitlines()]

    @property
    def ctype(self) -> str:
        return self.headers.get("content-type", "")


def call(url: str, path: str, body: Any = _NO_BODY, *, raw: bytes | None = None, method: str | None = None,
         timeout: float = 10, headers: dict[str, str] | None = None) -> Resp:
    data = raw if raw is not None else (None if body is _NO_BODY else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Resp(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return Resp(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def gen(fake: FakeOllama, *, timeout: float = 10, **body: Any) -> Resp:
    body.setdefault("model", THINK)
    return call(fake.url, "/api/generate", body, timeout=timeout)


def chat(fake: FakeOllama, content: str = "hi", *, timeout: float = 10, **body: Any) -> Resp:
    body.setdefault("model", THINK)
    body.setdefault("messages", [{"role": "user", "content": content}])
    return call(fake.url, "/api/chat", body, timeout=timeout)


def error_of(resp: Resp) -> str:
    assert resp.ctype == "application/json; charset=utf-8", resp.headers
    return resp.json()["error"]


def streamed_text(lines: list[dict[str, Any]], chat_api: bool = False) -> str:
    if chat_api:
        return "".join(line["message"]["content"] for line in lines)
    return "".join(line["response"] for line in lines)


def run_parallel(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(i) in n threads released together; return results (or exceptions) in index order."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as e:  # surfaced to the test through the results
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return results


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


# ------------------------------------------------------------------------------------------------
# conftest fixtures


@pytest.fixture(scope="module")
def leaky_env() -> Iterator[None]:
    """Set variables *before* the function-scoped autouse fixture runs, like a developer's shell."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OLLAMA_HOST", "http://leak.invalid:1")
    mp.setenv("OLLAMA_API_KEY", "secret")
    mp.setenv("OLLAMA_KEEP_ALIVE", "-1")
    mp.setenv("NO_COLOR", "1")
    yield
    mp.undo()


def test_env_is_cleaned(leaky_env: None) -> None:
    assert [k for k in os.environ if k.startswith("OLLAMA_")] == ["OLLAMA_GENERATE_CLIP_VOCAB"]
    assert os.environ["OLLAMA_GENERATE_CLIP_VOCAB"] == "none"  # the estimate, whatever is installed
    assert "NO_COLOR" not in os.environ


def test_ollama_fixture_sets_host(leaky_env: None, ollama: FakeOllama) -> None:
    assert os.environ["OLLAMA_HOST"] == ollama.url
    assert "OLLAMA_API_KEY" not in os.environ
    assert ollama.url.startswith("http://127.0.0.1:")
    assert call(ollama.url, "/").body == b"Ollama is running"


def test_make_ollama_applies_kwargs_without_env(make_ollama: Callable[..., FakeOllama]) -> None:
    a = make_ollama(version="0.9.0")
    b = make_ollama(models={"tiny:1b": {}})
    assert "OLLAMA_HOST" not in os.environ
    assert a.url != b.url
    assert call(a.url, "/api/version").json() == {"version": "0.9.0"}
    assert [m["name"] for m in call(b.url, "/api/tags").json()["models"]] == ["tiny:1b"]


def test_paths_importable() -> None:
    tests_dir = Path(__file__).resolve().parent
    assert str(tests_dir) in sys.path and str(tests_dir.parent) in sys.path


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + payload) & 0xFFFFFFFF, kind
        chunks.append((kind, payload))
        pos += 12 + length
    return chunks


def test_tiny_png_is_valid(tiny_png: bytes) -> None:
    chunks = _png_chunks(tiny_png)
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (width, height, depth, colour) == (2, 2, 8, 2)
    assert len(zlib.decompress(chunks[1][1])) == height * (1 + 3 * width)


def test_png_bytes_sizes_and_seeds() -> None:
    chunks = _png_chunks(png_bytes(5, 3, seed=1))
    assert struct.unpack(">II", chunks[0][1][:8]) == (5, 3)
    assert len({png_bytes(seed=s) for s in range(20)}) == 20
    assert png_bytes(seed=3) == png_bytes(seed=3)


def test_tiny_jpeg_is_valid(tiny_jpeg: bytes) -> None:
    assert tiny_jpeg.startswith(b"\xff\xd8\xff") and tiny_jpeg.endswith(b"\xff\xd9")
    assert b"\xff\xc0" in tiny_jpeg and b"\xff\xda" in tiny_jpeg  # SOF0 and SOS markers
    assert jpeg_bytes() == tiny_jpeg


# ------------------------------------------------------------------------------------------------
# simple routes


def test_root_get_and_head(ollama: FakeOllama) -> None:
    r = call(ollama.url, "/")
    assert (r.status, r.body) == (200, b"Ollama is running")
    assert r.ctype.startswith("text/plain")
    h = call(ollama.url, "/", method="HEAD")
    assert (h.status, h.body) == (200, b"")
    assert h.headers["content-length"] == str(len(r.body))


def test_version(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(version="0.12.5")
    r = call(fake.url, "/api/version")
    assert r.json() == {"version": "0.12.5"} and r.ctype == "application/json; charset=utf-8"
    assert call(fake.url, "/api/version", method="HEAD").body == b""


def test_tags_shape_without_capabilities_before_0_30(ollama: FakeOllama) -> None:
    models = {m["name"]: m for m in call(ollama.url, "/api/tags").json()["models"]}
    assert set(models) == {THINK, VISION}
    m = models[VISION]
    assert m["model"] == VISION and isinstance(m["size"], int) and len(m["digest"]) == 64
    assert m["details"]["family"] == "qwen3vl" and m["details"]["families"] == ["qwen3vl"]
    assert m["details"]["format"] == "gguf" and "quantization_level" in m["details"]
    assert "capabilities" not in m and "context_length" not in m["details"]


def test_tags_capabilities_since_0_30(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(version="0.33.0-rc2")
    models = {m["name"]: m for m in call(fake.url, "/api/tags").json()["models"]}
    assert models[THINK]["capabilities"] == ["completion", "tools", "thinking"]
    assert "vision" in models[VISION]["capabilities"]
    assert isinstance(models[VISION]["details"]["context_length"], int)


def test_tags_add_remove_and_empty(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(models={})
    assert call(fake.url, "/api/tags").json() == {"models": []}
    fake.add_model("llava", capabilities=("completion", "vision"))
    assert [m["name"] for m in call(fake.url, "/api/tags").json()["models"]] == ["llava:latest"]
    fake.remove_model("LLAVA:latest")
    assert call(fake.url, "/api/tags").json() == {"models": []}


def test_unknown_path_and_wrong_method(ollama: FakeOllama) -> None:
    r = call(ollama.url, "/api/nope")
    assert (r.status, r.body) == (404, b"404 page not found") and r.ctype.startswith("text/plain")
    r = call(ollama.url, "/api/generate")  # GET on a POST route
    assert (r.status, r.body) == (405, b"405 method not allowed") and r.ctype.startswith("text/plain")
    assert call(ollama.url, "/api/tags", {"x": 1}).status == 405
    assert call(ollama.url, "/api/tags/").status == 404
    assert call(ollama.url, "//api/tags").status == 404  # a doubled slash is not the same route
    assert [r.path for r in ollama.requests[-2:]] == ["/api/tags/", "//api/tags"]


def test_show(ollama: FakeOllama) -> None:
    r = call(ollama.url, "/api/show", {"model": "qwen3-vl:32b"})
    body = r.json()
    assert r.status == 200 and body["capabilities"] == ["completion", "vision", "tools"]
    assert body["details"]["family"] == "qwen3vl" and isinstance(body["parameters"], str)
    assert body["model_info"]["general.architecture"] == "qwen3vl"
    legacy = call(ollama.url, "/api/show", {"name": "Qwen3-30B-A3B"})
    assert legacy.json()["capabilities"] == ["completion", "tools", "thinking"]


def test_show_errors(ollama: FakeOllama) -> None:
    missing = call(ollama.url, "/api/show", {"model": "nope"})
    assert (missing.status, error_of(missing)) == (404, "model 'nope:latest' not found")
    assert error_of(call(ollama.url, "/api/show", {"model": "x:7b"})) == "model 'x:7b' not found"
    no_name = call(ollama.url, "/api/show", {})
    assert (no_name.status, error_of(no_name)) == (400, "model is required")
    empty = call(ollama.url, "/api/show", raw=b"")
    assert (empty.status, error_of(empty)) == (400, "missing request body")


def test_show_without_capabilities(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(show_capabilities=False)
    body = call(fake.url, "/api/show", {"model": VISION}).json()
    assert "capabilities" not in body and body["details"]["family"] == "qwen3vl"


def test_ps_lists_loaded_models(ollama: FakeOllama) -> None:
    assert call(ollama.url, "/api/ps").json() == {"models": []}
    assert gen(ollama, prompt="hi", stream=False).status == 200
    models = call(ollama.url, "/api/ps").json()["models"]
    assert [m["name"] for m in models] == [THINK]
    assert models[0]["size_vram"] == models[0]["size"] and models[0]["expires_at"].endswith("Z")
    assert models[0]["details"]["family"] == "qwen3"


def test_pull(ollama: FakeOllama) -> None:
    r = call(ollama.url, "/api/pull", {"model": VISION})
    lines = r.lines()
    assert r.ctype == "application/x-ndjson"
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    assert any("digest" in line and line["completed"] == line["total"] for line in lines)
    missing = call(ollama.url, "/api/pull", {"model": "nope", "stream": True})
    assert missing.status == 200 and missing.lines()[-1] == {"error": "pull model manifest: file does not exist"}
    missing = call(ollama.url, "/api/pull", {"model": "nope", "stream": False})
    assert missing.status == 500
    ollama.pullable["gemma3:4b"] = {"capabilities": ("completion", "vision")}
    assert call(ollama.url, "/api/pull", {"model": "gemma3:4b", "stream": False}).json() == {"status": "success"}
    assert "gemma3:4b" in ollama.models


# ------------------------------------------------------------------------------------------------
# generation: streaming and non-streaming shapes


def test_generate_stream_default_and_shape(ollama: FakeOllama) -> None:
    ollama.reply("The quick brown fox jumps.")  # 26 chars: even, final chunk text is empty
    r = gen(ollama, prompt="describe", think=False)  # no "stream": server default is true
    assert r.status == 200 and r.ctype == "application/x-ndjson"
    lines = r.lines()
    assert len(lines) >= 4
    assert streamed_text(lines) == "The quick brown fox jumps."
    for line in lines[:-1]:
        assert line["done"] is False and line["model"] == THINK
        assert not any(k in line for k in METRICS) and "context" not in line
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop" and final["response"] == ""
    for k in METRICS:
        assert isinstance(final[k], int) and final[k] > 0, k
    assert isinstance(final["context"], list) and final["context"]
    assert final["created_at"].endswith("Z") and len(final["created_at"].split(".")[1]) == 10


def test_final_chunk_carries_last_piece_for_odd_length(ollama: FakeOllama) -> None:
    ollama.reply("abcdefghi")  # 9 chars, chunk_chars 8
    lines = gen(ollama, prompt="x").lines()
    assert [line["response"] for line in lines] == ["abcdefgh", "i"]
    assert lines[-1]["done"] is True
    ollama.reply("abcd", final_piece=True, chunk_chars=2)
    assert [line["response"] for line in gen(ollama, prompt="x").lines()] == ["ab", "cd"]


def test_generate_non_streaming(ollama: FakeOllama) -> None:
    ollama.reply("Hello there, general.", eval_count=7, done_reason="length")
    r = gen(ollama, prompt="hi", stream=False)
    assert r.ctype == "application/json; charset=utf-8" and not r.body.endswith(b"\n")
    body = r.json()
    assert body["response"] == "Hello there, general." and body["done"] is True
    assert body["done_reason"] == "length" and body["eval_count"] == 7
    assert all(isinstance(body[k], int) and body[k] > 0 for k in METRICS)


def test_chat_stream_and_non_stream(ollama: FakeOllama) -> None:
    ollama.reply("Chat answer number one.", endpoint="/api/chat")
    lines = chat(ollama, model=VISION).lines()
    assert all(line["message"]["role"] == "assistant" for line in lines)
    assert streamed_text(lines, chat_api=True) == "Chat answer number one."
    assert "context" not in lines[-1] and lines[-1]["done_reason"] == "stop"
    ollama.reply("second")
    body = chat(ollama, model=VISION, stream=False).json()
    assert body["message"] == {"role": "assistant", "content": "second"}
    assert "response" not in body and body["eval_count"] >= 1


def test_final_fields_override_and_delete(ollama: FakeOllama) -> None:
    ollama.reply("x", final_fields={"eval_count": None, "prompt_eval_count": 99})
    body = gen(ollama, prompt="p", stream=False).json()
    assert "eval_count" not in body and body["prompt_eval_count"] == 99


def test_json_is_go_escaped(ollama: FakeOllama) -> None:
    ollama.reply("<b>&</b>")
    r = gen(ollama, prompt="p", stream=False)
    assert b"\\u003cb\\u003e\\u0026" in r.body and r.json()["response"] == "<b>&</b>"


def test_raw_generate_has_no_context(ollama: FakeOllama) -> None:
    body = gen(ollama, prompt="p", raw=True, stream=False).json()
    assert "context" not in body and body["done"] is True


# ------------------------------------------------------------------------------------------------
# thinking


def test_thinking_model_thinks_by_default(ollama: FakeOllama) -> None:
    ollama.reply("The answer is 4.", thinking="Two plus two is four, obviously.")
    lines = chat(ollama).lines()
    kinds = ["thinking" if line["message"].get("thinking") else "content" for line in lines[:-1]]
    assert kinds == sorted(kinds, key=lambda k: k != "thinking") and kinds[0] == "thinking"
    assert "".join(line["message"].get("thinking", "") for line in lines) == "Two plus two is four, obviously."
    assert streamed_text(lines, chat_api=True) == "The answer is 4."


@pytest.mark.parametrize("think", [True, "low", "medium", "high", "max"])
def test_thinking_on_values(ollama: FakeOllama, think: Any) -> None:
    ollama.reply("ans", thinking="hmm")
    body = gen(ollama, prompt="p", think=think, stream=False).json()
    assert (body["response"], body["thinking"]) == ("ans", "hmm")


def test_think_false_drops_thinking(ollama: FakeOllama) -> None:
    ollama.reply("ans", thinking="hmm")
    body = gen(ollama, prompt="p", think=False, stream=False).json()
    assert body["response"] == "ans" and "thinking" not in body


def test_non_thinking_model(ollama: FakeOllama) -> None:
    r = chat(ollama, model="Qwen3-VL:32b", think=True)
    assert (r.status, error_of(r)) == (400, '"Qwen3-VL:32b" does not support thinking')
    assert error_of(gen(ollama, model=VISION, prompt="p", think="high")) == f'"{VISION}" does not support thinking'
    ollama.reply("plain", thinking="never shown")
    body = chat(ollama, model=VISION, think=False, stream=False).json()
    assert body["message"] == {"role": "assistant", "content": "plain"}


@pytest.mark.parametrize("think, message", [
    ("extreme", 'invalid think value: "extreme" (must be "high", "medium", "low", "max", true, or false)'),
    ("", 'invalid think value: "" (must be "high", "medium", "low", "max", true, or false)'),
    (1, "think must be a boolean or string, got 1"),
])
def test_invalid_think(ollama: FakeOllama, think: Any, message: str) -> None:
    r = gen(ollama, prompt="p", think=think)
    assert (r.status, error_of(r)) == (400, message)


# ------------------------------------------------------------------------------------------------
# validation


def test_empty_and_malformed_bodies(ollama: FakeOllama) -> None:
    for path in ("/api/generate", "/api/chat"):
        r = call(ollama.url, path, raw=b"")
        assert (r.status, error_of(r)) == (400, "missing request body")
        assert error_of(call(ollama.url, path, raw=b"  \n")) == "missing request body"
    cases = {
        b"{bad": "invalid character 'b' looking for beginning of object key string",
        b"x": "invalid character 'x' looking for beginning of value",
        b'{"model":': "unexpected EOF",
        b'{"model" "m"}': "invalid character '\"' after object key",
        b'{"model":"m" "prompt":"p"}': "invalid character '\"' after object key:value pair",
        b'{"a":[1 2]}': "invalid character '2' after array element",
        b'{"a":nul}': "invalid character '}' in literal null (expecting 'l')",
        b"[1]": "json: cannot unmarshal array into Go value of type api.GenerateRequest",
    }
    for raw, message in cases.items():
        r = call(ollama.url, "/api/generate", raw=raw)
        assert (r.status, error_of(r)) == (400, message), raw


def test_wrong_field_types(ollama: FakeOllama) -> None:
    r = gen(ollama, prompt="p", stream="yes")
    assert error_of(r) == "json: cannot unmarshal string into Go struct field GenerateRequest.stream of type bool"
    r = chat(ollama, stream=1)
    assert error_of(r) == "json: cannot unmarshal number into Go struct field ChatRequest.stream of type bool"
    r = gen(ollama, prompt=5)
    assert (r.status, error_of(r)) == (400, "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string")


def test_unknown_fields_ignored_and_names_case_insensitive(ollama: FakeOllama) -> None:
    r = call(ollama.url, "/api/generate", {"MODEL": VISION, "Prompt": "p", "Stream": False, "whatever": [1]})
    assert r.status == 200 and r.json()["model"] == VISION


def test_model_name_normalisation_and_not_found(ollama: FakeOllama) -> None:
    assert gen(ollama, model="QWEN3-30B-A3B", prompt="p", stream=False).status == 200
    assert chat(ollama, model="qwen3-VL:32B", stream=False).json()["model"] == "qwen3-VL:32B"
    r = gen(ollama, model="qwen3-vl", prompt="p")  # tag defaults to latest, which is not installed
    assert (r.status, error_of(r)) == (404, "model 'qwen3-vl' not found")
    r = chat(ollama, model="nope:1b")
    assert (r.status, error_of(r)) == (404, "model 'nope:1b' not found")
    r = gen(ollama, model="", prompt="p")
    assert (r.status, error_of(r)) == (404, "model '' not found")
    r = chat(ollama, model="")
    assert (r.status, error_of(r)) == (400, "model is required")


@pytest.mark.parametrize("keep_alive", [300, 0.5, -1, "5m", "1h30m", "10s", "-1m", "1.5h", "0"])
def test_keep_alive_valid(ollama: FakeOllama, keep_alive: Any) -> None:
    assert gen(ollama, prompt="p", keep_alive=keep_alive, stream=False).status == 200


@pytest.mark.parametrize("keep_alive, message", [
    ("300", 'time: missing unit in duration "300"'),
    ("-1", 'time: missing unit in duration "-1"'),
    ("5x", 'time: unknown unit "x" in duration "5x"'),
    ("", 'time: invalid duration ""'),
    (True, "Unsupported type: 'bool'"),
    ([1], "Unsupported type: '[]interface {}'"),
    ({"s": 1}, "Unsupported type: 'map[string]interface {}'"),
])
def test_keep_alive_invalid(ollama: FakeOllama, keep_alive: Any, message: str) -> None:
    r = gen(ollama, prompt="p", keep_alive=keep_alive)
    assert (r.status, error_of(r)) == (400, message)


def test_go_parse_duration_values() -> None:
    assert go_parse_duration("1h30m") == 5400 * 10**9
    assert go_parse_duration("1.5s") == 1_500_000_000
    assert go_parse_duration("-1m") == -60 * 10**9
    assert go_parse_duration("300ms") == 300_000_000
    with pytest.raises(ValueError, match="missing unit"):
        go_parse_duration("12")


@pytest.mark.parametrize("fmt", ["json", "", None, {"type": "object", "properties": {}}])
def test_format_valid(ollama: FakeOllama, fmt: Any) -> None:
    assert gen(ollama, prompt="p", format=fmt, stream=False).status == 200


def test_format_invalid(ollama: FakeOllama) -> None:
    r = gen(ollama, prompt="p", format="yaml")
    assert (r.status, error_of(r)) == (500, 'invalid format: "\\"yaml\\""; expected "json" or a valid JSON Schema object')
    r = chat(ollama, format=["json"], stream=False)
    assert r.status == 500 and error_of(r).startswith("invalid format: ")


def test_options_types(ollama: FakeOllama) -> None:
    r = gen(ollama, prompt="p", options={"stop": "\n"})
    assert (r.status, error_of(r)) == (500, 'option "stop" must be of type array')
    r = chat(ollama, options={"temperature": "hot"})
    assert (r.status, error_of(r)) == (500, 'option "temperature" must be of type float32')
    ok = gen(ollama, prompt="p", options={"stop": ["\n"], "num_predict": 10, "temperature": 0, "bogus": 1}, stream=False)
    assert ok.status == 200
    r = gen(ollama, prompt="p", options="fast")
    assert r.status == 400 and "GenerateRequest.options" in error_of(r)


def test_top_logprobs_and_raw_conflicts(ollama: FakeOllama) -> None:
    for value in (-1, 21):
        r = gen(ollama, prompt="p", top_logprobs=value)
        assert (r.status, error_of(r)) == (400, "top_logprobs must be between 0 and 20")
    assert gen(ollama, prompt="p", top_logprobs=20, stream=False).status == 200
    for extra in ({"system": "s"}, {"template": "t"}, {"context": [1, 2]}):
        r = gen(ollama, prompt="p", raw=True, **extra)
        assert (r.status, error_of(r)) == (400, "raw mode does not support template, system, or context")


def test_capability_checks(ollama: FakeOllama) -> None:
    ollama.add_model("nomic-embed-text", capabilities=("embedding",))
    r = gen(ollama, model="nomic-embed-text", prompt="p")
    assert (r.status, error_of(r)) == (400, '"nomic-embed-text" does not support generate')
    ollama.add_model("plain", capabilities=("completion",))
    tools = [{"type": "function", "function": {"name": "f"}}]
    r = chat(ollama, model="plain", tools=tools)
    assert (r.status, error_of(r)) == (400, "registry.ollama.ai/library/plain:latest does not support tools")
    assert chat(ollama, model=THINK, tools=tools, stream=False).status == 200


# ------------------------------------------------------------------------------------------------
# images


def test_images_accepted(ollama: FakeOllama, tiny_png: bytes, tiny_jpeg: bytes) -> None:
    r = gen(ollama, model=VISION, prompt="caption", images=[b64(tiny_png), b64(tiny_jpeg)], stream=False)
    assert r.status == 200
    r = chat(ollama, model=VISION, stream=False,
             messages=[{"role": "user", "content": "caption", "images": [b64(tiny_png)]}])
    assert r.status == 200
    sent = ollama.requests_to("/api/chat")[-1].body
    assert isinstance(sent, dict) and sent["messages"][0]["images"] == [b64(tiny_png)]


def test_data_url_and_bad_base64_rejected(ollama: FakeOllama, tiny_png: bytes) -> None:
    data_url = "data:image/png;base64," + b64(tiny_png)
    r = gen(ollama, model=VISION, prompt="c", images=[data_url])
    assert (r.status, error_of(r)) == (400, "illegal base64 data at input byte 4")
    r = chat(ollama, model=VISION, messages=[{"role": "user", "content": "c", "images": [data_url]}])
    assert (r.status, error_of(r)) == (400, "illegal base64 data at input byte 4")
    r = gen(ollama, model=VISION, prompt="c", images=["abc"])  # incomplete quantum
    assert error_of(r) == "illegal base64 data at input byte 0"
    r = gen(ollama, model=VISION, prompt="c", images=["aGk=x"])  # trailing garbage after padding
    assert error_of(r) == "illegal base64 data at input byte 4"


def test_undecodable_image_is_runner_error(ollama: FakeOllama) -> None:
    r = gen(ollama, model=VISION, prompt="c", images=[b64(b"definitely not an image")])
    assert (r.status, error_of(r)) == (500, "Failed to create new sequence: image: unknown format")


def test_go_b64decode_matches_stdlib() -> None:
    rng = random.Random(1)
    for n in range(40):
        data = bytes(rng.randrange(256) for _ in range(n))
        text = base64.b64encode(data).decode()
        assert go_b64decode(text) == data
        assert go_b64decode("\n".join(text[i:i + 7] for i in range(0, len(text), 7))) == data


# ------------------------------------------------------------------------------------------------
# load / unload requests


def test_empty_prompt_is_load_request(ollama: FakeOllama, tiny_png: bytes) -> None:
    queued = ollama.reply("should stay queued")
    r = gen(ollama, model=VISION, images=[b64(tiny_png)])  # stream absent, still one JSON object
    assert r.ctype == "application/json; charset=utf-8"
    body = r.json()
    assert body["done"] is True and body["done_reason"] == "load" and body["response"] == ""
    assert "eval_count" not in body
    r = chat(ollama, messages=[])
    assert r.json()["done_reason"] == "load" and r.json()["message"] == {"role": "assistant", "content": ""}
    assert ollama.replies == [queued]
    assert ollama.loads == 2 and set(ollama.loaded) == {VISION, THINK}


def test_keep_alive_zero_unloads(ollama: FakeOllama) -> None:
    gen(ollama, prompt="")
    assert ollama.loaded == [THINK]
    body = gen(ollama, prompt="", keep_alive=0).json()
    assert body["done_reason"] == "unload" and body["response"] == ""
    assert ollama.loaded == [] and call(ollama.url, "/api/ps").json() == {"models": []}
    assert chat(ollama, messages=[], keep_alive="0").json()["done_reason"] == "unload"
    gen(ollama, prompt="p", keep_alive=0, stream=False)  # generation then unload when idle
    assert ollama.loaded == [] and ollama.loads == 2


# ------------------------------------------------------------------------------------------------
# scripted replies


def test_reply_queue_fifo_and_default_text(ollama: FakeOllama) -> None:
    ollama.reply("first")
    ollama.replies.append(Reply("second"))
    assert gen(ollama, prompt="p", stream=False).json()["response"] == "first"
    assert gen(ollama, prompt="p", stream=False).json()["response"] == "second"
    assert gen(ollama, prompt="p", stream=False).json()["response"] == "A fake answer."
    ollama.default_text = lambda rec: "echo " + str(rec.body["prompt"])  # type: ignore[index]
    assert gen(ollama, prompt="hello", stream=False).json()["response"] == "echo hello"


def test_reply_model_and_endpoint_filters(ollama: FakeOllama) -> None:
    ollama.reply("for vision", model="QWEN3-VL:32b")
    ollama.reply("for chat", endpoint="/api/chat")
    ollama.reply("anything")
    assert gen(ollama, prompt="p", stream=False).json()["response"] == "anything"
    assert chat(ollama, stream=False).json()["message"]["content"] == "for chat"
    assert gen(ollama, model=VISION, prompt="p", stream=False).json()["response"] == "for vision"
    assert ollama.replies == []


def test_reply_rejects_unknown_fault() -> None:
    with pytest.raises(ValueError):
        Reply("x", fault="explode")


def test_validation_errors_do_not_consume_replies(ollama: FakeOllama) -> None:
    ollama.reply("kept")
    assert gen(ollama, prompt="p", stream="no").status == 400
    assert gen(ollama, model="missing", prompt="p").status == 404
    assert [r.text for r in ollama.replies] == ["kept"]


# ------------------------------------------------------------------------------------------------
# errors and faults


def test_status_error_before_first_byte(ollama: FakeOllama) -> None:
    ollama.reply(status=429)
    r = gen(ollama, prompt="p")  # streaming request, still a real status
    assert (r.status, error_of(r)) == (429, "rate limit exceeded")
    ollama.reply(status=503, error="server busy, please try again.  maximum pending requests exceeded")
    r = chat(ollama, stream=False)
    assert (r.status, error_of(r)) == (503, "server busy, please try again.  maximum pending requests exceeded")


def test_legacy_errors(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(legacy_errors=True)
    fake.reply(status=429, error="rate limit exceeded")
    r = gen(fake, prompt="p")
    assert r.status == 200 and r.ctype == "application/x-ndjson"
    assert r.lines() == [{"error": "rate limit exceeded"}]
    fake.reply(status=429, error="rate limit exceeded")
    r = gen(fake, prompt="p", stream=False)
    assert (r.status, error_of(r)) == (500, "rate limit exceeded")
    # handler-level errors keep their status in every version
    assert gen(fake, model="missing", prompt="p").status == 404


def test_mid_stream_error(ollama: FakeOllama) -> None:
    text = "This answer will be cut off somewhere in the middle."
    ollama.reply(text, mid_stream=True, error="boom")
    r = gen(ollama, prompt="p")
    lines = r.lines()
    assert r.status == 200 and lines[-1] == {"error": "boom"}
    partial = streamed_text(lines[:-1])
    assert partial and text.startswith(partial) and len(partial) < len(text)
    assert not any(line.get("done") for line in lines)
    ollama.reply(text, mid_stream=True, error="boom")
    r = gen(ollama, prompt="p", stream=False)
    assert (r.status, error_of(r)) == (500, "boom")


def test_fault_drop(ollama: FakeOllama) -> None:
    ollama.reply("x", fault="drop")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        gen(ollama, prompt="p")
    assert gen(ollama, prompt="p", stream=False).status == 200  # server still alive


def test_fault_eof_stream_ends_without_done(ollama: FakeOllama) -> None:
    text = "one two three four five six seven"
    ollama.reply(text, fault="eof")
    lines = gen(ollama, prompt="p").lines()
    assert lines and not any(line["done"] for line in lines)
    assert text.startswith(streamed_text(lines)) and streamed_text(lines) != text


def test_fault_eof_non_stream_truncated_body(ollama: FakeOllama) -> None:
    ollama.reply("some text", fault="eof")
    with pytest.raises(http.client.IncompleteRead):
        gen(ollama, prompt="p", stream=False)


def test_fault_reset_stream_breaks_chunked_body(ollama: FakeOllama) -> None:
    ollama.reply("one two three four five six seven", fault="reset")
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        gen(ollama, prompt="p")


def test_fault_garbage(ollama: FakeOllama) -> None:
    ollama.reply("x", fault="garbage")
    r = gen(ollama, prompt="p")
    assert r.status == 200 and r.body.startswith(b"<html>")
    with pytest.raises(ValueError):
        json.loads(r.body.splitlines()[0])
    ollama.reply("x", fault="garbage")
    with pytest.raises(ValueError):
        gen(ollama, prompt="p", stream=False).json()


def test_fault_stall_times_out_client(ollama: FakeOllama) -> None:
    ollama.reply("late", fault="stall", delay=2)
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        gen(ollama, prompt="p", timeout=0.2)


def test_delay_before_first_byte(ollama: FakeOllama) -> None:
    ollama.reply("slow", delay=0.3)
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        gen(ollama, prompt="p", timeout=0.05)
    ollama.reply("slow", delay=0.05)
    body = gen(ollama, prompt="p", stream=False).json()
    assert body["response"] == "slow" and body["eval_duration"] >= 50_000_000


# ------------------------------------------------------------------------------------------------
# recording


def test_requests_are_recorded(ollama: FakeOllama) -> None:
    call(ollama.url, "/api/tags?x=1", headers={"X-Custom": "yes"})
    call(ollama.url, "/api/generate", raw=b"{broken")
    gen(ollama, prompt="p", stream=False)
    tags, broken, good = ollama.requests
    assert (tags.method, tags.path, tags.query, tags.body, tags.raw) == ("GET", "/api/tags", "x=1", None, b"")
    assert tags.headers["x-custom"] == "yes" and "user-agent" in tags.headers
    assert (broken.method, broken.body, broken.raw) == ("POST", None, b"{broken")
    assert good.body == {"model": THINK, "prompt": "p", "stream": False}
    assert good.headers["content-type"] == "application/json"
    assert ollama.requests_to("/api/generate") == [broken, good]
    assert ollama.generation_requests() == [broken, good]
    assert isinstance(good, Recorded)


def test_request_recorded_before_answer(ollama: FakeOllama) -> None:
    seen: list[int] = []

    def answer(rec: Recorded) -> str:
        seen.append(len(ollama.requests))
        assert ollama.requests[-1] is rec
        return "ok"

    ollama.default_text = answer
    assert gen(ollama, prompt="p", stream=False).json()["response"] == "ok"
    assert seen == [1]


def test_server_is_quiet_and_survives_disconnects(ollama: FakeOllama, capfd: pytest.CaptureFixture[str]) -> None:
    ollama.reply("z" * 400, chunk_chars=4, chunk_delay=0.002)
    with socket.create_connection(("127.0.0.1", ollama.port)) as s:
        body = json.dumps({"model": THINK, "prompt": "p"}).encode()
        s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert s.recv(64).startswith(b"HTTP/1.1 200")
    wait_until(lambda: ollama.active == 0)
    ollama.reply("x", fault="drop")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        gen(ollama, prompt="p")
    call(ollama.url, "/api/generate", raw=b"{")
    assert gen(ollama, prompt="p", stream=False).status == 200
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert ollama.errors == []


# ------------------------------------------------------------------------------------------------
# scheduling: loads, eviction, parallel slots


def test_load_cost_counts_in_load_duration(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(load_cost=0.05)
    first = gen(fake, prompt="p", stream=False).json()
    second = gen(fake, prompt="p", stream=False).json()
    assert first["load_duration"] >= 50_000_000
    assert first["total_duration"] >= first["load_duration"]
    assert second["load_duration"] < first["load_duration"]
    assert fake.loads == 1 and fake.load_log == [THINK]


def test_max_loaded_evicts_lru(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(models={"a:1": {}, "b:1": {}, "c:1": {}}, max_loaded=2)
    for name in ("a:1", "b:1", "a:1", "c:1"):
        assert gen(fake, model=name, prompt="p", stream=False).status == 200
    assert fake.load_log == ["a:1", "b:1", "c:1"] and fake.unload_log == ["b:1"]
    assert sorted(fake.loaded) == ["a:1", "c:1"]
    assert sorted(m["name"] for m in call(fake.url, "/api/ps").json()["models"]) == ["a:1", "c:1"]


def test_alternating_models_reload_each_time(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(max_loaded=1)
    for name in (THINK, VISION, THINK, VISION):
        gen(fake, model=name, prompt="p", stream=False)
    assert fake.loads == 4 and fake.load_log == [THINK, VISION, THINK, VISION]


def test_loads_are_serialised(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(load_cost=0.1)
    results = run_parallel(2, lambda i: gen(fake, model=(THINK, VISION)[i], prompt="p", stream=False).json())
    durations = sorted(r["load_duration"] for r in results)
    assert fake.loads == 2
    assert durations[1] >= 150_000_000  # waited for the other load, then did its own


def test_eviction_waits_for_in_flight_requests(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(max_loaded=1)
    fake.reply("slow", delay=0.3, model=THINK)
    first: list[Any] = []
    t = threading.Thread(target=lambda: first.append(gen(fake, prompt="p", stream=False).json()))
    t.start()
    wait_until(lambda: fake.active == 1)  # A is generating (about 0.3 s left)
    body = gen(fake, model=VISION, prompt="p", stream=False).json()
    t.join(5)
    assert first[0]["response"] == "slow"  # A was not cut short by the eviction
    assert body["load_duration"] >= 150_000_000  # B's load waited for A to finish
    assert fake.load_log == [THINK, VISION] and fake.unload_log == [THINK] and fake.loaded == [VISION]


def test_parallel_limit(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(parallel=1, request_time=0.05)
    results = run_parallel(3, lambda i: gen(fake, prompt="p", stream=False).status)
    assert results == [200, 200, 200]
    assert fake.max_concurrent_seen == 1


def test_parallel_two_and_unlimited(make_ollama: Callable[..., FakeOllama]) -> None:
    two = make_ollama(parallel=2, request_time=0.2)
    assert run_parallel(4, lambda i: gen(two, prompt="p", stream=False).status) == [200] * 4
    assert two.max_concurrent_seen == 2
    unlimited = make_ollama(request_time=0.2)
    assert run_parallel(3, lambda i: gen(unlimited, prompt="p", stream=False).status) == [200] * 3
    assert unlimited.max_concurrent_seen >= 2


# ------------------------------------------------------------------------------------------------
# lifecycle


def test_context_manager_and_stop_releases_port() -> None:
    with FakeOllama() as fake:
        url = fake.url
        assert call(url, "/").status == 200
    with pytest.raises(urllib.error.URLError):
        call(url, "/", timeout=2)


def test_stop_while_stalled_is_prompt() -> None:
    fake = FakeOllama().start()
    fake.reply("never", fault="stall")  # delay 0: stalls until stopped
    outcome: list[object] = []
    t = threading.Thread(target=lambda: outcome.append(_capture(lambda: gen(fake, prompt="p", timeout=20))))
    t.start()
    wait_until(lambda: fake.active == 1)
    started = time.monotonic()
    fake.stop()
    t.join(10)
    assert time.monotonic() - started < 5
    assert not t.is_alive() and isinstance(outcome[0], Exception)
    fake.stop()  # idempotent


def _capture(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:
        return e


def test_kill_and_restart_keep_port_and_state(ollama: FakeOllama) -> None:
    gen(ollama, prompt="p", stream=False)
    port, url = ollama.port, ollama.url
    ollama.reply("cut", delay=5)
    outcome: list[object] = []
    t = threading.Thread(target=lambda: outcome.append(_capture(lambda: gen(ollama, prompt="p", timeout=20))))
    t.start()
    wait_until(lambda: ollama.active == 1)
    ollama.kill()
    t.join(10)
    assert isinstance(outcome[0], Exception)  # in-flight request aborted
    with pytest.raises(urllib.error.URLError) as info:
        call(url, "/", timeout=2)
    assert isinstance(info.value.reason, ConnectionRefusedError)
    ollama.restart()
    assert (ollama.port, ollama.url) == (port, url)
    assert call(url, "/").status == 200
    assert ollama.loads == 1 and len(ollama.generation_requests()) == 2
    assert gen(ollama, prompt="p", stream=False).status == 200


# ------------------------------------------------------------------------------------------------
# scheduling as issue 11 needs it: slots per model, serial vision families, two GPUs, reloads, 503


def test_parallel_per_model_and_serial_families(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(parallel={THINK: 3, "*": 2}, request_time={THINK: 0.15, "*": 0.15})
    assert (fake.slots(THINK), fake.slots(VISION)) == (3, 1)  # qwen3vl runs one request at a time
    run_parallel(6, lambda i: gen(fake, model=(THINK, VISION)[i % 2], prompt="p", stream=False).status)
    assert fake.max_concurrent_by_model == {THINK: 3, VISION: 1}
    # every generation's arrival is logged with the requests to its model then in flight, itself too
    assert {name: len(log) for name, log in fake.in_flight_log_by_model.items()} == {THINK: 3, VISION: 3}
    assert {name: max(log) for name, log in fake.in_flight_log_by_model.items()} == fake.max_in_flight_by_model
    free = make_ollama(parallel=2, serial_families=(), request_time=0.15)
    run_parallel(4, lambda i: chat(free, model=VISION, stream=False).status)
    assert free.slots(VISION) == 2 and free.max_concurrent_by_model[VISION] == 2


def test_two_gpus_hold_both_models_and_run_them_at_once(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(max_loaded=2, parallel=1, request_time=0.3)
    run_parallel(2, lambda i: gen(fake, model=(THINK, VISION)[i], prompt="p", stream=False).status)
    assert fake.max_concurrent_seen == 2 and fake.loads == 2
    assert sorted(m["name"] for m in call(fake.url, "/api/ps").json()["models"]) == sorted([THINK, VISION])
    one = make_ollama(max_loaded=1, parallel=1, request_time=0.3)
    run_parallel(2, lambda i: gen(one, model=(THINK, VISION)[i], prompt="p", stream=False).status)
    assert one.max_concurrent_seen == 1 and one.loads == 2  # the second waited for a swap
    assert len(call(one.url, "/api/ps").json()["models"]) == 1


def test_changed_runner_options_reload_the_model(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama()
    for options, shift in (({"num_ctx": 8192}, False), ({"num_ctx": 8192}, False),
                           ({"num_ctx": 8192}, True), ({"num_ctx": 4096}, True)):
        assert gen(fake, prompt="p", stream=False, options=options, shift=shift).status == 200
    assert fake.load_log == [THINK] * 3 and fake.unload_log == [THINK] * 2
    assert gen(fake, prompt="", stream=False).status == 200  # a load request takes it as it is
    assert fake.loads == 3


def test_max_queue_answers_server_busy(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(parallel=1, max_queue=2)
    fake.reply("slow", delay=1.0)
    first = threading.Thread(target=lambda: gen(fake, prompt="p", stream=False))
    first.start()
    wait_until(lambda: fake.active == 1)  # it holds the only slot; two more may wait for it
    answers = run_parallel(4, lambda i: gen(fake, prompt="p", stream=False))
    first.join(5)
    assert sorted(a.status for a in answers) == [200, 200, 503, 503] and fake.busy_answers == 2
    assert {error_of(a) for a in answers if a.status == 503} == {
        "server busy, please try again.  maximum pending requests exceeded"}


# ------------------------------------------------------------------------------------------------
# the OpenAI-compatible face (/v1): vLLM-like (api="openai") and Ollama's own (api="both")

VLLM_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


def v1(fake: FakeOllama, content: Any = "hi", *, timeout: float = 10, headers: dict[str, str] | None = None,
       **body: Any) -> Resp:
    body.setdefault("model", THINK)
    body.setdefault("messages", [{"role": "user", "content": content}])
    return call(fake.url, "/v1/chat/completions", body, timeout=timeout, headers=headers)


def events(resp: Resp) -> list[Any]:
    """The server-sent events of a response: parsed JSON objects, or the text "[DONE]"."""
    assert resp.ctype == "text/event-stream", resp.headers
    text = resp.body.decode()
    assert text.endswith("\n\n"), text
    out = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def deltas(chunks: list[Any], field: str = "content") -> str:
    return "".join(c["choices"][0]["delta"].get(field, "") for c in chunks if isinstance(c, dict) and c["choices"])


def image_part(data: bytes, mime: str = "image/png") -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64(data)}"}}


def solid_png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), rgb).save(out, "PNG")
    return out.getvalue()


def test_v1_models_per_mode(make_ollama: Callable[..., FakeOllama]) -> None:
    vllm = make_ollama(api="openai", models={VLLM_MODEL: {"context_length": 32768}, "smol": {}})
    body = call(vllm.url, "/v1/models").json()
    assert body["object"] == "list" and all(isinstance(m.pop("created"), int) for m in body["data"])
    assert body["data"] == [
        {"id": VLLM_MODEL, "object": "model", "owned_by": "vllm", "max_model_len": 32768},
        {"id": "smol", "object": "model", "owned_by": "vllm", "max_model_len": 40960}]
    llama = make_ollama(api="openai", owned_by="llamacpp", models={"smol": {}})
    assert [m["owned_by"] for m in call(llama.url, "/v1/models").json()["data"]] == ["llamacpp"]
    both = make_ollama(api="both", models={"smol": {}, "qwen3-vl:32b": {}})
    data = call(both.url, "/v1/models").json()["data"]
    assert [(m["id"], m["owned_by"], "max_model_len" in m) for m in data] == [
        ("smol:latest", "library", False), ("qwen3-vl:32b", "library", False)]
    plain = make_ollama()
    r = call(plain.url, "/v1/models")
    assert (r.status, r.body) == (404, b"404 page not found")
    assert v1(plain).status == 404


def test_v1_only_in_openai_mode_and_both_in_both(make_ollama: Callable[..., FakeOllama]) -> None:
    vllm = make_ollama(api="openai")
    for path in ("/api/tags", "/api/version", "/", "/v1/embeddings"):
        r = call(vllm.url, path)
        assert (r.status, r.json(), r.ctype) == (404, {"detail": "Not Found"}, "application/json"), path
    assert call(vllm.url, "/api/chat", {"model": THINK, "messages": []}).status == 404
    assert (call(vllm.url, "/health").status, call(vllm.url, "/health").body) == (200, b"")
    r = call(vllm.url, "/v1/chat/completions")
    assert (r.status, r.json()) == (405, {"detail": "Method Not Allowed"})
    both = make_ollama(api="both")
    assert call(both.url, "/").body == b"Ollama is running"
    assert call(both.url, "/api/tags").status == 200 and v1(both, stream=False).status == 200
    assert call(both.url, "/v1/embeddings").body == b"404 page not found"
    assert call(both.url, "/v1/models", method="POST", raw=b"{}").status == 405
    with pytest.raises(ValueError):
        FakeOllama(api="grpc")


def test_v1_stream_chunk_shapes_and_done(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="openai")
    text = "A lighthouse on a cliff at dusk."  # even length: the final chunk carries no text
    fake.reply(text, chunk_chars=5)
    chunks = events(v1(fake, stream=True))
    assert chunks[-1] == "[DONE]"
    body = chunks[:-1]
    assert len({(c["id"], c["created"]) for c in body}) == 1 and body[0]["id"].startswith("chatcmpl-")
    assert {(c["object"], c["model"]) for c in body} == {("chat.completion.chunk", THINK)}
    assert body[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert [c["choices"][0]["delta"] for c in body[1:-1]] == [{"content": text[i:i + 5]} for i in range(0, len(text), 5)]
    assert body[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert all(c["choices"][0]["finish_reason"] is None for c in body[:-1])
    assert not any("usage" in c for c in body)
    fake.reply(text + "!", done_reason="length")  # odd length: the last piece rides in the final chunk
    body = events(v1(fake, stream=True))[:-1]
    assert deltas(body) == text + "!" and body[-1]["choices"][0] == {
        "index": 0, "delta": {"content": "!"}, "finish_reason": "length"}


def test_v1_usage_chunk_when_asked(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="openai")
    fake.reply("Some caption text.", eval_count=7)
    chunks = events(v1(fake, "describe it", stream=True, stream_options={"include_usage": True}))
    *body, usage, done = chunks
    assert done == "[DONE]" and body[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["id"] == body[0]["id"] and usage["object"] == "chat.completion.chunk"
    counts = usage["usage"]
    assert counts["completion_tokens"] == 7 and counts["prompt_tokens"] >= 1
    assert counts["total_tokens"] == counts["prompt_tokens"] + counts["completion_tokens"]
    fake.reply("Some caption text.", eval_count=7)
    assert events(v1(fake, "describe it", stream=True, stream_options={"include_usage": False}))[-2]["choices"]


def test_v1_reasoning_content_before_content(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="openai")
    fake.reply("The answer.", thinking="First I look, then I write.", chunk_chars=6)
    body = events(v1(fake, stream=True))[:-1]
    kinds = [next(iter(c["choices"][0]["delta"])) for c in body[1:-1]]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content") and "content" in kinds
    assert deltas(body, "reasoning_content") == "First I look, then I write." and deltas(body) == "The answer."
    fake.reply("The answer.", thinking="hidden")
    body = events(v1(fake, stream=True, chat_template_kwargs={"enable_thinking": False}))[:-1]
    assert deltas(body, "reasoning_content") == "" and deltas(body) == "The answer."
    fake.default_thinking = "default thoughts"
    message = v1(fake, stream=False).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "default thoughts"
    message = v1(fake, model=VISION, stream=False).json()["choices"][0]["message"]  # no thinking capability
    assert "reasoning_content" not in message
    assert v1(fake, stream=False, chat_template_kwargs="off").status == 400


def test_v1_ollama_dialect_reasoning(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="both")
    fake.reply("Answer.", thinking="Thoughts.")
    body = events(v1(fake, stream=True))[:-1]
    assert deltas(body, "reasoning") == "Thoughts." and deltas(body) == "Answer."
    assert all(c["choices"][0]["delta"]["role"] == "assistant" and c["system_fingerprint"] == "fp_ollama"
               for c in body)
    fake.reply("Answer.", thinking="Thoughts.")  # Ollama ignores chat_template_kwargs
    message = v1(fake, stream=False, chat_template_kwargs={"enable_thinking": False}).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Answer.", "reasoning": "Thoughts."}
    fake.reply("Answer.", thinking="Thoughts.")
    message = v1(fake, stream=False, reasoning_effort="none").json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Answer."}
    r = v1(fake, stream=False, reasoning_effort="extreme")
    assert (r.status, r.json()["error"]) == (400, {
        "message": 'invalid reasoning value: \'extreme\' (must be "high", "medium", "low", or "none")',
        "type": "invalid_request_error", "param": None, "code": None})
    r = v1(fake, model=VISION, stream=False, reasoning_effort="high")
    assert (r.status, r.json()["error"]["message"]) == (400, f'"{VISION}" does not support thinking')
    assert fake.loads == 1 and fake.loaded == [THINK]  # Ollama loads models for /v1 too


def test_v1_non_stream_shape(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="openai")
    fake.reply("A red barn in snow.", eval_count=5, done_reason="length")
    r = v1(fake, "caption this", stream=False)
    body = r.json()
    assert r.ctype == "application/json" and body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    prompt = body["usage"]["prompt_tokens"]
    assert {k: v for k, v in body.items() if k not in ("id", "created")} == {
        "object": "chat.completion", "model": THINK,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "A red barn in snow."},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": 5, "total_tokens": prompt + 5}}
    fake.reply("x", final_fields={"usage": None, "timings": {"predicted_n": 1}})
    body = v1(fake, stream=False).json()
    assert "usage" not in body and body["timings"] == {"predicted_n": 1}


def test_v1_request_errors(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="openai", models={VLLM_MODEL: {}})
    kept = fake.reply("kept")

    def error(r: Resp) -> tuple[int, str, str, Any]:
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["param"] is None
        return r.status, e["message"], e["type"], e["code"]

    r = call(fake.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert error(r) == (400, "you must provide a model parameter", "invalid_request_error", 400)
    r = call(fake.url, "/v1/chat/completions", {"model": VLLM_MODEL})
    assert error(r)[:2] == (400, "'messages' is a required property")
    assert error(v1(fake, model=VLLM_MODEL, messages=[]))[:2] == (400, "[] is too short - 'messages'")
    assert error(v1(fake, model="qwen2.5-vl-7b-instruct")) == (
        404, "The model `qwen2.5-vl-7b-instruct` does not exist.", "NotFoundError", 404)  # verbatim names
    assert error(v1(fake, model=VLLM_MODEL, max_tokens=0))[:2] == (400, "max_tokens must be at least 1, got 0.")
    assert error(v1(fake, model=VLLM_MODEL, temperature="hot"))[0] == 400
    assert error(v1(fake, model=VLLM_MODEL, stop=[1]))[0] == 400
    assert error(v1(fake, model=VLLM_MODEL, stream="yes"))[0] == 400
    assert error(call(fake.url, "/v1/chat/completions", raw=b"{broken"))[0] == 400
    assert fake.replies == [kept]
    both = make_ollama(api="both")
    assert error(v1(both, model="missing")) == (404, "model 'missing' not found", "not_found_error", None)


def test_v1_scripted_status_errors(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="openai")
    fake.reply(status=429, retry_after=2)
    r = v1(fake, stream=True)  # a streaming request still gets the real status
    assert (r.status, r.headers["retry-after"], r.json()) == (429, "2", {"error": {
        "message": "Rate limit exceeded. Please retry later.", "type": "RateLimitError", "param": None,
        "code": 429}})
    fake.reply(status=500, error="CUDA out of memory")
    r = v1(fake, stream=False)
    assert (r.status, r.json()["error"]["message"], r.json()["error"]["type"]) == (
        500, "CUDA out of memory", "InternalServerError")
    assert "retry-after" not in r.headers
    fake.reply(status=503)
    assert v1(fake).json()["error"]["type"] == "ServiceUnavailableError"
    both = make_ollama(api="both")
    both.reply(status=500)
    r = v1(both, stream=False)
    assert (r.status, r.json()["error"]["type"], r.json()["error"]["code"]) == (500, "api_error", None)


def test_v1_mid_stream_error_event(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="openai")
    text = "This answer will be cut off somewhere in the middle."
    fake.reply(text, mid_stream=True, error="engine died")
    r = v1(fake, stream=True)
    *body, last = events(r)
    assert r.status == 200 and last == {"error": {"message": "engine died", "type": "server_error", "code": 500}}
    partial = deltas(body)
    assert partial and text.startswith(partial) and len(partial) < len(text)
    assert all(c["choices"][0]["finish_reason"] is None for c in body)
    fake.reply(text, mid_stream=True, error="engine died")
    r = v1(fake, stream=False)
    assert (r.status, r.json()["error"]["message"]) == (500, "engine died")


def test_v1_faults(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="openai")
    text = "one two three four five six seven"
    fake.reply(text, fault="eof")
    body = events(v1(fake, stream=True))
    assert "[DONE]" not in body and all(c["choices"][0]["finish_reason"] is None for c in body)
    assert text.startswith(deltas(body)) and deltas(body) != text
    fake.reply(text, fault="eof")
    with pytest.raises(http.client.IncompleteRead):
        v1(fake, stream=False)
    fake.reply(text, fault="reset")
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        v1(fake, stream=True)
    fake.reply(text, fault="garbage")
    r = v1(fake, stream=True)
    assert r.status == 200 and r.body.startswith(b"<html>")
    fake.reply(text, fault="drop")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        v1(fake, stream=True)
    fake.reply(text, fault="stall", delay=2)
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        v1(fake, stream=True, timeout=0.2)
    assert v1(fake, stream=False).status == 200  # still serving


def test_v1_unsupported_fields(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="openai", unsupported_fields=("chat_template_kwargs", "seed"))
    r = v1(fake, stream=False, chat_template_kwargs={"enable_thinking": False})
    assert (r.status, r.json()["error"]["message"], r.json()["error"]["type"]) == (
        400, "Unrecognized request argument supplied: chat_template_kwargs", "invalid_request_error")
    assert v1(fake, stream=False, seed=1).json()["error"]["message"] == "Unrecognized request argument supplied: seed"
    assert v1(fake, stream=False, temperature=0, max_tokens=9, top_p=0.9, stop="\n").status == 200


def test_v1_response_format(make_ollama: Callable[..., FakeOllama]) -> None:
    schema = {"type": "array", "items": {"type": "string"}, "minItems": 1}
    fmt = {"type": "json_schema", "json_schema": {"name": "tags", "schema": schema, "strict": True}}
    fake = make_ollama(api="openai")
    assert v1(fake, stream=False, response_format=fmt).status == 200
    assert v1(fake, stream=False, response_format={"type": "json_object"}).status == 200
    assert fake.requests_to("/v1/chat/completions")[0].body["response_format"] == fmt
    r = v1(fake, stream=False, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert r.status == 400
    assert v1(fake, stream=False, response_format={"type": "yaml"}).status == 400
    plain = make_ollama(api="openai", structured_outputs=False)
    r = v1(plain, stream=False, response_format=fmt)
    assert (r.status, r.json()["error"]["message"]) == (400, "response_format type json_schema is not supported")
    assert v1(plain, stream=False, response_format={"type": "json_object"}).status == 200


def test_api_key_on_both_faces(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="both", api_key="sk-local")
    r = call(fake.url, "/api/tags")
    assert (r.status, r.json()) == (401, {"error": "unauthorized"})
    r = call(fake.url, "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert (r.status, r.json()) == (401, {"error": {"message": "Incorrect API key provided.",
                                                    "type": "invalid_request_error", "param": None,
                                                    "code": "invalid_api_key"}})
    assert v1(fake, stream=False).status == 401
    good = {"Authorization": "Bearer sk-local"}
    assert call(fake.url, "/api/tags", headers=good).status == 200
    assert v1(fake, stream=False, headers=good).status == 200
    assert len(fake.generation_requests()) == 2  # refused requests are recorded too
    vllm = make_ollama(api="openai", api_key="sk-local")
    assert call(vllm.url, "/health").status == 200  # vLLM checks keys on /v1 only
    assert call(vllm.url, "/v1/models").status == 401
    plain = make_ollama(api_key="sk-local")
    assert gen(plain, prompt="p").status == 401


def test_v1_images_recorded_and_validated(make_ollama: Callable[..., FakeOllama], tiny_png: bytes,
                                          tiny_jpeg: bytes) -> None:
    fake = make_ollama(api="openai")
    content = [{"type": "text", "text": "caption"}, image_part(tiny_png), image_part(tiny_jpeg, "image/jpeg")]
    assert v1(fake, content, model=VISION, stream=False).status == 200
    assert fake.sent_images("/v1/chat/completions") == [tiny_png, tiny_jpeg]
    assert fake.sent_images() == []  # /api/chat saw none

    def error(part: dict[str, Any]) -> tuple[int, str]:
        r = v1(fake, [{"type": "text", "text": "c"}, part], model=VISION, stream=False)
        return r.status, r.json()["error"]["message"]

    status, message = error({"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}})
    assert status == 400 and "data:image/...;base64," in message and "messages[0].content[1]" in message
    status, message = error({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})
    assert status == 400 and "base64" in message
    assert error({"type": "input_audio"})[0] == 400
    status, message = error(image_part(b"definitely not an image"))
    assert (status, message) == (500, "Failed to create new sequence: image: unknown format")
    lax = make_ollama(api="openai", validate_images=False)
    assert v1(lax, [image_part(b"definitely not an image")], model=VISION, stream=False).status == 200
    webp = make_ollama(api="both", unreadable_formats=("webp",))
    r = v1(webp, [image_part(b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp")], model=VISION, stream=False)
    assert r.status == 500


def test_v1_requests_recorded_and_scripted_like_api_chat(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="both")
    fake.reply("for /api/chat", endpoint="/api/chat")
    fake.reply("for /v1", endpoint="/v1/chat/completions")
    assert v1(fake, stream=False).json()["choices"][0]["message"]["content"] == "for /v1"
    assert chat(fake, stream=False).json()["message"]["content"] == "for /api/chat"
    first, second = fake.generation_requests()
    assert (first.path, first.body) == ("/v1/chat/completions", {
        "model": THINK, "messages": [{"role": "user", "content": "hi"}], "stream": False})
    assert second.path == "/api/chat"
    fake.default_text = lambda rec: "echo " + request_text(rec)
    content = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert v1(fake, content, stream=False).json()["choices"][0]["message"]["content"] == "echo one\ntwo"
    assert chat(fake, "three", stream=False).json()["message"]["content"] == "echo three"
    assert gen(fake, prompt="four", system="sys", stream=False).json()["response"] == "echo sys\nfour"


def test_v1_parallel_slots_and_counters(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="openai", models={VLLM_MODEL: {}}, parallel=1, request_time=0.05)
    assert run_parallel(3, lambda i: v1(fake, model=VLLM_MODEL, stream=False).status) == [200] * 3
    assert fake.max_concurrent_by_model == {VLLM_MODEL: 1} and fake.max_concurrent_seen == 1
    assert len(fake.in_flight_log_by_model[VLLM_MODEL]) == 3
    assert max(fake.in_flight_log_by_model[VLLM_MODEL]) == fake.max_in_flight_by_model[VLLM_MODEL]
    assert fake.loads == 0 and fake.load_log == []  # a vLLM server holds its model
    two = make_ollama(api="both", parallel=2, serial_families=(), request_time=0.15)
    assert run_parallel(4, lambda i: v1(two, stream=True).status) == [200] * 4
    assert two.max_concurrent_by_model == {THINK: 2}


def test_v1_max_queue_answers_busy(make_ollama: Callable[..., FakeOllama]) -> None:
    fake = make_ollama(api="openai", parallel=1, max_queue=1)
    fake.reply("slow", delay=0.3)
    first = threading.Thread(target=lambda: v1(fake, stream=False))
    first.start()
    wait_until(lambda: fake.active == 1)
    answers = run_parallel(3, lambda i: v1(fake, stream=False))
    first.join(5)
    assert sorted(a.status for a in answers) == [200, 503, 503] and fake.busy_answers == 2
    assert {a.json()["error"]["type"] for a in answers if a.status == 503} == {"ServiceUnavailableError"}


def test_describe_image_formats_sizes_and_colour(tiny_jpeg: bytes) -> None:
    from images import picture

    assert describe_image(solid_png(64, 64, (255, 0, 0))) == "[image: 64x64 PNG, mostly red]"
    assert describe_image(solid_png(3, 5, (250, 250, 250))) == "[image: 3x5 PNG, mostly white]"
    assert describe_image(png_bytes(2, 2)).startswith("[image: 2x2 PNG, ")
    assert describe_image(picture(40, 20, "PNG")) == "[image: 40x20 PNG, mixed colours: red and blue most]"
    assert describe_image(picture(41, 20, "PNG")) == "[image: 41x20 PNG, mostly blue]"  # the left half is 20 px
    for fmt in ("JPEG", "GIF", "BMP", "WEBP"):
        assert describe_image(picture(30, 20, fmt)) == f"[image: 30x20 {fmt}]"
    assert describe_image(picture(30, 20, "WEBP", lossless=True)) == "[image: 30x20 WEBP]"
    assert describe_image(tiny_jpeg) == "[image: 2x2 JPEG]"
    assert describe_image(b"not an image") == "[12 bytes that are no image format the server knows]"


def test_forward_to_a_text_only_upstream(make_ollama: Callable[..., FakeOllama]) -> None:
    upstream = make_ollama(api="openai", owned_by="me", models={"smollm2": {}})
    upstream.default_text = lambda rec: "I was told: " + request_text(rec)
    front = make_ollama(api="openai", models={})
    front.forward_to(upstream.url)
    assert call(front.url, "/v1/models").json()["data"][0]["owned_by"] == "me"
    red = solid_png(64, 64, (255, 0, 0))
    content = [{"type": "text", "text": "Describe this."}, image_part(red)]
    r = v1(front, content, model="smollm2", stream=True, stream_options={"include_usage": True})
    chunks = events(r)
    assert deltas(chunks) == "I was told: Describe this.\n[image: 64x64 PNG, mostly red]"
    assert chunks[-1] == "[DONE]" and "usage" in chunks[-2]
    sent = upstream.requests_to("/v1/chat/completions")[-1].body
    # Text parts alone are joined into one string: llama-cpp-python's chat formats take no list.
    assert sent["messages"][0]["content"] == "Describe this.\n[image: 64x64 PNG, mostly red]"
    assert {k: v for k, v in sent.items() if k != "messages"} == {
        "model": "smollm2", "stream": True, "stream_options": {"include_usage": True}}
    assert front.sent_images("/v1/chat/completions") == [red]  # the front recorded what we sent
    r = v1(front, content, model="smollm2", stream=False)
    assert r.json()["choices"][0]["message"]["content"].endswith("[image: 64x64 PNG, mostly red]")
    assert v1(front, model="absent", stream=False).status == 404  # upstream errors pass through
    r = v1(front, [{"type": "image_url", "image_url": {"url": "http://x.invalid/y.png"}}], model="smollm2")
    assert r.status == 400 and len(upstream.generation_requests()) == 3  # refused by the front itself
    assert front.generation_requests() and front.loads == 0 and not front.replies
    upstream.stop()
    r = v1(front, model="smollm2", stream=False)
    assert r.status == 502 and "failed" in r.json()["error"]["message"]
    with pytest.raises(ValueError):
        front.forward_to("http://10.0.0.1:8000")
