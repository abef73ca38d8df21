"""Caption quality end to end: re-asks, needs-review flags, refusals, loops, tag rules, hints and
generation options, asserted on the exact requests sent to the fake server."""

from __future__ import annotations

import json

import pytest
from cli import run
from images import png_bytes
from traced import DESCRIPTION, DETAILED, TAGS, TRAINING

import ollama_generate as og

GOOD = TRAINING  # 71 words, every concrete one supported by DESCRIPTION
# Twenty tags in the description's own words, long enough to be over CLIP's 75 tokens together.
LONG_TAGS = ["young woman", "short black hair", "snowy park at dusk", "long red wool coat", "grey knitted scarf",
             "black leather gloves", "paper cup of coffee", "coffee in her right hand", "bare birch trees",
             "wooden bench covered in snow", "row of lit street lamps", "street lamps along a path",
             "deep blue sky", "soft cold light", "falling snowflakes", "eye level", "shallow depth of field",
             "woman holding a paper cup", "snow-covered bench", "birch trees behind her"]


def text_prompts(fake):
    return [r.body["prompt"] for r in fake.requests_to("/api/generate") if r.body.get("prompt")]


def training_request(description=DESCRIPTION, hint=""):
    return og.with_hint(og.render("caption_training", description=description), hint)


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


