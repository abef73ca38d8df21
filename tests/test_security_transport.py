"""Issue 9, transport side: the API key never leaves for another address and is never shown,
servers that fail or are not Ollama are named in one line and left out, reads are bounded, and
the command line refuses values and flags that make no sense."""

from __future__ import annotations

import base64
import json
import re

import pytest
from cli import run, run_exit
from traced import make_images, tag_of

import ollama_generate as og

KEY = "sk-test-0123456789abcdef"
HINT_HOST = ("ollama-generate: hint: check OLLAMA_HOST (or --host): it should be the Ollama server's "
             "base URL, like http://localhost:11434")
# A training caption in range (50-150 words), so no caption is asked twice.
CAPTION = "A small square test picture numbered {tag} " + " ".join(f"detail{n}" for n in range(50)) + "."
NAMES = [f"{n}.png" for n in "abcdef"]


def answer(rec) -> str:
    """The vision answer names its image; the caption names the description it was given."""
    if rec.path == "/api/chat":
        return f"Picture {tag_of(base64.b64decode(rec.body['messages'][1]['images'][0]))} seen."
    found = re.search(r"Picture ([0-9a-f]{12}) seen\.", rec.body.get("prompt", ""))
    return CAPTION.format(tag=found.group(1) if found else "none")


def serve(make_ollama, **kwargs):
    server = make_ollama(**kwargs)
    server.default_text = answer
    return server


def image_of(rec) -> str:
    return tag_of(base64.b64decode(rec.body["messages"][1]["images"][0]))


def written(dataset, names):
    return all((dataset / name).with_suffix(".txt").read_text()
               == CAPTION.format(tag=tag_of((dataset / name).read_bytes())) + "\n" for name in names)


# -- 1. redirects never carry the key to another address -------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_port_never_carries_the_key(make_ollama, capsys, monkeypatch, status):
    trap = make_ollama()
    front = make_ollama()
    front.redirect(trap.url, status=status)
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    code, out, err = run(capsys, "prompt", "a fox", "--host", front.url)
    assert (code, out) == (1, "")
    assert trap.requests == []
    assert err.splitlines() == [
        f"ollama-generate: error: {front.url} redirected the request to {trap.url}/api/generate: redirects "
        "are followed only to the same scheme, host and port, so the API key never goes elsewhere",
        "ollama-generate: hint: set OLLAMA_HOST (or --host) to the address the server redirects to",
    ]
    assert [(r.method, r.path) for r in front.requests] == [("GET", "/api/version"),
                                                          ("POST", "/api/generate")]  # not retried


def test_doctor_sends_nothing_to_the_address_a_redirect_names(make_ollama, capsys, monkeypatch):
    trap = make_ollama()
    front = make_ollama()
    front.redirect(trap.url)
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    code, out, err = run(capsys, "doctor", "--host", front.url)
    assert code == 1
    assert trap.requests == []
    assert f"FAIL  server: {front.url} redirected the request to {trap.url}/api/ps: redirects" in out
    assert KEY not in out + err


def test_a_redirect_on_the_same_server_is_followed_with_the_key(make_ollama, capsys, monkeypatch):
    server = make_ollama()
    server.redirect(server.url, status=307, strip="/old", paths=["/old/api/generate"])
    server.reply("A fox in the snow.")
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    assert run(capsys, "prompt", "a fox", "--host", server.url + "/old") == (0, "A fox in the snow.\n", "")
    version, models, moved, answered = server.requests
    assert version.path == "/old/api/version"  # not found there: shift is left out
    assert models.path == "/old/v1/models"  # not found either: not an OpenAI-compatible server
    assert (moved.method, moved.path, answered.method, answered.path) == (
        "POST", "/old/api/generate", "POST", "/api/generate")
    assert answered.body == moved.body
    assert answered.headers["authorization"] == f"Bearer {KEY}"


def test_a_get_redirected_on_the_same_server_is_followed(make_ollama):
    server = make_ollama()
    server.redirect(server.url, status=302, strip="/old", paths=["/old/api/tags"])
    client = og.OllamaClient(server.url + "/old")
    assert {model["name"] for model in client.tags()} == set(server.models)
    assert [r.path for r in server.requests] == ["/old/api/tags", "/api/tags"]


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_post_is_never_turned_into_a_get(make_ollama, capsys, monkeypatch, status):
    server = make_ollama()
    server.redirect(server.url, status=status, strip="/old", paths=["/old/api/generate"])
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    code, out, err = run(capsys, "prompt", "a fox", "--host", server.url + "/old")
    assert (code, out) == (1, "")
    assert err.splitlines()[0] == (
        f"ollama-generate: error: {server.url}/old redirected a POST with HTTP {status} to "
        f"{server.url}/api/generate, which would turn it into a GET: not followed")
    # The version, the OpenAI-compatible model list (both not found: --api auto keeps Ollama), the prompt.
    assert [r.method for r in server.requests] == ["GET", "GET", "POST"]


