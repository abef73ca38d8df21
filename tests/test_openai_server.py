"""Against a real OpenAI-compatible server nobody here wrote: llama-cpp-python's own server serving
SmolLM2-135M-Instruct (the `llama_server` fixture in conftest.py; set it up with
`bash tests/setup_llama_server.sh`, run only these with `pytest -m llama_server`).

First the fixture itself, spoken to with urllib; then the command line against it. A 135M model
writes poor text, so the tests assert what could break (exit codes, text that is there and
cleaned, what the server itself answered), never the model's words. Every test that uses the
server is marked `llama_server` (conftest.py marks it).
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest
from cli import run
from conftest import TESTS_DIR
from images import png_bytes

SCRIPT = TESTS_DIR.parent / "ollama_generate.py"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SHORT = ["--max-tokens", "60", "--seed", "1", "--temperature", "0"]
# The OpenAI-compatible client lands on the lead's branch; these marks go when it is merged.


def get_json(url: str) -> dict:
    with NO_PROXY.open(url, timeout=60) as answer:
        return json.load(answer)


def post(url: str, body: dict) -> bytes:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with NO_PROXY.open(request, timeout=60) as answer:
        assert answer.status == 200
        return answer.read()


def chat(model: str, text: str, *, max_tokens: int, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}


# ------------------------------------------------------------------------------------------------
# no server needed: a developer's OpenAI settings stay out of every test


@pytest.fixture(scope="module")
def openai_shell() -> Iterator[None]:
    """Variables set *before* the autouse clean_env runs, as in a developer's shell."""
    patch = pytest.MonkeyPatch()
    patch.setenv("OPENAI_API_KEY", "sk-developer-secret")
    patch.setenv("OPENAI_BASE_URL", "http://leak.invalid:1/v1")
    patch.setenv("OPENAI_API_BASE", "http://leak.invalid:2/v1")
    yield
    patch.undo()


def test_a_developers_openai_settings_never_reach_a_test(openai_shell):
    assert not [name for name in os.environ if name.startswith("OPENAI_")]


# ------------------------------------------------------------------------------------------------
# the fixture: a real server, spoken to directly


def test_the_server_lists_its_one_model(llama_server):
    listing = get_json(llama_server.url + "/v1/models")
    assert listing["object"] == "list"
    assert [entry["id"] for entry in listing["data"]] == [llama_server.model]


