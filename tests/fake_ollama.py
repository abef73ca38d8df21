"""A fake Ollama HTTP server for tests (stdlib only).

It mimics the wire behaviour described in shared/reference/ollama-api.md: routes, request
validation with Go-like error texts, NDJSON streaming, error shapes (both the >= v0.12.6 real
status and the legacy 200 + NDJSON error line), thinking, load/unload requests, and a small model
scheduler (serialised loads, LRU eviction, per-model parallel slots, reloads on changed runner
options, an optional pending-request limit).

Streaming layout of a generation (documented choice): all `thinking` pieces first, then the
content pieces (``Reply.chunk_chars`` characters each). When the text length is odd the last
content piece rides in the final ``done:true`` chunk (real servers may do that); when it is even
the final chunk carries an empty text. ``Reply.final_piece`` forces either way.

Scheduling approximation: a request for a model that is not resident takes the single load lock
(so loads are serialised), and when ``max_loaded`` is reached it marks the least recently used
model (idle ones first) for eviction and waits until that model's in-flight requests have
finished. The whole wait counts in ``load_duration``, as in Ollama (it starts at arrival).
Keep-alive durations are recorded (shown in ``/api/ps``) but never expire by themselves;
``keep_alive: 0`` unloads the model once its last request finishes.

Parallel slots: ``parallel`` is one slot count for every model, or a dict of model name -> slots
("*" for the others); 0 means no limit (no slots are modelled at all). As in Ollama's
server/sched.go, models of the SERIAL_FAMILIES run one request at a time whatever slot count
``parallel`` gives (``serial_families=()`` turns that off). ``request_time`` is likewise a number
or a dict of model name -> seconds. Two GPUs that
each hold one model are ``max_loaded=2`` with one slot per model; one GPU that holds one model is
``max_loaded=1``. A resident model whose runner options (``num_ctx``, ``shift``) differ from a new
request's is reloaded once its requests have finished, as Ollama's ``needsReload`` does.

``max_queue`` (0: no limit) answers 503 "server busy" to a generation that arrives while that many
are already waiting for a load or a slot. Ollama queues only requests that need scheduling (a model
not loaded) and lets the others wait for a slot without limit; the fake counts every waiting request
so that a test can reach the limit with a few.

The OpenAI-compatible face (``api``): "ollama" (default) serves Ollama's API alone, and /v1 paths
answer "404 page not found" as any unknown path. "openai" plays a vLLM / llama-server-like server:
only ``/health`` and ``/v1/models``, ``/v1/chat/completions``; every other path answers FastAPI's
404 ``{"detail":"Not Found"}``; model names are served verbatim (no ":latest"); every installed model
counts as resident (no loads: ``loads`` stays 0). "both" is Ollama itself: /api and /v1 on one
server, /v1 requests load models like /api ones. How each speaks is a row of ``_DIALECTS``: thinking
goes as ``reasoning_content`` (vLLM, llama-server) or ``reasoning`` (Ollama); vLLM sends the role in a
first chunk of its own, Ollama in every delta; error ``code`` is the HTTP status (vLLM) or null
(Ollama); ``owned_by`` (keyword, default per dialect: "vllm" / "library"; llama-server says
"llamacpp", llama-cpp-python "me"); vLLM lists ``max_model_len`` (the model's ``context_length``).
Thinking models think unless ``chat_template_kwargs.enable_thinking`` is false (vLLM) or
``reasoning_effort`` (or ``reasoning.effort``) is "none" (Ollama, which ignores chat_template_kwargs).

A /v1/chat/completions request is translated into the internal chat request (text parts joined,
``image_url`` data URLs decoded into ``images``; max_tokens / max_completion_tokens, temperature,
top_p, seed and stop into ``options``; ``response_format`` json_object / json_schema into ``format``)
and then scheduled and scripted exactly like /api/chat (replies, default_text, slots,
request_time, max_queue, faults, the per-model counters). The answer is OpenAI's: a
``chat.completion`` with ``usage``, or server-sent events (``data: {json}``) of
``chat.completion.chunk`` objects (thinking pieces, then content pieces, then a chunk with
``finish_reason`` = ``Reply.done_reason``, the ``usage`` chunk with ``"choices": []`` when
``stream_options.include_usage``, then ``data: [DONE]``). ``Reply.final_fields`` merge into that final
chunk (or the whole answer). Errors are ``{"error": {"message", "type", "param", "code"}}`` with the
HTTP status; a scripted ``Reply(status=...)`` keeps its status (``Reply.retry_after`` adds a
Retry-After header); ``mid_stream`` sends half the content, then ``data: {"error": {...}}`` and ends
without [DONE]; fault "eof" ends the stream with neither finish_reason nor [DONE]; reset, garbage,
drop and stall are as on /api. An image_url that is no ``data:image/...;base64,`` URL, or whose
base64 does not decode, is a 400; ``validate_images`` then checks the bytes as on /api (500).
``structured_outputs=False`` refuses json_schema (400); ``unsupported_fields`` names top-level fields
answered with 400 "Unrecognized request argument supplied: FIELD" (a strict server);
``api_key`` makes every request but /health without ``Authorization: Bearer KEY`` a 401, in OpenAI's
shape on /v1 and ``{"error":"unauthorized"}`` elsewhere. ``forward_to(url)`` turns the fake into a
vision front for a text-only OpenAI-compatible server on loopback (llama-cpp-python's): /v1 requests
go there with each image part replaced by ``describe_image`` text, and the answer (SSE too) comes
back unchanged; the fake still records the original request. ``request_text(rec)`` gives the text of
a recorded generation on any face, for default_text callables.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import http.client
import http.server
import json
import math
import socket
import struct
import sys
import threading
import time
import traceback
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
import dataclasses
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["FakeOllama", "Recorded", "Reply", "b64", "describe_image", "request_text"]

JSON_CT = "application/json; charset=utf-8"
NDJSON_CT = "application/x-ndjson"
TEXT_CT = "text/plain; charset=utf-8"

FAULTS = ("", "drop", "eof", "reset", "garbage", "stall")
GARBAGE = b"<html>oops</html>"
STALL_FOREVER = 30.0  # a stall with delay 0 waits this long (or until stop/kill)

_DEFAULT_ERRORS = {
    400: "bad request",
    404: "not found",
    429: "rate limit exceeded",
    500: "model runner has unexpectedly stopped, this may be due to resource limitations or an "
    "internal error, check ollama server logs for details",
    502: "bad gateway",
    503: "server busy, please try again.  maximum pending requests exceeded",
}
SERIAL_FAMILIES = ("qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe", "mllama")  # server/sched.go
_MID_STREAM_ERROR = "an error was encountered while running the model"
_FOREVER_NS = (1 << 63) - 1
_DEFAULT_KEEP_ALIVE_NS = 5 * 60 * 10**9


@dataclass
class Recorded:
    """One HTTP request received by the fake, in arrival order."""

    method: str
    path: str
    headers: dict[str, str]
    body: object | None
    raw: bytes
    query: str = ""
    received_at: float = 0.0  # time.monotonic() at arrival


@dataclass
class Reply:
    """One scripted answer for a generation request (/api/chat or /api/generate).

    status != 200: that status and {"error": error} before any byte (with legacy_errors: HTTP 200
    and one NDJSON error line when streaming, 500 when not). mid_stream: about half the content,
    then an {"error": error} line, HTTP 200 (stream:false: 500). fault: "drop" closes without any
    response; "eof" streams about half the content and ends the body cleanly without a done:true
    line (stream:false: the full Content-Length is announced, half is sent, the socket closed);
    "reset" is eof with the chunked body cut abruptly; "garbage" answers 200 with a non-JSON line;
    "stall" sends nothing for `delay` seconds (STALL_FOREVER when 0, or until stop/kill), then
    closes. `delay` (+ FakeOllama.request_time) passes before the first byte, in a parallel slot.
    """

    text: str = ""
    thinking: str = ""
    status: int = 200
    error: str = ""
    mid_stream: bool = False
    fault: str = ""
    delay: float = 0.0
    done_reason: str = "stop"
    model: str | None = None
    endpoint: str | None = None
    eval_count: int | None = None
    chunk_chars: int = 8
    chunk_delay: float = 0.0  # seconds between streamed chunks
    final_piece: bool | None = None  # None: last text piece rides in the final chunk iff len(text) is odd
    final_fields: dict[str, Any] | None = None  # merged into the final object; a None value deletes the key
    retry_after: float | None = None  # status != 200 on the /v1 face: sent as a Retry-After header

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {FAULTS}")
        if self.chunk_chars < 1:
            raise ValueError("chunk_chars must be >= 1")


@dataclass
class _Model:
    name: str
    capabilities: tuple[str, ...]
    family: str
    parameter_size: str
    quantization_level: str
    size: int
    context_length: int
    families: tuple[str, ...] = ()  # details.families; () means (family,). llava: ("llama", "clip")

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    def details(self, *, with_context: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": list(self.families or (self.family,)),
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }
        if with_context:
            d["context_length"] = self.context_length
        return d


class _HTTPError(Exception):
    """An error answered as {"error": message} with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Aborted(Exception):
    """The server was stopped or killed while a handler was waiting."""


class _Cleanup:
    """Bookkeeping to undo once a request is answered (run just before its last bytes are written,
    so a client that has read a complete response sees the fake's state already settled)."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []

    def push(self, action: Callable[[], None]) -> None:
        self._actions.append(action)

    def run(self) -> None:
        while self._actions:
            self._actions.pop()()


# ----------------------------------------------------------------------------------------------
# Go look-alikes: quoting, JSON decoder messages, base64, time.ParseDuration, JSON encoding.


def _go_quote(s: str) -> str:
    """strconv.Quote."""
    out = ['"']
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch in "\a\b\f\n\r\t\v":
            out.append({"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                        "\t": "\\t", "\v": "\\v"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        elif not ch.isprintable():
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _go_quote_char(c: str) -> str:
    """encoding/json quoteChar."""
    if c == "'":
        return "'\\''"
    if c == '"':
        return "'\"'"
    if ord(c) >= 0x80:  # Go quotes the first UTF-8 byte
        return f"'\\x{c.encode()[0]:02x}'"
    return "'" + _go_quote(c)[1:-1] + "'"


def _time_quote(s: str) -> str:
    """The time package's quote()."""
    out = ['"']
    for b in s:
        if ord(b) >= 0x80 or ord(b) < 0x20:
            out.extend(f"\\x{x:02x}" for x in b.encode())
        else:
            out.append("\\" + b if b in ('"', "\\") else b)
    out.append('"')
    return "".join(out)


def _innermost_container(s: str, pos: int) -> str:
    stack: list[str] = []
    in_str = esc = False
    for ch in s[:pos]:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append(ch)
        elif ch in "}]" and stack:
            stack.pop()
    return stack[-1] if stack else ""


