#!/usr/bin/env python3
"""Caption image datasets and write image prompts with a local Ollama server.

Captions come from two models: a vision model sees the image, a text model
writes the caption in the style a trainer needs. The code, never the model,
cleans the answer and places the trigger word and prefix.

Usage:
  ollama-generate caption ./dataset/ --style training --trigger ohwx
  ollama-generate caption photo.png --style tags
  ollama-generate prompt "a lighthouse in a storm" --encoder clip
  ollama-generate enhance "a cat on a sofa" --intensity mild
  ollama-generate describe "Neon Noir" --type style --tags "neon, rain"
  ollama-generate lore "the last lighthouse keeper" --length short
  ollama-generate doctor

Environment:
  OLLAMA_HOST          Ollama server URL (default http://localhost:11434)
  OLLAMA_MODEL         text model (default qwen3-30b-a3b:latest)
  OLLAMA_VISION_MODEL  vision model (default qwen3-vl:32b)
  OLLAMA_API_KEY       bearer token for a remote server (default unset)
  OLLAMA_GENERATE_PROMPTS_DIR  folder of template overrides (default unset)
  OLLAMA_GENERATE_DEBUG  set to 1 to show Python tracebacks (default unset)

Exit status:
  0    success
  1    Ollama or runtime failure, or an image in a folder run failed
  2    usage error: bad flag value, path not found, folder with no images
  3    the Ollama server cannot be reached
  4    a model is not installed, or the vision model cannot see images
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import string
import sys
import time
from collections.abc import Iterator, Mapping, Sequence

# Agents call this tool many times, so start-up matters: modules that only some
# commands need (urllib, threading, hashlib, base64, tempfile, html) are imported
# where they are used.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

__version__ = "0.1.0"

# -- Constants ----------------------------------------------------------------

PROG = "ollama-generate"
DEFAULT_HOST = "http://localhost:11434"
DEFAULT_PORT = 11434
DEFAULT_MODEL = "qwen3-30b-a3b:latest"
DEFAULT_VISION_MODEL = "qwen3-vl:32b"
# Streaming answers arrive piece by piece, so this bounds the wait for the first
# piece (a cold model load, often 30-60 s) and for each gap between pieces.
DEFAULT_TIMEOUT = 300.0
# Short calls (/api/show, /api/version) need no model load.
METADATA_TIMEOUT = 30.0
RETRIES = 3
RESTART_RETRIES = 6
# An answer whose load_duration is at least this long had to wait for a model load
# (warm requests report a few milliseconds).
LOAD_SEEN_SECONDS = 0.5
BACKOFF_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 30.0
# Retried: a timeout, too many requests, and server errors except those that say
# the server never will (501 Not Implemented, 505 HTTP Version Not Supported).
RETRIED_STATUSES = frozenset({408, 429} | set(range(500, 600)) - {501, 505})
# A folder run leaves out a server that failed this many images in a row, each
# after its retries; with no server left it stops (the circuit breaker).
HOST_FAILURE_LIMIT = 5
# Bounds on what is read from a server: one NDJSON line or one metadata answer
# (a final /api/generate line carries the token ids of the whole context), and
# an error body, of which a short excerpt is shown.
LINE_LIMIT = 16 * 1024 * 1024
ERROR_BODY_LIMIT = 64 * 1024
EXCERPT_CHARS = 200
# Ranges of the numeric flags (each flag's --help shows its range).
MAX_TIMEOUT = 86400  # a day
MAX_JOBS = 64  # requests at once per server; each is a thread here
MAX_TEMPERATURE = 2
MAX_SEED = 2**32 - 1  # llama.cpp keeps the seed as 32 bits
MAX_TOKENS = 1024 * 1024  # --num-ctx and --max-tokens

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_EXTENSION = ".txt"
# Where a folder run keeps its cache of vision descriptions, inside the dataset.
CACHE_FOLDER = ".ollama-generate"
# Images per chunk: the vision model describes a whole chunk, then the text model
# writes its captions, so a GPU that holds one model loads each once per chunk.
DEFAULT_CHUNK = 1000
# Keep both models loaded for the whole run (-1 = forever); afterwards hand them
# back to Ollama's own default, five minutes.
DEFAULT_KEEP_ALIVE = -1
RELEASE_KEEP_ALIVE = "5m"
RELEASE_TIMEOUT = 5.0

STYLES = ("training", "tags", "detailed")
ENCODERS = ("clip", "t5")
INTENSITIES = ("mild", "moderate", "extreme")
LENGTHS = ("short", "medium", "long")
LORE_WORDS = {"short": 150, "medium": 400, "long": 900}

# One context size for every request: Ollama reloads a model whenever num_ctx
# changes, and 8192 holds an image (up to ~1500 tokens) plus a long answer.
NUM_CTX = 8192

# (temperature, num_predict) per kind of request. Accurate work runs cool,
# creative work warm; every answer is capped so a looping model stops.
SAMPLING = {
    "vision": (0.2, 1024),
    "caption": (0.3, 512),
    "caption-creative": (0.8, 640),
    "prompt": (0.7, 400),
    "enhance-mild": (0.4, 500),
    "enhance-moderate": (0.7, 600),
    "enhance-extreme": (0.9, 700),
    "describe": (0.6, 1500),
    "lore-short": (0.9, 600),
    "lore-medium": (0.9, 1200),
    "lore-long": (0.9, 2400),
}

# Each template and the placeholders it must use, no more and no fewer.
TEMPLATE_FIELDS: dict[str, tuple[str, ...]] = {
    "vision_system": (),
    "vision_user": (),
    "caption_training": ("description",),
    "caption_training_creative": ("description",),
    "caption_tags": ("description",),
    "caption_tags_creative": ("description",),
    "caption_detailed": ("description",),
    "caption_detailed_creative": ("description",),
    "prompt_t5": ("concept",),
    "prompt_clip": ("concept",),
    "enhance_mild": ("prompt",),
    "enhance_moderate": ("prompt",),
    "enhance_extreme": ("prompt",),
    "describe": ("model_name", "lora_type", "tags", "dataset"),
    "lore": ("scenario", "words"),
    "hint": ("hint",),
    "reask": ("request", "answer", "problem"),
    "reask_vision": ("problem",),
}

# -- Errors -------------------------------------------------------------------


# Secrets never shown: OllamaClient adds the API key it sends. Server text (an
# error page can echo our request headers) reaches the user only through
# OllamaError and warn(), and documents only through json_document(), which all
# redact.
SECRETS: set[str] = set()
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """Text with known secrets, bearer tokens, credential headers and URL passwords hidden.

    >>> redact("echo: Authorization: Bearer sk-123, x-api-key: abc; https://me:pw@host/")
    'echo: Authorization: Bearer [redacted], x-api-key: [redacted]; https://[redacted]@host/'
    """
    for secret in sorted(SECRETS, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    value = r"[^\s\"',;\\)\]}<>]+"
    text = re.sub(r"(?i)\b(bearer)(\s+)(?!\[redacted\])" + value, rf"\1\2{REDACTED}", text)
    text = re.sub(r"(?i)\b((?:proxy-)?authorization|x-api-key|api[-_]key)([\"']?\s*[:=]\s*[\"']?)"
                  r"(?!bearer\s|\[redacted\])(?:basic\s+)?" + value, rf"\1\2{REDACTED}", text)
    return re.sub(r"(://)[^/\s@:]+:[^/\s@]*@", rf"\1{REDACTED}@", text)


def json_document(data: object, *, ensure_ascii: bool = False) -> str:
    """A --json or --report document, with any known secret in it redacted."""
    text = json.dumps(data, ensure_ascii=ensure_ascii, indent=2)
    for secret in sorted(SECRETS, key=len, reverse=True):
        text = text.replace(json.dumps(secret)[1:-1], REDACTED)
    return text


class OllamaError(Exception):
    """A failure the user can act on; main() is the only place that prints it.

    Its message and hint are redacted when it is made, so no secret reaches a
    summary, a --report or a --json document through it.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(redact(message))
        self.hint = redact(hint)


class UsageError(OllamaError):
    """A bad flag value or path, found after argparse accepted the command line."""

    exit_code = 2


class ServerUnreachable(OllamaError):
    """Nothing answers at the configured host."""

    exit_code = 3


class ModelUnavailable(OllamaError):
    """A model is not installed, or cannot do what we need (see images)."""

    exit_code = 4


class TransientError(OllamaError):
    """A failure worth retrying: 5xx, busy, timeout, dropped connection, garbage."""


class ServerTimeout(TransientError):
    """The server stopped sending anything for longer than --timeout."""


class TemplateError(OllamaError):
    """A prompt template is missing or has the wrong placeholders."""


class ImageError(OllamaError):
    """One file in a dataset cannot be captioned; a folder run goes on past it."""


class RefusalError(ImageError):
    """The model refused or hedged instead of answering; it is never written as a caption."""


class BatchFailed(OllamaError):
    """A folder run finished, but some images failed (they are listed above)."""


class ServerFailing(OllamaError):
    """Every server left answers, but with errors: the circuit breaker stopped the run."""


def warn(message: str) -> None:
    """A problem worth telling the user that does not stop the command (stderr)."""
    print(f"{PROG}: {paint('warning', YELLOW)}: {redact(message)}", file=sys.stderr, flush=True)


RED, YELLOW, GREEN = "31", "33", "32"


def paint(text: str, colour: str, stream=None) -> str:
    """Colour text for a terminal; plain when the stream is not one, or NO_COLOR is set."""
    stream = stream or sys.stderr
    if os.environ.get("NO_COLOR") or not stream.isatty():
        return text
    return f"\x1b[{colour}m{text}\x1b[0m"


# Failures that would fail every image alike: a folder run stops on them.
FATAL_ERRORS = (ServerUnreachable, ModelUnavailable, TemplateError, ServerFailing)


# -- Configuration ------------------------------------------------------------


class Record:
    """A data holder: fields from the class annotations, given as arguments or left at the
    class defaults (a list or dict default is copied). A few lines instead of dataclasses,
    whose import every one of an agent's many calls would pay for.
    """

    _hidden: tuple[str, ...] = ()  # fields kept out of repr()

    def __init__(self, *args: object, **kwargs: object) -> None:
        fields = self._fields()
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__} takes at most {len(fields)} arguments")
        values = dict(zip(fields, args))
        for name, value in kwargs.items():
            if name not in fields or name in values:
                raise TypeError(f"{type(self).__name__} got an unexpected or repeated field {name!r}")
            values[name] = value
        for name in fields:
            if name not in values:
                if not hasattr(type(self), name):
                    raise TypeError(f"{type(self).__name__} needs {name!r}")
                default = getattr(type(self), name)
                values[name] = type(default)(default) if isinstance(default, (list, dict)) else default
            object.__setattr__(self, name, values[name])

    @classmethod
    def _fields(cls) -> tuple[str, ...]:
        if "_field_names" not in cls.__dict__:
            names: dict[str, None] = {}
            for klass in reversed(cls.__mro__):
                names.update(dict.fromkeys(name for name in getattr(klass, "__annotations__", {})
                                           if not name.startswith("_")))
            cls._field_names = tuple(names)
        return cls._field_names

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields()
                          if name not in self._hidden)
        return f"{type(self).__name__}({shown})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, name) == getattr(other, name) for name in self._fields())

    __hash__ = None  # mutable records are not hashable


class Frozen(Record):
    """A Record whose fields cannot change after it is made."""

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen; {name} cannot change")

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in self._fields()))



def parse_host(value: str | None) -> str:
    """Turn an OLLAMA_HOST value into a base URL, as the official Python client does.

    >>> parse_host(None)
    'http://127.0.0.1:11434'
    >>> parse_host("example.com:56789/path/")
    'http://example.com:56789/path'
    >>> parse_host("https://[0001:002:003:0004::1]")
    'https://[0001:002:003:0004::1]:443'
    """
    import urllib.parse

    value = value or ""
    port = DEFAULT_PORT
    scheme, _, hostport = value.partition("://")
    if not hostport:
        scheme, hostport = "http", value
    elif scheme == "http":
        port = 80
    elif scheme == "https":
        port = 443
    split = urllib.parse.urlsplit(f"{scheme}://{hostport}")
    host = split.hostname or "127.0.0.1"
    port = split.port or port
    if ":" in host:  # only an IPv6 address has a colon once the port is split off
        host = f"[{host}]"
    path = split.path.strip("/")
    return f"{scheme}://{host}:{port}/{path}" if path else f"{scheme}://{host}:{port}"


def resolve_hosts(flags: Sequence[str] | None, env: Mapping[str, str]) -> tuple[str, ...]:
    """The server URLs: every --host, else OLLAMA_HOST split on commas, else the default."""
    if flags:
        source, values = "--host", list(flags)
    else:
        source, values = "OLLAMA_HOST", env.get("OLLAMA_HOST", DEFAULT_HOST).split(",")
        if len(values) > 1:  # "a, b" and a trailing comma are fine in a list
            values = [value.strip() for value in values if value.strip()]
    urls = []
    for value in values:
        try:
            url = parse_host(value)
            if any(char.isspace() for char in url):
                raise ValueError(url)
        except ValueError:
            raise UsageError(
                f"{source} is not a valid server address: {value!r}",
                hint="use a form like http://localhost:11434, gpu-box:11434 or [::1]:11434",
            ) from None
        urls.append(url)
    return tuple(dict.fromkeys(urls))


def parse_keep_alive(value: str) -> int | float | str:
    """A --keep-alive value as Ollama takes it: seconds as a number, or a duration string.

    >>> parse_keep_alive("-1"), parse_keep_alive("300"), parse_keep_alive("1h30m")
    (-1, 300, '1h30m')
    """
    value = value.strip()
    if re.fullmatch(r"-?\d+", value):
        return int(value)  # a unit-less string such as "-1" is refused by the server
    if re.fullmatch(r"-?\d+\.\d+", value):
        return float(value)
    if re.fullmatch(r"-?(?:\d+(?:\.\d+)?(?:ns|us|\u00b5s|ms|s|m|h))+", value):
        return value
    raise argparse.ArgumentTypeError(
        f"expected seconds (300, -1 for forever) or a duration like 30m or 1h30m, got {value!r}")


def api_key_from(env: Mapping[str, str]) -> str:
    """OLLAMA_API_KEY without surrounding whitespace (a key file's line end).

    A key that could not be sent as a header is refused in a message that never shows it.
    """
    key = env.get("OLLAMA_API_KEY", "").strip()
    if any(not " " <= char <= "~" for char in key):
        raise UsageError(
            "OLLAMA_API_KEY contains control or non-ASCII characters, so it cannot be sent "
            "(the key is not shown)",
            hint="set it to the key alone, on one line; a key file saved with Windows line "
                 "endings or pasted from a document often adds such characters",
        )
    return key


class Config(Frozen):
    """Settings for one run, resolved once: flag, then environment, then default."""

    _hidden = ("api_key",)

    hosts: tuple[str, ...] = (DEFAULT_HOST,)
    model: str = DEFAULT_MODEL
    vision_model: str = DEFAULT_VISION_MODEL
    timeout: float = DEFAULT_TIMEOUT
    retries: int = RETRIES
    temperature: float | None = None  # None: each action's own default (SAMPLING)
    max_tokens: int | None = None
    num_ctx: int = NUM_CTX
    seed: int | None = None
    api_key: str = ""  # never shown: see _hidden
    verbose: bool = False
    prompts_dir: str | None = None

    @property
    def host(self) -> str:
        """The server for single requests: the first one named."""
        return self.hosts[0]

    @classmethod
    def resolve(cls, args: argparse.Namespace, env: Mapping[str, str]) -> Config:
        """Build the run's settings from parsed flags and the environment."""
        return cls(
            hosts=resolve_hosts(args.host, env),
            model=args.model or env.get("OLLAMA_MODEL") or DEFAULT_MODEL,
            vision_model=(
                getattr(args, "vision_model", None)
                or env.get("OLLAMA_VISION_MODEL")
                or DEFAULT_VISION_MODEL
            ),
            timeout=args.timeout,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            num_ctx=args.num_ctx or NUM_CTX,
            seed=args.seed,
            api_key=api_key_from(env),
            verbose=args.verbose,
            prompts_dir=args.prompts_dir or env.get("OLLAMA_GENERATE_PROMPTS_DIR") or None,
        )


# -- Ollama HTTP client -------------------------------------------------------


class Answer(Record):
    """One model answer with the metrics Ollama reports (missing ones are 0)."""

    text: str = ""
    thinking: str = ""
    done_reason: str = ""
    prompt_eval_count: int = 0
    eval_count: int = 0
    total_duration: int = 0
    load_duration: int = 0
    eval_duration: int = 0


_METRICS = ("prompt_eval_count", "eval_count", "total_duration", "load_duration", "eval_duration")


def model_thinks_by_prompt(model: str) -> bool:
    """True for the qwen3 family, whose templates honour a /no_think switch."""
    return model.lower().rsplit("/", 1)[-1].startswith("qwen3")