def test_a_redirect_loop_or_one_without_an_address_is_one_error(make_ollama):
    server = make_ollama()
    server.redirect(server.url, status=302, paths=["/api/tags"])
    with pytest.raises(og.OllamaError) as caught:
        og.OllamaClient(server.url).tags()
    assert str(caught.value) == f"{server.url} redirected the request to {server.url}/api/tags in a loop"
    server.fail_paths(["/api/tags"], status=302, body=b"")
    with pytest.raises(og.OllamaError) as caught:
        og.OllamaClient(server.url).tags()
    assert str(caught.value) == f"{server.url} answered HTTP 302, a redirect without a Location"


# -- 2. a key that cannot be a header -----------------------------------------------------------


def test_a_key_with_a_line_end_is_stripped_and_sent(ollama, capsys, monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEY", f"  {KEY}\r\n")
    ollama.reply("A fox.")
    assert run(capsys, "prompt", "a fox") == (0, "A fox.\n", "")
    assert ollama.requests[0].headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("key", [f"sk-te\rst-{KEY}", f"{KEY}\x1b[0m", f"sk-\u00e9t\u00e9-{KEY}",
                                 f"{KEY}\nsecond-line"])
def test_a_key_that_cannot_be_a_header_is_refused_without_showing_it(ollama, capsys, monkeypatch, key):
    monkeypatch.setenv("OLLAMA_API_KEY", key)
    code, out, err = run(capsys, "prompt", "a fox", "--json")
    assert code == 2
    assert err.splitlines() == [
        "ollama-generate: error: OLLAMA_API_KEY contains control or non-ASCII characters, so it cannot "
        "be sent (the key is not shown)",
        "ollama-generate: hint: set it to the key alone, on one line; a key file saved with Windows line "
        "endings or pasted from a document often adds such characters",
    ]
    assert json.loads(out)["exit_code"] == 2
    assert KEY not in out + err and "sk-te" not in out + err
    assert ollama.requests == []


# -- 3. what a server echoes is redacted --------------------------------------------------------


@pytest.mark.strict_ranges
def test_an_echoed_key_is_redacted_from_stderr_report_and_json(make_ollama, capsys, tmp_path, monkeypatch):
    server = serve(make_ollama)
    server.echo_headers(status=400, paths=["/api/chat"])
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    dataset = make_images(tmp_path / "set", NAMES[:2])
    report = tmp_path / "report.json"
    code, out, err = run(capsys, "caption", dataset, "--host", server.url, "--report", report, "--json")
    assert code == 1
    assert len(server.requests_to("/api/chat")) == 2  # echoed, and seen: the test shows a real leak
    for text in (out, err, report.read_text()):
        assert KEY not in text
        assert "Authorization: Bearer [redacted]" in text
    reason = json.loads(out)["failed"][0]["reason"]
    assert reason.startswith(f"Ollama at {server.url} refused the request (HTTP 400): rejected request with "
                             "headers ")
    assert "Authorization: Bearer [redacted]" in reason
    assert json.loads(report.read_text())["failed"][0]["reason"] == reason


def test_an_echoed_key_is_redacted_from_an_error_and_its_json_document(ollama, capsys, monkeypatch):
    ollama.echo_headers(status=500, paths=["/api/generate"])
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    code, out, err = run(capsys, "prompt", "a fox", "--json")
    assert code == 1
    assert KEY not in out + err
    document = json.loads(out)
    assert document["error"].startswith(f"Ollama at {ollama.url} answered HTTP 500: rejected request")
    assert "Authorization: Bearer [redacted]" in document["error"]
    assert err.splitlines() == [f"ollama-generate: error: {document['error']}"]


def test_other_credentials_in_server_text_are_redacted(ollama, capsys):
    ollama.fail_paths(["/api/generate"], status=400,
                      error="upstream said no to Authorization: Bearer upstream-999 (x-api-key: abc123)")
    code, out, err = run(capsys, "prompt", "a fox")
    assert (code, out) == (1, "")
    assert err == (f"ollama-generate: error: Ollama at {ollama.url} refused the request (HTTP 400): upstream "
                   "said no to Authorization: Bearer [redacted] (x-api-key: [redacted])\n")


# -- 10. failover, and the circuit breaker ------------------------------------------------------

FOREVER = {
    "500": {"status": 500},
    "mid-stream": {"text": "A partial answer that breaks off", "mid_stream": True},
    "half-stream": {"text": "A partial answer that ends early", "fault": "eof"},
}


@pytest.mark.strict_ranges
@pytest.mark.parametrize("how", list(FOREVER))
def test_a_host_that_fails_every_request_is_left_out_and_no_image_fails(make_ollama, capsys, tmp_path, how):
    good = serve(make_ollama, request_time=0.05)
    bad = serve(make_ollama)
    bad.fail_forever(**FOREVER[how])
    dataset = make_images(tmp_path / "set", NAMES)
    code, out, err = run(capsys, "caption", dataset, "--host", bad.url, "--host", good.url,
                         "--report", tmp_path / "r.json")
    assert (code, out) == (0, "")
    assert written(dataset, NAMES)
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["written"], report["failed"]) == (6, [])
    dropped = report["hosts"][0]["dropped"]
    assert dropped.startswith(f"failed {og.HOST_FAILURE_LIMIT} images in a row, the last with: ")
    assert dropped.endswith(f"(gave up after {og.RETRIES + 1} attempts)")
    assert report["hosts"][1]["dropped"] is None
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [f"ollama-generate: warning: leaving out {bad.url} for the rest of the run: {dropped}"]
    # Five images failed there in a row (in either stage), each after its retries; then it was left out.
    assert len(bad.generation_requests()) == og.HOST_FAILURE_LIMIT * (og.RETRIES + 1)


