"""The text actions end to end against the fake server: what we send and what we print."""

from __future__ import annotations

import io

import pytest
from cli import run, run_exit

import ollama_generate as og


def only_generation(ollama):
    requests = ollama.generation_requests()
    assert len(requests) == 1
    return requests[0]


def test_prompt_sends_one_streamed_generate_and_prints_only_the_prompt(ollama, capsys):
    ollama.reply("Sure! Here is your prompt:\n\"A lighthouse on a cliff in a storm.\"\nLet me know!")
    code, out, err = run(capsys, "prompt", "a lighthouse in a storm")
    assert (code, out, err) == (0, "A lighthouse on a cliff in a storm.\n", "")
    request = only_generation(ollama)
    assert request.path == "/api/generate"
    body = request.body
    assert body["model"] == "qwen3-30b-a3b:latest"
    assert body["stream"] is True
    assert body["think"] is False
    assert body["options"] == {"temperature": 0.7, "num_predict": 400, "num_ctx": 8192}
    assert "a lighthouse in a storm" in body["prompt"]
    assert body["prompt"].endswith("\n/no_think")
    expected = og.render("prompt_t5", concept="a lighthouse in a storm")
    assert body["prompt"] == expected + "\n/no_think"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == f"ollama-generate/{og.__version__}"


def test_prompt_clip_uses_the_clip_template_and_prints_tags(ollama, capsys):
    ollama.reply("lighthouse, storm, cliff,\nwaves, Storm.")
    code, out, err = run(capsys, "prompt", "a lighthouse", "--encoder", "clip")
    assert (code, out, err) == (0, "lighthouse, storm, cliff, waves\n", "")
    assert only_generation(ollama).body["prompt"].startswith(og.render("prompt_clip", concept="a lighthouse"))