def _go_json_message(s: str, err: json.JSONDecodeError) -> str:
    """Translate a Python JSON error into encoding/json's wording."""
    pos, msg = err.pos, err.msg
    if msg.startswith("Unterminated string") or pos >= len(s):
        return "unexpected EOF"
    c = s[pos]
    q = _go_quote_char
    if msg.startswith("Expecting value"):
        for lit in ("true", "false", "null"):
            if c == lit[0]:
                for i, want in enumerate(lit):
                    if pos + i >= len(s):
                        return "unexpected EOF"
                    if s[pos + i] != want:
                        return f"invalid character {q(s[pos + i])} in literal {lit} (expecting {q(want)})"
        if c == "-":
            nxt = s[pos + 1:pos + 2]
            return f"invalid character {q(nxt)} in numeric literal" if nxt else "unexpected EOF"
        return f"invalid character {q(c)} looking for beginning of value"
    if msg.startswith("Expecting property name"):
        return f"invalid character {q(c)} looking for beginning of object key string"
    if msg.startswith("Illegal trailing comma"):
        j = pos + 1
        while j < len(s) and s[j] in " \t\r\n":
            j += 1
        if j >= len(s):
            return "unexpected EOF"
        what = "object key string" if "object" in msg else "value"
        return f"invalid character {q(s[j])} looking for beginning of {what}"
    if msg.startswith("Expecting ':'"):
        return f"invalid character {q(c)} after object key"
    if msg.startswith("Expecting ','"):
        if _innermost_container(s, pos) == "{":
            return f"invalid character {q(c)} after object key:value pair"
        return f"invalid character {q(c)} after array element"
    if msg.startswith("Invalid control character"):
        return f"invalid character {q(c)} in string literal"
    if msg.startswith("Invalid \\uXXXX"):
        for ch in s[pos + 1:pos + 5]:
            if ch not in "0123456789abcdefABCDEF":
                return f"invalid character {q(ch)} in \\u hexadecimal character escape"
        return "unexpected EOF"
    if msg.startswith("Invalid \\escape"):
        nxt = s[pos + 1:pos + 2]
        return f"invalid character {q(nxt)} in string escape code" if nxt else "unexpected EOF"
    return f"invalid character {q(c)} looking for beginning of value"


class _ConstantError(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _ConstantError(name)


def _parse_go_json(text: str) -> Any:
    """Decode like json.Decoder.Decode (trailing data ignored); raises _HTTPError(400)."""
    s = text.lstrip(" \t\r\n")
    try:
        obj, _ = json.JSONDecoder(parse_constant=_reject_constant).raw_decode(s)
    except _ConstantError as e:  # NaN / Infinity are not JSON
        if str(e).startswith("-"):
            raise _HTTPError(400, "invalid character 'I' in numeric literal") from None
        raise _HTTPError(400, f"invalid character {_go_quote_char(str(e)[0])} looking for beginning of value") from None
    except json.JSONDecodeError as e:
        raise _HTTPError(400, _go_json_message(s, e)) from None
    return obj


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_MAP = {c: i for i, c in enumerate(_B64_ALPHABET)}


class _Base64Error(ValueError):
    def __init__(self, offset: int) -> None:
        super().__init__(f"illegal base64 data at input byte {offset}")
        self.offset = offset


def go_b64decode(s: str) -> bytes:
    """base64.StdEncoding.Decode with Go's CorruptInputError offsets (\\r and \\n are skipped)."""
    src = s.encode("utf-8")
    n = len(src)
    out = bytearray()
    si = 0
    while True:
        dbuf = [0, 0, 0, 0]
        dlen = 4
        j = 0
        while j < 4:
            if si == n:
                if j == 0:
                    return bytes(out)
                raise _Base64Error(si - j)
            ch = src[si]
            si += 1
            v = _B64_MAP.get(ch)
            if v is not None:
                dbuf[j] = v
                j += 1
                continue
            if ch in (10, 13):
                continue
            if ch != 61:  # '='
                raise _Base64Error(si - 1)
            if j in (0, 1):
                raise _Base64Error(si - 1)
            if j == 2:
                while si < n and src[si] in (10, 13):
                    si += 1
                if si == n:
                    raise _Base64Error(n)
                if src[si] != 61:
                    raise _Base64Error(si - 1)
                si += 1
            while si < n and src[si] in (10, 13):
                si += 1
            if si < n:
                raise _Base64Error(si)
            dlen = j
            break
        val = dbuf[0] << 18 | dbuf[1] << 12 | dbuf[2] << 6 | dbuf[3]
        out.extend(bytes(((val >> 16) & 255, (val >> 8) & 255, val & 255))[: max(dlen - 1, 0) if dlen < 4 else 3])
        if dlen < 4:
            return bytes(out)


_DURATION_UNITS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9,
                   "m": 60 * 10**9, "h": 3600 * 10**9}


def go_parse_duration(orig: str) -> int:
    """time.ParseDuration, in nanoseconds; raises ValueError with Go's message."""
    s = orig
    neg = False
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    invalid = ValueError("time: invalid duration " + _time_quote(orig))
    if not s:
        raise invalid
    total = 0
    while s:
        if not (s[0] == "." or "0" <= s[0] <= "9"):
            raise invalid
        i = 0
        while i < len(s) and "0" <= s[i] <= "9":
            i += 1
        pre = i > 0
        whole = int(s[:i]) if pre else 0
        s = s[i:]
        frac = ""
        post = False
        if s and s[0] == ".":
            s = s[1:]
            i = 0
            while i < len(s) and "0" <= s[i] <= "9":
                i += 1
            post = i > 0
            frac, s = s[:i], s[i:]
        if not pre and not post:
            raise invalid
        i = 0
        while i < len(s) and not (s[i] == "." or "0" <= s[i] <= "9"):
            i += 1
        if i == 0:
            raise ValueError("time: missing unit in duration " + _time_quote(orig))
        unit_name, s = s[:i], s[i:]
        unit = _DURATION_UNITS.get(unit_name)
        if unit is None:
            raise ValueError(f"time: unknown unit {_time_quote(unit_name)} in duration {_time_quote(orig)}")
        total += whole * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
        if total > _FOREVER_NS:
            raise invalid
    return -total if neg else total


