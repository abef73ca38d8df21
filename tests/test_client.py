"""OllamaClient details that the end-to-end tests do not reach on their own."""

from __future__ import annotations

import io
import sys

import pytest
from images import png_bytes

import ollama_generate as og


class Response(io.BytesIO):
    """A stand-in for an open HTTP response whose reads can fail."""

    def __init__(self, data: bytes = b"", error: BaseException | None = None) -> None:
        super().__init__(data)
        self.error = error

    def readline(self, *args):
        if self.error:
            raise self.error
        return super().readline(*args)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (TimeoutError(), "Ollama at http://x:1 stopped answering for 5 s"),
        (ConnectionResetError(104, "Connection reset by peer"),
         "the connection to Ollama at http://x:1 dropped ([Errno 104] Connection reset by peer)"),
    ],
)
def test_a_stream_that_breaks_after_the_headers_is_retried_then_reported(monkeypatch, error, message):
    client = og.OllamaClient("http://x:1", timeout=5, retries=2)
    opened = []
    monkeypatch.setattr(client, "_open",
                        lambda method, path, *a, **k: opened.append(path) or Response(error=error))
    with pytest.raises(og.TransientError) as caught:
        client.generate("m", "p", options={})
    assert str(caught.value) == f"{message} (gave up after 3 attempts)"
    assert opened == ["/api/version"] + ["/api/generate"] * 3  # the version is asked once, not retried


def test_json_that_is_not_an_object_is_a_bad_answer(monkeypatch):
    client = og.OllamaClient("http://x:1", retries=0)
    monkeypatch.setattr(client, "_open", lambda *a, **k: Response(b'["done"]\n'))
    with pytest.raises(og.TransientError, match=r"^Ollama at http://x:1 sent unexpected JSON: \['done'\]$"):
        client.generate("m", "p", options={})


def test_the_final_piece_of_text_is_kept_and_metrics_read(monkeypatch):
    lines = (b'{"response":"A ","done":false}\n\n'
             b'{"response":"fox.","done":true,"done_reason":"stop","eval_count":7,"load_duration":9}\n')
    client = og.OllamaClient("http://x:1")
    monkeypatch.setattr(client, "_open", lambda *a, **k: Response(lines))
    answer = client.generate("m", "p", options={})
    assert (answer.text, answer.done_reason, answer.eval_count, answer.load_duration) == ("A fox.", "stop", 7, 9)
    assert answer.prompt_eval_count == 0  # omitted metrics count as 0


def test_show_is_retried_on_server_errors(ollama, monkeypatch):
    client = og.OllamaClient(ollama.url)
    real = client._call
    failures = [og.TransientError("HTTP 500")]

    def flaky(*args):
        if failures:
            raise failures.pop()
        return real(*args)

    monkeypatch.setattr(client, "_call", flaky)
    assert "vision" in client.show("qwen3-vl:32b")["capabilities"]
    assert failures == []
    assert len(ollama.requests_to("/api/show")) == 1


def test_a_plain_404_page_means_the_url_is_not_ollama(ollama, capsys):
    code = og.main(["prompt", "x", "--host", ollama.url + "/not-ollama"])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"ollama-generate: error: {ollama.url}/not-ollama has no Ollama API (HTTP 404: 404 page not found)",
        "ollama-generate: hint: check OLLAMA_HOST (or --host): it should be the Ollama server's base URL, "
        "like http://localhost:11434",
    ]