def test_prompt_reads_stdin_for_dash(ollama, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a fox in snow\n"))
    ollama.reply("A fox in snow.")
    assert run(capsys, "prompt", "-") == (0, "A fox in snow.\n", "")
    assert "a fox in snow" in only_generation(ollama).body["prompt"]


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_concept_is_a_usage_error(ollama, capsys, value):
    code, out, err = run(capsys, "prompt", value)
    assert (code, out) == (2, "")
    assert err == "ollama-generate: error: the concept is empty; give the concept to work on\n"
    assert ollama.requests == []


def test_empty_stdin_is_a_usage_error(ollama, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, out, err = run(capsys, "enhance", "-")
    assert (code, out) == (2, "")
    assert err == "ollama-generate: error: standard input is empty; give the prompt to work on\n"


@pytest.mark.parametrize(("intensity", "temperature"), [("mild", 0.4), ("moderate", 0.7), ("extreme", 0.9)])
def test_enhance_intensity_picks_template_and_temperature(ollama, capsys, intensity, temperature):
    ollama.reply("A cat on a velvet sofa in warm lamplight.")
    code, out, err = run(capsys, "enhance", "a cat on a sofa", "--intensity", intensity)
    assert (code, out, err) == (0, "A cat on a velvet sofa in warm lamplight.\n", "")
    body = only_generation(ollama).body
    assert body["prompt"] == og.render(f"enhance_{intensity}", prompt="a cat on a sofa") + "\n/no_think"
    assert body["options"]["temperature"] == temperature


def test_enhance_defaults_to_moderate(ollama, capsys):
    ollama.reply("x y z")
    run(capsys, "enhance", "a cat")
    assert only_generation(ollama).body["prompt"].startswith(og.render("enhance_moderate", prompt="a cat"))


def test_describe_keeps_markdown_and_fills_every_field(ollama, capsys):
    card = "Neon Noir is a style LoRA.\n\n## How to use\n- weight **0.8**"
    ollama.reply(f"<think>plan</think>Here is the model card:\n\n{card}\n\nI hope this helps!")
    code, out, err = run(capsys, "describe", "Neon Noir", "--type", "style", "--tags", "neon, rain")
    assert (code, out, err) == (0, "# Neon Noir\n\n" + card + "\n", "")
    body = only_generation(ollama).body
    assert body["prompt"] == og.render("describe", model_name="Neon Noir", lora_type="style",
                                       tags="neon, rain", dataset="none") + "\n/no_think"
    assert body["options"]["num_predict"] == 1500


def test_describe_without_tags_says_none(ollama, capsys):
    ollama.reply("A card.")
    run(capsys, "describe", "X", "--type", "character")
    assert "none" in only_generation(ollama).body["prompt"]


def test_describe_requires_type(ollama, capsys):
    code, out, err = run_exit(capsys, "describe", "X")
    assert (code, out) == (2, "")
    assert "the following arguments are required: --type" in err
    assert ollama.requests == []


@pytest.mark.parametrize(("length", "words", "num_predict"),
                         [("short", 150, 600), ("medium", 400, 1200), ("long", 900, 2400)])
def test_lore_length(ollama, capsys, length, words, num_predict):
    ollama.reply("The keeper climbed.\n\nThe lamp was cold.")
    code, out, err = run(capsys, "lore", "the last keeper", "--length", length)
    assert (code, out, err) == (0, "The keeper climbed.\n\nThe lamp was cold.\n", "")
    body = only_generation(ollama).body
    assert body["prompt"] == og.render("lore", scenario="the last keeper", words=words) + "\n/no_think"
    assert body["options"]["num_predict"] == num_predict


def test_lore_defaults_to_medium(ollama, capsys):
    ollama.reply("Text.")
    run(capsys, "lore", "x")
    assert "400" in only_generation(ollama).body["prompt"]



@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prompt", "x", "--encoder", "bert"], "argument --encoder: invalid choice: 'bert'"),
        (["enhance", "x", "--intensity", "wild"], "argument --intensity: invalid choice: 'wild'"),
        (["lore", "x", "--length", "epic"], "argument --length: invalid choice: 'epic'"),
        (["caption", "x.png", "--style", "poem"], "argument --style: invalid choice: 'poem'"),
        (["prompt", "x", "--timeout", "0"], "argument --timeout: must be more than 0, got '0'"),
        (["prompt", "x", "--timeout", "soon"], "argument --timeout: expected a number of seconds, got 'soon'"),
        (["paint", "x"], "argument COMMAND: invalid choice: 'paint'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_flags_exit_2_with_one_error_line_and_a_hint(capsys, argv, message):
    code, out, err = run_exit(capsys, *argv)
    assert (code, out) == (2, "")
    error, hint = err.splitlines()
    assert error.startswith(f"ollama-generate: error: {message}")
    command = f"ollama-generate {argv[0]}" if argv and argv[0] != "paint" else "ollama-generate"
    assert hint == f"ollama-generate: hint: see `{command} --help`"


def test_model_flag_and_environment(ollama, capsys, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODEL", "llama3.2")
    ollama.add_model("llama3.2:latest")
    ollama.add_model("mistral:latest")
    ollama.reply("A.")
    ollama.reply("B.")
    run(capsys, "prompt", "x")
    run(capsys, "prompt", "x", "-m", "mistral")
    first, second = ollama.generation_requests()
    assert first.body["model"] == "llama3.2"
    assert second.body["model"] == "mistral"
    # /no_think is a qwen3 convention only.
    assert "/no_think" not in first.body["prompt"]


def test_host_flag_before_or_after_the_command(make_ollama, capsys):
    server = make_ollama()
    server.reply("One.")
    server.reply("Two.")
    assert run(capsys, "--host", server.url, "prompt", "x")[:2] == (0, "One.\n")
    assert run(capsys, "prompt", "x", "--host", server.url)[:2] == (0, "Two.\n")
    assert len(server.generation_requests()) == 2


def test_version_flag(capsys):
    code, out, err = run_exit(capsys, "--version")
    assert (code, out) == (0, f"ollama-generate {og.__version__}\n")


def test_an_answer_cut_off_at_the_token_limit_warns(ollama, capsys):
    ollama.reply("The keeper climbed the stairs and", done_reason="length")
    code, out, err = run(capsys, "lore", "x")
    assert (code, out) == (0, "The keeper climbed the stairs and\n")
    assert err == "ollama-generate: warning: the answer reached the token limit and may end mid-sentence\n"


def test_describe_rejects_an_empty_type(ollama, capsys):
    code, out, err = run(capsys, "describe", "X", "--type", " ")
    assert (code, out) == (2, "")
    assert err == ("ollama-generate: error: --type is empty; say what kind of LoRA it is "
                   "(character, style, concept, ...)\n")