class OllamaClient:
    """One Ollama server. Every request goes through _open(); retries live in _retrying()."""

    def __init__(self, host: str, *, timeout: float = DEFAULT_TIMEOUT, retries: int = RETRIES,
                 api_key: str = "", verbose: bool = False) -> None:
        self.host = host
        self.timeout = timeout
        self.retries = retries
        self._api_key = api_key  # sent as a bearer token, never shown
        if api_key:
            SECRETS.add(api_key)
        self.verbose = verbose
        self.record: list[tuple[str, Answer]] | None = None  # (model, answer) of each call, if a list
        # A refused connection is retried only once the server has answered:
        # then it is a restart worth waiting for, not a server that is not there.
        self.answered = False
        # Models on Ollama v0.12.4 that reject think:false (fixed in v0.12.5).
        self._no_think_field: set[str] = set()
        # What this server did for us, for summaries; worker threads share the client.
        self.calls = 0
        self.loads_seen = 0
        self.load_seconds = 0.0
        import threading

        self._load_ends: dict[str, float] = {}  # model -> when the last load we counted ended
        self._version: tuple[int, ...] | None = None
        self._lock = threading.Lock()

    # Public endpoints, named after Ollama's.

    def show(self, model: str) -> dict:
        """Details of one installed model; raises ModelUnavailable if it is missing."""
        return self._retrying(lambda: self._call("POST", "/api/show", {"model": model}))

    def chat(self, model: str, messages: list[dict], *, options: dict,
             keep_alive: int | float | str | None = None) -> Answer:
        """One /api/chat exchange, streamed and gathered into an Answer."""
        body = {"model": model, "messages": messages, "stream": True,
                "think": False, "options": options}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        return self._retrying(lambda: self._generation("/api/chat", body))

    def generate(self, model: str, prompt: str, *, options: dict,
                 keep_alive: int | float | str | None = None, fmt: dict | None = None,
                 printer=None) -> Answer:
        """One /api/generate call, streamed and gathered into an Answer.

        printer.feed(text) sees each piece of the answer as it arrives. Once the printer
        has shown text, a failure is not retried: what was shown cannot be taken back;
        before that, printer.restart() begins each new attempt.
        """
        body = {"model": model, "prompt": prompt, "stream": True,
                "think": False, "options": options}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        if fmt is not None:
            body["format"] = fmt
        if printer is None:
            return self._retrying(lambda: self._generation("/api/generate", body))

        def attempt() -> Answer:
            printer.restart()
            return self._generation("/api/generate", body, printer.feed)

        return self._retrying(attempt, give_up=lambda: printer.shown)

    def version(self) -> tuple[int, ...]:
        """The server's version as numbers, asked once; () when the server does not say."""
        if self._version is None:
            try:
                text = str(self._call("GET", "/api/version").get("version", ""))
            except (OllamaError, AttributeError):
                text = ""
            self._version = tuple(int(part) for part in re.findall(r"\d+", text)[:3])
        return self._version

    def supports_structured_output(self) -> bool:
        """Whether "format" may hold a JSON schema (Ollama v0.5.0 and later; dev builds say 0.0.0)."""
        version = self.version()
        return bool(version) and (version >= STRUCTURED_OUTPUT_VERSION or version == (0, 0, 0))

    def tags(self) -> list[dict]:
        """The installed models (/api/tags)."""
        return list(self._retrying(lambda: self._call("GET", "/api/tags")).get("models") or [])

    def loaded_models(self) -> list[str]:
        """Names of the models loaded in memory now (/api/ps)."""
        models = self._call("GET", "/api/ps").get("models") or []
        return [str(entry.get("name") or entry.get("model")) for entry in models]

    def set_keep_alive(self, model: str, keep_alive: int | float | str) -> None:
        """Change how long a loaded model stays in memory, without generating."""
        self._call("POST", "/api/generate", {"model": model, "keep_alive": keep_alive,
                                             "stream": False})

    # The choke point.

    def _retrying(self, attempt, *, give_up=lambda: False):
        """Run attempt(), retrying transient failures with capped exponential backoff."""
        tries = 0
        while True:
            try:
                return attempt()
            except (TransientError, ServerUnreachable) as exc:
                if give_up():
                    raise
                if isinstance(exc, ServerUnreachable):
                    # A server that answered before is restarting or reloading: give it
                    # about a minute (1+2+4+8+16+30 s) before giving up on it.
                    more = self.answered and tries < RESTART_RETRIES
                else:
                    more = tries < self.retries
                if not more:
                    if tries:
                        raise type(exc)(f"{exc} (gave up after {tries + 1} attempts)",
                                        hint=exc.hint) from None
                    raise
                time.sleep(min(BACKOFF_SECONDS * 2 ** tries, BACKOFF_CAP_SECONDS))
                tries += 1

    def _generation(self, path: str, body: dict, on_piece=None) -> Answer:
        """Send one streaming generation request and gather its NDJSON pieces."""
        model = body["model"]
        started = time.monotonic()
        if model in self._no_think_field:
            body = {k: v for k, v in body.items() if k != "think"}
        try:
            response = self._open("POST", path, body, timeout=self.timeout)
        except OllamaError as exc:
            if "does not support thinking" in str(exc) and "think" in body:
                # Ollama v0.12.4 refused think:false on models that never think.
                self._no_think_field.add(model)
                return self._generation(path, body, on_piece)
            raise
        answer = Answer()
        text: list[str] = []
        thinking: list[str] = []
        done = False
        with response:
            for line in self._lines(response):
                piece = self._decode(line)
                if "error" in piece:
                    # Ollama reports failures after the first byte in-band, with HTTP 200.
                    raise TransientError(f"Ollama failed while answering: {excerpt(str(piece['error']))}")
                message = piece.get("message") or {}
                text.append(piece.get("response") or message.get("content") or "")
                if on_piece and text[-1]:
                    on_piece(text[-1])
                thinking.append(piece.get("thinking") or message.get("thinking") or "")
                if piece.get("done"):
                    done = True
                    answer.done_reason = str(piece.get("done_reason") or "")
                    for name in _METRICS:
                        setattr(answer, name, int(piece.get(name) or 0))
                    break
        if not done:
            raise TransientError(f"the answer from Ollama at {self.host} stopped before it was complete")
        answer.text = "".join(text)
        answer.thinking = "".join(thinking)
        self._count(model, answer, started)
        if self.record is not None:
            self.record.append((model, answer))
        if self.verbose:
            self._report(path, model, answer, time.monotonic() - started)
        return answer

    def _report(self, path: str, model: str, answer: Answer, seconds: float) -> None:
        """--verbose: one line per request on stderr with its timings and token counts."""
        speed = answer.eval_count / (answer.eval_duration / 1e9) if answer.eval_duration else 0.0
        print(f"{PROG}: {path} {model} on {self.host}: {seconds:.2f}s, load "
              f"{answer.load_duration / 1e9:.2f}s, prompt {answer.prompt_eval_count} tokens, answer "
              f"{answer.eval_count} tokens ({speed:.1f}/s), {answer.done_reason or 'no done_reason'}",
              file=sys.stderr, flush=True)

    def _count(self, model: str, answer: Answer, started: float) -> None:
        """Add an answer to this server's tally.

        A long load_duration means the request waited for a model load. Requests
        sent together all wait for the same load, so a load counts once however
        many requests waited through it.
        """
        load = answer.load_duration / 1e9
        with self._lock:
            self.calls += 1
            self.load_seconds += load
            if load >= LOAD_SEEN_SECONDS:
                if started >= self._load_ends.get(model, 0.0):
                    self.loads_seen += 1
                self._load_ends[model] = max(self._load_ends.get(model, 0.0), started + load)

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One short non-streaming request that returns a JSON object."""
        with self._open(method, path, body, timeout=min(self.timeout, METADATA_TIMEOUT)) as response:
            data = self._read(response)
        return self._decode(data)

    def _lines(self, response) -> Iterator[bytes]:
        """Yield the non-empty NDJSON lines of a streaming response."""
        while True:
            line = self._read(response, line=True)
            if not line:
                return
            if line.strip():
                yield line

    def _read(self, response, *, line: bool = False) -> bytes:
        """Read a line or the whole body, at most LINE_LIMIT bytes; socket trouble is a TransientError."""
        import http.client

        try:
            data = response.readline(LINE_LIMIT) if line else response.read(LINE_LIMIT + 1)
        except TimeoutError:
            raise ServerTimeout(
                f"Ollama at {self.host} stopped answering for {self.timeout:g} s",
                hint="a slow or overloaded server needs a longer --timeout",
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"the connection to Ollama at {self.host} dropped ({exc})") from None
        if len(data) > LINE_LIMIT or line and len(data) == LINE_LIMIT and not data.endswith(b"\n"):
            what = "a line" if line else "an answer"
            raise TransientError(f"Ollama at {self.host} sent {what} longer than "
                                 f"{LINE_LIMIT / 2 ** 20:g} MB; it was not read further")
        return data

    def _decode(self, data: bytes) -> dict:
        """Parse one JSON object from Ollama."""
        try:
            value = json.loads(data)
        except ValueError:
            sample = excerpt(data[:4096].decode("utf-8", "replace"), 60)
            raise TransientError(f"Ollama at {self.host} sent something that is not JSON: {sample!r}") from None
        if not isinstance(value, dict):
            raise TransientError(f"Ollama at {self.host} sent unexpected JSON: {excerpt(str(value), 60)}")
        self.answered = True
        return value

    def _open(self, method: str, path: str, body: dict | None, *, timeout: float):
        """Send a request; return the open response or raise a typed OllamaError."""
        import http.client
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": f"{PROG}/{__version__}"}
        if self._api_key:  # as the official client does for remote and cloud servers
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.host + path, data=data, method=method, headers=headers)
        try:
            return self._opener().open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            self.answered = True
            raise self._http_error(exc, body) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise self._timeout(timeout) from None
            if isinstance(reason, (ConnectionResetError, ConnectionAbortedError)):
                raise TransientError(f"the connection to Ollama at {self.host} dropped ({reason})") from None
            if type(reason).__name__.startswith("SSL"):
                raise ServerUnreachable(
                    f"cannot make a secure connection to {self.host} ({getattr(reason, 'reason', None) or reason})",
                    hint="if the server uses its own certificate, point SSL_CERT_FILE at it",
                ) from None
            raise ServerUnreachable(
                f"cannot connect to Ollama at {self.host} ({getattr(reason, 'strerror', None) or reason})",
                hint="start it with `ollama serve`, or set OLLAMA_HOST (or --host) to where it runs",
            ) from None
        except TimeoutError:
            raise self._timeout(timeout) from None
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"the connection to Ollama at {self.host} dropped ({exc})") from None

    def _opener(self):
        """urllib's opener: redirects only to the same origin; a server on this machine is
        never reached through a proxy."""
        import urllib.parse
        import urllib.request

        host = urllib.parse.urlsplit(self.host).hostname or ""
        handlers = [same_origin_redirects()]
        if host == "localhost" or host.startswith("127.") or host == "::1":
            handlers.append(urllib.request.ProxyHandler({}))
        return urllib.request.build_opener(*handlers)

    def _timeout(self, timeout: float) -> ServerTimeout:
        return ServerTimeout(
            f"Ollama at {self.host} did not answer within {timeout:g} s",
            hint="a cold model load can take minutes on slow disks; raise --timeout",
        )

    def _http_error(self, exc, body: dict | None) -> OllamaError:
        """Turn an HTTP error status into the error the user can act on."""
        import http.client

        try:
            raw = exc.read(ERROR_BODY_LIMIT) or b""
        except (OSError, http.client.HTTPException):
            raw = b""
        status = exc.code
        if 300 <= status < 400:
            return self._redirect_error(exc, post=body is not None)
        content_type = (exc.headers.get("Content-Type") or "") if exc.headers else ""
        message, kind = server_message(raw, content_type)
        message = message or str(exc.reason or "") or "no details"
        model = (body or {}).get("model", "")
        if kind == "html":
            return (TransientError if status in RETRIED_STATUSES else OllamaError)(
                f"{self.host} answered HTTP {status} with an HTML page: is this an Ollama server?",
                hint="check OLLAMA_HOST (or --host): it should be the Ollama server's base URL, "
                     "like http://localhost:11434",
            )
        from_ollama = kind == "ollama"
        if status == 404 and model and from_ollama:
            return ModelUnavailable(
                f"model '{model}' is not installed on {self.host}",
                hint=f"run `ollama pull {model}`",
            )
        if status == 404:
            # Ollama answers a JSON error for a missing model; a plain 404 page means
            # the URL does not lead to Ollama's API (a wrong path or another server).
            return OllamaError(
                f"{self.host} has no Ollama API (HTTP 404: {message})",
                hint="check OLLAMA_HOST (or --host): it should be the server's base URL, "
                     "like http://localhost:11434",
            )
        if status in RETRIED_STATUSES:
            return TransientError(f"Ollama at {self.host} answered HTTP {status}: {message}")
        if status >= 500:
            return OllamaError(f"Ollama at {self.host} answered HTTP {status}: {message}",
                               hint="check OLLAMA_HOST (or --host): it should be an Ollama server")
        return OllamaError(f"Ollama at {self.host} refused the request (HTTP {status}): {message}")

    def _redirect_error(self, exc, *, post: bool) -> OllamaError:
        """A redirect that was not followed: to another origin, or one that would turn a POST into a GET."""
        import urllib.parse

        location = (exc.headers.get("Location") or "") if exc.headers else ""
        sent_to = getattr(exc, "filename", None) or self.host
        target = urllib.parse.urljoin(sent_to, location) if location else ""
        hint = "set OLLAMA_HOST (or --host) to the address the server redirects to"
        if not target:
            return OllamaError(f"{self.host} answered HTTP {exc.code}, a redirect without a Location",
                               hint="check OLLAMA_HOST (or --host): it should be an Ollama server")
        if not same_origin(target, self.host):
            return OllamaError(
                f"{self.host} redirected the request to {excerpt(target)}: redirects are followed "
                "only to the same scheme, host and port, so the API key never goes elsewhere",
                hint=hint)
        if post and exc.code in (301, 302, 303):
            return OllamaError(
                f"{self.host} redirected a POST with HTTP {exc.code} to {excerpt(target)}, which would "
                "turn it into a GET: not followed", hint=hint)
        return OllamaError(f"{self.host} redirected the request to {excerpt(target)} in a loop",
                           hint="check OLLAMA_HOST (or --host) and the server's redirects")


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """Server text as one short line, redacted before it is cut (so no part of a secret shows).

    >>> excerpt("a\\n  b " + "x" * 300, 10)
    'a b xxxxxx...'
    """
    text = re.sub(r"\s*[\r\n\t\v\f]+\s*", " ", redact(text)).strip()
    return text if len(text) <= limit else text[:limit] + "..."


def server_message(raw: bytes, content_type: str = "") -> tuple[str, str]:
    """What an error body says, as (one short line, kind): kind is "ollama" for Ollama's
    {"error": ...}, "html" for a web page (the line is then ""), else "text"."""
    text = raw.decode("utf-8", "replace")
    try:
        return excerpt(str(json.loads(text)["error"])), "ollama"
    except (ValueError, KeyError, TypeError):
        pass
    head = text.lstrip()[:200].lower()
    if "html" in content_type.lower() or head.startswith(("<!doctype", "<html", "<head", "<body")):
        return "", "html"
    return excerpt(text), "text"


def same_origin(url: str, other: str) -> bool:
    """Whether two URLs have the same scheme, host and port.

    >>> same_origin("http://Host/a", "http://host:80"), same_origin("https://h/a", "http://h")
    (True, False)
    """
    import urllib.parse

    def origin(value: str) -> tuple[str, str, int | None]:
        split = urllib.parse.urlsplit(value)
        try:
            port = split.port or {"http": 80, "https": 443}.get(split.scheme.lower())
        except ValueError:
            port = -1
        return split.scheme.lower(), (split.hostname or "").lower(), port

    return origin(url) == origin(other)


_REDIRECT_HANDLER: type | None = None


def same_origin_redirects():
    """A urllib redirect handler that follows a redirect only to the same scheme, host and port
    (so the Authorization header never leaves), and never turns a POST into a GET."""
    global _REDIRECT_HANDLER
    if _REDIRECT_HANDLER is None:
        import urllib.request

        class SameOriginRedirects(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req, fp, code, msg, headers, newurl):
                if not same_origin(newurl, req.full_url):
                    return None  # urllib then raises HTTPError: _redirect_error says why
                if code in (307, 308):  # method and body kept, as these codes require
                    return urllib.request.Request(newurl, data=req.data, headers=dict(req.headers),
                                                  method=req.get_method(), unverifiable=True,
                                                  origin_req_host=req.origin_req_host)
                if req.get_method() not in ("GET", "HEAD"):
                    return None
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        _REDIRECT_HANDLER = SameOriginRedirects
    return _REDIRECT_HANDLER()


# -- Prompt templates ---------------------------------------------------------


# --prompts-dir (or OLLAMA_GENERATE_PROMPTS_DIR): searched before the built-in
# templates. main() sets it once per run from the resolved Config.
PROMPTS_OVERRIDE: str | None = None


def template_dirs() -> list[str]:
    """Where templates are looked for: --prompts-dir first, then the built-in ones."""
    return ([PROMPTS_OVERRIDE] if PROMPTS_OVERRIDE else []) + builtin_template_dirs()


def builtin_template_dirs() -> list[str]:
    """Where the built-in templates may live: beside the script, or where pip put them."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
    if os.path.isdir(here):  # a checkout: no need to ask sysconfig where pip puts data
        return [here]
    installed = os.path.join(sys.prefix, "share", PROG, "prompts")
    if os.path.isdir(installed):  # pip or pipx put them in this environment
        return [here, installed]
    import sysconfig

    candidates = [here, installed]
    # pip puts data files under the scheme's data path: the venv, --user, or a
    # distribution's own layout (Debian's /usr/local).
    for scheme in sysconfig.get_scheme_names():
        data = sysconfig.get_path("data", scheme)
        candidates.append(os.path.join(data, "share", PROG, "prompts"))
    return list(dict.fromkeys(candidates))