@pytest.mark.strict_ranges
def test_an_image_fails_only_after_every_live_host_failed_it(make_ollama, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", NAMES[:4])
    broken = tag_of((dataset / "a.png").read_bytes())
    servers = [serve(make_ollama), serve(make_ollama)]

    def refuse_a(h, rec):
        if image_of(rec) != broken:
            return False
        h.send_json(500, {"error": "runner crashed on this image"})
        return True

    for server in servers:
        server.misbehave(refuse_a, ["/api/chat"])
    code, out, err = run(capsys, "caption", dataset, "--host", servers[0].url, "--host", servers[1].url,
                         "--report", tmp_path / "r.json")
    assert (code, out) == (1, "")
    assert written(dataset, NAMES[1:4])
    report = json.loads((tmp_path / "r.json").read_text())
    assert [f["image"] for f in report["failed"]] == ["a.png"]
    assert [host["dropped"] for host in report["hosts"]] == [None, None]
    for server in servers:  # each live host tried it, with its retries, before it failed
        assert [image_of(r) for r in server.requests_to("/api/chat")].count(broken) == og.RETRIES + 1
    assert "warning" not in err


def test_an_image_one_host_failed_fails_when_the_other_host_leaves():
    # Engine level: b fails x and hands it to a; a leaves before it gets to x; x has then
    # failed on every host left, and fails without being sent to b again.
    import threading
    from types import SimpleNamespace

    x_failed = threading.Event()
    tries = []

    def step(client, job):
        tries.append((client.host, job.name))
        if client.host == "a":
            x_failed.wait(2)
            raise og.ServerUnreachable("a went away")
        if job.name == "x":
            x_failed.set()
            raise og.TransientError("x broke on b")
        job.status = "written"

    hosts = [og.Host(SimpleNamespace(host=name, tally=lambda: (0, 0, 0))) for name in "ab"]
    jobs = [og.Job(name, name, name + ".txt") for name in "yx"]
    og.run_stage(hosts, jobs, [og.Stage("text", "pending", "m", step)], progress=og.Progress(2, mode="quiet"))
    assert [(job.name, job.status, job.reason) for job in jobs] == [
        ("y", "written", ""), ("x", "failed", "x broke on b")]
    assert tries.count(("b", "x")) == 1
    assert (hosts[0].dropped, hosts[1].dropped) == ("a went away", "")


@pytest.mark.strict_ranges
@pytest.mark.parametrize("how", ["500", "html"])
def test_a_second_host_failing_show_at_start_is_left_out(make_ollama, capsys, tmp_path, how):
    good = serve(make_ollama)
    bad = serve(make_ollama)
    if how == "html":
        bad.html_pages()
        reason = f"{bad.url} answered HTTP 501 with an HTML page: is this an Ollama server?"
    else:
        bad.fail_paths(["/api/show"], status=500, error="failed to load manifest")
        reason = (f"Ollama at {bad.url} answered HTTP 500: failed to load manifest "
                  f"(gave up after {og.RETRIES + 1} attempts)")
    dataset = make_images(tmp_path / "set", NAMES[:2])
    code, out, err = run(capsys, "caption", dataset, "--host", good.url, "--host", bad.url)
    assert (code, out) == (0, "")
    assert err.splitlines()[0] == f"ollama-generate: warning: leaving out {bad.url}: {reason}"
    assert written(dataset, NAMES[:2])
    assert bad.requests_to("/api/chat") == []


def test_one_host_failing_every_request_trips_the_circuit_breaker(make_ollama, capsys, tmp_path):
    server = serve(make_ollama)
    server.fail_forever(status=500)
    dataset = make_images(tmp_path / "set", [f"{n:02d}.png" for n in range(40)])
    code, out, err = run(capsys, "caption", dataset, "--host", server.url, "--report", tmp_path / "r.json")
    assert (code, out) == (1, "")
    # Five images cost their retries; the other 35 are never sent.
    assert len(server.requests_to("/api/chat")) == og.HOST_FAILURE_LIMIT * (og.RETRIES + 1)
    lines = err.splitlines()
    assert lines[-2] == (
        f"ollama-generate: error: no Ollama server is left to work on ({server.url}: failed "
        f"{og.HOST_FAILURE_LIMIT} images in a row, the last with: Ollama at {server.url} answered HTTP 500: "
        "model runner has unexpectedly stopped, this may be due to resource limitations or an internal "
        f"error, check ollama server logs for details (gave up after {og.RETRIES + 1} attempts))")
    assert lines[-1] == ("ollama-generate: hint: check the server's log (`journalctl -u ollama`, or the "
                         "terminal running `ollama serve`), then rerun the same command: finished work "
                         "is kept")
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["interrupted"], len(report["failed"]), report["not_reached"]) == (True, 4, 36)
    assert "Stopped after " in err


