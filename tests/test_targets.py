"""--target presets per base model: what each sends, what it writes, and what wins over it."""

from __future__ import annotations

import json

import pytest
from cli import run
from images import png_bytes
from traced import DESCRIPTION, TAGS, TRAINING

import ollama_generate as og

PONY = "score_9, score_8_up, score_7_up, score_6_up, score_5_up, score_4_up"
NOOBAI = "masterpiece, best quality, newest, absurdres, highres"
UNDERSCORED = json.dumps([tag.replace(" ", "_") for tag in TAGS.split(", ")])  # a model writing raw booru tags
TAG_SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 20, "maxItems": 40}
VIDEO = ("\nThis is for a video model (Wan, HunyuanVideo, LTX-Video): put motion and camera first. Start with "
         "what moves and how (the action, its direction and speed), then the camera (static, pan, tilt, dolly, "
         "tracking, handheld, zoom) and the shot size, then the subject, the setting, lighting and style. If "
         "nothing moves, say the shot is static and how the camera frames it. Describe only motion the "
         "description supports.\n")

# target: (caption template, video wording, quality tags with --quality-tags)
EXPECTED = {
    "flux": ("caption_training", False, ""),
    "sdxl": ("caption_tags", False, ""),
    "pony": ("caption_tags", False, PONY),
    "illustrious": ("caption_tags", False, "masterpiece, best quality"),
    "noobai": ("caption_tags", False, NOOBAI),
    "sd15": ("caption_tags", False, ""),
    "qwen-image": ("caption_training", False, ""),
    "chroma": ("caption_training", False, ""),
    "wan": ("caption_training", True, ""),
    "hunyuan-video": ("caption_training", True, ""),
    "ltx": ("caption_training", True, ""),
}


def caption_request(ollama):
    requests = ollama.requests_to("/api/generate")
    assert len(requests) == 1
    return requests[0].body


def test_every_target_is_tested():
    assert list(EXPECTED) == list(og.TARGETS)


