"""Grounding: --ground existing|filename|folder and per-image hints (hints.jsonl, --hints) reach
both stages as exactly the rendered prompt text, the cache key, and the resume rules."""

from __future__ import annotations

import json

import pytest
from cli import run
from images import png_bytes
from traced import DESCRIPTION, TRAINING

import ollama_generate as og

CAPTION = TRAINING  # in range and supported by DESCRIPTION: asked once


def vision_users(fake):
    return [r.body["messages"][1]["content"] for r in fake.requests_to("/api/chat")]


def text_prompts(fake):
    return [r.body["prompt"] for r in fake.requests_to("/api/generate") if r.body.get("prompt")]


def training_request(hint="", grounding=""):
    return og.with_hint(og.render("caption_training", description=DESCRIPTION), hint) + grounding


def answer(fake, caption=CAPTION):
    fake.reply(DESCRIPTION, endpoint="/api/chat")
    fake.reply(caption, endpoint="/api/generate")


def ground_text(template, where, text):
    return og.render(template, where=where, text=text)


def test_ground_existing_sends_the_tag_file_as_facts_to_both_stages(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "a.tags.txt").write_text("1girl, red coat,\nsnow\n", encoding="utf-8")
    answer(ollama)
    code, out, err = run(capsys, "caption", tmp_path, "--ground", "existing")
    assert code == 0, err
    facts = ground_text("ground_existing", "tag or caption file", "1girl, red coat, snow")
    assert vision_users(ollama) == [og.render("vision_user") + facts + "\n/no_think"]
    assert text_prompts(ollama) == [training_request(grounding=facts) + "\n/no_think"]
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == CAPTION + "\n"
    assert (tmp_path / "a.tags.txt").read_text(encoding="utf-8") == "1girl, red coat,\nsnow\n"


@pytest.mark.parametrize(("folder", "image", "flags", "expected"), [
    ("10_ohwx woman", "character_name_003.png", "filename", [("file name", "character name")]),
    ("10_ohwx woman", "character_name_003.png", "folder", [("folder name", "ohwx woman")]),
    ("10_ohwx woman", "mira-07.png", "folder,filename",
     [("file name", "mira"), ("folder name", "ohwx woman")]),
    ("3_ohwx_woman", "IMG_0042.png", "filename", []),
])
def test_name_grounding_strips_numbering_and_the_repeat_count(ollama, capsys, tmp_path, folder, image, flags,
                                                              expected):
    dataset = tmp_path / folder
    dataset.mkdir()
    (dataset / image).write_bytes(png_bytes())
    answer(ollama)
    assert run(capsys, "caption", dataset, "--ground", flags)[0] == 0
    grounding = "".join(ground_text("ground_name", where, text) for where, text in expected)
    assert vision_users(ollama) == [og.render("vision_user") + grounding + "\n/no_think"]
    assert text_prompts(ollama) == [training_request(grounding=grounding) + "\n/no_think"]


def test_ground_may_be_repeated_and_keeps_the_hint_first(ollama, capsys, tmp_path):
    dataset = tmp_path / "5_mira"
    dataset.mkdir()
    (dataset / "a.png").write_bytes(png_bytes())
    (dataset / "a.caption").write_text("a woman outdoors", encoding="utf-8")
    answer(ollama)
    flags = ("--ground", "folder", "--ground", "existing", "--hint", "winter")
    assert run(capsys, "caption", dataset, *flags)[0] == 0
    grounding = (ground_text("ground_existing", "tag or caption file", "a woman outdoors")
                 + ground_text("ground_name", "folder name", "mira"))
    assert text_prompts(ollama) == [training_request(hint="winter", grounding=grounding) + "\n/no_think"]


