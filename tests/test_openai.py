"""The OpenAI-compatible transport against the fake's OpenAI face (FakeOllama(api="openai"), a
vLLM-like server; api="both" is Ollama itself): the command line, what went over the wire, and
what came out. Fast and unmarked; tests/test_openai_server.py drives a real server."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from cli import run
from fake_ollama import b64
from images import jpeg_bytes, png_bytes
from traced import TEXT, VISION

import ollama_generate as og

MODELS = {VISION: {"capabilities": ("completion", "vision")}, TEXT: {"capabilities": ("completion",)}}
CONCEPT = "a red fox asleep in fresh snow"
CHAT = "/v1/chat/completions"
# The fields that switch thinking off for every model but gpt-oss (og.THINKING_OFF), as sent.
THINKING_OFF = {"chat_template_kwargs": {"enable_thinking": False}, "reasoning_effort": "none"}
OLLAMA_KEY = "ollama-key-0123456789"
OPENAI_KEY = "sk-openai-key-0123456789"


# -- helpers -------------------------------------------------------------------------------------


def openai_server(make_ollama, **kwargs):
    """A vLLM-like server listing the default vision and text models."""
    return make_ollama(api="openai", models=kwargs.pop("models", MODELS), **kwargs)


def v1(server) -> str:
    return server.url + "/v1"


def chats(server):
    return server.requests_to(CHAT)


def routes(server) -> list[tuple[str, str]]:
    return [(rec.method, rec.path) for rec in server.requests]


def is_probe(rec) -> bool:
    """The vision probe: a one-token answer about a tiny image."""
    return rec.body.get("max_tokens") == 1


def vision_requests(server):
    """Chat requests that describe a dataset image (not the probe)."""
    return [rec for rec in chats(server)
            if not is_probe(rec) and isinstance(rec.body["messages"][-1]["content"], list)]


def text_requests(server):
    return [rec for rec in chats(server) if isinstance(rec.body["messages"][-1]["content"], str)]


def data_url_bytes(url: str) -> tuple[str, bytes]:
    """(MIME type, image bytes) of a data:image/...;base64, URL."""
    head, _, data = url.partition(",")
    assert head.startswith("data:") and head.endswith(";base64"), head
    return head[len("data:"):-len(";base64")], base64.b64decode(data)


def bearer(rec) -> str | None:
    return rec.headers.get("authorization")


def dataset(folder):
    """Two PNGs and a JPEG; returns {file name: bytes}."""
    folder.mkdir()
    files = {"a.png": png_bytes(seed=1), "b.png": png_bytes(seed=2), "c.jpg": jpeg_bytes()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def error_and_hint(err: str, *, hinted: bool = True) -> tuple[str, str]:
    """stderr of a failed command: exactly one error line and one hint line (none when not
    hinted), no traceback; the hint is "" when there is none."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("ollama-generate: error: ")]
    hints = [line for line in err.splitlines() if line.startswith("ollama-generate: hint: ")]
    assert (len(errors), len(hints)) == (1, int(hinted)), err
    return errors[0], "".join(hints)


def prompt_options() -> dict:
    """max_tokens and temperature of the prompt command's SAMPLING row, as sent."""
    temperature, max_tokens = og.SAMPLING[og.STYLES["prompt-t5"].sampling]
    return {"temperature": temperature, "max_tokens": max_tokens}


def prompt_text(concept: str = CONCEPT) -> str:
    return og.with_no_think(TEXT, og.render(og.STYLES["prompt-t5"].template, concept=concept))


# -- 1. a /v1 URL: one chat completion, no detection ----------------------------------------------


def test_prompt_to_a_v1_url_sends_one_chat_completion_and_prints_the_text(make_ollama, capsys):
    server = openai_server(make_ollama)
    answer = "A red fox curls up asleep in deep fresh snow under a pale winter sky."
    server.reply(answer)
    code, out, err = run(capsys, "prompt", CONCEPT, "--host", v1(server))
    assert (code, out, err) == (0, answer + "\n", "")
    assert routes(server) == [("POST", CHAT)]
    assert server.requests[0].body == {
        "model": TEXT, "messages": [{"role": "user", "content": prompt_text()}],
        "stream": True, "stream_options": {"include_usage": True}, **prompt_options(), **THINKING_OFF}
    assert bearer(server.requests[0]) is None