@pytest.mark.parametrize("target", EXPECTED)
def test_each_target_sends_its_style_and_wording_and_writes_no_prefix(ollama, capsys, photo, target):
    template, video, _ = EXPECTED[target]
    answer = TAGS if template == "caption_tags" else TRAINING
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(answer, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--target", target)
    assert (code, out, err) == (0, answer + "\n", "")
    body = caption_request(ollama)
    assert body["prompt"] == og.render(template, description=DESCRIPTION) + (VIDEO if video else "") + "\n/no_think"
    assert body["options"] == {"temperature": 0.3, "num_predict": 512, "num_ctx": 8192}
    assert body.get("format") == (TAG_SCHEMA if template == "caption_tags" else None)


@pytest.mark.parametrize("target", [name for name, row in EXPECTED.items() if row[2]])
def test_quality_tags_come_first_only_when_asked(ollama, capsys, photo, target):
    quality = EXPECTED[target][2]
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(TAGS, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--target", target, "--quality-tags", "--trigger", "ohwx")
    assert code == 0
    assert out == f"{quality}, ohwx, {TAGS}\n"
    # The model is never asked for them: the request is the plain tags request.
    assert caption_request(ollama)["prompt"] == og.render("caption_tags", description=DESCRIPTION) + "\n/no_think"


def test_pony_source_tags_come_from_the_prefix_after_the_score_tags(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(TAGS.replace("1girl, ", "1girl, source_anime, score_9, "), endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--target", "pony", "--quality-tags",
                         "--prefix", "source_anime")
    assert code == 0
    assert out == f"{PONY}, source_anime, {TAGS}\n"  # the model's own copies are taken out once
    tokens = og.clip_tokens(out.strip())[0]  # CLIP reads the prefix too: six score tags cost 30 tokens
    assert err == f"ollama-generate: warning: needs review: about {tokens} CLIP tokens, over the 75-token budget\n"


def test_booru_targets_write_spaces_not_underscores(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(UNDERSCORED, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--target", "noobai")
    assert (code, out, err) == (0, TAGS + "\n", "")


@pytest.mark.parametrize("target", ["flux", "wan"])
def test_quality_tags_for_a_target_without_them_is_a_usage_error(ollama, capsys, photo, target):
    code, out, err = run(capsys, "caption", photo, "--target", target, "--quality-tags")
    assert (code, out) == (2, "")
    assert err == (f"ollama-generate: error: --quality-tags: the target {target} has none\n"
                   "ollama-generate: hint: targets with quality tags: pony, illustrious, noobai\n")
    assert ollama.generation_requests() == []


def test_quality_tags_without_a_target_is_a_usage_error(ollama, capsys, photo):
    code, out, err = run(capsys, "caption", photo, "--quality-tags")
    assert (code, out) == (2, "")
    assert err.startswith("ollama-generate: error: --quality-tags: they come from --target\n")


def test_explicit_flags_win_over_the_preset(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(TRAINING, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--target", "pony", "--style", "training")
    assert (code, out) == (0, TRAINING + "\n")
    # Pony's CLIP still reads 75 tokens of it, so the prose is flagged.
    tokens = og.clip_tokens(TRAINING)[0]
    assert err == f"ollama-generate: warning: needs review: about {tokens} CLIP tokens, over the 75-token budget\n"
    assert caption_request(ollama)["prompt"] == og.render("caption_training", description=DESCRIPTION) + "\n/no_think"


def test_underscores_flag_wins_over_the_preset(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(UNDERSCORED, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--target", "sdxl", "--underscores")
    assert code == 0
    tokens = og.clip_tokens(out.strip())[0]  # every underscore is a CLIP token of its own
    assert err == f"ollama-generate: warning: needs review: about {tokens} CLIP tokens, over the 75-token budget\n"
    assert out == TAGS.replace(" ", "_").replace(",_", ", ") + "\n"


def test_a_caption_over_the_targets_budget_is_flagged(ollama, capsys, photo):
    tokens = og.clip_tokens(TRAINING)[0]
    assert 75 < tokens < 128  # over CLIP's budget, within LTX's
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(TRAINING, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--target", "sd15", "--style", "training")
    assert (code, out) == (0, TRAINING + "\n")
    assert err == f"ollama-generate: warning: needs review: about {tokens} CLIP tokens, over the 75-token budget\n"


def test_unknown_target_lists_them(ollama, capsys, photo):
    code, out, err = run(capsys, "caption", photo, "--target", "sd3")
    assert (code, out) == (2, "")
    assert err == ("ollama-generate: error: unknown target 'sd3'; the targets: flux, sdxl, pony, illustrious, "
                   "noobai, sd15, qwen-image, chroma, wan, hunyuan-video, ltx\n"
                   "ollama-generate: hint: `ollama-generate caption --target list` shows what each one sets\n")
    assert ollama.requests == []


# -- prompt and enhance ---------------------------------------------------------------------------


def test_prompt_for_pony_is_clip_tags_with_score_tags_when_asked(ollama, capsys):
    ollama.reply("1girl, (red hair:1.2), rain, score_9")
    code, out, err = run(capsys, "prompt", "a girl in the rain", "--target", "pony", "--quality-tags")
    assert (code, out, err) == (0, f"{PONY}, 1girl, (red hair:1.2), rain\n", "")
    body = ollama.generation_requests()[0].body
    assert body["prompt"] == og.render("prompt_clip", concept="a girl in the rain") + "\n/no_think"
    assert body["options"] == {"temperature": 0.7, "num_predict": 400, "num_ctx": 8192}


def test_prompt_for_pony_without_quality_tags_has_none(ollama, capsys):
    ollama.reply("1girl, rain")
    assert run(capsys, "prompt", "a girl", "--target", "pony") == (0, "1girl, rain\n", "")


def test_prompt_encoder_flag_wins_over_the_target(ollama, capsys):
    ollama.reply("A girl in the rain.")
    code, out, err = run(capsys, "prompt", "a girl", "--target", "pony", "--encoder", "t5", "--no-stream")
    assert (code, out, err) == (0, "A girl in the rain.\n", "")
    assert ollama.generation_requests()[0].body["prompt"] == og.render("prompt_t5", concept="a girl") + "\n/no_think"


def test_prompt_for_wan_asks_for_motion_and_camera_first(ollama, capsys):
    ollama.reply("A fox runs left as the camera pans.")
    code, out, err = run(capsys, "prompt", "a fox", "--target", "wan", "--json")
    assert code == 0
    assert json.loads(out)["target"] == "wan"
    assert ollama.generation_requests()[0].body["prompt"] == (og.render("prompt_t5", concept="a fox") + VIDEO
                                                              + "\n/no_think")


def test_enhance_for_flux_sends_the_plain_request_and_skips_the_clip_warning(ollama, capsys):
    long_prompt = ", ".join(f"tag{n}" for n in range(80))
    ollama.reply(long_prompt)
    code, out, err = run(capsys, "enhance", "a cat", "--target", "flux", "--no-stream")
    assert (code, out, err) == (0, long_prompt + "\n", "")  # T5 reads 512 tokens: no warning
    body = ollama.generation_requests()[0].body
    assert body["prompt"] == og.render("enhance_moderate", prompt="a cat") + "\n/no_think"
    assert body["options"] == {"temperature": 0.7, "num_predict": 600, "num_ctx": 8192}


def test_enhance_for_sdxl_warns_over_its_budget(ollama, capsys):
    long_prompt = ", ".join(f"tag{n}" for n in range(80))
    ollama.reply(long_prompt)
    code, out, err = run(capsys, "enhance", "a cat", "--target", "sdxl", "--no-stream")
    tokens = og.clip_tokens(long_prompt)[0]
    assert (code, out) == (0, long_prompt + "\n")
    assert err == f"ollama-generate: warning: about {tokens} CLIP tokens: SDXL reads only the first 75\n"


def test_enhance_for_noobai_puts_quality_tags_first_once(ollama, capsys):
    ollama.reply("1girl, red hair, rain, night")
    code, out, err = run(capsys, "enhance", "1girl, red hair", "--target", "noobai", "--quality-tags")
    assert (code, out, err) == (0, f"{NOOBAI}, 1girl, red hair, rain, night\n", "")
    ollama.reply(f"{NOOBAI}, 1girl")
    assert run(capsys, "enhance", "1girl", "--target", "noobai", "--quality-tags") == (0, f"{NOOBAI}, 1girl\n", "")


# -- listing and overrides ------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["caption"], ["prompt"], ["enhance"]])
def test_target_list_prints_the_table(capsys, command):
    code, out, err = run(capsys, *command, "--target", "list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["target", "family", "style", "budget", "prefix", "(--quality-tags)", "notes"]
    assert [line.split()[0] for line in lines[1:]] == list(EXPECTED)
    pony = lines[3]
    assert pony.startswith("pony ") and "tags" in pony and "75 clip" in pony and PONY in pony


def test_target_list_json(capsys):
    code, out, err = run(capsys, "--json", "caption", "--target=list")
    assert (code, err) == (0, "")
    rows = json.loads(out)["targets"]
    assert [row["name"] for row in rows] == list(EXPECTED)
    assert rows[0] == {"name": "flux", "family": "Flux.1", "style": "training", "encoder": "t5", "budget": 512,
                       "prefix": None, "underscores": False, "guidance": None,
                       "notes": "T5 reads 512 tokens (schnell 256); no quality tags"}
    assert {row["name"]: row["guidance"] for row in rows if row["guidance"]} == {
        "wan": "target_video", "hunyuan-video": "target_video", "ltx": "target_video"}


def test_templates_has_a_targets_section(capsys):
    code, out, err = run(capsys, "templates")
    assert (code, err) == (0, "")
    section = out.split("\n\n", 1)[1].splitlines()
    assert section[0] == "Targets (--target; rows from a --prompts-dir targets.json included):"
    assert [line.split()[0] for line in section[2:]] == list(EXPECTED)
    code, out, err = run(capsys, "templates", "--json")
    assert [row["name"] for row in json.loads(out)["targets"]] == list(EXPECTED)


def test_a_prompts_dir_targets_file_adds_and_changes_rows(ollama, capsys, photo, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "targets.json").write_text(json.dumps({
        "animagine": {"family": "Animagine XL", "style": "tags", "encoder": "clip", "budget": 75,
                      "quality": "masterpiece, high score", "underscores": True},
        "flux": {"budget": 256, "notes": "schnell"}}))
    code, out, err = run(capsys, "caption", "--target", "list", "--json", "--prompts-dir", prompts)
    rows = {row["name"]: row for row in json.loads(out)["targets"]}
    assert rows["flux"]["budget"] == 256 and rows["flux"]["notes"] == "schnell"
    assert rows["flux"]["style"] == "training"
    assert list(rows)[-1] == "animagine"

    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(UNDERSCORED, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--target", "animagine", "--quality-tags", "--prompts-dir", prompts)
    assert code == 0
    assert err.startswith("ollama-generate: warning: needs review: about ")
    assert out == "masterpiece, high score, " + TAGS.replace(" ", "_").replace(",_", ", ") + "\n"


@pytest.mark.parametrize(("content", "message"), [
    ("{", "cannot be read as JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("[]", "must hold a JSON object of target rows, not a list"),
    ('{"Big One": {}}', "target 'Big One': a name is lower-case letters, digits, dots and hyphens (not 'list')"),
    ('{"x": 1}', "target 'x' must be a JSON object of fields"),
    ('{"x": {"colour": 1}}', "target 'x' has unknown field colour"),
    ('{"flux": {"budget": true}}', "target 'flux': budget must be a int, got True"),
    ('{"x": {"style": "tags"}}', "target 'x' is new and needs encoder, budget"),
    ('{"flux": {"style": "poem"}}', "target 'flux': style must be one of training, tags, detailed, got 'poem'"),
    ('{"flux": {"encoder": "bert"}}', "target 'flux': encoder must be one of clip, t5, llm, got 'bert'"),
    ('{"flux": {"budget": 0}}', "target 'flux': budget must be 1-1048576 tokens, got 0"),
    ('{"flux": {"quality": "a\\nb"}}', "target 'flux': quality must be one line, got 'a\\nb'"),
    ('{"flux": {"guidance": "lore"}}', "target 'flux': guidance must be empty or a target_* template: "
                                       "target_video, got 'lore'"),
])
def test_a_bad_targets_file_is_one_clear_error(ollama, capsys, tmp_path, content, message):
    (tmp_path / "targets.json").write_text(content)
    code, out, err = run(capsys, "prompt", "x", "--target", "flux", "--prompts-dir", tmp_path)
    assert (code, out) == (2, "")
    separator = ": " if message.startswith("target") else " "
    assert err.splitlines()[0] == f"ollama-generate: error: {tmp_path / 'targets.json'}{separator}{message}"
    assert ollama.requests == []


def test_enhance_for_ltx_warns_over_its_t5_budget(ollama, capsys):
    prose = ("A red fox sprints left across fresh snow while the camera pans slowly to follow it, low and "
             "steady at ground level. Powder sprays behind its paws in bright arcs that catch the pale morning "
             "sun. Birch trunks slide past in the foreground, slightly blurred, as the shot tightens from a wide "
             "view of the frozen meadow to a medium close-up of the animal's face. Its breath clouds in the cold "
             "air, ears turning toward a distant sound. Near the fence the fox stops abruptly, crouches, then "
             "leaps high into a drift and vanishes headfirst; the camera holds still on the settling snow for a "
             "moment before tilting up to reveal a line of dark pines, a wooden barn with a rusted roof, and "
             "thin smoke rising from its chimney into a cloudless winter sky.")
    ollama.reply(prose)
    code, out, err = run(capsys, "enhance", "a fox", "--target", "ltx", "--no-stream")
    tokens = og.clip_tokens(prose)[0]
    assert tokens > 128
    assert (code, out) == (0, prose + "\n")
    assert err == f"ollama-generate: warning: about {tokens} T5 (estimated) tokens: LTX-Video reads only the first 128\n"
    assert ollama.generation_requests()[0].body["prompt"] == (og.render("enhance_moderate", prompt="a fox") + VIDEO
                                                              + "\n/no_think")


def test_caption_json_names_the_target(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(TRAINING, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--target", "chroma", "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert (data["style"], data["target"], data["text"]) == ("training", "chroma", TRAINING)


def test_doctor_checks_a_targets_file(ollama, capsys, tmp_path):
    (tmp_path / "targets.json").write_text('{"flux": {"budget": -1}}')
    code, out, err = run(capsys, "doctor", "--prompts-dir", tmp_path)
    assert code == 1
    assert (f"FAIL  templates: {tmp_path / 'targets.json'}: target 'flux': budget must be 1-1048576 tokens, "
            "got -1") in out.splitlines()