def load_template(name: str) -> tuple[str, str]:
    """Return (path, text) of the template NAME, from the first folder that has it."""
    dirs = template_dirs()
    for folder in dirs:
        path = os.path.join(folder, name + ".txt")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                return path, handle.read()
    raise TemplateError(
        f"prompt template {name}.txt was not found (looked in {', '.join(dirs)})",
        hint="reinstall ollama-generate, or run it from a checkout that has the prompts/ folder",
    )


def template_placeholders(text: str) -> list[str]:
    """The placeholder names a template uses, in order of first use.

    >>> template_placeholders("Rewrite $description, costs $$5, ${tone}.")
    ['description', 'tone']
    """
    names: list[str] = []
    for match in string.Template.pattern.finditer(text):
        name = match.group("named") or match.group("braced")
        if name and name not in names:
            names.append(name)
    return names


def render(name: str, **values: object) -> str:
    """Fill template NAME with values; a wrong placeholder is one error naming them all."""
    path, text = load_template(name)
    expected = TEMPLATE_FIELDS[name]
    used = template_placeholders(text)
    missing = [f"${n}" for n in expected if n not in used]
    unknown = [f"${n}" for n in used if n not in expected]
    problems = []
    if missing:
        problems.append(f"is missing {', '.join(missing)}")
    if unknown:
        problems.append(f"uses unknown {', '.join(unknown)}")
    for match in string.Template.pattern.finditer(text):
        if match.group("invalid") is not None:
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"has a stray $ on line {line} (write $$ for a dollar sign)")
            break
    if problems:
        allowed = ", ".join(f"${n}" for n in expected) or "no placeholders"
        raise TemplateError(f"template {path} {'; '.join(problems)}",
                          hint=f"{name}.txt takes {allowed}")
    return string.Template(text).substitute({k: str(v) for k, v in values.items()})


# -- Output cleaning ----------------------------------------------------------
# Pure functions from a model's raw answer to text we can trust.


class lazy_pattern:  # noqa: N801 - stands in for re.compile at module level
    """A regular expression compiled on first use: most commands need few of them, and
    compiling them all would add to every call's start-up time."""

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self._source = (pattern, flags)
        self._compiled: re.Pattern | None = None

    def __getattr__(self, name: str):
        if self._compiled is None:
            self._compiled = re.compile(*self._source)
        return getattr(self._compiled, name)


_THINK_BLOCK = lazy_pattern(r"<(think|thinking)>.*?</\1>", re.S | re.I)
_THINK_OPEN = lazy_pattern(r"<(?:think|thinking)>", re.I)
_THINK_CLOSE = lazy_pattern(r"</(?:think|thinking)>", re.I)
# An interjection is chatter only as a sentence of its own ("Sure!") or when a
# preamble follows it ("Sure, here is..."): "Sure, a woman..." and "Great Wall of
# China..." are captions.
_INTERJECTION = lazy_pattern(
    r"^(?:sure|certainly|of course|absolutely|okay|ok|alright|great|got it|here you go|here it is)"
    r"(?:\s*[!.:]+(?=\s|$)|\s*,?\s*(?=(?:here|below|this is)\b))\s*", re.I)
# A preamble names what it delivers before its colon: "Here are two women walking:
# one holds..." is a caption.
_PREAMBLE = lazy_pattern(
    r"^(?:here(?:'s| is| are)|below is|this is)\s+(?:(?:the|your|a|an|my|some)\s+)?(?:[\w-]+\s+){0,3}?"
    r"(?:caption|tag|description|prompt|version|rewrite|result|card|story|answer|output|profile)s?\b"
    r"[^\n:]{0,60}:\s*", re.I)
_LABEL = lazy_pattern(
    r"^[*_#\s]*(?:final |rewritten |enhanced |improved |training )?"
    r"(?:caption|tags|booru tags|description|prompt|answer|output|result|text|lora)[*_]*\s*:[*_]*\s*",
    re.I)
_OFFER = lazy_pattern(
    r"(?:^|(?<=[.!?\n])\s*)(?:let me know\b|i hope (?:this|that)\b|feel free\b|would you like\b"
    r"|do you want\b|if you(?:'d| would)? (?:like|need|want)\b|happy to help\b"
    r"|i can (?:also )?(?:adjust|provide|make|modify)\b|\**note\**\s*:|word count\s*:)[^\n]*$", re.I)
# A parenthesised note or count can stand mid-text; only it goes, not the rest of the line.
_PAREN_NOTE = lazy_pattern(r"\s*\((?:\**note\**|word count)\s*:[^()]*\)|\s*\(\d+ words\)", re.I)
_FENCE = lazy_pattern(r"^\s*```[\w-]*\s*$", re.M)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb", "`": "`"}
_BULLET = lazy_pattern(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)])\s+", re.M)
_HEADING = lazy_pattern(r"^\s*#{1,6}\s*", re.M)
_HEADING_LINE = lazy_pattern(r"^\s*#{1,6}\s.*$|^\s*[-*_]{3,}\s*$", re.M)
_BLOCKQUOTE = lazy_pattern(r"^\s*>\s?", re.M)
# Emphasis marks hug words from outside; an underscore inside a tag (score_8_up) is no mark.
_EMPHASIS = lazy_pattern(r"(?<![\w*])(\*\*|__|\*|_)(?=\S)(.+?)(?<=\S)\1(?![\w*])")


def strip_think(text: str) -> str:
    """Remove reasoning blocks, closed or not.

    >>> strip_think("<think>hmm</think>A cat.")
    'A cat.'
    >>> strip_think("plan first</think>A dog.")
    'A dog.'
    >>> strip_think("A bird. <think>ran out of tokens")
    'A bird.'
    """
    text = _THINK_BLOCK.sub("", text)
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:  # the opening tag was part of the prompt: all before the close is reasoning
        text = text[closes[-1].end():]
    opened = _THINK_OPEN.search(text)
    if opened:  # the answer ran out of tokens while reasoning
        text = text[:opened.start()]
    return text.strip()


def strip_wrapping_quotes(text: str) -> str:
    """Remove quotes around the whole answer, but not quotes that open and close inside it.

    >>> strip_wrapping_quotes("'A woman's umbrella'")
    "A woman's umbrella"
    >>> strip_wrapping_quotes('"OPEN" sign and "CLOSED" sign')
    '"OPEN" sign and "CLOSED" sign'
    """
    text = text.strip()
    while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1] and not _quotes_inside(text):
        text = text[1:-1].strip()
    return text


def _quotes_inside(text: str) -> bool:
    """Whether the inner text uses the wrapping quote mark as a quote (not an apostrophe)."""
    inner = text[1:-1]
    for mark in {text[0], text[-1]}:
        for index, char in enumerate(inner):
            if char != mark:
                continue
            between_letters = 0 < index < len(inner) - 1 and inner[index - 1].isalnum() \
                and inner[index + 1].isalnum()
            if not (mark in "'\u2019" and between_letters):
                return True
    return False


def strip_chatter(text: str) -> str:
    """Remove think blocks, preambles, code fences and trailing offers from an answer.

    >>> strip_chatter('Sure! Here is your caption:\\n"A red fox in snow."\\nLet me know if you need more.')
    'A red fox in snow.'
    """
    text = strip_think(text)
    text = _PAREN_NOTE.sub("", _FENCE.sub("", text)).strip()
    for _ in range(3):
        before = text
        text = _INTERJECTION.sub("", text, count=1)
        text = _PREAMBLE.sub("", text, count=1)
        text = _LABEL.sub("", text, count=1).strip()
        if text == before:
            break
    lines = text.splitlines()
    while lines and (not lines[-1].strip() or _OFFER.match(lines[-1].strip())):
        lines.pop()
    text = "\n".join(lines)
    text = _OFFER.sub("", text).strip()
    return strip_wrapping_quotes(text)


def strip_markdown(text: str) -> str:
    """Remove headings, bullets, emphasis and inline code marks.

    >>> strip_markdown("## Look\\n- **bold** fox\\n- `calm` lake")
    'Look\\nbold fox\\ncalm lake'
    """
    text = _HEADING.sub("", text)
    text = _BLOCKQUOTE.sub("", text)
    text = _BULLET.sub("", text)
    text = _EMPHASIS.sub(r"\2", text)
    return text.replace("`", "")


def one_line(text: str) -> str:
    """Join lines and collapse whitespace into a single line."""
    return " ".join(text.split())


def clean_prose(answer: str) -> str:
    """A prose answer as one clean line; headings, rules and lead-ins are chatter."""
    text = _HEADING_LINE.sub("", strip_chatter(_FOREIGN_LEAD.sub("", strip_think(answer), count=1)))
    return one_line(strip_wrapping_quotes(strip_markdown(strip_chatter(text))))


def clean_tags(answer: str) -> list[str]:
    """Split a tag answer into unique tags, in order.

    >>> clean_tags("Tags: 1girl, Solo,\\n- red hair, solo, smile.")
    ['1girl', 'Solo', 'red hair', 'smile']
    """
    tags: list[str] = []
    seen: set[str] = set()
    for raw in re.split(r"[,\n;]", strip_markdown(strip_chatter(answer))):
        tag = strip_wrapping_quotes(one_line(raw)).strip(" .")
        key = tag.casefold()
        if tag and key not in seen:
            seen.add(key)
            tags.append(tag)
    return tags


# Sentences that talk about the answer or the instructions instead of the image.
_META = lazy_pattern(
    r"^\(?\s*(?:(?:following|as per|per|according to) (?:the|your|these|all) (?:rules|instructions"
    r"|guidelines|requirements)\b|(?:this|the|my) (?:description|caption|answer|response|prompt|tag list)"
    r"(?: above| provided)? (?:adheres|follows|complies|meets|sticks|avoids|focuses|has been written"
    r"|is written|was written)"
    r"|i (?:have|'ve) (?:avoided|kept|followed|included|omitted|focused|used|made|tried|written|described)"
    r"|i (?:avoided|kept|followed|included|omitted|focused|used|made sure|described)\b"
    r"|no other tags|all tags (?:are|were)|word count|\(?\d+ words\)?$|note\s*:)", re.I)
# Hedges inside a caption: the model's doubts are not part of the picture.
_HEDGE = lazy_pattern(
    r"^(?:i (?:can't|cannot|can not|am unable to|'m unable to|am not able to|'m not able to|do not|don't)"
    r" (?:determine|identify|tell|see|know|confirm|make out|say|be sure|verify)"
    r"|it(?:'s| is) (?:not possible|impossible|difficult|hard|unclear) to (?:determine|identify|tell|say|know)"
    r"|(?:the )?(?:exact|specific) (?:identity|location|setting) (?:is|cannot be) (?:unknown|unclear|determined))",
    re.I)
# An answer that opens like this refused (or apologised) instead of describing.
_REFUSAL = lazy_pattern(
    r"^(?:i'?m sorry|i am sorry|sorry[,.!]|i apologi[sz]e|i can(?:no|')t\b|i cannot\b|i can not\b"
    r"|i(?:'m| am) (?:unable|not able)\b|i won'?t\b|i will not\b|as an ai\b|as a language model\b"
    r"|unfortunately,? i\b|i'?m afraid i\b)", re.I)
_ASIDE = lazy_pattern(r"\s*\[[^\[\]\n]{0,80}\]\s*")
_LOREM_WORDS = {"lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed",
                "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua"}


def is_filler(sentence: str) -> bool:
    """Placeholder text ("Lorem ipsum dolor sit amet..."), not a caption that mentions it.

    >>> is_filler("Lorem ipsum dolor sit amet, consectetur."), is_filler("A shirt printed with lorem ipsum.")
    (True, False)
    """
    words = re.findall(r"[a-z]+", sentence.lower())
    return bool(words) and sum(word in _LOREM_WORDS for word in words) / len(words) >= 0.6
# A lead-in in another language that ends in a colon ("好的，以下是标签：",
# "Claro, aquí tienes el pie de foto:").
_FOREIGN_LEAD = lazy_pattern(
    r"^(?:[^\x00-\x7f][^\n]{0,60}[:\uff1a]\s*\n|(?:claro|por supuesto|aqu\u00ed (?:tienes|est\u00e1)"
    r"|voici|bien s\u00fbr|d'accord|nat\u00fcrlich|gerne|hier ist|ecco|certo|certamente)"
    r"[^\n:\uff1a]{0,80}[:\uff1a]\s*)", re.I)
# Openers that describe the picture instead of what is in it; the caption starts after them.
_BOILERPLATE = lazy_pattern(
    r"^(?:(?:the|this) (?:image|picture|photo|photograph|illustration|artwork|drawing|painting|render"
    r"|scene) (?:shows|depicts|features|displays|presents|portrays|captures|showcases|contains"
    r"|is of|is an? (?:image|picture|photo) of)"
    r"|(?:in|within) (?:this|the) (?:image|picture|photo|photograph|illustration|artwork|scene),?"
    r"|this is an? (?:image|picture|photo|photograph) of|the image is (?=an? ))\s*", re.I)
# A BLIP captioner artefact that small models copy ("an arafed man").
_ARAFED = lazy_pattern(r"\b(?:(an?) )?(?:arafed|araffe|arafe|arafad)\b\s*", re.I)
_SENTENCE_END = lazy_pattern(r"(?<=[.!?])\s+")


def is_refusal(text: str) -> bool:
    """Whether an answer refused, apologised or hedged instead of answering.

    >>> is_refusal("I'm sorry, but I can't describe this image."), is_refusal("A sorry-looking dog.")
    (True, False)
    """
    return bool(_REFUSAL.match(strip_wrapping_quotes(text.strip())))


def drop_chatter_sentences(text: str) -> str:
    """Remove sentences about the answer itself, hedges, filler and [asides] from prose."""
    text = _ASIDE.sub(" ", text)
    kept = [sentence for sentence in _SENTENCE_END.split(text)
            if not (_META.match(sentence) or _HEDGE.match(sentence) or is_filler(sentence))]
    return " ".join(kept).strip()


def strip_boilerplate(text: str) -> str:
    """Start the caption with its subject, not with "The image shows"; drop "arafed".

    >>> strip_boilerplate("The image shows an arafed man in a hat.")
    'A man in a hat.'
    """
    removed = _BOILERPLATE.sub("", text, count=1)
    removed = _ARAFED.sub(lambda m: _article_for(m, removed) if m.group(1) else "", removed)
    return removed[:1].upper() + removed[1:] if removed != text else text


def _article_for(match: re.Match, text: str) -> str:
    """The article that fits the word after a removed "arafed"."""
    following = text[match.end():match.end() + 1].lower()
    article = "an" if following in "aeiou" and following else "a"
    return (article.capitalize() if match.group(1)[0].isupper() else article) + " "