# -- 2. --api auto, ollama, openai ------------------------------------------------------------------


def test_auto_asks_ollamas_version_then_the_model_list_of_a_plain_url(make_ollama, capsys):
    server = openai_server(make_ollama)
    code, out, _err = run(capsys, "prompt", CONCEPT, "--host", server.url, "--api", "auto")
    assert (code, out) == (0, "A fake answer.\n")
    assert routes(server) == [("GET", "/api/version"), ("GET", "/v1/models"), ("POST", CHAT)]


def test_auto_never_sends_the_openai_key_to_a_host_not_named_as_openai_compatible(make_ollama, capsys,
                                                                                  monkeypatch):
    # llama-server --api-key guards /api/version too: before it says what it is, it is a host
    # named as Ollama, and a key meant for another service must not go there.
    server = openai_server(make_ollama, api_key=OPENAI_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    code, out, err = run(capsys, "prompt", CONCEPT, "--host", server.url)
    assert (code, out) == (1, "")
    error, hint = error_and_hint(err)
    assert f"Ollama at {server.url} wants an API key" in error
    assert hint == f"ollama-generate: hint: {og.SERVER_KINDS['ollama'].key}"
    assert "/v1 URL" in hint and "OPENAI_API_KEY" in hint
    assert all(bearer(rec) is None for rec in server.requests)
    # Named as OpenAI-compatible, it gets the key.
    code, out, _err = run(capsys, "prompt", CONCEPT, "--host", v1(server))
    assert (code, out) == (0, "A fake answer.\n")
    assert bearer(server.requests[-1]) == f"Bearer {OPENAI_KEY}"


def test_auto_on_a_guarded_ollama_without_its_key_asks_for_ollamas_key(make_ollama, capsys):
    server = make_ollama(api="both", api_key=OLLAMA_KEY)
    code, out, err = run(capsys, "prompt", CONCEPT, "--host", server.url)
    assert (code, out) == (1, "")
    error, hint = error_and_hint(err)
    assert f"Ollama at {server.url} wants an API key" in error
    assert hint == f"ollama-generate: hint: {og.SERVER_KINDS['ollama'].key}"
    assert hint.startswith("ollama-generate: hint: set OLLAMA_API_KEY to the server's key")


def test_auto_picks_ollamas_own_api_on_ollama(make_ollama, capsys):
    server = make_ollama(api="both")
    code, out, _err = run(capsys, "prompt", CONCEPT, "--host", server.url, "--api", "auto")
    assert (code, out) == (0, "A fake answer.\n")
    assert routes(server) == [("GET", "/api/version"), ("POST", "/api/generate")]


def test_api_openai_speaks_v1_to_ollama(make_ollama, capsys):
    server = make_ollama(api="both")
    code, out, _err = run(capsys, "prompt", CONCEPT, "--host", server.url, "--api", "openai")
    assert (code, out) == (0, "A fake answer.\n")
    assert routes(server) == [("POST", CHAT)]
    assert server.requests[0].body["model"] == TEXT


# -- 3. a folder run -----------------------------------------------------------------------------


def test_caption_probes_vision_once_then_sends_each_image_as_a_data_url_before_the_text(
        make_ollama, capsys, tmp_path):
    server = openai_server(make_ollama)
    files = dataset(tmp_path / "set")
    code, out, _err = run(capsys, "caption", tmp_path / "set", "--host", v1(server))
    assert (code, out) == (0, "")
    probes = [rec for rec in chats(server) if is_probe(rec)]
    assert len(probes) == 1 and chats(server)[0] is probes[0]
    probe = probes[0].body
    assert probe["model"] == VISION and probe["temperature"] == 0
    (message,) = probe["messages"]
    image, text = message["content"]
    mime, data = data_url_bytes(image["image_url"]["url"])
    assert (mime, data[:8]) == ("image/png", b"\x89PNG\r\n\x1a\n")
    assert struct.unpack(">II", data[16:24]) == (32, 32)  # IHDR width and height
    assert text == {"type": "text", "text": og.render("vision_probe")}

    system, user = og.vision_prompt(og.Config(), "")
    expected = {"a.png": "image/png", "b.png": "image/png", "c.jpg": "image/jpeg"}
    sent = {}
    for rec in vision_requests(server):
        assert rec.body["model"] == VISION
        assert rec.body["messages"][0] == {"role": "system", "content": system}
        image, text = rec.body["messages"][1]["content"]
        assert text == {"type": "text", "text": user}
        mime, data = data_url_bytes(image["image_url"]["url"])
        name = next(name for name, content in files.items() if content == data)
        sent[name] = mime
        assert image["image_url"]["url"] == f"data:{mime};base64,{b64(files[name])}"
    assert sent == expected
    for name in files:
        assert (tmp_path / "set" / name).with_suffix(".txt").read_text().strip()


def test_caption_report_says_an_openai_server_reports_no_model_loads(make_ollama, capsys, tmp_path):
    server = openai_server(make_ollama)
    dataset(tmp_path / "set")
    code, _out, err = run(capsys, "caption", tmp_path / "set", "--host", v1(server),
                          "--report", tmp_path / "report.json")
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["written"] == 3
    assert report["hosts"] == [{"url": v1(server), "api": "openai", "model_calls": len(chats(server)),
                                "model_loads": None, "dropped": None,
                                "not_reported": ["model_loads", "load_wait_seconds"]}]
    assert report["model_loads"] is None
    assert [entry["load_wait_seconds"] for entry in report["throughput"]] == [None]
    assert "model loads not reported by the server." in err
    assert f"{v1(server)}: " in err and err.count("model loads not reported") == 2


# -- 4. a vision model that refuses the probe ------------------------------------------------------


REFUSAL = "this model does not take image input"


@pytest.mark.parametrize("status", [400, 500])
def test_caption_stops_before_any_image_when_the_vision_probe_is_refused(make_ollama, capsys, tmp_path,
                                                                         status):
    server = openai_server(make_ollama)
    # A refusal comes every time; a 500 is asked again like any request (one alone is no refusal).
    tries = 1 + og.RETRIES if status >= 500 else 1
    for _ in range(tries):
        server.reply(status=status, error=REFUSAL)
    dataset(tmp_path / "set")
    code, out, err = run(capsys, "caption", tmp_path / "set", "--host", v1(server))
    assert (code, out) == (4, "")
    error, hint = error_and_hint(err)
    assert f"the vision model '{VISION}' cannot see images (it refused a test image: " in error
    assert REFUSAL in error
    assert hint == f"ollama-generate: hint: {og.SERVER_KINDS['openai'].vision_hint}"
    assert len(chats(server)) == tries and all(is_probe(rec) for rec in chats(server))
    assert not list((tmp_path / "set").glob("*.txt"))


@pytest.mark.parametrize("trouble", [{"status": 503}, {"status": 429}, {"fault": "eof", "text": "grey grey"}],
                         ids=["busy", "rate limit", "cut stream"])
def test_a_busy_server_or_a_cut_answer_at_the_probe_is_no_refusal(make_ollama, capsys, tmp_path, trouble):
    server = openai_server(make_ollama)
    server.reply(**trouble)
    files = dataset(tmp_path / "set")
    code, out, _err = run(capsys, "caption", tmp_path / "set", "--host", v1(server))
    assert (code, out) == (0, "")
    assert [is_probe(rec) for rec in chats(server)[:3]] == [True, True, False]
    assert len(vision_requests(server)) == len(files)
    assert all((tmp_path / "set" / name).with_suffix(".txt").read_text().strip() for name in files)


def test_doctor_fails_a_vision_model_that_refuses_the_probe(make_ollama, capsys):
    server = openai_server(make_ollama)
    server.reply(status=400, error=REFUSAL)
    code, out, _err = run(capsys, "doctor", "--host", v1(server))
    assert code == 4
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1
    assert fails[0].startswith(f"FAIL  vision model: {VISION} cannot see images (it refused a test image: ")
    assert REFUSAL in fails[0]
    assert f"      fix: {og.SERVER_KINDS['openai'].get_vision}" in out.splitlines()
    assert len(chats(server)) == 1


def test_doctor_passes_a_good_openai_server(make_ollama, capsys):
    server = openai_server(make_ollama)
    code, out, _err = run(capsys, "doctor", "--host", v1(server))
    assert code == 0
    server_line = f"ok    server: OpenAI-compatible server at {v1(server)} (models owned by vllm)"
    assert server_line in out.splitlines()
    code, out, _err = run(capsys, "doctor", "--host", v1(server), "--json")
    assert code == 0
    checks = {check["name"]: check for check in json.loads(out)["checks"]}
    assert checks["server"] == {"name": "server", "status": "ok", "fix": None,
                                "detail": f"OpenAI-compatible server at {v1(server)} (models owned by vllm)"}
    assert checks["vision model"]["status"] == "ok" and checks["text model"]["status"] == "ok"
    assert json.loads(out)["ok"] is True


# -- 5. structured outputs and fields a server refuses ---------------------------------------------


def tags_format(shape: str) -> dict:
    """response_format for tags, as the client sends it first (json_schema) and as it falls back."""
    schema = og.STYLES["tags"].schema()
    if shape == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    return {"type": "json_object", "schema": schema}


def test_tags_are_asked_for_with_a_json_schema(make_ollama, capsys, tmp_path):
    server = openai_server(make_ollama)
    dataset(tmp_path / "set")
    code, _out, _err = run(capsys, "caption", tmp_path / "set", "--host", v1(server), "--style", "tags")
    assert code == 0
    formats = [rec.body.get("response_format") for rec in text_requests(server)]
    assert formats == [tags_format("json_schema")] * 3
    assert not any("response_format" in rec.body for rec in vision_requests(server))
    assert (tmp_path / "set" / "a.txt").read_text().startswith("1girl, solo, short hair")


def test_a_refused_json_schema_falls_back_to_json_object_and_is_remembered(make_ollama, capsys, tmp_path):
    server = openai_server(make_ollama, structured_outputs=False)
    files = dataset(tmp_path / "set")
    code, _out, _err = run(capsys, "caption", tmp_path / "set", "--host", v1(server), "--style", "tags",
                           "--jobs", "1")
    assert code == 0
    # The first text request is refused (400) and sent again at once; the next images' go straight.
    assert [rec.body.get("response_format") for rec in text_requests(server)] == [
        tags_format("json_schema"), tags_format("json_object"), tags_format("json_object"),
        tags_format("json_object")]
    for name in files:
        assert (tmp_path / "set" / name).with_suffix(".txt").read_text().startswith("1girl, solo, short hair")


def test_a_field_the_server_does_not_know_is_dropped_after_one_refusal(make_ollama, capsys, tmp_path):
    server = openai_server(make_ollama, unsupported_fields=("chat_template_kwargs",))
    files = dataset(tmp_path / "set")
    code, _out, _err = run(capsys, "caption", tmp_path / "set", "--host", v1(server), "--jobs", "1")
    assert code == 0
    carried = ["chat_template_kwargs" in rec.body for rec in chats(server)]
    assert carried[0] and not any(carried[1:])
    # The refused probe went again without it; then one vision and one text request per image.
    assert len(chats(server)) == 2 + 2 * len(files)
    assert all(rec.body["reasoning_effort"] == "none" for rec in chats(server))
    for name in files:
        assert (tmp_path / "set" / name).with_suffix(".txt").read_text().strip()


# -- 6. errors ---------------------------------------------------------------------------------------


def test_a_server_that_wants_a_key_says_so_and_names_openai_api_key(make_ollama, capsys):
    server = openai_server(make_ollama, api_key=OPENAI_KEY)
    code, out, err = run(capsys, "prompt", CONCEPT, "--host", v1(server))
    assert (code, out) == (1, "")
    error, hint = error_and_hint(err)
    assert f"the OpenAI-compatible server at {v1(server)} wants an API key (HTTP 401: " in error
    assert "OPENAI_API_KEY" in hint
    assert [bearer(rec) for rec in server.requests] == [None]


def test_a_wrong_key_is_refused_and_never_shown(make_ollama, capsys, tmp_path, monkeypatch):
    wrong = "sk-wrong-key-987654321"
    server = openai_server(make_ollama, api_key=OPENAI_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    dataset(tmp_path / "set")
    code, out, err = run(capsys, "caption", tmp_path / "set", "--host", v1(server),
                         "--report", tmp_path / "report.json")
    assert code == 1
    error, hint = error_and_hint(err)
    assert f"the OpenAI-compatible server at {v1(server)} refused the API key (HTTP 401: " in error
    assert "OPENAI_API_KEY" in hint
    assert server.requests and all(bearer(rec) == f"Bearer {wrong}" for rec in server.requests)
    assert wrong not in out + err + (tmp_path / "report.json").read_text()
    assert not list((tmp_path / "set").glob("*.txt"))


def test_the_right_key_goes_with_every_request(make_ollama, capsys, tmp_path, monkeypatch):
    server = openai_server(make_ollama, api_key=OPENAI_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    files = dataset(tmp_path / "set")
    code, out, err = run(capsys, "caption", tmp_path / "set", "--host", v1(server))
    assert (code, out) == (0, "")
    assert len(chats(server)) == 1 + 2 * len(files)
    assert {bearer(rec) for rec in server.requests} == {f"Bearer {OPENAI_KEY}"}
    assert OPENAI_KEY not in err


def test_a_caption_run_with_a_model_the_server_does_not_serve_lists_what_it_serves(make_ollama, capsys,
                                                                                      tmp_path):
    server = openai_server(make_ollama)
    dataset(tmp_path / "set")
    code, out, err = run(capsys, "caption", tmp_path / "set", "--host", v1(server),
                         "--vision-model", "llava:7b")
    assert (code, out) == (4, "")
    error, hint = error_and_hint(err)
    served = ", ".join(server.models)
    assert error.endswith(f"model 'llava:7b' is not served by {v1(server)} (it serves: {served})")
    assert f"ollama-generate models --host {v1(server)}" in hint
    assert chats(server) == []


def test_prompt_with_a_model_the_server_does_not_serve_exits_4(make_ollama, capsys):
    server = openai_server(make_ollama)
    code, out, err = run(capsys, "prompt", CONCEPT, "--host", v1(server), "--model", "llava:7b")
    assert (code, out) == (4, "")
    error, _hint = error_and_hint(err)
    assert error.endswith(f"model 'llava:7b' is not served by {v1(server)}")
    assert [rec.body["model"] for rec in chats(server)] == ["llava:7b"]


def test_a_rate_limit_with_retry_after_is_waited_out(make_ollama, capsys):
    server = openai_server(make_ollama)
    server.reply(status=429, retry_after=0)
    code, out, err = run(capsys, "prompt", CONCEPT, "--host", v1(server))
    assert (code, out, err) == (0, "A fake answer.\n", "")
    assert len(chats(server)) == 2


def test_the_wait_a_retry_after_asks_for_is_kept(make_ollama, capsys, monkeypatch):
    waits = []
    monkeypatch.setattr(og.time, "sleep", waits.append)
    server = openai_server(make_ollama)
    server.reply(status=429, retry_after=7)
    code, out, _err = run(capsys, "prompt", CONCEPT, "--host", v1(server))
    assert (code, out) == (0, "A fake answer.\n")
    assert waits == [7.0]


def test_a_server_error_is_retried_then_given_up(make_ollama, capsys):
    server = openai_server(make_ollama)
    server.fail_forever(status=500)
    code, out, err = run(capsys, "prompt", CONCEPT, "--host", v1(server))
    assert (code, out) == (1, "")
    error, _hint = error_and_hint(err, hinted=False)
    attempts = 1 + og.RETRIES
    assert error.endswith(f"answered HTTP 500: Internal server error (gave up after {attempts} attempts)")
    assert len(chats(server)) == 1 + og.RETRIES


@pytest.mark.parametrize("broken", [{"mid_stream": True}, {"fault": "eof"}], ids=["error event", "eof"])
def test_an_answer_broken_mid_stream_is_asked_again(make_ollama, capsys, broken):
    server = openai_server(make_ollama)
    server.reply("A partial answer that breaks off somewhere in the middle.", **broken)
    code, out, err = run(capsys, "prompt", CONCEPT, "--host", v1(server))
    assert (code, out, err) == (0, "A fake answer.\n", "")
    assert [rec.body for rec in chats(server)] == [chats(server)[0].body] * 2


# -- 7. an Ollama server and an OpenAI-compatible one in one run -------------------------------------


def test_each_host_of_a_mixed_run_gets_its_own_key(make_ollama, capsys, tmp_path, monkeypatch):
    ollama = make_ollama(api_key=OLLAMA_KEY, request_time=0.05)
    openai = openai_server(make_ollama, api_key=OPENAI_KEY, request_time=0.05)
    monkeypatch.setenv("OLLAMA_API_KEY", OLLAMA_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    folder = tmp_path / "set"
    folder.mkdir()
    names = [f"{n}.png" for n in "abcdef"]
    for seed, name in enumerate(names):
        (folder / name).write_bytes(png_bytes(seed=seed))
    code, out, _err = run(capsys, "caption", folder, "--host", ollama.url, "--host", v1(openai),
                          "--report", tmp_path / "report.json")
    assert (code, out) == (0, "")
    assert ollama.requests_to("/api/chat") and ollama.requests_to("/api/generate")
    assert vision_requests(openai) and text_requests(openai)
    assert {bearer(rec) for rec in ollama.requests} == {f"Bearer {OLLAMA_KEY}"}
    assert {bearer(rec) for rec in openai.requests} == {f"Bearer {OPENAI_KEY}"}
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(host["url"], host["api"]) for host in report["hosts"]] == [(ollama.url, "ollama"),
                                                                         (v1(openai), "openai")]
    assert report["written"] == len(names)
    assert all((folder / name).with_suffix(".txt").read_text().strip() for name in names)


# -- 8. thinking ---------------------------------------------------------------------------------


THOUGHT = "Let me think about which words the caption should use before I answer."


@pytest.mark.parametrize("text_model, unsupported", [("gpt-oss:20b", ()), (TEXT, ("chat_template_kwargs",))],
                         ids=["gpt-oss always reasons", "the switch is refused"])
def test_a_caption_holds_none_of_the_thinking(make_ollama, capsys, tmp_path, text_model, unsupported):
    models = {VISION: MODELS[VISION], text_model: {"capabilities": ("completion", "thinking")}}
    server = openai_server(make_ollama, models=models, unsupported_fields=unsupported)
    server.default_thinking = THOUGHT
    files = dataset(tmp_path / "set")
    code, _out, _err = run(capsys, "caption", tmp_path / "set", "--host", v1(server), "--model", text_model,
                           "--report", tmp_path / "report.json")
    assert code == 0
    assert text_requests(server)
    for name in files:
        caption = (tmp_path / "set" / name).with_suffix(".txt").read_text()
        assert caption.strip() and "think" not in caption
    assert THOUGHT not in (tmp_path / "report.json").read_text()


# -- 9. models ---------------------------------------------------------------------------------------


def test_models_json_says_openai_and_that_capabilities_are_unknown(make_ollama, capsys):
    server = openai_server(make_ollama)
    code, out, _err = run(capsys, "models", "--host", v1(server), "--json", "--model", "mistral-small:24b")
    assert code == 0
    data = json.loads(out)
    assert data["api"] == "openai"
    assert [(row["name"], row["capabilities"], row["configured_as"]) for row in data["models"]] == [
        (name, None, {VISION: "vision"}.get(name)) for name in server.models]
    assert data["missing"] == [{"name": "mistral-small:24b", "configured_as": "text"}]
    assert routes(server) == [("GET", "/v1/models")]


def test_an_error_event_that_never_stops_says_what_the_server_said(make_ollama, capsys):
    server = openai_server(make_ollama)
    server.fail_forever(text="A partial answer that breaks off somewhere in the middle.", mid_stream=True,
                        error="the model ran out of memory")
    code, out, err = run(capsys, "prompt", CONCEPT, "--host", v1(server))
    assert (code, out) == (1, "")
    error, _hint = error_and_hint(err, hinted=False)
    assert error.endswith(f"at {v1(server)} failed while answering: the model ran out of memory "
                          f"(gave up after {1 + og.RETRIES} attempts)")
    assert len(chats(server)) == 1 + og.RETRIES