def test_a_broken_template_stops_a_folder_run_before_any_model_call(ollama, capsys, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in og.TEMPLATE_FIELDS:
        text = og.load_template(name)[1]
        (prompts / f"{name}.txt").write_text(text.replace("$description", "$desc"))
    monkeypatch.setattr(og, "template_dirs", lambda: [str(prompts)])
    dataset = tmp_path / "set"
    dataset.mkdir()
    for seed in range(3):
        (dataset / f"{seed}.png").write_bytes(png_bytes(seed=seed))
    code = og.main(["caption", str(dataset)])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err == (f"ollama-generate: error: template {prompts / 'caption_training.txt'} "
                   "is missing $description; uses unknown $desc\n"
                   "ollama-generate: hint: caption_training.txt takes $description\n")
    assert ollama.requests == []


def test_debug_reraises_bugs_and_interrupts(monkeypatch):
    monkeypatch.setenv("OLLAMA_GENERATE_DEBUG", "1")

    def broken(config, args):
        """A command with a bug."""
        raise ZeroDivisionError

    monkeypatch.setattr(og, "cmd_lore", broken)
    with pytest.raises(ZeroDivisionError):
        og.main(["lore", "x"])

    def interrupted(config, args):
        """A command the user interrupts."""
        raise KeyboardInterrupt

    monkeypatch.setattr(og, "cmd_lore", interrupted)
    with pytest.raises(KeyboardInterrupt):
        og.main(["lore", "x"])


def test_broken_pipe_redirects_stdout_and_exits_0(monkeypatch):
    class ClosedPipe:
        encoding = "utf-8"

        def write(self, text):
            raise BrokenPipeError

        def flush(self):
            pass

        def fileno(self):
            return 1

    def lore(config, args):
        """A command that prints text."""
        return og.Product("text", {})

    moved = []
    monkeypatch.setattr(og, "cmd_lore", lore)
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    monkeypatch.setattr(og.os, "dup2", lambda src, dst: moved.append(dst))
    assert og.main(["lore", "x"]) == 0
    assert moved == [1]


@pytest.mark.parametrize(
    ("reason", "kind", "message"),
    [
        (TimeoutError(), og.ServerTimeout, "Ollama at http://x:1 did not answer within 7 s"),
        (ConnectionResetError(104, "reset"), og.TransientError,
         "the connection to Ollama at http://x:1 dropped ([Errno 104] reset)"),
        (ConnectionRefusedError(111, "Connection refused"), og.ServerUnreachable,
         "cannot connect to Ollama at http://x:1 (Connection refused)"),
    ],
)
def test_connection_failures_become_typed_errors(monkeypatch, reason, kind, message):
    import urllib.error

    class Opener:
        def open(self, request, timeout):
            raise urllib.error.URLError(reason)

    monkeypatch.setattr(og.OllamaClient, "_opener", lambda self: Opener())
    client = og.OllamaClient("http://x:1", timeout=7, retries=0)
    with pytest.raises(kind) as caught:
        client.generate("m", "p", options={})
    assert type(caught.value) is kind
    assert str(caught.value) == message


def test_an_image_that_vanishes_after_the_check_fails_cleanly(tmp_path):
    with pytest.raises(og.ImageError, match=r"^cannot read the file \(No such file or directory\)$"):
        og.read_image(str(tmp_path / "gone.png"))


def test_a_folder_that_cannot_be_listed_is_a_usage_error(tmp_path):
    path = tmp_path / "file.png"
    path.write_bytes(b"x")
    with pytest.raises(og.UsageError, match=r"^cannot read the folder .*file\.png \(Not a directory\)$"):
        og.find_images(str(path))


def test_product_is_written_as_utf8_on_an_ascii_stdout(monkeypatch):
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stream)
    og.write_product("caf\u00e9 \u2603")
    assert raw.getvalue() == "caf\u00e9 \u2603\n".encode()


def test_threads_asking_the_version_at_once_all_get_the_one_answer(monkeypatch):
    # The version decides the shift field, which must be the same on every request of a run: a
    # first ask that fails must not race a second that succeeds.
    import threading
    import time

    client = og.OllamaClient("http://127.0.0.1:9")
    asked = []

    def call(method, path, body=None):
        asked.append(path)
        if len(asked) == 1:
            time.sleep(0.3)
            raise og.ServerUnreachable("gone for a moment")
        return {"version": "0.13.0"}

    monkeypatch.setattr(client, "_call", call)
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(client.runner_fields())) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(5)
    assert seen[0] == seen[1] and asked == ["/api/version"]