def cut_loop(text: str, *, repeats: int = 3) -> str:
    """Cut text where a phrase starts repeating itself in a loop.

    A phrase of 8 letters or more must come `repeats` times in a row, a shorter one
    twice as often: "very very very long hair" and a row of stars are not loops.

    >>> cut_loop("A cat sits on a mat. A cat sits on a mat. A cat sits on a mat. A cat sits")
    'A cat sits on a mat.'
    >>> cut_loop("red, red, red, red, red, red"), cut_loop("very very very long hair")
    ('red', 'very very very long hair')
    """
    words = text.split()
    keys = [re.sub(r"[^\w]", "", word.lower()) for word in words]
    for start in range(len(words)):
        for size in range(1, min(40, (len(words) - start) // repeats) + 1):
            unit = keys[start:start + size]
            if not all(unit):
                continue
            times = repeats if sum(map(len, unit)) >= 8 else 2 * repeats
            if start + times * size > len(words):
                continue
            if all(keys[start + n * size:start + (n + 1) * size] == unit for n in range(1, times)):
                kept = " ".join(words[:start + size]).rstrip(",;: ")
                return kept if kept[-1:] in ".!?" or not kept else kept
    return text


def has_loop(text: str) -> bool:
    """Whether the answer repeats a phrase in a loop."""
    return cut_loop(text) != text


def clean_caption_prose(answer: str, *, cut_off: bool = False) -> str:
    """A prose caption from an answer: chatter, boilerplate and loops removed, one line.

    Raises RefusalError for an answer that refused.
    """
    text = clean_prose(answer)
    if is_refusal(text):
        raise RefusalError("the model refused to describe the image")
    if cut_off:
        text = drop_cut_off_end(text, style="training")
    return strip_boilerplate(drop_chatter_sentences(cut_loop(text)))


def is_kaomoji(tag: str) -> bool:
    """Short emoticon tags like ^_^ and >_< keep their underscores.

    >>> is_kaomoji("^_^"), is_kaomoji("o_o"), is_kaomoji("long_hair")
    (True, True, False)
    """
    return len(tag) <= 4 and "_" in tag and not re.search(r"[a-z]{2}", tag)


_WEIGHT = lazy_pattern(r"^\(+([^():]+?)(?::\s*[\d.]+)?\)+$")
_SENTENCE_TAG = lazy_pattern(
    r"^(?:the (?:image|picture|photo)|this (?:image|is)|there (?:is|are)|no other|all tags|here (?:is|are)"
    r"|i |note\b|it is|these are)", re.I)


def normalize_tag(raw: str, *, underscores: bool = False, keep_weights: bool = False) -> str:
    """One tag as trainers want it: lower case, single spaces, no weights or end periods.

    >>> normalize_tag("  Long_Hair. "), normalize_tag("(masterpiece:1.2)"), normalize_tag(">_<")
    ('long hair', 'masterpiece', '>_<')
    """
    tag = strip_wrapping_quotes(_BULLET.sub("", raw.strip()))
    weighted = _WEIGHT.match(tag)
    if weighted and not keep_weights:
        tag = weighted.group(1)
    tag = one_line(tag.lower()).strip(" .")
    if not underscores and not is_kaomoji(tag):
        tag = one_line(tag.replace("_", " "))
    return tag


def parse_tag_answer(answer: str) -> list[str]:
    """The raw tags of an answer: a JSON list (structured output) or comma/line separated text."""
    text = strip_chatter(_FOREIGN_LEAD.sub("", strip_think(answer), count=1))
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        value = next((item for item in value.values() if isinstance(item, list)), None)
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    lines = [line for line in text.splitlines()
             if not (_META.match(line.strip()) or _OFFER.match(line.strip()))]
    return re.split(r"[,\n;]", strip_markdown("\n".join(lines)))


def clean_caption_tags(answer: str, *, cut_off: bool = False, underscores: bool = False,
                       limit: int | None = None, keep_weights: bool = False) -> list[str]:
    """Tags from an answer: normalised, without duplicates, asides or sentences; at most limit.

    Raises RefusalError for an answer that refused.
    """
    if is_refusal(strip_chatter(strip_think(answer))):
        raise RefusalError("the model refused to tag the image")
    raws = parse_tag_answer(answer)
    if cut_off and len(raws) > 1:
        raws = raws[:-1]
    tags: list[str] = []
    for raw in raws:
        if re.fullmatch(r"\s*\[.*\]\s*", raw):
            continue
        tag = normalize_tag(raw, underscores=underscores, keep_weights=keep_weights)
        if tag and tag not in tags and len(tag.split()) <= 6 and not _SENTENCE_TAG.match(tag):
            tags.append(tag)
    return tags[:limit] if limit else tags


def _without_word(text: str, word: str) -> str:
    """Remove every whole-word occurrence of word, and the punctuation it leaves behind."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])", re.I)
    text = pattern.sub("", text)
    text = re.sub(r"\(\s*\)|\[\s*\]|\"\s*\"", "", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = re.sub(r"[,;:]+(?=[.!?])", "", text)
    return one_line(text).strip(" ,;:")


# Sentence openers that read wrong capitalised in the middle of "ohwx, A woman ...".
_OPENERS = {"a", "an", "the", "this", "these", "two", "three", "four", "five", "several",
            "some", "one", "close-up", "closeup", "portrait", "photo", "photograph"}


def continue_after_chunk(body: str) -> str:
    """Lower-case a common sentence opener that now follows the trigger or prefix.

    >>> continue_after_chunk("A woman in red")
    'a woman in red'
    >>> continue_after_chunk("NASA photo")
    'NASA photo'
    """
    first = body.split(" ", 1)[0]
    if first.lower() in _OPENERS and first == first.capitalize():
        return body[:1].lower() + body[1:]
    return body


def layout_caption(body: str, *, trigger: str = "", prefix: str = "") -> str:
    """Put the prefix first, then the trigger as the next comma-separated chunk, then body.

    >>> layout_caption("a woman reading", trigger="ohwx", prefix="photo")
    'photo, ohwx, a woman reading'
    """
    chunks = []
    prefix = prefix.strip()
    if prefix:
        chunks.append(prefix.rstrip(", "))
    contains = trigger and re.search(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", prefix, re.I)
    if trigger and not contains:
        chunks.append(trigger)
    chunks.append(body)
    return ", ".join(chunks)


def drop_cut_off_end(text: str, *, style: str) -> str:
    """Remove the unfinished end of an answer that hit the token limit.

    >>> drop_cut_off_end("1girl, solo, long ha", style="tags")
    '1girl, solo'
    >>> drop_cut_off_end("A fox sits. It looks to", style="training")
    'A fox sits.'
    """
    if style == "tags":
        return text.rsplit(",", 1)[0] if "," in text else text
    ends = [text.rfind(mark) for mark in ".!?"]
    return text[:max(ends) + 1] if max(ends) > 0 else text


TAG_RANGE = {False: (20, 40), True: (30, 50)}  # accurate and --creative
WORD_RANGE = (50, 150)  # a training caption
SENTENCE_RANGE = (2, 4)  # a detailed caption


def finalize_caption(answer: str, *, style: str, trigger: str = "", prefix: str = "",
                     cut_off: bool = False) -> str:
    """Turn the text model's answer into the caption line we write.

    Raises ImageError when nothing usable is left (RefusalError for a refusal), so
    no empty file, and no refusal, is ever written.
    """
    spec = CaptionSpec(style=style, trigger=trigger.strip(), prefix=prefix)
    return layout_caption(caption_body(answer, spec=spec, cut_off=cut_off),
                          trigger=spec.trigger, prefix=prefix)


def caption_body(answer: str, *, spec: CaptionSpec, cut_off: bool = False) -> str:
    """The caption an answer gives, cleaned, before the prefix and trigger are placed."""
    trigger = spec.trigger
    if spec.style == "tags":
        tags = clean_caption_tags(answer, cut_off=cut_off, underscores=spec.underscores)
        body = ", ".join(arrange_tags(tags, trigger=trigger, prefix=spec.prefix, exclude=spec.exclude,
                                      always_first=spec.always_first, underscores=spec.underscores,
                                      limit=TAG_RANGE[spec.creative][1]))
    else:
        body = clean_caption_prose(answer, cut_off=cut_off)
        if trigger:
            body = _without_word(body, trigger)
        body = continue_after_chunk(body) if spec.prefix or trigger else body[:1].upper() + body[1:]
    if not body.strip(" ,.;:"):
        raise RefusalError("the text model's answer was empty after cleaning")
    return body


def arrange_tags(tags: list[str], *, trigger: str = "", prefix: str = "", exclude: Sequence[str] = (),
                 always_first: Sequence[str] = (), underscores: bool = False,
                 limit: int | None = None) -> list[str]:
    """Order and trim tags: --always-first ones first, excluded and prefix tags out, at most limit.

    The trigger is removed here (inside tags too: "ohwx woman"); layout_caption puts it first.

    >>> arrange_tags(["smile", "1girl", "solo", "hat"], exclude=["hat"], always_first=["1girl", "solo"])
    ['1girl', 'solo', 'smile']
    """
    def norm(tag: str) -> str:
        return normalize_tag(tag, underscores=underscores)

    taken = {norm(tag) for tag in clean_tags(prefix)} | {norm(tag) for tag in exclude}
    if trigger:
        taken.add(norm(trigger))
        tags = [_without_word(tag, trigger) for tag in tags]
    first = [norm(tag) for tag in always_first if norm(tag) and norm(tag) not in taken]
    rest = [tag for tag in tags if tag and tag not in taken and tag not in first]
    arranged = list(dict.fromkeys(first + rest))
    return arranged[:max(limit, len(first))] if limit else arranged


def estimate_clip_tokens(text: str) -> int:
    """Estimate the number of CLIP BPE tokens of text, without the start and end tokens.

    CLIP lower-cases the text and splits it into pieces: a contraction ('s, 't, 're, 've, 'm, 'll,
    'd), a run of letters, a single digit, or a run of other non-space characters (punctuation,
    underscores, symbols), then BPE-merges each piece. Here a digit or a contraction is one token. A
    run of up to 6 letters is one token (common words are); a longer one costs more with the square
    of the excess, and past 18 letters a third of a token a letter. A run of 5 or more letters costs
    more when it looks foreign: ending in a, i, o or u, or holding j, k, q, x or z (romanised names
    split into many tokens). A punctuation run of n characters costs max(1, n - 1): ")," is one
    token, "))," two. Each UTF-8 byte after the first of a non-ASCII character costs half a token
    more. The sum is raised by 1 % and rounded up, so the estimate errs towards "over budget".

    >>> estimate_clip_tokens("1girl, long_hair, looking at viewer, (masterpiece:1.2)")  # real: 18
    20
    >>> estimate_clip_tokens("")
    0
    """
    import html

    # CLIP's ftfy pass straightens curly quotes; dashes and the ellipsis are one token each anyway.
    text = html.unescape(text).lower().translate(
        {0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"', 0x2013: "-", 0x2014: "-", 0x2026: "."})
    total = 0.0
    for piece in re.findall(r"'(?:s|t|re|ve|m|ll|d)|[^\W\d_]+|\d|(?:[^\w\s]|_)+", text):
        extra = sum(len(char.encode()) - 1 for char in piece) / 2
        if piece[0].isalpha():
            size, excess = len(piece), max(0, len(piece) - 6)
            total += 1 + min((excess / 6) ** 2, excess / 3) + extra
            if size >= 5:
                total += (piece[-1] in "aiou") + 0.4 * sum(char in "jkqxz" for char in piece)
        elif piece[0].isdigit() or (piece[0] == "'" and piece[1:].isalpha()):
            total += 1
        else:
            total += max(1, len(piece) - 1) + extra
    return math.ceil(total * 1.01)


def caption_size(caption_body: str, style: str) -> int:
    """What a style's range counts: tags, words or sentences."""
    if style == "tags":
        return len([tag for tag in caption_body.split(",") if tag.strip()])
    if style == "training":
        return len(caption_body.split())
    return len([part for part in _SENTENCE_END.split(caption_body.strip()) if part])


def style_range(style: str, creative: bool = False) -> tuple[int, int]:
    """The allowed size of a caption in this style."""
    return TAG_RANGE[creative] if style == "tags" else WORD_RANGE if style == "training" else SENTENCE_RANGE


def out_of_range(caption_body: str, spec: CaptionSpec) -> int:
    """How far a caption is from its style's range (0 inside it)."""
    low, high = style_range(spec.style, spec.creative)
    size = caption_size(caption_body, spec.style)
    return max(low - size, size - high, 0) if spec.style != "tags" else max(low - size, 0)


def caption_problem(caption_body: str, *, style: str, creative: bool = False) -> str:
    """What is out of range in a caption, or "" when it is right.

    >>> caption_problem("a b c", style="training")
    'it has 3 words; a training caption has 50 to 150'
    """
    low, high = style_range(style, creative)
    count = caption_size(caption_body, style)
    if style == "tags":
        return "" if count >= low else f"it has {count} tags; it needs {low} to {high}"
    if low <= count <= high:
        return ""
    noun, kind = ("words", "a training caption") if style == "training" else ("sentences", "a detailed caption")
    return f"it has {count} {noun}; {kind} has {low} to {high}"


# -- Images -------------------------------------------------------------------


def sniff_image(path: str) -> str:
    """Name the image format from the file's bytes; raise ImageError if it is not one we send."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(32)
            handle.seek(max(0, size - 32))
            tail = handle.read(32)
    except OSError as exc:
        raise ImageError(f"cannot read the file ({exc.strerror or exc})") from None
    if size == 0:
        raise ImageError("the file is empty")
    kind = _image_kind(head)
    if kind is None:
        raise ImageError("not a supported image (its bytes are not PNG, JPEG, WebP, BMP or GIF)")
    if not _image_complete(kind, head, tail, size):
        raise ImageError(f"the {kind.upper()} file is truncated")
    return kind


def _image_kind(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a") and head[6:8] != b"\0\0" and head[8:10] != b"\0\0":
        return "gif"
    # BMP: "BM", then the DIB header's size at byte 14 names one of the known headers.
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "bmp"
    return None


def _image_complete(kind: str, head: bytes, tail: bytes, size: int) -> bool:
    """Check the end marker or declared size, so a half-copied file is caught."""
    if kind == "png":
        return b"IEND" in tail
    if kind == "jpeg":
        return b"\xff\xd9" in tail
    if kind == "gif":
        return tail.rstrip(b"\x00").endswith(b";")
    declared = int.from_bytes(head[4:8] if kind == "webp" else head[2:6], "little")
    return declared > 12 and size >= declared + (8 if kind == "webp" else 0)


# -- Commands -----------------------------------------------------------------


class CaptionSpec(Frozen):
    """How captions are written: style, mood, context, tag rules and what code adds in front."""

    style: str = "training"
    creative: bool = False
    trigger: str = ""
    prefix: str = ""
    hint: str = ""
    underscores: bool = False
    exclude: tuple[str, ...] = ()
    always_first: tuple[str, ...] = ()


class Caption(Record):
    """A finished caption line, and why a person should look at it, if they should."""

    text: str
    review: str = ""


# Ollama's structured outputs (a JSON schema in "format") arrived in v0.5.0.
STRUCTURED_OUTPUT_VERSION = (0, 5, 0)
TAGS_SCHEMA = {"type": "array", "items": {"type": "string"}}
CLIP_TOKEN_BUDGET = 75


def sampling(config: Config, kind: str, *, writing: bool = True) -> dict:
    """The options sent for one kind of request; --temperature and --max-tokens shape the writing."""
    temperature, num_predict = SAMPLING[kind]
    if writing:
        temperature = temperature if config.temperature is None else config.temperature
        num_predict = config.max_tokens or num_predict
    options = {"temperature": temperature, "num_predict": num_predict, "num_ctx": config.num_ctx}
    if config.seed is not None:
        options["seed"] = config.seed
    return options


def with_no_think(model: str, prompt: str) -> str:
    """Add qwen3's /no_think switch; think:false alone is not honoured by every build."""
    return f"{prompt}\n/no_think" if model_thinks_by_prompt(model) else prompt


def with_hint(prompt: str, hint: str) -> str:
    """Add the user's --hint to a prompt."""
    return prompt + render("hint", hint=hint) if hint else prompt


def connect(config: Config, host: str = "") -> OllamaClient:
    """A client for the configured server (or another of the configured ones)."""
    return OllamaClient(host or config.host, timeout=config.timeout, retries=config.retries,
                        api_key=config.api_key, verbose=config.verbose)


def ask_text_model(client: OllamaClient, config: Config, prompt: str, kind: str, *,
                   keep_alive: int | float | str | None = None, fmt: dict | None = None,
                   printer: StreamPrinter | None = None) -> Answer:
    """Send a rendered prompt to the text model; return its answer without think blocks."""
    answer = client.generate(config.model, with_no_think(config.model, prompt),
                             options=sampling(config, kind), keep_alive=keep_alive, fmt=fmt,
                             printer=printer)
    answer.text = strip_think(answer.text)
    if not answer.text:
        raise empty_answer(config, answer)
    return answer


def empty_answer(config: Config, answer: Answer) -> OllamaError:
    """The error for an answer with nothing usable in it."""
    return OllamaError(f"the text model {config.model} gave an empty answer" + _ran_out(answer),
                       hint="try again, or pick another model with --model or OLLAMA_MODEL")


def _ran_out(answer: Answer) -> str:
    return " (it ran out of tokens)" if answer.done_reason == "length" else ""


def text_result(answer: Answer) -> str:
    """Warn when a text command's answer was cut off at the token limit."""
    if answer.done_reason == "length":
        warn("the answer reached the token limit and may end mid-sentence")
    return answer.text


def vision_prompt(config: Config, hint: str = "") -> tuple[str, str]:
    """The vision stage's system prompt and user message."""
    user = with_hint(render("vision_user"), hint)
    return render("vision_system"), with_no_think(config.vision_model, user)


def describe_image(client: OllamaClient, config: Config, image_base64: str, *, hint: str = "",
                   keep_alive: int | float | str | None = None) -> str:
    """Stage 1: the vision model describes what it sees.

    A refusal or an empty answer is asked again once, with the reason; a looping
    answer is retried once with a repeat penalty, and otherwise cut where it loops.
    """
    system, user = vision_prompt(config, hint)
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": user, "images": [image_base64]},
    ]
    options = sampling(config, "vision", writing=False)
    answer = client.chat(config.vision_model, messages, options=options, keep_alive=keep_alive)
    description = strip_chatter(answer.text)
    problem = vision_problem(description, answer)
    if problem:
        again = messages + [
            {"role": "assistant", "content": answer.text},
            {"role": "user", "content": with_no_think(config.vision_model,
                                                      render("reask_vision", problem=problem))},
        ]
        answer = client.chat(config.vision_model, again, options=options, keep_alive=keep_alive)
        description = strip_chatter(answer.text)
        problem = vision_problem(description, answer)
        if problem:
            raise RefusalError(f"the vision model {config.vision_model} {problem}, twice")
    if has_loop(description):
        retry = client.chat(config.vision_model, messages, keep_alive=keep_alive,
                            options={**options, "repeat_penalty": LOOP_REPEAT_PENALTY})
        retried = strip_chatter(retry.text)
        if retried and not vision_problem(retried, retry) and not has_loop(retried):
            return retried
        description = cut_loop(description)
    return description


LOOP_REPEAT_PENALTY = 1.2


def vision_problem(description: str, answer: Answer) -> str:
    """Why a vision answer cannot be used, or ""."""
    if not description:
        return "gave an empty description" + _ran_out(answer)
    if is_refusal(description):
        return "refused to describe the image"
    return ""


def write_caption(client: OllamaClient, config: Config, spec: CaptionSpec, description: str, *,
                  keep_alive: int | float | str | None = None) -> Caption:
    """Stage 2: the text model rewrites a description as a caption in the chosen style.

    An answer that refuses or is out of range (words, sentences, tags) is asked
    again once with the reason. If the second answer is still out of range, the one
    closer to the range is kept and marked for review; a second refusal fails the image.
    """
    kind = "caption-creative" if spec.creative else "caption"
    request = with_hint(render(caption_template(spec), description=description), spec.hint)
    fmt = TAGS_SCHEMA if spec.style == "tags" and client.supports_structured_output() else None
    answer = ask_text_model(client, config, request, kind, keep_alive=keep_alive, fmt=fmt)
    body, problem = judge_caption(answer, spec)
    if problem:
        again = render("reask", request=request, answer=answer.text[:REASK_ANSWER_CHARS], problem=problem)
        second_body, second_problem = judge_caption(
            ask_text_model(client, config, again, kind, keep_alive=keep_alive, fmt=fmt), spec)
        # The second answer wins unless it is further out of range than the first.
        if not body or second_body and (not second_problem or out_of_range(second_body, spec)
                                        <= out_of_range(body, spec)):
            body, problem = second_body, second_problem
        if not body:
            raise RefusalError(f"the text model {problem}, twice")
    caption = layout_caption(body, trigger=spec.trigger, prefix=spec.prefix)
    review = [problem] if problem else []
    if spec.style == "tags" and estimate_clip_tokens(caption) > CLIP_TOKEN_BUDGET:
        review.append(f"about {estimate_clip_tokens(caption)} CLIP tokens, over the "
                      f"{CLIP_TOKEN_BUDGET}-token budget")
    return Caption(caption, "; ".join(review))


REASK_ANSWER_CHARS = 2000  # a looping answer can be long; the start shows the problem


def judge_caption(answer: Answer, spec: CaptionSpec) -> tuple[str, str]:
    """The cleaned caption body and what is wrong with it; an empty body means unusable."""
    try:
        body = caption_body(answer.text, spec=spec, cut_off=answer.done_reason == "length")
    except RefusalError:
        return "", "refused or gave no usable caption"
    return body, caption_problem(body, style=spec.style, creative=spec.creative)


def check_models(client: OllamaClient, config: Config) -> None:
    """Before captioning, make sure both models are installed and the vision model sees."""
    for model in dict.fromkeys((config.vision_model, config.model)):
        details = client.show(model)
        capabilities = details.get("capabilities")
        # Servers before v0.6.4 do not report capabilities: unknown is not "no vision".
        if model == config.vision_model and capabilities is not None and "vision" not in capabilities:
            raise ModelUnavailable(
                f"the vision model '{model}' cannot see images "
                f"(its capabilities: {', '.join(capabilities) or 'none'})",
                hint="pick a vision model with --vision-model or OLLAMA_VISION_MODEL, "
                     f"e.g. `ollama pull {DEFAULT_VISION_MODEL}`",
            )


def caption_template(spec: CaptionSpec) -> str:
    """The template that writes captions in this style and mood."""
    return f"caption_{spec.style}" + ("_creative" if spec.creative else "")


def check_templates(config: Config, spec: CaptionSpec) -> None:
    """Render every template a caption run needs, so a broken one fails before any model call."""
    vision_prompt(config, "hint")
    render(caption_template(spec), description="")
    render("reask", request="", answer="", problem="")
    render("reask_vision", problem="")


def caption_spec(args: argparse.Namespace) -> CaptionSpec:
    """The caption flags, checked: a trigger is one comma-free chunk, a prefix one line."""
    trigger = (args.trigger or "").strip(" ,")
    prefix = args.prefix or ""
    if "," in trigger:
        raise UsageError(f"--trigger must be one word or phrase without commas, got {args.trigger!r}",
                         hint="put fixed tags that come first in --prefix")
    if "\n" in prefix or "\r" in prefix:
        raise UsageError("--prefix must be a single line: a caption file is one line")
    tag_flags = ("underscores", "exclude_tags", "always_first")
    if args.style != "tags" and any(getattr(args, name) for name in tag_flags):
        raise UsageError("--underscores, --exclude-tags and --always-first shape tags; "
                         "add --style tags")
    return CaptionSpec(style=args.style, creative=args.creative, trigger=trigger, prefix=prefix,
                       hint=one_line(args.hint or ""), underscores=args.underscores,
                       exclude=tag_list(args.exclude_tags), always_first=tag_list(args.always_first))


def tag_list(value: str | None) -> tuple[str, ...]:
    """A comma-separated flag value as a tuple of tags."""
    return tuple(tag.strip() for tag in (value or "").split(",") if tag.strip())


def check_writable(folder: str, *, flag: str = "") -> None:
    """Refuse a folder we cannot write into before any model time is spent."""
    if flag and not os.path.isdir(folder):
        raise UsageError(f"{flag}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        what = f"{flag} files" if flag else "caption files"
        raise UsageError(f"cannot write {what} into {folder} (permission denied)")


def read_text_argument(value: str, what: str) -> str:
    """The text of a positional argument; '-' reads it from standard input."""
    text = sys.stdin.read() if value == "-" else value
    if not text.strip():
        source = "standard input" if value == "-" else f"the {what}"
        raise UsageError(f"{source} is empty; give the {what} to work on")
    return text.strip()


class Product(Record):
    """What a command hands back: text for stdout, and the same as data for --json."""

    text: str | None
    data: dict
    streamed: bool = False  # the text was printed as it arrived
    error: OllamaError | None = None  # the run finished, but this went wrong (printed after it)


def answer_data(answer: Answer, model: str) -> dict:
    """A model answer's numbers for --json: tokens and seconds."""
    return {"model": model, "done_reason": answer.done_reason,
            "prompt_tokens": answer.prompt_eval_count, "answer_tokens": answer.eval_count,
            "total_seconds": round(answer.total_duration / 1e9, 3),
            "load_seconds": round(answer.load_duration / 1e9, 3),
            "answer_seconds": round(answer.eval_duration / 1e9, 3)}


class StreamPrinter:
    """Print an answer on stdout as it arrives, holding back think blocks and a leading preamble."""

    OPEN = lazy_pattern(r"<think(?:ing)?>", re.I)
    CLOSE = lazy_pattern(r"</think(?:ing)?>", re.I)
    LONGEST_TAG = len("</thinking>")

    def __init__(self) -> None:
        self.restart()
        self.shown = False  # text reached stdout: it cannot be taken back

    def restart(self) -> None:
        """Forget what a failed attempt sent but did not show."""
        self.pending = ""  # received, not yet printed
        self.head = ""  # the first line, held until we know it is not a preamble
        self.thinking = False
        self.started = False
        self.last = "\n"

    def feed(self, piece: str) -> None:
        """Take one piece of the answer."""
        self.pending += piece
        while True:
            if self.thinking:
                end = self.CLOSE.search(self.pending)
                if not end:
                    self.pending = self.pending[-self.LONGEST_TAG:]
                    return
                self.pending, self.thinking = self.pending[end.end():], False
                continue
            start = self.OPEN.search(self.pending)
            if start:
                self._emit(self.pending[:start.start()])
                self.pending, self.thinking = self.pending[start.end():], True
                continue
            cut = self.pending.rfind("<")  # a tag may be split across pieces: hold it back
            if cut < 0 or len(self.pending) - cut >= self.LONGEST_TAG or ">" in self.pending[cut:]:
                cut = len(self.pending)
            self._emit(self.pending[:cut])
            self.pending = self.pending[cut:]
            return

    def finish(self) -> None:
        """The answer is complete (or broke off): print what was held back and end the line."""
        if not self.thinking:
            self._emit(self.pending)
        self.pending = ""
        self._start()
        if self.last != "\n":
            self._write("\n")

    def write_now(self, text: str) -> None:
        """Print text of our own (a card's front matter) before or after the answer."""
        self._write(text)

    def _emit(self, text: str) -> None:
        if self.started:
            self._write(text)
            return
        self.head += text
        if "\n" in self.head.lstrip() or len(self.head) > 200:
            self._start()

    def _start(self) -> None:
        if self.started:
            return
        self.started = True
        head = self.head.lstrip()
        for pattern in (_INTERJECTION, _PREAMBLE, _LABEL):
            head = pattern.sub("", head, count=1).lstrip()
        self._write(head)

    def _write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.shown = True
            self.last = text[-1]


def wants_stream(args: argparse.Namespace) -> bool:
    """Stream text to a terminal unless --no-stream; never with --json."""
    if args.json:
        return False
    return sys.stdout.isatty() if args.stream is None else args.stream


def text_command(config: Config, args: argparse.Namespace, request: str, kind: str, clean, *,
                 lead: str = "", stream: bool = True) -> Product:
    """Run a text action: ask, stream or print, and describe it for --json.

    lead is text of our own printed before a streamed answer (a card's front matter).
    """
    printer = StreamPrinter() if stream and wants_stream(args) else None
    if printer and lead:
        printer.write_now(lead)
    try:
        answer = ask_text_model(connect(config), config, request, kind, printer=printer)
    except BaseException:
        if printer and printer.shown:
            printer.finish()  # a broken stream keeps what it showed, on a line of its own
        raise
    if printer:
        printer.finish()
    if is_refusal(strip_chatter(answer.text)):
        raise OllamaError(f"the text model {config.model} refused: {one_line(strip_chatter(answer.text))[:80]}",
                          hint="rephrase the request, or pick another model with --model")
    text = clean(text_result(answer))
    if not text:
        raise empty_answer(config, answer)
    return Product(text, {"command": args.command, "text": text, **answer_data(answer, config.model)},
                   streamed=printer is not None)


def cmd_prompt(config: Config, args: argparse.Namespace) -> Product:
    """Write an image-generation prompt from a concept."""
    concept = read_text_argument(args.concept, "concept")

    def clean(text: str) -> str:
        if args.encoder == "clip":
            return fit_clip_budget(clean_caption_tags(text, underscores=True, keep_weights=True))
        return clean_prose(text)

    # A CLIP prompt is trimmed to its token budget once complete, so it is not streamed.
    return text_command(config, args, render(f"prompt_{args.encoder}", concept=concept), "prompt", clean,
                        stream=args.encoder != "clip")


def fit_clip_budget(tags: list[str]) -> str:
    """Join tags, leaving off the last ones until the line fits CLIP's 75-token budget."""
    tags = [tag for tag in dict.fromkeys(tags) if tag]
    while len(tags) > 1 and estimate_clip_tokens(", ".join(tags)) > CLIP_TOKEN_BUDGET:
        tags.pop()
    return ", ".join(tags)


def cmd_enhance(config: Config, args: argparse.Namespace) -> Product:
    """Rewrite an existing prompt with more detail."""
    prompt = read_text_argument(args.prompt, "prompt")
    product = text_command(config, args, render(f"enhance_{args.intensity}", prompt=prompt),
                           f"enhance-{args.intensity}", clean_prose)
    tokens = estimate_clip_tokens(product.text or "")
    product.data["clip_tokens"] = tokens
    if tokens > CLIP_TOKEN_BUDGET:
        warn(f"about {tokens} CLIP tokens: SDXL and Pony read only the first {CLIP_TOKEN_BUDGET}; "
             "Flux's T5 reads far more")
    return product


def cmd_describe(config: Config, args: argparse.Namespace) -> Product:
    """Write a model card description (Markdown) for a LoRA."""
    name = read_text_argument(args.model_name, "model name")
    lora_type = args.lora_type.strip()
    if not lora_type:
        raise UsageError("--type is empty; say what kind of LoRA it is (character, style, concept, ...)")
    dataset = dataset_facts(args.dataset, trigger=args.trigger or "") if args.dataset else None
    request = render("describe", model_name=name, lora_type=lora_type,
                     tags=(args.tags or "").strip() or "none",
                     dataset=dataset.summary() if dataset else "none")
    head = card_head(name=name, lora_type=lora_type, args=args)
    product = text_command(config, args, request, "describe", strip_chatter, lead=head + "\n\n")
    tail = card_tail(args=args, dataset=dataset)
    card = "\n\n".join([head, product.text or ""] + ([tail] if tail else []))
    if product.streamed and tail:  # the head and body are on screen; the tail follows
        write_product("\n" + tail)
    product.text = product.data["text"] = card
    return product


def cmd_lore(config: Config, args: argparse.Namespace) -> Product:
    """Write creative fiction, a scene, a character profile or world lore."""
    scenario = read_text_argument(args.scenario, "scenario")
    request = render("lore", scenario=scenario, words=LORE_WORDS[args.length])
    return text_command(config, args, request, f"lore-{args.length}", strip_chatter)


class DatasetFacts(Record):
    """What a dataset's captions say, for a model card that tells the truth."""

    images: int
    captioned: int
    top_tags: list[tuple[str, int]]
    samples: list[str]

    def summary(self) -> str:
        """One line of facts for the model card prompt."""
        tags = ", ".join(f"{tag} ({count})" for tag, count in self.top_tags) or "none"
        return (f"{self.images} training images, {self.captioned} with captions; most frequent "
                f"caption tags or phrases: {tags}")


def dataset_facts(folder: str, *, trigger: str = "", top: int = 15, samples: int = 3) -> DatasetFacts:
    """Count a dataset's images and read its captions: frequent tags and a few samples."""
    if not os.path.isdir(folder):
        raise UsageError(f"--dataset {folder} is not a folder")
    images = find_images(folder, recursive=True)
    counts: collections.Counter = collections.Counter()
    captions = []
    for image in images:
        for ext in (CAPTION_EXTENSION, ".caption"):
            try:
                with open(os.path.splitext(image)[0] + ext, encoding="utf-8") as handle:
                    caption = handle.readline().strip()
            except (OSError, UnicodeDecodeError):
                continue
            if caption:
                captions.append(caption)
                counts.update(list(dict.fromkeys(  # each tag once per caption, in caption order
                    chunk.strip().lower() for chunk in caption.split(",")
                    if chunk.strip() and chunk.strip().lower() != trigger.lower()
                    and len(chunk.split()) <= 4)))
                break
    return DatasetFacts(len(images), len(captions), counts.most_common(top), captions[:samples])


def card_head(*, name: str, lora_type: str, args: argparse.Namespace) -> str:
    """A card's YAML front matter (with --base-model, --trigger or --license) and title."""
    parts = []
    if args.base_model or args.trigger or args.license:
        tags = ["text-to-image", "lora", lora_type.lower().replace(" ", "-")]
        tags += [tag.strip() for tag in (args.tags or "").split(",") if tag.strip()]
        front = ["---"]
        if args.base_model:
            front.append(f"base_model: {json.dumps(args.base_model)}")
        if args.trigger:
            front.append(f"instance_prompt: {json.dumps(args.trigger)}")
        front.append("tags:")
        front += [f"- {json.dumps(tag)}" for tag in dict.fromkeys(tags)]
        if args.license:
            front.append(f"license: {json.dumps(args.license)}")
        parts.append("\n".join(front + ["---"]))
    parts.append(f"# {name}")
    return "\n\n".join(parts)


def card_tail(*, args: argparse.Namespace, dataset: DatasetFacts | None) -> str:
    """The sections code writes after the body: trigger words and the training data's facts."""
    parts = []
    if args.trigger:
        parts.append(f"## Trigger words\n\nYou should use `{args.trigger}` to trigger the image generation.")
    if dataset:
        lines = [f"## Training data\n\n{dataset.images} images, {dataset.captioned} of them captioned."]
        if dataset.top_tags:
            lines.append("Most frequent tags: " + ", ".join(f"{tag} ({count})" for tag, count in dataset.top_tags)
                         + ".")
        parts.append("\n\n".join(lines))
        if dataset.samples:
            parts.append("## Example prompts\n\n" + "\n\n".join(f"```\n{sample}\n```"
                                                               for sample in dataset.samples))
    return "\n\n".join(parts)


# -- Batch engine -------------------------------------------------------------
# A folder run: find images, plan a job per image, then for each chunk of pending
# jobs run the vision stage over all of them and then the text stage, with
# --jobs workers per host. Stages never know how they are scheduled.


class BatchOptions(Frozen):
    """How a folder run goes: which files, where captions go, how hard to push."""

    overwrite: bool = False
    recursive: bool = False
    ext: str = CAPTION_EXTENSION
    output_dir: str | None = None
    limit: int | None = None
    dry_run: bool = False
    chunk: int = DEFAULT_CHUNK
    jobs: int = 1
    keep_alive: int | float | str = DEFAULT_KEEP_ALIVE
    release_models: bool = True
    cache_dir: str | None = None
    use_cache: bool = True
    quiet: bool = False
    report: str | None = None
    manifest: str | None = None


class Job(Record):
    """One image of a folder run and where it stands."""

    image: str
    name: str  # relative to the dataset folder, with / separators
    caption_file: str
    status: str = "pending"  # pending, described, written, skipped, failed, later
    reason: str = ""
    description: str = ""
    cached: bool = False  # the description came from the cache, not the vision model
    review: str = ""  # why a person should look at the written caption


FINAL = ("written", "skipped", "failed")


def find_images(folder: str, *, recursive: bool = False) -> list[str]:
    """Image files in folder, sorted by path; hidden files and folders are left out.

    Symlinked folders are not entered, so a run never leaves the dataset or loops;
    a dangling link is listed, to be reported as unreadable.
    """
    found = []
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as exc:
        raise UsageError(f"cannot read the folder {folder} ({exc.strerror or exc})") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                found.extend(find_images(entry.path, recursive=True))
        elif (entry.is_file() or entry.is_symlink() and not entry.is_dir()) \
                and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            found.append(entry.path)
    return found


def caption_path(image: str, *, folder: str = "", options: BatchOptions | None = None) -> str:
    """Where an image's caption goes: beside it, or mirrored under --output-dir."""
    options = options or BatchOptions()
    stem = os.path.splitext(image)[0]
    if options.output_dir:
        stem = os.path.join(options.output_dir, os.path.relpath(stem, folder))
    return stem + options.ext


def plan_jobs(folder: str, images: list[str], options: BatchOptions) -> list[Job]:
    """One job per image; an existing caption is skipped unless --overwrite."""
    jobs = []
    owners: dict[str, str] = {}
    for image in images:
        name = os.path.relpath(image, folder).replace(os.sep, "/")
        job = Job(image, name, caption_path(image, folder=folder, options=options))
        if job.caption_file in owners:
            job.status = "failed"
            job.reason = (f"shares its caption file {os.path.basename(job.caption_file)} "
                          f"with {owners[job.caption_file]}")
        elif os.path.exists(job.caption_file) and not options.overwrite:
            job.status, job.reason = "skipped", "caption exists"
        owners.setdefault(job.caption_file, name)
        jobs.append(job)
    return jobs


def write_text_atomically(path: str, text: str) -> None:
    """Write a UTF-8 file whole or not at all: a temp file in the same folder, then os.replace."""
    import tempfile

    folder = os.path.dirname(path) or "."
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".ollama-generate-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def write_caption_file(path: str, caption: str) -> None:
    """Write one caption line atomically; never an empty file."""
    line = one_line(caption)
    if not line:
        raise ImageError("refusing to write an empty caption")
    write_text_atomically(path, line + "\n")


def _umask() -> int:
    """The process umask (read by setting it, then putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class DescriptionCache:
    """Vision descriptions kept on disk the moment they arrive, one JSON line each.

    Keyed by the image's content, the vision model and the vision prompt, so a
    rerun, a restyle or a moved file reuses them. A line cut short by a crash is
    ignored on reading and ended before the next one is appended.
    """

    FILENAME = "descriptions.jsonl"

    def __init__(self, folder: str) -> None:
        import threading

        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, self.FILENAME)
        self._file = open(self.path, "a+b")  # noqa: SIM115 - held open for the run
        self._lock = threading.Lock()
        self._where: dict[str, tuple[int, int]] = {}  # key -> (offset, length): no text in memory
        self._file.seek(0)
        offset = 0
        for line in self._file:
            try:
                if line.endswith(b"\n"):
                    self._where[str(json.loads(line)["key"])] = (offset, len(line))
            except (ValueError, KeyError, TypeError):
                pass  # a torn or foreign line
            offset += len(line)

    @staticmethod
    def key(image_sha256: str, model: str, prompt_sha256: str) -> str:
        """The cache key of one description."""
        import hashlib

        return hashlib.sha256(f"{image_sha256}\0{model}\0{prompt_sha256}".encode()).hexdigest()

    def get(self, key: str) -> str | None:
        """The stored description, or None."""
        with self._lock:
            where = self._where.get(key)
            if where is None:
                return None
            self._file.seek(where[0])
            return str(json.loads(self._file.read(where[1]))["description"])

    def put(self, key: str, record: dict) -> None:
        """Append one description and make it durable before going on."""
        line = (json.dumps({"key": key, **record}, ensure_ascii=False) + "\n").encode()
        with self._lock:
            end = self._file.seek(0, os.SEEK_END)
            if end:
                self._file.seek(end - 1)
                if self._file.read(1) != b"\n":  # a torn last line: end it first
                    self._file.write(b"\n")
                    end += 1
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._where[key] = (end, len(line))

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class Host(Record):
    """One Ollama server of a folder run."""

    client: OllamaClient
    dropped: str = ""  # why it left the run, if it did
    failures: int = 0  # images it failed in a row with server errors (see HOST_FAILURE_LIMIT)
    failing: bool = False  # it left the run for those failures, not for being unreachable


class Report(Record):
    """What a folder run did; the summary, --report and --json render it."""

    folder: str
    jobs: list[Job] = []  # a fresh copy for each report (Record copies list defaults)
    hosts: list[Host] = []
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def cached(self) -> int:
        """Descriptions taken from the cache instead of the vision model."""
        return sum(1 for job in self.jobs if job.cached)

    def count(self, status: str) -> int:
        """How many images ended with this status."""
        return sum(1 for job in self.jobs if job.status == status)

    @property
    def failed(self) -> list[Job]:
        return [job for job in self.jobs if job.status == "failed"]

    @property
    def needs_review(self) -> list[Job]:
        return [job for job in self.jobs if job.status == "written" and job.review]

    @property
    def images_per_minute(self) -> float:
        return images_per_minute(self.count("written"), self.seconds)

    def as_dict(self) -> dict:
        """The report as JSON-ready data (--report)."""
        return {
            "folder": self.folder,
            "total": len(self.jobs),
            "written": self.count("written"),
            "skipped": self.count("skipped"),
            "failed": [{"image": job.name, "reason": job.reason} for job in self.failed],
            "needs_review": [{"image": job.name, "reason": job.review} for job in self.needs_review],
            "not_reached": sum(1 for job in self.jobs if job.status not in (*FINAL, "later")),
            "later": self.count("later"),
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3),
            "images_per_minute": round(self.images_per_minute, 2),
            "cached_descriptions": self.cached,
            "model_calls": sum(host.client.calls for host in self.hosts),
            "model_loads": sum(host.client.loads_seen for host in self.hosts),
            "hosts": [{"url": host.client.host, "model_calls": host.client.calls,
                       "model_loads": host.client.loads_seen, "dropped": host.dropped or None}
                      for host in self.hosts],
        }


def images_per_minute(written: int, seconds: float) -> float:
    """A run's speed, the same on the live line and in the summary: captions written per
    minute of wall time."""
    return written * 60 / seconds if seconds > 0 else 0.0


def format_duration(seconds: float) -> str:
    """Seconds as a short human duration.

    >>> format_duration(75.4)
    '1m 15s'
    >>> format_duration(3.21)
    '3.2s'
    """
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m {secs}s" if hours else f"{minutes}m {secs}s"


class Progress:
    """Progress on stderr: a live line on a terminal, a line per image otherwise, or nothing."""

    def __init__(self, total: int, *, mode: str) -> None:
        import threading

        self.mode = mode  # "live", "lines" or "quiet"
        self.total = total  # images this run works on
        self.finished = 0
        self.counts = collections.Counter()
        self.steps_done = 0
        self.steps_total = 2 * total
        self.stage_name = ""
        self.stage_done = 0
        self.stage_total = 0
        self.started = time.monotonic()
        self._drawn = 0.0
        self._lock = threading.Lock()

    def stage(self, name: str, count: int) -> None:
        """A stage starts over count images."""
        with self._lock:
            self.stage_name, self.stage_done, self.stage_total = name, 0, count
            self._draw(force=True)

    def advance(self, job: Job) -> None:
        """One step of one image is done; print it if the image is finished."""
        with self._lock:
            self.steps_done += 1
            self.stage_done += 1
            if job.status in FINAL:
                if self.stage_name == "vision":
                    self.steps_done += 1  # skipped or failed early: it takes no text step
                self.finished += 1
                self.counts[job.status] += 1
                if self.mode == "lines":
                    outcome = "written" if job.status == "written" else f"{job.status}: {job.reason}" \
                        if job.status == "failed" else f"skipped ({job.reason})"
                    print(f"[{self.finished}/{self.total}] {job.name}: {outcome}", file=sys.stderr,
                          flush=True)
            self._draw()

    def note(self, message: str) -> None:
        """A warning in the middle of a run, above the live line."""
        with self._lock:
            self._clear()
            warn(message)
            self._draw(force=True)

    def close(self) -> None:
        """Take the live line away before the summary."""
        with self._lock:
            self._clear()

    def line(self) -> str:
        """The live line: stage, done/total, skipped, failed, captions written per minute, ETA."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.steps_done / elapsed  # model steps per second, two per image: for the ETA
        left = self.steps_total - self.steps_done
        eta = format_duration(left / rate) if rate > 0 and self.steps_done else "?"
        return (f"{self.stage_name} {self.stage_done}/{self.stage_total} | "
                f"{self.counts['written']} written, {self.counts['skipped']} skipped, "
                f"{self.counts['failed']} failed of {self.total} | "
                f"{images_per_minute(self.counts['written'], elapsed):.1f} written/min | ETA {eta}")

    def _draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.mode != "live" or not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        sys.stderr.write("\r\x1b[K" + self.line()[: shutil_columns() - 1])
        sys.stderr.flush()

    def _clear(self) -> None:
        if self.mode == "live":
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def shutil_columns() -> int:
    """The terminal's width."""
    import shutil

    return shutil.get_terminal_size().columns


def progress_mode(options: BatchOptions) -> str:
    """Live on a terminal, plain lines in a log, nothing with --quiet."""
    if options.quiet:
        return "quiet"
    return "live" if sys.stderr.isatty() else "lines"


HOST_DOWN = (ServerUnreachable, ServerTimeout)


def run_stage(hosts: list[Host], jobs: list[Job], step, *, workers: int, progress: Progress) -> None:
    """Run step(client, job) over jobs with `workers` threads per live host.

    A host that stops answering gives its job back and leaves the run; so does one
    that failed HOST_FAILURE_LIMIT images in a row with server errors. An image that
    a host failed that way goes to another live host, and fails only once every live
    host failed it. Raises ServerUnreachable, or ServerFailing, when no host is left.
    """
    import threading

    queue = collections.deque(jobs)
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    failed_on: dict[int, set[str]] = {}  # id(job) -> hosts that failed it with a server error
    last_error: dict[int, str] = {}

    def live_urls() -> set[str]:
        return {host.client.host for host in hosts if not host.dropped}

    def take(host: Host) -> Job | None:
        for index, job in enumerate(queue):
            if host.client.host not in failed_on.get(id(job), ()):
                del queue[index]
                return job
        return None

    def drop(host: Host, reason: str) -> None:
        if len(hosts) > 1:  # with one server, the run's own error says it all
            progress.note(f"leaving out {host.client.host} for the rest of the run: {reason}")

    def work(host: Host) -> None:
        while not stop.is_set():
            with lock:
                job = None if host.dropped else take(host)
                if job is None:
                    return
            try:
                step(host.client, job)
            except HOST_DOWN as exc:
                with lock:
                    queue.appendleft(job)
                    if host.dropped:
                        return
                    host.dropped = str(exc)
                drop(host, str(exc))
                return
            except TransientError as exc:  # a server error, after the client's retries
                with lock:
                    host.failures += 1
                    failed_on.setdefault(id(job), set()).add(host.client.host)
                    last_error[id(job)] = str(exc)
                    if host.failures >= HOST_FAILURE_LIMIT and not host.dropped:
                        host.dropped = f"failed {host.failures} images in a row, the last with: {exc}"
                        host.failing = True
                        queue.appendleft(job)
                        reason = host.dropped
                    elif live_urls() - failed_on[id(job)]:
                        queue.append(job)  # another live host has not tried it
                        continue
                    else:
                        job.status, job.reason, reason = "failed", str(exc), ""
                if reason:
                    drop(host, reason)
                    return
            except BaseException as exc:  # noqa: BLE001 - fatal errors and Ctrl-C end the run
                errors.append(exc)
                stop.set()
                return
            else:
                with lock:
                    host.failures = 0
            progress.advance(job)

    while queue:
        live = live_urls()
        for job in [job for job in queue if live and failed_on.get(id(job), set()) >= live]:
            queue.remove(job)  # every host left has failed it
            job.status, job.reason = "failed", last_error[id(job)]
            progress.advance(job)
        if not live:
            reasons = "; ".join(f"{host.client.host}: {host.dropped}" for host in hosts)
            if any(host.failing for host in hosts):
                raise ServerFailing(
                    f"no Ollama server is left to work on ({reasons})",
                    hint="check the server's log (`journalctl -u ollama`, or the terminal running "
                         "`ollama serve`), then rerun the same command: finished work is kept",
                )
            raise ServerUnreachable(
                f"no Ollama server is left to work on ({reasons})",
                hint="start the servers again and rerun the same command: finished work is kept",
            )
        if not queue:
            break
        threads = [threading.Thread(target=work, args=(host,), daemon=True)
                   for host in hosts if not host.dropped for _ in range(workers)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.1)
        except KeyboardInterrupt:
            stop.set()
            raise
        if errors:
            raise errors[0]


class failing_job:  # noqa: N801 - used as a context manager, named like contextlib's
    """Turn a problem with one image into a failed job; let run-wide problems through."""

    def __init__(self, job: Job, writes: str) -> None:
        self.job, self.writes = job, writes

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, traceback) -> bool:
        if exc is None or isinstance(exc, (TransientError, *HOST_DOWN, *FATAL_ERRORS)) \
                or not isinstance(exc, Exception):
            return False  # server errors are the engine's to judge (run_stage)
        if isinstance(exc, OllamaError):
            self.job.status, self.job.reason = "failed", str(exc)
        elif isinstance(exc, OSError):
            self.job.status, self.job.reason = "failed", f"cannot write {self.writes} ({exc.strerror or exc})"
        else:
            return False
        return True


class CaptionRun:
    """One folder run: settings, cache and the two stages; the report holds its jobs and hosts."""

    def __init__(self, config: Config, spec: CaptionSpec, options: BatchOptions, report: Report,
                 cache: DescriptionCache) -> None:
        import hashlib
        import threading

        self.config = config
        self.spec = spec
        self.options = options
        self.report = report
        self.cache = cache
        system, user = vision_prompt(config, spec.hint)
        self.prompt_sha256 = hashlib.sha256(f"{system}\0{user}".encode()).hexdigest()
        # Held while a caption file is written, so Ctrl-C never cuts one short.
        self.write_lock = threading.Lock()

    def vision_step(self, client: OllamaClient, job: Job) -> None:
        """Describe one image, from the cache when an answer was received before."""
        if self._taken(job, "caption exists"):
            return
        import base64
        import hashlib

        with failing_job(job, "the description cache"):
            sniff_image(job.image)
            data = read_image(job.image)
            key = DescriptionCache.key(hashlib.sha256(data).hexdigest(), self.config.vision_model,
                                       self.prompt_sha256)
            cached = self.cache.get(key) if self.options.use_cache else None
            if cached:
                job.description, job.cached = cached, True
            else:
                job.description = describe_image(
                    client, self.config, base64.b64encode(data).decode("ascii"),
                    hint=self.spec.hint, keep_alive=self.options.keep_alive)
                self.cache.put(key, {"image": job.name, "model": self.config.vision_model,
                                     "description": job.description})
            job.status = "described"

    def text_step(self, client: OllamaClient, job: Job) -> None:
        """Write one caption from its description."""
        if self._taken(job, "caption appeared during the run; kept it"):
            return
        with failing_job(job, job.caption_file):
            caption = write_caption(client, self.config, self.spec, job.description,
                                    keep_alive=self.options.keep_alive)
            with self.write_lock:
                if self._taken(job, "caption appeared during the run; kept it"):
                    return
                os.makedirs(os.path.dirname(job.caption_file) or ".", exist_ok=True)
                write_caption_file(job.caption_file, caption.text)
            job.status, job.review = "written", caption.review
        # Done with it either way (a job handed to another server keeps it): the
        # description is in the cache, and memory stays flat over a long run.
        job.description = ""

    def _taken(self, job: Job, reason: str) -> bool:
        """Skip an image whose caption another run (or the user) wrote meanwhile."""
        if not self.options.overwrite and os.path.exists(job.caption_file):
            job.status, job.reason = "skipped", reason
            return True
        return False

    def run(self) -> Report:
        """Caption the pending jobs chunk by chunk: all vision, then all text."""
        report = self.report
        jobs = report.jobs
        pending = take_pending(jobs, self.options.limit)
        progress = Progress(len(pending), mode=progress_mode(self.options))
        planned_skips = sum(1 for job in jobs if job.status == "skipped")
        if planned_skips and progress.mode == "lines":
            print(f"Skipping {planned_skips} images that already have captions "
                  "(--overwrite redoes them).", file=sys.stderr, flush=True)
        for job in jobs:
            if job.status == "failed" and progress.mode == "lines":
                print(f"{job.name}: failed: {job.reason}", file=sys.stderr, flush=True)
        started = progress.started  # the live line and the summary time the same run
        workers = self.options.jobs
        try:
            for first in range(0, len(pending), self.options.chunk):
                chunk = pending[first:first + self.options.chunk]
                progress.stage("vision", len(chunk))
                run_stage(report.hosts, chunk, self.vision_step, workers=workers, progress=progress)
                described = [job for job in chunk if job.status == "described"]
                progress.stage("text", len(described))
                run_stage(report.hosts, described, self.text_step, workers=workers, progress=progress)
        except (KeyboardInterrupt, *FATAL_ERRORS):
            self.write_lock.acquire(timeout=10)  # let a caption being written finish, start no other
            report.interrupted = True
            raise
        finally:
            report.seconds = time.monotonic() - started
            progress.close()
        return report


def read_image(path: str) -> bytes:
    """An image's bytes."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ImageError(f"cannot read the file ({exc.strerror or exc})") from None


def connect_hosts(config: Config) -> list[Host]:
    """Check every server for both models; leave out (as dropped) those that cannot work.

    Raises the first server's problem when none can work.
    """
    hosts, problems = [], []
    for url in config.hosts:
        host = Host(connect(config, url))
        try:
            check_models(host.client, config)
        except OllamaError as exc:  # any server that cannot be checked is left out
            problems.append(exc)
            host.dropped = str(exc)
            if len(config.hosts) > 1:
                warn(f"leaving out {url}: {exc}")
        hosts.append(host)
    if len(problems) == len(hosts):
        raise problems[0]
    return hosts


def release_models(hosts: list[Host], models: Sequence[str]) -> None:
    """After a run, let Ollama unload our models on its usual schedule again."""
    wanted = {with_tag(model) for model in models}
    for host in hosts:
        if host.dropped:
            continue
        host.client.timeout = min(host.client.timeout, RELEASE_TIMEOUT)  # never hold up the exit
        try:
            for name in host.client.loaded_models():
                if with_tag(name) in wanted:
                    host.client.set_keep_alive(name, RELEASE_KEEP_ALIVE)
        except OllamaError:
            pass  # best effort: the models unload when Ollama next needs the memory


def with_tag(model: str) -> str:
    """A model name with its tag, as Ollama lists it.

    >>> with_tag("llava"), with_tag("qwen3-vl:32b")
    ('llava:latest', 'qwen3-vl:32b')
    """
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


def print_summary(report: Report, *, quiet: bool = False) -> None:
    """The end-of-run summary on stderr: counts, speed, loads, then each failure with its reason."""
    not_reached = sum(1 for job in report.jobs if job.status not in FINAL and job.status != "later")
    later = report.count("later")
    if not quiet or report.failed or report.interrupted:
        head = "Stopped" if report.interrupted else "Done"
        print(f"{head} after {format_duration(report.seconds)}: {report.count('written')} written, "
              f"{report.count('skipped')} skipped, {len(report.failed)} failed"
              + (f", {not_reached} not reached" if not_reached else "")
              + (f", {later} left for later" if later else "")
              + f" (of {len(report.jobs)} images).", file=sys.stderr)
        calls = sum(host.client.calls for host in report.hosts)
        loads = sum(host.client.loads_seen for host in report.hosts)
        print(f"{report.images_per_minute:.1f} images/min; {calls} model calls, "
              f"{report.cached} descriptions from the cache, {loads} model loads seen.",
              file=sys.stderr)
    if report.needs_review and not quiet:
        print(f"Needs review ({len(report.needs_review)}, written but out of range):", file=sys.stderr)
        for job in report.needs_review:
            print(f"  {job.name}: {job.review}", file=sys.stderr)
    if report.failed:
        print("Failed:", file=sys.stderr)
        for job in report.failed:
            print(f"  {job.name}: {job.reason}", file=sys.stderr)
    sys.stderr.flush()


def write_manifest(path: str, report: Report) -> int:
    """Write a Hugging Face imagefolder metadata.jsonl of every captioned image; return the count."""
    base = os.path.dirname(os.path.abspath(path))
    lines = []
    for job in report.jobs:
        try:
            with open(job.caption_file, encoding="utf-8") as handle:
                text = handle.readline().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if text:
            name = os.path.relpath(os.path.abspath(job.image), base).replace(os.sep, "/")
            lines.append(json.dumps({"file_name": name, "text": text}, ensure_ascii=False))
    write_text_atomically(path, "".join(line + "\n" for line in lines))
    return len(lines)


def take_pending(jobs: list[Job], limit: int | None) -> list[Job]:
    """The pending jobs this run works on.

    With --limit, the first `limit` that are real images (checked now, so a broken
    file does not use up a place); the rest wait for a later run.
    """
    pending = [job for job in jobs if job.status == "pending"]
    if limit is None:
        return pending
    taken = []
    for job in pending:
        if len(taken) == limit:
            job.status, job.reason = "later", f"beyond --limit {limit}"
            continue
        try:
            sniff_image(job.image)
        except ImageError as exc:
            job.status, job.reason = "failed", str(exc)
            continue
        taken.append(job)
    return taken


def dry_run(jobs: list[Job], options: BatchOptions) -> str:
    """What a run would do, one line per image, without any model call."""
    for job in take_pending(jobs, options.limit):
        try:
            sniff_image(job.image)
        except ImageError as exc:
            job.status, job.reason = "failed", str(exc)
    verbs = {"pending": "caption", "skipped": "skip", "failed": "fail", "later": "later"}
    return "\n".join(
        f"caption: {job.name} -> {job.caption_file}" if job.status == "pending"
        else f"{verbs[job.status]}: {job.name} ({job.reason})"
        for job in jobs)


def batch_options(args: argparse.Namespace, folder: str) -> BatchOptions:
    """The folder-run flags, checked."""
    ext = args.ext if args.ext.startswith(".") else "." + args.ext
    if len(ext) < 2 or "/" in ext or os.sep in ext or ext.lower() in IMAGE_EXTENSIONS:
        raise UsageError(f"--ext {args.ext!r} is not a caption extension",
                         hint="use .txt (the default) or .caption")
    output_dir = os.path.abspath(args.output_dir) if args.output_dir else None
    return BatchOptions(
        overwrite=args.overwrite, recursive=args.recursive, ext=ext, output_dir=output_dir,
        limit=args.limit, dry_run=args.dry_run, chunk=args.chunk, jobs=args.jobs,
        keep_alive=DEFAULT_KEEP_ALIVE if args.keep_alive is None else args.keep_alive,
        release_models=args.keep_alive is None, cache_dir=args.cache_dir,
        use_cache=not args.no_cache, quiet=args.quiet, report=args.report, manifest=args.manifest,
    )


# Folder-run flags and their defaults: a single file refuses any other value.
FOLDER_ONLY = {"recursive": False, "output_dir": None, "limit": None, "dry_run": False,
               "manifest": None, "report": None, "cache_dir": None, "no_cache": False,
               "ext": CAPTION_EXTENSION, "jobs": 1, "chunk": DEFAULT_CHUNK, "keep_alive": None,
               "quiet": False}


def caption_folder(config: Config, spec: CaptionSpec, folder: str, options: BatchOptions) -> Product:
    """Caption a folder: plan, check, run, report."""
    images = find_images(folder, recursive=options.recursive)
    if not images:
        raise UsageError(f"{folder} has no images ({', '.join(IMAGE_EXTENSIONS)})"
                         + ("" if options.recursive else "; --recursive looks in subfolders"))
    jobs = plan_jobs(folder, images, options)
    if options.dry_run:
        listing = dry_run(jobs, options)
        counts = collections.Counter(line.split(":", 1)[0] for line in listing.splitlines())
        print(f"Dry run: {counts['caption']} to caption, {counts['skip']} skipped, "
              f"{counts['fail']} failing, {counts['later']} left for later (of {len(jobs)} images); "
              "no model was called.", file=sys.stderr)
        actions = {"pending": "caption", "skipped": "skip", "failed": "fail", "later": "later"}
        return Product(listing, {"command": "caption", "dry_run": [
            {"image": job.name, "action": actions[job.status], "caption_file": job.caption_file,
             "reason": job.reason or None} for job in jobs]})
    target = options.output_dir or folder
    make_folder(target, "--output-dir" if options.output_dir else "the folder")
    check_writable(target)
    for flag, path in (("--report", options.report), ("--manifest", options.manifest)):
        if path:
            check_writable(os.path.dirname(os.path.abspath(path)), flag=flag)
    check_templates(config, spec)
    report = Report(folder=folder, jobs=jobs)
    try:
        report.hosts = connect_hosts(config)
    except OllamaError:
        report.interrupted = True
        finish_report(report, options)
        raise
    cache_folder = options.cache_dir or os.path.join(target, CACHE_FOLDER)
    make_folder(cache_folder, "--cache-dir" if options.cache_dir else "the cache folder")
    cache = DescriptionCache(cache_folder)
    try:
        CaptionRun(config, spec, options, report, cache).run()
    except (KeyboardInterrupt, OllamaError) as exc:
        print_summary(report)
        finish_report(report, options)
        exc.report = report.as_dict()  # --json prints it with the error
        raise
    finally:
        cache.close()
        if options.release_models:
            release_models(report.hosts, [config.vision_model, config.model])
    print_summary(report, quiet=options.quiet)
    finish_report(report, options)
    product = Product(None, {"command": "caption", **report.as_dict()})
    if report.failed:
        product.error = BatchFailed(
            f"{len(report.failed)} of {len(report.jobs)} images failed",
            hint="fix or remove them and run the same command again; finished captions are kept",
        )
    return product


def finish_report(report: Report, options: BatchOptions) -> None:
    """Write --report and --manifest, also after a run that stopped early."""
    try:
        if options.report:
            write_text_atomically(options.report, json_document(report.as_dict(), ensure_ascii=True) + "\n")
        if options.manifest:
            write_manifest(options.manifest, report)
    except OSError as exc:  # the captions are written; say so rather than hide the run's outcome
        warn(f"cannot write {exc.filename or 'the report'} ({exc.strerror or exc})")


def make_folder(path: str, what: str) -> None:
    """Create a folder a run writes into, or refuse the run before any model call."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be used as a folder ({exc.strerror or exc})") from None


