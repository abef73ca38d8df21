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
  ollama-generate stats ./dataset/ --trigger ohwx
  ollama-generate review ./dataset/

Environment:
  OLLAMA_HOST          Ollama server URL (default http://localhost:11434)
  OLLAMA_MODEL         text model (default qwen3-30b-a3b:latest)
  OLLAMA_VISION_MODEL  vision model (default qwen3-vl:32b)
  OLLAMA_API_KEY       bearer token for a remote server (default unset)
  OPENAI_API_KEY       bearer token for an OpenAI-compatible server (default OLLAMA_API_KEY)
  OLLAMA_GENERATE_PROMPTS_DIR  folder of template overrides (default unset)
  OLLAMA_GENERATE_DEBUG  set to 1 to show Python tracebacks (default unset)
  OLLAMA_GENERATE_CLIP_VOCAB  CLIP BPE vocabulary for exact token counts, or none (default found)

Exit status:
  0    success
  1    server or runtime failure, or an image in a folder run failed
  2    usage error: bad flag value, path not found, folder with no images
  3    the server cannot be reached
  4    a model is not installed, or the vision model cannot see images
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)
"""

from __future__ import annotations

import argparse
import collections
import errno
import functools
import json
import math
import os
import re
import stat
import string
import struct
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

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
# "Too many requests" and "server busy": with --jobs auto the engine sends fewer at once.
BUSY_STATUSES = frozenset({429, 503})
# Answers that say a URL leads to another API: --api auto then asks the other one. (A server that
# wants a key before it says what it is stays Ollama unless its URL ends in /v1 or --api says.)
NOT_THIS_API = frozenset({404, 405})
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
MAX_JOBS = 64  # requests at once per server and stage; each is a thread here
AUTO = "auto"  # --jobs auto: learn how many requests each server's models take at once
AUTO_RISE = 0.4  # share of the ideal gain a doubled --jobs auto must show to be kept
AUTO_WINDOW = 2  # --jobs auto judges a limit on at least this many completions (whole rounds), counted
#                  after the requests sent before the change have come back
AUTO_SPARE = 4  # once --jobs auto has learned a limit L it keeps ceil(L / AUTO_SPARE) more requests in flight
STAGE_LAYOUTS = ("auto", "overlap", "sequential")  # --stages
MAX_TEMPERATURE = 2
MAX_SEED = 2**32 - 1  # llama.cpp keeps the seed as 32 bits
MAX_TOKENS = 1024 * 1024  # --num-ctx and --max-tokens

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# Clips are captioned too: video trainers read clip.mp4 beside clip.txt as they read images.
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi")
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
CAPTION_EXTENSION = ".txt"
# Larger files are refused: a vision model sees a few megapixels, and a job holds the file
# and its base64 text in memory, so this bounds the memory of each of --jobs workers.
MAX_IMAGE_BYTES = 50_000_000
# Pillow prepares images when installed (see prepare_image); this is how to install it.
PILLOW_EXTRA = "pip install 'ollama-generate[images]'"
# How a server says it could not decode an image (Ollama's llama.cpp engine before the 2026-08
# WebP fix answers "image: unknown format"): the image is converted and sent once more.
UNREADABLE_IMAGE = re.compile(r"image: unknown format|failed to decode image|unsupported image format", re.I)
# Files written whole are first written under this prefix (and .tmp) in the same folder. A
# folder run removes those older than STALE_TEMP_SECONDS before it started: a kill -9 leftover.
TEMP_PREFIX = ".ollama-generate-"
STALE_TEMP_SECONDS = 60
# Where a folder run keeps its cache of vision descriptions, inside the dataset.
CACHE_FOLDER = ".ollama-generate"
# Hugging Face datasets' imagefolder finds the metadata by this name in the image folder and reads
# each file_name relative to it (refusing names that start with ..), so --manifest goes there.
MANIFEST_NAME = "metadata.jsonl"
# Images per chunk: the vision model describes a whole chunk, then the text model
# writes its captions, so a GPU that holds one model loads each once per chunk.
DEFAULT_CHUNK = 1000
# Keep both models loaded for the whole run (-1 = forever); afterwards hand them
# back to Ollama's own default, five minutes.
DEFAULT_KEEP_ALIVE = -1
RELEASE_KEEP_ALIVE = "5m"
RELEASE_TIMEOUT = 5.0

ENCODERS = ("clip", "t5")
INTENSITIES = ("mild", "moderate", "extreme")
LENGTHS = ("short", "medium", "long")
LORE_WORDS = {"short": 150, "medium": 400, "long": 900}

# The context size of the text model's requests, and the least the vision model gets: Ollama
# reloads a model whenever num_ctx changes, so each model keeps one value for a whole run. 8192
# holds a prompt, a description and a long answer, or a right-sized image and its answer; a run
# of larger images gets more for the vision model (see vision_context).
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
    "caption_short": ("description",),
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
    "ground_existing": ("where", "text"),
    "ground_name": ("where", "text"),
    "reask": ("request", "answer", "problem"),
    "reask_vision": ("problem",),
    "vision_video_system": (),
    "vision_video_user": ("frames", "duration", "timestamps"),
    "video_caption": (),
    "target_video": (),
    "vision_probe": (),
}

# -- Errors -------------------------------------------------------------------


# Secrets never shown: api_key_from() adds every API key it reads. Server text (an
# error page can echo our request headers) reaches the user only through
# OllamaError and warn(), and documents only through json_document(), which all
# redact.
SECRETS: set[str] = set()
SECRET_MIN_CHARS = 8  # shorter keys are still hidden after "Bearer" and in credential headers
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
    status = 0  # the HTTP status the server answered, when it answered with one
    server_text = ""  # what the server's error said, as it said it

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(redact(message))
        self.hint = redact(hint)


class UsageError(OllamaError):
    """A bad flag value or path, found after argparse accepted the command line."""

    exit_code = 2


class ServerUnreachable(OllamaError):
    """Nothing answers at the configured host."""

    exit_code = 3


class KeyRefused(OllamaError):
    """The server wants an API key, or refused the one sent."""


class ModelUnavailable(OllamaError):
    """A model is not installed, or cannot do what we need (see images)."""

    exit_code = 4


class TransientError(OllamaError):
    """A failure worth retrying: 5xx, busy, timeout, dropped connection, garbage."""

    retry_after = 0.0  # seconds the server asked us to wait (Retry-After)


class ServerTimeout(TransientError):
    """The server stopped sending anything for longer than --timeout."""


class TemplateError(OllamaError):
    """A prompt template is missing or has the wrong placeholders."""


class ImageError(OllamaError):
    """One file in a dataset cannot be captioned; a folder run goes on past it."""


class ImageUnreadable(ImageError):
    """The server could not decode the image it was sent."""


class BatchFailed(OllamaError):
    """A folder run finished, but some images failed (they are listed above)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: every place that handles Ctrl-C handles it the same way, then exit 143."""

    exit_code = 143


class ServerFailing(OllamaError):
    """Every server left answers, but with errors: the circuit breaker stopped the run."""


def warn(message: str) -> None:
    """A problem worth telling the user that does not stop the command (stderr)."""
    print(f"{PROG}: {paint('warning', YELLOW)}: {redact(message)}", file=sys.stderr, flush=True)


RED, YELLOW, GREEN = "31", "33", "32"


def plural(count: int, noun: str, many: str = "") -> str:
    """A count with its noun, singular or plural.

    >>> plural(1, "image"), plural(3, "image"), plural(0, "description"), plural(2, "was", "were")
    ('1 image', '3 images', '0 descriptions', '2 were')
    """
    return f"{count} {noun if count == 1 else many or noun + 's'}"


def shown(text: str) -> str:
    """Text that prints and writes as UTF-8 anywhere: the bytes of a file name that is not UTF-8
    (and any lone surrogate) are shown escaped instead of raising UnicodeEncodeError.

    >>> shown("caf\\udce9.png"), shown("caf\\u00e9.png"), shown("x\\ud800")
    ('caf\\\\xe9.png', 'café.png', 'x\\\\ud800')
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:  # a name read from the file system: its undecodable bytes became \udc80-\udcff
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate from elsewhere (a model's answer)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def without_surrogates(text: str) -> str:
    """A model's text fit to write as UTF-8: lone surrogates (JSON escapes such as \\ud800 that
    pair with nothing) are dropped.

    >>> without_surrogates("caf\\u00e9 \\ud800ok")
    'café ok'
    """
    return text if text.isascii() else re.sub("[\ud800-\udfff]", "", text)


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

    def replace(self, **changes: object) -> Record:
        """A copy with some fields changed."""
        return type(self)(**{**{name: getattr(self, name) for name in self._fields()}, **changes})

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


def api_key_from(env: Mapping[str, str], name: str = "OLLAMA_API_KEY") -> str:
    """An API key variable (OLLAMA_API_KEY, OPENAI_API_KEY) without surrounding whitespace (a key
    file's line end). It is hidden wherever it could appear from now on, sendable or not."""
    key = env.get(name, "").strip()
    if len(key) >= SECRET_MIN_CHARS:  # a short "key" would blank ordinary words everywhere
        SECRETS.add(key)  # redacted wherever it appears (see redact(): short keys only as tokens)
    return key


def sendable_key(name: str, key: str) -> str:
    """The key, if it can be sent as a header; refused in a message that never shows it."""
    if any(not " " <= char <= "~" for char in key):
        raise UsageError(
            f"{name} contains control or non-ASCII characters, so it cannot be sent "
            "(the key is not shown)",
            hint="set it to the key alone, on one line; a key file saved with Windows line "
                 "endings or pasted from a document often adds such characters",
        )
    return key


class Config(Frozen):
    """Settings for one run, resolved once: flag, then environment, then default."""

    _hidden = ("api_key", "openai_api_key")

    hosts: tuple[str, ...] = (DEFAULT_HOST,)
    model: str = DEFAULT_MODEL
    vision_model: str = DEFAULT_VISION_MODEL
    timeout: float = DEFAULT_TIMEOUT
    retries: int = RETRIES
    temperature: float | None = None  # None: each action's own default (SAMPLING)
    max_tokens: int | None = None
    num_ctx: int | None = None  # --num-ctx: every request, both models
    vision_num_ctx: int = NUM_CTX  # sized per run for its largest image (see size_vision_context)
    seed: int | None = None
    api: str = "auto"  # --api: which kind of server each host is (API_CHOICES)
    api_key: str = ""  # OLLAMA_API_KEY, never shown: see _hidden
    openai_api_key: str = ""  # OPENAI_API_KEY, for OpenAI-compatible servers only
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
            num_ctx=args.num_ctx or None,
            seed=args.seed,
            api=getattr(args, "api", None) or "auto",
            api_key=sendable_key("OLLAMA_API_KEY", api_key_from(env)),
            # Checked only when a server of its kind is asked (see connect): a variable meant for
            # another tool must not stop a run against Ollama.
            openai_api_key=api_key_from(env, "OPENAI_API_KEY"),
            verbose=args.verbose,
            prompts_dir=args.prompts_dir or env.get("OLLAMA_GENERATE_PROMPTS_DIR") or None,
        )


# -- Server clients: Ollama's own API and the OpenAI-compatible one ----------------
# One interface, two transports. The stages, the engine, the report and every command call
# chat(), generate(), show(), tags() and the rest and never ask which kind of server answers;
# what differs for the user (names, fixes, which figures exist) is a row of SERVER_KINDS.


class Answer(Record):
    """One model answer with the metrics the server reports (missing ones are 0)."""

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


class ServerKind(Frozen):
    """One kind of server as the user meets it: its name in messages, the fixes it needs, and
    what it reports."""

    name: str  # the --api value
    label: str  # messages say "<label> at <url>"
    what: str  # "is this <what>?"
    api: str  # "<url> has no <api>"
    check: str  # the fix when it answers like another kind of server
    start: str  # the fix when nothing answers
    base_url: str  # the fix when the URL leads somewhere else
    absent: str  # "model 'x' <absent> <where> <url>"
    present: str  # doctor's "x <present> (capabilities)"
    where: str
    get_model: str  # the fix for a missing model ({model} and {host} filled in)
    model_hint: str  # the same as an error's hint
    get_vision: str  # the fix for a vision model that cannot see
    vision_hint: str  # the same as an error's hint
    probes: bool  # a vision model it does not list capabilities for is tried with a tiny image
    schema_by: str  # how tags are asked for as JSON ({version} filled in)
    key: str  # the fix for a refused or missing API key
    keys: tuple[str, ...]  # the Config fields its API key comes from, the first one set wins
    loads: bool  # it reports model loads and keeps models loaded on request (keep_alive, /api/ps)


SERVER_KINDS = {
    "ollama": ServerKind(
        "ollama", "Ollama", "an Ollama server", "Ollama API",
        check="check OLLAMA_HOST (or --host): it should be an Ollama server",
        start="start it with `ollama serve`, or set OLLAMA_HOST (or --host) to where it runs",
        base_url="check OLLAMA_HOST (or --host): it should be the Ollama server's base URL, "
                 "like http://localhost:11434",
        absent="is not installed", present="is installed", where="on", get_model="ollama pull {model}",
        model_hint="run `ollama pull {model}`",
        get_vision=f"ollama pull {DEFAULT_VISION_MODEL}, then use it with --vision-model",
        vision_hint="pick a vision model with --vision-model or OLLAMA_VISION_MODEL, "
                    f"e.g. `ollama pull {DEFAULT_VISION_MODEL}`",
        # Servers before v0.6.4 list no capabilities; a probe would load the model to learn it.
        probes=False,
        schema_by="Ollama {version}",
        key="set OLLAMA_API_KEY to the server's key (an OpenAI-compatible server that wants a key: name "
            "it with a /v1 URL or --api openai, and set OPENAI_API_KEY)", keys=("api_key",), loads=True),
    "openai": ServerKind(
        "openai", "the OpenAI-compatible server", "an OpenAI-compatible server", "OpenAI-compatible API",
        check="check --host: it should be an OpenAI-compatible server's URL, ending in /v1",
        start="start the server, or point --host at where it runs (ending in /v1, like "
              "http://localhost:8080/v1)",
        base_url="check --host: an OpenAI-compatible server's base URL ends in /v1, like "
                 "http://localhost:8080/v1",
        absent="is not served", present="is served", where="by",
        get_model="pick a model it serves with --model or --vision-model "
                  "(`ollama-generate models --host {host}` lists them)",
        model_hint="pick a model it serves with --model or --vision-model "
                   "(`ollama-generate models --host {host}` lists them)",
        get_vision="serve a vision model there and name it with --vision-model",
        vision_hint="serve a vision model there and name it with --vision-model or OLLAMA_VISION_MODEL",
        probes=True,
        schema_by="response_format with a JSON schema; a server that refuses it is asked for a JSON "
                  "object with the schema, then for plain text",
        key="set OPENAI_API_KEY (or OLLAMA_API_KEY) to the server's key, and name the server with a "
            "/v1 URL or --api openai (a server found by asking gets only OLLAMA_API_KEY)",
        keys=("openai_api_key", "api_key"), loads=False),
}
API_CHOICES = ("auto", *SERVER_KINDS)  # --api: auto asks the server which it is


class Client:
    """One server of either kind. Every request goes through _open(); retries live in
    _retrying(); what the server did is counted for the summary. OllamaClient and OpenAIClient
    add the endpoints, each with the same public methods."""

    kind: ServerKind = SERVER_KINDS["ollama"]

    def __init__(self, host: str, *, timeout: float = DEFAULT_TIMEOUT, retries: int = RETRIES,
                 api_key: str = "", verbose: bool = False) -> None:
        self.host = host
        self.timeout = timeout
        self.retries = retries
        self._api_key = api_key  # sent as a bearer token, never shown (api_key_from hid it)
        self.verbose = verbose
        self.record: list[tuple[str, Answer]] | None = None  # (model, answer) of each call, if a list
        # A refused connection is retried only once the server has answered:
        # then it is a restart worth waiting for, not a server that is not there.
        self.answered = False
        # What this server did for us, for summaries; worker threads share the client.
        self.calls = 0
        self.loads_seen = 0
        self.load_seconds = 0.0
        self.load_wait = 0.0  # wall seconds answers spent waiting for loads, each load once
        import threading

        self._here = threading.local()  # the same counts for the calling thread alone (tally())
        self._load_ends: dict[str, float] = {}  # model -> when the last load we counted ended
        self._waits: list[tuple[float, float]] = []  # the wall time answers waited for loads, merged
        self._sees: dict[str, str] = {}  # model -> "" if it took the probe image, else why not
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return self.kind.label

    def url(self, path: str) -> str:
        """Where a request to an endpoint path goes."""
        return self.host + path

    def probe_vision(self, model: str) -> str:
        """Whether the model takes an image, for a server that does not say: asked with a tiny one
        and a one-token answer (retried like any request). "" when it does, else what the server
        said. A server that is busy or gone raises: that says nothing about the model."""
        if model not in self._sees:
            messages = [{"role": "user", "content": render("vision_probe"), "images": [probe_image()]}]
            try:
                self.chat(model, messages, options={"temperature": 0, "num_predict": 1})
                self._sees[model] = ""
            except (ServerUnreachable, ServerTimeout, KeyRefused, ModelUnavailable):
                raise
            except OllamaError as exc:
                if exc.status in BUSY_STATUSES:
                    raise
                # A model that cannot see fails the request every time: a 4xx, a 500, or (as
                # llama-cpp-python does) a stream that ends with nothing.
                self._sees[model] = str(exc)
        return self._sees[model]

    def _streamed(self, send, printer) -> Answer:
        """send(on_piece) with retries. With a printer, printer.feed(text) sees each piece as it
        arrives; once it has shown text a failure is not retried (what was shown cannot be taken
        back), and before that printer.restart() begins each new attempt."""
        if printer is None:
            return self._retrying(lambda: send(None))

        def attempt() -> Answer:
            printer.restart()
            return send(printer.feed)

        return self._retrying(attempt, give_up=lambda: printer.shown)

    def _finish(self, path: str, model: str, answer: Answer, started: float) -> Answer:
        """Count a complete answer, keep it for --json if asked, and report it with --verbose."""
        self._count(model, answer, started)
        if self.record is not None:
            self.record.append((model, answer))
        if self.verbose:
            self._report(path, model, answer, time.monotonic() - started)
        return answer

    def tally(self) -> tuple[int, int, int]:
        """Model calls, loads seen and "server busy" answers so far in the calling thread: the
        engine compares them around one step to learn what that step cost."""
        here = self._here
        return getattr(here, "calls", 0), getattr(here, "loads", 0), getattr(here, "busy", 0)

    def _tally(self, name: str) -> None:
        setattr(self._here, name, getattr(self._here, name, 0) + 1)

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
                        error = type(exc)(f"{exc} (gave up after {tries + 1} attempts)", hint=exc.hint)
                        error.status, error.server_text = exc.status, exc.server_text
                        raise error from None
                    raise
                # A server that says when to come back (Retry-After) is waited for, within the cap.
                wait = max(BACKOFF_SECONDS * 2 ** tries, getattr(exc, "retry_after", 0.0))
                time.sleep(min(wait, BACKOFF_CAP_SECONDS))
                tries += 1

    def _report(self, path: str, model: str, answer: Answer, seconds: float) -> None:
        """--verbose: one line per request on stderr with its timings and token counts (those a
        server does not report are not shown as zeros)."""
        speed = f" ({answer.eval_count / (answer.eval_duration / 1e9):.1f}/s)" if answer.eval_duration else ""
        load = f"load {answer.load_duration / 1e9:.2f}s, " if self.kind.loads else ""
        print(f"{PROG}: {path} {model} on {self.host}: {seconds:.2f}s, {load}prompt "
              f"{answer.prompt_eval_count} tokens, answer {answer.eval_count} tokens{speed}, "
              f"{answer.done_reason or 'no done_reason'}", file=sys.stderr, flush=True)

    def _count(self, model: str, answer: Answer, started: float) -> None:
        """Add an answer to this server's tally.

        A long load_duration means the request waited for a model load. Requests
        sent together all wait for the same load, so a load counts once however
        many requests waited through it.
        """
        load = answer.load_duration / 1e9
        self._tally("calls")
        with self._lock:
            self.calls += 1
            self.load_seconds += load
            if load >= LOAD_SEEN_SECONDS:
                self._tally("loads")
                ended = self._load_ends.get(model, 0.0)
                if started >= ended:
                    self.loads_seen += 1
                self.load_wait += self._waited(started, started + load)
                self._load_ends[model] = max(ended, started + load)

    def _waited(self, start: float, end: float) -> float:
        """Add a wait for a load to the waits seen; return the wall time no other one covered
        (a request for one model may wait through another's load as well as its own)."""
        covered = sum(max(0.0, min(last, end) - max(first, start)) for first, last in self._waits)
        apart = [(first, last) for first, last in self._waits if last < start or first > end]
        joined = [(first, last) for first, last in self._waits if not (last < start or first > end)]
        merged = (min([start] + [first for first, _ in joined]), max([end] + [last for _, last in joined]))
        self._waits = sorted(apart + [merged])
        return max(0.0, end - start - covered)

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
                f"{self.label} at {self.host} stopped answering for {self.timeout:g} s",
                hint="a slow or overloaded server needs a longer --timeout",
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"the connection to {self.label} at {self.host} dropped ({exc})") from None
        if len(data) > LINE_LIMIT or line and len(data) == LINE_LIMIT and not data.endswith(b"\n"):
            what = "a line" if line else "an answer"
            raise TransientError(f"{self.label} at {self.host} sent {what} longer than "
                                 f"{LINE_LIMIT / 2 ** 20:g} MB; it was not read further")
        return data

    def _decode(self, data: bytes) -> dict:
        """Parse one JSON object from the server."""
        try:
            value = json.loads(data)
        except ValueError:
            sample = excerpt(data[:4096].decode("utf-8", "replace"), 60)
            raise TransientError(f"{self.label} at {self.host} sent something that is not JSON: {sample!r}") from None
        if not isinstance(value, dict):
            raise TransientError(f"{self.label} at {self.host} sent unexpected JSON: {excerpt(str(value), 60)}")
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
        request = urllib.request.Request(self.url(path), data=data, method=method, headers=headers)
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
                raise TransientError(f"the connection to {self.label} at {self.host} dropped ({reason})") from None
            if type(reason).__name__.startswith("SSL"):
                raise ServerUnreachable(
                    f"cannot make a secure connection to {self.host} ({getattr(reason, 'reason', None) or reason})",
                    hint="if the server uses its own certificate, point SSL_CERT_FILE at it",
                ) from None
            raise ServerUnreachable(
                f"cannot connect to {self.label} at {self.host} ({getattr(reason, 'strerror', None) or reason})",
                hint=self.kind.start,
            ) from None
        except TimeoutError:
            raise self._timeout(timeout) from None
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"the connection to {self.label} at {self.host} dropped ({exc})") from None

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
            f"{self.label} at {self.host} did not answer within {timeout:g} s",
            hint="a cold model load can take minutes on slow disks; raise --timeout",
        )

    def _http_error(self, exc, body: dict | None) -> OllamaError:
        """Turn an HTTP error status into the error the user can act on (its status kept)."""
        import http.client

        try:
            raw = exc.read(ERROR_BODY_LIMIT) or b""
        except (OSError, http.client.HTTPException):
            raw = b""
        content_type = (exc.headers.get("Content-Type") or "") if exc.headers else ""
        message, kind = server_message(raw, content_type)
        error = self._status_error(exc, body, message or str(exc.reason or "") or "no details", kind)
        error.status, error.server_text = exc.code, message
        return error

    def _status_error(self, exc, body: dict | None, message: str, kind: str) -> OllamaError:
        """The error for one HTTP status and what the server said (kind: see server_message)."""
        status = exc.code
        if 300 <= status < 400:
            return self._redirect_error(exc, post=body is not None)
        model = (body or {}).get("model", "")
        if kind == "html":
            return (TransientError if status in RETRIED_STATUSES else OllamaError)(
                f"{self.host} answered HTTP {status} with an HTML page: is this {self.kind.what}?",
                hint=self.kind.base_url,
            )
        if status in (401, 403):
            return KeyRefused(f"{self.label} at {self.host} "
                              + ("refused the API key" if self._api_key else "wants an API key")
                              + f" (HTTP {status}: {message})", hint=self.kind.key)
        if status == 404 and model and kind == "api":
            return ModelUnavailable(f"model '{model}' {self.kind.absent} {self.kind.where} {self.host}",
                                    hint=self.kind.model_hint.format(model=model, host=self.host))
        if status == 404:
            # The API answers a JSON error for a missing model; a plain 404 page means
            # the URL does not lead to the API (a wrong path or another server).
            return OllamaError(f"{self.host} has no {self.kind.api} (HTTP 404: {message})",
                               hint=self.kind.base_url)
        if UNREADABLE_IMAGE.search(message):  # the same image fails the same way: not retried
            return ImageUnreadable(f"{self.label} at {self.host} cannot read the image ({message})",
                                   hint=f"install Pillow ({PILLOW_EXTRA}) to send it converted")
        if status in BUSY_STATUSES:
            self._tally("busy")  # the queue is full: the engine sends fewer requests at once
        if status in RETRIED_STATUSES:
            error = TransientError(f"{self.label} at {self.host} answered HTTP {status}: {message}")
            error.retry_after = retry_after(exc.headers)
            return error
        if status >= 500:
            return OllamaError(f"{self.label} at {self.host} answered HTTP {status}: {message}",
                               hint=self.kind.check)
        return OllamaError(f"{self.label} at {self.host} refused the request (HTTP {status}): {message}")

    def _redirect_error(self, exc, *, post: bool) -> OllamaError:
        """A redirect that was not followed: to another origin, or one that would turn a POST into a GET."""
        import urllib.parse

        location = (exc.headers.get("Location") or "") if exc.headers else ""
        sent_to = getattr(exc, "filename", None) or self.host
        target = urllib.parse.urljoin(sent_to, location) if location else ""
        hint = "set OLLAMA_HOST (or --host) to the address the server redirects to"
        if not target:
            return OllamaError(f"{self.host} answered HTTP {exc.code}, a redirect without a Location",
                               hint=self.kind.check)
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


class OllamaClient(Client):
    """Ollama's own API (/api/chat, /api/generate, /api/show, ...): model loads are reported,
    models are kept loaded on request, thinking is switched off by a field."""

    kind = SERVER_KINDS["ollama"]

    def __init__(self, host: str, **settings) -> None:
        import threading

        super().__init__(host, **settings)
        # Models on Ollama v0.12.4 that reject think:false (fixed in v0.12.5).
        self._no_think_field: set[str] = set()
        self._version: tuple[int, ...] | None = None
        self._version_lock = threading.Lock()

    # Public endpoints, named after Ollama's.

    def show(self, model: str) -> dict:
        """Details of one installed model; raises ModelUnavailable if it is missing."""
        return self._retrying(lambda: self._call("POST", "/api/show", {"model": model}))

    def chat(self, model: str, messages: list[dict], *, options: dict,
             keep_alive: int | float | str | None = None) -> Answer:
        """One /api/chat exchange, streamed and gathered into an Answer.
        A message's images are base64 text in its "images" list."""
        body = {"model": model, "messages": messages, "stream": True,
                "think": False, "options": options, **self.runner_fields()}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        return self._retrying(lambda: self._generation("/api/chat", body))

    def generate(self, model: str, prompt: str, *, options: dict,
                 keep_alive: int | float | str | None = None, fmt: dict | None = None,
                 printer=None) -> Answer:
        """One /api/generate call, streamed and gathered into an Answer; fmt is a JSON schema the
        answer must follow. A printer sees the answer as it arrives (see _streamed)."""
        body = {"model": model, "prompt": prompt, "stream": True,
                "think": False, "options": options, **self.runner_fields()}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        if fmt is not None:
            body["format"] = fmt
        return self._streamed(lambda on_piece: self._generation("/api/generate", body, on_piece), printer)

    def version(self) -> tuple[int, ...]:
        """The server's version as numbers, asked once (threads asking at once get the one
        answer); () when the server does not say."""
        with self._version_lock:
            if self._version is None:
                try:
                    self.answers()
                except OllamaError:
                    pass
                self._version = self._version or ()
        return self._version

    def answers(self) -> bool:
        """Whether /api/version answers as Ollama's does (the version is kept). False for an
        answer that says this is another API; an error when nothing answers, or answers wrong."""
        try:
            text = self._call("GET", "/api/version").get("version")
        except OllamaError as exc:
            self._version = ()  # asked once: it does not say
            if exc.status not in NOT_THIS_API:
                raise
            text = None
        self._version = tuple(int(part) for part in re.findall(r"\d+", str(text or ""))[:3])
        return isinstance(text, str)

    def describe(self) -> str:
        """The server as doctor names it."""
        return f"Ollama {'.'.join(map(str, self.version())) or 'unknown'} at {self.host}"

    def supports_structured_output(self) -> bool:
        """Whether "format" may hold a JSON schema (Ollama v0.5.0 and later; dev builds say 0.0.0)."""
        version = self.version()
        return bool(version) and (version >= STRUCTURED_OUTPUT_VERSION or version == (0, 0, 0))

    def runner_fields(self) -> dict:
        """Request fields that shape the model's runner, the same on every request of a run:
        Ollama reloads a model whose shift setting changes. shift:false (v0.12.6 and later) ends a
        runaway answer at the context limit with done_reason "length" instead of sliding the window."""
        version = self.version()
        return {"shift": False} if version >= SHIFT_VERSION or version == (0, 0, 0) else {}

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
        return self._finish(path, model, answer, started)


# Ollama's option names as OpenAI-compatible request fields: (field, how the value converts).
# num_ctx has none: such a server's context is set when it starts. A repeat penalty (x1.2) is
# the nearest standard field, a frequency penalty (+0.2).
OPENAI_OPTIONS: dict[str, tuple[str, Callable | None]] = {
    "temperature": ("temperature", None),
    "num_predict": ("max_tokens", None),
    "seed": ("seed", None),
    "repeat_penalty": ("frequency_penalty", lambda value: round(value - 1, 2)),
}
# How thinking is switched off, by model name (the first row whose pattern is in the name wins):
# the chat template's enable_thinking switch that vLLM, SGLang and llama.cpp's server document,
# reasoning_effort "none" that Ollama's /v1 and OpenAI document, and the lowest effort for models
# that always reason. A server that refuses a field loses it (see OPTIONAL_FIELDS).
THINKING_OFF: tuple[tuple[str, dict], ...] = (
    ("gpt-oss", {"reasoning_effort": "low"}),
    ("", {"chat_template_kwargs": {"enable_thinking": False}, "reasoning_effort": "none"}),
)
# Fields a server may refuse, in the order they are given up, with the words its error says them in
# ("json_schema": a response_format of that type, which then goes as json_object with the schema).
# Ollama's /v1 refused reasoning_effort "none" as "invalid think value" (v0.11.5 to v0.12.3) and,
# for a model that does not think, "does not support thinking" (v0.12.4).
OPTIONAL_FIELDS: dict[str, tuple[str, ...]] = {
    "json_schema": ("json_schema",),
    "response_format": ("response_format",),
    "chat_template_kwargs": ("chat_template_kwargs",),
    "reasoning_effort": ("reasoning_effort", "think value", "support thinking"),
    "stream_options": ("stream_options",),
    "seed": ("seed",),
    "frequency_penalty": ("frequency_penalty",),
}
# The finish reasons of a whole answer; any other (vLLM's "abort", "error") ended it early.
FINISHED = ("stop", "length")


class OpenAIClient(Client):
    """An OpenAI-compatible server (/v1/chat/completions, /v1/models): LM Studio, llama.cpp's
    llama-server, vLLM, SGLang, or Ollama's own /v1. Images go as data URLs, answers stream as
    server-sent events. It reports no model loads and keeps no model loaded on request; what it
    does not report (a model's capabilities) is unknown, and vision is probed when needed."""

    kind = SERVER_KINDS["openai"]

    def __init__(self, host: str, **settings) -> None:
        super().__init__(host, **settings)
        self.base = host if host.endswith("/v1") else host + "/v1"
        self._models: list[dict] | None = None
        self._refused: set[str] = set()  # OPTIONAL_FIELDS this server refused

    def url(self, path: str) -> str:
        return self.base + path

    def answers(self) -> bool:
        """Whether /v1/models answers with a model list; an error when nothing answers, or it
        wants a key (then it is an OpenAI-compatible server all the same)."""
        try:
            self.models_served()
        except OllamaError as exc:
            if exc.status not in NOT_THIS_API:
                raise
            return False
        return True

    def describe(self) -> str:
        owner = next((str(row.get("owned_by")) for row in self.models_served() if row.get("owned_by")), "")
        return f"OpenAI-compatible server at {self.host}" + (f" (models owned by {owner})" if owner else "")

    def models_served(self) -> list[dict]:
        """The /v1/models list, asked once."""
        if self._models is None:
            data = self._retrying(lambda: self._call("GET", "/models")).get("data")
            if not isinstance(data, list):
                raise OllamaError(f"{self.host} answered /v1/models without a model list", hint=self.kind.base_url)
            self._models = [row for row in data if isinstance(row, dict) and row.get("id")]
        return self._models

    def tags(self) -> list[dict]:
        """The models it serves, shaped as /api/tags lists them (what it does not say is empty)."""
        return [{"name": str(row["id"]), "model": str(row["id"]), "capabilities": None}
                for row in self.models_served()]

    def show(self, model: str) -> dict:
        """What the model list says of one model, shaped as /api/show: capabilities unknown, and the
        context length where the server gives the one it serves with (vLLM's max_model_len)."""
        # The name as given, or Ollama's /v1 listing "x:latest" for x; a request sends the name
        # as given, so any other likeness would be refused on first use.
        row = next((row for row in self.models_served() if str(row["id"]) in (model, with_tag(model))), None)
        if row is None:
            served = ", ".join(str(row["id"]) for row in self.models_served()) or "none"
            raise ModelUnavailable(f"model '{model}' {self.kind.absent} {self.kind.where} {self.host} "
                                   f"(it serves: {served})", hint=self.kind.model_hint.format(model=model, host=self.host))
        length = row.get("max_model_len")
        return {"capabilities": None, "details": {}, "context_length": length}

    def version(self) -> tuple[int, ...]:
        return ()

    def supports_structured_output(self) -> bool:
        """Asked for as response_format until the server refuses it (then answers are plain text)."""
        return "response_format" not in self._refused

    def loaded_models(self) -> list[str]:
        """Such a server does not say which models are loaded: none is known to be."""
        return []

    def chat(self, model: str, messages: list[dict], *, options: dict,
             keep_alive: int | float | str | None = None) -> Answer:
        """One chat completion, streamed and gathered into an Answer.
        A message's "images" (base64 text) become image_url parts before its text."""
        body = self._body(model, [openai_message(message) for message in messages], options)
        return self._retrying(lambda: self._completion(body))

    def generate(self, model: str, prompt: str, *, options: dict,
                 keep_alive: int | float | str | None = None, fmt: dict | None = None,
                 printer=None) -> Answer:
        """The prompt as the one user message of a chat completion; fmt is a JSON schema the
        answer must follow (response_format). A printer sees the answer as it arrives."""
        body = self._body(model, [{"role": "user", "content": prompt}], options)
        if fmt is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": fmt, "strict": True}}
        return self._streamed(lambda on_piece: self._completion(body, on_piece), printer)

    def _body(self, model: str, messages: list[dict], options: dict) -> dict:
        body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        for name, value in options.items():
            field, convert = OPENAI_OPTIONS.get(name, (None, None))
            if field:
                body[field] = convert(value) if convert else value
        body.update(next(fields for pattern, fields in THINKING_OFF if pattern in model.lower()))
        return body

    def _sendable(self, body: dict) -> dict:
        """The body without the fields this server refused."""
        body = {name: value for name, value in body.items() if name not in self._refused}
        shape = body.get("response_format") or {}
        if "json_schema" in self._refused and shape.get("type") == "json_schema":
            body["response_format"] = {"type": "json_object", "schema": shape["json_schema"]["schema"]}
        return body

    def _refused_field(self, exc: OllamaError, body: dict) -> str:
        """The optional field the server's refusal names, if any (as OPTIONAL_FIELDS names it);
        only its own words count, not our host or model names in the message."""
        if isinstance(exc, (ServerUnreachable, ServerTimeout, KeyRefused, ModelUnavailable)):
            return ""
        said = exc.server_text.lower()
        shape = (body.get("response_format") or {}).get("type")
        for field, words in OPTIONAL_FIELDS.items():
            sent = shape == "json_schema" if field == "json_schema" else field in body
            if sent and any(word in said for word in words):
                return field
        return ""

    def _completion(self, body: dict, on_piece=None) -> Answer:
        """Send one streaming chat completion and gather its events; a field the server refuses
        is left out from then on and the request sent again at once."""
        model = body["model"]
        started = time.monotonic()
        while True:
            sent = self._sendable(body)
            try:
                response = self._open("POST", "/chat/completions", sent, timeout=self.timeout)
                break
            except OllamaError as exc:
                field = self._refused_field(exc, sent)
                if not field:
                    raise
                self._refused.add(field)
        answer = Answer()
        text: list[str] = []
        thinking: list[str] = []
        done = False
        with response:
            for event in self._events(response):
                if event is None:  # data: [DONE]; a whole answer said so with its finish reason
                    break
                if event.get("error"):
                    # An error after the first byte comes as an event, with HTTP 200.
                    raise TransientError(f"{self.label} at {self.host} failed while answering: "
                                         f"{error_text(event['error'])}")
                for choice in (event.get("choices") or [])[:1]:
                    delta = choice.get("delta") or choice.get("message") or {}
                    text.append(str(delta.get("content") or ""))
                    thinking.append(str(delta.get("reasoning_content") or delta.get("reasoning") or ""))
                    if on_piece and text[-1]:
                        on_piece(text[-1])
                    if choice.get("finish_reason"):
                        answer.done_reason = str(choice["finish_reason"])
                        if answer.done_reason not in FINISHED:
                            raise TransientError(f"{self.label} at {self.host} ended the answer early "
                                                 f"({excerpt(answer.done_reason, 40)})")
                        done = True
                self._take_usage(answer, event)
        if not done:
            raise TransientError(f"the answer from {self.label} at {self.host} stopped before it was complete")
        answer.text = "".join(text)
        answer.thinking = "".join(thinking)
        answer.total_duration = int((time.monotonic() - started) * 1e9)
        return self._finish("/v1/chat/completions", model, answer, started)

    @staticmethod
    def _take_usage(answer: Answer, event: dict) -> None:
        """Token counts from the usage a server adds at the end, and llama.cpp's timings."""
        usage = event.get("usage") or {}
        timings = event.get("timings") or {}
        answer.prompt_eval_count = int(usage.get("prompt_tokens") or timings.get("prompt_n")
                                       or answer.prompt_eval_count)
        answer.eval_count = int(usage.get("completion_tokens") or timings.get("predicted_n") or answer.eval_count)
        answer.eval_duration = int(float(timings.get("predicted_ms") or 0) * 1e6) or answer.eval_duration

    def _events(self, response) -> Iterator[dict | None]:
        """The server-sent events of a streaming answer: each data as JSON, None for [DONE]. An
        "error" event (or llama.cpp's server's "error:" line) comes as {"error": ...}."""
        data: list[str] = []
        name = ""
        while True:
            raw = self._read(response, line=True)
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if raw and line and not line.startswith(":"):  # ":" starts a comment (a keep-alive)
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "data":
                    data.append(value)
                elif field == "event":
                    name = value.strip()
                elif field == "error":  # llama.cpp's server: "error: {...}", no data line
                    data.append(value)
                    name = "error"
                continue
            if data:  # a blank line (or the end) dispatches the event
                joined = "\n".join(data)
                if joined.strip() == "[DONE]":
                    yield None
                    return
                event = self._decode(joined.encode())
                if name == "error":
                    event = {"error": event.get("error") or event}
                yield event
            data, name = [], ""
            if not raw:
                return


def openai_message(message: dict) -> dict:
    """An Ollama chat message as an OpenAI-compatible one: its images (base64 text) become
    image_url parts with data URLs, before the text, where Ollama's templates put them."""
    images = message.get("images") or []
    if not images:
        return {"role": message["role"], "content": message["content"]}
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return {"role": message["role"], "content": parts + [{"type": "text", "text": message["content"]}]}


def data_url(image_base64: str) -> str:
    """A data URL for an image sent as base64 text; its type read from its first bytes."""
    import base64

    head = base64.b64decode(image_base64[:32] + "=" * (-len(image_base64[:32]) % 4))
    return f"data:image/{_image_kind(head) or 'png'};base64,{image_base64}"


def error_text(error: object) -> str:
    """What an error object says: OpenAI's {"message": ...}, or the value itself."""
    if isinstance(error, dict):
        error = error.get("message") or error
    return excerpt(str(error))


def probe_image() -> str:
    """A 32x32 grey PNG as base64 text: the image of a vision probe (see Client.probe_vision)."""
    import base64
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80\x80\x80" * 32 for _ in range(32))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode("ascii")


def retry_after(headers) -> float:
    """Seconds a Retry-After header asks to wait (0 when there is none, or it is a date)."""
    try:
        return max(0.0, float((headers.get("Retry-After") or "0") if headers else "0"))
    except ValueError:
        return 0.0


def connect(config: Config, host: str = "") -> Client:
    """A client for the configured server (or another of the configured ones), of the kind --api
    names. auto: a URL ending in /v1 is OpenAI-compatible; otherwise a server whose /api/version
    answers is Ollama, one whose /v1/models answers is OpenAI-compatible, and one that answers
    neither is treated as Ollama (its errors then say what is wrong). Each kind gets its own key."""
    url = host or config.host
    api = "openai" if config.api == "auto" and url.rstrip("/").endswith("/v1") else config.api

    def client(kind: str, keys: Sequence[str]) -> Client:
        name = next((name for name in keys if getattr(config, name)), "")
        key = sendable_key(KEY_VARIABLES[name], getattr(config, name)) if name else ""
        return CLIENTS[kind](url, timeout=config.timeout, retries=config.retries, api_key=key,
                             verbose=config.verbose)

    if api != "auto":
        return client(api, SERVER_KINDS[api].keys)
    ollama = client("ollama", SERVER_KINDS["ollama"].keys)
    try:
        if ollama.answers():
            return ollama
    except OllamaError:  # nothing answers: the client says so when it is used
        return ollama
    # A server found by asking gets no OPENAI_API_KEY: that goes only where the user named an
    # OpenAI-compatible server (a /v1 URL or --api openai), never to a host named as Ollama.
    other = client("openai", SERVER_KINDS["ollama"].keys)
    try:
        return other if other.answers() else ollama
    except OllamaError:  # it wants a key, or stopped answering: the client says so when used
        return other


CLIENTS: dict[str, type[Client]] = {"ollama": OllamaClient, "openai": OpenAIClient}
KEY_VARIABLES = {"api_key": "OLLAMA_API_KEY", "openai_api_key": "OPENAI_API_KEY"}  # Config field -> variable


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """Server text as one short line, redacted before it is cut (so no part of a secret shows).

    >>> excerpt("a\\n  b " + "x" * 300, 10)
    'a b xxxxxx...'
    """
    text = re.sub(r"\s*[\r\n\t\v\f]+\s*", " ", redact(text)).strip()
    return text if len(text) <= limit else text[:limit] + "..."


def server_message(raw: bytes, content_type: str = "") -> tuple[str, str]:
    """What an error body says, as (one short line, kind): kind is "api" for the API's own
    {"error": ...} (Ollama's text, or OpenAI's {"message": ...}), "html" for a web page (the line
    is then ""), else "text"."""
    text = raw.decode("utf-8", "replace")
    try:
        data = json.loads(text)
        # SGLang, and vLLM before its nested errors, answer {"object": "error", "message": ...}.
        return error_text(data["error"] if "error" in data or data.get("object") != "error" else data), "api"
    except (ValueError, KeyError, TypeError, AttributeError):
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


# -- Caption policy -----------------------------------------------------------
# A model's answer becomes the text we write in one pass, clean(answer, style): the
# style table says how each kind of answer is judged, the rule table says what is
# removed or flagged. A rule may delete only what is unmistakably about the task, the
# prompt, the file or the model; whatever else it would delete, it flags instead and
# the words stay. What each rule removed or flagged is kept, for --report and review.


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


class OddQuotes:
    """Matches a tag with an unpaired double quote: a piece of a sentence (`steed."`), not a tag."""

    def match(self, text: str) -> bool:
        return (text.count('"') + text.count("\u201c") + text.count("\u201d")) % 2 == 1


class Style(Frozen):
    """One kind of answer: how it is asked for, measured, cleaned and judged (a row of STYLES)."""

    name: str
    form: str  # prose: one line; tags: a tag list; text: lines kept (Markdown, fiction)
    family: str  # which cleaning rules apply: caption, prompt, card, fiction, vision
    unit: str = ""  # what the range counts, a key of UNITS; "" for no range
    low: int = 0
    high: int = 0
    template: str = ""
    sampling: str = ""  # the SAMPLING row of its requests
    structured: bool = False  # asked for as a JSON array where the server can
    clip_budget: bool = False  # a caption over CLIP's 75 tokens is flagged
    faithful: bool = False  # its concrete words must come from the description
    keep_weights: bool = False  # (tag:1.2) weights stay (prompts)
    underscores: bool = False  # tags keep underscores (prompts)
    cut_long: bool = False  # over the maximum is cut to it, not asked again (tag lists)
    clip_fit: bool = False  # trailing tags are left off until the line fits CLIP's budget (printed whole)

    @property
    def kind(self) -> str:
        """The style's name without its mood: "training" for training-creative."""
        return self.name.removesuffix("-creative")

    def size(self, body: str) -> int:
        """The caption's size in the style's unit."""
        return UNITS[self.unit][0](body) if self.unit else 0

    def problem(self, body: str) -> str:
        """What is out of range, or "".

        >>> STYLES["training"].problem("a b c")
        'it has 3 words; a training caption has 50 to 150'
        """
        if not self.unit:
            return ""
        size, noun = self.size(body), UNITS[self.unit][1]
        if self.low <= size <= self.high or size > self.high and self.cut_long:
            return ""  # a long tag list is cut to its maximum, not asked again
        return f"it has {plural(size, noun)}; a {self.kind} caption has {self.low} to {self.high}"

    def distance(self, body: str) -> int:
        """How far a caption is from the range (0 inside it)."""
        if not self.unit:
            return 0
        size = self.size(body)
        return max(self.low - size, 0 if self.cut_long else size - self.high, 0)

    def far_too_long(self, answer: str) -> bool:
        """An answer beyond four times the maximum is a runaway, never written whole."""
        return bool(self.unit) and len(answer.split()) > 4 * self.high * UNITS[self.unit][2]

    def schema(self) -> dict:
        """The JSON schema of a structured tag answer, sized by the range."""
        return {"type": "array", "items": {"type": "string"}, "minItems": self.low, "maxItems": self.high}


# After a closing quote a sentence ends only where the next one starts with a capital:
# 'reads "Hi. Bye." on a desk' goes on.
_SENTENCE_END = lazy_pattern(r"(?<=[.!?])\s+(?=\S)|(?<=[.!?][\"\u201d'])\s+(?=[^\sa-z])")


def count_words(body: str) -> int:
    return len(body.split())


def count_sentences(body: str) -> int:
    return len(split_sentences(body.strip()))


def split_sentences(text: str) -> list[str]:
    """Sentences of a line; a sentence end inside double quotes (a sign's text) is no end.

    >>> split_sentences('A card reads "Hi. Bye." on a desk. It is red.')
    ['A card reads "Hi. Bye." on a desk.', 'It is red.']
    """
    parts, start, counted, quotes, opened = [], 0, 0, 0, 0
    for match in _SENTENCE_END.finditer(text):
        piece = text[counted:match.start()]  # counted once: linear however many quotes stay open
        quotes += piece.count('"')
        opened += piece.count("\u201c") - piece.count("\u201d")
        counted = match.start()
        if quotes % 2 == 0 and opened <= 0:
            parts.append(text[start:match.start()])
            start = match.end()
    parts.append(text[start:])
    return [part for part in parts if part]


def count_tags(body: str) -> int:
    return len([tag for tag in body.split(",") if tag.strip()])


# What each unit counts, its name, and about how many words it takes.
UNITS = {"words": (count_words, "word", 1), "sentences": (count_sentences, "sentence", 40),
         "tags": (count_tags, "tag", 4)}

# Every caption style, accurate and --creative, and the styles of the text commands.
STYLES = {row.name: row for row in (
    Style("training", "prose", "caption", "words", 50, 150, "caption_training", "caption", faithful=True),
    Style("training-creative", "prose", "caption", "words", 50, 150, "caption_training_creative",
          "caption-creative"),
    Style("tags", "tags", "caption", "tags", 20, 40, "caption_tags", "caption", structured=True,
          clip_budget=True, faithful=True, cut_long=True),
    Style("tags-creative", "tags", "caption", "tags", 30, 50, "caption_tags_creative", "caption-creative",
          structured=True, clip_budget=True, cut_long=True),
    Style("detailed", "prose", "caption", "sentences", 2, 4, "caption_detailed", "caption", faithful=True),
    Style("detailed-creative", "prose", "caption", "sentences", 2, 4, "caption_detailed_creative",
          "caption-creative"),
    # --variants: a one-sentence caption within CLIP's 75 tokens, and the T5 paragraph under the name
    # trainers' users give it (an alias of training).
    Style("short", "prose", "caption", "sentences", 1, 1, "caption_short", "caption", clip_budget=True,
          faithful=True),
    Style("short-creative", "prose", "caption", "sentences", 1, 1, "caption_short", "caption-creative",
          clip_budget=True),
    Style("long", "prose", "caption", "words", 50, 150, "caption_training", "caption", faithful=True),
    Style("long-creative", "prose", "caption", "words", 50, 150, "caption_training_creative",
          "caption-creative"),
    Style("vision", "text", "vision", sampling="vision"),
    Style("prompt-t5", "prose", "prompt", template="prompt_t5", sampling="prompt"),
    Style("prompt-clip", "tags", "prompt", template="prompt_clip", sampling="prompt", keep_weights=True,
          underscores=True, clip_fit=True),
    Style("enhance", "prose", "prompt", sampling="enhance-moderate"),
    Style("describe", "text", "card", template="describe", sampling="describe"),
    Style("lore", "text", "fiction", template="lore", sampling="lore-medium"),
)}
CAPTION_STYLES = ("training", "tags", "detailed")
VARIANT_STYLES = (*CAPTION_STYLES, "short", "long")  # what --variants may name
MAX_VARIANTS = 6  # each is one more text call per image
VARIANT_LAYOUTS = ("lines", "files")  # --variants-to: one caption per line of img.txt, or img.NAME.txt each


class Target(Frozen):
    """A preset for one base model: the defaults its LoRA trainers expect (a row of TARGETS)."""

    name: str
    family: str  # the base model, for listings
    style: str  # the caption style: prose (training) for T5/LLM encoders, tags for CLIP ones
    encoder: str  # what reads the caption: clip, t5 or llm; prompt --target picks its encoder from it
    budget: int  # tokens the encoder reads; a caption over it is flagged for review
    quality: str = ""  # quality tags put first only with --quality-tags, never baked in by default
    underscores: bool = False  # booru tags keep underscores (long_hair)
    guidance: str = ""  # a template appended to caption, prompt and enhance requests (no placeholders)
    notes: str = ""

    @property
    def prompt_encoder(self) -> str:
        """The prompt command's encoder: tags for CLIP, prose for everything that reads sentences."""
        return TARGET_ENCODERS[self.encoder][0]

    @property
    def tokens(self) -> str:
        """Whose tokens the budget counts, as the review flag and warnings name them."""
        return TARGET_ENCODERS[self.encoder][1]


# Presets per base model. Budgets: CLIP reads 75 tokens (kohya's --max_token_length extends it);
# T5 and LLM encoders read what their pipelines' max_sequence_length says. Underscores: every
# built-in row writes spaces, as kohya's --remove_underscore and the SDXL-anime checkpoints'
# own prompt guides do; Pony's score_*/source_* keep theirs anyway (normalize_tag). A row in a
# --prompts-dir targets.json may say otherwise for a checkpoint trained on raw Danbooru tags.
PONY_QUALITY = "score_9, score_8_up, score_7_up, score_6_up, score_5_up, score_4_up"
TARGETS = {row.name: row for row in (
    Target("flux", "Flux.1", "training", "t5", 512, notes="T5 reads 512 tokens (schnell 256); no quality tags"),
    Target("sdxl", "SDXL", "tags", "clip", 75, notes="CLIP: 75 tokens, about 30-45 short tags"),
    Target("pony", "Pony Diffusion V6 (SDXL)", "tags", "clip", 75, PONY_QUALITY,
           notes="score_* with --quality-tags; add source_* with --prefix (e.g. source_anime)"),
    Target("illustrious", "Illustrious-XL (SDXL)", "tags", "clip", 75, "masterpiece, best quality",
           notes="quality tags vary per checkpoint: --quality-tags or your own --prefix"),
    Target("noobai", "NoobAI-XL (SDXL)", "tags", "clip", 75,
           "masterpiece, best quality, newest, absurdres, highres",
           notes="rating tags (safe, ...) describe each image: put them in --prefix yourself"),
    Target("sd15", "Stable Diffusion 1.5", "tags", "clip", 75, notes="CLIP: 75 tokens"),
    Target("qwen-image", "Qwen-Image", "training", "llm", 512, notes="Qwen2.5-VL encoder reads sentences"),
    Target("chroma", "Chroma (Flux-based)", "training", "t5", 512, notes="T5 only, no CLIP: prose"),
    Target("wan", "Wan 2.x (video)", "training", "t5", 512, guidance="target_video",
           notes="umT5; motion and camera first"),
    Target("hunyuan-video", "HunyuanVideo", "training", "llm", 256, guidance="target_video",
           notes="LLM encoder, 256 tokens; motion and camera first"),
    Target("ltx", "LTX-Video", "training", "t5", 128, guidance="target_video",
           notes="T5, 128 tokens by default: keep captions short; motion and camera first"),
)}
# encoder: (prompt --encoder, the tokens a budget counts). T5 and LLM tokens are estimated with the
# CLIP counter: close enough for English to tell a caption that will be cut off.
TARGET_ENCODERS = {"clip": ("clip", "CLIP"), "t5": ("t5", "T5 (estimated)"), "llm": ("t5", "LLM (estimated)")}
TARGETS_FILE = "targets.json"  # rows in a --prompts-dir that add targets or change built-in ones

TARGET_NAME = lazy_pattern(r"[a-z0-9][a-z0-9.-]{0,39}")
TARGET_TYPES = {"family": str, "style": str, "encoder": str, "budget": int, "quality": str,
                "underscores": bool, "guidance": str, "notes": str}


def target_table() -> dict[str, Target]:
    """The built-in targets, with the rows of a --prompts-dir targets.json added or applied."""
    path = os.path.join(PROMPTS_OVERRIDE, TARGETS_FILE) if PROMPTS_OVERRIDE else ""
    if not path or not os.path.isfile(path):
        return dict(TARGETS)
    try:
        with open(path, encoding="utf-8") as handle:
            rows = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path} cannot be read as JSON: {exc}",
                         hint='write an object of rows, e.g. {"my-sdxl": {"style": "tags", '
                              '"encoder": "clip", "budget": 75}}') from None
    if not isinstance(rows, dict):
        raise UsageError(f"{path} must hold a JSON object of target rows, not a {type(rows).__name__}")
    table = dict(TARGETS)
    for name, fields in rows.items():
        table[name] = target_row_from(path, name, fields, table.get(name))
    return table


def target_row_from(path: str, name: str, fields: object, base: Target | None) -> Target:
    """One row of targets.json, checked field by field: it changes a built-in row or adds one."""
    where = f"{path}: target {name!r}"
    if not TARGET_NAME.fullmatch(name) or name == "list":
        raise UsageError(f"{where}: a name is lower-case letters, digits, dots and hyphens (not 'list')")
    if not isinstance(fields, dict):
        raise UsageError(f"{where} must be a JSON object of fields")
    unknown = sorted(set(fields) - set(TARGET_TYPES))
    if unknown:
        raise UsageError(f"{where} has unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
                         hint=f"a target's fields: {', '.join(TARGET_TYPES)}")
    for field, value in fields.items():
        if type(value) is not TARGET_TYPES[field]:  # type(): true is not a budget
            raise UsageError(f"{where}: {field} must be a {TARGET_TYPES[field].__name__}, got {value!r}")
    needed = [field for field in ("style", "encoder", "budget") if field not in fields]
    if base is None and needed:
        raise UsageError(f"{where} is new and needs {', '.join(needed)}")
    row = (base or Target(name, name, "", "", 0)).replace(**fields)
    problems = {
        "style": (row.style in CAPTION_STYLES, f"one of {', '.join(CAPTION_STYLES)}"),
        "encoder": (row.encoder in TARGET_ENCODERS, f"one of {', '.join(TARGET_ENCODERS)}"),
        "budget": (1 <= row.budget <= MAX_TOKENS, f"1-{MAX_TOKENS} tokens"),
        "quality": ("\n" not in row.quality and "\r" not in row.quality, "one line"),
        "guidance": (not row.guidance or row.guidance.startswith("target_") and row.guidance in TEMPLATE_FIELDS,
                     "empty or a target_* template: " + ", ".join(n for n in TEMPLATE_FIELDS
                                                                  if n.startswith("target_"))),
    }
    for field, (fine, allowed) in problems.items():
        if not fine:
            raise UsageError(f"{where}: {field} must be {allowed}, got {getattr(row, field)!r}")
    return row


def find_target(name: str | None) -> Target | None:
    """The --target row, or None without one; an unknown name is a usage error listing them all."""
    if name is None:
        return None
    table = target_table()
    if name not in table:
        raise UsageError(f"unknown target {name!r}; the targets: {', '.join(table)}",
                         hint="`ollama-generate caption --target list` shows what each one sets")
    return table[name]


def target_rows() -> list[dict]:
    """Every target as a listing row (--target list, templates)."""
    return [{"name": row.name, "family": row.family, "style": row.style, "encoder": row.encoder,
             "budget": row.budget, "prefix": row.quality or None, "underscores": row.underscores,
             "guidance": row.guidance or None, "notes": row.notes} for row in target_table().values()]


def format_targets(rows: list[dict]) -> list[str]:
    """The targets as an aligned table: name, family, style, budget, prefix, notes."""
    header = {"name": "target", "family": "family", "style": "style", "budget": "budget",
              "prefix": "prefix (--quality-tags)", "notes": "notes"}
    cells = [header] + [{**row, "budget": f"{row['budget']} {row['encoder']}", "prefix": row["prefix"] or "-"}
                        for row in rows]
    columns = list(header)
    widths = {column: max(len(str(cell[column])) for cell in cells) for column in columns[:-1]}
    return ["  ".join(f"{cell[column]!s:<{widths[column]}}" for column in columns[:-1]) + "  " + cell["notes"]
            for cell in cells]


def with_guidance(prompt: str, target: Target | None) -> str:
    """Add the target's guidance template (video: motion and camera first) to a request."""
    return prompt + render(target.guidance) if target and target.guidance else prompt


_ALL = ("caption", "prompt", "card", "fiction", "vision")


class Rule(Frozen):
    """One cleaning rule: where it looks, what it does, to which families of styles.

    scope: answer (anywhere in the raw answer), start (the answer's opening), end (its
    last lines), line, sentence, tag. action: strip (remove the match), drop (remove the
    whole sentence, line or tag), flag (keep it; a person should look). review: a strip
    that still flags the caption (the answer was in the wrong shape).
    """

    name: str
    scope: str
    action: str
    pattern: object  # a lazy_pattern
    families: tuple[str, ...] = _ALL
    review: bool = False
    keep: object = None  # for strip: what of the match stays (a function of the match)
    forms: tuple[str, ...] = ("prose", "tags", "text")
    capitalise: bool = False  # the text that now comes first starts with a capital
    certain: bool = False  # a drop that is about the model wherever it stands (first-person hedges)


_WRITTEN = ("caption", "prompt", "vision")  # answers about a picture, not fiction or a card
_TASK = (r"(?:caption|captions|description|descriptions|prompt|prompts|tag list|tags|answer|response"
         r"|output|rewrite|text)")
_PICTURE = r"(?:image|picture|photo|photograph|illustration|artwork|drawing|painting|render|scene)"

RULES = (
    # The whole answer.
    Rule("think block", "answer", "strip", lazy_pattern(r"<(think|thinking)>.*?</\1>\s*", re.S | re.I)),
    Rule("think block", "answer", "strip", lazy_pattern(r"\A.*</(?:think|thinking)>\s*", re.S | re.I)),
    Rule("think block", "answer", "strip", lazy_pattern(r"\s*<(?:think|thinking)>.*\Z", re.S | re.I)),
    Rule("code fence", "answer", "strip", lazy_pattern(r"^[ \t]*```[\w-]*[ \t]*$", re.M),
         families=("caption", "prompt", "fiction", "vision")),
    Rule("code fence", "answer", "strip", lazy_pattern(r"\A\s*```[\w-]*[ \t]*\n|\n[ \t]*```\s*\Z"),
         families=("card",)),  # a card may hold code; only a fence around the whole answer goes
    Rule("chat token", "answer", "strip", lazy_pattern(
        r"</s>|<\|[a-z_]{2,20}\|>|</?(?:caption|answer|output)>|\bEND OF (?:CAPTION|ANSWER|OUTPUT)\b")),
    Rule("note", "answer", "strip", lazy_pattern(
        r"[ \t]*\((?:\**note\**|word count|tag count)\s*:[^()\n]*\)|[ \t]*\(\d+ (?:words|tags)\)", re.I)),
    # The opening: lead-ins, labels and boilerplate, taken off one after another.
    Rule("lead-in", "start", "strip", lazy_pattern(
        r"\A(?:[^\x00-\x7f][^\n]{0,60}[:\uff1a][ \t]*\n|(?:claro|por supuesto|aqu\u00ed (?:tienes|est\u00e1)"
        r"|voici|bien s\u00fbr|d'accord|nat\u00fcrlich|gerne|hier ist|ecco|certo|certamente)"
        r"(?:[^\n:\uff1a]{0,80}[:\uff1a][ \t]*\n|[^\n:\uff1a]{0,60}(?:pie de foto|descripci\u00f3n|etiquetas"
        r"|l\u00e9gende|description|beschreibung|bildunterschrift|didascalia|descrizione|tags)[^\n:\uff1a]{0,20}"
        r"[:\uff1a]\s*))", re.I)),
    Rule("lead-in", "start", "strip", lazy_pattern(
        r"\A(?:sure|certainly|of course|absolutely|okay|ok|alright|great|got it|here you go|here it is)"
        r"(?:\s*[!.:]+(?=\s|$)|\s*,?\s*(?=(?:here|below|this is)\b))\s*", re.I)),
    Rule("lead-in", "start", "strip", lazy_pattern(
        r"\A(?:here(?:'s| is| are)|below is|this is)\s+(?:(?:the|your|a|an|my|some)\s+)?(?:[\w/-]+\s+){0,4}?"
        r"(?:caption|tag|description|prompt|version|rewrite|result|card|story|answer|output|profile)s?\b"
        r"[^\n:]{0,60}:\s*", re.I)),
    # "The image description is:", but not "The text reads: OPEN" (a sign) nor "The description
    # reads: ..." on a museum label, unless the colon ends the line.
    Rule("lead-in", "start", "strip", lazy_pattern(
        r"\A(?:the|this|my|your)\s+(?:(?:image|final|training|rewritten)\s+(?:caption|description|tags|tag list"
        r"|prompt)s?\s+(?:is as follows|follows|is below|reads as follows|is|are|reads)\s*:"
        r"|(?:caption|description|tags|tag list|output|rewrite|response)s?\s+(?:is as follows|follows|is below"
        r"|reads as follows)\s*[:.]|(?:caption|description|tags|tag list|output|rewrite|response)s?\s+"
        r"(?:is|are|reads)\s*:[ \t]*(?=\n))\s*", re.I)),
    Rule("lead-in", "start", "strip", lazy_pattern(
        r"\A(?:as requested,?|here you have (?:the|your) (?:caption|description|tags|prompt)[.:]"
        r"|i'?d describe it (?:like this|as follows)[^:\n]{0,20}:|(?:caption|option|version|variant) \d+\s*:)\s*",
        re.I)),
    # In a tag answer anything that ends in "tags:" before the first tag is a lead-in.
    Rule("lead-in", "start", "strip", lazy_pattern(
        r"\A(?:(?:the|these|my|your|here are the|here are your)\s+)?(?:[\w/-]+\s+){0,3}?tags?(?:\s+(?:are|is))?\s*:\s*",
        re.I), forms=("tags",)),
    Rule("label", "start", "strip", lazy_pattern(
        r"\A[*_#\s]*(?:(?:final|rewritten|enhanced|improved|training|booru|danbooru|flux|sdxl|image|the)\s+){0,3}"
        r"(?:caption|tags|tag list|description|prompt|answer|output|result|text|lora)"
        r"(?:\s+(?:for|of)\s+[\w/. -]{1,40}?)?[*_]*\s*[:\uff1a][*_]*[ \t]*\n?", re.I)),
    Rule("boilerplate opener", "start", "strip", lazy_pattern(
        rf"\A(?:(?:the|this) {_PICTURE} (?:shows|depicts|features|displays|presents|portrays|captures"
        r"|showcases|contains|is of|is an? (?:image|picture|photo) of)\b"
        rf"|(?:in|within) (?:this|the) {_PICTURE}(?![\w'\u2019-]),?(?=\s)|this is an? (?:image|picture|photo|photograph) of\b"
        r"|the image is (?=an? ))\s*", re.I), families=("caption", "prompt"), forms=("prose",), capitalise=True),
    # The last lines: offers and notes to the reader.
    Rule("offer", "end", "drop", lazy_pattern(
        r"\A(?:let me know\b|i hope (?:this|that|you)\b|feel free\b|would you like\b|do you want\b"
        r"|if you(?:'d| would)? (?:like|need|want)\b|happy to help\b|hope this helps\b|hope you find\b"
        r"|is there anything else\b|thanks? (?:you )?for the (?:task|request)\b"
        r"|i can (?:also )?(?:adjust|provide|make|modify|change)\b)", re.I),
         families=("caption", "prompt", "card", "vision")),
    # In fiction a character may say "let me know": only an offer about the text itself goes.
    Rule("offer", "end", "drop", lazy_pattern(
        r"\A(?:let me know if you(?:'d| would)? (?:like|want|need)|i hope (?:you enjoy|this|that)\b"
        r"|would you like (?:me to|a |another|more)|feel free to (?:ask|let me know|request)"
        r"|if you(?:'d| would)? like (?:me to|a |another|more)|happy to help\b|hope this helps\b)", re.I),
         families=("fiction",)),
    Rule("note", "end", "drop", lazy_pattern(
        r"\A[*_]*(?:note|notes|explanation|word count|tag count|total tags|character count)[*_]*\s*:", re.I),
         families=("caption", "prompt", "fiction", "vision")),
    # Lines: Markdown around prose, and list items where a paragraph was asked for.
    Rule("heading", "line", "drop", lazy_pattern(r"\A\s*(?:#{1,6}\s.*|[-*_]{3,}\s*)\Z"),
         families=_WRITTEN),
    Rule("template echo", "line", "drop", lazy_pattern(
        r"\A\s*[*_]*(?:requirements|output format|output|format|rules|structure|instructions|constraints"
        r"|style|length)[*_]*\s*:", re.I), families=("caption", "prompt")),
    Rule("label", "line", "drop", lazy_pattern(
        r"\A\s*[*_#]*\s*(?:title|subtitle|heading)[*_]*\s*:|\A\s*\*\*(?:caption|tags|description|prompt)\*\*\s*\Z",
        re.I), families=("caption", "prompt")),
    # A label inside the answer ("Rewrite:", "Image Description:") means it has more than one part.
    Rule("label", "line", "strip", lazy_pattern(
        r"\A\s*[*_#]*\s*(?:(?:image|final|training|revised|new) )?(?:description|caption|tags|prompt|rewrite"
        r"|rewritten(?: caption| version)?|revised version|output|answer)[*_]*\s*:[*_]*\s*", re.I),
         families=("caption", "prompt"), review=True),
    Rule("list numbering", "line", "strip", lazy_pattern(r"\A\s*(?:[-*+\u2022]|\d{1,3}[.)])\s+"),
         families=("caption", "prompt"), review=True, forms=("prose",)),
    Rule("markdown", "line", "strip", lazy_pattern(r"\A\s*>\s?"), families=_WRITTEN),
    # Sentences of prose. Drop rules are about the task, the prompt, the file or the model.
    Rule("meta talk", "sentence", "drop", lazy_pattern(
        r"\b(?:flux|t5|lora|loras|sdxl|booru|danbooru|stable diffusion)\b[^.!?]{0,60}"
        rf"\b(?:{_TASK}|training|dataset)\b|\bimage descriptions?\b|\btraining captions?\b"
        r"|\bflux/t5\b|\b(?:flux|sdxl|t5) loras?\b|\blora (?:dataset|training|model)\b"
        r"|\bno (?:description|caption|tags|commentary|notes?|preamble) (?:is )?(?:added|included|follows)\b"
        r"|\bthis is an? (?:[\w-]+ ){0,4}(?:description|caption)\b"
        r"|\bimage described\b|\b(?:as an ai|as a language model)\b"
        r"|\A(?:i (?:did not|didn't|have not|haven't) (?:invent|add|include|use)|i stuck to\b"
        r"|let'?s (?:break down|describe|look at|analy[sz]e)\b|the user (?:wants|asked|requested)\b)"
        r"|\A\(?\s*(?:(?:following|as per|per|according to|in line with) (?:the|your|these|all|my) "
        r"(?:rules|instructions|guidelines|requirements|request)\b"
        rf"|(?:this|the|my|above|previous|following) (?:(?:final|training|rewritten|revised|above) )?{_TASK}"
        r"(?: above| provided| below)? (?:adheres|follows|complies|meets|sticks|avoids|focuses|has been"
        r"|is written|was written|is based|captures|includes|uses|should|contains|describes the image)"
        r"|i (?:have|'ve) (?:avoided|kept|followed|included|omitted|focused|used|made|tried|written|described"
        r"|added|removed|ensured|limited|chosen|rewritten|reworked|revised|edited|changed|adjusted)"
        r"|i (?:avoided|kept|followed|included|omitted|focused|used|made sure|described|ensured)\b"
        r"|no other tags|all tags (?:are|were)|word count|\(?\d+ words\)?\.?\Z)", re.I),
         families=_WRITTEN),
    Rule("hedge", "sentence", "drop", lazy_pattern(
        r"\A(?:i|we) (?:can't|cannot|can not|am unable to|'m unable to|am not able to|'m not able to"
        r"|do not|don't|could not|couldn't) (?:determine|identify|tell|see|know|confirm|make out|say"
        r"|be sure|verify|read|discern)\b", re.I), families=_WRITTEN, certain=True),
    # "It is impossible to tell where the sky ends" describes the picture; doubts about who or
    # what something is are the model's.
    Rule("hedge", "sentence", "flag", lazy_pattern(
        r"\Ait(?:'s| is) (?:not possible|impossible|difficult|hard|unclear) to (?:determine|identify|confirm"
        r"|verify|(?:tell|say|know|see) (?:who|what|whether|if|the (?:exact|specific|identity|name|brand|age)))\b"
        r"|\A(?:the )?(?:exact|specific) (?:identity|location|setting|age|species|breed)"
        r" (?:is|cannot be|remains) (?:unknown|unclear|determined|not clear)", re.I),
         families=("caption", "prompt")),
    # "this photograph" may be a print someone holds; "this image" is the model looking at its input.
    Rule("meta talk", "sentence", "flag", lazy_pattern(
        r"\bthis image\b|\b(?:ai|language|vision|text) model\b|\bthe user\b"
        r"|\b(?:this|my|your) (?:caption|description|prompt|task)\b|\bin summary\b"
        r"|\b(?:tags|keywords|hashtags|alt text|style)\s*:|\bthe image(?:'s)? (?:shows|depicts|features|captures|conveys|evokes|appears|is|has"
        r"|gives|creates|presents|was|looks|contains|appeal|style|composition)\b|\bdescrib(?:e|es|ing) (?:the|this) image\b"
        r"|\bthe use of (?:the )?words?\b|\b(?:of|in|on|across) (?:the|this) image(?![\w'\u2019])|\b(?:the|this|my) (?:caption|rewrite|narrative|answer|response) itself\b"
        r"|\bthe original description\b|\bpreamble\b", re.I), families=("caption", "prompt")),
    Rule("template echo", "sentence", "flag", lazy_pattern(
        r"\b\d+ to \d+ (?:tags|words|sentences)\b|\bone single line\b|\bno trailing comma\b"
        r"|\bwell-formed sentences\b|\band so on\.?\Z|\betc\.?\Z", re.I), families=("caption", "prompt")),
    Rule("filler", "sentence", "drop", lazy_pattern(
        r"\blorem ipsum(?:[\s,.]+(?:dolor|sit|amet|consectetur|adipiscing|elit|sed|do|eiusmod|tempor|incididunt"
        r"|ut|labore|et|dolore|magna|aliqua)\b)*", re.I),
         families=("caption", "prompt", "card", "vision")),
    Rule("aside", "sentence", "strip", lazy_pattern(
        r"\s*\[(?:insert|trigger|name|subject|character|placeholder|note|your)\b[^\[\]\n]{0,60}\]", re.I),
         families=_WRITTEN),
    Rule("arafed", "sentence", "strip", lazy_pattern(r"\b(an? )?(?:arafed|araffe|arafe|arafad)\b\s*", re.I),
         families=_WRITTEN, keep=lambda match: _article_for(match)),
    Rule("aside", "sentence", "flag", lazy_pattern(r"\[[^\[\]\n]{1,80}\]"), families=_WRITTEN),
    Rule("invented link", "sentence", "strip", lazy_pattern(r"!\[[^\]\n]*\]\([^)\n]*\)\s*"),
         families=("card",)),
    # Tags.
    Rule("meta talk", "tag", "drop", lazy_pattern(
        rf"\A(?:no other tags|all tags|here (?:is|are)|the {_PICTURE} (?:shows|depicts)|this {_PICTURE}"
        r"|these are|tags? (?:used|count)|total tags|i (?:have |'ve )?(?:hope|used|avoided|kept|included"
        r"|omitted|made|tried|focused|added|removed|limited|chose|followed)\b)", re.I)),
    Rule("aside", "tag", "drop", lazy_pattern(r"\A\[[^\[\]]*\]\Z"), families=("caption", "vision")),
    Rule("meta talk", "tag", "drop", lazy_pattern(r"\A(?:the|these|above|all|those) tags?\b", re.I)),
    Rule("template echo", "tag", "drop", lazy_pattern(
        r"\A(?:and so on|and more|etc\.?|hope this helps|\d+ tags|caption|tags|output|\d+ to \d+ (?:tags|words)|no trailing comma|output format\b.*|requirements\b.*"
        r"|separated by (?:a )?commas?|all lowercase)\Z", re.I)),
    Rule("fragment", "tag", "drop", lazy_pattern(r"\A(?:([-*_#=~:,;'\"|])\1*|\.|[^\w\s]*[\[\]{}][^\w]*|.*[^\w\s]:)\Z")),
    Rule("fragment", "tag", "drop", OddQuotes()),
    Rule("sentence in tags", "tag", "flag", lazy_pattern(r"\A(?:\S+\s+){6,}\S+\Z")),
)


class Cleaned(Record):
    """What clean() made of an answer: the text, and each span a rule removed or flagged."""

    text: str = ""
    spans: list = []  # (rule name, action, text)
    refused: bool = False

    def note(self, rule: Rule, text: str) -> None:
        """Record what a rule did; a rule that flags what it strips is recorded as both, once."""
        text = one_line(text)
        if text or rule.action == "flag":
            self.spans.append((rule.name, rule.action, text))
        if rule.review and rule.action != "flag" and rule.name not in self.flags:
            self.spans.append((rule.name, "flag", ""))

    def flag(self, rule: Rule, text: str) -> None:
        """Record that a rule would have removed text and flagged it instead."""
        self.spans.append((rule.name, "flag", one_line(text)))

    @property
    def flags(self) -> list[str]:
        """The rules that flagged the text for review, each once."""
        return list(dict.fromkeys(name for name, action, _ in self.spans if action == "flag"))

    @property
    def fired(self) -> list[str]:
        """Every rule that removed or flagged something, each once."""
        return list(dict.fromkeys(name for name, _, _ in self.spans))


ANSWER_LIMIT = 1_000_000  # characters of one answer that are cleaned; no real answer comes near it


def rules_for(style: Style, scope: str) -> list[Rule]:
    """The rules of one scope that apply to a style, in table order."""
    return [rule for rule in RULES if rule.scope == scope and style.family in rule.families
            and style.form in rule.forms]


def clean(answer: str, style: Style, *, cut_off: bool = False) -> Cleaned:
    """Clean one answer for one style, in one pass; nothing is cleaned twice.

    cut_off: the answer stopped at the token limit, so its unfinished end goes.

    >>> clean("Sure! Here is the caption: A red fox in snow. Let me know!", STYLES["training"]).text
    'A red fox in snow.'
    """
    result = Cleaned()
    if len(answer) > ANSWER_LIMIT:  # a runaway from a server that ignores num_predict
        result.spans.append(("too long", "flag", f"{len(answer)} characters, cut to {ANSWER_LIMIT}"))
        answer = answer[:ANSWER_LIMIT]
    text = answer.replace("\r\n", "\n")
    for rule in rules_for(style, "answer"):
        text = _apply(rule, text, result)
    text = strip_stray_quote(strip_wrapping_quotes(_strip_start(text, style, result)))
    if is_refusal(text, style):
        result.refused = True
        result.spans.append(("refusal", "drop", one_line(text)[:200]))
        return result
    text = _strip_end(text, style, result)
    lines = [_clean_line(line, style, result) for line in text.split("\n")]
    FORMS[style.form](lines, style, result, cut_off)
    return result


def _apply(rule: Rule, text: str, result: Cleaned, count: int = 0) -> str:
    """Remove what a strip rule matches, recording each match."""
    def remove(match: re.Match) -> str:
        result.note(rule, match.group(0))
        return rule.keep(match) if rule.keep else ""

    return rule.pattern.sub(remove, text, count=count)


def _strip_start(text: str, style: Style, result: Cleaned) -> str:
    """Take lead-ins, labels and boilerplate off the answer's opening, one after another."""
    text = text.strip()
    for _ in range(4):
        before = text
        for rule in rules_for(style, "start"):
            stripped = strip_wrapping_quotes(_apply(rule, text, result, count=1).lstrip())
            if rule.capitalise and stripped != text:
                stripped = stripped[:1].upper() + stripped[1:]
            text = stripped
        if text == before:
            break
    return text


def _strip_end(text: str, style: Style, result: Cleaned) -> str:
    """Drop trailing lines and sentences that talk to the reader (offers, notes)."""
    lines = text.rstrip().split("\n")
    rules = rules_for(style, "end")
    while lines:
        last = lines[-1].strip()
        if not last:
            lines.pop()
            continue
        # The last sentences, while each is an offer or a note: "Feel free to take one, says a
        # card" followed by more caption is content and stays.
        parts = split_sentences(last)
        while parts:
            rule = next((rule for rule in rules if not _quoted(parts[-1]) and rule.pattern.match(parts[-1])), None)
            if not rule:
                break
            result.note(rule, parts.pop())
        if " ".join(parts) != last:
            lines[-1] = " ".join(parts)
        else:
            break
    return strip_stray_quote(strip_wrapping_quotes("\n".join(lines).strip()))


def _quoted(text: str) -> bool:
    """Whether a sentence opens with a quotation that closes inside it ('"Sorry, we're closed"
    reads the sign'): someone's words, not the model's. A quote that runs to the end is the
    model's own answer in quote marks."""
    close = _QUOTES.get(text[:1]) if text[:1] != "`" else None
    end = text.find(close, 1) if close else -1
    return 0 < end < len(text.rstrip(" .!?")) - 1


def _clean_line(line: str, style: Style, result: Cleaned) -> str:
    """One line: Markdown and list markers off, echo lines dropped."""
    for rule in rules_for(style, "line"):
        if rule.action == "drop":
            if rule.pattern.match(line):
                result.note(rule, line)
                return ""
        else:
            line = _apply(rule, line, result, count=1)
    return line.strip()


def _clean_prose(lines: list[str], style: Style, result: Cleaned, cut_off: bool) -> None:
    """Prose: one line of sentences; emphasis marks off, loops cut at the end, sentence rules applied."""
    lines = [_BOLD_LINE.sub(r"\1", line) for line in lines]  # a whole line in bold: **"A caption."**
    text = one_line(" ".join(_EMPHASIS.sub(r"\2", line).replace("`", "") for line in lines))
    if cut_off:
        text = _drop_unfinished_sentence(text, result)
    text = cut_loop(text, result, cut_off=cut_off)
    result.text = strip_wrapping_quotes(_clean_sentences(text, style, result))


def _clean_text(lines: list[str], style: Style, result: Cleaned, cut_off: bool) -> None:
    """Text that keeps its lines (a card's Markdown, fiction): sentence rules line by line,
    paragraph breaks kept."""
    kept: list[str] = []
    for line in lines or []:
        cleaned = _clean_sentences(line, style, result) if line else ""
        if cleaned or kept and kept[-1]:
            kept.append(cleaned)
    result.text = "\n".join(kept).strip()


def _clean_sentences(text: str, style: Style, result: Cleaned) -> str:
    """Apply the sentence rules: strip spans, drop task talk, flag the doubtful."""
    rules = rules_for(style, "sentence")
    kept = []
    sentences = split_sentences(text)
    for index, sentence in enumerate(sentences):
        # Inside a caption only a sentence with nothing concrete in it is deleted; at its start
        # or end a short aside about the task goes too. Otherwise the rule flags it, and it stays.
        middle = 0 < index < len(sentences) - 1
        for rule in rules:
            allowed = 1 if middle and not rule.certain else CONTENT_WORDS_KEPT
            if rule.action == "strip":
                sentence = _apply(rule, sentence, result)
            elif rule.action == "drop" and not _quoted(sentence) and _unquoted_match(rule, sentence):
                if _describes_something(rule, sentence, allowed):  # task talk around content: keep it
                    result.flag(rule, sentence)
                    continue
                result.note(rule, sentence)
                sentence = ""
                break
            elif rule.action == "flag" and _unquoted_match(rule, sentence):
                result.note(rule, sentence)
        sentence = sentence.strip()
        if sentence:
            kept.append(sentence)
    return " ".join(kept)


CONTENT_WORDS_KEPT = 3  # a sentence with this many concrete words besides a rule's match says something


def _describes_something(rule: Rule, sentence: str, allowed: int = CONTENT_WORDS_KEPT) -> bool:
    """Whether a sentence a drop rule matched also describes the picture ("The image description
    is a classic example of a LoRA, with a girl in a red coat and boots"): then it is flagged, not
    deleted."""
    rest = rule.pattern.sub(" ", sentence)
    return len([word for word in content_words(rest)
                if word not in _TASK_WORDS and word_stem(word) not in _TASK_WORDS]) >= allowed


# Words of talk about the task, which say nothing about the picture.
_TASK_WORDS = frozenset("""
rule rules instruction instructions guideline guidelines requirement requirements caption captions
description descriptions prompt prompts tag tags word words detail details fact facts term terms
subjective objective avoid avoided focus focused include included omit omitted mention mentions
praise judgement judgment concise paragraph sentence sentences single trigger quality output format
request requested user task answer response example follow followed stick stuck accurate accurately
avoid focus includ omitt mention describ visible
""".split())


def _unquoted_match(rule: Rule, sentence: str) -> bool:
    """Whether a rule matches a sentence outside the words it quotes (a sign's text is content)."""
    return bool(rule.pattern.search(_QUOTED.sub('""', sentence)))


_QUOTED = lazy_pattern(r"\"[^\"]*\"|\u201c[^\u201d]*\u201d|\u00ab[^\u00bb]*\u00bb|(?<!\w)'[^']*'(?!\w)")
_BOLD_LINE = lazy_pattern(r"\A\s*(?:\*\*|__)(.+)(?:\*\*|__)\s*\Z")
_EMPHASIS = lazy_pattern(r"(?<![\w*])(\*\*|__|\*|_)(?=\S)([^*_\n]{1,200}?)(?<=\S)\1(?![\w*])")


def _article_for(match: re.Match) -> str:
    """The article that fits the word after a removed "arafed" ("an arafed man" -> "a man")."""
    if not match.group(1):
        return ""
    following = match.string[match.end():match.end() + 1].lower()
    article = "an" if following and following in "aeiou" else "a"
    return (article.capitalize() if match.group(1)[0].isupper() else article) + " "


def _drop_unfinished_sentence(text: str, result: Cleaned) -> str:
    """An answer cut at the token limit ends mid-sentence: keep what was finished."""
    end = max(text.rfind(mark) for mark in ".!?")
    if 0 < end < len(text) - 1:
        result.spans.append(("cut off", "strip", text[end + 1:].strip()))
        return text[:end + 1]
    if end < 0:  # not one finished sentence: kept, but a person should look
        result.spans.append(("cut off", "flag", " ".join(text.split()[-6:])))
    return text


def _clean_tags(lines: list[str], style: Style, result: Cleaned, cut_off: bool) -> None:
    """Tags: a JSON list, or split on commas and new lines only; every kaomoji character kept."""
    raws = _json_tags("\n".join(lines))
    if raws is None:  # commas and new lines only: ;) and :d are tags, not separators
        raws = [part for line in lines for part in _tag_separator(line).split(line)]
    raws = [raw.strip() for raw in raws if raw.strip()]
    if cut_off and len(raws) > 1:
        result.spans.append(("cut off", "strip", raws.pop()))
    rules = rules_for(style, "tag")
    tags: list[str] = []
    for raw in raws:
        tag = normalize_tag(raw, underscores=style.underscores, keep_weights=style.keep_weights)
        rule = next((rule for rule in rules if rule.pattern.match(tag)), None)
        if rule and rule.action == "drop" or not tag:
            if rule:
                result.note(rule, raw)
            continue
        if rule:
            result.note(rule, tag)
        if tag not in tags:
            tags.append(tag)
    result.text = ", ".join(tags)


def _tag_separator(line: str):
    """Commas; a line with no comma but several "; " is a list separated by semicolons."""
    return _SEMICOLONS if "," not in line and line.count("; ") >= 2 else _COMMAS


_COMMAS = lazy_pattern(r",")
_SEMICOLONS = lazy_pattern(r";\s+")


def _json_tags(text: str) -> list[str] | None:
    """The tags of a structured (JSON) answer, or None when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict):  # {"tags": [...]} or {"tags": "a, b, c"}
        value = next((item for item in value.values() if isinstance(item, list)),
                     next((item.split(",") for item in value.values() if isinstance(item, str) and "," in item),
                          []))
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []  # JSON, but no tags in it: nothing usable


FORMS = {"prose": _clean_prose, "tags": _clean_tags, "text": _clean_text}

_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb", "`": "`"}


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


def strip_stray_quote(text: str) -> str:
    """Remove a quote mark that opens or closes the whole answer and has no partner.

    >>> strip_stray_quote('"A fox in snow.'), strip_stray_quote('A sign reads "OPEN" now."')
    ('A fox in snow.', 'A sign reads "OPEN" now.')
    """
    if text.count('"') % 2 and text[:1] == '"':
        return text[1:].strip()
    if text.count('"') % 2 and text[-1:] == '"':
        return text[:-1].strip()
    return text


def _quotes_inside(text: str) -> bool:
    """Whether the inner text uses the wrapping quote mark as a quote (not an apostrophe)."""
    inner = text[1:-1]
    for mark in {text[0], text[-1]}:
        first = inner.find(mark)
        if mark == '"' and first > 0 and inner[first - 1].isspace() and inner.count(mark) % 2 == 0:
            continue  # the inner quotes open after a space and close again: the outer pair wraps
        for index, char in enumerate(inner):
            if char != mark:
                continue
            between_letters = 0 < index < len(inner) - 1 and inner[index - 1].isalnum() \
                and inner[index + 1].isalnum()
            if not (mark in "'\u2019" and between_letters):
                return True
    return False


def one_line(text: str) -> str:
    """Join lines and collapse whitespace into a single line."""
    return " ".join(text.split())


def strip_think(text: str) -> str:
    """Remove reasoning blocks, closed or not.

    >>> strip_think("<think>hmm</think>A cat.")
    'A cat.'
    >>> strip_think("plan first</think>A dog.")
    'A dog.'
    >>> strip_think("A bird. <think>ran out of tokens")
    'A bird.'
    """
    for rule in RULES:
        if rule.name == "think block":
            text = rule.pattern.sub("", text)
    return text.strip()


_REFUSAL_OPENER = lazy_pattern(
    r"\A(?:i'?m sorry|i am sorry|sorry[,.!]|i apologi[sz]e|my apologies|i can(?:no|')t\b|i cannot\b"
    r"|i can not\b|i(?:'m| am) (?:unable|not able)\b|i won'?t\b|i will not\b|as an ai\b"
    r"|as a language model\b|unfortunately,? i\b|i'?m afraid i\b)", re.I)
_REFUSAL_REASON = lazy_pattern(
    r"\b(?:can(?:no|')t|cannot|can not|unable to|not able to|won'?t|will not|not comfortable|must decline"
    r"|decline to|not allowed to|not permitted to)\s+(?:\w+\s+){0,3}?(?:describe|help|assist|provide|caption"
    r"|tag|process|comply|fulfil+|create|generate|write|identify|view|see|analy[sz]e|do that|continue"
    r"|produce|make|access|open)\b|\bas an ai\b|\bas a language model\b|\bcontent polic", re.I)
_FICTION_REFUSAL = lazy_pattern(
    r"\blanguage model\b|\bcontent polic|\bguidelines\b|\b(?:this|that|your) request\b|\bmust decline\b"
    r"|\binappropriate\b|\bexplicit content\b|\bcan(?:no|')t (?:continue|write|help with|create) (?:this|that"
    r"|the|your)\b", re.I)
# A short answer that only says the picture cannot be made out.
_CANNOT_SEE = lazy_pattern(
    r"\Ait(?:'s| is) (?:not possible|impossible|difficult|hard) to (?:determine|tell|see|say|make out) what"
    r" (?:the|this) (?:image|picture|photo)", re.I)
REFUSAL_WORDS = 60  # a refusal is short: a long answer that apologises is describing something


def is_refusal(text: str, style: Style | None = None) -> bool:
    """Whether a whole answer refused instead of answering: short, apologetic, and saying it will not.

    Judged on the answer as a whole, never on a sentence inside a caption; in fiction the
    first person is the genre, so only talk of requests, policies or being an AI counts.

    >>> is_refusal("I'm sorry, but I can't describe this image."), is_refusal("A sorry-looking dog.")
    (True, False)
    >>> is_refusal("I cannot remember when the sea took my brother.", STYLES["lore"])
    False
    """
    text = strip_wrapping_quotes(text.strip())
    if len(text.split()) > REFUSAL_WORDS:
        return False
    if _CANNOT_SEE.match(text):
        return True
    if not _REFUSAL_OPENER.match(text):
        return False
    style = style or STYLES["training"]
    reason = _FICTION_REFUSAL if style.family == "fiction" else _REFUSAL_REASON
    return bool(reason.search(text))


LOOP_SCAN = 40  # the longest repeated phrase looked for, in words
# Repeats that make a loop: {cut off at the token limit: (a phrase of 8 letters or more, shorter)}.
LOOP_REPEATS = {True: (3, 6), False: (4, 12)}
_PUNCTUATION = ".,;:!?\"'()[]{}*_\u201c\u201d\u2018\u2019"


def cut_loop(text: str, result: Cleaned | None = None, *, cut_off: bool = False) -> str:
    """Cut a loop: a phrase repeated on to the end of the answer.

    A phrase of 8 letters or more must come 3 times in a row, a shorter one 6 times; a
    repetition inside the text (a pattern, the words on a sign) is content and stays.
    An answer that hit the token limit (cut_off) loops with 3 repeats (6 for a short phrase),
    and its last repetition may be unfinished; one that ended by itself needs 4 (12): a sign
    reading "SALE SALE SALE" at the end of a caption is content. Never inside open quotes.
    Linear in the length of the text.

    >>> cut_loop("A cat sits on a mat. A cat sits on a mat. A cat sits on a mat. A cat sits", cut_off=True)
    'A cat sits on a mat.'
    >>> cut_loop("black and white, black and white, black and white tiles in a hallway.")
    'black and white, black and white, black and white tiles in a hallway.'
    """
    words = text.split()
    keys = [word.lower().strip(_PUNCTUATION) for word in words]
    count = len(words)
    for size in range(1, min(LOOP_SCAN, count // 3) + 1):
        # Walk back from the end while each word equals the one a phrase earlier.
        first = count
        while first - size > 0 and keys[first - 1] == keys[first - 1 - size]:
            first -= 1
        start = first - size  # the periodic run is words[start:]
        unit = keys[start:start + size]
        if not all(unit):
            continue
        times = LOOP_REPEATS[cut_off][sum(map(len, unit)) < 8]
        if count - start >= times * size and " ".join(words[:start + size]).count('"') % 2 == 0:
            end = start + size
            if words[end - 1][-1:] not in ".!?":  # end the kept copy where its sentence ends
                end = next((at + 1 for at in range(end, min(end + size, count)) if words[at][-1:] in ".!?"), end)
            kept = " ".join(words[:end]).rstrip(",;: ")
            if result is not None:
                result.spans.append(("loop", "strip", " ".join(words[end:])))
            return kept
    return text


def has_loop(text: str, *, cut_off: bool = False) -> bool:
    """Whether the answer ends in a loop."""
    return cut_loop(text, cut_off=cut_off) != text


def is_kaomoji(tag: str) -> bool:
    """Emoticon tags like ^_^, >_< and ;) keep every character.

    >>> is_kaomoji("^_^"), is_kaomoji("o_o"), is_kaomoji(";)"), is_kaomoji("long_hair")
    (True, True, True, False)
    """
    return len(tag) <= 5 and not re.search(r"[a-z]{2}|\s", tag) and bool(re.search(r"[^\w\s]|_", tag))


_WEIGHT = lazy_pattern(r"^\(+([^():]+?)(?::\s*[\d.]+)?\)+$")
# Tags whose underscores are part of the name: Pony's score_9, source_anime, rating_safe.
_UNDERSCORED = lazy_pattern(r"^(?:score_\d\w*|source_\w+|rating_\w+)$")
_LIST_MARK = lazy_pattern(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)])\s+")


def normalize_tag(raw: str, *, underscores: bool = False, keep_weights: bool = False) -> str:
    """One tag as trainers want it: lower case, single spaces, no weights or end periods.

    >>> normalize_tag("  Long_Hair. "), normalize_tag("(masterpiece:1.2)"), normalize_tag(">_<")
    ('long hair', 'masterpiece', '>_<')
    >>> normalize_tag("score_8_up"), normalize_tag(";)"), normalize_tag("**smile**")
    ('score_8_up', ';)', 'smile')
    """
    tag = _LIST_MARK.sub("", raw.strip())
    tag = re.sub(r"^(\*\*|`)(.*\w.*)\1$", r"\2", tag)  # a whole tag in bold or code marks
    tag = strip_wrapping_quotes(tag)
    if is_kaomoji(tag) or re.fullmatch(r"\(\S{2,12}\)", tag) and not re.search(r"[a-z]{3}", tag.lower()):
        return tag.lower()  # ^_^, ._., (^_^), (=^･ω･^=): every character is the face
    weighted = _WEIGHT.match(tag)
    if weighted and not keep_weights:
        tag = weighted.group(1)
    tag = one_line(tag.lower())
    if re.search(r"[^\W_]", tag):
        tag = tag.rstrip(".").strip()
    if not (underscores or is_kaomoji(tag) or _UNDERSCORED.match(tag)):
        tag = one_line(tag.replace("_", " "))
    return tag


def without_trigger(text: str, trigger: str) -> str:
    """Remove standalone mentions of the trigger and the punctuation they leave behind.

    Never part of a word, a possessive or a hyphenated name.

    >>> without_trigger("ohwx, a woman holding Mira's red umbrella", "ohwx")
    "a woman holding Mira's red umbrella"
    >>> without_trigger("Mira holds Mira's umbrella", "Mira")
    "holds Mira's umbrella"
    """
    pattern = re.compile(rf"(?<![\w'\u2019-]){re.escape(trigger)}(?![\w'\u2019-])", re.I)
    if not pattern.search(text):
        return text
    text = pattern.sub("", text)
    text = re.sub(r"\(\s*\)|\[\s*\]|\"\s*\"", "", text)
    text = re.sub(r"\s+([,.;!?])", r"\1", text)
    text = re.sub(r"([,;])(?:\s*[,;])+", r"\1", text)
    text = re.sub(r"[,;]+(?=[.!?])", "", text)
    return one_line(text).strip(" ,;")


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


def arrange_tags(tags: list[str], *, trigger: str = "", prefix: str = "", exclude: Sequence[str] = (),
                 always_first: Sequence[str] = (), underscores: bool = False,
                 limit: int | None = None) -> tuple[list[str], list[str]]:
    """Order and trim tags: --always-first ones first, excluded and prefix tags out, at most limit.

    Returns (the tags to write, the model's own among them). The trigger is removed here
    (also as a word inside a tag: "ohwx woman"); layout_caption puts it first.

    >>> arrange_tags(["smile", "1girl", "solo", "hat"], exclude=["hat"], always_first=["1girl", "solo"])
    (['1girl', 'solo', 'smile'], ['smile'])
    """
    def norm(tag: str) -> str:
        return normalize_tag(tag, underscores=underscores)

    taken = {norm(tag) for tag in prefix.split(",")} | {norm(tag) for tag in exclude}
    if trigger:
        taken.add(norm(trigger))
        tags = [without_trigger(tag, trigger) if not is_kaomoji(tag) else tag for tag in tags]
    first = [norm(tag) for tag in always_first if norm(tag) and norm(tag) not in taken]
    own = [tag for tag in dict.fromkeys(tags) if tag and tag not in taken and tag not in first]
    arranged = list(dict.fromkeys(first + own))
    arranged = arranged[:max(limit, len(first))] if limit else arranged
    return arranged, [tag for tag in arranged if tag in own]


def estimate_clip_tokens(text: str) -> int:
    """Estimate the number of CLIP BPE tokens of text, without the start and end tokens, with no
    vocabulary (clip_tokens() counts exactly when one is on this machine).

    CLIP lower-cases the text and splits it into pieces: a contraction ('s, 't, 're, 've, 'm, 'll,
    'd), a run of letters, a single digit, or a run of other non-space characters (punctuation,
    underscores, symbols, emoji), then BPE-merges each piece. Here a digit or a contraction is one
    token. A run of up to 6 ASCII letters is one token (common words are); a longer one costs more
    with the square of the excess, and past 18 letters a third of a token a letter. A run of 5 or
    more letters costs more when it looks foreign: ending in a, i, o or u, or holding j, k, q, x or z.
    Accented Latin letters cost a token each, and the word a tenth of a token a letter more (crème
    is 3, brûlée 5). Other scripts are priced per letter: Greek and Hebrew 2 (each UTF-8 byte is a
    token), Cyrillic 1.1, Arabic 0.8, CJK and Hangul 1.8, any other 1 per UTF-8 byte; such a run
    costs half a token more, except Greek and Hebrew. An ASCII punctuation run of n characters costs
    max(1, n - 1): ")," is one token, "))," two. An emoji or a dingbat is one token (❤️ with its
    variation selector, skin tones and joiners are free), other symbols half a token a UTF-8 byte.
    The sum is raised by 1 % and rounded up once past .4. Tuned on bench/clip_tuning.jsonl and
    measured on bench/clip_heldout.jsonl (bench/CLIP.md): errors fall both ways, so a caption a
    token or two from the budget can be called either side of it.

    >>> estimate_clip_tokens("1girl, long_hair, looking at viewer, (masterpiece:1.2)")  # real: 18
    19
    >>> [estimate_clip_tokens(text) for text in ("crème brûlée", "Αθήνα", "❤️", "東京")]  # real: 8 10 1 4
    [6, 10, 1, 4]
    >>> estimate_clip_tokens("")
    0
    """
    import html
    import unicodedata

    # CLIP's ftfy pass straightens curly quotes; dashes and the ellipsis are one token each anyway.
    text = unicodedata.normalize("NFC", html.unescape(text)).lower().translate(
        {0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"', 0x2013: "-", 0x2014: "-", 0x2026: "."})
    total = 0.0
    for piece in re.findall(r"'(?:s|t|re|ve|m|ll|d)|[^\W\d_]+|\d|(?:[^\w\s]|_)+", text):
        if piece[0].isalpha():
            total += _letters_cost(piece)
        elif piece[0].isdigit() or (piece[0] == "'" and piece[1:].isalpha()):
            total += 1
        elif piece.isascii():
            total += max(1, len(piece) - 1)
        else:
            ascii_run = sum(char.isascii() for char in piece)
            total += max(1, ascii_run - 1) if ascii_run else 0
            total += sum(_symbol_cost(char) for char in piece if not char.isascii())
    return math.ceil(total * 1.01 - 0.4)


def _letters_cost(piece: str) -> float:
    """Estimated tokens of a run of letters (see estimate_clip_tokens)."""
    size = len(piece)
    if all(ord(char) < 0x250 for char in piece):  # ASCII and accented Latin
        excess = max(0, size - 6)
        cost = 1 + min((excess / 6) ** 2, excess / 3)
        if size >= 5:
            cost += (piece[-1] in "aiou") + 0.4 * sum(char in "jkqxz" for char in piece)
        accents = sum(ord(char) >= 0x80 for char in piece)
        return cost + (accents + 0.1 * size if accents else 0)
    if size == 1:
        return 1
    cost = 0.0 if 0x370 <= ord(piece[0]) < 0x400 or 0x590 <= ord(piece[0]) < 0x600 else 0.5
    for char in piece:
        code = ord(char)
        if code < 0x250:
            cost += 1
        elif 0x370 <= code < 0x400 or 0x590 <= code < 0x600:  # Greek, Hebrew: a token a byte
            cost += 2
        elif 0x400 <= code < 0x530:  # Cyrillic
            cost += 1.1
        elif 0x600 <= code < 0x700:  # Arabic
            cost += 0.8
        elif 0x3040 <= code < 0xA000 or 0xAC00 <= code < 0xD7B0:  # kana, CJK, Hangul
            cost += 1.8
        else:
            cost += len(char.encode())
    return cost


def _symbol_cost(char: str) -> float:
    """Estimated tokens of one non-ASCII character in a run of punctuation and symbols."""
    code = ord(char)
    if char in "\ufe0f\u200d" or 0x1F3FB <= code <= 0x1F3FF:  # variation selector, joiner, skin tone
        return 0
    if code >= 0x1F000 or 0x2600 <= code < 0x2800 or 0x2B00 <= code < 0x2C00:  # emoji, dingbats
        return 1
    if 0x2010 <= code < 0x2070:  # dashes, the ellipsis, general punctuation
        return 1
    return len(char.encode()) / 2


# The exact count, when a CLIP BPE vocabulary is on this machine: OpenAI's tokenizer (and Hugging
# Face's CLIPTokenizer with ftfy) in the standard library. Looked for only when a count is first
# needed, never downloaded; packages that ship the vocabulary are located, not imported.
CLIP_VOCAB_ENV = "OLLAMA_GENERATE_CLIP_VOCAB"
CLIP_MERGES = 49152 - 256 - 2  # the merges OpenAI's tokenizer reads, after the header line
CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
CLIP_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


class ClipTokenizer:
    """CLIP's BPE: ftfy's and html's clean-up, lower case, CLIP's split, byte-level merges."""

    def __init__(self, path: str) -> None:
        import gzip

        with open(path, "rb") as handle:
            data = handle.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        lines = data.decode("utf-8").split("\n")
        if lines[1:3] != ["i n", "t h"] or len(lines) <= CLIP_MERGES:
            raise ValueError("not a CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz or merges.txt)")
        self.path = path
        self.ranks = {tuple(line.split()): rank for rank, line in enumerate(lines[1:CLIP_MERGES + 1])}
        self.sizes: dict[str, int] = {}
        self.table = _ftfy_table()
        table = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        extra = [byte for byte in range(256) if byte not in table]
        self.bytes = {byte: chr(byte) for byte in table} | {byte: chr(256 + n) for n, byte in enumerate(extra)}

    def count(self, text: str) -> int:
        """CLIP tokens of text, without the start and end tokens."""
        return sum(self._size(piece) for piece in clip_pieces(clip_clean(text, self.table)))

    def _size(self, piece: str) -> int:
        if piece in CLIP_SPECIAL:
            return 1
        if piece not in self.sizes:
            word = [self.bytes[byte] for byte in piece.encode("utf-8")]
            word[-1] += "</w>"
            while len(word) > 1:  # merge the best-ranked pair everywhere, until no pair has a rank
                bigram = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, CLIP_MERGES))
                if bigram not in self.ranks:
                    break
                merged, at = [], 0
                while at < len(word):
                    if at < len(word) - 1 and (word[at], word[at + 1]) == bigram:
                        merged.append(bigram[0] + bigram[1])
                        at += 2
                    else:
                        merged.append(word[at])
                        at += 1
                word = merged
            self.sizes[piece] = len(word)
        return self.sizes[piece]


def clip_clean(text: str, table: Mapping[int, str | None]) -> str:
    """CLIP's clean-up: ftfy's fixes that matter for text we write (table: straight quotes, no
    ligatures or fullwidth forms, no stray controls; then NFC), HTML entities twice, one space,
    lower case."""
    import html
    import unicodedata

    text = text.translate(table)
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text)))
    return " ".join(text.split()).lower()


def _ftfy_table() -> dict[int, str | None]:
    """ftfy's character fixes as a str.translate table."""
    import unicodedata

    table: dict[int, str | None] = {code: None for code in [*range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F,
                                                            *range(0x206A, 0x2070), 0xFEFF,
                                                            *range(0xFFF9, 0xFFFD)]}
    table.update({code: "'" for code in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)})
    table.update({code: '"' for code in range(0x201C, 0x2020)})
    table.update({0xFB00: "ff", 0xFB01: "fi", 0xFB02: "fl", 0xFB03: "ffi", 0xFB04: "ffl", 0xFB05: "\u017ft",
                  0xFB06: "st", 0x0132: "IJ", 0x0133: "ij", 0x0149: "\u02bcn", 0x3000: " "})
    for code in range(0xFF01, 0xFFF0):
        if unicodedata.normalize("NFKC", chr(code)) != chr(code):
            table[code] = unicodedata.normalize("NFKC", chr(code))
    return table


def clip_pieces(text: str) -> list[str]:
    r"""CLIP's split of cleaned text: 's|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+.

    >>> clip_pieces("it's 1girl, ((masterpiece:1.2)) ❤️")
    ['it', "'s", '1', 'girl', ',', '((', 'masterpiece', ':', '1', '.', '2', '))', '❤️']
    """
    import unicodedata

    kinds = [" " if char.isspace() else unicodedata.category(char)[0] for char in text]
    pieces, at = [], 0
    while at < len(text):
        kind = kinds[at]
        if kind == " ":
            at += 1
            continue
        known = next((word for word in CLIP_SPECIAL + CLIP_CONTRACTIONS if text.startswith(word, at)), "")
        end = at + len(known) if known else at + 1
        if not known and kind == "L":
            while end < len(text) and kinds[end] == "L":
                end += 1
        elif not known and kind != "N":
            while end < len(text) and kinds[end] not in " LN":
                end += 1
        pieces.append(text[at:end])
        at = end
    return pieces


def clip_vocabulary(env: Mapping[str, str]) -> str | None:
    """A CLIP vocabulary file on this machine: $OLLAMA_GENERATE_CLIP_VOCAB (none: never look), the
    one an installed open_clip or clip package ships, or a CLIP tokenizer's merges.txt in the
    Hugging Face cache (SD 1.5, SDXL and CLIP models keep one)."""
    import glob
    import importlib.util

    if CLIP_VOCAB_ENV in env:
        return None if env[CLIP_VOCAB_ENV].strip().lower() in ("", "none") else env[CLIP_VOCAB_ENV]
    for package in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(package)  # finds the folder; runs nothing
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if os.path.isfile(os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")):
                return os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")
    hub = env.get("HF_HUB_CACHE") or os.path.join(
        env.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    for path in sorted(glob.glob(os.path.join(glob.escape(hub), "models--*", "snapshots", "*", "**",
                                              "merges.txt"), recursive=True)):
        try:
            with open(path, "rb") as handle:
                if handle.read(64).split(b"\n")[1:3] == [b"i n", b"t h"]:
                    return path
        except (OSError, IndexError):
            continue
    return None


_CLIP_TOKENIZERS: dict[str | None, ClipTokenizer | None] = {}


def clip_tokenizer(env: Mapping[str, str] = os.environ) -> ClipTokenizer | None:
    """The exact tokenizer if a vocabulary is found (loaded once), else None: then we estimate."""
    setting = env.get(CLIP_VOCAB_ENV)
    if setting not in _CLIP_TOKENIZERS:
        path = clip_vocabulary(env)
        tokenizer = None
        if path:
            try:
                tokenizer = ClipTokenizer(path)
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                warn(f"{CLIP_VOCAB_ENV if setting else 'the CLIP vocabulary'} {shown(path)} cannot be used "
                     f"({getattr(exc, 'strerror', None) or exc}); CLIP tokens are estimated")
        _CLIP_TOKENIZERS[setting] = tokenizer
    return _CLIP_TOKENIZERS[setting]


def clip_tokens(text: str) -> tuple[int, bool]:
    """CLIP tokens of text without start and end, and whether the count is exact: exact with a
    local vocabulary, else estimated."""
    tokenizer = clip_tokenizer()
    return (tokenizer.count(text), True) if tokenizer else (estimate_clip_tokens(text), False)


# An estimate errs both ways; calling text over the 75-token budget from 2 tokens below it keeps
# silent overflows rare (1 in 891 on the tuning set, bench/CLIP.md) for a few false alarms.
CLIP_ESTIMATE_MARGIN = 2


def over_clip_budget(text: str, budget: int = 75) -> int | None:
    """The count (exact or estimated) when text is, or may be, over CLIP's budget; else None."""
    tokens, exact = clip_tokens(text)
    return tokens if tokens > budget - (0 if exact else CLIP_ESTIMATE_MARGIN) else None


# -- Faithfulness ---------------------------------------------------------------
# In accurate mode the text model only rewrites: every concrete word of the caption
# (objects, colours, counts, clothing, named text) should come from the vision
# description. Words are compared by stem, and through a few synonym groups.

_FUNCTION_WORDS = frozenset("""
a an the and or but nor of in on at to for with without from by as is are was were be been being am
has have had having do does did it its it's this that these those there here their theirs they them
he she his her hers him i we you your yours our ours my me us who whom whose which what while where
when then than so such very more most less least also just only into onto over under above below
behind between beside besides near next across along around through up down out off against toward
towards upon within among amid each every both either neither other another same own not no nor too
can could would should will shall may might must one ones some any all few many much several whose
if because though although yet still even ever about after before during since until via per like
""".split())
# Words a caption may use without the description's say-so: the vocabulary of composition,
# medium and tag conventions that the templates themselves ask for.
_GENERIC_WORDS = frozenset("""
image photo photograph photographic picture scene view shot composition composed framing framed frame
angle lighting light lit tone tones toned colour color colours colors coloured colored palette hue hues
atmosphere mood moody style styled medium detail details detailed background foreground midground
left right center centre centered centred side sides front back top bottom middle upper lower camera
eye level focus focused depth field shallow subject subjects visible appears appear seems seem
showing shows depicts depicted features featuring captured captures overall setting set sense
portrait close closeup close-up wide full body half cowboy solo 1girl 1boy 2girls 2boys 3girls
multiple humans girls boys looking viewer away facing faces pose posing posed stands standing
photorealistic realistic realism anime illustration digital art artwork painting drawing render
rendered style quality soft softly gentle natural slightly slight partly partially mostly
clearly clear gives give creates create adds add making make evoking evokes evoke quiet calm
indoors outdoors indoor outdoor day daytime natural simple plain present presence
stand sit sits sitting seated hold holds holding wear wears wearing worn dressed
lie lies lying come comes fill fills cast casts carry carries surround surrounds glow glows take taken
see seen rise rises stretch stretches look looks lead leads leave leaves rest rests fall falls reflect
reflects print printed written word words hang hangs line lined show shown feel feels define defines
depict depicts crowd crowds mount mounted share shares circle circles past beneath behind faint broken
ride rides imagery surface list head heads number puff puffs capital title titled scatter scattered
handwritten paper read reads reading run runs sits edge corner end form forms open closed wait waits
text english theme themed clothes clothing animal animals scenery blurry monochrome greyscale lineart
expressionless blush sweatdrop male female score source rating headwear eyewear focus happy playful
""".split())
_SYNONYMS = (
    "woman lady female women ladies girl girls", "man male guy gentleman men boy boys businessman",
    "child children kid kids", "sofa couch settee", "colour color", "red crimson scarlet",
    "blue navy azure cobalt", "grey gray silver silvery", "transparent clear see-through",
    "mature older elderly middle-aged fifties sixties", "toy figurine figure", "road path lane track",
    "spike spiky spikes", "small little tiny miniature", "fridge refrigerator", "cupboard cabinet",
    "metal metallic steel stainless", "old elderly aged older", "beanie cap hat", "shore beach coast seaside",
    "surf wave waves", "avenue street road boulevard", "attire clothing outfit clothes", "shirt top blouse tee t-shirt", "trousers pants slacks", "jumper sweater pullover",
    "cap hat", "cat kitten feline", "dog puppy canine hound", "car vehicle automobile", "road street",
    "sea ocean", "forest woods woodland", "smile smiling grin grinning", "glasses spectacles eyeglasses",
    "jacket coat blazer", "rock stone boulder", "big large huge", "bright brightly",
    "dark dim", "shop store", "tired exhausted sleepy", "cafe café coffeehouse", "armor armour",
    "city cityscape urban town", "surprised shocked astonished", "confused puzzled", "twintails pigtails", "hair hairstyle haircut", "sunlight sunlit sunny sun", "wooden wood",
    "golden gold", "photo photograph", "two 2 pair", "three 3", "four 4", "five 5",
)
_SYNONYM_OF: dict[str, int] = {}
_WORD = lazy_pattern(r"[^\W\d_][\w'\u2019-]*|\d+")


def word_stem(word: str) -> str:
    """A rough stem, so that inflections compare equal (both sides are stemmed alike).

    >>> [word_stem(w) for w in ("umbrellas", "sitting", "dresses", "buildings", "woman's", "berries")]
    ['umbrella', 'sit', 'dress', 'build', 'woman', 'berry']
    """
    word = re.sub(r"'s?$", "", word.lower().replace("\u2019", "'"))
    if len(word) > 4 and word.endswith("e") and not word.endswith(("ee", "ie", "ye")):
        word = word[:-1]  # "wave" and "waving", "ride" and "riding" meet at "wav", "rid"
    for _ in range(2):  # a plural of an inflected form ("buildings") takes two steps
        for suffix, replacement in _SUFFIXES:
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                if suffix == "s" and word.endswith(("ss", "us", "is")):
                    return word
                word = word[:len(word) - len(suffix)] + replacement
                if suffix in ("ing", "ed") and word[-1] == word[-2] and word[-1] not in "lsz":
                    word = word[:-1]
                if suffix not in ("s", "es"):
                    return word
                break
        else:
            return word
    return word


_SUFFIXES = (("ies", "y"), ("sses", "ss"), ("ches", "ch"), ("shes", "sh"), ("xes", "x"), ("ing", ""),
             ("ed", ""), ("es", "e"), ("s", ""))


def _concepts(word: str) -> set:
    """What a word stands for: its stem, and its synonym group if it has one."""
    if not _SYNONYM_OF:
        for number, group in enumerate(_SYNONYMS):
            for member in group.split():
                _SYNONYM_OF[word_stem(member)] = number
    stem = word_stem(word)
    return {stem, _SYNONYM_OF.get(stem, stem)}


def _words(text: str) -> list[str]:
    """The words of a text, lower case, hyphenated ones in parts."""
    return [part.strip("'") for word in _WORD.findall(text.lower().replace("_", " "))
            for part in word.split("-") if part.strip("'")]


def content_words(text: str) -> list[str]:
    """The concrete words of a text: not function words, not the generic vocabulary of captions."""
    return [word for word in _words(text)
            if len(word) >= 3 and word not in _FUNCTION_WORDS and word not in _GENERIC_WORDS
            and word_stem(word) not in _GENERIC_WORDS and not word.endswith("ly")]


def unsupported_words(caption: str, description: str) -> tuple[list[str], float]:
    """The caption's concrete words that the description does not support, and their share.

    A word is supported by the same stem, a synonym, or a shared beginning: "signpost"
    supports "sign", "hill" supports "hillside", "reflect" supports "reflection".

    >>> unsupported_words("A woman holds a red umbrella.", "A lady in a red coat stands in rain.")
    (['umbrella'], 0.333)
    """
    known: set = set()
    beginnings: set = set()
    for word in _words(description):  # every word of it supports, not only the concrete ones
        known |= _concepts(word)
        stem = word_stem(word)
        beginnings.update(stem[:size] for size in range(4, len(stem) + 1))
    words = list({word_stem(word): word for word in reversed(content_words(caption))}.items())[::-1]

    def supported(word: str) -> bool:
        return bool(_concepts(word) & known) or len(word) >= 4 and word in beginnings \
            or len(word) >= 5 and word[:5] in beginnings \
            or any(word[:size] in known for size in range(4, len(word)))

    missing = [word for stem, word in words if not supported(stem)]  # shown as the caption wrote them
    return missing, round(len(missing) / len(words), 3) if words else 0.0


# Flag a caption with at least this many unsupported words making up at least this share of its
# concrete words. Tags are held to less: Danbooru's own vocabulary (mature female, cityscape,
# miniature) names what a description says in other words. Measured by bench/policy.py.
INVENTED_FLAG = {"prose": (2, 0.05), "tags": (3, 0.15)}


# -- Images -------------------------------------------------------------------


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for messages.

    >>> file_kind(stat.S_IFIFO), file_kind(stat.S_IFDIR)
    ('a FIFO', 'a folder')
    """
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def open_regular(path: str, *, follow_links: bool = True):
    """Open a file for reading in binary mode; anything but a regular file raises ImageError.

    The file is opened without blocking and checked on the open descriptor, so a FIFO (which
    would wait for ever for a writer) or a device is refused before a byte is read, with no
    window for a swap between a check and the open. follow_links=False refuses a symbolic link.
    """
    flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
             | getattr(os, "O_BINARY", 0))
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:
            raise ImageError("not a regular file (it is a symbolic link)") from None
        raise ImageError(f"cannot read the file ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(f"not a regular file (it is {file_kind(mode)})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sniff_image(path: str) -> str:
    """Name the image format from the file's bytes; raise ImageError if it is not one we send."""
    if media_of(path) == "video":
        return sniff_clip(path)
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        _check_image_size(size)
        try:
            head = handle.read(32)
            handle.seek(max(0, size - 32))
            tail = handle.read(32)
        except OSError as exc:
            raise ImageError(f"cannot read the file ({exc.strerror or exc})") from None
    return _check_image(head, tail, size)


def read_image(path: str) -> bytes:
    """An image's bytes, checked as sniff_image() checks them, read once and never beyond the limit."""
    with open_regular(path) as handle:
        _check_image_size(os.fstat(handle.fileno()).st_size)
        try:
            data = handle.read(MAX_IMAGE_BYTES + 1)
        except OSError as exc:
            raise ImageError(f"cannot read the file ({exc.strerror or exc})") from None
    _check_image_size(len(data))  # it grew since the check
    _check_image(data[:32], data[-32:], len(data))
    return data


def _check_image_size(size: int) -> None:
    """Refuse an empty file, or one over MAX_IMAGE_BYTES."""
    if size == 0:
        raise ImageError("the file is empty")
    if size > MAX_IMAGE_BYTES:
        raise ImageError(f"the file is {size / 1e6:.1f} MB, over the {MAX_IMAGE_BYTES // 10**6} MB "
                         "limit for an image", hint="scale it down: vision models see a few megapixels")


def _check_image(head: bytes, tail: bytes, size: int) -> str:
    """The image format named by the first and last bytes, or ImageError."""
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


# Dimensions come from the file's header alone (the standard library only), so `stats`, --dry-run
# and the context sizing know every image's size without decoding a pixel. A reader gets bytes
# by (offset, count), from a file or from bytes in memory (a JPEG is walked segment by segment,
# never read whole), and never raises: a truncated or odd file has no size (None).
# EXIF orientations 5 to 8 turn the picture a quarter turn: width and height swap when shown.
QUARTER_TURNS = frozenset({5, 6, 7, 8})


class ImageSize(Frozen):
    """An image's stored width and height, and its EXIF orientation (1: as stored)."""

    width: int
    height: int
    orientation: int = 1

    @property
    def upright(self) -> tuple[int, int]:
        """Width and height as the picture is meant to be seen (orientation applied)."""
        if self.orientation in QUARTER_TURNS:
            return self.height, self.width
        return self.width, self.height


def image_size(path: str) -> ImageSize | None:
    """An image file's size from its header; None when it cannot be read or makes no sense."""
    try:
        with open_regular(path) as handle:
            def read(offset: int, count: int) -> bytes:
                handle.seek(offset)
                return handle.read(count)

            return _size_from(read)
    except (ImageError, OSError):
        return None


def image_size_of(data: bytes) -> ImageSize | None:
    """The size of an image held in memory, read as image_size() reads a file."""
    return _size_from(lambda offset, count: data[offset:offset + count])


def _size_from(read) -> ImageSize | None:
    head = read(0, 32)
    kind = _image_kind(head)
    reader = HEADER_READERS.get(kind or "")
    if reader is None:
        return None
    try:
        size = reader(read)
    except (ValueError, IndexError, struct.error):
        return None
    if size is None or not (0 < size.width <= 1 << 20 and 0 < size.height <= 1 << 20):
        return None
    return size


def _png_size(read) -> ImageSize | None:
    header = read(8, 16)
    if header[4:8] != b"IHDR":
        return None
    width, height = struct.unpack(">II", header[8:16])
    return ImageSize(width, height)


def _gif_size(read) -> ImageSize:
    width, height = struct.unpack("<HH", read(6, 4))
    return ImageSize(width, height)


def _bmp_size(read) -> ImageSize:
    header = read(14, 12)
    if int.from_bytes(header[:4], "little") == 12:  # the old OS/2 header: 16-bit sizes
        width, height = struct.unpack("<HH", header[4:8])
    else:
        width, height = struct.unpack("<ii", header[4:12])  # a negative height is stored top-down
    return ImageSize(abs(width), abs(height))


def _webp_size(read) -> ImageSize | None:
    chunk = read(12, 18)
    fourcc, body = chunk[:4], chunk[8:]
    if fourcc == b"VP8 ":  # lossy: a key frame's start code, then 14-bit sizes
        if body[3:6] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", body[6:10])
        return ImageSize(width & 0x3FFF, height & 0x3FFF)
    if fourcc == b"VP8L":  # lossless: a signature byte, then 14-bit sizes minus one
        if body[0] != 0x2F:
            return None
        bits = int.from_bytes(body[1:5], "little")
        return ImageSize((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if fourcc == b"VP8X":  # extended: the canvas size, 24-bit sizes minus one
        return ImageSize(int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1)
    return None


# JPEG markers that carry the frame size (SOF0-15, less DHT, JPG and DAC), and those without a length.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_BARE = frozenset({0x01, *range(0xD0, 0xD9)})
_JPEG_MAX_SEGMENTS = 1000


def _jpeg_size(read) -> ImageSize | None:
    """Walk the segments up to the frame header, noting the EXIF orientation on the way."""
    offset, orientation = 2, 1
    for _ in range(_JPEG_MAX_SEGMENTS):
        marker = read(offset, 4)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        kind = marker[1]
        if kind == 0xFF:  # fill byte
            offset += 1
            continue
        if kind in _JPEG_BARE:
            offset += 2
            continue
        if kind in (0xD9, 0xDA) or len(marker) < 4:  # the end, or the scan before any frame header
            return None
        length = int.from_bytes(marker[2:4], "big")
        if length < 2:
            return None
        if kind in _JPEG_FRAMES:
            frame = read(offset + 4, 5)
            height, width = struct.unpack(">HH", frame[1:5])
            return ImageSize(width, height, orientation)
        if kind == 0xE1 and orientation == 1:
            orientation = _exif_orientation(read(offset + 4, length - 2))
        offset += 2 + length
    return None


def _exif_orientation(segment: bytes) -> int:
    """The orientation tag (0x0112) of an APP1 Exif segment's first image directory; 1 if none."""
    if not segment.startswith(b"Exif\0\0"):
        return 1
    tiff = segment[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return 1
    try:
        directory = struct.unpack(order + "I", tiff[4:8])[0]
        count = struct.unpack(order + "H", tiff[directory:directory + 2])[0]
        for entry in range(min(count, 512)):
            start = directory + 2 + 12 * entry
            tag, _, _, value = struct.unpack(order + "HHIH", tiff[start:start + 10])
            if tag == 0x0112:
                return value if 1 <= value <= 8 else 1
    except struct.error:
        pass  # a directory cut short: no orientation
    return 1


HEADER_READERS = {"png": _png_size, "jpeg": _jpeg_size, "webp": _webp_size, "gif": _gif_size,
                  "bmp": _bmp_size}


# -- Image tokens: what an image costs in the vision model's context ---------------
# An estimate per model family (the `details.family` or `general.architecture` /api/show reports),
# used to size num_ctx so the largest image of a run, the prompt and the answer fit. Each row is
# one formula with its own numbers:
#   fixed         a fixed count whatever the size (gemma3 resizes to 896 px squares: 256 tokens;
#                 CLIP-based llava sees 336 px: 576 tokens);
#   tile          square tiles of that many pixels, up to `tiles` of them, `per_tile` tokens each
#                 (mllama: 560 px tiles, at most 4, 1,601 tokens each);
#   patch         one token per patch x patch pixels after a "smart resize" that keeps the image
#                 between `low` and `high` tokens (Qwen2/2.5/3-VL: 28 px after merging; Ollama's
#                 llama.cpp engine asks for at least 1,024 tokens per image and llama.cpp's own
#                 ceiling is about 4,096). An unknown family is counted as patches with no ceiling,
#                 so a large image is never under-counted.
class ImageTokens(Frozen):
    """How one family of vision models turns an image into context tokens."""

    fixed: int = 0
    tile: int = 0
    tiles: int = 0
    per_tile: int = 0
    patch: int = 0
    low: int = 0
    high: int = 0  # 0: no ceiling

    def count(self, width: int, height: int) -> int:
        """The tokens an image of this size (as sent) takes."""
        if self.fixed:
            return self.fixed
        if self.tile:
            tiles = math.ceil(width / self.tile) * math.ceil(height / self.tile)
            return min(self.tiles, tiles) * self.per_tile
        tokens = max(1, round(width / self.patch)) * max(1, round(height / self.patch))
        if self.high and tokens > self.high:  # scaled down to the budget, aspect kept
            scale = math.sqrt(self.high / tokens)
            tokens = math.floor(width * scale / self.patch) * math.floor(height * scale / self.patch)
        return max(tokens, self.low)


QWEN_VL_TOKENS = ImageTokens(patch=28, low=1024, high=4096)
VISION_TOKENS: dict[str, ImageTokens] = {
    "qwen2vl": QWEN_VL_TOKENS,
    "qwen25vl": QWEN_VL_TOKENS,
    "qwen3vl": QWEN_VL_TOKENS,
    "qwen3vlmoe": QWEN_VL_TOKENS,
    "gemma3": ImageTokens(fixed=256),
    "gemma3n": ImageTokens(fixed=256),
    "llava": ImageTokens(fixed=576),
    "clip": ImageTokens(fixed=576),
    "mllama": ImageTokens(tile=560, tiles=4, per_tile=1601),
}
UNKNOWN_VISION_TOKENS = ImageTokens(patch=28, low=1024)
# Context rounded up to a multiple of this, so a slightly larger image does not change it.
CONTEXT_STEP = 1024


def image_tokens(family: str, width: int, height: int) -> int:
    """Estimated context tokens of one image for a model family.

    >>> image_tokens("qwen25vl", 1536, 1024), image_tokens("qwen25vl", 6000, 4000)
    (2035, 4056)
    >>> image_tokens("gemma3", 6000, 4000), image_tokens("unknown", 6000, 4000)
    (256, 30602)
    """
    return VISION_TOKENS.get(family, UNKNOWN_VISION_TOKENS).count(width, height)


def vision_family(details: dict) -> str:
    """A model's family as /api/show reports it ("" when it does not): the first of its family and
    families that VISION_TOKENS knows (llava is family "llama", families ["llama", "clip"])."""
    info = details.get("model_info") or {}
    shown = details.get("details") or {}
    family = shown.get("family") or info.get("general.architecture") or ""
    families = shown.get("families") if isinstance(shown.get("families"), list) else []
    return next((str(name) for name in (family, *families) if str(name) in VISION_TOKENS), str(family))


def context_length(details: dict) -> int | None:
    """The model's context length from /api/show's model_info (or as an OpenAI-compatible
    server's model list gives it), if it says."""
    info = details.get("model_info") or {}
    arch = info.get("general.architecture")
    value = details.get("context_length") or info.get(f"{arch}.context_length")
    return value if isinstance(value, int) and value > 0 else None


def vision_context(image: int, prompt: int) -> int:
    """The num_ctx of the vision stage: the image, the prompt, and room for an answer and a re-ask
    that carries it; never below the default (NUM_CTX), in CONTEXT_STEP steps."""
    needed = image + prompt + 2 * SAMPLING["vision"][1]
    return max(NUM_CTX, -(-needed // CONTEXT_STEP) * CONTEXT_STEP)


def prompt_tokens(text: str) -> int:
    """A generous token count of prompt text (about three characters a token)."""
    return len(text) // 3 + 1


# -- Preparing images: right-sized before they are sent ---------------------------
# A vision model sees a megapixel or so; a 24-megapixel photo costs upload time, server-side
# decoding and image tokens for nothing. With Pillow installed (the optional "images" extra),
# an image whose longest side is over --max-side is scaled down, turned upright by its EXIF
# orientation and re-encoded; a format the server cannot read is converted. Without Pillow the
# original bytes are sent, and `doctor` says what that costs.
DEFAULT_MAX_SIDE = 1536  # what LoRA dataset tools resize to (musubi-tuner 1280, others 1536)
MAX_SIDE_LIMIT = 16384
JPEG_QUALITY = 90
# Formats every Ollama engine decodes; the others (BMP, GIF) are converted when Pillow can.
SERVER_FORMATS = frozenset({"png", "jpeg", "webp"})


def pillow_version() -> str:
    """Pillow's version, or "" when it cannot be imported (it is imported only to prepare images)."""
    try:
        import PIL
        import PIL.Image  # noqa: F401 - what prepare_image needs, not only the package
    except ImportError:
        return ""
    return str(getattr(PIL, "__version__", "")) or "?"


def pillow_installed() -> bool:
    """Whether images can be prepared before sending."""
    return bool(pillow_version())


def preparation(kind: str, size: ImageSize | None, max_side: int, *, pillow: bool) -> str:
    """What is done to an image before it is sent, as a tag for the description cache: "" when the
    original bytes go (nothing to do, or no Pillow), else the setting that shaped the result."""
    if not pillow or size is None:
        return ""
    too_large = bool(max_side) and max(size.width, size.height) > max_side
    if kind in SERVER_FORMATS and size.orientation == 1 and not too_large:
        return ""
    return f"pillow max-side {max_side}"


def sent_size(size: ImageSize, max_side: int, *, pillow: bool) -> tuple[int, int]:
    """The width and height the server gets: upright, and scaled to max_side when Pillow prepares it."""
    width, height = size.upright
    longest = max(width, height)
    if not pillow or not max_side or longest <= max_side:
        return width, height
    return max(1, round(width * max_side / longest)), max(1, round(height * max_side / longest))


def prepare_image(data: bytes, max_side: int) -> bytes:
    """The image scaled so its longest side is at most max_side (0: kept), turned upright, and
    encoded as JPEG, or as PNG when it has transparency. Needs Pillow; raises ImageError when
    Pillow cannot read the file."""
    import io
    import warnings

    try:
        from PIL import Image, ImageOps
    except ImportError:  # callers ask pillow_installed() first; a broken install fails the image, not the run
        raise ImageError("cannot prepare the image: Pillow does not import",
                         hint=f"reinstall it ({PILLOW_EXTRA}), or send originals with --max-side 0") from None

    # A photo over 89 megapixels is legitimate here (the file is at most MAX_IMAGE_BYTES), and a
    # Python warning would break the one-line stderr; past twice that, Pillow refuses (an error).
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    # Nor Pillow's notes on damaged metadata it reads past ("Corrupt EXIF data", "Tag data larger than
    # file"): the picture is still prepared, and they are not this run's to print.
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            longest = max(image.size)
            if max_side and longest > max_side:
                # A JPEG decodes straight at 1/2, 1/4 or 1/8 scale when that still covers the
                # target (several times faster than decoding 24 megapixels), then is resampled.
                image.draft(None, tuple(math.ceil(side * max_side / longest) for side in image.size))
                image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            upright = ImageOps.exif_transpose(image)
            transparent = upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info
            if upright.mode.startswith("I") and not transparent:
                # 16-bit greyscale (a PNG): Pillow's convert to RGB clips every value over 255 to
                # white, so it is scaled to 8 bits first.
                upright = upright.convert("I").point(lambda value: value * (1 / 257)).convert("L")
            out = io.BytesIO()
            if transparent:
                upright.save(out, "PNG")
            else:
                upright.convert("RGB").save(out, "JPEG", quality=JPEG_QUALITY)
    # Pillow's kinds of "this file is broken": a damaged PNG chunk is a SyntaxError, a cut GIF or
    # WebP an EOFError, odd tables a struct.error or IndexError; a huge image may not fit in memory.
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, MemoryError,
            Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot prepare the image with Pillow ({re.sub(r' <[^>]*>', '', str(exc))})",
                         hint="open and save it again in an image editor, or send it as it is "
                              "with --max-side 0") from None
    return out.getvalue()


# -- Video clips: frames sampled with ffmpeg, sent in one request ----------------
# A clip is described from --frames frames spread evenly over it (at (i + 0.5) / N of its
# duration, so neither the black first frame nor a cut-off last one is picked), scaled by
# ffmpeg to --max-side (Pillow is not needed) and sent in time order in ONE vision request.
# ffprobe and ffmpeg are found on PATH; without them a clip fails on its own, with a hint.
DEFAULT_FRAMES = 8
MAX_FRAMES = 64
VIDEO_TOOL_TIMEOUT = 120.0  # seconds for one ffprobe or ffmpeg call; a frame takes well under one
FFMPEG_INSTALL = "install ffmpeg, which brings ffprobe (apt install ffmpeg, brew install ffmpeg)"
CLIP_JPEG_QUALITY = 3  # ffmpeg's -q:v for MJPEG: 2 (best) to 31; 3 is about Pillow's quality 90


class Media(Frozen):
    """What differs between captioning an image and a clip: the vision prompts, and a note the
    text stage adds to the caption request (a template name, "" for none)."""

    noun: str
    system: str
    user: str
    caption_note: str = ""


MEDIA = {
    "image": Media("image", "vision_system", "vision_user"),
    "video": Media("clip", "vision_video_system", "vision_video_user", "video_caption"),
}


def media_of(path: str) -> str:
    """"video" for a clip's file name, else "image"."""
    return "video" if os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS else "image"


class ClipInfo(Frozen):
    """What ffprobe says of a clip: its duration (0 when it does not say) and its frame size."""

    duration: float
    width: int
    height: int


def sniff_clip(path: str) -> str:
    """Check a clip is a non-empty regular file (ffprobe judges the rest); clips have no size limit."""
    with open_regular(path) as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise ImageError("the file is empty")
    return "video"


def video_tool(name: str) -> str:
    """The path of ffprobe or ffmpeg, or ImageError saying how to install it."""
    import shutil

    found = shutil.which(name)
    if not found:
        # The fix is in the reason: a folder run lists each failed file's reason, not its hint.
        raise ImageError(f"{name} is not installed, and a clip needs it to sample frames ({FFMPEG_INSTALL})",
                         hint="images are captioned without it; only clips need ffmpeg")
    return found


def run_video_tool(args: list[str], what: str) -> bytes:
    """Run ffprobe or ffmpeg (an argument list, stdin closed, a timeout); its output, or ImageError."""
    import subprocess

    try:
        done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=VIDEO_TOOL_TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what} took over {VIDEO_TOOL_TIMEOUT:.0f} seconds") from None
    except OSError as exc:
        raise ImageError(f"cannot run {os.path.basename(args[0])} ({exc.strerror or exc})",
                         hint=FFMPEG_INSTALL) from None
    if done.returncode != 0 or not done.stdout:
        message = excerpt(done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:][0]
                          if done.stderr.strip() else f"exit status {done.returncode}")
        raise ImageError(f"{what} failed ({message})", hint="check that the clip plays")
    return done.stdout


def probe_clip(path: str) -> ClipInfo:
    """A clip's duration and frame size, from ffprobe's JSON output."""
    out = run_video_tool([video_tool("ffprobe"), "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "stream=width,height,duration:format=duration", "-of", "json", "--", path],
                         "ffprobe")
    try:
        data = json.loads(out)
        stream = data["streams"][0]
        width, height = int(stream["width"]), int(stream["height"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ImageError("ffprobe found no video stream in the clip") from None
    duration = 0.0
    for value in (stream.get("duration"), (data.get("format") or {}).get("duration")):
        try:
            duration = float(value)
        except (TypeError, ValueError):
            continue
        if duration > 0 and math.isfinite(duration):
            break
        duration = 0.0
    if not duration:
        duration = last_packet_time(path)
    return ClipInfo(duration, width, height)


def last_packet_time(path: str) -> float:
    """The time of a clip's last video packet, for a container that does not state its duration (a
    stream written to a pipe): ffprobe reads the packets without decoding them. 0 when none has one."""
    out = run_video_tool([video_tool("ffprobe"), "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "packet=pts_time,duration_time", "-of", "csv=p=0", "--", path], "ffprobe")
    latest = 0.0
    for line in out.decode("ascii", "replace").splitlines():
        try:
            latest = max(latest, sum(float(value) for value in line.split(",") if value.strip()))
        except ValueError:
            continue
    return latest if math.isfinite(latest) else 0.0


def frame_times(duration: float, count: int) -> list[float]:
    """When the frames are taken: evenly spread, at (i + 0.5) / count of the clip; a clip whose
    duration is unknown gives its first frame only.

    >>> frame_times(2.0, 4)
    [0.25, 0.75, 1.25, 1.75]
    """
    if duration <= 0:
        return [0.0]
    return [round((index + 0.5) * duration / count, 3) for index in range(count)]


def clip_frame_size(info: ClipInfo, max_side: int) -> tuple[int, int]:
    """The size the frames are sent at: scaled so the longest side is at most max_side (0: kept)."""
    longest = max(info.width, info.height)
    if not max_side or longest <= max_side:
        return info.width, info.height
    return max(2, round(info.width * max_side / longest)), max(2, round(info.height * max_side / longest))


def extract_frames(path: str, times: Sequence[float], size: tuple[int, int]) -> list[bytes]:
    """One JPEG per time, scaled by ffmpeg to size, in the order given."""
    ffmpeg = video_tool("ffmpeg")
    frames = []
    for at in times:
        # -ss before -i seeks by the container's index: one frame costs a short decode, not the clip.
        frames.append(run_video_tool(
            [ffmpeg, "-nostdin", "-v", "error", "-ss", f"{at:.3f}", "-i", path, "-frames:v", "1",
             "-vf", f"scale={size[0]}:{size[1]}", "-c:v", "mjpeg", "-q:v", str(CLIP_JPEG_QUALITY),
             "-f", "image2pipe", "-"], f"ffmpeg at {at:.3f} s"))
    return frames


def file_sha256(path: str) -> str:
    """The sha256 of a file, read in pieces (a clip can be gigabytes)."""
    import hashlib

    digest = hashlib.sha256()
    with open_regular(path) as handle:
        try:
            for piece in iter(lambda: handle.read(1 << 20), b""):
                digest.update(piece)
        except OSError as exc:
            raise ImageError(f"cannot read the file ({exc.strerror or exc})") from None
    return digest.hexdigest()


def clip_plan(path: str, frames: int, max_side: int) -> tuple[ClipInfo, list[float], tuple[int, int]]:
    """What is sent for a clip: its probe, the frame times and the frame size."""
    info = probe_clip(path)
    return info, frame_times(info.duration, frames), clip_frame_size(info, max_side)


def clip_label(path: str, frames: int, max_side: int) -> str:
    """A clip as a dry run shows it: duration, size and the frames to be sent."""
    try:
        info, times, size = clip_plan(path, frames, max_side)
    except ImageError as exc:
        return f" (cannot probe: {exc})"
    duration = f"{info.duration:.1f} s" if info.duration else "duration unknown"
    return (f" ({duration}, {info.width}x{info.height}; {plural(len(times), 'frame')} "
            f"at {size[0]}x{size[1]})")


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
    structured: bool = True  # ask for tags as a JSON array where the server can (--no-structured)
    variants: tuple[str, ...] = ()  # --variants: one caption per named style, from one description
    ground: tuple[str, ...] = ()  # --ground: rows of GROUNDS
    grounding: str = ""  # one image's grounding, rendered (CaptionRun.job_spec)
    file_stem: str = ""  # one image's file name without extension, which its caption never echoes
    target: Target | None = None  # --target: its guidance joins the request, its budget judges the caption

    @property
    def row(self) -> Style:
        """The style table's row for this style and mood, with --underscores applied."""
        row = STYLES[self.style + ("-creative" if self.creative else "")]
        return row.replace(underscores=True) if self.underscores else row

    def per_variant(self) -> list[CaptionSpec]:
        """The spec of each caption an image gets: one per --variants name, or this one alone."""
        return [self.replace(style=name, variants=()) for name in self.variants] or [self]


class Caption(Record):
    """A finished caption line, why a person should look at it, and how cleaning got there."""

    text: str
    review: list = []  # why a person should look: range problems, rules that flagged, inventions
    fired: list = []  # every cleaning rule that removed or flagged something
    spans: list = []  # (rule, action, text): what each rule removed or flagged
    raw: str = ""  # the model's answer as it came
    invented: list = []  # concrete words the description does not support
    unsupported_share: float | None = None  # their share of the caption's concrete words
    variant: str = ""  # the --variants name it was written for ("" without --variants)


# Ollama's structured outputs (a JSON schema in "format") arrived in v0.5.0.
STRUCTURED_OUTPUT_VERSION = (0, 5, 0)
SHIFT_VERSION = (0, 12, 6)
CLIP_TOKEN_BUDGET = 75
# A model that spends its whole answer thinking is asked once more with this many times
# the token budget (and think:false, as always).
THINKING_BUDGET_FACTOR = 4


def sampling(config: Config, kind: str, *, writing: bool = True) -> dict:
    """The options sent for one kind of request; --temperature and --max-tokens shape the writing."""
    temperature, num_predict = SAMPLING[kind]
    if writing:
        temperature = temperature if config.temperature is None else config.temperature
        num_predict = config.max_tokens or num_predict
    # One value per model for the whole run: Ollama reloads a model whose num_ctx changes (a
    # vision model that also writes the captions keeps the vision stage's).
    one_model = with_tag(config.model) == with_tag(config.vision_model)
    num_ctx = config.num_ctx or (config.vision_num_ctx if kind == "vision" or one_model else NUM_CTX)
    options = {"temperature": temperature, "num_predict": num_predict, "num_ctx": num_ctx}
    if config.seed is not None:
        options["seed"] = config.seed
    return options


def with_no_think(model: str, prompt: str) -> str:
    """Add qwen3's /no_think switch, as the seed documents; think:false is what current servers honour."""
    return f"{prompt}\n/no_think" if model_thinks_by_prompt(model) else prompt


def with_hint(prompt: str, hint: str) -> str:
    """Add the user's --hint to a prompt."""
    return prompt + render("hint", hint=hint) if hint else prompt


# -- Grounding ----------------------------------------------------------------
# --ground sends what already exists about an image to both stages: facts from its tag or
# caption file, hints from its file and folder names. They are rendered from prompts/ground_*.txt
# after the --hint, so they reach the vision prompt and with it the description cache's key.

# The files --ground existing reads beside an image, first found first: a WD14 tagger's own
# extensions, then the caption extensions trainers read (.txt, kohya's .caption).
GROUND_FILES = (".tags.txt", ".wd14.txt", ".txt", ".caption")
MAX_GROUND_CHARS = 4000  # a tag file is a few hundred characters; more is cut, not sent whole
# Name words that say nothing of the subject: a camera's, phone's or tool's numbering.
MEANINGLESS_NAME_WORDS = frozenset({"img", "dsc", "dscn", "dscf", "pxl", "mvimg", "photo", "image", "pic",
                                    "scan", "screenshot", "frame", "untitled", "copy", "final", "edit"})
HINTS_FILE = "hints.jsonl"  # per-image hints in the dataset folder (or --hints FILE)
MAX_HINTS_BYTES = 10_000_000
HINTS_FORMAT = 'each line is an object like {"file_name": "a/b.png", "hint": "..."}'


def ground_file(image: str) -> str:
    """The tag or caption file beside an image that --ground existing reads; "" for none."""
    stem = os.path.splitext(image)[0]
    return next((stem + ext for ext in GROUND_FILES if os.path.isfile(stem + ext)), "")


def existing_facts(image: str) -> str:
    """What the image's tag or caption file says, on one line; "" without one."""
    path = ground_file(image)
    if not path:
        return ""
    try:
        with open_regular(path) as handle:
            data = handle.read(MAX_GROUND_CHARS * 4)
    except (ImageError, OSError):
        return ""  # a file that cannot be read grounds nothing; the caption is still written
    return without_surrogates(one_line(data.decode("utf-8", errors="replace")))[:MAX_GROUND_CHARS]


def name_words(name: str) -> str:
    """A file or folder name as words: separators become spaces and numbering goes
    ("character_name_003" -> "character name"); "" for a name that says nothing (IMG_0042).

    >>> name_words("character_name_003"), name_words("IMG_0042"), name_words("ohwx woman (2)")
    ('character name', '', 'ohwx woman')
    """
    words = [re.sub(r"\d+$", "", word) for word in re.split(r"[\s_.\-()\[\]]+", name)]
    words = [word for word in words if word and not any(char.isdigit() for char in word)]
    if all(word.lower() in MEANINGLESS_NAME_WORDS for word in words):
        return ""
    return " ".join(words)


def file_name_hint(image: str) -> str:
    """The hint in an image's file name, without its numbering."""
    return name_words(os.path.splitext(os.path.basename(image))[0])


def folder_name_hint(image: str) -> str:
    """The hint in the name of the image's folder, without kohya's repeat count ("10_ohwx woman")."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(image)))
    return name_words(re.sub(r"^\d+_", "", folder))


class Ground(Frozen):
    """One --ground source: the template it is rendered with, what it is called there, how it is read."""

    template: str
    where: str
    read: Callable[[str], str]
    most: int  # the most characters it sends, for sizing the vision context before any is read


GROUNDS = {
    "existing": Ground("ground_existing", "tag or caption file", existing_facts, MAX_GROUND_CHARS),
    "filename": Ground("ground_name", "file name", file_name_hint, 255),  # a file name's limit
    "folder": Ground("ground_name", "folder name", folder_name_hint, 255),
}


def ground_list(values: Sequence[str] | None) -> tuple[str, ...]:
    """The --ground values (repeated or comma-separated), checked, in the table's order."""
    asked = {value.strip().lower() for item in values or () for value in item.split(",") if value.strip()}
    unknown = sorted(asked - GROUNDS.keys())
    if unknown:
        raise UsageError(f"--ground {unknown[0]!r} is not one of {', '.join(GROUNDS)}",
                         hint="give --ground existing, --ground filename, --ground folder, or several")
    return tuple(name for name in GROUNDS if name in asked)


def grounding(image: str, grounds: Sequence[str]) -> str:
    """The grounding text added to both prompts for one image: each source it has, rendered."""
    parts = []
    for name in grounds:
        ground = GROUNDS[name]
        text = ground.read(image)
        if text:
            parts.append(render(ground.template, where=ground.where, text=text))
    return "".join(parts)


def grounding_room(spec: CaptionSpec, jobs: Sequence[Job]) -> str:
    """Text as long as the most an image's own hint and grounding add to the vision prompt, so
    its context is sized before any tag file is read."""
    hint = max((job.image_hint for job in jobs), key=len, default="")
    room = "".join(render(GROUNDS[name].template, where=GROUNDS[name].where, text="x" * GROUNDS[name].most)
                   for name in spec.ground)
    return hint + room


def echoed_file_name(caption: str, stem: str) -> str:
    """The image's raw file stem as the caption writes it ("character_name_003"), or "".

    A stem that is only words ("rose", "red-coat") is left alone: the caption may say them."""
    variants = {stem, re.sub(r"[_.\-]+", " ", stem)}
    for variant in sorted(variants, key=len, reverse=True):
        if not re.search(r"[\d_]", variant):
            continue
        if re.search(rf"(?<!\w){re.escape(variant)}(?!\w)", caption, re.IGNORECASE):
            return variant
    return ""


class ModelAnswerError(ImageError):
    """The model answered, but nothing usable came of it (a refusal, nothing, only thinking)."""


def thought_it_all(answer: Answer) -> bool:
    """The model spent its whole budget thinking: no answer, cut at the token limit."""
    return not strip_think(answer.text) and answer.done_reason == "length" \
        and bool(answer.thinking or "<think" in answer.text.lower())


def thinking_error(model: str, *, writing: bool = True) -> ModelAnswerError:
    """The error for a model that thinks through every budget it is given."""
    return ModelAnswerError(
        f"the model {model} spent its whole answer thinking and wrote nothing, twice",
        hint=f"use a variant that does not think, such as an -instruct tag of {model.split(':')[0]}"
             + (", or raise --max-tokens" if writing else ""))


def ask_text_model(client: OllamaClient, config: Config, prompt: str, kind: str, *,
                   keep_alive: int | float | str | None = None, fmt: dict | None = None,
                   printer: StreamPrinter | None = None) -> Answer:
    """Send a rendered prompt to the text model; return its answer as it came.

    A model that spent all its tokens thinking gets one more try with a larger budget.
    """
    options = sampling(config, kind)
    prompt = with_no_think(config.model, prompt)
    answer = client.generate(config.model, prompt, options=options, keep_alive=keep_alive, fmt=fmt,
                             printer=printer)
    if thought_it_all(answer):
        options = {**options, "num_predict": options["num_predict"] * THINKING_BUDGET_FACTOR}
        answer = client.generate(config.model, prompt, options=options, keep_alive=keep_alive, fmt=fmt,
                                 printer=printer)
        if thought_it_all(answer):
            raise thinking_error(config.model)
    if not strip_think(answer.text):
        raise empty_answer(config, answer)
    return answer


def empty_answer(config: Config, answer: Answer) -> OllamaError:
    """The error for an answer with nothing usable in it."""
    return ModelAnswerError(f"the text model {config.model} gave an empty answer" + _ran_out(answer),
                            hint="try again, or pick another model with --model or OLLAMA_MODEL")


def _ran_out(answer: Answer) -> str:
    return " (it ran out of tokens)" if answer.done_reason == "length" else ""


def text_result(answer: Answer) -> str:
    """Warn when a text command's answer was cut off at the token limit."""
    if answer.done_reason == "length":
        warn("the answer reached the token limit and may end mid-sentence")
    return answer.text


def vision_prompt(config: Config, hint: str = "", media: str = "image", grounding: str = "",
                  **values: object) -> tuple[str, str]:
    """The vision stage's system prompt and user message, for an image or a clip (MEDIA), with the
    hint and what --ground found."""
    row = MEDIA[media]
    user = with_hint(render(row.user, **values), hint) + grounding
    return render(row.system), with_no_think(config.vision_model, user)


LOOP_REPEAT_PENALTY = 1.2


def describe_image(client: OllamaClient, config: Config, image_base64: str | list[str], *, hint: str = "",
                   grounding: str = "", keep_alive: int | float | str | None = None,
                   prompt: tuple[str, str] | None = None) -> str:
    """Stage 1: the vision model describes what it sees; returns the cleaned description.

    A refusal or an empty answer is asked again once, with the reason; an answer that
    thought through its whole budget gets a larger one; a looping answer is retried once
    with a repeat penalty, and otherwise cut where it loops.
    """
    system, user = prompt or vision_prompt(config, hint, grounding=grounding)
    # A clip's frames go together, in time order, in one request.
    images = [image_base64] if isinstance(image_base64, str) else list(image_base64)
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": user, "images": images},
    ]
    options = sampling(config, "vision", writing=False)

    def ask(messages: list[dict], options: dict) -> tuple[Answer, str, str]:
        """One exchange: the answer, its cleaned description, and what is wrong with it."""
        answer = client.chat(config.vision_model, messages, options=options, keep_alive=keep_alive)
        if thought_it_all(answer):
            options = {**options, "num_predict": options["num_predict"] * THINKING_BUDGET_FACTOR}
            answer = client.chat(config.vision_model, messages, options=options, keep_alive=keep_alive)
            if thought_it_all(answer):
                raise thinking_error(config.vision_model, writing=False)
        cleaned = clean(answer.text, STYLES["vision"])
        if cleaned.refused:
            return answer, "", "refused to describe the image"
        if not cleaned.text:
            return answer, "", "gave an empty description" + _ran_out(answer)
        return answer, cleaned.text, ""

    answer, description, problem = ask(messages, options)
    if problem:
        again = messages + [
            {"role": "assistant", "content": answer.text},
            {"role": "user", "content": with_no_think(config.vision_model,
                                                      render("reask_vision", problem=problem))},
        ]
        answer, description, problem = ask(again, options)
        if problem:
            raise ModelAnswerError(f"the vision model {config.vision_model} {problem}, twice",
                                   hint="try another vision model with --vision-model")
    cut_off = answer.done_reason == "length"
    if has_loop(description, cut_off=cut_off):
        _, retried, problem = ask(messages, {**options, "repeat_penalty": LOOP_REPEAT_PENALTY})
        if not problem and not has_loop(retried):
            return retried
        description = cut_loop(description, cut_off=cut_off)
    return description


class Draft(Record):
    """One answer of the text model, judged: the caption body it gives and what is wrong with it."""

    answer: Answer
    cleaned: Cleaned
    body: str = ""  # empty: nothing usable
    own: str = ""  # the model's own content in the body (no --always-first tags)
    problem: str = ""  # why it is asked again; with a body, why it needs review
    plain: bool = False  # the structured answer failed: ask again for plain text


def judge_caption(answer: Answer, spec: CaptionSpec, *, structured: bool = False) -> Draft:
    """Clean an answer for the spec's style and say what is wrong with it."""
    style = spec.row
    if style.far_too_long(strip_think(answer.text)):  # a runaway is judged before cleaning, never written
        words = len(strip_think(answer.text).split())
        return Draft(answer, Cleaned(), problem=f"wrote {plural(words, 'word')}, far beyond a "
                                                f"{style.kind} caption's {style.high} {style.unit}")
    cleaned = clean(answer.text, style, cut_off=answer.done_reason == "length")
    if cleaned.refused:
        return Draft(answer, cleaned, problem="refused to write a caption")
    body, own = CAPTION_BODIES[style.form](cleaned.text, spec, style)
    if not own:
        problem = "gave an empty or unusable structured answer" if structured else "wrote no caption content"
        return Draft(answer, cleaned, problem=problem, plain=structured)
    return Draft(answer, cleaned, body, own, style.problem(body))


def _prose_body(text: str, spec: CaptionSpec, style: Style) -> tuple[str, str]:
    """A prose caption's body: without the trigger, continuing after the trigger or prefix."""
    body = without_trigger(text, spec.trigger) if spec.trigger else text
    own = body
    for chunk in (chunk.strip() for chunk in spec.prefix.split(",")):  # the prefix again is not content
        if chunk and own.lower().startswith(chunk.lower()):
            own = own[len(chunk):].lstrip(" ,;:")
    if not re.search(r"[^\W\d_]{2}", own) or own.strip(" .").lower() in _NO_CONTENT:
        return "", ""
    body = continue_after_chunk(body) if spec.prefix or spec.trigger else body[:1].upper() + body[1:]
    return body, body


_NO_CONTENT = {"none", "null", "n/a", "na", "nothing", "empty", "caption", "tags", "description", "undefined"}


def _tag_body(text: str, spec: CaptionSpec, style: Style) -> tuple[str, str]:
    """A tag caption's body: --always-first tags first, excluded ones out, at most the maximum."""
    tags, own = arrange_tags([tag for tag in text.split(", ") if tag], trigger=spec.trigger,
                             prefix=spec.prefix, exclude=spec.exclude, always_first=spec.always_first,
                             underscores=spec.underscores, limit=style.high)
    return ", ".join(tags), ", ".join(own)


CAPTION_BODIES = {"prose": _prose_body, "tags": _tag_body}
REASK_ANSWER_CHARS = 2000  # a looping answer can be long; the start shows the problem


def write_caption(client: OllamaClient, config: Config, spec: CaptionSpec, description: str, *,
                  keep_alive: int | float | str | None = None, media: str = "image") -> Caption:
    """Stage 2: the text model rewrites a description as a caption in the spec's style.

    An answer that refuses, is empty, runs away or is out of range is asked again once
    with the reason (an empty structured answer, as plain text). Of two usable answers
    the one closer to the range is kept; a second unusable one fails the image.
    """
    style = spec.row
    request = with_guidance(with_hint(render(style.template, description=description) + media_note(media),
                                      spec.hint), spec.target) + spec.grounding
    fmt = style.schema() if style.structured and spec.structured and client.supports_structured_output() \
        else None
    draft = judge_caption(ask_text_model(client, config, request, style.sampling, keep_alive=keep_alive,
                                         fmt=fmt), spec, structured=fmt is not None)
    if draft.problem:
        again = render("reask", request=request, answer=draft.answer.text[:REASK_ANSWER_CHARS],
                       problem=draft.problem)
        fmt = None if draft.plain else fmt
        second = judge_caption(ask_text_model(client, config, again, style.sampling, keep_alive=keep_alive,
                                              fmt=fmt), spec, structured=fmt is not None)
        if not draft.body or second.body and style.distance(second.body) <= style.distance(draft.body):
            draft = second
    if not draft.body:
        raise ModelAnswerError(f"the text model {config.model} {draft.problem}, twice",
                               hint="try another text model with --model or OLLAMA_MODEL")
    return finish_caption(draft, spec, description)


def media_note(media: str) -> str:
    """What the caption request adds for a clip (what video trainers want first); "" for an image."""
    name = MEDIA[media].caption_note
    return render(name) if name else ""


def finish_caption(draft: Draft, spec: CaptionSpec, description: str) -> Caption:
    """Lay out a judged answer and list why a person should look at it."""
    style = spec.row
    text = layout_caption(draft.body, trigger=spec.trigger, prefix=spec.prefix)
    review = [draft.problem] if draft.problem else []
    review += draft.cleaned.flags
    invented, share = unsupported_words(draft.own, description) if style.faithful else ([], None)
    least, share_at_least = INVENTED_FLAG[style.form]
    if invented and len(invented) >= least and share >= share_at_least:
        review.append("invented: " + ", ".join(invented))
    budget, encoder = token_budget(spec)
    tokens = over_clip_budget(text, budget) if budget else None
    if tokens is not None:
        where = "over" if tokens > budget else "estimated at the edge of"
        review.append(f"about {tokens} {encoder} tokens, {where} the {budget}-token budget")
    echoed = echoed_file_name(draft.body, spec.file_stem) if spec.file_stem else ""
    if echoed:
        review.append(f"echoes the file name {echoed!r}")
    return Caption(text, review, draft.cleaned.fired, draft.cleaned.spans, draft.answer.text, invented, share)


def token_budget(spec: CaptionSpec) -> tuple[int, str]:
    """The tokens a caption may take and whose they are; 0 for no limit.

    A target's budget applies to every style (LTX reads 128 T5 tokens of prose); without one,
    tag styles keep CLIP's 75.
    """
    if spec.target:
        return spec.target.budget, spec.target.tokens
    return (CLIP_TOKEN_BUDGET, "CLIP") if spec.row.clip_budget else (0, "")


def check_models(client: OllamaClient, config: Config) -> dict[str, dict]:
    """Before captioning, make sure both models are installed and the vision model sees; return
    what /api/show says of each (the vision model's family and context length size the run)."""
    shown_models = {}
    for model in dict.fromkeys((config.vision_model, config.model)):
        details = shown_models[model] = client.show(model)
        refusal = cannot_see(client, model, details.get("capabilities")) if model == config.vision_model else ""
        if refusal:
            raise ModelUnavailable(
                f"the vision model '{model}' cannot see images{refusal}", hint=client.kind.vision_hint)
    return shown_models


def cannot_see(client: Client, model: str, capabilities: list[str] | None) -> str:
    """Why the model cannot see images, as a clause ("" when it can or nobody knows): from its
    capabilities, or, where an OpenAI-compatible server does not list them, from a probe with a
    tiny image (Ollama before v0.6.4 does not list them either: unknown is not "no vision")."""
    if capabilities is not None:
        return "" if "vision" in capabilities else f" (its capabilities: {', '.join(capabilities) or 'none'})"
    refusal = client.probe_vision(model) if client.kind.probes else ""
    return f" (it refused a test image: {refusal})" if refusal else ""


def check_templates(config: Config, spec: CaptionSpec) -> None:
    """Render every template a caption run needs, so a broken one fails before any model call."""
    vision_prompt(config, "hint")
    for ground in {GROUNDS[name] for name in spec.ground}:
        render(ground.template, where="", text="")
    for variant in spec.per_variant():
        render(variant.row.template, description="")
    render("reask", request="", answer="", problem="")
    render("reask_vision", problem="")
    with_guidance("", spec.target)


def caption_spec(args: argparse.Namespace) -> CaptionSpec:
    """The caption flags, checked: a trigger is one comma-free chunk, a prefix one line."""
    trigger = (args.trigger or "").strip(" ,")
    target = find_target(args.target)
    prefix = quality_prefix(args, target, args.prefix or "")
    style = args.style or (target.style if target else "training")
    if "," in trigger:
        raise UsageError(f"--trigger must be one word or phrase without commas, got {args.trigger!r}",
                         hint="put fixed tags that come first in --prefix")
    if "\n" in prefix or "\r" in prefix:
        raise UsageError("--prefix must be a single line: a caption file is one line")
    tag_flags = ("underscores", "exclude_tags", "always_first")
    variants = parse_variants(args.variants)
    if all(STYLES[name].form != "tags" for name in variants or (style,)) \
            and any(getattr(args, name) for name in tag_flags):
        raise UsageError("--underscores, --exclude-tags and --always-first shape tags; "
                         "add --style tags" + (" or a tags variant" if variants else ""))
    return CaptionSpec(style=variants[0] if variants else style, variants=variants, creative=args.creative,
                       trigger=trigger, prefix=prefix, hint=one_line(args.hint or ""),
                       underscores=args.underscores or bool(target and target.underscores),
                       exclude=tag_list(args.exclude_tags), always_first=tag_list(args.always_first),
                       structured=not args.no_structured, target=target,
                       ground=ground_list(getattr(args, "ground", None)))


def parse_variants(value: str | None) -> tuple[str, ...]:
    """The --variants SPEC, checked: known style names, each once, at most MAX_VARIANTS.

    >>> parse_variants("training, tags")
    ('training', 'tags')
    """
    if value is None:
        return ()
    names = tuple(name.strip() for name in value.split(","))
    choices = f"choose from {', '.join(VARIANT_STYLES)}, e.g. --variants short,long"
    unknown = [name for name in names if name not in VARIANT_STYLES]
    if unknown:
        raise UsageError(f"--variants names unknown caption styles: {', '.join(map(repr, unknown))}", hint=choices)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"--variants names {', '.join(twice)} more than once", hint=choices)
    if len(names) > MAX_VARIANTS:
        raise UsageError(f"--variants names {len(names)} styles; at most {MAX_VARIANTS} are written per image",
                         hint=choices)
    return names


def quality_prefix(args: argparse.Namespace, target: Target | None, prefix: str) -> str:
    """The prefix with the target's quality tags first when --quality-tags asks for them."""
    if not args.quality_tags:
        return prefix
    if target is None or not target.quality:
        having = ", ".join(name for name, row in target_table().items() if row.quality)
        what = f"the target {target.name} has none" if target else "they come from --target"
        raise UsageError(f"--quality-tags: {what}", hint=f"targets with quality tags: {having}")
    return ", ".join(part for part in (target.quality, prefix.strip(" ,")) if part)


def tag_list(value: str | None) -> tuple[str, ...]:
    """A comma-separated flag value as a tuple of tags."""
    return tuple(tag.strip() for tag in (value or "").split(",") if tag.strip())


def check_output_file(path: str, flag: str) -> None:
    """Refuse a --report or --manifest path that cannot be written, before any model time is spent.

    A new or regular file needs a writable folder (it is replaced whole); a special file such
    as /dev/stdout or a FIFO is written to as it is, so it needs only to be writable itself.
    """
    try:
        info = os.stat(path)
    except OSError:
        info = None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{flag} {shown(path)} is a folder; give a file name")
    if info is not None and not stat.S_ISREG(info.st_mode):
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {shown(path)} cannot be written (permission denied)")
        return
    check_writable(os.path.dirname(os.path.realpath(path)), flag=flag)


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


def answer_data(answer: Answer, model: str, kind: ServerKind) -> dict:
    """A model answer's numbers for --json: tokens and seconds (null where the server reports
    none: an OpenAI-compatible server's load time, and its answer time unless it gives timings)."""
    return {"model": model, "done_reason": answer.done_reason,
            "prompt_tokens": answer.prompt_eval_count, "answer_tokens": answer.eval_count,
            "total_seconds": round(answer.total_duration / 1e9, 3),
            "load_seconds": round(answer.load_duration / 1e9, 3) if kind.loads else None,
            "answer_seconds": round(answer.eval_duration / 1e9, 3)
            if kind.loads or answer.eval_duration else None}


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
        for rule in RULES:
            if rule.scope == "start" and rule.name in ("lead-in", "label"):
                head = rule.pattern.sub("", head, count=1).lstrip()
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


def text_command(config: Config, args: argparse.Namespace, request: str, kind: str, style: Style, *,
                 lead: str = "", stream: bool = True) -> Product:
    """Run a text action: ask, stream or print, clean for its style, and describe it for --json.

    lead is text of our own printed before a streamed answer (a card's front matter).
    """
    printer = StreamPrinter() if stream and wants_stream(args) else None
    if printer and lead:
        printer.write_now(lead)
    try:
        client = connect(config)
        answer = ask_text_model(client, config, request, kind, printer=printer)
    except BaseException:
        if printer and printer.shown:
            printer.finish()  # a broken stream keeps what it showed, on a line of its own
        raise
    if printer:
        printer.finish()
    cleaned = clean(text_result(answer), style)
    if cleaned.refused:
        raise ModelAnswerError(f"the text model {config.model} refused: {one_line(strip_think(answer.text))[:80]}",
                               hint="rephrase the request, or pick another model with --model")
    if not cleaned.text:
        raise empty_answer(config, answer)
    if cleaned.flags:
        warn(f"needs review: {', '.join(cleaned.flags)}")
    return Product(cleaned.text, {"command": args.command, "text": cleaned.text,
                                  "needs_review": "; ".join(cleaned.flags) or None, "rules": cleaned.fired,
                                  **answer_data(answer, config.model, client.kind)},
                   streamed=printer is not None)


def cmd_prompt(config: Config, args: argparse.Namespace) -> Product:
    """Write an image-generation prompt from a concept."""
    concept = read_text_argument(args.concept, "concept")
    target = find_target(args.target)
    quality = quality_prefix(args, target, "")
    encoder = args.encoder or (target.prompt_encoder if target else "t5")
    style = STYLES[f"prompt-{encoder}"]
    request = with_guidance(render(style.template, concept=concept), target)
    # A CLIP prompt is trimmed to its token budget once complete, and quality tags go first:
    # either way the finished text differs from the stream, so it is not streamed.
    product = text_command(config, args, request, style.sampling, style,
                           stream=not (style.clip_fit or quality))
    if style.clip_fit:
        budget = target.budget if target and target.prompt_encoder == encoder else CLIP_TOKEN_BUDGET
        product.text = fit_clip_budget(quality.split(", ") + product.text.split(", ") if quality
                                       else product.text.split(", "), budget)
    elif quality:
        product.text = layout_caption(product.text, prefix=quality)
    product.data["text"] = product.text
    if target:
        product.data["target"] = target.name
    return product


def fit_clip_budget(tags: list[str], budget: int = CLIP_TOKEN_BUDGET) -> str:
    """Join tags, leaving off the last ones until the line fits CLIP's 75-token budget."""
    tags = [tag for tag in dict.fromkeys(tags) if tag]
    while len(tags) > 1 and over_clip_budget(", ".join(tags), budget) is not None:
        tags.pop()
    return ", ".join(tags)


def cmd_enhance(config: Config, args: argparse.Namespace) -> Product:
    """Rewrite an existing prompt with more detail."""
    prompt = read_text_argument(args.prompt, "prompt")
    target = find_target(args.target)
    quality = quality_prefix(args, target, "")
    request = with_guidance(render(f"enhance_{args.intensity}", prompt=prompt), target)
    product = text_command(config, args, request, f"enhance-{args.intensity}", STYLES["enhance"],
                           stream=not quality)
    if quality and not product.text.lower().startswith(quality.split(",")[0].lower()):
        product.text = product.data["text"] = layout_caption(product.text, prefix=quality)
    tokens = clip_tokens(product.text or "")[0]
    product.data["clip_tokens"] = tokens
    if target:  # the target says whose budget counts
        product.data["target"] = target.name
        over = over_clip_budget(product.text or "", target.budget)
        if over is not None and over > target.budget:
            warn(f"about {over} {target.tokens} tokens: {target.family} reads only the first {target.budget}")
    elif over_clip_budget(product.text or "", CLIP_TOKEN_BUDGET) is not None:
        warn(f"about {tokens} CLIP tokens: SDXL and Pony read only the first {CLIP_TOKEN_BUDGET}; "
             "Flux's T5 reads far more")
    return product


def cmd_describe(config: Config, args: argparse.Namespace) -> Product:
    """Write a model card description (Markdown) for a LoRA."""
    name = read_text_argument(args.model_name, "model name")
    lora_type = args.lora_type.strip()
    if not lora_type:
        raise UsageError("--type is empty; say what kind of LoRA it is (character, style, concept, ...)")
    check_license(args)
    dataset = dataset_facts(args.dataset, trigger=args.trigger or "") if args.dataset else None
    request = render("describe", model_name=name, lora_type=lora_type,
                     tags=(args.tags or "").strip() or "none",
                     dataset=dataset.summary() if dataset else "none")
    head = card_head(name=name, lora_type=lora_type, args=args)
    product = text_command(config, args, request, "describe", STYLES["describe"], lead=head + "\n\n")
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
    return text_command(config, args, request, f"lore-{args.length}", STYLES["lore"])


class DatasetFacts(Record):
    """What a dataset's captions say, for a model card that tells the truth."""

    images: int
    captioned: int
    top_tags: list[tuple[str, int]]  # tags, or for prose captions words and phrases, with counts
    samples: list[str]
    form: str = "tags"  # "tags" or "prose", by what most captions look like
    in_every: list[str] = []  # tags every caption has (a prefix such as score_9), not counted

    def summary(self) -> str:
        """One line of facts for the model card prompt."""
        terms = ", ".join(f"{term} ({count})" for term, count in self.top_tags) or "none"
        what = "caption tags" if self.form == "tags" else "words and phrases in the captions"
        every = f"; in every caption: {', '.join(self.in_every)}" if self.in_every else ""
        return (f"{plural(self.images, 'training image')}, {self.captioned} with captions; "
                f"most frequent {what}: {terms}{every}")


# A chunk of a tag caption is a few words; "in every caption" needs this many captions to mean more
# than chance. Words too common to say what a prose dataset is about:
TAG_WORDS = 4
IN_EVERY_MIN_CAPTIONS = 4
STOP_WORDS = frozenset("""
a an the and or but nor of in on at to with without from by for as into onto over under above
below near behind beside between through across against along around while is are was were be
been being has have had do does did this that these those there here it its it's his her hers
their theirs them they he she him we our you your i my me which who whom whose what where when
how than then very so such some any each every all both one two three no not also can could
may might will would just only own same other another out up down off""".split())


def dataset_facts(folder: str, *, trigger: str = "", top: int = 15, samples: int = 3) -> DatasetFacts:
    """Count a dataset's images and read its captions: what they are about, and a few samples.

    Tag captions (most chunks between commas a few words long) are counted tag by tag;
    prose captions by their frequent words and two-word phrases. The trigger, and tags that
    every caption has (a fixed prefix), say nothing about the dataset and are not counted.
    Only regular caption files are read: never one through a symbolic link, nor a FIFO.
    """
    if not os.path.isdir(folder):
        raise UsageError(f"--dataset {shown(folder)} is not a folder")
    images = [image for image in find_images(folder, recursive=True) if os.path.isfile(image)]
    captions = []
    for image in images:
        for ext in (CAPTION_EXTENSION, ".caption"):
            caption = read_caption(os.path.splitext(image)[0] + ext)
            if caption:
                captions.append(without_surrogates(caption))
                break
    chunked = [list(dict.fromkeys(  # each chunk once per caption, in caption order
        chunk.strip().lower() for chunk in caption.split(",") if chunk.strip())) for caption in captions]
    left_out = {trigger.strip().lower()} - {""}
    in_every: list[str] = []
    if len(chunked) >= IN_EVERY_MIN_CAPTIONS:
        shared = set(chunked[0]).intersection(*chunked[1:])
        in_every = [chunk for chunk in chunked[0] if chunk in shared and chunk not in left_out
                    and len(chunk.split()) <= TAG_WORDS]
    left_out.update(in_every)
    tag_style = sum(_is_tag_caption([chunk for chunk in chunks if chunk not in left_out])
                    for chunks in chunked) * 2 >= len(chunked)
    counts: collections.Counter = collections.Counter()
    if tag_style:
        for chunks in chunked:
            counts.update(chunk for chunk in chunks
                          if chunk not in left_out and len(chunk.split()) <= TAG_WORDS)
        terms = counts.most_common(top)
    else:
        terms = _frequent_words(chunked, left_out, top)
    return DatasetFacts(len(images), len(captions), terms, captions[:samples],
                        form="tags" if tag_style else "prose", in_every=in_every)


def _is_tag_caption(chunks: list[str]) -> bool:
    """Whether a caption's comma-separated chunks look like tags: at least three-quarters are short."""
    short = sum(len(chunk.split()) <= TAG_WORDS for chunk in chunks)
    return bool(chunks) and short * 4 >= len(chunks) * 3


def _frequent_words(chunked: list[list[str]], left_out: set[str], top: int) -> list[tuple[str, int]]:
    """The words and two-word phrases most captions use (each counted once per caption).

    A phrase is kept when two or more captions share it; its words are then not listed on their
    own unless they also appear elsewhere.
    """
    words: collections.Counter = collections.Counter()
    phrases: collections.Counter = collections.Counter()
    for chunks in chunked:
        tokens = re.findall(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*",
                            " , ".join(chunk for chunk in chunks if chunk not in left_out))
        content = [token if token not in STOP_WORDS and len(token) > 2 else "" for token in tokens]
        words.update(list(dict.fromkeys(token for token in content if token)))
        pairs = [f"{first} {second}" for first, second in zip(content, content[1:]) if first and second]
        pairs += [f"{first} of {third}" for first, of, third in zip(content, tokens[1:], content[2:])
                  if first and of == "of" and third]  # depth of field, bowl of fruit
        phrases.update(list(dict.fromkeys(pairs)))
    kept = [(phrase, count) for phrase, count in phrases.most_common() if count >= 2][:top]
    inside = collections.Counter()
    for phrase, count in kept:
        for word in phrase.split():
            inside[word] = max(inside[word], count)
    kept += [(word, count) for word, count in words.most_common() if count > inside[word]]
    kept.sort(key=lambda term: -term[1])  # stable: phrases before words of the same count
    return kept[:top]


def yaml_string(text: str) -> str:
    """text as a YAML double-quoted scalar in UTF-8 as it is: JSON's escapes are YAML's, and what
    YAML may not hold raw (C1 controls, line and paragraph separators) is escaped too.

    >>> print(yaml_string('\U0001f338 "sakura"'))
    "🌸 \\"sakura\\""
    """
    return re.sub("[\x7f-\x9f\u2028\u2029\ufffe\uffff]", lambda match: f"\\u{ord(match.group()):04x}",
                  json.dumps(without_surrogates(text), ensure_ascii=False))


def check_license(args: argparse.Namespace) -> None:
    """The Hub wants license_name (and license_link) with license: other, and only then."""
    other = (args.license or "").strip().lower() == "other"
    if other and not (args.license_name or "").strip():
        raise UsageError("--license other needs --license-name: the Hugging Face Hub wants a name for "
                         "a license that is not on its list",
                         hint='add --license-name my-license and --license-link LICENSE.md (a file in '
                              'the repository, or a URL)')
    for flag, value in (("--license-name", args.license_name), ("--license-link", args.license_link)):
        if value is not None and not other:
            raise UsageError(f"{flag} goes with --license other",
                             hint=f"add --license other, or leave {flag} off for a license on the Hub's list")


def card_head(*, name: str, lora_type: str, args: argparse.Namespace) -> str:
    """A card's YAML front matter (with --base-model, --trigger or --license) and title."""
    parts = []
    if args.base_model or args.trigger or args.license:
        tags = ["text-to-image", "lora", lora_type.lower().replace(" ", "-")]
        tags += [tag.strip() for tag in (args.tags or "").split(",") if tag.strip()]
        front = ["---"]
        if args.base_model:
            front.append(f"base_model: {yaml_string(args.base_model)}")
        if args.trigger:
            front.append(f"instance_prompt: {yaml_string(args.trigger)}")
        front.append("tags:")
        front += [f"- {yaml_string(tag)}" for tag in dict.fromkeys(tags)]
        if args.license:
            front.append(f"license: {yaml_string(args.license.strip())}")
        for key, value in (("license_name", args.license_name), ("license_link", args.license_link)):
            if value:
                front.append(f"{key}: {yaml_string(value.strip())}")
        parts.append("\n".join(front + ["---"]))
    parts.append(f"# {name}")
    return "\n\n".join(parts)


def card_tail(*, args: argparse.Namespace, dataset: DatasetFacts | None) -> str:
    """The sections code writes after the body: trigger words and the training data's facts."""
    parts = []
    if args.trigger:
        parts.append(f"## Trigger words\n\nYou should use `{args.trigger}` to trigger the image generation.")
    if dataset:
        them = "of them " if dataset.images != 1 else ""
        lines = [f"## Training data\n\n{plural(dataset.images, 'image')}, {dataset.captioned} {them}captioned."]
        if dataset.top_tags:
            what = "Most frequent tags" if dataset.form == "tags" else "Frequent words and phrases"
            lines.append(f"{what}: " + ", ".join(f"{term} ({count})" for term, count in dataset.top_tags)
                         + ".")
        if dataset.in_every:
            lines.append("In every caption: " + ", ".join(dataset.in_every) + ".")
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
    overwrite_edited: bool = False  # --overwrite replaces captions a person edited too
    recursive: bool = False
    ext: str = CAPTION_EXTENSION
    output_dir: str | None = None
    limit: int | None = None
    dry_run: bool = False
    chunk: int = DEFAULT_CHUNK
    jobs: int | str = 1  # or AUTO
    stages: str = "auto"  # --stages: one of STAGE_LAYOUTS
    keep_alive: int | float | str = DEFAULT_KEEP_ALIVE
    release_models: bool = True
    cache_dir: str | None = None
    use_cache: bool = True
    quiet: bool = False
    report: str | None = None
    manifest: str | None = None
    max_side: int = DEFAULT_MAX_SIDE  # 0: originals are sent
    variants: tuple[str, ...] = ()  # --variants: the caption styles each image gets, in order
    variants_to: str = "lines"  # --variants-to: one of VARIANT_LAYOUTS
    frames: int = DEFAULT_FRAMES  # --frames: sampled from each clip
    hints: str | None = None  # --hints FILE; without it, the folder's hints.jsonl if there is one


class Job(Record):
    """One image of a folder run and where it stands."""

    image: str
    name: str  # relative to the dataset folder, with / separators
    caption_file: str
    status: str = "pending"  # pending, described, written, skipped, failed, later
    reason: str = ""
    description: str = ""
    cached: bool = False  # the description came from the cache, not the vision model
    caption: Caption | None = None  # the caption written (kept without the raw answer unless a rule fired)
    captions: list = []  # with --variants, every variant's Caption in order (caption is the first)
    by_model: bool = False  # it failed because the model's answers were unusable
    hint: str = ""  # how to fix what made it fail
    image_hint: str = ""  # its line of hints.jsonl (or --hints)
    grounding: str | None = None  # what --ground found for it, rendered; None until read

    @property
    def review(self) -> list[str]:
        """Why a person should look at the written caption (with --variants, each reason names its variant)."""
        if self.captions:
            return [f"{caption.variant}: {reason}" for caption in self.captions for reason in caption.review]
        return self.caption.review if self.caption else []


FINAL = ("written", "skipped", "failed")


def find_images(folder: str, *, recursive: bool = False) -> list[str]:
    """Image files in folder, sorted by path; hidden files and folders are left out.

    Symlinked folders are not entered, so a run never leaves the dataset or loops. Any other
    entry with an image extension is listed, to be read only if it is a regular file: a dangling
    link, a link loop, a FIFO or a device becomes one failed image, never a failed run.
    """
    found = []
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as exc:
        raise UsageError(f"cannot read the folder {shown(folder)} ({exc.strerror or exc})") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    found.extend(find_images(entry.path, recursive=True))
                continue
            if entry.is_symlink() and entry.is_dir():
                continue  # a linked folder, even one named like an image
        except OSError:
            pass  # a link loop or an entry that cannot be examined: it fails as an image
        if os.path.splitext(entry.name)[1].lower() in MEDIA_EXTENSIONS:
            found.append(entry.path)
    return found


def caption_path(image: str, *, folder: str = "", options: BatchOptions | None = None) -> str:
    """Where an image's caption goes: beside it, or mirrored under --output-dir."""
    options = options or BatchOptions()
    stem = os.path.splitext(image)[0]
    if options.output_dir:
        stem = os.path.join(options.output_dir, os.path.relpath(stem, folder))
    return stem + options.ext


def variant_paths(caption_file: str, options: BatchOptions) -> list[str]:
    """The caption files of one image: its caption file, and with --variants-to files one more per
    later variant, named by it (img.txt, img.tags.txt, img.short.txt)."""
    if options.variants_to != "files" or not options.variants:
        return [caption_file]
    stem = caption_file[:len(caption_file) - len(options.ext)]
    return [caption_file] + [f"{stem}.{name}{options.ext}" for name in options.variants[1:]]


def caption_set_state(caption_file: str, options: BatchOptions) -> str:
    """caption_state of an image's set of caption files: "exists" when all exist, "" when none
    does; a set only partly there is kept (only --overwrite writes the whole set again)."""
    paths = variant_paths(caption_file, options)
    states = [caption_state(path) for path in paths]
    odd = [state for state in states if state not in ("", "exists")]
    if odd:
        return odd[0]
    if all(states) or not any(states) or options.overwrite:
        return states[0] or ("exists" if any(states) else "")
    there = [os.path.basename(path) for path, state in zip(paths, states) if state]
    return f"only part of its variant captions exist ({', '.join(map(shown, there))}; --overwrite writes them all)"


def plan_jobs(folder: str, images: list[str], options: BatchOptions) -> list[Job]:
    """One job per image; an existing caption is skipped unless --overwrite, a foreign one always,
    and one a person edited (see the edits journal) unless --overwrite-edited."""
    jobs = []
    owners: dict[str, str] = {}
    root = options.output_dir or folder
    journal = read_journal(root) if options.overwrite and not options.overwrite_edited else {}
    for image in images:
        name = shown(os.path.relpath(image, folder).replace(os.sep, "/"))
        job = Job(image, name, caption_path(image, folder=folder, options=options))
        state = caption_set_state(job.caption_file, options)
        if job.caption_file in owners:
            job.status = "failed"
            job.reason = (f"shares its caption file {shown(os.path.basename(job.caption_file))} "
                          f"with {owners[job.caption_file]}")
        elif state == "exists" and not options.overwrite:
            job.status, job.reason = "skipped", "caption exists"
        elif state == "exists" and journal and edited_by_person(journal, root, job.caption_file):
            job.status, job.reason = "skipped", EDITED_REASON
        elif state not in ("", "exists"):
            job.status, job.reason = "skipped", state
        owners.setdefault(job.caption_file, name)
        jobs.append(job)
    return jobs


def write_text_atomically(path: str, text: str, *, sync: bool = True) -> None:
    """Write a UTF-8 file whole or not at all: a temp file in the same folder, then os.replace.
    sync=False leaves the flush to disk to the caller (one os.sync() after many files)."""
    import tempfile

    folder = os.path.dirname(path) or "."
    fd, temp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def caption_state(path: str) -> str:
    """What is at a caption file's path: "" (nothing, or an empty file: kohya refuses those, so it
    is captioned), "exists", or why it is left alone. A symbolic link or a special file is
    foreign: never read, never written through, never replaced.
    """
    try:
        info = os.lstat(path)
    except OSError:
        return ""  # not there (or its folder is not): writing it says what is wrong
    if not stat.S_ISREG(info.st_mode):
        return f"the caption file is {file_kind(info.st_mode)}; left alone"
    if info.st_size == 0:
        return ""
    return "exists" if read_caption(path, whole=True) != "" else ""


def read_caption(path: str, *, whole: bool = False) -> str | None:
    """The first line of a caption file (whole: its text), stripped; None for anything but a
    regular UTF-8 file at that very path (a symbolic link is not followed) or a line of
    CAPTION_READ_LIMIT bytes and more."""
    try:
        with open_regular(path, follow_links=False) as handle:
            data = handle.read(CAPTION_READ_LIMIT) if whole else handle.readline(CAPTION_READ_LIMIT)
        text = data.decode("utf-8-sig")
    except (ImageError, OSError, UnicodeDecodeError):
        return None
    return text.strip()


CAPTION_READ_LIMIT = 1 << 16  # a caption is a few hundred bytes


def later_lines(path: str) -> list[str]:
    """A caption file's lines after the first (--variants alternatives), blank ones left out."""
    whole = read_caption(path, whole=True)
    return [line.strip() for line in (whole or "").splitlines()[1:] if line.strip()]


def write_output_file(path: str, text: str) -> None:
    """Write --report or --manifest: a regular file (or a new one) whole or not at all, through a
    symbolic link to its target; a FIFO, /dev/stdout or another special file is written to as a
    stream, never replaced. A FIFO that no program reads from is an error, not a wait.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    if info is None or stat.S_ISREG(info.st_mode):
        write_text_atomically(os.path.realpath(path), text)
        return
    try:  # a folder fails here too (EISDIR)
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise OSError(exc.errno, "a FIFO that no program reads from", path) from None
        raise
    try:
        os.set_blocking(fd, True)
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def remove_stale_temp_files(folders: set[str], started: float) -> None:
    """Remove temp files our own writes left behind when killed (-9): in the folders this run
    writes into, only files named like ours and last changed well before this run started."""
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if not (entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(".tmp")):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and \
                        entry.stat(follow_symlinks=False).st_mtime < started - STALE_TEMP_SECONDS:
                    os.unlink(entry.path)
            except OSError:
                pass  # another run removed it, or it is not ours to remove


def write_caption_file(path: str, caption: str, *, sync: bool = True) -> None:
    """Write one caption line atomically; never an empty file."""
    line = one_line(without_surrogates(caption))
    if not line:
        raise ImageError("refusing to write an empty caption")
    write_text_atomically(path, line + "\n", sync=sync)


def write_caption_lines(path: str, captions: list[str], *, sync: bool = True) -> None:
    """Write captions as the lines of one file atomically (--variants: alternatives a trainer picks
    from); never an empty line."""
    lines = [one_line(without_surrogates(caption)) for caption in captions]
    if not all(lines):
        raise ImageError("refusing to write an empty caption")
    write_text_atomically(path, "".join(line + "\n" for line in lines), sync=sync)


def _umask() -> int:
    """The process umask (read by setting it, then putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class DescriptionCache:
    """Vision descriptions kept on disk the moment they arrive, one JSON line each.

    Keyed by the image's content, the vision model and the vision prompt, so a
    rerun, a restyle or a moved file reuses them. A line cut short by a crash, or one
    without a key and a description, is ignored on reading; a torn line is ended before
    the next one is appended. A cache that cannot be opened or written (a folder or a
    link in its place, a read-only or full disk) does not stop the run: one warning names
    it and the run goes on without it, keeping every description it received.
    """

    FILENAME = "descriptions.jsonl"

    def __init__(self, folder: str, *, follow_links: bool = True) -> None:
        """follow_links=False: the folder may not be a symbolic link either (the default cache
        folder lives inside a dataset, which may come from anyone)."""
        import threading

        self.path = os.path.join(folder, self.FILENAME)
        self.problem = ""  # why the cache is off, once it is
        self.notify = warn  # how the one warning is given (a run shows it above its live line)
        self._lock = threading.Lock()
        self._where: dict[str, tuple[int, int]] = {}  # key -> (offset, length): no text in memory
        self._file = None
        try:
            # Not through a link (it could point out of the dataset), and never a FIFO.
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NONBLOCK", 0) \
                | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
            if follow_links or os.open not in os.supports_dir_fd:  # Windows: no dir_fd, rare links
                if not follow_links and os.path.islink(folder):
                    raise OSError(errno.ELOOP, "its folder is a symbolic link")
                fd = os.open(self.path, flags, 0o666)
            else:
                try:
                    folder_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
                                        | getattr(os, "O_NOFOLLOW", 0))
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise OSError(exc.errno, "its folder is a symbolic link") from None
                    raise
                try:
                    fd = os.open(self.FILENAME, flags, 0o666, dir_fd=folder_fd)
                finally:
                    os.close(folder_fd)
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                os.close(fd)
                raise OSError(errno.EINVAL, f"it is {file_kind(mode)}")
            self._file = open(fd, "a+b")  # noqa: SIM115 - held open for the run
            self._file.seek(0)
            offset = 0
            for line in self._file:
                key = self._key_of(line) if line.endswith(b"\n") else None
                if key:
                    self._where[key] = (offset, len(line))
                offset += len(line)
        except OSError as exc:
            if exc.errno == errno.ELOOP and exc.strerror != "its folder is a symbolic link":
                exc.strerror = "it is a symbolic link"
            self._give_up(exc)

    @staticmethod
    def key(image_sha256: str, model: str, prompt_sha256: str, prepared: str = "") -> str:
        """The cache key of one description; an image sent as it is keeps the key it always had."""
        import hashlib

        text = f"{image_sha256}\0{model}\0{prompt_sha256}" + (f"\0{prepared}" if prepared else "")
        return hashlib.sha256(text.encode()).hexdigest()

    @staticmethod
    def _key_of(line: bytes) -> str | None:
        """The key of a usable line: a JSON object with a string key and a non-empty string description."""
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        key, description = record.get("key"), record.get("description")
        if not (isinstance(key, str) and key and isinstance(description, str) and description.strip()):
            return None
        return key

    def get(self, key: str) -> str | None:
        """The stored description, or None."""
        with self._lock:
            where = self._where.get(key)
            if where is None or self._file is None:
                return None
            try:
                self._file.seek(where[0])
                line = self._file.read(where[1])
            except OSError as exc:
                self._give_up(exc)
                return None
        if self._key_of(line) != key:  # changed under us: ask the model again
            return None
        return without_surrogates(json.loads(line)["description"])

    def put(self, key: str, record: dict) -> None:
        """Append one description and make it durable before going on (or turn the cache off)."""
        line = (json.dumps({"key": key, **record}, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        with self._lock:
            if self._file is None:
                return
            try:
                end = self._file.seek(0, os.SEEK_END)
                if end:
                    self._file.seek(end - 1)
                    if self._file.read(1) != b"\n":  # a torn last line: end it first
                        self._file.write(b"\n")
                        end += 1
                self._file.write(line)
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as exc:
                self._give_up(exc)
                return
            self._where[key] = (end, len(line))

    def close(self) -> None:
        """Close the file; a failure now loses nothing (every line was flushed as it was written)."""
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:
                    pass
                self._file = None

    def _give_up(self, exc: OSError) -> None:
        """Turn the cache off for the rest of the run, with one warning naming the file."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # the unflushed end of a line that could not be written
            self._file = None
        if not self.problem:
            self.problem = f"cannot use the description cache {shown(self.path)} ({exc.strerror or exc}); " \
                           "going on without it"
            self.notify(self.problem)


# -- Human edits: the edits journal and backups --------------------------------
# Every caption a person changes (a save or a bulk change in `review`) is recorded in
# <caption root>/.ollama-generate/edits.jsonl, one JSON line each: time, image, caption file,
# the sha256 of the file's bytes before and after, and what made the change. Before anything
# replaces a caption file (review, a bulk change, a recaption, `caption --overwrite`), its bytes
# are copied to <caption root>/.ollama-generate/backup/<its path>, with the time put before the
# extension: sub/cat.txt -> backup/sub/cat.20250314T101502123456Z.txt. The caption root is the
# dataset folder, or --output-dir. Nothing here is reached through a symbolic link.

EDITS_FILE = "edits.jsonl"
BACKUP_FOLDER = "backup"
# Journal entries made by a person; a caption whose file still has the bytes of its last such
# entry is one a person edited, and `caption --overwrite` keeps it (--overwrite-edited does not).
PERSON_EDITS = ("review", "bulk", "undo")
# Each folder run's report, kept in the cache folder for `review` (needs-review reasons, cleaning spans).
LAST_REPORT_FILE = "last-report.json"  # a copy of the last run's report, in the cache folder
EDITED_REASON = "caption edited by a person (--overwrite-edited replaces it)"


def caption_hash(path: str) -> str | None:
    """The sha256 of a caption file's bytes, or None when there is no regular file at that path."""
    import hashlib

    try:
        with open_regular(path, follow_links=False) as handle:
            return hashlib.sha256(handle.read(CAPTION_READ_LIMIT + 1)).hexdigest()
    except (ImageError, OSError):
        return None


def state_folder(root: str, *parts: str, create: bool = True) -> str:
    """<root>/.ollama-generate/<parts>, made if needed; OSError if any of it is a symbolic link
    (a dataset may come from anyone: its state folder must not lead out of it)."""
    path = root
    for part in (CACHE_FOLDER, *parts):
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise OSError(errno.ELOOP, "it is a symbolic link", path)
        if create:
            os.makedirs(path, exist_ok=True)
    return path


def _relative_caption(root: str, caption_file: str) -> str:
    """A caption file's path under the caption root, with / separators."""
    relative = os.path.relpath(os.path.abspath(caption_file), os.path.abspath(root))
    if relative.startswith(".."):  # not under the root (never for our own layout)
        relative = os.path.basename(caption_file)
    return relative.replace(os.sep, "/")


def utc_stamp() -> str:
    """The time now, for journal lines and backup names: 20250314T101502123456Z."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def backup_caption(root: str, caption_file: str, *, sync: bool = True) -> str | None:
    """Copy a caption file's bytes into the backup folder before it is replaced; return the copy's
    path, or None when there is nothing to keep. OSError when it cannot be kept: then the caption
    must not be replaced."""
    if not os.path.lexists(caption_file):
        return None
    try:
        with open_regular(caption_file, follow_links=False) as handle:
            data = handle.read(CAPTION_READ_LIMIT + 1)
    except ImageError as exc:
        raise OSError(errno.EINVAL, str(exc), caption_file) from None
    if not data.strip():
        return None
    relative = _relative_caption(root, caption_file)
    folder = state_folder(root, BACKUP_FOLDER, *relative.split("/")[:-1])
    stem, ext = os.path.splitext(relative.split("/")[-1])
    stamp = utc_stamp()
    for attempt in range(100):
        path = os.path.join(folder, f"{stem}.{stamp}{f'-{attempt}' if attempt else ''}{ext}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except FileExistsError:
            continue
        with open(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        return path
    raise OSError(errno.EEXIST, "no free backup name", folder)  # pragma: no cover - 100 in one microsecond


def journal_edits(root: str, entries: list[dict]) -> None:
    """Append entries to the edits journal and make them durable; OSError when it cannot."""
    if not entries:
        return
    path = os.path.join(state_folder(root), EDITS_FILE)
    stamp = utc_stamp()
    data = "".join(json.dumps({"time": stamp, **entry}, ensure_ascii=False) + "\n" for entry in entries)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_NONBLOCK", 0), 0o666)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"it is {file_kind(mode)}", path)
        os.write(fd, data.encode("utf-8", "replace"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_journal(root: str) -> dict[str, dict]:
    """The last journal entry of each caption file (by its path under the root); {} without a
    journal. Lines that are not whole entries are left out."""
    path = os.path.join(root, CACHE_FOLDER, EDITS_FILE)
    last: dict[str, dict] = {}
    try:
        with open_regular(path, follow_links=False) as handle:
            lines = handle.read().splitlines()
    except (ImageError, OSError):
        return last
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("caption_file"), str):
            last[entry["caption_file"]] = entry
    return last


def edited_by_person(journal: dict[str, dict], root: str, caption_file: str) -> bool:
    """Whether a person made this caption file what it is now (its last journal entry is a
    person's and the file still has the bytes that entry wrote)."""
    entry = journal.get(_relative_caption(root, caption_file))
    return bool(entry) and entry.get("by") in PERSON_EDITS and entry.get("new") == caption_hash(caption_file)


# -- Batch engine: hosts, report, scheduling --------------------------------


class Host(Record):
    """One Ollama server of a folder run."""

    client: OllamaClient
    dropped: str = ""  # why it left the run, if it did
    failures: int = 0  # images it failed in a row with server errors (see HOST_FAILURE_LIMIT)
    failing: bool = False  # it left the run for those failures, not for being unreachable
    models: dict = {}  # model -> what /api/show said of it when the run began
    holds_both: bool | None = None  # it keeps both models loaded at once (None: not known yet)
    overlapped: bool = False  # its stages ran as a pipeline in some chunk
    lanes: dict = {}  # stage name -> Lane: requests in flight and what they did

    # What a server that reports no model loads (an OpenAI-compatible one) leaves out of the report.
    LOAD_FIGURES = ("model_loads", "load_wait_seconds")

    @property
    def not_reported(self) -> list[str]:
        return [] if self.client.kind.loads else list(self.LOAD_FIGURES)

    @property
    def loads_seen(self) -> int | None:
        return self.client.loads_seen if self.client.kind.loads else None

    @property
    def load_wait(self) -> float | None:
        return round(self.client.load_wait, 3) if self.client.kind.loads else None


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

    @property
    def loads_seen(self) -> int | None:
        """Model loads seen on the servers that report them (None when none does)."""
        counts = [host.loads_seen for host in self.hosts if host.loads_seen is not None]
        return sum(counts) if counts else None

    def as_dict(self) -> dict:
        """The report as JSON-ready data (--report)."""
        return {
            "folder": shown(self.folder),
            "total": len(self.jobs),
            "written": self.count("written"),
            "skipped": self.count("skipped"),
            "failed": [{"image": job.name, "reason": job.reason} for job in self.failed],
            "needs_review": [{"image": job.name, "reason": "; ".join(job.review),
                              "rules": [rule for one in job.captions or [job.caption] for rule in one.fired]}
                             for job in self.needs_review],
            "not_reached": sum(1 for job in self.jobs if job.status not in (*FINAL, "later")),
            "later": self.count("later"),
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3),
            "images_per_minute": round(self.images_per_minute, 2),
            "cached_descriptions": self.cached,
            "model_calls": sum(host.client.calls for host in self.hosts),
            "model_loads": self.loads_seen,
            "hosts": [{"url": host.client.host, "api": host.client.kind.name, "model_calls": host.client.calls,
                       "model_loads": host.loads_seen, "dropped": host.dropped or None,
                       "not_reported": host.not_reported}
                      for host in self.hosts],
            "throughput": [throughput(host) for host in self.hosts],
            "cleaning": self.cleaning_counts(),
            "captions": [caption_record(job) for job in self.jobs if job.status == "written" and job.caption],
        }

    def cleaning_counts(self) -> dict[str, int]:
        """How many written captions each cleaning rule touched, most first."""
        counts = collections.Counter(rule for job in self.jobs if job.status == "written" and job.caption
                                     for one in job.captions or [job.caption] for rule in one.fired)
        return dict(counts.most_common())


def throughput(host: Host) -> dict:
    """What one server did per stage: images per minute while the stage had requests in flight,
    the requests at once it ended with (what --jobs auto chose: the server's slots) and the requests
    it kept in flight (with --jobs auto, that plus the spare), whether its stages overlapped,
    and the wall time answers waited for model loads."""
    return {"url": host.client.host, "overlapped": host.overlapped,
            "load_wait_seconds": host.load_wait,
            "stages": {name: {"model": lane.model, "images": lane.images,
                              "images_per_minute": round(lane.images_per_minute(), 2),
                              "jobs": lane.chosen, "in_flight": lane.in_flight_chosen,
                              "auto": lane.auto}
                       for name, lane in host.lanes.items()}}


def caption_record(job: Job) -> dict:
    """One written caption in --report: the rules that fired, its faithfulness, and, when a rule
    removed or flagged something, the raw answer and each span, so nothing is lost unseen."""
    caption = job.caption
    record = {"image": job.name, "rules": caption.fired, "unsupported_share": caption.unsupported_share,
              "invented": caption.invented}
    if caption.spans:
        record["raw"] = caption.raw
        record["spans"] = [{"rule": rule, "action": action, "text": text} for rule, action, text in caption.spans]
    if job.captions:  # --variants: each one's text, review and cleaning, in order
        record["variants"] = [{"variant": one.variant, "text": one.text, "review": one.review,
                               **caption_record(job.replace(caption=one, captions=[]))}
                              for one in job.captions]
        for one in record["variants"]:
            del one["image"]
    return record


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


PIPELINE = "vision+text"  # the progress line's name for stages that overlap


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

    def advance(self, job: Job, stage: str = "") -> None:
        """One step (of stage) of one image is done; print it if the image is finished."""
        with self._lock:
            self.steps_done += 1
            self.stage_done += 1
            if job.status in FINAL:
                if (stage or self.stage_name) == "vision":
                    self.steps_done += 1  # skipped or failed early: it takes no text step
                    self.stage_done += self.stage_name == PIPELINE
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


class Lane:
    """Requests to one stage's model on one server: how many may be in flight, and what they did.

    A fixed --jobs N keeps N. With --jobs auto the limit is learned the way TCP learns its window:
    it starts at 1 and doubles while completions per second rise by at least AUTO_RISE of what the
    extra requests could add, goes back to the best limit once they do not, halves on a "server
    busy" answer, and probes again after a model load (a new runner may have other slots). Ollama
    reports no slot count, and a model it serialises (qwen3-vl) gains nothing from a second request.

    Once it has settled, it keeps a spare: ceil(limit / AUTO_SPARE) requests more than the limit in
    flight, so a request already waits at the server when a slot frees and the slot does not sit
    idle while the client turns the last answer around. The limit it reports stays the slot count;
    the spare only queues at the server. After a "server busy" answer it keeps no spare.
    """

    def __init__(self, model: str, jobs: int | str) -> None:
        self.model = model
        self.auto = jobs == AUTO
        self.cap = MAX_JOBS if self.auto else int(jobs)
        self.limit = 1 if self.auto else self.cap
        self.in_flight = 0
        self.images = 0  # steps that asked the model
        self.busy_seconds = 0.0  # wall time with a request of this lane in flight
        self._busy_from = 0.0
        self._probing = self.auto
        self._spare_ok = True  # False after a "server busy" answer, until the next probe
        self._before_cut = 0  # requests still in flight that were sent before the last halving
        self._best = (0.0, self.limit)  # completions per second, and the limit that gave them
        self._old = 0  # requests sent before the limit last changed, still to come back
        self._window: list[float] = []  # completion times since those came back (the first: its start)

    @property
    def spare(self) -> int:
        """Requests kept in flight above the learned limit (--jobs auto, once settled)."""
        if not self.auto or self._probing or not self._spare_ok:
            return 0
        return -(-self.limit // AUTO_SPARE)

    @property
    def allowed(self) -> int:
        """Requests it may have in flight now: the limit, plus the spare once settled."""
        return min(MAX_JOBS, self.limit + self.spare) if self.auto else self.limit

    def has_room(self) -> bool:
        return self.in_flight < self.allowed

    def start(self, now: float) -> None:
        if not self.in_flight:
            self._busy_from = now
        self.in_flight += 1

    def finish(self, now: float, *, asked: bool, loaded: bool, busy: bool) -> None:
        """One request is done; with --jobs auto, learn from it."""
        self.in_flight -= 1
        if not self.in_flight:
            self.busy_seconds += now - self._busy_from
        self.images += asked
        if not self.auto:
            return
        if self._before_cut:  # sent before the last cut: the full queue it met is known already
            self._before_cut -= 1
        elif busy:
            self.limit = max(1, self.limit // 2)
            self._before_cut = self.in_flight
            self._spare_ok = False
            self._restart(now, probing=False)
        elif loaded:
            self._restart(now, probing=True)  # the wait for the load says nothing about speed
        elif self._old:  # sent before the change, out of step with the new limit
            self._old -= 1
            if not self._old:
                self._window = [now]
        elif asked and self._probing:
            self._window.append(now)
            # The rate counts from when the last request sent before the change came back (or
            # from the change, if none was out), over whole rounds of `limit` completions
            # (requests in flight together finish in step, so a part of a round would read too
            # fast or too slow).
            measured = len(self._window) - 1
            if measured >= self.limit * -(-AUTO_WINDOW // self.limit):
                self._judge(now, measured / max(now - self._window[0], 1e-6))

    def _judge(self, now: float, rate: float) -> None:
        """A window is in: keep doubling while completions per second rise, else settle on the best."""
        best_rate, best_limit = self._best
        if rate >= best_rate * (1 + AUTO_RISE * (self.limit / best_limit - 1)):
            self._best = (rate, self.limit)
            self.limit = min(self.cap, self.limit * 2)
            self._restart(now, probing=self._best[1] < self.cap)
        else:
            self.limit = best_limit
            self._restart(now, probing=False)

    def _restart(self, now: float, *, probing: bool) -> None:
        if probing and not self._probing:
            self._best = (0.0, self.limit)
        if probing:
            self._spare_ok = True
        self._probing = probing
        self._old = self.in_flight
        self._window = [] if self._old else [now]

    @property
    def chosen(self) -> int:
        """The requests at once it settled on; while it still probes, the best one measured."""
        return self._best[1] if self._probing and self._best[0] else self.limit

    @property
    def in_flight_chosen(self) -> int:
        """The requests it keeps in flight with what it settled on: chosen plus the spare."""
        return self.chosen + self.spare if self.auto else self.chosen

    def images_per_minute(self) -> float:
        return images_per_minute(self.images, self.busy_seconds)


class Stage(Frozen):
    """One stage of a caption run as the scheduler sees it: the jobs it takes (by status), the
    model it asks, and the step it runs on one job."""

    name: str
    status: str
    model: str
    step: Callable[[OllamaClient, Job], None]


def lane(host: Host, stage: Stage, jobs: int | str) -> Lane:
    """The host's lane for a stage, made on first use and kept for the run."""
    if stage.name not in host.lanes:
        host.lanes[stage.name] = Lane(stage.model, jobs)
    return host.lanes[stage.name]


def run_stage(hosts: list[Host], jobs: list[Job], stages: Sequence[Stage], *, progress: Progress,
              jobs_per_host: int | str = 1, one_model: Collection[str] = ()) -> None:
    """Run the stages over jobs on every live host, as many requests at once per host and stage
    as the host's lane allows (jobs_per_host: a number, or AUTO to learn it).

    A job takes the first stage that matches its status, and goes back to the front of the queue
    for the next one (so with two stages, text steps start on described images while the vision
    stage goes on). A host in one_model holds one model at a time: it takes a later stage's jobs
    only once no job waits for an earlier one and its own earlier requests are answered, so it
    swaps models once.

    A host that stops answering gives its job back and leaves the run; so does one
    that failed HOST_FAILURE_LIMIT images in a row with server errors. An image that
    a host failed that way goes to another live host, and fails only once every live
    host failed it. Raises ServerUnreachable, or ServerFailing, when no host is left.
    """
    import threading

    queue = collections.deque(jobs)
    ready = threading.Condition()
    stop = threading.Event()
    errors: list[BaseException] = []
    failed_on: dict[int, set[str]] = {}  # id(job) -> hosts that failed it with a server error
    last_error: dict[int, str] = {}
    working = [0]  # jobs in a step: each may come back to the queue
    by_status = {stage.status: stage for stage in stages}

    def live_urls() -> set[str]:
        return {host.client.host for host in hosts if not host.dropped}

    def take(host: Host) -> tuple[Job, Stage, Lane] | None:
        first = stages[0].status
        # A one-model host swaps once its own first-stage requests are answered too: a later one
        # sent beside one of them could reach the server first and make it swap twice.
        holds_first = host.client.host in one_model and (
            any(job.status == first for job in queue)
            or len(stages) > 1 and lane(host, stages[0], jobs_per_host).in_flight > 0)
        for index, job in enumerate(queue):
            stage = by_status[job.status]
            if host.client.host in failed_on.get(id(job), ()) or holds_first and job.status != first:
                continue
            its_lane = lane(host, stage, jobs_per_host)
            if its_lane.has_room():
                del queue[index]
                return job, stage, its_lane
        return None

    def drop(host: Host, reason: str) -> None:
        if len(hosts) > 1:  # with one server, the run's own error says it all
            progress.note(f"leaving out {host.client.host} for the rest of the run: {reason}")

    def wait_for_job(host: Host) -> tuple[Job, Stage, Lane] | None:
        with ready:
            while not stop.is_set() and not host.dropped:
                taken = take(host)
                if taken:
                    working[0] += 1
                    taken[2].start(time.monotonic())
                    return taken
                if not working[0]:
                    return None  # nothing in a step can bring this host another job
                ready.wait(0.1)
        return None

    threads: list[threading.Thread] = []
    workers: collections.Counter = collections.Counter()  # host URL -> its threads still working

    def add_workers(host: Host) -> None:
        """Start a thread per request the host's lanes allow now (they grow with --jobs auto);
        idle threads beyond that would only wake on every answer."""
        wanted = sum(lane(host, stage, jobs_per_host).allowed for stage in stages)
        while workers[host.client.host] < min(wanted, len(queue) + working[0]):
            workers[host.client.host] += 1
            thread = threading.Thread(target=work, args=(host,), daemon=True)
            threads.append(thread)
            thread.start()

    def work(host: Host) -> None:
        try:
            work_on(host)
        finally:
            with ready:
                workers[host.client.host] -= 1

    def work_on(host: Host) -> None:
        while True:
            taken = wait_for_job(host)
            if taken is None:
                return
            job, stage, its_lane = taken
            before = host.client.tally()
            try:
                if not step_on(host, job, stage):
                    return
            finally:
                calls, loads, busy = (after - then for after, then in zip(host.client.tally(), before))
                with ready:
                    its_lane.finish(time.monotonic(), asked=calls > 0, loaded=loads > 0, busy=busy > 0)
                    working[0] -= 1
                    add_workers(host)
                    ready.notify_all()

    def step_on(host: Host, job: Job, stage: Stage) -> bool:
        """Run one step; False when this host's worker should stop."""
        try:
            stage.step(host.client, job)
        except HOST_DOWN as exc:
            with ready:
                queue.appendleft(job)
                if host.dropped:
                    return False
                host.dropped = str(exc)
            drop(host, str(exc))
            return False
        except TransientError as exc:  # a server error, after the client's retries
            with ready:
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
                    return True
                else:
                    job.status, job.reason, reason = "failed", str(exc), ""
            if reason:
                drop(host, reason)
                return False
        except BaseException as exc:  # noqa: BLE001 - fatal errors and Ctrl-C end the run
            errors.append(exc)
            stop.set()
            return False
        else:
            with ready:
                host.failures = 0
                if job.status in by_status:  # on to the next stage
                    failed_on.pop(id(job), None)
                    queue.appendleft(job)
        progress.advance(job, stage.name)
        return True

    while queue:
        live = live_urls()
        for job in [job for job in queue if live and failed_on.get(id(job), set()) >= live]:
            queue.remove(job)  # every host left has failed it
            stage = by_status[job.status]
            job.status, job.reason = "failed", last_error[id(job)]
            progress.advance(job, stage.name)
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
        try:  # a Ctrl-C while the workers start stops those already started too
            with ready:
                for host in hosts:
                    if not host.dropped:
                        add_workers(host)
            while True:
                with ready:
                    alive = [thread for thread in threads if thread.is_alive()]
                if not alive:
                    break
                alive[0].join(0.1)
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
            self.job.status, self.job.reason, self.job.hint = "failed", str(exc), exc.hint
            self.job.by_model = isinstance(exc, ModelAnswerError)
        elif isinstance(exc, OSError):
            self.job.status = "failed"
            self.job.reason = f"cannot write {shown(self.writes)} ({exc.strerror or exc})"
        else:
            return False
        return True


class CaptionRun:
    """The engine of a caption run: it schedules the two stages over the jobs and alone records
    what they return. A job without a caption file (one image on the command line) keeps its
    caption for printing."""

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
        # A clip's prompt names its own frame times; the key takes the template, not those.
        system, user = vision_prompt(config, spec.hint, "video", frames="$frames", duration="$duration",
                                     timestamps="$timestamps")
        self.clip_prompt_sha256 = hashlib.sha256(f"{system}\0{user}".encode()).hexdigest()
        self.pillow = pillow_installed()
        # Held while a caption file is written, so Ctrl-C never cuts one short.
        self.write_lock = threading.Lock()

    def vision_step(self, client: OllamaClient, job: Job) -> None:
        """Describe one image (from the cache when it was described before) and record it."""
        if self._taken(job, "caption exists"):
            return
        with failing_job(job, "the description cache"):
            job.description, job.cached = self.describe(client, job)
            job.status = "described"

    def job_spec(self, job: Job) -> CaptionSpec:
        """The run's spec for one image: its own hint after --hint, and its grounding (read once)."""
        if job.grounding is None:
            job.grounding = grounding(job.image, self.spec.ground)
        hint = " ".join(part for part in (self.spec.hint, job.image_hint) if part)
        return self.spec.replace(hint=hint, grounding=job.grounding,
                                 file_stem=os.path.splitext(os.path.basename(job.image))[0])

    def description_key(self, data: bytes, job: Job | None = None) -> tuple[str, str]:
        """The cache key of an image's description, and how the image is prepared ("" for not):
        the original file's content, the vision model, the prompt (with the image's own hint and
        grounding) and the preparation, so a rerun finds it and a new --max-side describes again."""
        import hashlib

        prepared = preparation(_image_kind(data[:32]) or "", image_size_of(data), self.options.max_side,
                               pillow=self.pillow)
        prompt_sha256 = self.prompt_sha256
        if job is not None and (job.image_hint or self.spec.ground):
            spec = self.job_spec(job)
            system, user = vision_prompt(self.config, spec.hint, grounding=spec.grounding)
            prompt_sha256 = hashlib.sha256(f"{system}\0{user}".encode()).hexdigest()
        return DescriptionCache.key(hashlib.sha256(data).hexdigest(), self.config.vision_model,
                                    prompt_sha256, prepared), prepared

    def describe(self, client: OllamaClient, job: Job) -> tuple[str, bool]:
        """Stage 1 for one job: its description, and whether it came from the cache.

        An image the server cannot decode (WebP on older servers) is converted and sent once more.
        """
        import base64

        if media_of(job.image) == "video":
            return self.describe_clip(client, job)
        data = read_image(job.image)  # checked and read once, then prepared and encoded once
        key, prepared = self.description_key(data, job)
        cached = self.cache.get(key) if self.options.use_cache else None
        if cached:
            return cached, True
        if prepared:
            data = prepare_image(data, self.options.max_side)  # the original is released here
        image_base64 = base64.b64encode(data).decode("ascii")
        del data  # only the base64 text is sent: one copy of the image per job, not three
        try:
            try:
                description = self.ask_vision(client, image_base64, job)
            except ImageUnreadable:
                if prepared or not self.pillow:
                    raise
                image_base64 = ""
                converted = prepare_image(read_image(job.image), self.options.max_side)
                image_base64 = base64.b64encode(converted).decode("ascii")
                del converted
                description = self.ask_vision(client, image_base64, job)
        except ImageUnreadable as exc:
            if not self.pillow:
                raise  # its hint: install Pillow
            raise ImageUnreadable(f"{exc}, also converted", hint="check that the vision model can see "
                                  "images, and try another with --vision-model") from None
        self.cache.put(key, {"image": job.name, "model": self.config.vision_model,
                             "description": description})
        return description, False

    def describe_clip(self, client: OllamaClient, job: Job) -> tuple[str, bool]:
        """Stage 1 for a clip: frames sampled over it, described in one request (or the cache's
        description: keyed by the clip's content, the model, the prompt, --frames and --max-side)."""
        import base64

        key = self.clip_key(job)
        cached = self.cache.get(key) if self.options.use_cache else None
        if cached:
            return cached, True
        info, times, size = clip_plan(job.image, self.options.frames, self.options.max_side)
        frames = [base64.b64encode(frame).decode("ascii") for frame in extract_frames(job.image, times, size)]
        spec = self.job_spec(job)
        prompt = vision_prompt(self.config, spec.hint, "video", grounding=spec.grounding, frames=len(frames),
                               duration=f"{info.duration:.1f} seconds" if info.duration else "unknown length",
                               timestamps=", ".join(f"{at:.1f} s" for at in times))
        description = without_surrogates(describe_image(client, self.config, frames, prompt=prompt,
                                                        keep_alive=self.options.keep_alive))
        self.cache.put(key, {"image": job.name, "model": self.config.vision_model,
                             "description": description})
        return description, False

    def clip_key(self, job: Job) -> str:
        """The cache key of a clip's description: its content (hashed in pieces), the vision model,
        the prompt (with the clip's own hint and grounding), and how frames are sampled (--frames,
        --max-side)."""
        import hashlib

        prompt_sha256 = self.clip_prompt_sha256
        if job.image_hint or self.spec.ground:
            spec = self.job_spec(job)
            prompt_sha256 = hashlib.sha256(f"{prompt_sha256}\0{spec.hint}\0{spec.grounding}".encode()).hexdigest()
        return DescriptionCache.key(file_sha256(job.image), self.config.vision_model, prompt_sha256,
                                    f"frames {self.options.frames} max-side {self.options.max_side}")

    def ask_vision(self, client: OllamaClient, image_base64: str, job: Job) -> str:
        """The vision model's description of one image."""
        spec = self.job_spec(job)
        return without_surrogates(describe_image(client, self.config, image_base64, hint=spec.hint,
                                                 grounding=spec.grounding,
                                                 keep_alive=self.options.keep_alive))

    def text_step(self, client: OllamaClient, job: Job) -> None:
        """Write one caption from its description and record it."""
        if self._taken(job, "caption appeared during the run; kept it"):
            return
        with failing_job(job, job.caption_file):
            # Every variant is written before any file is: one that fails fails the image, no half set.
            captions = [self.write_variant(client, spec, job.description, media_of(job.image))
                        for spec in self.job_spec(job).per_variant()]
            with self.write_lock:
                if self._taken(job, "caption appeared during the run; kept it"):
                    return
                if job.caption_file:
                    os.makedirs(os.path.dirname(job.caption_file) or ".", exist_ok=True)
                    for path, texts in self.caption_files(job, captions):
                        self.back_up(job, path)
                        if len(texts) == 1:
                            write_caption_file(path, texts[0])
                        else:
                            write_caption_lines(path, texts)
            job.status, job.caption = "written", captions[0]
            job.captions = captions if self.spec.variants else []
        # Done with it either way (a job handed to another server keeps it): the
        # description is in the cache, and memory stays flat over a long run.
        if job.caption_file:
            job.description = ""

    def write_variant(self, client: OllamaClient, spec: CaptionSpec, description: str, media: str) -> Caption:
        """One caption of an image or clip, in one variant's style; a failure names the variant."""
        try:
            caption = write_caption(client, self.config, spec, description, keep_alive=self.options.keep_alive,
                                    media=media)
        except ModelAnswerError as exc:
            if not self.spec.variants:
                raise
            raise ModelAnswerError(f"the {spec.style} variant: {exc}", hint=exc.hint) from None
        caption.text = without_surrogates(caption.text)
        caption.variant = spec.style if self.spec.variants else ""
        if not caption.spans:
            caption.raw = ""  # nothing was removed or flagged: the caption is the answer
        return caption

    def caption_files(self, job: Job, captions: list[Caption]) -> list[tuple[str, list[str]]]:
        """(file, lines) of each caption file an image gets: all its variants as lines of one
        file, or one file each (--variants-to files)."""
        paths = variant_paths(job.caption_file, self.options)
        if len(paths) == len(captions):
            return [(path, [caption.text]) for path, caption in zip(paths, captions)]
        return [(job.caption_file, [caption.text for caption in captions])]

    def back_up(self, job: Job, path: str = "") -> None:
        """Keep the caption file about to be replaced in the backup folder; an image whose caption
        cannot be kept is not captioned."""
        path = path or job.caption_file
        try:
            backup_caption(self.options.output_dir or self.report.folder, path)
        except OSError as exc:
            raise ImageError(f"cannot back up {shown(path)} before replacing it "
                             f"({exc.strerror or exc})", hint="check the .ollama-generate/backup folder") from None

    def _taken(self, job: Job, reason: str) -> bool:
        """Skip an image whose caption another run (or the user) wrote meanwhile, or that became foreign."""
        if not job.caption_file:  # one image on the command line: printed, no file
            return False
        state = caption_set_state(job.caption_file, self.options)
        if state == "exists" and not self.options.overwrite:
            job.status, job.reason = "skipped", reason
            return True
        if state not in ("", "exists"):
            job.status, job.reason = "skipped", state
            return True
        return False

    def holding_both(self, hosts: list[Host]) -> set[str]:
        """The live hosts whose stages overlap in the next chunk: with --stages auto, those that
        hold the vision and the text model at once; a host not known yet is asked (/api/ps)."""
        layout = self.options.stages
        live = [host for host in hosts if not host.dropped]
        if layout != "auto":
            return {host.client.host for host in live} if layout == "overlap" else set()
        for host in live:
            if host.holds_both is None and self.both_loaded(host.client):
                host.holds_both = True
        return {host.client.host for host in live if host.holds_both}

    def both_loaded(self, client: OllamaClient) -> bool:
        """Whether the server has the vision and the text model loaded now. A server that does
        not say what it holds (an OpenAI-compatible one) holds both only when one model does both."""
        if not client.kind.loads:
            return with_tag(self.config.vision_model) == with_tag(self.config.model)
        try:
            loaded = {with_tag(name) for name in client.loaded_models()}
        except OllamaError:
            return False  # not known: the stages stay apart, which is never wrong
        return {with_tag(self.config.vision_model), with_tag(self.config.model)} <= loaded

    def look_after(self, step: Callable[[OllamaClient, Job], None]) -> Callable[[OllamaClient, Job], None]:
        """The step, and after its first answer on a host, a look at what that host holds: a
        server that kept the vision model while loading the text model holds both, and its
        stages overlap from the next chunk on. One that swapped them keeps stage batching."""
        import threading

        looked: set[str] = set()
        lock = threading.Lock()

        def step_and_look(client: OllamaClient, job: Job) -> None:
            step(client, job)
            with lock:
                if client.host in looked or not client.tally()[0]:
                    return
                looked.add(client.host)
            host = next(host for host in self.report.hosts if host.client is client)
            if host.holds_both is None:
                host.holds_both = self.both_loaded(client)

        return step_and_look

    def run(self) -> Report:
        """Caption the pending jobs chunk by chunk: all vision, then all text; or both at once on
        servers that hold both models."""
        report = self.report
        jobs = report.jobs
        pending = take_pending(jobs, self.options.limit)
        progress = Progress(len(pending), mode=progress_mode(self.options))
        self.cache.notify = progress.note
        planned_skips = sum(1 for job in jobs if job.status == "skipped" and job.reason == "caption exists")
        if planned_skips and progress.mode == "lines":
            print(f"Skipping {plural(planned_skips, 'image')} that already "
                  f"{'has a caption' if planned_skips == 1 else 'have captions'} "
                  "(--overwrite redoes them).", file=sys.stderr, flush=True)
        kept = sum(1 for job in jobs if job.reason == EDITED_REASON)
        if kept and progress.mode != "quiet":
            print(f"Keeping {plural(kept, 'caption')} a person edited (--overwrite-edited replaces "
                  f"{'it' if kept == 1 else 'them'} too).", file=sys.stderr, flush=True)
        for job in jobs:
            if job.status in ("failed", "skipped") and job.reason not in ("caption exists", EDITED_REASON) \
                    and progress.mode == "lines":
                print(f"{job.name}: {job.status}: {job.reason}", file=sys.stderr, flush=True)
        started = progress.started  # the live line and the summary time the same run
        vision = Stage("vision", "pending", self.config.vision_model, self.vision_step)
        text = Stage("text", "described", self.config.model, self.text_step)
        # Until a host is known to hold both models, its text stage looks once (see look_after).
        looking = Stage("text", "described", self.config.model, self.look_after(self.text_step))
        hosts = report.hosts
        run = functools.partial(run_stage, hosts, progress=progress, jobs_per_host=self.options.jobs)
        try:
            for first in range(0, len(pending), self.options.chunk):
                chunk = pending[first:first + self.options.chunk]
                later = first + self.options.chunk < len(pending)  # a look now pays off in later chunks
                both = self.holding_both(hosts) if len(chunk) > 1 else set()  # one image: nothing to overlap
                if both:
                    progress.stage(PIPELINE, 2 * len(chunk))
                    run(chunk, [vision, text], one_model={host.client.host for host in hosts} - both)
                    for host in hosts:
                        host.overlapped = host.overlapped or host.client.host in both and not host.dropped
                    continue
                progress.stage("vision", len(chunk))
                run(chunk, [vision])
                described = [job for job in chunk if job.status == "described"]
                progress.stage("text", len(described))
                run(described, [looking if self.options.stages == "auto" and later else text])
        except (KeyboardInterrupt, *FATAL_ERRORS):
            self.write_lock.acquire(timeout=10)  # let a caption being written finish, start no other
            report.interrupted = True
            raise
        finally:
            report.seconds = time.monotonic() - started
            progress.close()
        return report


def connect_hosts(config: Config) -> list[Host]:
    """Check every server for both models; leave out (as dropped) those that cannot work.

    Raises the first server's problem when none can work.
    """
    hosts, problems = [], []
    for url in config.hosts:
        host = Host(connect(config, url))
        try:
            host.models = check_models(host.client, config)
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
              + f" (of {plural(len(report.jobs), 'image')}).", file=sys.stderr)
        calls = sum(host.client.calls for host in report.hosts)
        loads = report.loads_seen
        print(f"{report.images_per_minute:.1f} images/min; {plural(calls, 'model call')}, "
              f"{plural(report.cached, 'description')} from the cache, "
              + ("model loads not reported by the server." if loads is None else f"{plural(loads, 'model load')} seen."),
              file=sys.stderr)
    if not quiet and any(lane.images for host in report.hosts for lane in host.lanes.values()):
        for host in report.hosts:
            print(speed_line(host), file=sys.stderr)
    cleaning = report.cleaning_counts()
    if cleaning and not quiet:
        print("Cleaning touched: " + ", ".join(f"{rule} ({count})" for rule, count in cleaning.items())
              + "; --report keeps each raw answer and what was removed.", file=sys.stderr)
    if report.needs_review and not quiet:
        print(f"Needs review ({len(report.needs_review)}, written):", file=sys.stderr)
        for job in report.needs_review:
            print(f"  {job.name}: {'; '.join(job.review)}", file=sys.stderr)
    if report.failed:
        print("Failed:", file=sys.stderr)
        for job in report.failed:
            print(f"  {job.name}: {job.reason}", file=sys.stderr)
    sys.stderr.flush()


def speed_line(host: Host) -> str:
    """One server's stages in the summary, e.g. "vision 31.5 images/min (1 at once), text ..."."""
    stages = ", ".join(f"{name} {lane.images_per_minute():.1f} images/min ({lane.chosen} at once"
                       + (", learned" if lane.auto else "")
                       + (f"; {lane.in_flight_chosen} in flight" if lane.in_flight_chosen != lane.chosen else "")
                       + ")" for name, lane in host.lanes.items() if lane.images)
    return (f"{host.client.host}: {stages or 'no model calls'}; stages "
            + ("overlapped" if host.overlapped else "one after the other")
            + ("; model loads not reported." if host.load_wait is None
               else f"; {format_duration(host.load_wait)} waiting for model loads."))


def manifest_path(value: str | None, folder: str) -> str | None:
    """Where --manifest goes: FOLDER/metadata.jsonl, the one place Hugging Face datasets loads it from.

    A bare --manifest means that place; any other file name, or a file in another folder (where
    file_name would start with .. or miss images), is refused before any model call.
    """
    if value is None:
        return None
    right = os.path.join(folder, MANIFEST_NAME)
    if value == "":
        return right
    hint = f"write it to {shown(right)}, or give --manifest without a file name"
    if os.path.realpath(os.path.dirname(os.path.abspath(value))) != os.path.realpath(folder):
        raise UsageError(f"--manifest {shown(value)} is outside the dataset {shown(folder)}: Hugging Face "
                         "datasets reads file_name relative to the manifest's folder", hint=hint)
    if os.path.basename(value) != MANIFEST_NAME:
        raise UsageError(f"--manifest {shown(value)} is not named {MANIFEST_NAME}: "
                         'load_dataset("imagefolder") finds the manifest only by that name', hint=hint)
    return value


def variant_texts(caption_file: str, options: BatchOptions) -> list[tuple[str, str | None]]:
    """(manifest column, caption) of an image's captions, read back from its files: text for the
    first, text_NAME for each later --variants name (None where it is missing)."""
    if not options.variants:
        return [("text", read_caption(caption_file))]  # a regular file only: never a link or a FIFO
    columns = ["text"] + [f"text_{name}" for name in options.variants[1:]]
    paths = variant_paths(caption_file, options)
    if len(paths) == len(columns):
        return list(zip(columns, map(read_caption, paths)))
    whole = read_caption(caption_file, whole=True)
    found = whole.splitlines() if whole else []
    return [(column, found[index].strip() if index < len(found) else None) for index, column in enumerate(columns)]


def write_manifest(path: str, report: Report, options: BatchOptions | None = None) -> int:
    """Write a Hugging Face imagefolder metadata.jsonl of every captioned image; return the count.

    file_name is the image's path relative to the dataset folder (where manifest_path() puts the
    file); text is its caption, read from wherever it was written (beside it or under --output-dir).
    """
    base = os.path.abspath(report.folder)
    lines, left_out = [], []
    for job in report.jobs:
        texts = variant_texts(job.caption_file, options or BatchOptions())
        text = texts[0][1] if texts else None
        if text:
            name = os.path.relpath(os.path.abspath(job.image), base).replace(os.sep, "/")
            if shown(name) != name:  # not UTF-8: no file_name in the manifest could name it
                left_out.append(shown(name))
                continue
            lines.append(json.dumps({"file_name": name, **dict(texts)}, ensure_ascii=False))
    write_output_file(path, "".join(line + "\n" for line in lines))
    if left_out:
        warn(f"{path} leaves out {plural(len(left_out), 'image')} whose file name is not UTF-8 "
             f"({', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''}); rename them to include them")
    return len(lines)


def read_image_hints(path: str) -> dict[str, str]:
    """The per-image hints of a hints.jsonl: image name (relative, with / separators) -> hint.

    Every line is checked, and the first bad one is an error naming it: a hint that silently
    reaches no image, or the wrong one, is worse than a run that does not start."""
    try:
        with open_regular(path) as handle:
            data = handle.read(MAX_HINTS_BYTES + 1)
    except (ImageError, OSError) as exc:
        raise UsageError(f"the hints file {shown(path)}: {exc}") from None
    if len(data) > MAX_HINTS_BYTES:
        raise UsageError(f"the hints file {shown(path)} is over {MAX_HINTS_BYTES // 10**6} MB",
                         hint="keep one short hint per image")
    hints = {}
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{shown(path)} line {number}"
        try:
            entry = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise UsageError(f"{where} is not UTF-8 text", hint="save the file as UTF-8") from None
        except ValueError as exc:
            raise UsageError(f"{where} is not JSON ({getattr(exc, 'msg', exc)})", hint=HINTS_FORMAT) from None
        name = entry.get("file_name", entry.get("image")) if isinstance(entry, dict) else None
        hint = entry.get("hint") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.strip() or not isinstance(hint, str):
            raise UsageError(f'{where} needs "file_name" (or "image") and "hint", both text',
                             hint=HINTS_FORMAT)
        hints[shown(os.path.normpath(name.replace("\\", "/")).replace(os.sep, "/"))] = one_line(hint)
    return hints


def add_image_hints(jobs: list[Job], folder: str, options: BatchOptions) -> None:
    """Give each job its line of --hints FILE (or the folder's hints.jsonl); names that match no
    image are warned of once."""
    path = options.hints or os.path.join(folder, HINTS_FILE)
    if not options.hints and not os.path.lexists(path):
        return
    hints = read_image_hints(path)
    for job in jobs:
        job.image_hint = hints.pop(job.name, "")
    if hints:
        names = sorted(hints)
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        warn(f"{shown(path)} names {plural(len(names), 'image')} not in the folder: "
             f"{', '.join(names[:3])}{more}; their hints are not used")


def check_ground_files(jobs: list[Job], options: BatchOptions) -> None:
    """--ground existing with the tag files as the caption files: without --overwrite the run keeps
    them all and captions nothing, so say what would make it do something."""
    grounded = [job for job in jobs if ground_file(job.image)]
    if not grounded:
        warn(f"--ground existing: no image has a tag or caption file ({', '.join(GROUND_FILES)}) beside it; "
             "its captions are written without facts")
        return
    kept = [job for job in grounded if job.status == "skipped" and job.reason == "caption exists"
            and ground_file(job.image) == job.caption_file]
    if kept and not any(job.status == "pending" for job in jobs):
        raise UsageError(f"--ground existing: the tag or caption files are the {options.ext} captions this "
                         f"run writes, and existing captions are kept, so nothing would be captioned",
                         hint="add --overwrite to replace them grounded in what they say (each is "
                              "backed up), or write beside them with another --ext, such as --ext .caption")
    if kept:
        warn(f"--ground existing: {plural(len(kept), 'image')} kept {options.ext} files that are also their "
             "tag files (--overwrite replaces them grounded in them; another --ext writes beside them)")


def size_vision_context(config: Config, spec: CaptionSpec, options: BatchOptions, jobs: list[Job],
                        hosts: list[Host]) -> Config:
    """The run's settings with one vision num_ctx for all of it, sized for the largest image as it
    will be sent, the prompt and the answer (see vision_context). Warns when that is more than the
    model's context length, or more than an explicit --num-ctx (which is still sent)."""
    details = next((host.models.get(config.vision_model) for host in hosts if host.models), None) or {}
    family = vision_family(details)
    pillow = pillow_installed()
    largest = None
    for job in jobs:
        if job.status == "pending" and media_of(job.image) == "video":
            clip = clip_tokens_sent(job, family, options)
            if clip and (largest is None or clip[0] > largest[0]):
                largest = clip
            continue
        size = image_size(job.image) if job.status == "pending" else None
        if size is not None:
            width, height = sent_size(size, options.max_side, pillow=pillow)
            tokens = image_tokens(family, width, height)
            if largest is None or tokens > largest[0]:
                largest = (tokens, f"{job.name}, {width}x{height} as sent")
    if largest is None:
        return config
    needed = vision_context(largest[0], prompt_tokens("".join(vision_prompt(config, spec.hint))
                                                      + grounding_room(spec, jobs)))
    limit = context_length(details)
    what = (f"the largest image ({largest[1]}) needs about {needed} context tokens with "
            f"{config.vision_model} ({plural(largest[0], 'image token')} estimated for the "
            f"{family or 'unknown'} family)")
    if config.num_ctx and config.num_ctx < needed:
        warn(f"{what}, more than --num-ctx {config.num_ctx}; the server may cut the prompt")
    elif limit and needed > limit:
        warn(f"{what}, more than its context length of {limit}; the server may cut the prompt: "
             f"lower --max-side" + ("" if pillow else f" (with Pillow: {PILLOW_EXTRA})")
             + " or pick a vision model with a longer context")
    return config.replace(vision_num_ctx=needed)


def clip_tokens_sent(job: Job, family: str, options: BatchOptions) -> tuple[int, str] | None:
    """The image tokens of a clip's frames as sent, and what they are; None when it cannot be probed
    (it fails when described)."""
    try:
        info = probe_clip(job.image)
    except ImageError:
        return None
    width, height = clip_frame_size(info, options.max_side)
    frames = len(frame_times(info.duration, options.frames))
    what = f"{job.name}, {plural(frames, 'frame')} at {width}x{height}"
    return frames * image_tokens(family, width, height), what


def fit_clip_frames(config: Config, spec: CaptionSpec, options: BatchOptions, jobs: list[Job],
                    hosts: list[Host]) -> BatchOptions:
    """The run's options with --frames lowered, with one warning, when the largest clip's frames
    would not fit the vision model's context (its context length, or an explicit --num-ctx)."""
    details = next((host.models.get(config.vision_model) for host in hosts if host.models), None) or {}
    limits = [value for value in (config.num_ctx, context_length(details)) if value]
    clips = [job for job in jobs if job.status == "pending" and media_of(job.image) == "video"]
    if not limits or not clips:
        return options
    family = vision_family(details)
    per_frame = 0
    for job in clips:
        try:
            size = clip_frame_size(probe_clip(job.image), options.max_side)
            per_frame = max(per_frame, image_tokens(family, *size))
        except ImageError:
            continue  # it fails when described
    if not per_frame:
        return options
    prompt = prompt_tokens("".join(vision_prompt(config, spec.hint, "video", frames=options.frames,
                                                 duration="", timestamps=" 00.0 s," * options.frames)))
    room = min(limits) - prompt - 2 * SAMPLING["vision"][1]
    fits = max(1, room // per_frame)
    if fits >= options.frames:
        return options
    warn(f"{plural(options.frames, 'frame')} of {plural(per_frame, 'image token')} each do not fit the "
         f"{min(limits)}-token context of {config.vision_model}; sending {plural(fits, 'frame')} per clip "
         "(lower --max-side to keep more)")
    return options.replace(frames=fits)


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
    pillow = pillow_installed()
    return "\n".join(
        f"caption: {job.name}{media_label(job.image, options, pillow=pillow)} "
        f"-> {', '.join(map(shown, variant_paths(job.caption_file, options)))}" if job.status == "pending"
        else f"{verbs[job.status]}: {job.name} ({job.reason})"
        for job in jobs)


def media_label(path: str, options: BatchOptions, *, pillow: bool) -> str:
    """An image's size, or a clip's duration, size and frames, as a dry run shows them."""
    if media_of(path) == "video":
        return clip_label(path, options.frames, options.max_side)
    return size_label(image_size(path), options.max_side, pillow=pillow)


def size_fields(size: ImageSize | None, max_side: int, *, pillow: bool) -> dict:
    """An image's size for --json: upright width and height, and the size it is sent at (None
    when the header cannot be read)."""
    if size is None:
        return {"width": None, "height": None, "sent_width": None, "sent_height": None}
    width, height = size.upright
    sent = sent_size(size, max_side, pillow=pillow)
    return {"width": width, "height": height, "sent_width": sent[0], "sent_height": sent[1]}


def size_label(size: ImageSize | None, max_side: int, *, pillow: bool) -> str:
    """An image's size as a dry run shows it, with the size it is sent at when that differs.

    >>> size_label(ImageSize(6000, 4000), 1536, pillow=True)
    ' (6000x4000, sent as 1536x1024)'
    >>> size_label(ImageSize(60, 40, 6), 0, pillow=False)
    ' (40x60)'
    """
    if size is None:
        return ""
    width, height = size.upright
    sent = sent_size(size, max_side, pillow=pillow)
    return f" ({width}x{height}" + (f", sent as {sent[0]}x{sent[1]})" if sent != (width, height) else ")")


def caption_extension(value: str) -> str:
    """The --ext of caption, stats and review, checked: a dot and a name that is not an image's.

    >>> caption_extension("caption")
    '.caption'
    """
    ext = value if value.startswith(".") else "." + value
    if len(ext) < 2 or "/" in ext or os.sep in ext or ext.lower() in IMAGE_EXTENSIONS:
        raise UsageError(f"--ext {value!r} is not a caption extension", hint="use .txt (the default) or .caption")
    return ext


def batch_options(args: argparse.Namespace, folder: str) -> BatchOptions:
    """The folder-run flags, checked."""
    ext = caption_extension(args.ext)
    output_dir = os.path.abspath(args.output_dir) if args.output_dir else None
    return BatchOptions(
        overwrite=args.overwrite or args.overwrite_edited, overwrite_edited=args.overwrite_edited,
        recursive=args.recursive, ext=ext, output_dir=output_dir,
        limit=args.limit, dry_run=args.dry_run, chunk=args.chunk, jobs=args.jobs, stages=args.stages,
        keep_alive=DEFAULT_KEEP_ALIVE if args.keep_alive is None else args.keep_alive,
        release_models=args.keep_alive is None, cache_dir=args.cache_dir,
        use_cache=not args.no_cache, quiet=args.quiet, report=args.report,
        manifest=manifest_path(args.manifest, folder), max_side=args.max_side, frames=args.frames,
        variants=parse_variants(args.variants), variants_to=args.variants_to, hints=args.hints,
    )


# Folder-run flags and their defaults: a single file refuses any other value.
FOLDER_ONLY = {"overwrite_edited": False, "recursive": False, "output_dir": None, "limit": None, "dry_run": False,
               "manifest": None, "report": None, "hints": None,
               "ext": CAPTION_EXTENSION, "jobs": AUTO, "stages": "auto", "chunk": DEFAULT_CHUNK,
               "keep_alive": None,
               "quiet": False, "variants_to": "lines"}


def caption_folder(config: Config, spec: CaptionSpec, folder: str, options: BatchOptions) -> Product:
    """Caption a folder: plan, check, run, report."""
    images = find_images(folder, recursive=options.recursive)
    if not images:
        raise UsageError(f"{shown(folder)} has no images ({', '.join(MEDIA_EXTENSIONS)})"
                         + ("" if options.recursive else "; --recursive looks in subfolders"))
    jobs = plan_jobs(folder, images, options)
    add_image_hints(jobs, folder, options)
    if "existing" in spec.ground:
        check_ground_files(jobs, options)
    if options.dry_run:
        listing = dry_run(jobs, options)
        counts = collections.Counter(line.split(":", 1)[0] for line in listing.splitlines())
        print(f"Dry run: {counts['caption']} to caption, {counts['skip']} skipped, "
              f"{counts['fail']} failing, {counts['later']} left for later "
              f"(of {plural(len(jobs), 'image')}); "
              "no model was called.", file=sys.stderr)
        actions = {"pending": "caption", "skipped": "skip", "failed": "fail", "later": "later"}
        pillow = pillow_installed()
        return Product(listing, {"command": "caption", "dry_run": [
            {"image": job.name, "action": actions[job.status], "caption_file": shown(job.caption_file),
             **({"caption_files": [shown(path) for path in variant_paths(job.caption_file, options)]}
                if options.variants else {}),
             "reason": job.reason or None,
             **size_fields(image_size(job.image), options.max_side, pillow=pillow)}
            for job in jobs]})
    target = options.output_dir or folder
    make_folder(target, "--output-dir" if options.output_dir else "the folder")
    check_writable(target)
    for flag, path in (("--report", options.report), ("--manifest", options.manifest)):
        if path:
            check_output_file(path, flag)
    check_templates(config, spec)
    written_into = {os.path.dirname(job.caption_file) for job in jobs} | {
        os.path.dirname(os.path.abspath(path)) for path in (options.report, options.manifest) if path}
    remove_stale_temp_files(written_into, time.time())
    report = Report(folder=folder, jobs=jobs)
    try:
        report.hosts = connect_hosts(config)
    except (KeyboardInterrupt, OllamaError) as exc:
        report.interrupted = True
        finish_report(report, options)
        exc.report = report.as_dict()
        raise
    cache_folder = options.cache_dir or os.path.join(target, CACHE_FOLDER)
    make_folder(cache_folder, "--cache-dir" if options.cache_dir else "the cache folder")
    # A cache that cannot work warns and stays off; the default one is never reached through a link.
    cache = DescriptionCache(cache_folder, follow_links=bool(options.cache_dir))
    options = fit_clip_frames(config, spec, options, jobs, report.hosts)
    config = size_vision_context(config, spec, options, jobs, report.hosts)
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
        product.error = batch_failed(report, config)
    return product


def batch_failed(report: Report, config: Config) -> BatchFailed:
    """The error of a run in which some images failed; the hint blames what failed them."""
    failed = report.failed
    by_model = [job for job in failed if job.by_model]
    if len(by_model) == len(failed):
        return BatchFailed(
            f"{len(failed)} of {plural(len(report.jobs), 'image')} failed: the models gave no usable answer",
            hint=f"try another text model (--model, now {config.model}) or vision model "
                 f"(--vision-model, now {config.vision_model}); finished captions are kept")
    return BatchFailed(f"{len(failed)} of {plural(len(report.jobs), 'image')} failed",
                       hint="fix or remove them and run the same command again; finished captions are kept")


def finish_report(report: Report, options: BatchOptions) -> None:
    """Write --report and --manifest, also after a run that stopped early; one failing does not
    keep the other from being written. A copy of the report stays in the cache folder as
    last-report.json, for `review` (nothing is said if it cannot be kept)."""
    try:
        folder = options.cache_dir or state_folder(options.output_dir or report.folder, create=False)
        if os.path.isdir(folder):
            write_text_atomically(os.path.join(folder, LAST_REPORT_FILE),
                                  json_document(report.as_dict(), ensure_ascii=True) + "\n")
    except OSError:
        pass  # a convenience copy: the run's own outputs are what counts
    if options.report:
        _write_or_warn(options.report, write_output_file, options.report,
                       json_document(report.as_dict(), ensure_ascii=True) + "\n")
    if options.manifest:
        _write_or_warn(options.manifest, write_manifest, options.manifest, report, options)


def _write_or_warn(path: str, write, *args: object) -> None:
    """write(*args), or a warning naming the file it could not write."""
    try:
        write(*args)
    except OSError as exc:  # the captions are written; say so rather than hide the run's outcome
        warn(f"cannot write {shown(str(exc.filename or path))} ({exc.strerror or exc})")


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
    try:
        info = os.stat(path)
    except FileNotFoundError:
        broken = " (a symbolic link to nothing)" if os.path.islink(path) else ""
        raise UsageError(f"{shown(path)} does not exist{broken}") from None
    except OSError as exc:
        raise UsageError(f"{shown(path)} cannot be used ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        return caption_folder(config, spec, path, batch_options(args, path))
    for name, default in FOLDER_ONLY.items():
        if getattr(args, name) != default:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} works on a folder, and {shown(path)} is a file")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{shown(path)} is not a regular file (it is {file_kind(info.st_mode)})",
                         hint="give an image file, or a folder of images")
    if os.path.splitext(path)[1].lower() not in MEDIA_EXTENSIONS:
        raise UsageError(f"{shown(path)} is not an image file (expected {', '.join(MEDIA_EXTENSIONS)})",
                         hint="give an image file, or a folder of images")
    return caption_image(config, spec, path, BatchOptions(
        keep_alive=None, release_models=False, quiet=True, cache_dir=args.cache_dir,
        use_cache=not args.no_cache, max_side=args.max_side, frames=args.frames))


def caption_image(config: Config, spec: CaptionSpec, path: str, options: BatchOptions) -> Product:
    """Caption one image and print it: a run of one job, with the cache and the same judging."""
    try:
        sniff_image(path)  # its head and tail: a broken file fails before any server is asked
    except ImageError as exc:
        raise ImageError(f"{shown(path)}: {exc}", hint=exc.hint) from None
    check_templates(config, spec)
    folder = os.path.dirname(os.path.abspath(path))
    job = Job(path, shown(os.path.basename(path)), "")
    report = Report(folder=folder, jobs=[job], hosts=connect_hosts(config))
    for host in report.hosts:
        host.client.record = []
    cache = DescriptionCache(options.cache_dir or os.path.join(folder, CACHE_FOLDER),
                             follow_links=bool(options.cache_dir)) if can_keep_cache(options, folder) else NoCache()
    options = fit_clip_frames(config, spec, options, [job], report.hosts)
    config = size_vision_context(config, spec, options, [job], report.hosts)
    try:
        CaptionRun(config, spec, options, report, cache).run()
    finally:
        cache.close()
    if job.status == "failed":
        if job.by_model:
            raise ModelAnswerError(job.reason, hint=job.hint)
        raise ImageError(f"{shown(path)}: {job.reason}", hint=job.hint)
    caption = job.caption
    if job.review:
        warn(f"needs review: {'; '.join(job.review)}")
    text = "\n".join(one.text for one in job.captions or [caption])  # --variants: one per line
    requests = [answer_data(answer, model, host.client.kind) for host in report.hosts
                for model, answer in host.client.record]
    return Product(text, {
        **caption_record(job), "command": "caption", "image": shown(path), "style": spec.style,
        "target": spec.target.name if spec.target else None,
        "creative": spec.creative, "text": caption.text, "description": job.description, "cached": job.cached,
        "needs_review": "; ".join(job.review) or None, "vision_model": config.vision_model,
        "model": config.model, "requests": requests})


class NoCache:
    """Stands in for the description cache where none is kept (--no-cache beside a read-only image)."""

    def get(self, key: str) -> None:
        return None

    def put(self, key: str, record: dict) -> None:
        return None

    def close(self) -> None:
        return None


def can_keep_cache(options: BatchOptions, folder: str) -> bool:
    """Whether a single image's cache folder can be made: beside a photo in a read-only folder
    there is none, and nothing is said (a folder run warns instead, see DescriptionCache)."""
    cache_folder = options.cache_dir or os.path.join(folder, CACHE_FOLDER)
    try:
        os.makedirs(cache_folder, exist_ok=True)
    except OSError:
        return False
    return True


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
            server = client.describe()
            client.loaded_models()  # /api/version may be absent on old servers; this must answer
        except ServerUnreachable as exc:
            checks.append(Check("server", "fail", str(exc), client.kind.start, exit_code=3))
            continue
        except OllamaError as exc:
            checks.append(Check("server", "fail", str(exc), exc.hint or client.kind.check, exit_code=1))
            continue
        checks.append(Check("server", "ok", server))
        checks.append(structured_output_check(client))
        for role, model in (("vision model", config.vision_model), ("text model", config.model)):
            checks.extend(model_checks(client, role, model))
    checks.append(image_check())
    checks.append(video_check())
    checks.append(template_check())
    return checks


def image_check() -> Check:
    """Whether images are prepared before sending (Pillow), and what is lost without it."""
    version = pillow_version()
    if version:
        return Check("images", "ok", f"Pillow {version}: images over --max-side are scaled down, turned "
                     "upright by their EXIF orientation, and BMP and GIF converted before sending")
    return Check("images", "note", "Pillow is not installed, so images are sent as they are: full size "
                 "(upload time and image tokens), EXIF orientation not applied, BMP and GIF not converted",
                 PILLOW_EXTRA)


def video_check() -> Check:
    """Whether clips can be captioned: ffprobe and ffmpeg on PATH."""
    import shutil

    missing = [name for name in ("ffprobe", "ffmpeg") if not shutil.which(name)]
    if not missing:
        return Check("video", "ok", "ffmpeg and ffprobe found: clips (" + ", ".join(VIDEO_EXTENSIONS)
                     + ") are captioned from sampled frames")
    return Check("video", "note", f"{' and '.join(missing)} not found on PATH, so clips fail (images are "
                 "not affected)", FFMPEG_INSTALL)


def structured_output_check(client: Client) -> Check:
    """Whether tag captions are asked for as a JSON array, and how to turn that off."""
    version = ".".join(map(str, client.version())) or "unknown"
    if client.supports_structured_output():
        tags = STYLES["tags"]
        return Check("structured outputs", "note", f"tags are asked for as a JSON array of {tags.low} to {tags.high} "
                     f"({client.kind.schema_by.format(version=version)}); `caption --no-structured` asks for "
                     "plain text instead")
    return Check("structured outputs", "note", f"not available on Ollama {version} (needs 0.5 or later): "
                 "tags are asked for as plain text")


def model_checks(client: Client, role: str, model: str) -> list[Check]:
    """Is the model installed, can the vision model see (asked with a probe image where the
    server does not say), and does the model think?"""
    kind = client.kind
    try:
        details = client.show(model)
    except ModelUnavailable:
        return [Check(role, "fail", f"{model} {kind.absent} {kind.where} {client.host}",
                      kind.get_model.format(model=model, host=client.host), exit_code=4)]
    capabilities = details.get("capabilities")
    checks = [Check(role, "ok", f"{model} {kind.present} "
                    f"({', '.join(capabilities or ['capabilities unknown'])})")]
    refusal = cannot_see(client, model, capabilities) if role == "vision model" else ""
    if refusal:  # the line above shows the capabilities; a probe's refusal is news
        checks.append(Check(role, "fail", f"{model} cannot see images" + ("" if capabilities else refusal),
                            kind.get_vision, exit_code=4))
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
    try:
        target_table()  # a --prompts-dir targets.json is checked here too
    except UsageError as exc:
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
                 f"{plural(len(failed), 'problem')} to fix before a caption run.")
    product = Product("\n".join(lines), {"command": "doctor", "ok": not failed, "checks": [
        {"name": c.name, "status": c.status, "detail": c.detail, "fix": c.fix or None} for c in checks]})
    if failed:
        if args.json:  # nothing is shown above: say which checks failed
            product.error = OllamaError(
                f"{plural(len(failed), 'check')} failed: "
                + "; ".join(f"{check.name}: {check.detail}" for check in failed),
                hint=failed[0].fix)
        else:
            product.error = OllamaError(f"{plural(len(failed), 'check')} failed; see above")
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
        lines.append(f"{entry['configured_as']} model {entry['name']} {client.kind.absent}: "
                     + client.kind.get_model.format(model=entry["name"], host=client.host))
    return Product("\n".join(lines), {"command": "models", "api": client.kind.name, "models": rows,
                                       "missing": missing})


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
    targets = target_rows()
    lines += ["", "Targets (--target; rows from a --prompts-dir targets.json included):"] + format_targets(targets)
    product = Product("\n".join(lines), {"command": "templates", "templates": rows, "targets": targets})
    broken = [row["problem"] for row in rows if row["problem"]]
    if broken:
        product.error = TemplateError(
            f"{len(broken)} template override{'s' if len(broken) > 1 else ''} cannot be used: "
            + "; ".join(broken),
            hint="fix the placeholders, or remove the file to use the built-in template")
    return product


def cmd_target_list(config: Config, args: argparse.Namespace) -> Product:
    """List the --target presets (`caption --target list`)."""
    rows = target_rows()
    return Product("\n".join(format_targets(rows)), {"command": "targets", "targets": rows})


# -- Dataset statistics: stats ------------------------------------------------
# stats reads a dataset through caption's own walk (find_images, caption_path, names as plan_jobs) and
# measures each caption with the caption policy's counters and ranges, so the commands agree on
# what a dataset holds. dataset_stats() returns the whole document; the review page shows its
# items, one card per image, with their flags.

# Every flag an item can carry, in the order they are listed.
STATS_FLAGS = ("missing", "empty", "unreadable image", "unreadable caption", "over CLIP budget",
               "out of range", "missing trigger", "trigger not first", "trigger repeated", "duplicate",
               "near duplicate", "needs review")
# What each caption is measured by: the caption policy's own counters.
STATS_MEASURES = {"words": count_words, "sentences": count_sentences, "tags": count_tags,
                  "clip_tokens": lambda text: clip_tokens(text)[0]}  # exact when a vocabulary is installed
# Two different captions are near duplicates when this share of their tags (tag captions) or
# words (prose) is the same (Jaccard similarity), counted on captions of at least so many terms.
NEAR_DUPLICATE_SIMILARITY = 0.8
NEAR_DUPLICATE_MIN_TERMS = 3
# An invariant trait leaks into the captions when it is in at least this share of them (and in
# at least IDENTITY_MIN_CAPTIONS): then the trigger cannot absorb it.
IDENTITY_SHARE = 0.5
IDENTITY_MIN_CAPTIONS = 3
# The report of the last folder run, inside the dataset (or --output-dir), read for needs review.
LAST_REPORT = os.path.join(CACHE_FOLDER, LAST_REPORT_FILE)
REPORT_READ_LIMIT = 256 * 1024 * 1024
# First chunks that are tags every dataset may start with, never a trigger.
NOT_TRIGGERS = frozenset("""1girl 1boy 2girls 2boys 3girls 1other solo no_humans masterpiece score_9
score_8_up score_7_up source_anime source_photo rating_safe photo photograph portrait anime""".split()
                         + ["no humans", "multiple girls", "best quality", "high quality", "a photo"])

_COLOURS = ("black|brown|light brown|dark brown|blonde|blond|platinum blonde|red|auburn|ginger|orange|"
            "white|silver|grey|gray|pink|blue|light blue|dark blue|aqua|teal|green|purple|violet|"
            "lavender|yellow|golden|gold|amber|hazel|multicolored|multicoloured|two-tone|gradient|"
            "streaked|dark|light")
# The trait vocabulary of identity leakage, one row per kind of phrase: the trait, its head
# nouns, the modifiers that make a phrase with a head ("black" + "hair"), and whether a head is a
# phrase on its own. Found as whole tags in tag captions and as phrases in prose.
IDENTITY_TRAITS = (
    ("hair colour", "hair", _COLOURS, False),
    ("hair length", "hair", "very long|long|medium|medium-length|shoulder-length|short|very short|"
                            "cropped|absurdly long", False),
    ("hairstyle", "hair", "curly|wavy|straight|messy|spiky|braided|shaggy|wet", False),
    ("hairstyle", "ponytail|side ponytail|twintails|twin tails|pigtails|braid|braids|hair bun|double bun|"
                  "bangs|blunt bangs|ahoge|sidelocks|dreadlocks|afro|mohawk|bob cut|undercut", "", True),
    ("eye colour", "eyes", _COLOURS, False),
    ("eye colour", "heterochromia", "", True),
    ("skin", "skin", "pale|fair|light|dark|tan|tanned|olive|brown|black|white|freckled", False),
    ("skin", "dark-skinned female|dark-skinned male|tan lines|tanlines", "", True),
    ("body mark", "freckles|mole|beauty mark|scar|scars|tattoo|tattoos|birthmark|facial mark|piercing|"
                  "piercings|whisker markings", "", True),
    ("body", "animal ears|cat ears|fox ears|wolf ears|dog ears|bunny ears|rabbit ears|pointy ears|"
             "elf ears|horns|tail|wings|halo|fangs", "", True),
    ("outfit", "uniform|school uniform|dress|coat|jacket|hoodie|sweater|cardigan|blouse|shirt|skirt|"
               "kimono|suit|armor|armour|cape|cloak|hat|cap|beret|helmet|glasses|sunglasses|eyewear|"
               "earrings|necklace|choker|scarf|gloves|boots|ribbon|hair ribbon|hairband|headband|"
               "hair ornament|hairclip|bow|hair bow|bowtie|necktie", _COLOURS, True),
)
_TRAIT_TOKEN = lazy_pattern(r"[a-z]+(?:-[a-z]+)*|[^\sa-z]")
_TRAIT_HEADS: dict[str, list[tuple[str, frozenset, bool]]] = {}


def _trait_heads() -> dict[str, list[tuple[str, frozenset, bool]]]:
    """IDENTITY_TRAITS by head noun: (trait, modifiers, bare) rows, built on first use."""
    if not _TRAIT_HEADS:
        for trait, heads, modifiers, bare in IDENTITY_TRAITS:
            row = (trait, frozenset(filter(None, modifiers.split("|"))), bare)
            for head in heads.split("|"):
                _TRAIT_HEADS.setdefault(head, []).append(row)
    return _TRAIT_HEADS


def identity_phrases(text: str) -> dict[str, str]:
    """The invariant-trait phrases of a caption or a tag, each with its trait.

    >>> identity_phrases("A woman with long, wavy black hair and green eyes wears a red wool coat.")
    {'black hair': 'hair colour', 'long hair': 'hair length', 'wavy hair': 'hairstyle', \
'green eyes': 'eye colour', 'red coat': 'outfit'}
    >>> identity_phrases("hair between eyes"), identity_phrases("blue sky")
    ({}, {})
    """
    heads = _trait_heads()
    tokens = _TRAIT_TOKEN.findall(text.lower())
    found: dict[str, str] = {}
    for end, token in enumerate(tokens):
        pair = f"{tokens[end - 1]} {token}" if end else ""
        for head, start in ((pair, end - 1), (token, end)):
            for trait, modifiers, bare in heads.get(head, ()):
                named = _modifiers_before(tokens, start, modifiers) if modifiers else []
                for modifier in named:
                    found.setdefault(f"{modifier} {head}", trait)
                if bare and not named:
                    found.setdefault(head, trait)
            if head in heads:
                break  # a two-word head ("school uniform") is not also read as its last word
    return found


def _modifiers_before(tokens: list[str], start: int, modifiers: frozenset) -> list[str]:
    """The modifiers among the (at most three) words before a head noun, nearest first; the walk
    stops at a function word, another head noun, or punctuation other than a comma."""
    named, index, words = [], start - 1, 0
    while index >= 0 and words < 3:
        token = tokens[index]
        if token in (",", "and"):
            index -= 1
            continue
        if not token[0].isalpha() or token in _FUNCTION_WORDS or token in _trait_heads():
            break  # "black hair and green eyes": black is the hair's
        pair = f"{tokens[index - 1]} {token}" if index else ""
        if pair in modifiers:
            named.append(pair)
            index -= 1
        elif token in modifiers:
            named.append(token)
        index -= 1
        words += 1
    return named


def read_caption_file(path: str) -> tuple[str, str]:
    """(state, text): "ok" and the caption (its text stripped, its first line: what trainers read),
    "missing", "empty", or "unreadable" and why. A symbolic link or a special file is never read."""
    try:
        info = os.lstat(path)
    except OSError:
        return "missing", ""
    if not stat.S_ISREG(info.st_mode):
        return "unreadable", f"the caption file is {file_kind(info.st_mode)}"
    try:
        with open_regular(path, follow_links=False) as handle:
            data = handle.read(CAPTION_READ_LIMIT + 1)
    except (ImageError, OSError) as exc:
        return "unreadable", f"the caption file: {exc}"
    if len(data) > CAPTION_READ_LIMIT:
        return "unreadable", f"the caption file is over {CAPTION_READ_LIMIT // 1024} KB"
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return "unreadable", "the caption file is not UTF-8"
    return ("ok", text.splitlines()[0].strip()) if text else ("empty", "")


def find_caption_files(root: str, ext: str, *, recursive: bool) -> list[str]:
    """Files named like captions under root, walked as find_images walks: hidden entries and
    symlinked folders are left out."""
    found = []
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError:
        return found
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    found.extend(find_caption_files(entry.path, ext, recursive=True))
                continue
        except OSError:
            continue
        if entry.name.endswith(ext) and len(entry.name) > len(ext):
            found.append(entry.path)
    return found


def read_run_report(path: str, *, given: bool) -> dict | None:
    """The last folder run's report (caption --report), or None. A report named with --report
    must be one (UsageError); the default one is read only if it is a regular file, and a broken
    one is a warning."""
    flag = f"--report {shown(path)}" if given else shown(path)
    try:
        if not given and not os.path.lexists(path):
            return None
        with open_regular(path, follow_links=given) as handle:
            data = handle.read(REPORT_READ_LIMIT + 1)
        if len(data) > REPORT_READ_LIMIT:
            raise ImageError(f"it is over {REPORT_READ_LIMIT // 2**20} MB")
        report = json.loads(data.decode("utf-8-sig"))
        if not isinstance(report, dict) or not isinstance(report.get("needs_review"), list):
            raise ImageError("it is not the report of a caption run (it has no needs_review list)")
    except (ImageError, ValueError) as exc:
        problem = f"{flag} cannot be used: {exc}"
        if not given:
            warn(problem)
            return None
        if not os.path.lexists(path):
            problem = f"{flag} does not exist"
        raise UsageError(problem, hint="give the file a `caption FOLDER --report FILE` run wrote") from None
    return report


def stats_options(args: argparse.Namespace) -> BatchOptions:
    """The dataset flags of stats, checked as caption checks them."""
    ext = caption_extension(args.ext)
    output_dir = os.path.abspath(args.output_dir) if args.output_dir else None
    return BatchOptions(recursive=args.recursive, ext=ext, output_dir=output_dir, report=args.report)


class StatsItem(Record):
    """One image of a dataset as stats sees it (its JSON is an entry of the document's items)."""

    name: str
    caption_file: str
    caption: str | None = None
    form: str | None = None  # "tags" or "prose", by the caption's chunks
    measures: dict = {}
    chunks: list = []  # the caption's comma-separated chunks, lower case
    key: str = ""  # the caption as duplicates are compared: lower case, spacing collapsed
    size: tuple | None = None  # (width, height) upright, from the header; None if it cannot be read
    flags: dict = {}  # flag -> why ("" when the flag says it all), in STATS_FLAGS order when shown

    def flag(self, name: str, reason: str = "") -> None:
        self.flags.setdefault(name, reason)

    def as_dict(self) -> dict:
        return {"image": self.name, "caption_file": self.caption_file, "caption": self.caption,
                "flags": [flag for flag in STATS_FLAGS if flag in self.flags],
                "reasons": {flag: self.flags[flag] for flag in STATS_FLAGS if self.flags.get(flag)},
                **{measure: self.measures.get(measure) for measure in STATS_MEASURES},
                "style": self.form, "width": self.size[0] if self.size else None,
                "height": self.size[1] if self.size else None}


def dataset_stats(folder: str, options: BatchOptions, *, trigger: str = "") -> dict:
    """What a trainer needs to know about a dataset, as the document `stats --json` prints.

    The images are those `caption` would caption (options.recursive), their caption files where
    caption writes them (options.ext, options.output_dir); options.report names the last run's
    report (default: .ollama-generate/last-report.json in the caption folder). Raises UsageError for a
    folder that is not one or has no images, and for a --report that is not a run report.
    """
    if not os.path.isdir(folder):
        what = "does not exist" if not os.path.lexists(folder) else "is not a folder"
        raise UsageError(f"{shown(folder)} {what}", hint="give the dataset's folder")
    if options.output_dir and not os.path.isdir(options.output_dir):
        raise UsageError(f"--output-dir {shown(options.output_dir)} is not a folder",
                         hint="give the folder a caption run wrote the captions into")
    images = find_images(folder, recursive=options.recursive)
    if not images:
        raise UsageError(f"{shown(folder)} has no images ({', '.join(MEDIA_EXTENSIONS)})"
                         + ("" if options.recursive else "; --recursive looks in subfolders"))
    report_path = options.report or os.path.join(options.output_dir or folder, LAST_REPORT)
    report = read_run_report(report_path, given=bool(options.report))
    items, unreadable, unreadable_captions = [], [], []
    for image in images:
        # Named and placed as plan_jobs names and places a caption run's jobs.
        name = shown(os.path.relpath(image, folder).replace(os.sep, "/"))
        caption_file = caption_path(image, folder=folder, options=options)
        item = StatsItem(name, shown(caption_file))
        try:
            sniff_image(image)
            size = image_size(image)
            item.size = size.upright if size else None
        except ImageError as exc:
            item.flag("unreadable image", str(exc))
            unreadable.append({"image": name, "reason": str(exc)})
        state, text = read_caption_file(caption_file)
        if state == "ok":
            _measure(item, without_surrogates(text))
        elif state == "unreadable":
            item.flag("unreadable caption", text)
            unreadable_captions.append({"image": name, "reason": text})
        else:
            item.flag(state)
        items.append(item)
    captioned = [item for item in items if item.caption is not None]
    form = None
    if captioned:
        form = "tags" if sum(item.form == "tags" for item in captioned) * 2 >= len(captioned) else "prose"
    # An image's caption file and any --variants-to files beside it (img.tags.txt) are its own.
    every_variant = options.replace(variants=("", *VARIANT_STYLES), variants_to="files")
    owned = {os.path.abspath(path) for image in images
             for path in variant_paths(caption_path(image, folder=folder, options=options), every_variant)}
    root = options.output_dir or folder
    orphans = [shown(os.path.relpath(path, root).replace(os.sep, "/"))
               for path in find_caption_files(root, options.ext, recursive=options.recursive)
               if os.path.abspath(path) not in owned]
    trigger_summary = _trigger_summary(captioned, trigger)
    identity = _identity(captioned, trigger_summary["word"])
    needs_review = _needs_review(items, report)
    return {
        "command": "stats",
        "folder": shown(folder),
        "images": len(items),
        "captioned": len(captioned),
        "missing": sum("missing" in item.flags for item in items),
        "empty": sum("empty" in item.flags for item in items),
        "unreadable_captions": unreadable_captions,
        "orphans": orphans,
        "unreadable": unreadable,
        "image_sizes": _image_sizes(items),
        "style": form,
        "distributions": {measure: _distribution([item.measures[measure] for item in captioned])
                          for measure in STATS_MEASURES},
        "over_clip_budget": [item.name for item in captioned if "over CLIP budget" in item.flags],
        "out_of_range": [{"image": item.name, "reason": item.flags["out of range"]}
                         for item in captioned if "out of range" in item.flags],
        "tags": _term_counts(captioned, form),
        "trigger": trigger_summary,
        "duplicates": _duplicates(captioned),
        "near_duplicates": _near_duplicates(captioned, trigger_summary["word"] or ""),
        "identity": identity,
        "exclude_tags": _exclude_line(identity) if form == "tags" else None,
        "needs_review": needs_review,
        "report": shown(report_path) if report is not None else None,
        "items": [item.as_dict() for item in items],
    }


# Trainers for SDXL and Flux train at about 1024x1024 pixels: a smaller image is upscaled.
TRAINING_PIXELS = 1024 * 1024


def _image_sizes(items: list[StatsItem]) -> dict:
    """The spread of image sizes (megapixels), the smallest and largest image, and those under the
    training size."""
    sized = sorted((item for item in items if item.size),
                   key=lambda item: (item.size[0] * item.size[1], item.name))

    def named(item: StatsItem | None) -> dict | None:
        return {"image": item.name, "width": item.size[0], "height": item.size[1]} if item else None

    megapixels = [round(item.size[0] * item.size[1] / 1e6, 2) for item in sized]
    return {"known": len(sized), "megapixels": _distribution(megapixels),
            "smallest": named(sized[0] if sized else None), "largest": named(sized[-1] if sized else None),
            "under_training_size": [item.name for item in sized
                                    if item.size[0] * item.size[1] < TRAINING_PIXELS]}


def _measure(item: StatsItem, text: str) -> None:
    """Fill in a caption's measures, its style and the flags its text alone earns."""
    item.caption, item.key = text, one_line(text).lower()
    item.measures = {measure: count(text) for measure, count in STATS_MEASURES.items()}
    item.chunks = [one_line(chunk).lower() for chunk in text.split(",") if chunk.strip()]
    item.form = "tags" if _is_tag_caption(item.chunks) else "prose"
    rows = [row for row in STYLES.values() if row.family == "caption" and row.form == item.form
            and row.kind in CAPTION_STYLES]  # a caption file's main caption; --variants rows aside
    if item.form == "tags" and over_clip_budget(item.caption) is not None:
        item.flag("over CLIP budget", f"about {item.measures['clip_tokens']} CLIP tokens, over the "
                                      f"{CLIP_TOKEN_BUDGET}-token budget")
    if not any(row.low <= row.size(text) <= row.high for row in rows):
        accurate = [row for row in rows if not row.name.endswith("-creative")]
        sizes = ", ".join(plural(row.size(text), UNITS[row.unit][1]) for row in accurate)
        ranges = ", ".join(f"the {row.name} style has {row.low} to {row.high} {UNITS[row.unit][1]}s"
                           for row in accurate)
        item.flag("out of range", f"it has {sizes}; {ranges}")


def _distribution(values: list[int]) -> dict:
    """Min, median and max of a measure (None for no captions)."""
    if not values:
        return {"min": None, "median": None, "max": None}
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"min": ordered[0], "median": int(median) if median == int(median) else median, "max": ordered[-1]}


def _term_counts(captioned: list[StatsItem], form: str | None) -> list[list]:
    """Every tag with the number of captions that have it (tag datasets), or the frequent words
    and phrases (prose), most first."""
    if form == "prose":
        return [[term, count] for term, count in _frequent_words(
            [item.chunks for item in captioned], set(), len(captioned) * 1000)]
    counts = collections.Counter(chunk.rstrip(".") for item in captioned for chunk in dict.fromkeys(item.chunks))
    return [[tag, count] for tag, count in sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))]


def _trigger_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<![\w'\u2019-]){re.escape(word)}(?![\w'\u2019-])", re.I)


def _trigger_summary(captioned: list[StatsItem], trigger: str) -> dict:
    """Where the trigger is: in how many captions, first or not, more than once.

    Without --trigger, the chunk every caption starts with, or else the most common first chunk
    (in at least half the captions), is taken as the trigger. "First" allows a prefix that every
    caption starts with before it (caption --prefix puts one there).
    """
    word, source = trigger.strip().lower(), "--trigger" if trigger.strip() else None
    common = _common_start([item.chunks for item in captioned])
    likely = [place for place, chunk in enumerate(common) if _could_be_trigger(chunk)]
    if word:
        prefix = common[:common.index(word)] if word in common else common
    elif likely:
        word, source, prefix = common[likely[0]], "first chunk", common[:likely[0]]
    else:
        prefix = common
        firsts = collections.Counter(item.chunks[len(prefix)] for item in captioned
                                     if len(item.chunks) > len(prefix))
        guess, count = (firsts.most_common(1) or [("", 0)])[0]
        if count >= 2 and count * 2 >= len(captioned) and _could_be_trigger(guess):
            word, source = guess, "first chunk"
    summary = {"word": word or None, "source": source, "captions": 0, "first": 0, "missing": [],
               "not_first": [], "repeated": []}
    if not word:
        return summary
    pattern = _trigger_pattern(word)
    for item in captioned:
        times = len(pattern.findall(item.caption))
        if not times:
            summary["missing"].append(item.name)
            item.flag("missing trigger", f"{word} is not in the caption")
            continue
        summary["captions"] += 1
        after = item.chunks[len(prefix):] if item.chunks[:len(prefix)] == prefix else item.chunks
        if after and pattern.match(after[0]):
            summary["first"] += 1
        else:
            summary["not_first"].append(item.name)
            item.flag("trigger not first", f"{word} is not the first chunk")
        if times > 1:
            summary["repeated"].append(item.name)
            item.flag("trigger repeated", f"{word} is there {times} times")
    return summary


def _could_be_trigger(chunk: str) -> bool:
    """A chunk short enough to be a trigger, and not a tag that any dataset may start with."""
    return chunk not in NOT_TRIGGERS and len(chunk.split()) <= 3


def _common_start(chunked: list[list[str]]) -> list[str]:
    """The chunks every caption starts with (none for fewer than two captions)."""
    if len(chunked) < 2:
        return []
    common = chunked[0]
    for chunks in chunked[1:]:
        size = 0
        while size < min(len(common), len(chunks)) and common[size] == chunks[size]:
            size += 1
        common = common[:size]
    return common


def _duplicates(captioned: list[StatsItem]) -> list[list[str]]:
    """Groups of images with the same caption (case and spacing aside); each item is flagged."""
    groups: dict[str, list[StatsItem]] = {}
    for item in captioned:
        groups.setdefault(item.key, []).append(item)
    found = [group for group in groups.values() if len(group) > 1]
    for group in found:
        for item in group:
            others = [other.name for other in group[:4] if other is not item]
            item.flag("duplicate", "the same caption as " + _names(others, len(group) - 1))
    return [[item.name for item in group] for group in found]


def _names(names: list[str], count: int, limit: int = 3) -> str:
    """A few of count names for a reason, and how many more."""
    return ", ".join(names[:limit]) + (f" and {count - limit} more" if count > limit else "")


def _near_duplicates(captioned: list[StatsItem], trigger: str) -> list[list[str]]:
    """Groups of images whose captions differ but share most of their terms (tags, or words).

    An all-pairs similarity join with prefix and positional filtering (PPJoin): with terms ordered
    rarest first, two sets can only be similar enough if their first few terms meet, and early
    enough in both; so a caption is compared with a few candidates, not with every other caption.
    """
    import fractions

    keyed: dict[str, list[StatsItem]] = {}
    for item in captioned:
        keyed.setdefault(item.key, []).append(item)
    texts, term_sets = list(keyed), []
    for text in texts:
        item = keyed[text][0]
        terms = set(item.chunks) if item.form == "tags" else set(re.findall(r"\w+", text))
        term_sets.append(terms - {trigger})
    frequency = collections.Counter(term for terms in term_sets for term in terms)
    order = {term: rank for rank, term in enumerate(sorted(frequency, key=lambda t: (frequency[t], t)))}
    sets = [sorted(order[term] for term in terms) for terms in term_sets]
    sizes = [len(terms) for terms in sets]
    index: dict[int, collections.deque] = collections.defaultdict(collections.deque)
    parent = list(range(len(sets)))

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    # Whole numbers only: similarity = high / low, so no rounding moves a pair across the line.
    ratio = fractions.Fraction(str(NEAR_DUPLICATE_SIMILARITY))
    high, low = ratio.numerator, ratio.denominator
    for current in sorted(range(len(sets)), key=lambda position: len(sets[position])):
        terms, size = sets[current], len(sets[current])
        if size < NEAR_DUPLICATE_MIN_TERMS:
            continue
        shared_so_far: dict[int, int] = {}  # candidate -> prefix terms met, or -1 when it cannot reach
        met_of = shared_so_far.get
        # The terms two sets must share to be similar enough, by the other set's size.
        needed = [-(-high * (size + other_size) // (high + low)) for other_size in range(size + 1)]
        indexed = size + 1 - -(-2 * high * size // (high + low))  # enough for later, longer sets
        for position, term in enumerate(terms[:size + 1 - -(-high * size // low)]):
            postings = index[term]
            while postings and sizes[postings[0][0]] * low < high * size:
                postings.popleft()  # too short for this set, and for every longer one after it
            left = size - position
            for other, other_position in postings:
                met = met_of(other, 0)
                if met >= 0:
                    other_size = sizes[other]
                    room = other_size - other_position
                    shared_so_far[other] = met + 1 if met + (left if left < room else room) \
                        >= needed[other_size] else -1
            if position < indexed:
                postings.append((current, position))
        members = set(terms)
        for other, met in shared_so_far.items():
            if met <= 0 or root(other) == root(current):
                continue  # pruned, or already in one group (a cluster is not compared pair by pair)
            shared = len(members.intersection(sets[other]))
            if shared * (high + low) >= high * (size + sizes[other]):
                parent[root(other)] = root(current)
    groups: dict[int, list[int]] = {}
    for position in range(len(sets)):
        groups.setdefault(root(position), []).append(position)
    found = []
    for members in groups.values():
        if len(members) < 2:
            continue
        group = sorted((item for position in members for item in keyed[texts[position]]),
                       key=lambda item: item.name)
        for item in group:
            others = []
            for other in group:  # a few names: a group can be large
                if other.key != item.key and len(others) < 3:
                    others.append(other.name)
            count = len(group) - len(keyed[item.key])
            item.flag("near duplicate", "nearly the same caption as " + _names(others, count))
        found.append([item.name for item in group])
    return sorted(found)


def _identity(captioned: list[StatsItem], trigger: str | None) -> list[dict]:
    """Invariant traits in most captions while there is a trigger: the trigger cannot absorb them.

    Tag captions are read tag by tag (the phrase is the whole tag, as --exclude-tags takes it);
    prose by adjective-noun phrases (black hair, blue eyes, red coat).
    """
    if not trigger or not captioned:
        return []
    counts: collections.Counter = collections.Counter()
    traits: dict[str, str] = {}
    read: dict[str, dict[str, str]] = {trigger: {}}  # each distinct tag is read once
    for item in captioned:
        found: dict[str, str] = {}
        if item.form == "tags":
            for chunk in item.chunks:
                tag = chunk.rstrip(".")
                phrases = read.get(tag)
                if phrases is None:
                    phrases = read[tag] = identity_phrases(tag)
                if phrases and len(tag.split()) <= TAG_WORDS:
                    found.setdefault(tag, next(iter(phrases.values())))
                else:  # a chunk of prose among the tags
                    for phrase, trait in phrases.items():
                        found.setdefault(phrase, trait)
        else:
            found = identity_phrases(without_trigger(item.caption, trigger))
        counts.update(list(found))
        for phrase, trait in found.items():
            traits.setdefault(phrase, trait)
    least = max(IDENTITY_MIN_CAPTIONS, IDENTITY_SHARE * len(captioned))
    leaking = [(phrase, count) for phrase, count in counts.items() if count >= least]
    leaking.sort(key=lambda pair: (-pair[1], pair[0]))
    return [{"phrase": phrase, "share": round(count / len(captioned), 3), "trait": traits[phrase],
             "captions": count} for phrase, count in leaking]


def _exclude_line(identity: list[dict]) -> str | None:
    """The --exclude-tags flag that leaves the leaking tags out of a new tag caption run."""
    if not identity:
        return None
    return "--exclude-tags " + json.dumps(", ".join(entry["phrase"] for entry in identity), ensure_ascii=False)


def _needs_review(items: list[StatsItem], report: dict | None) -> list[dict]:
    """The last run's needs-review entries for images of this dataset; each item is flagged."""
    if not report:
        return []
    by_name = {item.name: item for item in items}
    found = []
    for entry in report["needs_review"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                or entry["image"] not in by_name:
            continue
        reason = str(entry.get("reason") or "")
        rules = [str(rule) for rule in entry.get("rules") or [] if isinstance(rule, str)]
        by_name[entry["image"]].flag("needs review", reason or ", ".join(rules))
        found.append({"image": entry["image"], "reason": reason, "rules": rules})
    return found


SPARKS = " \u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"
HISTOGRAM_BINS = 12


def histogram(values: list[int], bins: int = HISTOGRAM_BINS) -> str:
    """A one-line text histogram of values, from the smallest to the largest.

    >>> histogram([1, 2, 2, 3, 3, 3, 10], bins=5)
    '\u2588\u2588  \u2583'
    """
    low, high = min(values), max(values)
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, (value - low) * bins // (high - low + 1))] += 1
    most = max(counts)
    return "".join(SPARKS[math.ceil(count * (len(SPARKS) - 1) / most)] for count in counts)


def format_stats(data: dict, *, top: int, histograms: dict | None = None) -> str:
    """The stats document as readable text: counts, lengths, flags, trigger, identity, tags.

    histograms maps a measure to its values, for a text histogram beside its figures (shown on a
    terminal).
    """
    lines = []

    def listing(title: str, entries: list[str], indent: str = "") -> None:
        if not entries:
            return
        lines.append(f"{indent}{title} ({len(entries)}):")
        lines.extend(f"{indent}  {entry}" for entry in entries[:top])
        if len(entries) > top:
            lines.append(f"{indent}  ... and {len(entries) - top} more (all in --json)")

    lines.append(f"{data['folder']}: {plural(data['images'], 'image')}, {data['captioned']} captioned, "
                 f"{data['missing']} missing, {data['empty']} empty, "
                 f"{plural(len(data['orphans']), 'orphan caption file')}, "
                 f"{plural(len(data['unreadable']), 'unreadable image')}"
                 + (f", {plural(len(data['unreadable_captions']), 'unreadable caption file')}"
                    if data["unreadable_captions"] else ""))
    sizes = data["image_sizes"]
    if sizes["known"]:
        spread, smallest, largest = sizes["megapixels"], sizes["smallest"], sizes["largest"]
        lines.append(f"Image sizes: smallest {smallest['width']}x{smallest['height']} ({smallest['image']}), "
                     f"median {spread['median']:g} MP, largest {largest['width']}x{largest['height']} "
                     f"({largest['image']}); {len(sizes['under_training_size'])} under 1024x1024 pixels "
                     "(trainers upscale them; --json names them)")
    listing("Unreadable images", [f"{entry['image']}: {entry['reason']}" for entry in data["unreadable"]])
    listing("Unreadable caption files",
            [f"{entry['image']}: {entry['reason']}" for entry in data["unreadable_captions"]])
    listing("Orphan caption files (no image)", data["orphans"])
    listing("Missing captions", [item["image"] for item in data["items"] if "missing" in item["flags"]])
    listing("Empty captions", [item["image"] for item in data["items"] if "empty" in item["flags"]])
    if data["captioned"]:
        lines.append(f"Captions: {data['style']} style; min / median / max:")
        for measure, figures in data["distributions"].items():
            row = f"  {measure.replace('_', ' '):<12} {figures['min']:>5} {figures['median']:>7g} {figures['max']:>5}"
            if histograms and measure in histograms:
                row += f"  {histogram(histograms[measure])}"
            lines.append(row)
    by_name = {item["image"]: item for item in data["items"]}
    listing(f"Over the CLIP budget ({CLIP_TOKEN_BUDGET} tokens)",
            [f"{name} ({by_name[name]['clip_tokens']} tokens)" for name in data["over_clip_budget"]])
    listing("Out of range", [f"{entry['image']}: {entry['reason']}" for entry in data["out_of_range"]])
    trigger = data["trigger"]
    if trigger["word"]:
        source = "--trigger" if trigger["source"] == "--trigger" else "the most common first chunk"
        lines.append(f"Trigger {trigger['word']} ({source}): in {trigger['captions']} of "
                     f"{data['captioned']} captions, first in {trigger['first']}")
        listing("Missing the trigger", trigger["missing"], "  ")
        listing("Trigger not first", trigger["not_first"], "  ")
        listing("Trigger more than once", trigger["repeated"], "  ")
    else:
        lines.append("Trigger: none found (give one with --trigger WORD)")
    listing("Duplicate captions", [" = ".join(group) for group in data["duplicates"]])
    listing("Near duplicates", [" ~ ".join(group) for group in data["near_duplicates"]])
    if data["identity"]:
        lines.append(f"Identity leakage: these traits are in most captions, so {trigger['word']} "
                     "cannot absorb them:")
        lines.extend(f"  {entry['phrase']:<24} {entry['share']:>4.0%}  {entry['trait']}"
                     for entry in data["identity"])
        if data["exclude_tags"]:
            lines.append(f"  to leave them out of a new tag run: {data['exclude_tags']}")
        else:
            lines.append("  to leave them out: remove them in the captions, or recaption with a --hint "
                         "that says the trigger stands for them")
    if data["report"]:
        listing(f"Needs review (from {data['report']})",
                [f"{entry['image']}: {entry['reason']}" for entry in data["needs_review"]])
    if data["tags"]:
        what = "tags" if data["style"] == "tags" else "words and phrases"
        shown_terms = data["tags"][:top]
        lines.append(f"Top {what} ({len(shown_terms)} of {len(data['tags'])}):")
        lines.append("  " + ", ".join(f"{term} {count}" for term, count in shown_terms))
    return "\n".join(lines)


def cmd_stats(config: Config, args: argparse.Namespace) -> Product:
    """Count and check a dataset's captions: lengths, tags, trigger, duplicates, identity leakage."""
    data = dataset_stats(args.dataset, stats_options(args), trigger=args.trigger or "")
    if args.json:
        return Product(None, data)
    histograms = None
    if sys.stdout.isatty():
        captioned = [item for item in data["items"] if item["caption"] is not None]
        histograms = {measure: [item[measure] for item in captioned] for measure in STATS_MEASURES}
    return Product(format_stats(data, top=args.top, histograms=histograms), data)


# -- Review: the review page and its server -----------------------------------
# `review DATASET` serves one page (prompts/review.html, with the dataset's data put in) on
# 127.0.0.1 only. Every request needs the token of the printed address (or the cookie the first
# visit sets) and a loopback Host header; only images the caption walk finds are served. Saves,
# bulk changes and recaptions go through ReviewDataset, which backs up and journals each change
# (see Human edits) under one lock, and refuses to replace a file that changed since the page
# loaded it. `review --html FILE` writes the same page, read-only, with everything in it.

REVIEW_PAGE = "review.html"
REVIEW_DATA_MARKER = "__REVIEW_DATA__"
REVIEW_BODY_LIMIT = 4 * 1024 * 1024  # a bulk change names at most every image: well under this
REVIEW_SAMPLES = 20  # changed captions shown in a bulk change's preview
SERVER_CHECK_TIMEOUT = 3.0
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".bmp": "image/bmp", ".gif": "image/gif",
               ".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime",
               ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}
# The page runs only its own inline script and style, and talks only to its own server.
REVIEW_CSP = ("default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'; "
              "script-src 'unsafe-inline'; "
              "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
REVIEW_REPORT_LIMIT = 256 * 1024 * 1024


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The first and last byte of a single "bytes=" Range a file of this size can serve, or None
    (no range, several, or one outside the file: the whole file is sent).

    >>> byte_range("bytes=0-", 100), byte_range("bytes=10-19", 100), byte_range("bytes=-5", 100)
    ((0, 99), (10, 19), (95, 99))
    >>> byte_range("bytes=200-", 100), byte_range("bytes=0-1,5-6", 100), byte_range("", 100)
    (None, None, None)
    """
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not match or not size or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if not first:  # the last N bytes
        return max(0, size - int(last)), size - 1
    start, end = int(first), min(int(last) if last else size - 1, size - 1)
    return (start, end) if start <= end else None


class ReviewRefused(Exception):
    """A request the review server answers with an error status and a message for the page."""

    def __init__(self, status: int, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.hint = status, message, hint


def review_page() -> str:
    """The review page's HTML (prompts/review.html; --prompts-dir may replace it)."""
    dirs = template_dirs()
    for folder in dirs:
        path = os.path.join(folder, REVIEW_PAGE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            if text.count(REVIEW_DATA_MARKER) != 1:
                raise TemplateError(f"the review page {path} must hold {REVIEW_DATA_MARKER} once",
                                    hint="remove the override to use the built-in page")
            return text
    raise TemplateError(f"the review page {REVIEW_PAGE} was not found (looked in {', '.join(dirs)})",
                        hint="reinstall ollama-generate, or run it from a checkout that has the prompts/ folder")


def page_with_data(page: str, data: dict) -> str:
    """The page with its data put in as JSON that cannot end the script element it sits in."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return page.replace(REVIEW_DATA_MARKER, text)


def caption_chunks(caption: str) -> list[str]:
    """A caption's comma-separated chunks, stripped.

    >>> caption_chunks("ohwx, red hair,  smile ,")
    ['ohwx', 'red hair', 'smile']
    """
    return [chunk.strip() for chunk in caption.split(",") if chunk.strip()]


def rename_tag(caption: str, tag: str, to: str = "") -> str:
    """The caption with the tag renamed (merged into `to` where the caption has it already), or
    removed when `to` is empty; tags compare without case.

    >>> rename_tag("1girl, red hair, smile", "Red Hair", "long hair")
    '1girl, long hair, smile'
    >>> rename_tag("1girl, red hair, long hair", "red hair", "long hair")
    '1girl, long hair'
    >>> rename_tag("1girl, red hair", "red hair")
    '1girl'
    """
    key, target = tag.strip().casefold(), to.strip()
    chunks, seen = [], set()
    for chunk in caption_chunks(caption):
        if chunk.casefold() == key:
            chunk = target
        if chunk and chunk.casefold() not in seen:
            seen.add(chunk.casefold())
            chunks.append(chunk)
    return ", ".join(chunks)


def replace_text(caption: str, find: str, replace: str, *, case: bool = True, regex: bool = False) -> str:
    """The caption with every match of find replaced.

    >>> replace_text("A Cat and a cat", "cat", "dog", case=False)
    'A dog and a dog'
    >>> replace_text("red hair, red eyes", r"red (\\w+)", r"blue \\1", regex=True)
    'blue hair, blue eyes'
    """
    pattern = re.compile(find if regex else re.escape(find), 0 if case else re.IGNORECASE)
    return pattern.sub(replace if regex else replace.replace("\\", "\\\\"), caption)


# The page opens on dataset_stats()'s document, the one `stats` prints. After a save only the saved
# captions are read again (re-reading 5,000 would make every save take seconds): their measures
# and the flags that depend on all captions (duplicates, the trigger) are redone here, and the
# whole document again on the next reload.


def _review_item(folder: str, options: BatchOptions, image: str) -> dict:
    """One image's item after a save, as dataset_stats() gives it; its flags are set by _review_flags()."""
    caption_file = caption_path(image, folder=folder, options=options)
    text = read_caption(caption_file)
    chunks = caption_chunks(text or "")
    return {"image": shown(os.path.relpath(image, folder).replace(os.sep, "/")),
            "caption_file": shown(os.path.relpath(caption_file, folder).replace(os.sep, "/")),
            "caption": text, "flags": [], "words": count_words(text or ""),
            "sentences": count_sentences(text) if text else 0, "tags": len(chunks),
            "clip_tokens": clip_tokens(text)[0] if text else 0,
            "style": "tags" if _is_tag_caption(chunks) else "prose"}


def _review_flags(items: list[dict], trigger: str) -> None:
    """Set the flags of items after a save: their own figures and the other items (duplicates)."""
    same = collections.Counter(item["caption"].casefold() for item in items if item["caption"])
    key = trigger.casefold()
    for item in items:
        text = item["caption"]
        flags = ["missing"] if text is None else ["empty"] if not text else []
        if item["style"] == "tags" and text and over_clip_budget(text) is not None:
            flags.append("over CLIP budget")
        if key and text and key not in (chunk.casefold() for chunk in caption_chunks(text)):
            flags.append("missing trigger")
        if text and same[text.casefold()] > 1:
            flags.append("duplicate")
        item["flags"] = flags


def _review_summary(items: list[dict]) -> dict:
    """The counts at the top of the page after a save, from the items (dataset_stats() on reload)."""
    counts: collections.Counter = collections.Counter()
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for item in items:
        counts.update(dict.fromkeys((chunk.casefold() for chunk in caption_chunks(item["caption"] or "")
                                     if len(chunk.split()) <= TAG_WORDS), 1))
        if item["caption"]:
            groups[item["caption"].casefold()].append(item["image"])
    return {"images": len(items), "captioned": sum(1 for item in items if item["caption"]),
            "missing": sum(1 for item in items if item["caption"] is None),
            "empty": sum(1 for item in items if item["caption"] == ""),
            "tags": [[tag, count] for tag, count in counts.most_common()],
            "over_clip_budget": [item["image"] for item in items if "over CLIP budget" in item["flags"]],
            "duplicates": [group for group in groups.values() if len(group) > 1], "identity": []}


def read_last_report(path: str) -> tuple[dict, float]:
    """What the last caption run said of each image (needs-review reason, rules, raw answer, spans),
    by image name, and when that report was written; ({}, 0) without a readable report."""
    try:
        with open_regular(path) as handle:
            report = json.loads(handle.read(REVIEW_REPORT_LIMIT))
        written = os.stat(path).st_mtime
    except (ImageError, OSError, ValueError):
        return {}, 0.0
    notes: dict[str, dict] = {}
    if not isinstance(report, dict):
        return {}, 0.0
    for entry in report.get("captions") or []:
        if isinstance(entry, dict) and isinstance(entry.get("image"), str):
            notes.setdefault(entry["image"], {}).update(
                {key: entry[key] for key in ("rules", "raw", "spans") if entry.get(key)})
    for entry in report.get("needs_review") or []:
        if isinstance(entry, dict) and isinstance(entry.get("image"), str):
            notes.setdefault(entry["image"], {})["review"] = str(entry.get("reason") or "")
    return notes, written


def read_descriptions(path: str) -> dict[str, str]:
    """The last cached vision description of each image name (descriptions.jsonl)."""
    found: dict[str, str] = {}
    try:
        with open_regular(path, follow_links=False) as handle:
            lines = handle.read(REVIEW_REPORT_LIMIT).splitlines()
    except (ImageError, OSError):
        return found
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("image"), str) \
                and isinstance(record.get("description"), str):
            found[record["image"]] = record["description"]
    return found


class ReviewDataset:
    """A dataset as the review page sees it, and the only way the page changes it.

    Writes happen under one lock: each checks what the page last saw, backs up the caption file,
    journals the change, then writes the file as `caption` does (one line, UTF-8, never empty).
    """

    def __init__(self, folder: str, options: BatchOptions, *, config: Config, trigger: str = "",
                 style: str = "", creative: bool = False, prefix: str = "", hint: str = "",
                 report: str | None = None) -> None:
        """Read the dataset; with no trigger given, the first chunk most captions share is taken as
        it, and with no style, the one most captions have. Recaption writes with these."""
        import threading

        self.folder = folder
        self.options = options
        self.root = options.output_dir or folder  # where caption files, journal and backups live
        self.cache_folder = options.cache_dir or os.path.join(self.root, CACHE_FOLDER)
        self.config = config
        self.report_path = report or os.path.join(self.cache_folder, LAST_REPORT_FILE)
        self.lock = threading.Lock()
        self.images: dict[str, str] = {}  # name -> image path, as the caption walk found them
        self.caption_files: dict[str, str] = {}
        for image in find_images(folder, recursive=options.recursive):
            name = shown(os.path.relpath(image, folder).replace(os.sep, "/"))
            self.images[name] = image
            self.caption_files[name] = caption_path(image, folder=folder, options=options)
        self.fresh: dict[str, dict] = {}  # name -> what a recaption from the page said of it
        self.last_change: dict | None = None  # the last bulk change, for Undo
        self.saved = 0
        self.trigger = trigger
        self.document: dict = {"items": []}
        self.notes: dict[str, dict] = {}  # what the last run's report says of each image
        self.report_written = 0.0
        self.refresh()
        if not self.trigger:  # the trigger stats found, so that the page and `stats` agree
            self.trigger = (self.document.get("trigger") or {}).get("word") or ""
        self.spec = CaptionSpec(style=style or self.guess_style(), creative=creative, trigger=self.trigger,
                                prefix=prefix, hint=hint)

    def guess_style(self) -> str:
        """The caption style most captions have: tags, or training prose."""
        styles = collections.Counter(item["style"] for item in self.document["items"] if item["caption"])
        return "tags" if styles["tags"] > styles["prose"] else "training"

    def refresh(self, names: list[str] | None = None) -> None:
        """Read the dataset again (names: only these captions changed; the flags of all are redone),
        and give each item what the page needs beside it."""
        if names is None:
            document = dataset_stats(self.folder, self.options.replace(report=None), trigger=self.trigger)
            items = [{**item, "flags": [flag for flag in item["flags"] if flag != "needs review"]}
                     for item in document["items"]]
            self.notes, self.report_written = read_last_report(self.report_path)
        else:  # copies: a request being answered may be reading the old ones
            items = [dict(item) for item in self.document["items"]]
            where = {item["image"]: number for number, item in enumerate(items)}
            for name in names:
                items[where[name]] = _review_item(self.folder, self.options, self.images[name])
            _review_flags(items, self.trigger)
        changed = None if names is None else set(names)
        flagged = [item for item in items if item["flags"] or self.notes.get(item["image"])
                   or self.fresh.get(item["image"])]
        descriptions = read_descriptions(os.path.join(self.cache_folder, DescriptionCache.FILENAME)) \
            if flagged and (changed is None or changed) else {}
        for item in items:
            name = item["image"]
            if changed is None or name in changed:
                self.describe_item(item, descriptions)
            elif item.get("review"):
                item["flags"].append("needs review")
        summary = {key: value for key, value in document.items() if key != "items"} if names is None \
            else {**self.document, **_review_summary(items)}
        self.document = {**summary, "items": items}

    def describe_item(self, item: dict, descriptions: dict[str, str]) -> None:
        """Add to an item its file's hash, its image's address, and why it is flagged: the last
        run's needs-review reason, rules, spans and raw answer (or a recaption's), and its description."""
        name = item["image"]
        path = self.caption_files.get(name, "")
        item["hash"] = caption_hash(path)
        item["src"] = "/image/" + _url_path(name)
        item["video"] = media_of(name) == "video"  # the page shows a <video> for a clip
        note = self.fresh.get(name)
        if note is None:
            note = self.notes.get(name, {})
            try:  # a caption changed since the run's report was written is no longer its
                if note and os.lstat(path).st_mtime > self.report_written:
                    note = {}
            except OSError:
                note = {}
        item["review"] = note.get("review") or None
        if item["review"] and not any(flag.startswith("needs review") for flag in item["flags"]):
            item["flags"].append("needs review")
        item["rules"] = note.get("rules") or []
        item["spans"] = note.get("spans") or []
        item["raw"] = note.get("raw") or None
        item["description"] = (note.get("description") or descriptions.get(name)) \
            if item["flags"] or item["rules"] else None

    def data(self, *, readonly: bool = False) -> dict:
        """What the page is given: the stats document with its items, and what the page can do."""
        change = self.last_change
        return {**self.document, "trigger_summary": self.document.get("trigger"), "dataset_style":
                self.document.get("style"), "folder": shown(self.folder), "readonly": readonly,
                "trigger": self.trigger, "style": self.spec.style, "host": self.config.host,
                "undo": {"what": change["what"], "files": len(change["files"])} if change else None}

    def item(self, name: str) -> dict:
        return next(item for item in self.document["items"] if item["image"] == name)

    def image_file(self, name: str) -> str | None:
        """The image with this name, when the caption walk found it and it lies inside the dataset."""
        image = self.images.get(name)
        if image is None:
            return None
        inside = os.path.realpath(self.folder)
        real = os.path.realpath(image)
        if os.path.commonpath([inside, real]) != inside:
            return None  # a symbolic link out of the dataset
        return real

    def caption_file(self, name: object) -> str:
        """The caption file that belongs to a named image; 404 for any other name."""
        if not isinstance(name, str) or name not in self.caption_files:
            raise ReviewRefused(404, f"there is no image {name!r} in this dataset")
        return self.caption_files[name]

    # Changes. Each runs under the lock, from the request handlers' threads.

    def save(self, name: object, caption: object, base: object) -> dict:
        """Write one caption a person edited; 409 if the file changed since the page loaded it."""
        path = self.caption_file(name)
        if not isinstance(caption, str) or not one_line(without_surrogates(caption)):
            raise ReviewRefused(400, "an empty caption is not saved: a caption file is never empty",
                                hint="write a caption, or put back the text that was there")
        with self.lock:
            self.check_unchanged(name, path, base)
            self.write([(name, path, caption)], by="review")
            self.fresh[name] = {}  # a person has looked at it: the run's reasons are answered
            self.saved += 1
            self.refresh([name])
            return {"item": self.item(name), "summary": self.summary()}

    def check_unchanged(self, name: str, path: str, base: object) -> None:
        """Refuse to replace a caption file that changed since the page read it, or a foreign one."""
        state = caption_state(path)
        if state not in ("", "exists"):
            raise ReviewRefused(409, f"{name}: {state}")
        if caption_hash(path) != base:
            raise ReviewRefused(409, f"the caption of {name} changed on disk since the page loaded it; "
                                     "reload the page to see it (copy your text first)")

    def write(self, changes: list[tuple[str, str, str]], *, by: str) -> list[dict]:
        """Back up, journal, then write each (name, caption file, caption); return the journal entries."""
        import hashlib

        # Many files: flushed to disk together (one os.sync) rather than one fsync each.
        each = len(changes) < 8 or not hasattr(os, "sync")
        entries, lines = [], []
        try:
            for name, path, caption in changes:
                # The first line is edited; the file's other lines (--variants alternatives) stay.
                line = [one_line(without_surrogates(caption)), *later_lines(path)]
                backup_caption(self.root, path, sync=each)
                lines.append((path, line))
                entries.append({"image": name, "caption_file": _relative_caption(self.root, path), "by": by,
                                "old": caption_hash(path),
                                "new": hashlib.sha256("".join(one + "\n" for one in line).encode("utf-8")).hexdigest()})
            if not each:
                os.sync()  # the backups are on disk before any caption is replaced
            journal_edits(self.root, entries)
        except OSError as exc:
            raise ReviewRefused(500, f"nothing was changed: cannot keep the backup or the edits journal in "
                                     f"{shown(os.path.join(self.root, CACHE_FOLDER))} ({exc.strerror or exc})") from None
        for path, line in lines:
            try:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                write_caption_lines(path, line, sync=each)
            except OSError as exc:
                raise ReviewRefused(500, f"cannot write {shown(path)} ({exc.strerror or exc})") from None
        if not each:
            os.sync()
        return entries

    def bulk(self, request: dict, *, apply: bool) -> dict:
        """Rename, merge or remove a tag, or find and replace, across all (or the named) captions:
        a preview of what changes, or the change itself (which Undo can take back)."""
        transform, what = self.transform(request)
        names = request.get("images")
        if names is None:
            names = list(self.caption_files)
        if not isinstance(names, list):
            raise ReviewRefused(400, "images must be a list of image names")
        with self.lock:
            changes, left_empty = [], 0
            for name in dict.fromkeys(names):
                path = self.caption_file(name)
                old = read_caption(path)
                if not old:
                    continue
                new = one_line(transform(old)).strip(" ,")
                if new == old:
                    continue
                if not new:
                    left_empty += 1  # never an empty caption: this one stays as it is
                    continue
                changes.append((name, path, old, new))
            result = {"what": what, "changes": len(changes), "left_empty": left_empty,
                      "samples": [{"image": name, "old": old, "new": new}
                                  for name, _path, old, new in changes[:REVIEW_SAMPLES]]}
            if not apply or not changes:
                return result
            entries = self.write([(name, path, new) for name, path, _old, new in changes], by="bulk")
            self.last_change = {"what": what, "files": [
                (name, path, old, entry["new"]) for (name, path, old, _new), entry in zip(changes, entries)]}
            self.refresh([name for name, *_ in changes])
            return {**result, "applied": True}

    def transform(self, request: dict):
        """The change a bulk request asks for, as a function of a caption, and its description."""
        op = request.get("op")
        text = {key: request.get(key, "") for key in ("tag", "to", "find", "replace")}
        if not all(isinstance(value, str) for value in text.values()):
            raise ReviewRefused(400, "tag, to, find and replace must be text")
        if op in ("rename", "remove"):
            tag, to = text["tag"].strip(), one_line(text["to"]).strip(" ,") if op == "rename" else ""
            if not tag or op == "rename" and not to:
                raise ReviewRefused(400, "name the tag" + (" and its new name" if op == "rename" else ""))
            if "," in tag or "," in to:
                raise ReviewRefused(400, "a tag has no commas")
            what = f"rename {tag!r} to {to!r}" if op == "rename" else f"remove {tag!r}"
            return (lambda caption: rename_tag(caption, tag, to)), what
        if op == "replace":
            if not text["find"]:
                raise ReviewRefused(400, "give the text to find")
            case, regex = bool(request.get("case", True)), bool(request.get("regex", False))
            try:
                replace_text("", text["find"], text["replace"], case=case, regex=regex)
            except (re.error, IndexError) as exc:
                raise ReviewRefused(400, f"the pattern {text['find']!r} cannot be used ({exc})") from None
            return (lambda caption: replace_text(caption, text["find"], text["replace"], case=case,
                                                 regex=regex)), f"replace {text['find']!r} with {text['replace']!r}"
        raise ReviewRefused(400, "op must be rename, remove or replace")

    def undo(self) -> dict:
        """Take back the last bulk change, except in files changed since (they are named)."""
        with self.lock:
            change = self.last_change
            if not change:
                raise ReviewRefused(409, "there is no bulk change to undo")
            back, changed = [], []
            for name, path, old, new_hash in change["files"]:
                (back if caption_hash(path) == new_hash else changed).append((name, path, old))
            self.write(back, by="undo")
            self.last_change = None
            self.refresh([name for name, *_ in back])
            return {"what": change["what"], "undone": len(back), "changed_since": [name for name, *_ in changed]}

    def recaption(self, name: object, base: object) -> dict:
        """Caption one image again through the configured server, as `caption --overwrite` would
        (the cached description when there is one, so one text call); the old caption is backed up."""
        path = self.caption_file(name)
        with self.lock:
            self.check_unchanged(name, path, base)
            try:
                make_folder(self.cache_folder, "the cache folder")
                check_templates(self.config, self.spec)
                job = Job(self.images[name], name, path)
                report = Report(folder=self.folder, jobs=[job], hosts=connect_hosts(self.config))
                cache = DescriptionCache(self.cache_folder, follow_links=bool(self.options.cache_dir))
                cache.notify = lambda message: None  # the page shows what went wrong
                old = caption_hash(path)
                try:
                    options = self.options.replace(overwrite=True, quiet=True, limit=None, jobs=1, chunk=1,
                                                   keep_alive=None, dry_run=False)
                    # The vision num_ctx sized for this image, as `caption IMAGE` sizes it.
                    options = fit_clip_frames(self.config, self.spec, options, [job], report.hosts)
                    config = size_vision_context(self.config, self.spec, options, [job], report.hosts)
                    run = CaptionRun(config, self.spec, options, report, cache)
                    run.run()
                    description = job.description or self.cached_description(run, cache, job.image)
                finally:
                    cache.close()
            except (ServerUnreachable, ServerTimeout) as exc:
                raise ReviewRefused(503, str(exc), hint=exc.hint) from None
            except OllamaError as exc:
                raise ReviewRefused(502, str(exc), hint=exc.hint) from None
            if job.status != "written":
                raise ReviewRefused(502, job.reason or f"{name} was not captioned", hint=job.hint)
            caption = job.caption
            self.fresh[name] = {"review": "; ".join(caption.review), "rules": caption.fired,
                                "raw": caption.raw or None, "description": description,
                                "spans": [{"rule": rule, "action": action, "text": text}
                                          for rule, action, text in caption.spans]}
            try:
                journal_edits(self.root, [{"image": name, "caption_file": _relative_caption(self.root, path),
                                           "by": "recaption", "old": old, "new": caption_hash(path)}])
            except OSError:
                pass  # a model's caption, not a person's: the journal is for people's edits
            self.refresh([name])
            return {"item": self.item(name), "summary": self.summary(), "cached": job.cached}

    def cached_description(self, run: CaptionRun, cache: DescriptionCache, image: str) -> str | None:
        """The description the run used, from the cache (a written job keeps none in memory)."""
        try:
            if media_of(image) == "video":
                return cache.get(run.clip_key(Job(image, os.path.basename(image), "")))
            data = read_image(image)
        except (ImageError, OSError):
            return None
        return cache.get(run.description_key(data)[0])

    def summary(self) -> dict:
        return {key: value for key, value in self.document.items() if key != "items"}

    def server_state(self) -> dict:
        """Whether the configured server answers, for the page's Recaption buttons."""
        config = self.config.replace(timeout=min(self.config.timeout, SERVER_CHECK_TIMEOUT), retries=0)
        try:
            client = connect(config)
            installed = {str(model.get("name") or model.get("model")) for model in client.tags()}
        except OllamaError as exc:
            return {"reachable": False, "host": self.config.host, "message": str(exc), "hint": exc.hint or None}
        missing = [model for model in dict.fromkeys((self.config.vision_model, self.config.model))
                   if model not in installed and with_tag(model) not in installed]
        return {"reachable": True, "host": self.config.host, "missing": missing,
                "message": (f"{client.kind.absent.removeprefix('is ')} {client.kind.where} {self.config.host}: "
                            f"{', '.join(missing)}" if missing
                            else f"Recaption uses {self.config.vision_model} and {self.config.model} "
                                 f"on {self.config.host}")}


def _url_path(name: str) -> str:
    """A relative name as a URL path, each part quoted."""
    import urllib.parse

    return "/".join(urllib.parse.quote(part) for part in name.split("/"))


def export_review(dataset: ReviewDataset, path: str) -> None:
    """Write the page, read-only and self-contained, to path: images by relative path from it."""
    data = dataset.data(readonly=True)
    base = os.path.dirname(os.path.abspath(path))
    for item in data["items"]:
        image = os.path.abspath(dataset.images[item["image"]])
        item["src"] = _url_path(shown(os.path.relpath(image, base).replace(os.sep, "/")))
    write_output_file(path, page_with_data(review_page(), data))


def review_server(dataset: ReviewDataset, *, port: int = 0, token: str = ""):
    """A review server on 127.0.0.1 (port 0: a free one); serve_forever() runs it."""
    import http.server
    import secrets

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = False

    try:
        server = Server(("127.0.0.1", port), _review_handler())
    except OSError as exc:
        raise OllamaError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror or exc})",
                          hint="choose another --port, or leave it out for a free one") from None
    server.dataset = dataset
    server.token = token or secrets.token_urlsafe(32)
    server.port = server.server_address[1]
    server.hosts = {f"127.0.0.1:{server.port}", f"localhost:{server.port}"}
    server.cookie = f"ollama_generate_review_{server.port}"
    server.url = f"http://127.0.0.1:{server.port}/?token={server.token}"
    server.page = review_page()
    return server


def _review_handler():
    """The request handler class of the review server (built on first use: http.server loads late)."""
    import hmac
    import http.server
    import shutil
    import urllib.parse

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = f"{PROG}/{__version__}"
        sys_version = ""
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.handle_request("GET")

        def do_POST(self) -> None:
            self.handle_request("POST")

        def other_method(self) -> None:
            self.new_cookie = False
            self.close_connection = True
            self.respond(405, {"error": "use GET or POST"})

        do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = other_method

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's name
            return None

        def handle_request(self, method: str) -> None:
            self.new_cookie = False
            try:
                url = urllib.parse.urlsplit(self.path)
                self.check_access(url, method)
                if method == "GET":
                    self.get(url.path)
                else:
                    self.post(url.path)
            except ReviewRefused as exc:
                self.respond(exc.status, {"error": exc.message, "hint": exc.hint or None})
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            except Exception as exc:  # a bug: an answer, not a dead connection
                self.respond(500, {"error": f"internal error: {exc!r}"})

        def check_access(self, url, method: str) -> None:
            """The Host header (DNS rebinding), the Origin of a change, and the token: else 403."""
            server = self.server
            if self.headers.get("Host", "") not in server.hosts:
                raise ReviewRefused(403, "this server answers only at 127.0.0.1 or localhost and its port")
            origin = self.headers.get("Origin")
            if method == "POST" and origin is not None and origin not in {f"http://{host}" for host in server.hosts}:
                raise ReviewRefused(403, "changes come only from the review page itself")
            given = urllib.parse.parse_qs(url.query).get("token", [""])[0]
            if given and hmac.compare_digest(given.encode(), server.token.encode()):
                self.new_cookie = True
                return
            cookies = self.headers.get("Cookie", "")
            for part in cookies.split(";"):
                key, _, value = part.strip().partition("=")
                if key == server.cookie and hmac.compare_digest(value.encode(), server.token.encode()):
                    return
            raise ReviewRefused(403, "open the address the review command printed (it holds the token)")

        def get(self, path: str) -> None:
            dataset = self.server.dataset
            if path == "/":
                page = page_with_data(self.server.page, dataset.data())
                self.respond(200, page.encode("utf-8"), "text/html; charset=utf-8")
            elif path == "/api/items":
                self.respond(200, dataset.data())
            elif path == "/api/server":
                self.respond(200, dataset.server_state())
            elif path.startswith("/image/"):
                self.send_image(urllib.parse.unquote(path[len("/image/"):], errors="replace"))
            else:
                raise ReviewRefused(404, "not found")

        def send_image(self, name: str) -> None:
            dataset = self.server.dataset
            image = dataset.image_file(name)
            if image is None:
                raise ReviewRefused(404, "not found")
            try:
                handle = open_regular(image)
            except ImageError:
                raise ReviewRefused(404, "not found") from None
            with handle:
                size = os.fstat(handle.fileno()).st_size
                # A <video> asks for pieces of a clip (Range) to start playing and to seek.
                span = byte_range(self.headers.get("Range", ""), size)
                start, end = span or (0, size - 1)
                self.send_response(206 if span else 200)
                self.send_header("Content-Type", IMAGE_TYPES.get(os.path.splitext(name)[1].lower(),
                                                                 "application/octet-stream"))
                self.send_header("Content-Length", str(end - start + 1 if size else 0))
                self.send_header("Accept-Ranges", "bytes")
                if span:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.send_header("Cache-Control", "private, no-cache")
                self.common_headers()
                self.end_headers()
                handle.seek(start)
                left = end - start + 1 if size else 0
                while left > 0:
                    piece = handle.read(min(left, 1 << 16))
                    if not piece:
                        break
                    self.wfile.write(piece)
                    left -= len(piece)

        def post(self, path: str) -> None:
            routes = {"/api/save": self.save, "/api/preview": self.preview, "/api/apply": self.apply,
                      "/api/undo": self.undo, "/api/recaption": self.recaption}
            if path not in routes:
                raise ReviewRefused(404, "not found")
            routes[path](self.body())

        def body(self) -> dict:
            """The request's JSON object, read only up to the size cap."""
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                raise ReviewRefused(411, "send the request body with a Content-Length")
            if int(length) > REVIEW_BODY_LIMIT:
                self.close_connection = True  # its body is never read
                raise ReviewRefused(413, f"the request body is over {REVIEW_BODY_LIMIT // (1024 * 1024)} MB")
            try:
                data = json.loads(self.rfile.read(int(length)))
            except ValueError:
                raise ReviewRefused(400, "the request body is not JSON") from None
            if not isinstance(data, dict):
                raise ReviewRefused(400, "the request body must be a JSON object")
            return data

        def save(self, data: dict) -> None:
            self.respond(200, self.server.dataset.save(data.get("image"), data.get("caption"), data.get("base")))

        def preview(self, data: dict) -> None:
            self.respond(200, self.server.dataset.bulk(data, apply=False))

        def apply(self, data: dict) -> None:
            self.respond(200, self.server.dataset.bulk(data, apply=True))

        def undo(self, data: dict) -> None:
            self.respond(200, self.server.dataset.undo())

        def recaption(self, data: dict) -> None:
            self.respond(200, self.server.dataset.recaption(data.get("image"), data.get("base")))

        def respond(self, status: int, body, content_type: str = "application/json; charset=utf-8") -> None:
            if not isinstance(body, bytes):
                body = json.dumps(body, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.common_headers()
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def common_headers(self) -> None:
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Content-Security-Policy", REVIEW_CSP)
            if self.new_cookie:
                self.send_header("Set-Cookie", f"{self.server.cookie}={self.server.token}; HttpOnly; "
                                               "SameSite=Strict; Path=/")

    return Handler


def review_options(args: argparse.Namespace) -> BatchOptions:
    """The walk and layout flags review shares with caption, checked as caption checks them."""
    ext = caption_extension(args.ext)
    return BatchOptions(recursive=args.recursive, ext=ext, cache_dir=args.cache_dir,
                        output_dir=os.path.abspath(args.output_dir) if args.output_dir else None,
                        keep_alive=None, release_models=False, quiet=True)


def cmd_review(config: Config, args: argparse.Namespace) -> Product:
    """Check and edit a dataset's captions in the browser, on a page served from this machine only."""
    folder = args.dataset
    if not os.path.isdir(folder):
        raise UsageError(f"{shown(folder)} is not a folder", hint="give the folder of images and captions")
    options = review_options(args)
    trigger = (args.trigger or "").strip(" ,")
    if "," in trigger:
        raise UsageError(f"--trigger must be one word or phrase without commas, got {args.trigger!r}")
    if "\n" in (args.prefix or "") or "\r" in (args.prefix or ""):
        raise UsageError("--prefix must be a single line: a caption file is one line")
    dataset = ReviewDataset(folder, options, config=config, trigger=trigger, style=args.style or "",
                            creative=args.creative, prefix=args.prefix or "", hint=one_line(args.hint or ""),
                            report=args.report)
    if not dataset.images:
        raise UsageError(f"{shown(folder)} has no images ({', '.join(MEDIA_EXTENSIONS)})"
                         + ("" if options.recursive else "; --recursive looks in subfolders"))
    if args.html:
        check_output_file(args.html, "--html")
        export_review(dataset, args.html)
        print(f"Wrote the review page of {plural(len(dataset.images), 'image')} to {shown(args.html)} "
              "(read-only; images by relative path).", file=sys.stderr)
        return Product(None, {"command": "review", "html": shown(args.html), "images": len(dataset.images)})
    if args.json:
        raise UsageError("--json works with review --html; the server prints its address as its first line")
    server = review_server(dataset, port=args.port or 0)
    try:
        write_product(server.url)
        print(f"Reviewing {plural(len(dataset.images), 'image')} in {shown(folder)}; Ctrl-C stops the server.",
              file=sys.stderr, flush=True)
        if not args.no_browser:
            import threading
            import webbrowser

            threading.Thread(target=webbrowser.open, args=(server.url,), daemon=True).start()
        try:
            server.serve_forever()
        except Terminated:
            raise
        except KeyboardInterrupt:
            print(f"\nStopped the review server ({plural(dataset.saved, 'caption')} saved).", file=sys.stderr)
    finally:
        server.server_close()
    return Product(None, {"command": "review", "url": server.url})


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
_jobs_number = number_type(int, "a whole number", 1, "1 or more", MAX_JOBS)


def jobs_count(value: str) -> int | str:
    """--jobs: a number of requests at once, or auto."""
    return AUTO if value == AUTO else _jobs_number(value)


port_number = number_type(int, "a whole number", 0, "0 or more", 65535)
max_side_pixels = number_type(int, "a whole number of pixels", 0, "0 or more", MAX_SIDE_LIMIT)
frame_count = number_type(int, "a whole number of frames", 1, "1 or more", MAX_FRAMES)


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
                        help="server URL: Ollama, or an OpenAI-compatible server (a URL ending in /v1); "
                             "repeat it to spread a folder run over several servers (env: OLLAMA_HOST, "
                             f"comma-separated; default {DEFAULT_HOST})")
    server.add_argument("--api", choices=API_CHOICES, default=argparse.SUPPRESS,
                        help="the servers' API: ollama, openai (chat completions, as LM Studio, llama.cpp's "
                             "server, vLLM and SGLang serve it), or auto (default): a URL ending in /v1 is "
                             "openai, else whichever the server answers as")
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
                                help=f"context window of every request, 1-{MAX_TOKENS} (default {NUM_CTX}; "
                                     "caption sizes the vision model's for its largest image)")
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


SERVER_DEFAULTS = {"host": None, "api": "auto", "model": None, "timeout": DEFAULT_TIMEOUT, "temperature": None,
                   "seed": None, "num_ctx": None, "max_tokens": None, "verbose": False,
                   "json": False, "prompts_dir": None}


COMMANDS = ("caption", "prompt", "enhance", "describe", "lore", "doctor", "models", "templates", "stats",
            "review")
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


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """--target and --quality-tags, on the commands that write for a base model."""
    presets = parser.add_argument_group("target model presets (flags given explicitly win)")
    presets.add_argument("--target", metavar="MODEL",
                         help=f"the base model the text is for: {', '.join(TARGETS)}; sets the style, "
                              "encoder, token budget and prompt wording its trainers expect; "
                              "`--target list` shows them (rows can be added in --prompts-dir "
                              f"{TARGETS_FILE})")
    presets.add_argument("--quality-tags", action="store_true",
                         help="put the target's quality tags first (Pony score_9, ...; NoobAI and "
                              "Illustrious masterpiece, ...); never added unless asked")


def target_listing(argv: Sequence[str]) -> argparse.Namespace | None:
    """`--target list` on caption, prompt or enhance: the arguments of the listing, else None.

    Read before the full parse, which would ask for the command's PATH or text first.
    """
    command = command_in(argv)
    if command not in ("caption", "prompt", "enhance"):
        return None
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--target")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--prompts-dir")
    known = listing.parse_known_args(argv)[0]
    if known.target != "list":
        return None
    return argparse.Namespace(command="targets", run=cmd_target_list, json=known.json,
                              prompts_dir=known.prompts_dir)


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
                  "  ollama-generate caption photo.png --style detailed --creative\n"
                  "  ollama-generate caption ./dataset/ --target pony --quality-tags\n"
                  "  ollama-generate caption --target list")
    caption.add_argument("path", metavar="PATH", help="an image file, or a folder of images")
    caption.add_argument("--style", choices=CAPTION_STYLES,
                         help="training: a 50-150 word paragraph (Flux/T5); tags: 20-40 booru "
                              "tags (SDXL/Pony/Illustrious); detailed: 2-4 sentences of prose "
                              "(default: the --target's, else training)")
    caption.add_argument("--variants", metavar="SPEC",
                         help="several captions per image from one description, one per style named, "
                              f"first one first: any of {', '.join(VARIANT_STYLES)} (short: one sentence "
                              f"within CLIP's 75 tokens; long: the training paragraph), at most {MAX_VARIANTS}, "
                              "e.g. short,long or training,tags (replaces --style)")
    caption.add_argument("-c", "--creative", action="store_true",
                         help="add atmosphere, mood and sensory detail (default: accurate)")
    caption.add_argument("--trigger", metavar="WORD",
                         help="trigger word, placed by code as the first comma-separated chunk, once")
    caption.add_argument("--prefix", metavar="TEXT",
                         help="text placed verbatim at the very start of every caption")
    caption.add_argument("--overwrite", action="store_true",
                         help="replace existing caption files (default: skip them; empty ones are always "
                              "written, symbolic links and special files never); captions a person "
                              "edited in `review` are kept, and each replaced one is backed up first")
    caption.add_argument("--overwrite-edited", action="store_true",
                         help="with --overwrite (implied), replace captions a person edited too "
                              "(backed up first)")
    caption.add_argument("--hint", metavar="TEXT",
                         help="context for both models: a character's name, what the dataset is about")
    caption.add_argument("--ground", metavar="WHAT", action="append",
                         help="ground captions in what exists: existing (the image's tag or caption file, "
                              "as facts to keep), filename, folder (their names as hints, without numbering "
                              "or kohya's repeat count); repeat or comma-separate")
    caption.add_argument("--hints", metavar="FILE",
                         help=f"per-image hints, one JSON line each ({{\"file_name\": \"a/b.png\", "
                              f"\"hint\": \"...\"}}), added to --hint; default: the folder's {HINTS_FILE}")
    caption.add_argument("--underscores", action="store_true",
                         help="tags: keep underscores (long_hair) instead of spaces (long hair)")
    caption.add_argument("--exclude-tags", metavar="TAGS",
                         help="tags: comma-separated tags never to write")
    caption.add_argument("--no-structured", action="store_true",
                         help="tags: ask for plain text instead of a JSON array (structured outputs, "
                              "Ollama 0.5 and later)")
    caption.add_argument("--always-first", metavar="TAGS",
                         help="tags: comma-separated tags to put first, in this order, added if missing")
    caption.add_argument("--max-side", type=max_side_pixels, default=DEFAULT_MAX_SIDE, metavar="PIXELS",
                         help=f"with Pillow ({PILLOW_EXTRA}), scale larger images down to this longest "
                              "side, upright, before sending; 0 sends originals, 0-"
                              f"{MAX_SIDE_LIMIT} (default: {DEFAULT_MAX_SIDE}); clips' frames are "
                              "scaled by ffmpeg")
    caption.add_argument("--frames", type=frame_count, default=DEFAULT_FRAMES, metavar="N",
                         help=f"frames sampled evenly from each video clip ({', '.join(VIDEO_EXTENSIONS)}) "
                              f"and sent in one request, 1-{MAX_FRAMES} (default: {DEFAULT_FRAMES}; "
                              "fewer when the vision model's context cannot hold them)")
    folder = caption.add_argument_group("folder runs")
    folder.add_argument("-r", "--recursive", action="store_true",
                        help="also caption images in subfolders (symlinked folders are not entered)")
    folder.add_argument("--ext", default=CAPTION_EXTENSION, metavar="EXT",
                        help="caption file extension, e.g. .caption for kohya (default: .txt)")
    folder.add_argument("--variants-to", choices=VARIANT_LAYOUTS, default="lines",
                        help="where --variants go: lines: one caption per line of img.txt (OneTrainer, "
                             "SimpleTuner; kohya with enable_wildcard); files: img.txt for the first, "
                             "img.NAME.txt for each other, e.g. img.tags.txt (default: lines)")
    folder.add_argument("--output-dir", metavar="DIR",
                        help="write captions into DIR, mirroring the folder tree (default: beside each image)")
    folder.add_argument("--limit", type=positive_int, metavar="N",
                        help="caption only the first N images that need one (1 or more), to try a prompt")
    folder.add_argument("--dry-run", action="store_true",
                        help="list what would be captioned and skipped on stdout; no model calls")
    folder.add_argument("-j", "--jobs", type=jobs_count, default=AUTO, metavar="N",
                        help=f"requests sent at once to each server, 1-{MAX_JOBS}, per stage; "
                             "auto (the default): learn how many each model answers at once")
    folder.add_argument("--stages", choices=STAGE_LAYOUTS, default="auto",
                        help="sequential: the vision model describes a chunk, then the text model writes "
                             "it; overlap: both at once; auto: overlap on servers that hold both models "
                             "(default: auto)")
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
    folder.add_argument("--manifest", metavar="FILE", nargs="?", const="",
                        help="write a Hugging Face imagefolder manifest (file_name, text) of every "
                             f"captioned image to PATH/{MANIFEST_NAME}, the only place "
                             "load_dataset('imagefolder') reads it from; FILE, if given, must be that")

    prompt = add("prompt", cmd_prompt,
                 '  ollama-generate prompt "a lighthouse in a storm"\n'
                 '  ollama-generate prompt "a lighthouse in a storm" --encoder clip\n'
                 "  echo 'a fox in snow' | ollama-generate prompt -")
    prompt.add_argument("concept", metavar="CONCEPT", help="what the image is about ('-' reads stdin)")
    prompt.add_argument("--encoder", choices=ENCODERS,
                        help="t5: natural language for Flux; clip: tags for SDXL/Pony "
                             "(default: the --target's, else t5)")

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
    describe.add_argument("--license", metavar="LICENSE",
                          help="the license, for the card's front matter: a Hub identifier such as "
                               "mit or openrail++, or other with --license-name")
    describe.add_argument("--license-name", metavar="NAME",
                          help="with --license other: the license's short name (front matter license_name)")
    describe.add_argument("--license-link", metavar="URL",
                          help="with --license other: a URL or a file in the repository such as "
                               "LICENSE.md (front matter license_link)")
    describe.add_argument("--dataset", metavar="DIR",
                          help="ground the card in this dataset: image count, frequent tags, sample captions")

    lore = add("lore", cmd_lore,
               '  ollama-generate lore "the last lighthouse keeper" --length short')
    lore.add_argument("scenario", metavar="SCENARIO", help="what to write about ('-' reads stdin)")
    lore.add_argument("--length", choices=LENGTHS, default="medium",
                      help="short (~150 words), medium (~400) or long (~900) (default: medium)")
    for sub in (caption, prompt, enhance):
        add_target_options(sub)
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

    stats = add("stats", cmd_stats,
                "  ollama-generate stats ./dataset/\n"
                "  ollama-generate stats ./dataset/ --trigger ohwx --top 20\n"
                "  ollama-generate stats ./dataset/ --recursive --json > stats.json")
    stats.add_argument("dataset", metavar="DATASET", help="a folder of images and caption files")
    stats.add_argument("--trigger", metavar="WORD",
                       help="the trigger word to check (default: the most common first chunk)")
    stats.add_argument("-r", "--recursive", action="store_true",
                       help="also read images in subfolders, as caption --recursive does")
    stats.add_argument("--ext", default=CAPTION_EXTENSION, metavar="EXT",
                       help="caption file extension, e.g. .caption (default: .txt)")
    stats.add_argument("--output-dir", metavar="DIR",
                       help="read captions from DIR, mirroring the folder tree, as caption "
                            "--output-dir writes them (default: beside each image)")
    stats.add_argument("--report", metavar="FILE",
                       help="the last run's report (caption --report) to read needs review from "
                            f"(default: {LAST_REPORT} in the caption folder, if there is one)")
    stats.add_argument("--top", type=positive_int, default=50, metavar="N",
                       help="how many tags, and names per list, the text shows (default: 50; "
                            "--json has them all)")
    review = add("review", cmd_review,
                 "  ollama-generate review ./dataset/\n"
                 "  ollama-generate review ./dataset/ --port 8765 --no-browser\n"
                 "  ollama-generate review ./dataset/ --html review.html")
    review.add_argument("dataset", metavar="DATASET", help="the folder of images and caption files")
    review.add_argument("--port", type=port_number, metavar="N",
                        help="port on 127.0.0.1, 0-65535 (default: a free one)")
    review.add_argument("--no-browser", action="store_true",
                        help="only print the page's address; do not open a browser")
    review.add_argument("--html", metavar="FILE",
                        help="write the page as one self-contained, read-only HTML file instead of serving it")
    review.add_argument("--report", metavar="FILE",
                        help="a caption run's --report to take needs-review reasons and cleaning spans "
                             "from (default: the last run's, kept in the cache folder)")
    walk = review.add_argument_group("dataset layout (as in caption)")
    walk.add_argument("-r", "--recursive", action="store_true", help="also show images in subfolders")
    walk.add_argument("--ext", default=CAPTION_EXTENSION, metavar="EXT",
                      help="caption file extension (default: .txt)")
    walk.add_argument("--output-dir", metavar="DIR", help="the captions are in DIR, mirroring the folder tree")
    walk.add_argument("--cache-dir", metavar="DIR",
                      help=f"where vision descriptions are kept (default: {CACHE_FOLDER}/ inside the folder)")
    again = review.add_argument_group("recaption (the page's Recaption button, as caption writes)")
    again.add_argument("--style", choices=CAPTION_STYLES,
                       help="caption style (default: tags if most captions are tags, else training)")
    again.add_argument("-c", "--creative", action="store_true", help="the creative mood of the style")
    again.add_argument("--trigger", metavar="WORD",
                       help="trigger word, placed first (default: the first chunk most captions share)")
    again.add_argument("--prefix", metavar="TEXT", help="text placed verbatim at the start of the caption")
    again.add_argument("--hint", metavar="TEXT", help="context for both models")
    for sub in (caption, models, doctor, review):
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


def handle_sigterm():
    """Make SIGTERM end the command as Ctrl-C does (Terminated is a KeyboardInterrupt): a caption
    being written is finished, the summary and --report are written, the exit status is 143.
    A second SIGTERM while that happens is ignored (SIGKILL still works). Returns the undo.
    """
    import _signal  # the C module: signal.py's enums would cost a millisecond of start-up

    def terminated(signum: int, frame: object) -> None:
        _signal.signal(_signal.SIGTERM, _signal.SIG_IGN)
        raise Terminated

    try:
        previous = _signal.signal(_signal.SIGTERM, terminated)
    except (ValueError, OSError):  # not the main thread (an embedding program): leave it alone
        return lambda: None
    return lambda: _signal.signal(_signal.SIGTERM, _signal.SIG_DFL if previous is None else previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_in(argv))
    args = target_listing(argv) or parser.parse_args(argv)  # usage errors exit 2 here
    check_generation_options(parser, args)
    for name, default in SERVER_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    debug = bool(os.environ.get("OLLAMA_GENERATE_DEBUG"))
    global PROMPTS_OVERRIDE
    restore_sigterm = handle_sigterm()
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
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        if debug:
            raise
        code = getattr(exc, "exit_code", 130)
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"\n{PROG}: {what}", file=sys.stderr)
        if args.json:
            report = getattr(exc, "report", None)
            hint = ("run the same command again: finished captions and descriptions are kept"
                    if report else None)
            write_product(json.dumps({"error": what, "hint": hint, "exit_code": code, "report": report},
                                     ensure_ascii=False, indent=2))
        return code
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
    finally:
        restore_sigterm()
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a script by the subprocess tests
    sys.exit(main())