# -- 11. a web server that is not Ollama --------------------------------------------------------


def test_a_plain_web_server_is_named_in_one_line_without_retries(make_ollama, capsys, tmp_path):
    web = make_ollama()
    web.html_pages()
    code, out, err = run(capsys, "prompt", "a fox", "--host", web.url)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"ollama-generate: error: {web.url} answered HTTP 501 with an HTML page: is this an Ollama server?",
        HINT_HOST]
    assert [r.path for r in web.requests] == ["/api/version", "/v1/models", "/api/generate"]

    dataset = make_images(tmp_path / "set", NAMES[:1])
    code, out, err = run(capsys, "caption", dataset, "--host", web.url)
    assert (code, out) == (1, "")
    assert err.splitlines()[0] == (
        f"ollama-generate: error: {web.url} answered HTTP 501 with an HTML page: is this an Ollama server?")
    assert len(web.requests) == 6  # the first server's two looks and three /api/show tries, then this one's

    code, out, err = run(capsys, "doctor", "--host", web.url)
    assert code == 1
    assert (f"FAIL  server: {web.url} answered HTTP 404 with an HTML page: is this an Ollama server?"
            in out.splitlines())


@pytest.mark.parametrize(("status", "tries"), [(400, 1), (401, 1), (403, 1), (405, 1), (413, 1), (408, 4),
                                               (429, 4), (500, 4), (501, 1), (502, 4), (505, 1)])
def test_only_timeouts_rate_limits_and_server_errors_are_retried(ollama, capsys, status, tries):
    ollama.fail_paths(["/api/generate"], status=status, error="no")
    code, out, _err = run(capsys, "prompt", "a fox")
    assert (code, out) == (1, "")
    assert len(ollama.requests_to("/api/generate")) == tries