def cmd_caption(config: Config, args: argparse.Namespace) -> Product:
    """Caption one image (printed) or every image in a folder (written beside each)."""
    spec = caption_spec(args)
    path = args.path
    if not os.path.exists(path):
        raise UsageError(f"{path} does not exist")
    if os.path.isdir(path):
        return caption_folder(config, spec, path, batch_options(args, path))
    for name, default in FOLDER_ONLY.items():
        if getattr(args, name) != default:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} works on a folder, and {path} is a file")
    import base64

    sniff_image(path)
    check_templates(config, spec)
    client = connect(config)
    client.record = []
    check_models(client, config)
    image = base64.b64encode(read_image(path)).decode("ascii")
    description = describe_image(client, config, image, hint=spec.hint)
    caption = write_caption(client, config, spec, description)
    if caption.review:
        warn(f"needs review: {caption.review}")
    return Product(caption.text, {
        "command": "caption", "image": path, "style": spec.style, "creative": spec.creative,
        "text": caption.text, "description": description, "needs_review": caption.review or None,
        "vision_model": config.vision_model, "model": config.model,
        "requests": [answer_data(answer, model) for model, answer in client.record]})


# -- Diagnostics: doctor, models, templates ----------------------------------


class Check(Record):
    """One doctor finding."""

    name: str
    status: str  # ok, fail, note
    detail: str
    fix: str = ""
    exit_code: int = 1