def go_json(obj: Any) -> str:
    """json.Marshal look-alike: compact, UTF-8, HTML characters escaped."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _rfc3339(when: _dt.datetime | None = None) -> str:
    """RFC 3339 UTC with nine fractional digits, like Go's time.Time JSON encoding."""
    if when is None:
        ns = time.time_ns()
        when = _dt.datetime.fromtimestamp(ns // 10**9, _dt.timezone.utc)
        frac = ns % 10**9
    else:
        frac = when.microsecond * 1000
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{frac:09d}Z"


def _version_tuple(v: str) -> tuple[int, ...]:
    core = v.lstrip("v").split("-", 1)[0].split("+", 1)[0]
    parts: list[int] = []
    for p in core.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def model_key(name: str) -> str:
    """Normalise a model name: tag defaults to `latest`, registry prefix dropped, lower-cased."""
    n = name.strip().lower()
    for prefix in ("registry.ollama.ai/", "library/"):
        n = n.removeprefix(prefix)
    if ":" not in n.rsplit("/", 1)[-1]:
        n += ":latest"
    return n


def _with_tag(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _fully_qualified(name: str) -> str:
    n = _with_tag(name)
    slashes = n.count("/")
    if slashes == 0:
        return "registry.ollama.ai/library/" + n
    if slashes == 1:
        return "registry.ollama.ai/" + n
    return n


# ----------------------------------------------------------------------------------------------
# Request decoding with Go's semantics (field names case-insensitive, null = absent, type errors
# saved and reported at the end, custom UnmarshalJSON errors abort at once).

_GEN_FIELDS: dict[str, tuple[str, str]] = {
    "model": ("string", "string"), "prompt": ("string", "string"), "suffix": ("string", "string"),
    "system": ("string", "string"), "template": ("string", "string"), "context": ("[]int", "[]int"),
    "stream": ("bool", "bool"), "raw": ("bool", "bool"), "format": ("raw", ""),
    "keep_alive": ("duration", ""), "images": ("images", "[]api.ImageData"),
    "options": ("map", "map[string]interface {}"), "think": ("think", ""),
    "truncate": ("bool", "bool"), "shift": ("bool", "bool"), "logprobs": ("bool", "bool"),
    "top_logprobs": ("int", "int"), "_debug_render_only": ("bool", "bool"),
}
_CHAT_FIELDS: dict[str, tuple[str, str]] = {
    "model": ("string", "string"), "messages": ("messages", "[]api.Message"),
    "stream": ("bool", "bool"), "format": ("raw", ""), "keep_alive": ("duration", ""),
    "tools": ("array", "api.Tools"), "options": ("map", "map[string]interface {}"),
    "think": ("think", ""), "truncate": ("bool", "bool"), "shift": ("bool", "bool"),
    "logprobs": ("bool", "bool"), "top_logprobs": ("int", "int"),
    "_debug_render_only": ("bool", "bool"),
}
_MESSAGE_FIELDS: dict[str, tuple[str, str]] = {
    "role": ("string", "string"), "content": ("string", "string"), "thinking": ("string", "string"),
    "images": ("images", "[]api.ImageData"), "tool_calls": ("array", "[]api.ToolCall"),
    "tool_name": ("string", "string"), "tool_call_id": ("string", "string"),
}
_SHOW_FIELDS: dict[str, tuple[str, str]] = {
    "model": ("string", "string"), "name": ("string", "string"), "verbose": ("bool", "bool"),
    "system": ("string", "string"), "template": ("string", "string"),
    "options": ("map", "map[string]interface {}"),
}
_PULL_FIELDS: dict[str, tuple[str, str]] = {
    "model": ("string", "string"), "name": ("string", "string"), "stream": ("bool", "bool"),
    "insecure": ("bool", "bool"), "username": ("string", "string"), "password": ("string", "string"),
}

_OPTION_INTS = {"num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch",
                "num_gpu", "main_gpu", "num_thread", "draft_num_predict"}
_OPTION_FLOATS = {"top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                  "frequency_penalty"}
_OPTION_BOOLS = {"use_mmap"}


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _go_type_of(v: Any) -> str:
    """reflect.TypeOf(v) for a value decoded into interface{}."""
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "float64"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "[]interface {}"
    return "map[string]interface {}"


class _Decoder:
    def __init__(self, struct: str) -> None:
        self.struct = struct
        self.saved: str | None = None

    def type_error(self, value: Any, path: str, gotype: str, *, literal: str | None = None) -> None:
        if self.saved is None:
            kind = literal or _json_kind(value)
            self.saved = f"json: cannot unmarshal {kind} into Go struct field {self.struct}.{path} of type {gotype}"

    def save(self, message: str) -> None:
        if self.saved is None:
            self.saved = message

    def struct_fields(self, obj: dict[str, Any], fields: dict[str, tuple[str, str]],
                      prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        lower = {k.lower(): k for k in fields}
        for key, value in obj.items():
            name = key if key in fields else lower.get(key.lower())
            if name is None:
                continue  # unknown fields are ignored
            if value is None:
                out.pop(name, None)
                continue
            kind, gotype = fields[name]
            path = prefix + name
            decoded = self.field(kind, gotype, value, path)
            if decoded is not _SKIP:
                out[name] = decoded
        return out

    def field(self, kind: str, gotype: str, value: Any, path: str) -> Any:
        if kind == "string":
            if isinstance(value, str):
                return value
            self.type_error(value, path, gotype)
        elif kind == "bool":
            if isinstance(value, bool):
                return value
            self.type_error(value, path, gotype)
        elif kind == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            lit = f"number {value!r}" if isinstance(value, float) else None
            self.type_error(value, path, gotype, literal=lit)
        elif kind == "[]int":
            if not isinstance(value, list):
                self.type_error(value, path, gotype)
                return _SKIP
            ints = []
            for item in value:
                if isinstance(item, int) and not isinstance(item, bool):
                    ints.append(item)
                elif item is None:
                    ints.append(0)
                else:
                    lit = f"number {item!r}" if isinstance(item, float) else None
                    self.type_error(item, path, "int", literal=lit)
            return ints
        elif kind == "map":
            if isinstance(value, dict):
                return value
            self.type_error(value, path, gotype)
        elif kind == "array":
            if isinstance(value, list):
                return value
            self.type_error(value, path, gotype)
        elif kind == "raw":
            return value
        elif kind == "images":
            if not isinstance(value, list):
                self.type_error(value, path, gotype)
                return _SKIP
            images: list[bytes] = []
            for item in value:
                if item is None:
                    images.append(b"")
                elif isinstance(item, str):
                    try:
                        images.append(go_b64decode(item))
                    except _Base64Error as e:
                        self.save(str(e))
                        images.append(b"")
                else:
                    self.type_error(item, path, "api.ImageData")
            return images
        elif kind == "duration":
            return _decode_keep_alive(value)
        elif kind == "think":
            return _decode_think(value)
        elif kind == "messages":
            if not isinstance(value, list):
                self.type_error(value, path, gotype)
                return _SKIP
            return [_decode_message(m) for m in value]
        else:  # pragma: no cover - schema typo
            raise AssertionError(kind)
        return _SKIP


_SKIP = object()


def _decode_keep_alive(value: Any) -> int:
    """api.Duration.UnmarshalJSON: nanoseconds, negative = forever."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _FOREVER_NS if value < 0 else int(value * 10**9)
    if isinstance(value, str):
        try:
            ns = go_parse_duration(value)
        except ValueError as e:
            raise _HTTPError(400, str(e)) from None
        return _FOREVER_NS if ns < 0 else ns
    raise _HTTPError(400, f"Unsupported type: '{_go_type_of(value)}'")


def _decode_think(value: Any) -> bool | str:
    """api.ThinkValue.UnmarshalJSON."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value not in ("high", "medium", "low", "max"):
            raise _HTTPError(400, f'invalid think value: {_go_quote(value)} (must be "high", "medium", "low", "max", true, or false)')
        return value
    raise _HTTPError(400, f"think must be a boolean or string, got {go_json(value)}")


def _decode_message(value: Any) -> dict[str, Any]:
    # Message.UnmarshalJSON decodes into a local `Alias` type and returns its first error at once.
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _HTTPError(400, f"json: cannot unmarshal {_json_kind(value)} into Go value of type api.Alias")
    dec = _Decoder("Alias")
    msg = dec.struct_fields(value, _MESSAGE_FIELDS)
    if dec.saved:
        raise _HTTPError(400, dec.saved)
    msg["role"] = msg.get("role", "").lower()
    return msg


def _decode_body(raw: bytes, fields: dict[str, tuple[str, str]], struct: str) -> dict[str, Any]:
    text = raw.decode("utf-8", "replace")
    if not text.strip(" \t\r\n"):
        raise _HTTPError(400, "missing request body")
    obj = _parse_go_json(text)
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise _HTTPError(400, f"json: cannot unmarshal {_json_kind(obj)} into Go value of type api.{struct}")
    dec = _Decoder(struct)
    out = dec.struct_fields(obj, fields)
    if dec.saved:
        raise _HTTPError(400, dec.saved)
    return out


def _check_options(options: dict[str, Any]) -> None:
    """api.Options.FromMap type rules (errors surface as 500 from the scheduler)."""
    for key, val in options.items():
        if val is None:
            continue
        if key == "stop":
            if not isinstance(val, list):
                raise _HTTPError(500, 'option "stop" must be of type array')
            if not all(isinstance(x, str) for x in val):
                raise _HTTPError(500, 'option "stop" must be of an array of strings')
        elif key in _OPTION_INTS:
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise _HTTPError(500, f'option "{key}" must be of type integer')
        elif key in _OPTION_FLOATS:
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise _HTTPError(500, f'option "{key}" must be of type float32')
        elif key in _OPTION_BOOLS and not isinstance(val, bool):
            raise _HTTPError(500, f'option "{key}" must be of type boolean')


def _check_format(fmt: Any) -> None:
    if fmt is None or fmt in ("", "json") or isinstance(fmt, dict):
        return
    raise _HTTPError(500, f'invalid format: {_go_quote(go_json(fmt))}; expected "json" or a valid JSON Schema object')


def _per_model(setting: Any, key: str, default: Any) -> Any:
    """A setting given as one value or as a dict of model name -> value ("*": the others)."""
    if not isinstance(setting, dict):
        return setting
    for name, value in setting.items():
        if name != "*" and model_key(name) == key:
            return value
    return setting.get("*", default)


def _runner(req: dict[str, Any]) -> tuple | None:
    """The runner options a request asks for; a model loaded with others reloads (needsReload)."""
    if not (req.get("prompt") or req.get("messages")):
        return None  # a load or unload request: it takes the model as it is
    options = req.get("options") or {}
    return (options.get("num_ctx"), req.get("shift"))


def _image_ok(data: bytes) -> bool:
    return (data.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM"))
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"))


def _image_format(data: bytes) -> str:
    """The format name of image bytes ("" for none we know)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    signatures = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png", b"GIF8": "gif", b"BM": "bmp"}
    return next((name for magic, name in signatures.items() if data.startswith(magic)), "")


def _split(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def _loads_or_none(raw: bytes) -> object | None:
    if not raw:
        return None
    try:
        parsed: object = json.loads(raw.decode("utf-8"))
        return parsed
    except (ValueError, UnicodeDecodeError):
        return None


# ----------------------------------------------------------------------------------------------
# HTTP plumbing


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    fake: FakeOllama

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.fake._note_exception()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 60  # idle keep-alive connections give up eventually

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.fake._track(self.connection, False)

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, _Aborted):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # keep the server quiet
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        # Like gin: no Server header.
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def _dispatch(self) -> None:
        fake = self.server.fake
        self.headers_sent = False
        self.cleanup = _Cleanup()
        # http.server collapses a leading "//" in self.path; Go routers do not, so use the raw line.
        words = self.requestline.split()
        target, _, query = (words[1] if len(words) == 3 else self.path).partition("?")
        if target.startswith(("http://", "https://")):  # absolute-form request target
            target = urlsplit(target).path
        raw = self._read_body()
        rec = Recorded(
            method=self.command,
            path=target or "/",
            headers={k.lower(): v for k, v in self.headers.items()},
            body=_loads_or_none(raw),
            raw=raw,
            query=query,
            received_at=time.monotonic(),
        )
        fake._record(rec)
        try:
            fake._route(self, rec)
        except (OSError, _Aborted):
            self.close_connection = True
        except Exception:
            fake._note_exception()
            if not self.headers_sent:
                self.send_json(500, {"error": "fake_ollama internal error"})
            else:
                self.drop()
        finally:
            self.cleanup.run()

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = bytearray()
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline(65537)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    # -- responses --

    def send_bytes(self, status: int, body: bytes, content_type: str,
                   extra: Iterable[tuple[str, str]] = ()) -> None:
        self.cleanup.run()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in extra:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.headers_sent = True
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any) -> None:
        self.send_bytes(status, go_json(obj).encode("utf-8"), JSON_CT)

    def send_text(self, status: int, text: str, extra: Iterable[tuple[str, str]] = ()) -> None:
        self.send_bytes(status, text.encode("utf-8"), TEXT_CT, extra)

    def start_stream(self, content_type: str = NDJSON_CT) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.headers_sent = True

    def stream_raw(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def stream_line(self, obj: Any, *, last: bool = False) -> None:
        if last:
            self.cleanup.run()
        self.stream_raw((go_json(obj) + "\n").encode("utf-8"))

    def end_stream(self) -> None:
        self.cleanup.run()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def drop(self) -> None:
        """Close the socket at once (the client sees a disconnect, no further bytes)."""
        self.cleanup.run()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------


_ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("GET", "HEAD"),
    "/api/version": ("GET", "HEAD"),
    "/api/tags": ("GET", "HEAD"),
    "/api/show": ("POST",),
    "/api/ps": ("GET",),
    "/api/pull": ("POST",),
    "/api/generate": ("POST",),
    "/api/chat": ("POST",),
}

_DEFAULT_MODELS: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b:latest": {"capabilities": ("completion", "tools", "thinking"), "family": "qwen3",
                             "parameter_size": "30.5B", "size": 18_556_701_140},
    "qwen3-vl:32b": {"capabilities": ("completion", "vision", "tools"), "family": "qwen3vl",
                     "parameter_size": "33.4B", "size": 20_932_475_000},
}


class FakeOllama:
    """A scripted Ollama server on 127.0.0.1 (random port). Use start()/stop() or `with`."""

    def __init__(self, *, version: str = "0.13.0", models: dict[str, dict[str, Any]] | None = None,
                 show_capabilities: bool = True, legacy_errors: bool = False, load_cost: float = 0.0,
                 max_loaded: int = 0, parallel: int | dict[str, int] = 0,
                 request_time: float | dict[str, float] = 0.0, validate_images: bool = True,
                 serial_families: Iterable[str] = SERIAL_FAMILIES, max_queue: int = 0,
                 unreadable_formats: Iterable[str] = (), api: str = "ollama", owned_by: str = "",
                 structured_outputs: bool = True, unsupported_fields: Iterable[str] = (),
                 api_key: str = "") -> None:
        if api not in APIS:
            raise ValueError(f"unknown api {api!r}; expected one of {APIS}")
        self.api = api  # which faces are served (see the module docstring); fixed once models are added
        self.owned_by = owned_by or _DIALECTS.get(api, _DIALECTS["both"]).owned_by
        self.structured_outputs = structured_outputs  # False: /v1 refuses response_format json_schema
        self.unsupported_fields = frozenset(unsupported_fields)  # /v1 request fields answered with 400
        self.api_key = api_key  # set: requests without "Authorization: Bearer <api_key>" get 401
        self.version = version
        self.show_capabilities = show_capabilities
        self.legacy_errors = legacy_errors
        self.load_cost = load_cost
        self.max_loaded = max_loaded
        self.parallel = parallel
        self.request_time = request_time
        self.serial_families = tuple(serial_families)
        self.max_queue = max_queue
        self.validate_images = validate_images  # valid base64 that is no known image -> 500 (runner error)
        # Image formats this server's engine cannot decode ("webp": the llama.cpp engine before the
        # 2026-08 fix): answered as an unknown format, like bytes that are no image at all.
        self.unreadable_formats = frozenset(unreadable_formats)

        self.url = ""
        self.requests: list[Recorded] = []
        self.replies: list[Reply] = []
        self.default_text: str | Callable[[Recorded], str] = "A fake answer."
        self.default_thinking: str = ""  # thinking used with default_text (thinking models only)
        self.loads = 0
        self.load_log: list[str] = []
        self.unload_log: list[str] = []
        self.max_concurrent_seen = 0
        self.max_concurrent_by_model: dict[str, int] = {}  # model name -> most requests answered at once
        self.max_in_flight_by_model: dict[str, int] = {}  # model name -> most requests at once, waiting too
        self.in_flight_log_by_model: dict[str, list[int]] = {}  # model name -> requests at once, waiting
        #                                                         too, as each generation arrived (itself too)
        self.busy_answers = 0  # 503s sent for max_queue
        self.errors: list[str] = []  # tracebacks of bugs inside the fake (should stay empty)
        self.pullable: dict[str, dict[str, Any]] = {}  # name -> add_model kwargs, installed by /api/pull

        self._models: dict[str, _Model] = {}
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._load_lock = threading.Lock()
        self._resident: OrderedDict[str, int] = OrderedDict()  # key -> expiry (ns since epoch)
        self._in_flight: dict[str, int] = {}
        self._evicting: set[str] = set()
        self._expire_when_idle: set[str] = set()
        self._slots: dict[str, threading.Semaphore] = {}
        self._runner_options: dict[str, tuple] = {}  # key -> (num_ctx, shift) it was loaded with
        self._active = 0
        self._active_by_model: dict[str, int] = {}
        self._in_flight_by_model: dict[str, int] = {}
        self._waiting = 0  # generations waiting for a load or a slot (max_queue)
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._abort = threading.Event()
        self._port = 0

        for name, kw in (_DEFAULT_MODELS if models is None else models).items():
            self.add_model(name, **kw)

    # -- lifecycle --

    def start(self) -> FakeOllama:
        if self._server is not None:
            return self
        self._abort = threading.Event()
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.fake = self
        self._port = server.server_address[1]
        self.url = f"http://127.0.0.1:{self._port}"
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name=f"fake-ollama-{self._port}", daemon=True)
        self._thread.start()
        return self

    def _shutdown(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._abort.set()  # wakes stalled / waiting handlers
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def stop(self) -> None:
        """Stop serving and abort in-flight requests (safe to call twice)."""
        self._shutdown()

    def kill(self) -> None:
        """Simulate a crash: refuse new connections and cut in-flight ones; state is kept."""
        self._shutdown()

    def restart(self) -> None:
        """Serve again on the same port with the same state (after kill())."""
        self._shutdown()
        self.start()

    @property
    def active(self) -> int:
        """Generation requests being answered right now (holding a slot)."""
        with self._lock:
            return self._active

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        return self._port

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting --

    def reply(self, text: str = "", **kw: Any) -> Reply:
        r = Reply(text, **kw)
        with self._lock:
            self.replies.append(r)
        return r

    def add_model(self, name: str, *, capabilities: Iterable[str] = ("completion",), family: str = "llama",
                  parameter_size: str = "8.0B", quantization_level: str = "Q4_K_M",
                  size: int = 4_900_000_000, context_length: int = 40960,
                  families: Iterable[str] = ()) -> None:
        shown = name if self.api == "openai" else _with_tag(name)  # vLLM serves names verbatim
        m = _Model(shown, tuple(capabilities), family, parameter_size, quantization_level,
                   size, context_length, tuple(families))
        with self._lock:
            self._models[model_key(name)] = m

    def remove_model(self, name: str) -> None:
        key = model_key(name)
        with self._cond:
            self._models.pop(key, None)
            self._resident.pop(key, None)
            self._cond.notify_all()

    @property
    def models(self) -> list[str]:
        """Installed model names."""
        with self._lock:
            return [m.name for m in self._models.values()]

    @property
    def loaded(self) -> list[str]:
        """Resident model names, least recently used first."""
        with self._lock:
            return [self._models[k].name if k in self._models else k for k in self._resident]

    def requests_to(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def sent_images(self, path: str = "/api/chat") -> list[bytes]:
        """The images sent in requests to path, decoded, in arrival order."""
        import base64

        return [base64.b64decode(image) for rec in self.requests_to(path)
                for message in (rec.body or {}).get("messages") or [] for image in message.get("images") or []
                ] + [image for rec in self.requests_to(path) if path in _OPENAI_ROUTES
                     for image in _data_url_images(rec.body)]

    def generation_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path in ("/api/chat", "/api/generate", "/v1/chat/completions")]

    # -- internals: bookkeeping --

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _note_exception(self) -> None:
        if isinstance(sys.exc_info()[1], (OSError, _Aborted)):
            return  # client went away or the server is stopping: not a bug of the fake
        with self._lock:
            self.errors.append(traceback.format_exc())

    def _wait(self, seconds: float, abort: threading.Event) -> None:
        if seconds > 0 and abort.wait(seconds):
            raise _Aborted()
        if abort.is_set():
            raise _Aborted()

    def _acquire(self, lock: threading.Lock | threading.Semaphore, abort: threading.Event) -> None:
        while not lock.acquire(timeout=0.02):
            if abort.is_set():
                raise _Aborted()

    def _lookup(self, name: str) -> _Model | None:
        with self._lock:
            return self._models.get(model_key(name)) if name else None

    def _take_reply(self, key: str, endpoint: str, rec: Recorded) -> Reply:
        if self.sticky_reply is not None:
            return dataclasses.replace(self.sticky_reply)
        with self._lock:
            for i, r in enumerate(self.replies):
                if r.model is not None and model_key(r.model) != key:
                    continue
                if r.endpoint is not None and r.endpoint != endpoint:
                    continue
                return self.replies.pop(i)
        text = self.default_text(rec) if callable(self.default_text) else self.default_text
        return Reply(text=text, thinking=self.default_thinking)

    # -- internals: scheduler --

    def _set_keep_alive(self, key: str, keep_alive: int | None) -> None:
        now = time.time_ns()
        if keep_alive is None:
            if key not in self._resident:
                self._resident[key] = now + _DEFAULT_KEEP_ALIVE_NS
        else:
            self._resident[key] = _FOREVER_NS if keep_alive >= _FOREVER_NS - now else now + keep_alive
            if keep_alive == 0:
                self._expire_when_idle.add(key)
            else:
                self._expire_when_idle.discard(key)
        self._resident.move_to_end(key)

    def _unload(self, key: str) -> None:
        if self._resident.pop(key, None) is not None:
            m = self._models.get(key)
            self.unload_log.append(m.name if m else key)
        self._runner_options.pop(key, None)
        self._evicting.discard(key)
        self._expire_when_idle.discard(key)
        self._cond.notify_all()

    def _usable(self, key: str, runner: tuple | None = None) -> bool:
        if key not in self._resident or key in self._evicting:
            return False
        loaded_with = self._runner_options.get(key)
        return runner is None or loaded_with is None or loaded_with == runner

    def _ensure_loaded(self, key: str, keep_alive: int | None, abort: threading.Event,
                       runner: tuple | None = None) -> None:
        """Make `key` resident (with these runner options) and count one in-flight request on it."""
        with self._cond:
            if self._usable(key, runner):
                self._set_keep_alive(key, keep_alive)
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
                return
        self._acquire(self._load_lock, abort)  # one load at a time
        marked: set[str] = set()
        try:
            with self._cond:
                if self._usable(key, runner):
                    self._set_keep_alive(key, keep_alive)
                    self._in_flight[key] = self._in_flight.get(key, 0) + 1
                    return
                while key in self._resident and runner is not None \
                        and self._runner_options.get(key) not in (None, runner):  # reload once idle
                    if not self._in_flight.get(key):
                        self._unload(key)
                        break
                    self._evicting.add(key)
                    marked.add(key)
                    self._cond.wait(0.02)
                    if abort.is_set():
                        raise _Aborted()
                while self.max_loaded and len(self._resident) >= self.max_loaded:
                    idle = [k for k in self._resident if not self._in_flight.get(k)]
                    if idle:
                        self._unload(idle[0])  # least recently used idle model
                        continue
                    victim = next(iter(self._resident))  # all busy: wait for the LRU one to drain
                    self._evicting.add(victim)
                    marked.add(victim)
                    self._cond.wait(0.02)
                    if abort.is_set():
                        raise _Aborted()
            self._wait(self.load_cost, abort)
            with self._cond:
                self.loads += 1
                m = self._models.get(key)
                self.load_log.append(m.name if m else key)
                self._resident.pop(key, None)
                self._set_keep_alive(key, keep_alive)
                if runner is not None:
                    self._runner_options[key] = runner
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
        finally:
            if marked:
                with self._cond:
                    self._evicting.difference_update(marked)
            self._load_lock.release()

    def _sent_done(self, name: str) -> None:
        with self._lock:
            self._in_flight_by_model[name] -= 1

    def _release(self, key: str) -> None:
        with self._cond:
            n = self._in_flight.get(key, 0) - 1
            self._in_flight[key] = max(n, 0)
            if n <= 0 and key in self._expire_when_idle:
                self._unload(key)
            self._cond.notify_all()

    def _request_unload(self, key: str) -> None:
        with self._cond:
            if key not in self._resident:
                return
            if self._in_flight.get(key):
                self._expire_when_idle.add(key)
            else:
                self._unload(key)

    def slots(self, name: str) -> int:
        """Requests a model answers at once (0: no limit)."""
        key = model_key(name)
        slots = _per_model(self.parallel, key, 0)
        m = self._models.get(key)
        return 1 if slots and m is not None and m.family in self.serial_families else slots

    def _seconds(self, key: str) -> float:
        return float(_per_model(self.request_time, key, 0.0))

    def _slot(self, key: str) -> threading.Semaphore | None:
        slots = self.slots(key)
        if slots <= 0:
            return None
        with self._lock:
            sem = self._slots.get(key)
            if sem is None:
                sem = self._slots[key] = threading.Semaphore(slots)
            return sem

    # -- routing --

    def _route(self, h: _Handler, rec: Recorded) -> None:
        if self.intercept is not None and self.intercept(h, rec):
            return
        if self._openai_face(h, rec):
            return
        allowed = _ROUTES.get(rec.path)
        if allowed is None:
            h.send_text(404, "404 page not found")
            return
        if rec.method not in allowed:
            h.send_text(405, "405 method not allowed", extra=[("Allow", ", ".join(allowed))])
            return
        try:
            if rec.path == "/":
                h.send_text(200, "Ollama is running")
            elif rec.path == "/api/version":
                h.send_json(200, {"version": self.version})
            elif rec.path == "/api/tags":
                h.send_json(200, self._tags())
            elif rec.path == "/api/ps":
                h.send_json(200, self._ps())
            elif rec.path == "/api/show":
                h.send_json(200, self._show(rec))
            elif rec.path == "/api/pull":
                self._pull(h, rec)
            else:
                self._generation(h, rec)
        except _HTTPError as e:
            if h.headers_sent:
                raise
            h.send_json(e.status, {"error": e.message})

    def _tags(self) -> dict[str, Any]:
        new = _version_tuple(self.version) >= (0, 30, 0)
        out = []
        with self._lock:
            models = list(self._models.values())
        for m in models:
            entry: dict[str, Any] = {
                "name": m.name, "model": m.name, "modified_at": "2025-10-17T23:14:07.414671532Z",
                "size": m.size, "digest": m.digest, "details": m.details(with_context=new),
            }
            if new:
                entry["capabilities"] = list(m.capabilities)
            out.append(entry)
        return {"models": out}

    def _ps(self) -> dict[str, Any]:
        with self._lock:
            rows = [(exp, self._models.get(k)) for k, exp in self._resident.items()]
        rows.sort(key=lambda r: r[0], reverse=True)
        out = []
        for exp, m in rows:
            if m is None:
                continue
            secs = min(exp, time.time_ns() + 292 * 365 * 86400 * 10**9) / 1e9
            expires = _rfc3339(_dt.datetime.fromtimestamp(secs, _dt.timezone.utc))
            out.append({"name": m.name, "model": m.name, "size": m.size, "digest": m.digest,
                        "details": m.details(), "expires_at": expires, "size_vram": m.size,
                        "context_length": 4096})
        return {"models": out}

    def _show(self, rec: Recorded) -> dict[str, Any]:
        req = _decode_body(rec.raw, _SHOW_FIELDS, "ShowRequest")
        name = req.get("model") or req.get("name") or ""
        if not name:
            raise _HTTPError(400, "model is required")
        m = self._lookup(name)
        if m is None:
            raise _HTTPError(404, f"model '{_with_tag(name)}' not found")
        resp: dict[str, Any] = {
            "license": "Apache License 2.0",
            "modelfile": f'# Modelfile generated by "ollama show"\nFROM {m.name}\n',
            "parameters": 'stop                           "<|im_end|>"\ntemperature                    0.6',
            "template": "{{ .Prompt }}",
            "details": m.details(),
            "model_info": {"general.architecture": m.family, f"{m.family}.context_length": m.context_length},
        }
        if self.show_capabilities:
            resp["capabilities"] = list(m.capabilities)
        resp["modified_at"] = "2025-10-17T23:14:07.414671532Z"
        return resp

    def _pull(self, h: _Handler, rec: Recorded) -> None:
        req = _decode_body(rec.raw, _PULL_FIELDS, "PullRequest")
        name = req.get("model") or req.get("name") or ""
        if not name:
            raise _HTTPError(400, "model is required")
        stream = req.get("stream", True)
        key = model_key(name)
        with self._lock:
            installed = self._models.get(key)
            extra = next((kw for n, kw in self.pullable.items() if model_key(n) == key), None)
        if installed is None and extra is None:
            err = "pull model manifest: file does not exist"
            if not stream:
                raise _HTTPError(500, err)
            h.start_stream()
            h.stream_line({"status": "pulling manifest"})
            h.stream_line({"error": err})
            h.end_stream()
            return
        if installed is None:
            self.add_model(name, **(extra or {}))
            installed = self._lookup(name)
        assert installed is not None
        if not stream:
            h.send_json(200, {"status": "success"})
            return
        digest = "sha256:" + installed.digest
        total = installed.size
        h.start_stream()
        h.stream_line({"status": "pulling manifest"})
        h.stream_line({"status": f"pulling {digest[7:19]}", "digest": digest, "total": total,
                       "completed": total // 2})
        h.stream_line({"status": f"pulling {digest[7:19]}", "digest": digest, "total": total,
                       "completed": total})
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            h.stream_line({"status": status})
        h.end_stream()

    # -- generation --

    def _generation(self, h: _Handler, rec: Recorded) -> None:
        abort = self._abort
        t0 = time.perf_counter_ns()
        is_gen = rec.path == "/api/generate"
        req = _decode_body(rec.raw, _GEN_FIELDS if is_gen else _CHAT_FIELDS,
                           "GenerateRequest" if is_gen else "ChatRequest")
        name: str = req.get("model", "")
        stream: bool = req.get("stream", True)
        if not is_gen and not name:
            raise _HTTPError(400, "model is required")
        top = req.get("top_logprobs", 0)
        if top < 0 or top > 20:
            raise _HTTPError(400, "top_logprobs must be between 0 and 20")
        if is_gen and req.get("raw") and (req.get("template") or req.get("system") or req.get("context")):
            raise _HTTPError(400, "raw mode does not support template, system, or context")
        m = self._lookup(name)
        if m is None:
            raise _HTTPError(404, f"model '{name}' not found")
        key = model_key(name)
        caps = m.capabilities
        if "completion" not in caps:
            raise _HTTPError(400, f"{_go_quote(name)} does not support {'generate' if is_gen else 'chat'}")
        if is_gen and req.get("suffix") and "insert" not in caps:
            raise _HTTPError(400, f"{_fully_qualified(name)} does not support insert")
        if not is_gen and req.get("tools") and "tools" not in caps:
            raise _HTTPError(400, f"{_fully_qualified(name)} does not support tools")
        think = req.get("think")
        if "thinking" not in caps and think not in (None, False):
            raise _HTTPError(400, f"{_go_quote(name)} does not support thinking")
        think_on = "thinking" in caps and think is not False
        empty = not req.get("prompt") if is_gen else not req.get("messages")
        keep_alive: int | None = req.get("keep_alive")
        if empty and keep_alive == 0:
            self._request_unload(key)
            h.send_json(200, self._load_response(is_gen, name, "unload"))
            return
        _check_options(req.get("options") or {})

        with self._lock:
            if self.max_queue and self._waiting >= self.max_queue:
                self.busy_answers += 1
                raise _HTTPError(503, _DEFAULT_ERRORS[503])
            self._waiting += 1
            if not empty:
                self._in_flight_by_model[m.name] = sent = self._in_flight_by_model.get(m.name, 0) + 1
                self.max_in_flight_by_model[m.name] = max(self.max_in_flight_by_model.get(m.name, 0), sent)
                self.in_flight_log_by_model.setdefault(m.name, []).append(sent)
                h.cleanup.push(lambda: self._sent_done(m.name))
        try:
            reply = None if empty else self._take_reply(key, rec.path, rec)
            self._ensure_loaded(key, keep_alive, abort, _runner(req))
        finally:
            with self._lock:
                self._waiting -= 1
        h.cleanup.push(lambda: self._release(key))
        load_ns = time.perf_counter_ns() - t0
        if reply is None:
            h.send_json(200, self._load_response(is_gen, name, "load"))
            return
        self._run_reply(h, req, reply, is_gen=is_gen, name=name, key=key, stream=stream,
                        think_on=think_on, t0=t0, load_ns=load_ns, abort=abort)

    def _load_response(self, is_gen: bool, name: str, reason: str) -> dict[str, Any]:
        out: dict[str, Any] = {"model": name, "created_at": _rfc3339()}
        if is_gen:
            out["response"] = ""
        else:
            out["message"] = {"role": "assistant", "content": ""}
        out.update({"done": True, "done_reason": reason})
        return out

    def _runner_error(self, h: _Handler, stream: bool, status: int, message: str) -> None:
        if self.legacy_errors:
            if stream:  # before v0.12.6: 200 and one NDJSON error line
                h.start_stream()
                h.stream_line({"error": message}, last=True)
                h.end_stream()
                return
            status = 500
        h.send_json(status, {"error": message})

    def _run_reply(self, h: _Handler, req: dict[str, Any], reply: Reply, *, is_gen: bool, name: str,
                   key: str, stream: bool, think_on: bool, t0: int, load_ns: int,
                   abort: threading.Event, face: _OpenAIFace | None = None) -> None:
        """Schedule and answer one generation; `face` (the /v1 face) answers errors and text in its shapes."""
        runner_error = face.runner_error if face is not None else self._runner_error
        emit = face.emit if face is not None else self._emit
        images: list[bytes] = list(req.get("images") or [])
        for msg in req.get("messages") or []:
            images.extend(msg.get("images") or [])
        try:
            _check_format(req.get("format"))
            if self.validate_images and any(not _image_ok(img) or _image_format(img) in self.unreadable_formats
                                            for img in images):
                raise _HTTPError(500, "Failed to create new sequence: image: unknown format")
        except _HTTPError as e:
            runner_error(h, stream, e.status, e.message)
            return

        sem = self._slot(key)
        if sem is not None:
            with self._lock:
                self._waiting += 1
            try:
                self._acquire(sem, abort)
            finally:
                with self._lock:
                    self._waiting -= 1
        with self._lock:
            self._active += 1
            self.max_concurrent_seen = max(self.max_concurrent_seen, self._active)
            self._active_by_model[key] = self._active_by_model.get(key, 0) + 1
            label = self._models[key].name if key in self._models else key
            self.max_concurrent_by_model[label] = max(self.max_concurrent_by_model.get(label, 0),
                                                      self._active_by_model[key])

        def leave_slot() -> None:
            with self._lock:
                self._active -= 1
                self._active_by_model[key] -= 1
            if sem is not None:
                sem.release()

        h.cleanup.push(leave_slot)
        gen_start = time.perf_counter_ns()
        if reply.fault == "stall":
            self._wait(reply.delay + self._seconds(key) or STALL_FOREVER, abort)
            h.drop()
            return
        self._wait(reply.delay + self._seconds(key), abort)
        if reply.fault == "drop":
            h.drop()
            return
        if reply.status != 200:
            runner_error(h, stream, reply.status, reply.error or _DEFAULT_ERRORS.get(reply.status, "error"))
            return
        emit(h, req, reply, is_gen=is_gen, name=name, stream=stream, think_on=think_on,
                   t0=t0, load_ns=load_ns, gen_start=gen_start, n_images=len(images), abort=abort)

    def _chunk(self, is_gen: bool, name: str, content: str = "", thinking: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {"model": name, "created_at": _rfc3339()}
        if is_gen:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        else:
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                msg["thinking"] = thinking
            out["message"] = msg
        out["done"] = False
        return out

    def _emit(self, h: _Handler, req: dict[str, Any], reply: Reply, *, is_gen: bool, name: str, stream: bool,
              think_on: bool, t0: int, load_ns: int, gen_start: int, n_images: int,
              abort: threading.Event) -> None:
        text, thinking, think_pieces, pieces, last, half = _layout(reply, think_on)

        def final(content: str, thought: str = "") -> dict[str, Any]:
            out = self._chunk(is_gen, name, content, thought)
            out["done"] = True
            if reply.done_reason:
                out["done_reason"] = reply.done_reason
            if is_gen:
                prompt_chars = len(req.get("prompt", "")) + len(req.get("system", ""))
            else:
                prompt_chars = sum(len(mm.get("content", "")) + 4 for mm in req.get("messages") or [])
            prompt_tokens = max(1, prompt_chars // 4) + 64 * n_images
            eval_count = _answer_tokens(reply, text, thinking)
            now = time.perf_counter_ns()
            prompt_ns = prompt_tokens * 200_000
            # Simulated speed (<= 100 tokens/s) unless the scripted delays took longer.
            eval_ns = max(now - gen_start, eval_count * 10_000_000)
            load = max(load_ns, 1000)
            if is_gen and not req.get("raw"):
                out["context"] = list(range(1, min(prompt_tokens + eval_count, 64) + 1))
            out.update({
                "total_duration": max(now - t0, load + prompt_ns + eval_ns),
                "load_duration": load,
                "prompt_eval_count": prompt_tokens,
                "prompt_eval_duration": prompt_ns,
                "eval_count": eval_count,
                "eval_duration": eval_ns,
            })
            return _with_final_fields(out, reply)

        if not stream:
            if reply.mid_stream:
                self._runner_error(h, False, 500, reply.error or _MID_STREAM_ERROR)
                return
            if reply.fault == "garbage":
                h.send_bytes(200, GARBAGE, JSON_CT)
                return
            self._wait(reply.chunk_delay * (len(think_pieces) + len(pieces)), abort)
            data = go_json(final(text, thinking)).encode("utf-8")
            if reply.fault in ("eof", "reset"):
                _send_half(h, data, JSON_CT)
                return
            h.send_bytes(200, data, JSON_CT)
            return

        h.start_stream()
        if reply.fault == "garbage":
            _stream_garbage(h)
            return
        partial = reply.mid_stream or reply.fault in ("eof", "reset")
        to_send = [("", t) for t in think_pieces] + [(p, "") for p in (pieces[:half] if partial else pieces)]
        for i, (content, thought) in enumerate(to_send):
            if i and reply.chunk_delay:
                self._wait(reply.chunk_delay, abort)
            h.stream_line(self._chunk(is_gen, name, content, thought))
        if reply.mid_stream:
            h.stream_line({"error": reply.error or _MID_STREAM_ERROR}, last=True)
            h.end_stream()
            h.close_connection = True
            return
        if _cut_stream(h, reply):  # no done:true line
            return
        if reply.chunk_delay and to_send:
            self._wait(reply.chunk_delay, abort)
        h.stream_line(final(last), last=True)
        h.end_stream()

    # -- misbehaviours: answers no Ollama gives, for tests/test_security_transport.py --

    # Called first for every request; True means it answered (see the helpers below).
    intercept: Callable[[_Handler, Recorded], bool] | None = None
    sticky_reply: Reply | None = None  # set by fail_forever(): every generation gets it

    def fail_forever(self, **reply: Any) -> None:
        """Answer every generation with Reply(**reply): status=500, mid_stream=True, fault="eof"..."""
        self.sticky_reply = Reply(**reply)

    def misbehave(self, answer: Callable[[_Handler, Recorded], bool | None],
                  paths: Iterable[str] | None = None) -> None:
        """Let answer(handler, rec) answer requests to paths (all when None)."""
        wanted = None if paths is None else set(paths)
        self.intercept = lambda h, rec: (wanted is None or rec.path in wanted) and answer(h, rec) is not False

    def redirect(self, target: str, *, status: int = 302, paths: Iterable[str] | None = None,
                 strip: str = "") -> None:
        """Answer with a redirect to target + the request path (less the prefix strip)."""
        def answer(h: _Handler, rec: Recorded) -> None:
            path = rec.path[len(strip):] if strip and rec.path.startswith(strip) else rec.path
            h.send_text(status, "", extra=[("Location", target + path)])

        self.misbehave(answer, paths)

    def echo_headers(self, *, status: int = 400, paths: Iterable[str] | None = None) -> None:
        """Answer {"error": ...} that repeats every request header (credentials first), as a
        debugging proxy might."""
        def answer(h: _Handler, rec: Recorded) -> None:
            headers = sorted(h.headers.items(), key=lambda kv: kv[0].lower() != "authorization")
            echoed = "; ".join(f"{k}: {v}" for k, v in headers)
            h.send_json(status, {"error": f"rejected request with headers {echoed}"})

        self.misbehave(answer, paths)

    def html_pages(self) -> None:
        """Answer like `python -m http.server`: an HTML error page, 501 for POST and 404 for GET."""
        def answer(h: _Handler, rec: Recorded) -> None:
            status, text = (404, "File not found") if rec.method in ("GET", "HEAD") else (
                501, f"Unsupported method ('{rec.method}')")
            page = ('<!DOCTYPE HTML>\n<html lang="en">\n    <head>\n        <meta charset="utf-8">\n'
                    f"        <title>Error response</title>\n    </head>\n    <body>\n"
                    f"        <h1>Error response</h1>\n        <p>Error code: {status}</p>\n"
                    f"        <p>Message: {text}.</p>\n    </body>\n</html>\n")
            h.send_bytes(status, page.encode(), "text/html;charset=utf-8", extra=[("Connection", "close")])

        self.misbehave(answer)

    def fail_paths(self, paths: Iterable[str], *, status: int = 500, error: str = "",
                   body: bytes | None = None, content_type: str = TEXT_CT) -> None:
        """Answer every request to paths with status: {"error": error}, or the raw body."""
        def answer(h: _Handler, rec: Recorded) -> None:
            if body is None:
                h.send_json(status, {"error": error or _DEFAULT_ERRORS.get(status, "error")})
            else:
                h.send_bytes(status, body, content_type)

        self.misbehave(answer, paths)

    def huge_line(self, size: int, *, paths: Iterable[str] = ("/api/chat", "/api/generate")) -> None:
        """Answer with `size` bytes and no newline: a chunked stream for a generation, else one
        body with its Content-Length. Sent in 64 KiB pieces until the client stops reading."""
        piece = b"x" * 65536

        def answer(h: _Handler, rec: Recorded) -> None:
            streaming = rec.path in ("/api/chat", "/api/generate")
            if streaming:
                h.start_stream()
            else:
                h.send_response(200)
                h.send_header("Content-Type", JSON_CT)
                h.send_header("Content-Length", str(size))
                h.end_headers()
                h.headers_sent = True
            sent = 0
            while sent < size:
                data = piece[: size - sent]
                if streaming:
                    h.stream_raw(data)
                else:
                    h.wfile.write(data)
                sent += len(data)
            if streaming:
                h.end_stream()

        self.misbehave(answer, paths)

    # -- the OpenAI-compatible face (/v1/models, /v1/chat/completions): see the module docstring --

    def _openai_face(self, h: _Handler, rec: Recorded) -> bool:
        """Answer what the api mode and api_key decide; False leaves the request to Ollama's routes."""
        v1 = rec.path.startswith("/v1/")
        if self.api_key and rec.path != "/health" \
                and h.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            if v1:
                h.send_json(401, {"error": {"message": "Incorrect API key provided.",
                                            "type": "invalid_request_error", "param": None,
                                            "code": "invalid_api_key"}})
            else:
                h.send_json(401, {"error": "unauthorized"})
            return True
        dialect = _DIALECTS.get(self.api)
        if dialect is None:
            return False  # plain Ollama: /v1 answers "404 page not found" like any unknown path
        allowed = _OPENAI_ROUTES.get(rec.path)
        if self.api == "both" and allowed is None:
            return False  # Ollama's own routes (and its 404s) for everything else
        if allowed is None:  # FastAPI (vLLM): /health and /v1 only
            if rec.path == "/health" and rec.method == "GET":
                h.send_bytes(200, b"", JSON_CT)
            else:
                h.send_bytes(404, b'{"detail":"Not Found"}', "application/json")
            return True
        if rec.method not in allowed:
            if self.api == "both":
                h.send_text(405, "405 method not allowed", extra=[("Allow", ", ".join(allowed))])
            else:
                h.send_bytes(405, b'{"detail":"Method Not Allowed"}', "application/json",
                             extra=[("Allow", ", ".join(allowed))])
            return True
        try:
            if rec.path == "/v1/models":
                _send_dialect_json(h, dialect, 200, self._openai_models(dialect))
            else:
                self._openai_chat(h, rec, dialect)
        except _HTTPError as e:
            if h.headers_sent:
                raise
            _send_openai_error(h, dialect, e.status, e.message, kind=getattr(e, "kind", ""))
        return True

    def _openai_models(self, dialect: _Dialect) -> dict[str, Any]:
        with self._lock:
            models = list(self._models.values())
        data = []
        for m in models:
            entry: dict[str, Any] = {"id": m.name, "object": "model", "created": int(time.time()),
                                     "owned_by": self.owned_by}
            if dialect.max_model_len:
                entry["max_model_len"] = m.context_length
            data.append(entry)
        return {"object": "list", "data": data}

    def _openai_model(self, name: str) -> _Model | None:
        if self.api != "openai":
            return self._lookup(name)  # Ollama: tags default to latest, case does not matter
        with self._lock:
            return next((m for m in self._models.values() if m.name == name), None)

    def _openai_chat(self, h: _Handler, rec: Recorded, dialect: _Dialect) -> None:
        abort = self._abort
        t0 = time.perf_counter_ns()
        body = rec.body
        if not isinstance(body, dict):
            raise _OpenAIError(400, "The request body must be a JSON object.")
        for field in sorted(self.unsupported_fields & body.keys()):
            raise _OpenAIError(400, f"Unrecognized request argument supplied: {field}", "invalid_request_error")
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise _OpenAIError(400, "you must provide a model parameter", "invalid_request_error")
        messages = _openai_messages(body.get("messages"))
        m = self._openai_model(name)
        if m is None:
            raise _OpenAIError(404, dialect.missing_model.format(name=name))
        key = model_key(m.name)
        stream = body.get("stream")
        if stream not in (None, True, False):
            raise _OpenAIError(400, "stream must be a boolean")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise _OpenAIError(400, "stream_options must be an object")
        req: dict[str, Any] = {"model": name, "messages": messages, "stream": bool(stream),
                               "options": _openai_options(body)}
        fmt = self._openai_format(body.get("response_format"))
        if fmt is not None:
            req["format"] = fmt
        think_on = dialect.thinking(body, m)
        face = _OpenAIFace(self, dialect, name, include_usage=stream_options.get("include_usage") is True)

        with self._lock:
            if self.max_queue and self._waiting >= self.max_queue:
                self.busy_answers += 1
                raise _OpenAIError(503, dialect.default_errors[503])
            self._waiting += 1
            self._in_flight_by_model[m.name] = sent = self._in_flight_by_model.get(m.name, 0) + 1
            self.max_in_flight_by_model[m.name] = max(self.max_in_flight_by_model.get(m.name, 0), sent)
            self.in_flight_log_by_model.setdefault(m.name, []).append(sent)
            h.cleanup.push(lambda: self._sent_done(m.name))
        loaded = False
        try:
            reply = self._take_reply(key, rec.path, rec)
            if self.api == "both":  # Ollama loads models for /v1 as for /api; vLLM holds its model
                self._ensure_loaded(key, None, abort, _runner(req))
                loaded = True
        finally:
            with self._lock:
                self._waiting -= 1
        if loaded:
            h.cleanup.push(lambda: self._release(key))
        if reply.status != 200:
            reply = dataclasses.replace(reply, error=reply.error or dialect.default_errors.get(reply.status, "error"))
            face.retry_after = (reply.status, reply.retry_after)
        self._run_reply(h, req, reply, is_gen=False, name=name, key=key, stream=bool(stream), think_on=think_on,
                        t0=t0, load_ns=time.perf_counter_ns() - t0, abort=abort, face=face)

    def _openai_format(self, value: Any) -> Any:
        """response_format as the internal `format` ("json", a schema, or None for plain text)."""
        if value is None:
            return None
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return "json"
        if kind != "json_schema":
            raise _OpenAIError(400, f"response_format type {kind!r} is not supported", "invalid_request_error")
        if not self.structured_outputs:
            raise _OpenAIError(400, "response_format type json_schema is not supported", "invalid_request_error")
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _OpenAIError(400, "response_format.json_schema.schema must be a JSON schema object",
                               "invalid_request_error")
        return schema

    def forward_to(self, upstream_url: str, *, max_tokens: int = 0) -> None:
        """Be a vision front for a text-only OpenAI-compatible server on loopback: /v1/models and
        /v1/chat/completions go to upstream_url, each image_url part replaced by a text part that
        describes the image (describe_image), and the answer comes back unchanged (SSE too).
        max_tokens (0: no cap) caps every answer, so a small model on a CPU cannot spend minutes
        on the vision stage's long budget; the request is recorded as it was sent."""
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1") or not parts.port:
            raise ValueError(f"forward_to takes a loopback http://HOST:PORT URL, not {upstream_url!r}")
        host, port, prefix = parts.hostname, parts.port, parts.path.rstrip("/")

        def answer(h: _Handler, rec: Recorded) -> None:
            body = rec.raw
            if rec.path == "/v1/chat/completions" and isinstance(rec.body, dict):
                try:
                    described = _described(rec.body)
                    if max_tokens:
                        described["max_tokens"] = min(int(described.get("max_tokens") or max_tokens), max_tokens)
                    body = json.dumps(described).encode("utf-8")
                except _HTTPError as e:
                    _send_openai_error(h, _DIALECTS["openai"], e.status, e.message)
                    return
            headers = {k: v for k, v in h.headers.items() if k.lower() in ("authorization", "content-type")}
            conn = http.client.HTTPConnection(host, port, timeout=_UPSTREAM_TIMEOUT)
            try:
                conn.request(rec.method, prefix + rec.path + (f"?{rec.query}" if rec.query else ""),
                             body=body or None, headers=headers)
                resp = conn.getresponse()
                _relay(h, resp)
            except (ConnectionError, TimeoutError, http.client.HTTPException) as e:
                if h.headers_sent:
                    h.drop()
                else:
                    _send_openai_error(h, _DIALECTS["openai"], 502, f"upstream {upstream_url} failed: {e}")
            finally:
                conn.close()

        self.misbehave(answer, tuple(_OPENAI_ROUTES))


def _layout(reply: Reply, think_on: bool) -> tuple[str, str, list[str], list[str], str, int]:
    """How a reply streams, on either face (see the module docstring): its text and thinking, the
    thinking pieces, the content pieces, the last piece that rides in the final chunk (or ""), and
    how many pieces a broken stream sends."""
    text = reply.text
    thinking = reply.thinking if think_on else ""
    think_pieces = _split(thinking, reply.chunk_chars)
    pieces = _split(text, reply.chunk_chars)
    carry = reply.final_piece if reply.final_piece is not None else len(text) % 2 == 1
    last = pieces.pop() if carry and pieces else ""
    half = max(1, len(pieces) // 2) if pieces else 0
    return text, thinking, think_pieces, pieces, last, half


def _answer_tokens(reply: Reply, text: str, thinking: str) -> int:
    """The answer's token count: the scripted one, or about four characters a token."""
    return reply.eval_count if reply.eval_count is not None else max(1, math.ceil((len(text) + len(thinking)) / 4))


def _cut_stream(h: _Handler, reply: Reply) -> bool:
    """End a stream the reply's fault cuts short, without its closing chunk: "eof" ends the body
    cleanly, "reset" breaks it off. True when it did."""
    if reply.fault == "eof":
        h.end_stream()
        h.close_connection = True
        return True
    if reply.fault == "reset":
        h.drop()
        return True
    return False


def _with_final_fields(out: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """The final object with Reply.final_fields merged in (a None value deletes the key)."""
    for k, v in (reply.final_fields or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _send_half(h: _Handler, data: bytes, content_type: str) -> None:
    """A whole answer's fault "eof"/"reset": announce the full length, send half, close."""
    h.cleanup.run()
    h.send_response(200)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.headers_sent = True
    h.wfile.write(data[: len(data) // 2])
    h.drop()


def _stream_garbage(h: _Handler) -> None:
    """A stream's fault "garbage": one line that is no JSON, then the end."""
    h.cleanup.run()
    h.stream_raw(GARBAGE + b"\n")
    h.end_stream()


def b64(data: bytes) -> str:
    """Standard base64 text, as the Ollama API wants images."""
    return base64.b64encode(data).decode("ascii")


# ----------------------------------------------------------------------------------------------
# The OpenAI-compatible face: request translation, answer shapes, and the dialects of the servers
# that speak it (vLLM-like for api="openai", Ollama's own /v1 for api="both").

APIS = ("ollama", "openai", "both")
_OPENAI_ROUTES: dict[str, tuple[str, ...]] = {
    "/v1/models": ("GET",),
    "/v1/chat/completions": ("POST",),
}
_REASONING_EFFORTS = ("high", "medium", "low", "none")  # Ollama's openai.FromChatRequest
_UPSTREAM_TIMEOUT = 120.0  # forward_to: a model on a CPU may think a while before its first byte


class _OpenAIError(_HTTPError):
    """An error answered in OpenAI's {"error": {...}} shape; kind overrides the dialect's type."""

    def __init__(self, status: int, message: str, kind: str = "") -> None:
        super().__init__(status, message)
        self.kind = kind


def _vllm_thinking(body: dict[str, Any], m: _Model) -> bool:
    """vLLM and llama-server: Qwen-style templates think unless chat_template_kwargs say not."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _OpenAIError(400, "chat_template_kwargs must be an object")
    return "thinking" in m.capabilities and (kwargs or {}).get("enable_thinking") is not False


def _ollama_thinking(body: dict[str, Any], m: _Model) -> bool:
    """Ollama's /v1: reasoning_effort (or reasoning.effort) is `think`; "none" turns it off;
    chat_template_kwargs are ignored."""
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else body.get("reasoning_effort")
    if effort in (None, ""):
        return "thinking" in m.capabilities
    if effort not in _REASONING_EFFORTS:
        raise _OpenAIError(400, f"invalid reasoning value: '{effort}' "
                                '(must be "high", "medium", "low", or "none")')
    if effort != "none" and "thinking" not in m.capabilities:
        raise _OpenAIError(400, f"{_go_quote(body['model'])} does not support thinking")
    return effort != "none" and "thinking" in m.capabilities


def _python_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class _Dialect:
    """How one kind of server speaks the OpenAI API (a row of _DIALECTS)."""

    owned_by: str  # /v1/models owned_by unless FakeOllama(owned_by=...) says otherwise
    reasoning_field: str  # where thinking text goes in a delta or a message
    role_in_every_delta: bool  # Ollama repeats role and content in every delta; vLLM sends the role once, first
    fingerprint: str  # system_fingerprint in answers ("": none)
    max_model_len: bool  # /v1/models entries carry max_model_len (vLLM)
    error_types: dict[int, str]
    default_type: str
    status_codes: bool  # error.code is the HTTP status (vLLM) or null (Ollama)
    missing_model: str  # message for an unknown model ({name})
    default_errors: dict[int, str]  # message of a scripted Reply(status=...) without error text
    thinking: Callable[[dict[str, Any], _Model], bool]  # does this request think?
    json_ct: str
    encode: Callable[[Any], str]


_DIALECTS: dict[str, _Dialect] = {
    "openai": _Dialect(
        owned_by="vllm", reasoning_field="reasoning_content", role_in_every_delta=False, fingerprint="",
        max_model_len=True,
        error_types={400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                     429: "RateLimitError", 503: "ServiceUnavailableError"},
        default_type="InternalServerError", status_codes=True,
        missing_model="The model `{name}` does not exist.",
        default_errors={429: "Rate limit exceeded. Please retry later.", 500: "Internal server error",
                        502: "Bad Gateway", 503: "The server is overloaded. Please retry later."},
        thinking=_vllm_thinking, json_ct="application/json", encode=_python_json),
    "both": _Dialect(
        owned_by="library", reasoning_field="reasoning", role_in_every_delta=True, fingerprint="fp_ollama",
        max_model_len=False,
        error_types={400: "invalid_request_error", 404: "not_found_error"},
        default_type="api_error", status_codes=False,
        missing_model="model '{name}' not found",
        default_errors=_DEFAULT_ERRORS,
        thinking=_ollama_thinking, json_ct=JSON_CT, encode=go_json),
}


def _send_dialect_json(h: _Handler, dialect: _Dialect, status: int, obj: Any,
                       extra: Iterable[tuple[str, str]] = ()) -> None:
    h.send_bytes(status, dialect.encode(obj).encode("utf-8"), dialect.json_ct, extra)


def _openai_error_body(dialect: _Dialect, status: int, message: str, kind: str = "") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind or dialect.error_types.get(status, dialect.default_type),
                      "param": None, "code": status if dialect.status_codes else None}}


def _send_openai_error(h: _Handler, dialect: _Dialect, status: int, message: str, *, kind: str = "",
                       extra: Iterable[tuple[str, str]] = ()) -> None:
    _send_dialect_json(h, dialect, status, _openai_error_body(dialect, status, message, kind), extra)


def _decode_data_url(url: Any, where: str) -> bytes:
    """The bytes of a data:image/...;base64, URL; anything else is a 400 naming the problem."""
    if not isinstance(url, str):
        raise _OpenAIError(400, f"{where}: image_url.url must be a string")
    head, comma, data = url.partition(",")
    if not (comma and head.startswith("data:image/") and head.endswith(";base64")):
        raise _OpenAIError(400, f"{where}: image_url must be a data:image/...;base64, URL, not {url[:40]!r}")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as e:
        raise _OpenAIError(400, f"{where}: the image_url's base64 does not decode: {e}") from None


def _image_url_of(part: dict[str, Any]) -> Any:
    value = part.get("image_url")
    return value.get("url") if isinstance(value, dict) else value  # Ollama takes a bare string too


def _openai_messages(value: Any) -> list[dict[str, Any]]:
    """OpenAI messages as the fake's internal ones: role, the text parts joined, decoded images."""
    if value is None:
        raise _OpenAIError(400, "'messages' is a required property", "invalid_request_error")
    if not isinstance(value, list):
        raise _OpenAIError(400, "'messages' must be a list", "invalid_request_error")
    if not value:
        raise _OpenAIError(400, "[] is too short - 'messages'", "invalid_request_error")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise _OpenAIError(400, f"messages[{i}] must be an object with a string role")
        content = msg.get("content")
        texts: list[str] = []
        images: list[bytes] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    images.append(_decode_data_url(_image_url_of(part), where))
                else:
                    raise _OpenAIError(400, f"{where}: expected a text or image_url part")
        elif content is not None:
            raise _OpenAIError(400, f"messages[{i}].content must be a string or a list of parts")
        out.append({"role": msg["role"], "content": "\n".join(texts), "images": images})
    return out


def _data_url_images(body: Any) -> list[bytes]:
    """The decodable images of a recorded /v1 request body, in order (for sent_images)."""
    out = []
    messages = body.get("messages") if isinstance(body, dict) else None
    for msg in messages if isinstance(messages, list) else []:
        content = msg.get("content") if isinstance(msg, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                try:
                    out.append(_decode_data_url(_image_url_of(part), ""))
                except _HTTPError:
                    continue
    return out


def _number(body: dict[str, Any], field: str, *, integer: bool = False, minimum: float | None = None) -> Any:
    value = body.get(field)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _OpenAIError(400, f"{field} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if minimum is not None and value < minimum:
        raise _OpenAIError(400, f"{field} must be at least {minimum}, got {value}.")
    return value


def _openai_options(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields of a /v1 request as Ollama options (checked for type)."""
    options: dict[str, Any] = {}
    for field, option, integer, minimum in (("max_tokens", "num_predict", True, 1),
                                            ("max_completion_tokens", "num_predict", True, 1),
                                            ("temperature", "temperature", False, 0),
                                            ("top_p", "top_p", False, 0), ("seed", "seed", True, None)):
        value = _number(body, field, integer=integer, minimum=minimum)
        if value is not None:
            options[option] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        options["stop"] = stop
    elif stop is not None:
        raise _OpenAIError(400, "stop must be a string or a list of strings")
    return options


class _OpenAIFace:
    """Answers one /v1/chat/completions request in OpenAI's shapes (errors, JSON, SSE chunks)."""

    def __init__(self, fake: FakeOllama, dialect: _Dialect, model: str, *, include_usage: bool) -> None:
        self.fake = fake
        self.dialect = dialect
        self.model = model  # as the request named it; both vLLM and Ollama echo that
        self.include_usage = include_usage
        self.id = "chatcmpl-" + hashlib.sha256(f"{time.time_ns()}:{id(self)}".encode()).hexdigest()[:24]
        self.created = int(time.time())
        self.retry_after: tuple[int, float | None] = (0, None)  # (status, seconds) of the scripted reply

    def runner_error(self, h: _Handler, stream: bool, status: int, message: str) -> None:
        scripted, seconds = self.retry_after
        extra = [("Retry-After", f"{seconds:g}")] if seconds is not None and status == scripted else []
        _send_openai_error(h, self.dialect, status, message, extra=extra)

    def _head(self, kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        if self.dialect.fingerprint:
            out["system_fingerprint"] = self.dialect.fingerprint
        return out

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        if self.dialect.role_in_every_delta:
            delta = {"role": "assistant", "content": "", **delta}
        out = self._head("chat.completion.chunk")
        out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        return out

    def _event(self, h: _Handler, obj: Any, *, last: bool = False) -> None:
        if last:
            h.cleanup.run()
        data = obj if isinstance(obj, bytes) else self.dialect.encode(obj).encode("utf-8")
        h.stream_raw(b"data: " + data + b"\n\n")

    def emit(self, h: _Handler, req: dict[str, Any], reply: Reply, *, is_gen: bool, name: str, stream: bool,
             think_on: bool, t0: int, load_ns: int, gen_start: int, n_images: int,
             abort: threading.Event) -> None:
        text, thinking, think_pieces, pieces, last, half = _layout(reply, think_on)
        prompt_tokens = max(1, sum(len(m["content"]) + 4 for m in req["messages"]) // 4) + 64 * n_images
        completion_tokens = _answer_tokens(reply, text, thinking)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        finish = reply.done_reason or None

        if not stream:
            if reply.mid_stream:
                self.runner_error(h, False, 500, reply.error or _MID_STREAM_ERROR)
                return
            if reply.fault == "garbage":
                h.send_bytes(200, GARBAGE, self.dialect.json_ct)
                return
            self.fake._wait(reply.chunk_delay * (len(think_pieces) + len(pieces)), abort)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message[self.dialect.reasoning_field] = thinking
            out = self._head("chat.completion")
            out["choices"] = [{"index": 0, "message": message, "finish_reason": finish}]
            out["usage"] = usage
            data = self.dialect.encode(_with_final_fields(out, reply)).encode("utf-8")
            if reply.fault in ("eof", "reset"):
                _send_half(h, data, self.dialect.json_ct)
                return
            h.send_bytes(200, data, self.dialect.json_ct)
            return

        h.start_stream("text/event-stream")
        if reply.fault == "garbage":
            _stream_garbage(h)
            return
        partial = reply.mid_stream or reply.fault in ("eof", "reset")
        deltas = [{self.dialect.reasoning_field: t} for t in think_pieces]
        deltas += [{"content": p} for p in (pieces[:half] if partial else pieces)]
        if not self.dialect.role_in_every_delta:
            deltas.insert(0, {"role": "assistant", "content": ""})
        for i, delta in enumerate(deltas):
            if i and reply.chunk_delay:
                self.fake._wait(reply.chunk_delay, abort)
            self._event(h, self._chunk(delta))
        if reply.mid_stream:
            self._event(h, {"error": {"message": reply.error or _MID_STREAM_ERROR, "type": "server_error",
                                      "code": 500}}, last=True)
            h.end_stream()
            h.close_connection = True
            return
        if _cut_stream(h, reply):  # neither finish_reason nor [DONE]
            return
        if reply.chunk_delay and deltas:
            self.fake._wait(reply.chunk_delay, abort)
        self._event(h, _with_final_fields(self._chunk({"content": last} if last else {}, finish), reply))
        if self.include_usage:
            tail = self._head("chat.completion.chunk")
            tail.update({"choices": [], "usage": usage})
            self._event(h, tail)
        self._event(h, b"[DONE]", last=True)
        h.end_stream()


def _described(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of a /v1 chat body with each image_url part replaced by a text part describing it,
    and a content of text parts alone joined into one string."""
    out = dict(body)
    messages = []
    for i, msg in enumerate(body.get("messages") or []):
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    image = _decode_data_url(_image_url_of(part), f"messages[{i}].content[{j}]")
                    part = {"type": "text", "text": describe_image(image)}
                parts.append(part)
            # All text now: one string, since a text-only server may take no list of parts
            # (llama-cpp-python's chat formats fail on one).
            texts = [part.get("text") for part in parts if isinstance(part, dict) and part.get("type") == "text"]
            msg = {**msg, "content": "\n".join(map(str, texts)) if len(texts) == len(parts) else parts}
        messages.append(msg)
    out["messages"] = messages
    return out


def _relay(h: _Handler, resp: http.client.HTTPResponse) -> None:
    """Send an upstream answer on unchanged: status, type, and the body (chunk by chunk if streamed)."""
    ctype = resp.getheader("Content-Type") or JSON_CT
    if resp.getheader("Content-Length") is not None:
        h.send_bytes(resp.status, resp.read(), ctype)
        return
    h.send_response(resp.status)
    h.send_header("Content-Type", ctype)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    h.headers_sent = True
    while True:
        data = resp.read1(65536)
        if not data:
            break
        h.stream_raw(data)
    h.end_stream()


# -- what an image is, said in words (for the text-only upstream behind forward_to) --

_COLOUR_NAMES: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0), "grey": (128, 128, 128), "white": (255, 255, 255), "red": (230, 20, 20),
    "orange": (245, 140, 20), "yellow": (240, 230, 30), "green": (20, 170, 40), "cyan": (20, 220, 230),
    "blue": (20, 40, 230), "purple": (130, 30, 170), "pink": (250, 150, 200), "brown": (130, 80, 30),
}
_MAX_COLOUR_PIXELS = 1 << 20  # larger PNGs are described by format and size only


def describe_image(data: bytes) -> str:
    """What forward_to tells a text-only model instead of an image: "[image: 64x64 PNG, mostly red]"
    (the colour for 8-bit PNGs only; "mostly" when one colour covers more than half the pixels)."""
    fmt = _image_format(data)
    if not fmt:
        return f"[{len(data)} bytes that are no image format the server knows]"
    size = _image_size(data, fmt)
    words = (f"{size[0]}x{size[1]} " if size else "") + fmt.upper()
    counts = _png_colours(data) if fmt == "png" else {}
    if counts:
        ranked = sorted(counts, key=lambda c: -counts[c])
        if counts[ranked[0]] * 2 > sum(counts.values()):
            words += f", mostly {ranked[0]}"
        else:
            words += ", mixed colours: " + " and ".join(ranked[:2]) + " most"
    return f"[image: {words}]"


def _image_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """Width and height from the header of a PNG, GIF, BMP, WebP or JPEG (None when unreadable)."""
    try:
        if fmt == "png":
            return struct.unpack(">II", data[16:24])
        if fmt == "gif":
            return struct.unpack("<HH", data[6:10])
        if fmt == "bmp":
            width, height = struct.unpack("<ii", data[18:26])
            return width, abs(height)
        if fmt == "webp":
            kind = data[12:16]
            if kind == b"VP8X":
                return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
            if kind == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if kind == b"VP8 ":
                return (int.from_bytes(data[26:28], "little") & 0x3FFF,
                        int.from_bytes(data[28:30], "little") & 0x3FFF)
            return None
        pos = 2  # JPEG: walk the segments to the first start-of-frame
        while pos + 9 <= len(data):
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:
                pos += 1
                continue
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
                return width, height
            pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    except struct.error:
        return None
    return None


def _png_colours(data: bytes) -> dict[str, int]:
    """Pixel counts per nearest colour name of an 8-bit, non-interlaced PNG ({} for others)."""
    try:
        pos, idat, palette, header = 8, bytearray(), b"", None
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos:pos + 8])
            chunk = data[pos + 8:pos + 8 + length]
            pos += 12 + length
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", chunk)
            elif kind == b"PLTE":
                palette = chunk
            elif kind == b"IDAT":
                idat += chunk
        if header is None:
            return {}
        width, height, depth, colour_type, _, _, interlace = header
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
        if depth != 8 or interlace or width * height > _MAX_COLOUR_PIXELS:
            return {}
        raw = zlib.decompress(bytes(idat))
    except (struct.error, KeyError, zlib.error):
        return {}
    stride = width * channels
    if len(raw) < height * (stride + 1):
        return {}
    counts: dict[str, int] = {}
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        line = _unfilter(raw[start], bytearray(raw[start + 1:start + 1 + stride]), prev, channels)
        for x in range(0, stride, channels):
            if colour_type == 3:
                rgb = tuple(palette[line[x] * 3:line[x] * 3 + 3]) or (0, 0, 0)
            elif colour_type in (0, 4):
                rgb = (line[x],) * 3
            else:
                rgb = tuple(line[x:x + 3])
            name = min(_COLOUR_NAMES, key=lambda n: sum((a - b) ** 2 for a, b in zip(_COLOUR_NAMES[n], rgb)))
            counts[name] = counts.get(name, 0) + 1
        prev = line
    return counts


def _unfilter(kind: int, line: bytearray, prev: bytearray, bpp: int) -> bytearray:
    """Undo one PNG scanline filter (none, sub, up, average, Paeth) in place."""
    for i in range(len(line)):
        a = line[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        if kind == 1:
            line[i] = (line[i] + a) & 255
        elif kind == 2:
            line[i] = (line[i] + b) & 255
        elif kind == 3:
            line[i] = (line[i] + (a + b) // 2) & 255
        elif kind == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return line


def request_text(rec: Recorded) -> str:
    """All the text a recorded generation request carries, on either face (prompt and system for
    /api/generate; message contents and text parts for /api/chat and /v1/chat/completions): what a
    default_text callable reads to answer the same whichever API the client speaks."""
    body = rec.body if isinstance(rec.body, dict) else {}
    texts = [body[k] for k in ("system", "prompt") if isinstance(body.get(k), str)]
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(texts)