@pytest.mark.parametrize("how", ["text", "json", "mid-stream"])
def test_error_bodies_are_cut_to_a_short_excerpt(ollama, capsys, how):
    long = "word " * 1025 + "\n<end>"  # 5,131 characters over two lines
    if how == "text":
        ollama.fail_paths(["/api/generate"], status=400, body=long.encode())
    elif how == "json":
        ollama.fail_paths(["/api/generate"], status=400, error=long)
    else:
        ollama.fail_forever(text="A partial answer", mid_stream=True, error=long)
    code, out, err = run(capsys, "prompt", "a fox", "--json")
    assert code == 1
    message = json.loads(out)["error"]
    assert "\n" not in message and len(message) < 350
    assert ("word " * 40).strip() in message and "<end>" not in message
    assert err.splitlines()[0] == f"ollama-generate: error: {message}"


# -- 15. numeric flags have ranges --------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["prompt", "x", "--timeout", "inf"], "argument --timeout: expected a number of seconds, got 'inf'"),
    (["prompt", "x", "--timeout", "nan"], "argument --timeout: expected a number of seconds, got 'nan'"),
    (["prompt", "x", "--timeout", "1e9"], "argument --timeout: must be at most 86400, got '1e9'"),
    (["caption", "d", "--jobs", "100000"], "argument -j/--jobs: must be at most 64, got '100000'"),
    (["caption", "d", "--jobs", "0"], "argument -j/--jobs: must be 1 or more, got '0'"),
    (["prompt", "x", "--temperature", "inf"], "argument --temperature: expected a number, got 'inf'"),
    (["prompt", "x", "--temperature", "3"], "argument --temperature: must be at most 2, got '3'"),
    (["prompt", "x", "--seed", "-1"], "argument --seed: must be 0 or more, got '-1'"),
    (["prompt", "x", "--seed", "4294967296"],
     "argument --seed: must be at most 4294967295, got '4294967296'"),
    (["prompt", "x", "--num-ctx", "99999999"], "argument --num-ctx: must be at most 1048576, got '99999999'"),
    (["prompt", "x", "--max-tokens", "99999999"],
     "argument --max-tokens: must be at most 1048576, got '99999999'"),
    (["--timeout", "inf", "prompt", "x"], "argument --timeout: expected a number of seconds, got 'inf'"),
])
def test_absurd_numbers_are_usage_errors(capsys, argv, message):
    code, out, err = run_exit(capsys, *argv)
    assert (code, out) == (2, "")
    command = next(word for word in argv if word in og.COMMANDS)
    assert err.splitlines() == [f"ollama-generate: error: {message}",
                                f"ollama-generate: hint: see `ollama-generate {command} --help`"]


def test_the_ranges_are_in_help(capsys):
    shown = " ".join(run_exit(capsys, "caption", "--help")[1].split())
    for text in ("(default 300), at most 86400", "each server, 1-64, per stage", "writing model, 0-2",
                 "random seed, 0-4294967295", "request, 1-1048576 (default 8192;", "in tokens, 1-1048576"):
        assert text in shown


def test_the_largest_values_are_accepted(ollama, capsys, tmp_path):
    ollama.reply("A fox.")
    assert run(capsys, "prompt", "x", "--timeout", "86400", "--temperature", "2", "--seed", "4294967295",
               "--num-ctx", "1048576", "--max-tokens", "1048576") == (0, "A fox.\n", "")
    make_images(tmp_path / "set", NAMES[:1])
    assert run(capsys, "caption", tmp_path / "set", "--jobs", "64", "--dry-run")[0] == 0


# -- 16. bounded reads from the network ---------------------------------------------------------


def test_a_line_without_an_end_is_not_read_whole(ollama, capsys, monkeypatch):
    monkeypatch.setattr(og, "LINE_LIMIT", 1024 * 1024)
    ollama.huge_line(8 * 1024 * 1024)
    code, out, err = run(capsys, "prompt", "a fox")
    assert (code, out) == (1, "")
    assert err == (f"ollama-generate: error: Ollama at {ollama.url} sent a line longer than 1 MB; it was not "
                   f"read further (gave up after {og.RETRIES + 1} attempts)\n")


def test_a_metadata_answer_is_bounded(ollama, capsys, tmp_path, monkeypatch, tiny_png):
    monkeypatch.setattr(og, "LINE_LIMIT", 1024 * 1024)
    ollama.huge_line(8 * 1024 * 1024, paths=["/api/show"])
    (tmp_path / "a.png").write_bytes(tiny_png)
    code, out, err = run(capsys, "caption", tmp_path / "a.png")
    assert (code, out) == (1, "")
    assert err == (f"ollama-generate: error: Ollama at {ollama.url} sent an answer longer than 1 MB; it was "
                   f"not read further (gave up after {og.RETRIES + 1} attempts)\n")