def test_an_unknown_ground_is_a_usage_error(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    code, out, err = run(capsys, "caption", tmp_path, "--ground", "filename,tags")
    assert (code, out) == (2, "")
    assert err == ("ollama-generate: error: --ground 'tags' is not one of existing, filename, folder\n"
                   "ollama-generate: hint: give --ground existing, --ground filename, --ground folder, "
                   "or several\n")
    assert ollama.requests == []


def test_name_words():
    assert og.name_words("character_name_003") == "character name"
    assert og.name_words("003_character-name") == "character name"
    assert og.name_words("DSC_0042 (2)") == ""
    assert og.name_words("000123") == ""
    assert og.folder_name_hint("/data/20_ohwx woman/a.png") == "ohwx woman"
    assert og.file_name_hint("/data/x/mira02.png") == "mira"


def test_a_caption_that_echoes_the_file_stem_is_flagged(ollama, capsys, tmp_path):
    image = tmp_path / "character_name_003.png"
    image.write_bytes(png_bytes())
    answer(ollama, "Character_name_003, " + TRAINING)
    code, out, err = run(capsys, "caption", image, "--ground", "filename")
    assert code == 0
    assert out == "Character_name_003, " + TRAINING + "\n"
    assert "echoes the file name 'character_name_003'" in err


def test_a_caption_that_says_the_name_as_words_is_not_flagged(ollama, capsys, tmp_path):
    image = tmp_path / "character_name_003.png"
    image.write_bytes(png_bytes())
    answer(ollama, "Character name: " + TRAINING)
    code, out, err = run(capsys, "caption", image)
    assert code == 0
    assert "echoes" not in err
    assert og.echoed_file_name("a red-coat soldier", "red-coat") == ""
    assert og.echoed_file_name("mira 07 smiles", "mira_07") == "mira 07"


def test_grounding_is_part_of_the_cache_key(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "a.tags.txt").write_text("red coat", encoding="utf-8")
    answer(ollama)
    assert run(capsys, "caption", tmp_path, "--ground", "existing")[0] == 0
    # The same grounding: the description comes from the cache.
    ollama.reply(CAPTION, endpoint="/api/generate")
    assert run(capsys, "caption", tmp_path, "--ground", "existing", "--overwrite")[0] == 0
    assert len(ollama.requests_to("/api/chat")) == 1
    # Other facts are another question: the vision model is asked again.
    (tmp_path / "a.tags.txt").write_text("blue coat", encoding="utf-8")
    answer(ollama)
    assert run(capsys, "caption", tmp_path, "--ground", "existing", "--overwrite")[0] == 0
    assert len(ollama.requests_to("/api/chat")) == 2
    assert vision_users(ollama)[1].endswith(ground_text("ground_existing", "tag or caption file", "blue coat")
                                            + "\n/no_think")


def test_ground_existing_with_the_tag_file_as_caption_file_says_what_to_do(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "a.txt").write_text("1girl, red coat", encoding="utf-8")
    code, out, err = run(capsys, "caption", tmp_path, "--ground", "existing")
    assert (code, out) == (2, "")
    assert err == ("ollama-generate: error: --ground existing: the tag or caption files are the .txt "
                   "captions this run writes, and existing captions are kept, so nothing would be captioned\n"
                   "ollama-generate: hint: add --overwrite to replace them grounded in what they say "
                   "(each is backed up), or write beside them with another --ext, such as --ext .caption\n")
    assert ollama.requests == []


def test_ground_existing_writes_beside_the_tag_file_with_another_ext(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "a.txt").write_text("1girl, red coat", encoding="utf-8")
    answer(ollama)
    assert run(capsys, "caption", tmp_path, "--ground", "existing", "--ext", ".caption")[0] == 0
    facts = ground_text("ground_existing", "tag or caption file", "1girl, red coat")
    assert text_prompts(ollama) == [training_request(grounding=facts) + "\n/no_think"]
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "1girl, red coat"
    assert (tmp_path / "a.caption").read_text(encoding="utf-8") == CAPTION + "\n"


def test_ground_existing_with_overwrite_replaces_the_tag_file_grounded_in_it(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "a.txt").write_text("1girl, red coat", encoding="utf-8")
    answer(ollama)
    assert run(capsys, "caption", tmp_path, "--ground", "existing", "--overwrite")[0] == 0
    facts = ground_text("ground_existing", "tag or caption file", "1girl, red coat")
    assert vision_users(ollama) == [og.render("vision_user") + facts + "\n/no_think"]
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == CAPTION + "\n"


def test_ground_existing_without_any_tag_file_warns(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    answer(ollama)
    code, out, err = run(capsys, "caption", tmp_path, "--ground", "existing")
    assert code == 0
    assert ("ollama-generate: warning: --ground existing: no image has a tag or caption file (.tags.txt, "
            ".wd14.txt, .txt, .caption) beside it; its captions are written without facts\n") in err
    assert vision_users(ollama) == [og.render("vision_user") + "\n/no_think"]


def write_hints(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))


def test_hints_jsonl_gives_each_image_its_hint_after_the_run_hint(ollama, capsys, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(png_bytes())
    write_hints(tmp_path / "hints.jsonl", [{"file_name": "sub/b.png", "hint": "the woman is Mira"}, b"",
                                           {"image": "gone.png", "hint": "x"},
                                           {"image": "gone2.png", "hint": "y"}])
    answer(ollama)
    code, out, err = run(capsys, "caption", tmp_path, "--recursive", "--hint", "winter")
    assert code == 0
    hint = og.render("hint", hint="winter the woman is Mira")
    assert vision_users(ollama) == [og.render("vision_user") + hint + "\n/no_think"]
    assert text_prompts(ollama) == [training_request(hint="winter the woman is Mira") + "\n/no_think"]
    assert err.count("not in the folder") == 1
    assert (f"ollama-generate: warning: {tmp_path / 'hints.jsonl'} names 2 images not in the folder: "
            "gone.png, gone2.png; their hints are not used\n") in err


def test_a_per_image_hint_is_part_of_its_cache_key(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    hints = tmp_path / "elsewhere.jsonl"
    write_hints(hints, [{"file_name": "a.png", "hint": "Mira"}])
    answer(ollama)
    assert run(capsys, "caption", tmp_path, "--hints", hints)[0] == 0
    ollama.reply(CAPTION, endpoint="/api/generate")
    assert run(capsys, "caption", tmp_path, "--hints", hints, "--overwrite")[0] == 0
    assert len(ollama.requests_to("/api/chat")) == 1
    write_hints(hints, [{"file_name": "a.png", "hint": "Ana"}])
    answer(ollama)
    assert run(capsys, "caption", tmp_path, "--hints", hints, "--overwrite")[0] == 0
    assert len(ollama.requests_to("/api/chat")) == 2


@pytest.mark.parametrize(("lines", "problem", "hint"), [
    ([{"file_name": "a.png", "hint": "ok"}, b"{not json"], "line 2 is not JSON (Expecting property name "
     "enclosed in double quotes)", og.HINTS_FORMAT),
    ([{"file": "a.png", "hint": "x"}], 'line 1 needs "file_name" (or "image") and "hint", both text',
     og.HINTS_FORMAT),
    ([{"file_name": "a.png", "hint": 3}], 'line 1 needs "file_name" (or "image") and "hint", both text',
     og.HINTS_FORMAT),
    ([b'{"file_name": "a.png", "hint": "caf\xe9"}'], "line 1 is not UTF-8 text", "save the file as UTF-8"),
])
def test_a_bad_hints_line_is_an_error_naming_it(ollama, capsys, tmp_path, lines, problem, hint):
    (tmp_path / "a.png").write_bytes(png_bytes())
    write_hints(tmp_path / "hints.jsonl", lines)
    code, out, err = run(capsys, "caption", tmp_path)
    assert (code, out) == (2, "")
    assert err == (f"ollama-generate: error: {tmp_path / 'hints.jsonl'} {problem}\n"
                   f"ollama-generate: hint: {hint}\n")
    assert ollama.requests == []


def test_a_missing_hints_file_is_an_error(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    code, out, err = run(capsys, "caption", tmp_path, "--hints", tmp_path / "none.jsonl")
    assert (code, out) == (2, "")
    assert err == (f"ollama-generate: error: the hints file {tmp_path / 'none.jsonl'}: cannot read the file "
                   "(No such file or directory)\n")


def test_hints_is_for_a_folder(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    code, out, err = run(capsys, "caption", tmp_path / "a.png", "--hints", tmp_path / "h.jsonl")
    assert (code, out) == (2, "")
    assert "--hints works on a folder" in err


def test_the_vision_context_has_room_for_the_grounding():
    spec = og.CaptionSpec(ground=("existing", "folder"))
    jobs = [og.Job("a.png", "a.png", "a.txt", image_hint="the woman is Mira"),
            og.Job("b.png", "b.png", "b.txt")]
    room = og.grounding_room(spec, jobs)
    longest = (og.render("ground_existing", where="tag or caption file", text="x" * og.MAX_GROUND_CHARS)
               + og.render("ground_name", where="folder name", text="x" * 255))
    assert room == "the woman is Mira" + longest
    assert og.vision_context(30000, og.prompt_tokens(room)) > og.vision_context(30000, 0)


def test_ground_existing_with_overwrite_keeps_a_caption_a_person_edited(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "b.png").write_bytes(png_bytes(seed=1))
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("1girl, red coat\n", encoding="utf-8")
    og.journal_edits(str(tmp_path), [{"caption_file": "a.txt", "by": "review",
                                      "new": og.caption_hash(str(tmp_path / "a.txt"))}])
    answer(ollama)
    code, out, err = run(capsys, "caption", tmp_path, "--ground", "existing", "--overwrite")
    assert code == 0, err
    assert "Keeping 1 caption a person edited" in err
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "1girl, red coat\n"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == CAPTION + "\n"
    assert len(ollama.requests_to("/api/chat")) == 1