def doctor_checks(config: Config) -> list[Check]:
    """Everything a caption run needs, checked without generating anything."""
    checks: list[Check] = []
    for url in config.hosts:
        client = connect(config, url)
        try:
            version = ".".join(map(str, client.version())) or "unknown"
            client.loaded_models()  # /api/version may be absent on old servers; this must answer
        except ServerUnreachable as exc:
            checks.append(Check("server", "fail", str(exc),
                                "start it with `ollama serve`, or set OLLAMA_HOST (or --host) to where it runs",
                                exit_code=3))
            continue
        except OllamaError as exc:
            checks.append(Check("server", "fail", str(exc), "check OLLAMA_HOST", exit_code=1))
            continue
        checks.append(Check("server", "ok", f"Ollama {version} at {url}"))
        for role, model in (("vision model", config.vision_model), ("text model", config.model)):
            checks.extend(model_checks(client, role, model))
    checks.append(template_check())
    return checks


def model_checks(client: OllamaClient, role: str, model: str) -> list[Check]:
    """Is the model installed, can the vision model see, and does the model think?"""
    try:
        details = client.show(model)
    except ModelUnavailable:
        return [Check(role, "fail", f"{model} is not installed on {client.host}",
                      f"ollama pull {model}", exit_code=4)]
    capabilities = details.get("capabilities")
    checks = [Check(role, "ok", f"{model} is installed ({', '.join(capabilities or ['capabilities unknown'])})")]
    if role == "vision model" and capabilities is not None and "vision" not in capabilities:
        checks.append(Check(role, "fail", f"{model} cannot see images",
                            f"ollama pull {DEFAULT_VISION_MODEL}, then use it with --vision-model",
                            exit_code=4))
    if capabilities and "thinking" in capabilities:
        checks.append(Check(role, "note", f"{model} thinks; every request sends think:false"
                            + (" and /no_think" if model_thinks_by_prompt(model) else "")
                            + ", and think blocks are stripped"))
    return checks