def test_a_long_valid_line_is_read(ollama, capsys):
    # The final line of /api/generate carries the context's token ids: it can be long.
    ollama.reply("A fox.", final_fields={"context": list(range(200_000))})
    assert run(capsys, "prompt", "a fox") == (0, "A fox.\n", "")


# -- 21. one speed, live and in the summary -----------------------------------------------------


def test_the_live_line_and_the_summary_count_speed_the_same_way(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(og.time, "monotonic", lambda: clock[0])
    progress = og.Progress(4, mode="quiet")
    progress.stage("vision", 4)
    jobs = [og.Job(f"set/{n}.png", f"{n}.png", f"set/{n}.txt", status="described") for n in "abcd"]
    for job in jobs:
        progress.advance(job)  # four fast vision steps: nothing is finished yet
    clock[0] = 1030.0
    assert progress.line().endswith("| 0.0 written/min | ETA 30.0s")
    progress.stage("text", 4)
    for job in jobs[:3]:
        job.status = "written"
        progress.advance(job)
    clock[0] = 1090.0  # three captions in a minute and a half
    report = og.Report(folder="set", jobs=jobs, seconds=90.0)
    shown = progress.line().split(" | ")[2]
    assert shown == f"{report.images_per_minute:.1f} written/min" == "2.0 written/min"


# -- 22. flags that do not belong to a command ---------------------------------------------------


@pytest.mark.parametrize("command", ["doctor", "models", "templates"])
@pytest.mark.parametrize("flag", [["--temperature", "0.5"], ["--seed", "1"], ["--max-tokens", "9"],
                                  ["--num-ctx", "4096"]])
def test_generation_options_are_refused_where_nothing_is_generated(capsys, command, flag):
    code, out, err = run_exit(capsys, command, *flag)
    assert (code, out) == (2, "")
    error, hint = err.splitlines()
    refused = flag[:1] if command == "templates" else flag  # templates takes the value as its NAME
    assert error == f"ollama-generate: error: unrecognized arguments: {' '.join(refused)}"
    assert hint == f"ollama-generate: hint: see `ollama-generate {command} --help`"
    code, out, err = run_exit(capsys, *flag, command)
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"ollama-generate: error: {flag[0]} does not apply to {command}: only caption, prompt, enhance, "
        "describe and lore generate text",
        f"ollama-generate: hint: see `ollama-generate {command} --help`"]


def test_generation_options_before_a_generating_command_still_work(ollama, capsys):
    ollama.reply("A fox.")
    assert run(capsys, "--temperature", "0", "--seed", "3", "prompt", "x") == (0, "A fox.\n", "")
    assert ollama.requests_to("/api/generate")[0].body["options"]["seed"] == 3


@pytest.mark.parametrize("argv", [["prompt", "x", "--styel", "tags"], ["caption", "x.png", "--recursve"],
                                  ["--json", "lore", "x", "--lenght", "short"]])
def test_a_mistyped_flag_points_at_the_commands_help(capsys, argv):
    command = next(word for word in argv if not word.startswith("-"))
    code, out, err = run_exit(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.splitlines()[1] == f"ollama-generate: hint: see `ollama-generate {command} --help`"


def test_templates_flags_a_broken_override(capsys, tmp_path):
    (tmp_path / "caption_tags.txt").write_text("Tags for $desc.\n")
    (tmp_path / "lore.txt").write_text("A $words word story about $scenario.\n")
    code, out, err = run(capsys, "templates", "--prompts-dir", tmp_path)
    assert code == 1
    lines = {line.split()[0]: line for line in out.split("\n\n")[0].splitlines()}
    assert lines["caption_tags"].endswith("  override (BROKEN)")
    assert lines["lore"].endswith("  override")
    assert lines["prompt_t5"].endswith("  built-in")
    assert err.splitlines() == [
        "ollama-generate: error: 1 template override cannot be used: template "
        f"{tmp_path / 'caption_tags.txt'} is missing $description; uses unknown $desc",
        "ollama-generate: hint: fix the placeholders, or remove the file to use the built-in template",
    ]
    code, out, err = run(capsys, "templates", "--prompts-dir", tmp_path, "--json")
    rows = {row["name"]: row for row in json.loads(out)["templates"]}
    assert rows["caption_tags"]["problem"].endswith("is missing $description; uses unknown $desc")
    assert rows["lore"]["problem"] is None
