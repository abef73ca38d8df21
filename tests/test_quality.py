"""Caption quality end to end: re-asks, needs-review flags, refusals, loops, tag rules, hints and
generation options, asserted on the exact requests sent to the fake server."""

from __future__ import annotations

import json

import pytest
from cli import run
from images import png_bytes

import ollama_generate as og

DESCRIPTION = "A woman in a red coat stands in a snowy park at dusk."
GOOD = " ".join(["A woman in a red coat stands in a snowy park at dusk"]
                + [f"detail{n}" for n in range(45)]) + "."  # 56 words


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes())
    return path


def text_prompts(fake):
    return [r.body["prompt"] for r in fake.requests_to("/api/generate") if r.body.get("prompt")]


def training_request(description=DESCRIPTION, hint=""):
    return og.with_hint(og.render("caption_training", description=description), hint)


@pytest.mark.strict_ranges
def test_a_short_caption_is_asked_again_with_the_reason(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("A woman in a red coat.", endpoint="/api/generate")
    ollama.reply(GOOD, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo)
    assert (code, out, err) == (0, GOOD + "\n", "")
    first, second = text_prompts(ollama)
    assert first == training_request() + "\n/no_think"
    assert second == og.render("reask", request=training_request(), answer="A woman in a red coat.",
                               problem="it has 6 words; a training caption has 50 to 150") + "\n/no_think"


@pytest.mark.strict_ranges
def test_still_out_of_range_is_written_and_flagged_for_review(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    report = tmp_path / "run.json"
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("A woman.", endpoint="/api/generate")
    ollama.reply("A woman in a coat.", endpoint="/api/generate")
    code, out, err = run(capsys, "caption", tmp_path, "--report", report)
    assert (code, out) == (0, "")
    assert (tmp_path / "a.txt").read_text() == "A woman in a coat.\n"
    assert "Needs review (1, written but out of range):\n  a.png: it has 5 words; a training caption has 50 to 150\n" in err
    assert json.loads(report.read_text())["needs_review"] == [
        {"image": "a.png", "reason": "it has 5 words; a training caption has 50 to 150"}]


@pytest.mark.strict_ranges
def test_detailed_captions_need_two_to_four_sentences(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("One sentence only.", endpoint="/api/generate")
    ollama.reply("First sentence. Second sentence.", endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--style", "detailed")
    assert (code, out, err) == (0, "First sentence. Second sentence.\n", "")
    assert "it has 1 sentences; a detailed caption has 2 to 4" in text_prompts(ollama)[1]


@pytest.mark.strict_ranges
def test_too_few_tags_are_asked_again_and_too_many_cut(ollama, capsys, photo):
    few = ", ".join(f"tag{n}" for n in range(5))
    many = ", ".join(f"tag{n}" for n in range(60))
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(few, endpoint="/api/generate")
    ollama.reply(many, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--style", "tags")
    assert code == 0
    assert out == ", ".join(f"tag{n}" for n in range(40)) + "\n"
    assert "it has 5 tags; it needs 20 to 40" in text_prompts(ollama)[1]


def test_a_refusal_is_asked_again_and_never_written(ollama, capsys, tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png_bytes(seed=len(name) + ord(name[0])))
    for _ in range(2):
        ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("I'm sorry, but I can't help with that.", endpoint="/api/generate")
    ollama.reply("As an AI, I cannot write this caption.", endpoint="/api/generate")
    ollama.reply("I apologize, but I won't do that.", endpoint="/api/generate")
    ollama.reply("A woman in a red coat.", endpoint="/api/generate")
    code, out, err = run(capsys, "caption", tmp_path)
    assert code == 1
    assert not (tmp_path / "a.txt").exists()
    assert (tmp_path / "b.txt").read_text() == "A woman in a red coat.\n"
    assert "a.png: failed: the text model refused or gave no usable caption, twice" in err
    reask = text_prompts(ollama)[1]
    assert reask == og.render("reask", request=training_request(),
                              answer="I'm sorry, but I can't help with that.",
                              problem="refused or gave no usable caption") + "\n/no_think"


def test_a_vision_refusal_is_asked_again_in_the_same_chat(ollama, capsys, photo):
    ollama.reply("I'm sorry, I can't describe people.", endpoint="/api/chat")
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("A woman in a red coat.", endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo)
    assert (code, out, err) == (0, "A woman in a red coat.\n", "")
    first, second = [r.body for r in ollama.requests_to("/api/chat")]
    assert second["messages"][:2] == first["messages"]
    assert second["messages"][2:] == [
        {"role": "assistant", "content": "I'm sorry, I can't describe people."},
        {"role": "user", "content": og.render("reask_vision", problem="refused to describe the image")
         + "\n/no_think"},
    ]
    assert text_prompts(ollama)[0] == training_request() + "\n/no_think"


def test_a_vision_refusal_twice_fails_the_image(ollama, capsys, photo):
    for _ in range(2):
        ollama.reply("As an AI, I cannot look at images.", endpoint="/api/chat")
    code, out, err = run(capsys, "caption", photo)
    assert (code, out) == (1, "")
    assert err == "ollama-generate: error: the vision model qwen3-vl:32b refused to describe the image, twice\n"
    assert text_prompts(ollama) == []


def test_a_looping_description_is_retried_with_a_repeat_penalty(ollama, capsys, photo):
    loop = "A cat sits on a mat. " * 8
    ollama.reply(loop, endpoint="/api/chat", done_reason="length")
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("A woman.", endpoint="/api/generate")
    assert run(capsys, "caption", photo)[0] == 0
    first, second = [r.body for r in ollama.requests_to("/api/chat")]
    assert second["messages"] == first["messages"]
    assert second["options"] == {**first["options"], "repeat_penalty": 1.2}
    assert DESCRIPTION in text_prompts(ollama)[0]


def test_a_description_that_loops_twice_is_cut_where_it_starts(ollama, capsys, photo):
    for _ in range(2):
        ollama.reply("A cat sits on a mat. " * 8, endpoint="/api/chat")
    ollama.reply("A cat.", endpoint="/api/generate")
    assert run(capsys, "caption", photo)[0] == 0
    assert text_prompts(ollama)[0] == training_request(description="A cat sits on a mat.") + "\n/no_think"


@pytest.mark.parametrize(("version", "structured"), [("0.13.0", True), ("0.5.0", True), ("0.4.7", False),
                                                      ("0.0.0", True)])
def test_tags_use_structured_output_when_the_server_has_it(make_ollama, capsys, photo, monkeypatch,
                                                           version, structured):
    server = make_ollama(version=version)
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    server.reply(DESCRIPTION, endpoint="/api/chat")
    server.reply('["1girl", "Red_Coat", "snow", "1girl"]' if structured else "1girl, red coat, snow",
                 endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--style", "tags")
    assert (code, out, err) == (0, "1girl, red coat, snow\n", "")
    body = server.requests_to("/api/generate")[0].body
    assert body.get("format") == ({"type": "array", "items": {"type": "string"}} if structured else None)
    assert len(server.requests_to("/api/version")) == 1


def test_prose_styles_send_no_format(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("A woman.", endpoint="/api/generate")
    run(capsys, "caption", photo)
    assert "format" not in ollama.requests_to("/api/generate")[0].body


def test_tag_flags_end_to_end(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply('["smile", "red_coat", "watermark", "solo", "^_^", "ohwx woman"]', endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--style", "tags", "--trigger", "ohwx",
                         "--prefix", "score_9", "--exclude-tags", "watermark,Smile",
                         "--always-first", "1girl, solo", "--underscores")
    assert (code, out, err) == (0, "score_9, ohwx, 1girl, solo, red_coat, ^_^, woman\n", "")


def test_tag_flags_need_the_tags_style(ollama, capsys, photo):
    code, out, err = run(capsys, "caption", photo, "--exclude-tags", "hat")
    assert (code, out) == (2, "")
    assert err == ("ollama-generate: error: --underscores, --exclude-tags and --always-first shape tags; "
                   "add --style tags\n")
    assert ollama.requests == []


def test_hint_reaches_both_stages_and_the_cache_key(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("Mira in a red coat.", endpoint="/api/generate")
    assert run(capsys, "caption", tmp_path, "--hint", "the woman is Mira")[0] == 0
    hint = og.render("hint", hint="the woman is Mira")
    vision = ollama.requests_to("/api/chat")[0].body["messages"][1]["content"]
    assert vision == og.render("vision_user") + hint + "\n/no_think"
    assert text_prompts(ollama)[0] == training_request(hint="the woman is Mira") + "\n/no_think"
    # Another hint is another question: the cached description is not reused for it.
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("A woman.", endpoint="/api/generate")
    assert run(capsys, "caption", tmp_path, "--overwrite", "--hint", "the woman is Ana")[0] == 0
    assert len(ollama.requests_to("/api/chat")) == 2


def test_generation_options_reach_the_requests(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("A woman.", endpoint="/api/generate")
    assert run(capsys, "caption", photo, "--temperature", "0", "--seed", "7", "--num-ctx", "4096",
               "--max-tokens", "99")[0] == 0
    vision = ollama.requests_to("/api/chat")[0].body["options"]
    text = ollama.requests_to("/api/generate")[0].body["options"]
    assert vision == {"temperature": 0.2, "num_predict": 1024, "num_ctx": 4096, "seed": 7}
    assert text == {"temperature": 0.0, "num_predict": 99, "num_ctx": 4096, "seed": 7}


def test_same_seed_at_temperature_zero_sends_byte_identical_requests(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    for _ in range(2):
        ollama.reply(DESCRIPTION, endpoint="/api/chat")
        ollama.reply("A woman.", endpoint="/api/generate")
        assert run(capsys, "caption", tmp_path, "--overwrite", "--no-cache", "--seed", "3",
                   "--temperature", "0")[0] == 0
    chats = [r.raw for r in ollama.requests_to("/api/chat")]
    texts = [r.raw for r in ollama.requests_to("/api/generate") if b'"prompt"' in r.raw]
    assert len(chats) == len(texts) == 2
    assert chats[0] == chats[1] and texts[0] == texts[1]


@pytest.mark.parametrize(("argv", "message"), [
    (["--temperature", "-1"], "argument --temperature: must be 0 or more, got '-1'"),
    (["--num-ctx", "0"], "argument --num-ctx: must be 1 or more, got '0'"),
    (["--max-tokens", "many"], "argument --max-tokens: expected a whole number, got 'many'"),
])
def test_bad_generation_options_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as caught:
        og.main(["prompt", "x", *argv])
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == f"ollama-generate: error: {message}"


def test_prompt_for_clip_fits_the_token_budget(ollama, capsys):
    ollama.reply(", ".join(f"tag number{n}" for n in range(60)))
    code, out, err = run(capsys, "prompt", "x", "--encoder", "clip")
    assert code == 0
    line = out.rstrip("\n")
    assert og.estimate_clip_tokens(line) <= 75
    assert line.startswith("tag number0, tag number1, ")
    # It leaves off only what does not fit.
    kept = line.split(", ")
    assert og.estimate_clip_tokens(", ".join(kept + [f"tag number{len(kept)}"])) > 75


def test_enhance_warns_over_the_clip_budget(ollama, capsys):
    ollama.reply(", ".join(f"tag{n}" for n in range(80)))
    code, out, err = run(capsys, "enhance", "a cat")
    assert code == 0
    tokens = og.estimate_clip_tokens(out.strip())
    assert err == (f"ollama-generate: warning: about {tokens} CLIP tokens: SDXL and Pony read only the "
                   "first 75; Flux's T5 reads far more\n")


def test_tag_captions_over_the_clip_budget_are_flagged(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(", ".join(f"very long descriptive tag{n}" for n in range(30)), endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--style", "tags")
    assert code == 0
    tokens = og.estimate_clip_tokens(out.strip())
    assert tokens > 75
    assert err == f"ollama-generate: warning: needs review: about {tokens} CLIP tokens, over the 75-token budget\n"


@pytest.mark.strict_ranges
def test_a_worse_second_answer_does_not_replace_a_closer_first_one(ollama, capsys, photo):
    forty = " ".join(f"word{n}" for n in range(40)) + "."
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(forty, endpoint="/api/generate")
    ollama.reply("A woman walks.", endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo)
    assert (code, out) == (0, forty[0].upper() + forty[1:] + "\n")
    assert err == ("ollama-generate: warning: needs review: it has 40 words; "
                   "a training caption has 50 to 150\n")


def test_text_commands_refuse_to_print_a_refusal(ollama, capsys):
    ollama.reply("I'm sorry, but I can't help with that.")
    code, out, err = run(capsys, "prompt", "x")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "ollama-generate: error: the text model qwen3-30b-a3b:latest refused: "
        "I'm sorry, but I can't help with that.",
        "ollama-generate: hint: rephrase the request, or pick another model with --model",
    ]


def test_clip_prompts_drop_chatter_and_keep_weights(ollama, capsys):
    ollama.reply("(masterpiece:1.2), lighthouse, storm_clouds, waves\n\nI kept it under 25 tags.")
    assert run(capsys, "prompt", "x", "--encoder", "clip") == (
        0, "(masterpiece:1.2), lighthouse, storm_clouds, waves\n", "")