def template_check() -> Check:
    """Every template renders: no missing or unknown placeholders, and none missing."""
    problems = []
    for name, fields in TEMPLATE_FIELDS.items():
        try:
            render(name, **{field: "x" for field in fields})
        except TemplateError as exc:
            problems.append(str(exc))
    where = f" (with overrides from {PROMPTS_OVERRIDE})" if PROMPTS_OVERRIDE else ""
    if problems:
        return Check("templates", "fail", "; ".join(problems), "fix the placeholders, or remove the override")
    return Check("templates", "ok", f"all {len(TEMPLATE_FIELDS)} templates are complete{where}")


def cmd_doctor(config: Config, args: argparse.Namespace) -> Product:
    """Check the server, the models and the templates a caption run needs."""
    checks = doctor_checks(config)
    failed = [check for check in checks if check.status == "fail"]
    marks = {"ok": paint("ok  ", GREEN, sys.stdout), "fail": paint("FAIL", RED, sys.stdout), "note": "note"}
    lines = []
    for check in checks:
        lines.append(f"{marks[check.status]}  {check.name}: {check.detail}")
        if check.fix:
            lines.append(f"      fix: {check.fix}")
    lines.append("A caption run would work." if not failed else
                 f"{len(failed)} problem{'s' if len(failed) > 1 else ''} to fix before a caption run.")
    product = Product("\n".join(lines), {"command": "doctor", "ok": not failed, "checks": [
        {"name": c.name, "status": c.status, "detail": c.detail, "fix": c.fix or None} for c in checks]})
    if failed:
        product.error = OllamaError(f"{len(failed)} check{'s' if len(failed) > 1 else ''} failed; see above")
        product.error.exit_code = failed[0].exit_code
    return product


def cmd_models(config: Config, args: argparse.Namespace) -> Product:
    """List the installed models, marking the configured text and vision models."""
    client = connect(config)
    listed = client.tags()
    configured = {with_tag(config.model): "text", with_tag(config.vision_model): "vision"}
    if with_tag(config.model) == with_tag(config.vision_model):
        configured[with_tag(config.model)] = "text+vision"
    rows = []
    for entry in listed:
        name = str(entry.get("name") or entry.get("model"))
        details = entry.get("details") or {}
        capabilities = entry.get("capabilities")
        if capabilities is None:  # /api/tags lists capabilities from Ollama v0.30 on
            capabilities = client.show(name).get("capabilities")
        rows.append({"name": name, "size": int(entry.get("size") or 0), "family": details.get("family", ""),
                     "parameter_size": details.get("parameter_size", ""),
                     "quantization_level": details.get("quantization_level", ""),
                     "capabilities": capabilities, "configured_as": configured.get(with_tag(name))})
    missing = [{"name": name, "configured_as": role} for name, role in configured.items()
               if name not in {with_tag(row["name"]) for row in rows}]
    table = [("NAME", "SIZE", "FAMILY", "PARAMS", "QUANT", "CAPABILITIES", "USED AS")]
    for row in rows:
        table.append((row["name"], format_size(row["size"]), row["family"], row["parameter_size"],
                      row["quantization_level"], ",".join(row["capabilities"] or ["?"]),
                      row["configured_as"] or ""))
    widths = [max(len(cells[n]) for cells in table) for n in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip() for cells in table]
    for entry in missing:
        lines.append(f"{entry['configured_as']} model {entry['name']} is not installed: "
                     f"ollama pull {entry['name']}")
    return Product("\n".join(lines), {"command": "models", "models": rows, "missing": missing})


def format_size(size: int) -> str:
    """Bytes as Ollama shows them.

    >>> format_size(5_225_388_164), format_size(0)
    ('5.2 GB', '-')
    """
    if not size:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""  # pragma: no cover - the loop returns at TB


