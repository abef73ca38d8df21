"""The caption policy: legitimate captions reach the file whole, doubtful ones are flagged, meta talk
is never written silently, and the two stages' re-asks go through the real server protocol.

The corpora in tests/fixtures/legitimate/ were written by hand: captions.jsonl holds legitimate
answers whose content could trip a naive cleaner (each with the vision description it was written
from), planted.jsonl holds captions with invented details and the words invented.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cli import run
from images import png_bytes
from traced import DESCRIPTION, TAGS, TRAINING

import ollama_generate as og

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legitimate"
LEGITIMATE = [json.loads(line) for line in (FIXTURES / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
PLANTED = [json.loads(line) for line in (FIXTURES / "planted.jsonl").read_text(encoding="utf-8").splitlines()]


def written(answer: str, style: str = "training", *, description: str = "", cut_off: bool = False,
            **spec: object) -> og.Caption | None:
    """What the caption stage makes of one answer (None: unusable, asked again or failed)."""
    caption_spec = og.CaptionSpec(style=style, **spec)
    draft = og.judge_caption(og.Answer(text=answer, done_reason="length" if cut_off else "stop"), caption_spec)
    return og.finish_caption(draft, caption_spec, description) if draft.body else None


# -- The legitimate corpus: every word kept, no flag -----------------------------------------------


def test_the_legitimate_corpus_is_large_and_varied():
    styles = [entry["style"] for entry in LEGITIMATE]
    assert len(styles) >= 140 and sum(style in og.CAPTION_STYLES for style in styles) >= 110
    assert {"training", "detailed", "tags", "lore", "prompt-t5", "prompt-clip", "enhance"} <= set(styles)
    assert sum(bool(entry["trigger"]) for entry in LEGITIMATE) >= 10


@pytest.mark.parametrize("entry", [e for e in LEGITIMATE if e["style"] in og.CAPTION_STYLES],
                         ids=lambda e: e["id"])
def test_a_legitimate_caption_reaches_the_file_whole_and_unflagged(entry):
    caption = written(entry["answer"], entry["style"], description=entry["description"],
                      trigger=entry["trigger"])
    assert caption is not None, entry["trap"]
    body = og.continue_after_chunk(entry["answer"]) if entry["trigger"] else entry["answer"]
    assert caption.text == og.layout_caption(body, trigger=entry["trigger"]), entry["trap"]
    assert (caption.review, caption.fired) == ([], []), entry["trap"]


@pytest.mark.parametrize("entry", [e for e in LEGITIMATE if e["style"] not in og.CAPTION_STYLES],
                         ids=lambda e: e["id"])
def test_legitimate_text_command_answers_are_kept_whole(entry):
    cleaned = og.clean(entry["answer"], og.STYLES[entry["style"]])
    expected = entry["answer"]
    if entry["style"] == "prompt-clip":  # tags come back joined by ", "
        expected = ", ".join(tag.strip() for tag in expected.split(","))
    assert (cleaned.text, cleaned.fired, cleaned.refused) == (expected, [], False), entry["trap"]


# -- Faithfulness ------------------------------------------------------------------------------------


def test_planted_inventions_are_caught_and_legitimate_captions_are_not():
    caught = [entry["id"] for entry in PLANTED
              if any(reason.startswith("invented: ") for reason in
                     written(entry["answer"], entry["style"], description=entry["description"]).review)]
    assert len(PLANTED) >= 50
    assert len(caught) >= 0.85 * len(PLANTED), sorted(set(e["id"] for e in PLANTED) - set(caught))


def test_an_invented_detail_is_named_and_its_share_reported():
    caption = written(TRAINING.replace("a paper cup of coffee", "a red umbrella and a dog"),
                      description=DESCRIPTION)
    assert "invented: umbrella, dog" in caption.review
    assert caption.invented == ["umbrella", "dog"]
    assert 0 < caption.unsupported_share < 0.2


def test_creative_captions_are_not_held_to_the_description():
    caption = written(TRAINING.replace("a paper cup of coffee", "a red umbrella and a small dog"),
                      description=DESCRIPTION, creative=True)
    assert caption.review == [] and caption.unsupported_share is None


# -- What the issue found, one by one ------------------------------------------------------------------

PAD = (" The light is soft and even, the colours are muted greens and browns, and the framing is a medium"
       " shot at eye level with the subject placed a little left of centre in a quiet, ordinary scene. A low"
       " wall and a row of potted plants run along the back, and the ground is grey paving.")


@pytest.mark.parametrize(("answer", "expected"), [
    ("In this photograph, a man fixes a bicycle.", "A man fixes a bicycle."),
    ("In the photographer's studio, a man fixes a bicycle.", "In the photographer's studio, a man fixes a bicycle."),
    ("In the pictures on the wall, a man fixes a bicycle.", "In the pictures on the wall, a man fixes a bicycle."),
    ("A checkerboard floor of black and white, black and white, black and white tiles in a hallway.",
     "A checkerboard floor of black and white, black and white, black and white tiles in a hallway."),
    ('"Sorry, we\'re closed" reads a sign on a bakery door.', '"Sorry, we\'re closed" reads a sign on a bakery door.'),
    ("Sorry, we're closed, says a hand-lettered sign on the bakery door.",
     "Sorry, we're closed, says a hand-lettered sign on the bakery door."),
    ('A white mug printed with "I can\'t stop smiling" sits on a desk.',
     'A white mug printed with "I can\'t stop smiling" sits on a desk.'),
    ("It is impossible to tell where the sky ends and the sea begins.",
     "It is impossible to tell where the sky ends and the sea begins."),
])
def test_legitimate_captions_from_the_issue_stay_whole(answer, expected):
    caption = written(answer + PAD, description=answer + PAD)
    assert caption.text == expected + PAD
    assert caption.review == []


def test_a_loop_is_cut_only_where_it_runs_to_the_end():
    looping = "A cat sits on a mat." + PAD + " A cat sits on a mat." * 6
    caption = written(looping, description=looping)
    assert caption.text == "A cat sits on a mat." + PAD + " A cat sits on a mat."
    assert caption.fired == ["loop"]


def test_loop_detection_is_linear_in_the_answer():
    timings = []
    for size in (100_000, 400_000):
        text = ("red fox " * (size // 8))[:size]
        started = time.perf_counter()
        og.cut_loop(text + " the end")
        timings.append(time.perf_counter() - started)
    assert timings[1] < 8 * timings[0] + 0.05  # quadratic would be 16x


def test_the_trigger_leaves_possessives_and_longer_words_alone():
    caption = written("Mira holds Mira's red umbrella beside Miranda on a wet street." + PAD, trigger="Mira",
                      description="holds Mira's red umbrella beside Miranda on a wet street" + PAD)
    assert caption.text == "Mira, holds Mira's red umbrella beside Miranda on a wet street." + PAD


KAOMOJI = ["^_^", ">_<", "o_o", ";)", ":d", ":3", ":o", "=_=", "-_-", "<3"]
REAL_TAGS = ["note", "i love you", "this is fine (meme)", "score_9", "score_8_up", "..."]
FILLER_TAGS = ["1girl", "solo", "smile", "red hair", "long hair", "blue eyes", "school uniform", "outdoors",
               "day", "tree", "grass", "sky", "cloud", "standing", "looking at viewer", "upper body"]


@pytest.mark.parametrize("trigger", ["", "ohwx"])
def test_kaomoji_and_word_like_danbooru_tags_keep_every_character(trigger):
    tags = FILLER_TAGS + KAOMOJI + REAL_TAGS
    caption = written(", ".join(tags), "tags", description=" ".join(tags), trigger=trigger)
    assert caption.text == ", ".join(([trigger] if trigger else []) + tags)


def test_tags_split_on_commas_and_new_lines_only_and_junk_fragments_go():
    answer = ", ".join(FILLER_TAGS[:10]) + '\n---\n:, [ "]:, steed.", ;), and so on, 20 to 40 tags'
    caption = written(answer, "tags", description=" ".join(FILLER_TAGS))
    assert caption.text == ", ".join(FILLER_TAGS[:10] + [";)"])
    assert set(caption.fired) == {"heading", "fragment", "template echo"}


@pytest.mark.parametrize(("answer", "rule"), [
    ("This is a Flux/T5 LoRa image description. A girl stands in snow.", "meta talk"),
    ("Caption for Flux training: A girl stands in snow.", "label"),
    ("The image description is as follows: A girl stands in snow.", "lead-in"),
    ("The image description is:\nA girl stands in snow.", "lead-in"),
    ("Image Description: A girl stands in snow.", "label"),
])
def test_meta_talk_is_removed_where_separable_and_recorded(answer, rule):
    caption = written(answer + PAD, description="A girl stands in snow in a red coat." + PAD)
    assert caption.text == "A girl stands in snow." + PAD
    assert caption.fired == [rule] and caption.review == []
    assert any(span[0] == rule and span[1] in ("strip", "drop") for span in caption.spans)


def test_task_talk_wrapped_around_content_is_flagged_not_deleted():
    answer = "ohwx, the image description is a classic example of Flux/T5 LoRa, with a girl in a red coat."
    caption = written(answer + PAD, description="A girl stands in snow in a red coat." + PAD)
    assert "with a girl in a red coat" in caption.text
    assert "meta talk" in caption.review


def test_list_items_glued_into_prose_are_unlisted_and_flagged():
    answer = "1. A girl stands in snow.\n2. She wears a red coat.\n3. Bare trees stand behind her." + PAD
    caption = written(answer, description=answer)
    assert caption.text.startswith("A girl stands in snow. She wears a red coat.")
    assert "list numbering" in caption.review


def test_talk_about_the_image_mid_caption_is_flagged_not_deleted():
    answer = "A girl stands in snow. The image shows a calm winter evening." + PAD
    caption = written(answer, description=answer)
    assert "The image shows a calm winter evening." in caption.text
    assert "meta talk" in caption.review


def test_first_person_fiction_is_not_a_refusal():
    cleaned = og.clean("I cannot remember when the sea took my brother. The gulls were loud that year.",
                       og.STYLES["lore"])
    assert not cleaned.refused and cleaned.text.startswith("I cannot remember")
    assert og.clean("I'm sorry, but I can't help with that request.", og.STYLES["lore"]).refused


def test_a_long_caption_that_apologises_in_it_is_not_a_refusal():
    assert not og.is_refusal("I'm sorry, Mother, I could not save the orchard, the boy whispers." + PAD)
    assert og.is_refusal("I'm sorry, but I can't describe this image.")


def test_prefix_trigger_and_always_first_alone_are_no_caption():
    spec = og.CaptionSpec(style="tags", trigger="ohwx", prefix="score_9", always_first=("1girl", "solo"))
    draft = og.judge_caption(og.Answer(text="1girl, solo, ohwx, score_9"), spec)
    assert draft.body == "" and draft.problem == "wrote no caption content"


def test_a_runaway_answer_is_never_written_whole():
    huge = "A fox runs through snow under a pale sky. " * 25_000  # about 1 MB
    started = time.perf_counter()
    draft = og.judge_caption(og.Answer(text=huge), og.CaptionSpec())
    assert time.perf_counter() - started < 5
    assert draft.body == "" and "far beyond" in draft.problem


def test_describe_loses_invented_image_links_and_lorem_ipsum():
    answer = ("An ink style for quiet harbours.\n\n![sample](https://example.invalid/a.png)\n\n"
              "## How to use\nLorem ipsum dolor sit amet, consectetur adipiscing elit. Start at 0.8.")
    cleaned = og.clean(answer, og.STYLES["describe"])
    assert cleaned.text == "An ink style for quiet harbours.\n\n## How to use\nStart at 0.8."
    assert set(cleaned.fired) == {"invented link", "filler"}


def test_clip_prompts_never_print_sentence_fragments():
    cleaned = og.clean('1girl, knight, (armor:1.2), riding a steed." The knight', og.STYLES["prompt-clip"])
    assert cleaned.text == "1girl, knight, (armor:1.2)"
    assert cleaned.fired == ["fragment"]


# -- Through the fake server: structured outputs, thinking, reports -----------------------------------


def test_tag_schema_is_sized_by_the_style_range(ollama, capsys, photo):
    assert run(capsys, "caption", photo, "--style", "tags")[0] == 0
    fmt = ollama.requests_to("/api/generate")[0].body["format"]
    assert fmt == {"type": "array", "items": {"type": "string"}, "minItems": 20, "maxItems": 40}


def test_an_empty_structured_answer_is_asked_again_as_plain_text(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("[]", endpoint="/api/generate")
    ollama.reply(TAGS, endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo, "--style", "tags")
    assert (code, out, err) == (0, TAGS + "\n", "")
    first, second = ollama.requests_to("/api/generate")
    assert "format" in first.body and "format" not in second.body
    assert "gave an empty or unusable structured answer" in second.body["prompt"]


def test_no_structured_sends_no_schema(ollama, capsys, photo):
    assert run(capsys, "caption", photo, "--style", "tags", "--no-structured")[0] == 0
    assert "format" not in ollama.requests_to("/api/generate")[0].body


def test_twice_empty_tags_blame_the_model_not_the_images(ollama, capsys, tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.png").write_bytes(png_bytes(seed=ord(name)))
    ollama.default_text = lambda rec: DESCRIPTION if rec.path == "/api/chat" else "[]"
    code, out, err = run(capsys, "caption", tmp_path, "--style", "tags", "-q")
    assert code == 1
    assert "the models gave no usable answer" in err
    assert "hint: try another text model (--model, now qwen3-30b-a3b:latest)" in err


def test_a_model_that_only_thinks_gets_one_larger_budget_then_a_clear_error(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    for _ in range(2):  # a template that ignores think:false puts the reasoning in the content
        ollama.reply("<think>Let me think about the coat. " * 20, done_reason="length",
                     endpoint="/api/generate")
    code, out, err = run(capsys, "caption", photo)
    assert code == 1
    budgets = [r.body["options"]["num_predict"] for r in ollama.requests_to("/api/generate")]
    assert budgets == [512, 512 * og.THINKING_BUDGET_FACTOR]
    assert all(r.body["think"] is False for r in ollama.requests_to("/api/generate"))
    assert "spent its whole answer thinking" in err and "-instruct" in err


def test_the_report_names_the_rules_and_keeps_the_raw_answer(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    raw = "Sure! Here is the caption:\n" + TRAINING + "\nThe image shows a snowy park at dusk."
    ollama.default_text = lambda rec: DESCRIPTION if rec.path == "/api/chat" else raw
    report = tmp_path / "report.json"
    code, out, err = run(capsys, "caption", tmp_path, "--report", report)
    assert code == 0
    data = json.loads(report.read_text())
    assert data["needs_review"] == [{"image": "a.png", "reason": "meta talk", "rules": ["lead-in", "meta talk"]}]
    assert data["cleaning"] == {"lead-in": 1, "meta talk": 1}
    (entry,) = data["captions"]
    assert entry["raw"] == raw
    assert {"rule": "lead-in", "action": "strip", "text": "Sure!"} in entry["spans"]
    assert entry["unsupported_share"] == 0.0
    assert "Cleaning touched: lead-in (1), meta talk (1)" in err


# -- What a second reader found ----------------------------------------------------------------------


@pytest.mark.parametrize("sentence", [
    "In the image's foreground, a fox sits in snow.",
    "The text reads: OPEN 24 HOURS, in red neon above a diner door.",
    "Claro de luna is painted in blue letters above the door.",
    "A glass jar of cookies stands beside a card that says Feel free to take one.",
])
def test_more_legitimate_openings_stay_whole(sentence):
    caption = written(sentence + PAD, description=sentence + PAD)
    assert caption.text == sentence + PAD and caption.review == []


@pytest.mark.parametrize("middle", [
    "Feel free to take one, says a card by the apples.",
    "I cannot tell a lie, says the banner above the stage.",
    "A tablet on the counter shows an AI model diagram.",
    "Lorem ipsum dolor sit amet is printed on a placeholder poster.",
])
def test_content_sentences_inside_a_caption_are_never_deleted(middle):
    answer = "A bakery counter stands in a small shop. " + middle + PAD
    caption = written(answer, description=answer)
    assert caption.text == answer  # every word kept; a doubtful one is at most flagged


def test_repeated_words_at_the_end_are_content_unless_the_answer_ran_away():
    answer = "A shop window with red letters." + PAD + ' A sign reads "no no no no no no" SALE SALE SALE SALE SALE SALE'
    assert written(answer, description=answer).text == answer
    assert og.cut_loop("A cat naps. " + "The cat naps. " * 5, cut_off=False) == "A cat naps. The cat naps."
    assert og.cut_loop("Tiles: red, white, red, white, red, white", cut_off=True) == "Tiles: red, white"


@pytest.mark.parametrize("tag", ["._.", "(^_^)", "^_^", ";)", ":d"])
def test_kaomoji_with_dots_and_brackets_keep_every_character(tag):
    assert og.normalize_tag(tag) == tag


@pytest.mark.parametrize(("answer", "rule"), [
    ("As requested, A girl stands in snow.", "lead-in"),
    ("A girl stands in snow.</s>", "chat token"),
    ("A girl stands in snow.<|im_end|>", "chat token"),
])
def test_more_task_talk_is_removed(answer, rule):
    caption = written(answer + PAD, description="A girl stands in snow." + PAD)
    assert caption.text.startswith("A girl stands in snow.") and rule in caption.fired


@pytest.mark.parametrize("tail", [" This caption is optimized for training.", " The user wants a caption.",
                                  " Tags: woman, meadow, dress."])
def test_meta_talk_is_removed_or_flagged_never_written_silently(tail):
    caption = written(TRAINING + tail, description=DESCRIPTION)
    assert "meta talk" in caption.fired
    assert caption.text == TRAINING or caption.review


@pytest.mark.parametrize("answer", ["-", "None", "Photo, ohwx", "photo."])
def test_the_prefix_trigger_or_a_placeholder_alone_is_no_caption(answer):
    spec = og.CaptionSpec(trigger="ohwx", prefix="photo")
    assert og.judge_caption(og.Answer(text=answer), spec).body == ""


def test_a_long_think_block_does_not_make_a_good_answer_a_runaway():
    draft = og.judge_caption(og.Answer(text="<think>" + "hmm " * 800 + "</think>\n" + TRAINING), og.CaptionSpec())
    assert draft.body == TRAINING and draft.problem == ""


def test_an_answer_cut_off_before_any_sentence_ended_is_flagged():
    caption = written("A woman walks " * 30 + "along the path toward a", cut_off=True, description=DESCRIPTION)
    assert "cut off" in caption.review


def test_many_unclosed_marks_and_quotes_stay_fast():
    for text in ("*a " * 20_000, 'He said "' + "It rains. " * 20_000):
        started = time.perf_counter()
        og.clean(text, og.STYLES["enhance"])
        # A guard against runaway backtracking (minutes), not a speed test: bench/policy.py measures speed.
        assert time.perf_counter() - started < 30


def test_a_short_api_key_does_not_blank_ordinary_words(ollama, capsys, monkeypatch, photo):
    monkeypatch.setenv("OLLAMA_API_KEY", "red")
    code, out, err = run(capsys, "caption", photo, "--json")
    assert code == 0 and "long red wool coat" in json.loads(out)["text"]
    assert ollama.requests_to("/api/chat")[0].headers["authorization"] == "Bearer red"


@pytest.mark.parametrize("answer", ["The tags are: 1girl, solo, smile", "Danbooru-style tags: 1girl, solo, smile",
                                    "Here are the tags:\n1girl, solo, smile"])
def test_a_tag_lead_in_goes_and_the_first_tag_stays(answer):
    cleaned = og.clean(answer, og.STYLES["tags"])
    assert cleaned.text == "1girl, solo, smile" and cleaned.fired == ["lead-in"]


@pytest.mark.parametrize(("answer", "tags"), [('{"tags": "1girl, solo, smile"}', "1girl, solo, smile"),
                                              ('{"caption": "x"}', "")])
def test_structured_answers_that_are_objects(answer, tags):
    assert og.clean(answer, og.STYLES["tags"]).text == tags