def test_still_out_of_range_is_written_and_flagged_for_review(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    report = tmp_path / "run.json"
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("A woman.", endpoint="/api/generate")
    ollama.reply("A woman in a coat.", endpoint="/api/generate")
    code, out, err = run(capsys, "caption", tmp_path, "--report", report)
    assert (code, out) == (0, "")
    # Asked once more (out of range), and the closer of the two answers is written.
    assert len(text_prompts(ollama)) == 2
    assert (tmp_path / "a.txt").read_text() == "A woman in a coat.\n"
    assert "Needs review (1, written):\n  a.png: it has 5 words; a training caption has 50 to 150\n" in err
    assert json.loads(report.read_text())["needs_review"] == [
        {"image": "a.png", "reason": "it has 5 words; a training caption has 50 to 150", "rules": []}]


def test_detailed_captions_need_two_to_four_sentences(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    one = DETAILED.split(". ")[0] + "."
    assert og.count_sentences(one) == 1 and og.count_sentences(DETAILED) == 3
    ollama.reply(one, endpoint="/api/generate")
    ollama.reply(DETAILED, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--style", "detailed")
    assert (code, out, err) == (0, DETAILED + "\n", "")
    assert len(text_prompts(ollama)) == 2
    assert "it has 1 sentence; a detailed caption has 2 to 4" in text_prompts(ollama)[1]


def test_too_few_tags_are_asked_again_and_too_many_cut(ollama, capsys, photo):
    # Real tags in the description's words (made-up ones would be flagged as invented).
    words = [w for w in dict.fromkeys(DESCRIPTION.lower().replace(",", "").replace(".", "").split()) if len(w) > 3]
    pool = list(dict.fromkeys(TAGS.split(", ") + LONG_TAGS + words))
    few, many = ", ".join(pool[:5]), ", ".join(pool[:60])
    assert len(pool) >= 60
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(few, endpoint="/api/generate")
    ollama.reply(many, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--style", "tags")
    assert code == 0
    assert out == ", ".join(pool[:40]) + "\n"
    assert len(text_prompts(ollama)) == 2
    assert "it has 5 tags; a tags caption has 20 to 40" in text_prompts(ollama)[1]


def test_a_refusal_is_asked_again_and_never_written(ollama, capsys, tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png_bytes(seed=len(name) + ord(name[0])))
    for _ in range(2):
        ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("I'm sorry, but I can't help with that.", endpoint="/api/generate")
    ollama.reply("As an AI, I cannot write this caption.", endpoint="/api/generate")
    ollama.reply("I apologize, but I won't do that.", endpoint="/api/generate")
    ollama.reply(GOOD, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", tmp_path)
    assert code == 1
    assert not (tmp_path / "a.txt").exists()
    assert (tmp_path / "b.txt").read_text() == GOOD + "\n"
    assert "a.png: failed: the text model qwen3-30b-a3b:latest refused to write a caption, twice" in err
    assert len(text_prompts(ollama)) == 4
    reask = text_prompts(ollama)[1]
    assert reask == og.render("reask", request=training_request(),
                              answer="I'm sorry, but I can't help with that.",
                              problem="refused to write a caption") + "\n/no_think"


def test_a_vision_refusal_is_asked_again_in_the_same_chat(ollama, capsys, photo):
    ollama.reply("I'm sorry, I can't describe people.", endpoint="/api/chat")
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(GOOD, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo)
    assert (code, out, err) == (0, GOOD + "\n", "")
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
    assert err == ("ollama-generate: error: the vision model qwen3-vl:32b refused to describe the image, twice\n"
                   "ollama-generate: hint: try another vision model with --vision-model\n")
    assert len(ollama.requests_to("/api/chat")) == 2
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
    tags = TAGS.split(", ")
    assert "red coat" in tags
    answer = [tag.replace("red coat", "Red_Coat") for tag in tags] + ["1girl"]
    server.reply(json.dumps(answer) if structured else TAGS, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--style", "tags")
    assert (code, out, err) == (0, TAGS + "\n", "")
    body = server.requests_to("/api/generate")[0].body
    # The schema is sized by the tags range (20 to 40).
    assert body.get("format") == ({"type": "array", "items": {"type": "string"}, "minItems": 20, "maxItems": 40}
                                  if structured else None)
    assert len(server.requests_to("/api/generate")) == 1
    assert len(server.requests_to("/api/version")) == 1


def test_prose_styles_send_no_format(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("A woman.", endpoint="/api/generate")
    run(capsys, "caption", photo)
    assert "format" not in ollama.requests_to("/api/generate")[0].body


def test_tag_flags_end_to_end(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    # 21 more tags, written with underscores as Danbooru spells them: --underscores keeps them.
    rest = [tag.replace(" ", "_") for tag in TAGS.split(", ") if tag not in ("1girl", "solo", "red coat")]
    answer = ["smile", "red_coat", "watermark", "solo", "^_^", "ohwx woman"] + rest
    ollama.reply(json.dumps(answer), endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--style", "tags", "--trigger", "ohwx",
                         "--prefix", "score_9", "--exclude-tags", "watermark,Smile",
                         "--always-first", "1girl, solo", "--underscores")
    expected = ["score_9", "ohwx", "1girl", "solo", "red_coat", "^_^", "woman"] + rest
    tokens = og.estimate_clip_tokens(", ".join(expected))
    assert tokens > og.CLIP_TOKEN_BUDGET  # every underscore is a token of its own
    assert (code, out, err) == (0, ", ".join(expected) + "\n", "ollama-generate: warning: needs review: about "
                                f"{tokens} CLIP tokens, over the 75-token budget\n")
    assert len(ollama.requests_to("/api/generate")) == 1


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
        ollama.reply(GOOD, endpoint="/api/generate")  # in range: one text request a run
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
    assert og.over_clip_budget(line) is None  # an estimate: 2 tokens of margin, CLIP_ESTIMATE_MARGIN
    assert og.estimate_clip_tokens(line) <= 75 - og.CLIP_ESTIMATE_MARGIN
    assert line.startswith("tag number0, tag number1, ")
    # It leaves off only what does not fit.
    kept = line.split(", ")
    assert og.over_clip_budget(", ".join(kept + [f"tag number{len(kept)}"])) is not None


def test_enhance_warns_over_the_clip_budget(ollama, capsys):
    ollama.reply(", ".join(f"tag{n}" for n in range(80)))
    code, out, err = run(capsys, "enhance", "a cat")
    assert code == 0
    tokens = og.estimate_clip_tokens(out.strip())
    assert err == (f"ollama-generate: warning: about {tokens} CLIP tokens: SDXL and Pony read only the "
                   "first 75; Flux's T5 reads far more\n")


def test_tag_captions_over_the_clip_budget_are_flagged(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(", ".join(LONG_TAGS), endpoint="/api/generate")  # 20 tags: in range, all supported
    code, out, err = run(capsys, "caption", photo, "--style", "tags")
    assert code == 0
    assert out == ", ".join(LONG_TAGS) + "\n"
    tokens = og.estimate_clip_tokens(out.strip())
    assert tokens > 75
    assert err == f"ollama-generate: warning: needs review: about {tokens} CLIP tokens, over the 75-token budget\n"


def test_a_worse_second_answer_does_not_replace_a_closer_first_one(ollama, capsys, photo):
    forty = " ".join(TRAINING.split()[:40]).rstrip(",.") + "."
    assert og.count_words(forty) == 40
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