def cmd_templates(config: Config, args: argparse.Namespace) -> Product:
    """List the prompt templates with their placeholders, or print one."""
    if args.name:
        name = args.name.removesuffix(".txt")
        if name not in TEMPLATE_FIELDS:
            raise UsageError(f"there is no template {args.name!r}",
                             hint="`ollama-generate templates` lists them")
        path, text = load_template(name)
        return Product(text.rstrip("\n"), {"command": "templates", "name": name, "path": path,
                                           "placeholders": list(TEMPLATE_FIELDS[name]), "text": text})
    rows = []
    for name, fields in TEMPLATE_FIELDS.items():
        path = load_template(name)[0]
        source = "override" if PROMPTS_OVERRIDE and os.path.dirname(os.path.abspath(path)) == PROMPTS_OVERRIDE \
            else "built-in"
        problem = None
        if source == "override":  # checked as doctor checks it: it must render
            try:
                render(name, **{field: "x" for field in fields})
            except TemplateError as exc:
                problem = str(exc)
        rows.append({"name": name, "placeholders": list(fields), "path": path, "source": source,
                     "problem": problem})
    width = max(len(row["name"]) for row in rows)
    lines = [f"{row['name']:<{width}}  {' '.join('$' + f for f in row['placeholders']) or '-':<40}  {row['source']}"
             + (" (BROKEN)" if row["problem"] else "") for row in rows]
    product = Product("\n".join(lines), {"command": "templates", "templates": rows})
    broken = [row["problem"] for row in rows if row["problem"]]
    if broken:
        product.error = TemplateError(
            f"{len(broken)} template override{'s' if len(broken) > 1 else ''} cannot be used: "
            + "; ".join(broken),
            hint="fix the placeholders, or remove the file to use the built-in template")
    return product


# -- Command-line interface ---------------------------------------------------


def number_type(convert, expected: str, low: float, rule: str, high: float = math.inf):
    """An argparse type: convert the value, then hold it to its range (rule names the lower
    bound); inf and nan are never numbers here."""
    def parse(value: str):
        try:
            number = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        if not (number > low if rule.startswith("more than") else number >= low):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value!r}")
        if number > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value!r}")
        return number

    return parse


positive_int = number_type(int, "a whole number", 1, "1 or more")
timeout_seconds = number_type(float, "a number of seconds", 0, "more than 0", MAX_TIMEOUT)
temperature_value = number_type(float, "a number", 0, "0 or more", MAX_TEMPERATURE)
seed_value = number_type(int, "a whole number", 0, "0 or more", MAX_SEED)
token_count = number_type(int, "a whole number", 1, "1 or more", MAX_TOKENS)
jobs_count = number_type(int, "a whole number", 1, "1 or more", MAX_JOBS)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


class _Parser(argparse.ArgumentParser):
    """argparse with our error shape: one error line and a hint, not a usage dump."""

    command: str | None = None  # on the top-level parser: the command the line names

    def error(self, message: str) -> NoReturn:
        # A flag argparse did not know after the command is the command's to explain.
        prog = f"{PROG} {self.command}" if self.command and self.prog == PROG else self.prog
        print(f"{PROG}: error: {message}", file=sys.stderr)
        print(f"{PROG}: hint: see `{prog} --help`", file=sys.stderr)
        sys.exit(2)


# The commands that generate text, and so take the generation options.
GENERATING = ("caption", "prompt", "enhance", "describe", "lore")
GENERATION_OPTIONS = {"temperature": "--temperature", "seed": "--seed", "num_ctx": "--num-ctx",
                      "max_tokens": "--max-tokens"}


def add_server_options(parser: argparse.ArgumentParser, *, generation: bool = True) -> None:
    """The flags every command takes, before or after the command name, and with
    generation the options of the commands that generate text.

    They default to SUPPRESS so a subcommand that does not see a flag leaves the
    value given before the command name alone; main() fills in the rest.
    """
    server = parser.add_argument_group("server options")
    server.add_argument("--host", action="append", default=argparse.SUPPRESS, metavar="URL",
                        help="Ollama server URL; repeat it to spread a folder run over several "
                             f"servers (env: OLLAMA_HOST, comma-separated; default {DEFAULT_HOST})")
    server.add_argument("-m", "--model", default=argparse.SUPPRESS, metavar="NAME",
                        help=f"text model (env: OLLAMA_MODEL; default {DEFAULT_MODEL})")
    server.add_argument("--timeout", type=timeout_seconds, default=argparse.SUPPRESS,
                        metavar="SECONDS",
                        help=f"seconds to wait for the server to answer (default {DEFAULT_TIMEOUT:g}), "
                             f"at most {MAX_TIMEOUT}")
    server.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="print each request's timings, token counts and model load time on stderr")
    server.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document on stdout instead of text (shape in README.md)")
    server.add_argument("--prompts-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="folder of template files that replace the built-in ones by name "
                             "(env: OLLAMA_GENERATE_PROMPTS_DIR)")
    if not generation:
        return
    sampling_group = parser.add_argument_group(
        "generation options", "defaults differ per action; see the table in README.md")
    sampling_group.add_argument("--temperature", type=temperature_value, default=argparse.SUPPRESS,
                                metavar="T", help=f"sampling temperature of the writing model, "
                                                  f"0-{MAX_TEMPERATURE}")
    sampling_group.add_argument("--seed", type=seed_value, default=argparse.SUPPRESS, metavar="N",
                                help=f"random seed, 0-{MAX_SEED}; with --temperature 0 the requests "
                                     "repeat exactly")
    sampling_group.add_argument("--num-ctx", type=token_count, default=argparse.SUPPRESS, metavar="N",
                                help=f"context window of every request, 1-{MAX_TOKENS} (default {NUM_CTX})")
    sampling_group.add_argument("--max-tokens", type=token_count, default=argparse.SUPPRESS,
                                metavar="N", help="cap on the length of the written answer, in tokens, "
                                                  f"1-{MAX_TOKENS}")


def check_generation_options(parser: _Parser, args: argparse.Namespace) -> None:
    """Generation options given before a command that generates nothing are a usage error."""
    if args.command in GENERATING:
        return
    for name, flag in GENERATION_OPTIONS.items():
        if hasattr(args, name):
            parser.error(f"{flag} does not apply to {args.command}: only {', '.join(GENERATING[:-1])} "
                         f"and {GENERATING[-1]} generate text")


SERVER_DEFAULTS = {"host": None, "model": None, "timeout": DEFAULT_TIMEOUT, "temperature": None,
                   "seed": None, "num_ctx": None, "max_tokens": None, "verbose": False,
                   "json": False, "prompts_dir": None}


COMMANDS = ("caption", "prompt", "enhance", "describe", "lore", "doctor", "models", "templates")
# Flags before the command name that take a value (so the value is not the command).
VALUE_FLAGS = ("--host", "-m", "--model", "--timeout", "--prompts-dir", "--temperature", "--seed",
               "--num-ctx", "--max-tokens")


def command_in(argv: Sequence[str]) -> str | None:
    """The command a command line names, found without parsing it all; None if unclear.

    >>> command_in(["--host", "prompt", "lore", "x"]), command_in(["--help"])
    ('lore', None)
    """
    takes_value = False
    for token in argv:
        if takes_value:
            takes_value = False
        elif token.startswith("-"):
            takes_value = token in VALUE_FLAGS
        else:
            return token if token in COMMANDS else None
    return None


class _Skipped:
    """Stands in for the parser of a command that is not running: its options are not built,
    which saves start-up time on every call."""

    def add_argument(self, *args: object, **kwargs: object) -> None:
        return None

    def add_argument_group(self, *args: object, **kwargs: object) -> _Skipped:
        return self

    add_mutually_exclusive_group = add_argument_group


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line: one subcommand per action, shared server flags on each.

    With only, the other commands are listed but their options are not built.
    """
    parser = _Parser(
        prog=PROG, formatter_class=_HelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        epilog="Run `ollama-generate COMMAND --help` for a command's options.\n\n"
               + "\n\n".join(__doc__.split("\n\n")[3:5]),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.command = only
    add_server_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    def add(name: str, function, epilog: str) -> argparse.ArgumentParser:
        summary = function.__doc__.splitlines()[0]
        sub = commands.add_parser(name, help=summary, description=summary,
                                  epilog="examples:\n" + epilog, formatter_class=_HelpFormatter)
        sub.set_defaults(run=function)
        if only and name != only:
            return _Skipped()
        add_server_options(sub, generation=name in GENERATING)
        return sub

    caption = add("caption", cmd_caption,
                  "  ollama-generate caption photo.png --style tags\n"
                  "  ollama-generate caption ./dataset/ --trigger ohwx --overwrite\n"
                  "  ollama-generate caption photo.png --style detailed --creative")
    caption.add_argument("path", metavar="PATH", help="an image file, or a folder of images")
    caption.add_argument("--style", choices=STYLES, default="training",
                         help="training: a 50-150 word paragraph (Flux/T5); tags: 20-40 booru "
                              "tags (SDXL/Pony/Illustrious); detailed: 2-4 sentences of prose "
                              "(default: training)")
    caption.add_argument("-c", "--creative", action="store_true",
                         help="add atmosphere, mood and sensory detail (default: accurate)")
    caption.add_argument("--trigger", metavar="WORD",
                         help="trigger word, placed by code as the first comma-separated chunk, once")
    caption.add_argument("--prefix", metavar="TEXT",
                         help="text placed verbatim at the very start of every caption")
    caption.add_argument("--overwrite", action="store_true",
                         help="replace existing caption files (default: skip them)")
    caption.add_argument("--hint", metavar="TEXT",
                         help="context for both models: a character's name, what the dataset is about")
    caption.add_argument("--underscores", action="store_true",
                         help="tags: keep underscores (long_hair) instead of spaces (long hair)")
    caption.add_argument("--exclude-tags", metavar="TAGS",
                         help="tags: comma-separated tags never to write")
    caption.add_argument("--always-first", metavar="TAGS",
                         help="tags: comma-separated tags to put first, in this order, added if missing")
    folder = caption.add_argument_group("folder runs")
    folder.add_argument("-r", "--recursive", action="store_true",
                        help="also caption images in subfolders (symlinked folders are not entered)")
    folder.add_argument("--ext", default=CAPTION_EXTENSION, metavar="EXT",
                        help="caption file extension, e.g. .caption for kohya (default: .txt)")
    folder.add_argument("--output-dir", metavar="DIR",
                        help="write captions into DIR, mirroring the folder tree (default: beside each image)")
    folder.add_argument("--limit", type=positive_int, metavar="N",
                        help="caption only the first N images that need one (1 or more), to try a prompt")
    folder.add_argument("--dry-run", action="store_true",
                        help="list what would be captioned and skipped on stdout; no model calls")
    folder.add_argument("-j", "--jobs", type=jobs_count, default=1, metavar="N",
                        help=f"requests sent at once to each server, 1-{MAX_JOBS} (default: 1)")
    folder.add_argument("--chunk", type=positive_int, default=DEFAULT_CHUNK, metavar="N",
                        help="images per stage (1 or more): the vision model describes N, then the text "
                             f"model writes N, so each model loads once per chunk (default: {DEFAULT_CHUNK})")
    folder.add_argument("--keep-alive", type=parse_keep_alive, metavar="DURATION",
                        help="how long models stay loaded after each request, e.g. 30m, 1h, or "
                             "seconds (default: the whole run, then Ollama's 5m)")
    folder.add_argument("--cache-dir", metavar="DIR",
                        help=f"where vision descriptions are kept for reruns (default: {CACHE_FOLDER}/ "
                             "inside the folder)")
    folder.add_argument("--no-cache", action="store_true",
                        help="ask the vision model again even for images it described before")
    folder.add_argument("-q", "--quiet", action="store_true",
                        help="no progress and no summary unless something failed")
    folder.add_argument("--report", metavar="FILE", help="write the run's summary as JSON to FILE")
    folder.add_argument("--manifest", metavar="FILE",
                        help="write a Hugging Face imagefolder metadata.jsonl (file_name, text) "
                             "of every captioned image")

    prompt = add("prompt", cmd_prompt,
                 '  ollama-generate prompt "a lighthouse in a storm"\n'
                 '  ollama-generate prompt "a lighthouse in a storm" --encoder clip\n'
                 "  echo 'a fox in snow' | ollama-generate prompt -")
    prompt.add_argument("concept", metavar="CONCEPT", help="what the image is about ('-' reads stdin)")
    prompt.add_argument("--encoder", choices=ENCODERS, default="t5",
                        help="t5: natural language for Flux; clip: tags for SDXL/Pony (default: t5)")

    enhance = add("enhance", cmd_enhance,
                  '  ollama-generate enhance "a cat on a sofa"\n'
                  '  ollama-generate enhance "1girl, red hair, rain" --intensity extreme')
    enhance.add_argument("prompt", metavar="PROMPT", help="the prompt to enrich ('-' reads stdin)")
    enhance.add_argument("--intensity", choices=INTENSITIES, default="moderate",
                         help="how much creative liberty the model takes (default: moderate)")

    describe = add("describe", cmd_describe,
                   '  ollama-generate describe "Neon Noir" --type style --tags "neon, rain, night"')
    describe.add_argument("model_name", metavar="MODEL_NAME", help="the LoRA's name ('-' reads stdin)")
    describe.add_argument("--type", dest="lora_type", required=True, metavar="TYPE",
                          help="what kind of LoRA: character, style, concept, clothing, ...")
    describe.add_argument("--tags", metavar="TAGS", help="comma-separated keywords for the card")
    describe.add_argument("--base-model", metavar="MODEL",
                          help="the base model, for the card's front matter (e.g. black-forest-labs/FLUX.1-dev)")
    describe.add_argument("--trigger", metavar="WORD",
                          help="the trigger word: front matter instance_prompt and a Trigger words section")
    describe.add_argument("--license", metavar="LICENSE", help="the license, for the card's front matter")
    describe.add_argument("--dataset", metavar="DIR",
                          help="ground the card in this dataset: image count, frequent tags, sample captions")

    lore = add("lore", cmd_lore,
               '  ollama-generate lore "the last lighthouse keeper" --length short')
    lore.add_argument("scenario", metavar="SCENARIO", help="what to write about ('-' reads stdin)")
    lore.add_argument("--length", choices=LENGTHS, default="medium",
                      help="short (~150 words), medium (~400) or long (~900) (default: medium)")
    for sub in (prompt, enhance, describe, lore):
        streaming = sub.add_mutually_exclusive_group()
        streaming.add_argument("--stream", dest="stream", action="store_true", default=None,
                               help="print the text as it arrives (default when stdout is a terminal)")
        streaming.add_argument("--no-stream", dest="stream", action="store_false",
                               help="print the text once it is complete")

    doctor = add("doctor", cmd_doctor,
                 "  ollama-generate doctor\n"
                 "  ollama-generate doctor --json --vision-model llava")
    models = add("models", cmd_models, "  ollama-generate models")
    templates = add("templates", cmd_templates,
                    "  ollama-generate templates\n"
                    "  ollama-generate templates caption_tags > my-prompts/caption_tags.txt")
    templates.add_argument("name", metavar="NAME", nargs="?", help="print this template")
    for sub in (caption, models, doctor):
        sub.add_argument("--vision-model", metavar="NAME",
                         help=f"vision model (env: OLLAMA_VISION_MODEL; default {DEFAULT_VISION_MODEL})")
    return parser


def write_product(text: str) -> None:
    """Print the command's result on stdout, in UTF-8 even under a C locale."""
    if (sys.stdout.encoding or "").lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(encoding="utf-8")
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def print_error(exc: OllamaError) -> None:
    """The one place errors reach the user: an error line, then a hint line if we have one."""
    print(f"{PROG}: {paint('error', RED)}: {exc}", file=sys.stderr)
    if exc.hint:
        print(f"{PROG}: hint: {exc.hint}", file=sys.stderr)


def check_prompts_dir(path: str | None) -> str | None:
    """The --prompts-dir folder, absolute; it must exist, and a file in it that replaces no
    template (a misspelt name) is worth a warning."""
    if not path:
        return None
    if not os.path.isdir(path):
        raise UsageError(f"--prompts-dir (or OLLAMA_GENERATE_PROMPTS_DIR) {path} is not a folder",
                         hint="give a folder of .txt templates; `ollama-generate templates` lists the names")
    path = os.path.abspath(path)
    for name in sorted(os.listdir(path)):
        if name.endswith(".txt") and name[:-4] not in TEMPLATE_FIELDS:
            warn(f"{os.path.join(path, name)} replaces no template (check its name)")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_in(argv))
    args = parser.parse_args(argv)  # usage errors exit 2 here
    check_generation_options(parser, args)
    for name, default in SERVER_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    debug = bool(os.environ.get("OLLAMA_GENERATE_DEBUG"))
    global PROMPTS_OVERRIDE
    try:
        config = Config.resolve(args, os.environ)
        PROMPTS_OVERRIDE = check_prompts_dir(config.prompts_dir)
        product = args.run(config, args)
        if args.json:
            write_product(json_document(product.data))
        elif product.text is not None and not product.streamed:
            write_product(product.text)
        if product.error:
            print_error(product.error)
            return product.error.exit_code
    except OllamaError as exc:
        if debug:
            raise
        print_error(exc)
        if args.json:
            write_product(json_document({"error": str(exc), "hint": exc.hint or None,
                                         "exit_code": exc.exit_code, "report": getattr(exc, "report", None)}))
        return exc.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (head, less) went away: stop quietly, as json.tool does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug: one line, not a traceback
        if debug:
            raise
        print_error(OllamaError(f"internal error: {exc!r}",
                                hint="rerun with OLLAMA_GENERATE_DEBUG=1 and report the traceback"))
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a script by the subprocess tests
    sys.exit(main())