def test_a_chat_completion_streamed_and_not_says_the_same(llama_server):
    request = chat(llama_server.model, "Name a colour.", max_tokens=8)
    whole = json.loads(post(llama_server.url + "/v1/chat/completions", request))
    text = whole["choices"][0]["message"]["content"]
    assert text.strip()
    assert whole["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < whole["usage"]["completion_tokens"] <= 8

    events = post(llama_server.url + "/v1/chat/completions", {**request, "stream": True}).decode()
    data = [line.removeprefix("data: ") for line in events.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert events.rstrip("\n").endswith("data: [DONE]")
    pieces = [json.loads(chunk)["choices"][0]["delta"].get("content", "") for chunk in data[:-1]]
    assert "".join(pieces) == text  # temperature 0: the same answer, in pieces


# ------------------------------------------------------------------------------------------------
# the command line against it


def assert_one_clean_paragraph(text: str) -> None:
    """Cleaned product text: there, one paragraph, no quotes around it, no "Here is" lead-in."""
    text = text.strip()
    assert text
    assert "\n\n" not in text
    assert not (text[0] in "\"'\u201c" and text[-1] in "\"'\u201d")
    assert not re.match(r"(?i)here(?: is|'s)\b", text)


@pytest.mark.parametrize("server", [["{url}/v1"], ["{url}", "--api", "openai"], ["{url}", "--api", "auto"]],
                         ids=["v1-suffix", "api-openai", "api-auto"])
def test_prompt_through_each_way_of_naming_the_server(llama_server, capsys, server):
    host = [server[0].format(url=llama_server.url), *server[1:]]
    code, out, err = run(capsys, "prompt", "a lighthouse at dusk", "--host", *host,
                         "--model", llama_server.model, *SHORT)
    assert (code, "Traceback" in err) == (0, False), err
    assert_one_clean_paragraph(out)


@pytest.mark.parametrize("command", [["enhance", "a cat on a tin roof"],
                                     ["lore", "the last lighthouse keeper", "--length", "short"],
                                     ["describe", "Drowned Coast", "--type", "style"]],
                         ids=lambda command: command[0])
def test_the_other_text_commands(llama_server, capsys, command):
    code, out, err = run(capsys, *command, "--host", llama_server.url + "/v1", "--model", llama_server.model,
                         *SHORT)
    assert (code, "Traceback" in err) == (0, False), err
    assert out.strip()


def test_prompt_json_has_the_text_and_the_model(llama_server, capsys):
    code, out, err = run(capsys, "prompt", "a lighthouse at dusk", "--host", llama_server.url + "/v1",
                         "--model", llama_server.model, "--json", *SHORT)
    assert code == 0, err
    document = json.loads(out)
    assert_one_clean_paragraph(document["text"])
    assert document["model"] == llama_server.model


def test_models_json_lists_the_servers_model(llama_server, capsys):
    code, out, err = run(capsys, "models", "--host", llama_server.url + "/v1", "--json")
    assert code == 0, err
    assert llama_server.model in json.dumps(json.loads(out))


def test_doctor_json_passes_the_server_and_names_it_openai_compatible(llama_server, capsys):
    code, out, err = run(capsys, "doctor", "--host", llama_server.url + "/v1", "--model", llama_server.model,
                         "--vision-model", llama_server.model, "--json")
    assert "Traceback" not in err
    document = json.loads(out)  # one document, whatever the verdict on a text model as the vision model
    server_checks = [check for check in document["checks"] if "server" in check["name"]]
    assert server_checks and all(check["status"] == "ok" for check in server_checks), server_checks
    assert "openai" in out.lower()
    assert llama_server.model in out


def run_in_a_terminal(*argv: str) -> tuple[int, str, str]:
    """Run the script with stdout on a pseudo-terminal, as a person at a shell does: (code, out, err)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("COV_CORE")}
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, str(SCRIPT), *argv], stdin=subprocess.DEVNULL,
                               stdout=follower, stderr=subprocess.PIPE, env=env)
    os.close(follower)
    shown = bytearray()
    while True:
        try:
            piece = os.read(leader, 4096)
        except OSError:  # EIO: the process closed its end of the terminal
            break
        if not piece:
            break
        shown += piece
    os.close(leader)
    err = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    return process.wait(timeout=60), shown.decode(errors="replace").replace("\r\n", "\n"), err


def test_prompt_streams_to_a_terminal(llama_server):
    code, shown, err = run_in_a_terminal("prompt", "a lighthouse at dusk", "--host", llama_server.url + "/v1",
                                         "--model", llama_server.model, *SHORT)
    assert (code, "Traceback" in err) == (0, False), err
    assert shown.strip()


@pytest.fixture
def vision_front(llama_server, make_ollama) -> Iterator[object]:
    """A loopback OpenAI-compatible front that turns image parts into text and forwards to the real
    server, so the text-only SmolLM2 can stand in for a vision model."""
    front = make_ollama(api="openai")
    front.forward_to(llama_server.url, max_tokens=80)  # the vision stage asks for 1024 (SAMPLING)
    yield front


def test_caption_a_folder_through_the_vision_front(llama_server, vision_front, capsys, tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    for seed, name in enumerate(("a.png", "b.png")):
        (folder / name).write_bytes(png_bytes(8, 8, seed=seed))
    report = tmp_path / "report.json"
    code, out, err = run(capsys, "caption", folder, "--host", vision_front.url + "/v1",
                         "--vision-model", llama_server.model, "--model", llama_server.model,
                         "--report", report, *SHORT)
    # 1: a 135M model may write something the policy refuses; that image fails with a reason.
    assert code in (0, 1), err
    assert "Traceback" not in err
    document = json.loads(report.read_text())
    written = {entry["image"] for entry in document["captions"]}
    failed = {entry["image"] for entry in document["failed"]}
    assert written | failed == {"a.png", "b.png"}
    assert (code == 0) == (failed == set())
    for name in written:
        assert (folder / name).with_suffix(".txt").read_text(encoding="utf-8").strip()
    for name in failed:
        assert not (folder / name).with_suffix(".txt").exists()  # no empty or half-written file
    sent = [request for request in vision_front.requests if request.path == "/v1/chat/completions"]
    assert any(b'"image_url"' in request.raw for request in sent)  # the vision stage sent the images


def test_caption_one_image_through_the_vision_front(llama_server, vision_front, capsys, photo):
    code, out, err = run(capsys, "caption", photo, "--host", vision_front.url + "/v1",
                         "--vision-model", llama_server.model, "--model", llama_server.model, "--json", *SHORT)
    document = json.loads(out)  # one document either way
    if code == 0:
        assert document["text"].strip() and document["description"].strip()
        assert (document["vision_model"], document["model"]) == (llama_server.model, llama_server.model)
    else:  # a 135M model may write something the policy refuses: an error, with its exit code
        assert (code, document["exit_code"]) == (1, 1), err
    assert not photo.with_suffix(".txt").exists()  # one image: the caption is printed, not written
