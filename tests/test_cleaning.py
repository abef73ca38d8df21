"""Cleaning model answers, and placing the trigger and prefix: the policy layer, table-driven.

Every test goes through the production entry points: clean(answer, style) for one answer, and
judge_caption + finish_caption, the two calls the caption stage makes, for a whole caption line.
"""

from __future__ import annotations

import re

import pytest

import ollama_generate as og

CAPTION = "A red fox sits in fresh snow under a pale winter sky."


def caption(raw: str, style: str = "training", *, trigger: str = "", prefix: str = "", cut_off: bool = False,
            description: str = "") -> str | None:
    """The caption line the caption stage writes for one answer (None: the answer is unusable)."""
    spec = og.CaptionSpec(style=style, trigger=trigger, prefix=prefix)
    draft = og.judge_caption(og.Answer(text=raw, done_reason="length" if cut_off else "stop"), spec)
    return og.finish_caption(draft, spec, description).text if draft.body else None
LOWER = "a" + CAPTION[1:]

# (raw answer as a model might send it, the cleaned prose line)
PROSE = [
    ("plain", CAPTION, CAPTION),
    ("think block", f"<think>The user wants a caption.\nLet me look.</think>\n{CAPTION}", CAPTION),
    ("empty think block", f"<think>\n\n</think>\n\n{CAPTION}", CAPTION),
    ("thinking tag", f"<thinking>hmm</thinking>{CAPTION}", CAPTION),
    ("closing tag only", f"Okay so the fox is red.\n</think>\n{CAPTION}", CAPTION),
    ("unclosed think", f"{CAPTION}\n<think>I should also mention", CAPTION),
    ("here is", f"Here is the caption:\n{CAPTION}", CAPTION),
    ("here's a caption", f"Here's a training caption for the image: {CAPTION}", CAPTION),
    ("sure here is", f"Sure! Here is your caption:\n\n{CAPTION}", CAPTION),
    ("certainly", f"Certainly. {CAPTION}", CAPTION),
    ("caption label", f"Caption: {CAPTION}", CAPTION),
    ("bold label", f"**Caption:** {CAPTION}", CAPTION),
    ("final caption label", f"Final caption: {CAPTION}", CAPTION),
    ("double quotes", f'"{CAPTION}"', CAPTION),
    ("curly quotes", f"\u201c{CAPTION}\u201d", CAPTION),
    ("single quotes", f"'{CAPTION}'", CAPTION),
    ("code fence", f"```\n{CAPTION}\n```", CAPTION),
    ("code fence with language", f"```text\n{CAPTION}\n```", CAPTION),
    ("heading", f"## Caption\n{CAPTION}", CAPTION),
    ("heading with text", f"### A fox\n{CAPTION}", CAPTION),
    ("horizontal rule", f"{CAPTION}\n---", CAPTION),
    ("blockquote", f"> {CAPTION}", CAPTION),
    ("here you go", f"Here you go! {CAPTION}", CAPTION),
    ("sure comma here", f"Sure, here is the caption: {CAPTION}", CAPTION),
    ("detailed description preamble", f"Certainly! Here's a detailed description of the image:\n{CAPTION}", CAPTION),
    ("word count note", f"{CAPTION}\n\n(Word count: 87)", CAPTION),
    ("italic note", f"{CAPTION}\n\n*Note: hair colour omitted*", CAPTION),
    ("inline note", f"{CAPTION} Note: I omitted the background.", CAPTION),
    ("words in brackets", f"{CAPTION} (12 words)", CAPTION),
    ("apostrophe inside single quotes", "'A woman's umbrella is red.'", "A woman's umbrella is red."),
    # Captions that only look like chatter stay whole.
    ("sure as content", "Sure, a woman in the rain.", "Sure, a woman in the rain."),
    ("alright as content", "Alright, a woman stands in the rain.", "Alright, a woman stands in the rain."),
    ("great as a name", "Great Wall of China at sunset, with tourists.", "Great Wall of China at sunset, with tourists."),
    ("ok as a name", "OK Corral replica in a desert town.", "OK Corral replica in a desert town."),
    ("here are as content", "Here are two women walking: one holds an umbrella.",
     "Here are two women walking: one holds an umbrella."),
    ("two quotes inside", '"OPEN" sign and "CLOSED" sign', '"OPEN" sign and "CLOSED" sign'),
    ("bold words", "A **red fox** sits in *fresh* snow.", "A red fox sits in fresh snow."),
    ("trailing offer", f"{CAPTION}\n\nLet me know if you'd like any changes!", CAPTION),
    ("inline offer", f"{CAPTION} Let me know if you need another version.", CAPTION),
    ("hope this helps", f"{CAPTION}\nI hope this helps!", CAPTION),
    ("would you like", f"{CAPTION}\n\nWould you like a shorter version?", CAPTION),
    ("feel free", f"{CAPTION} Feel free to ask for tweaks.", CAPTION),
    ("everything at once",
     f"<think>x</think>Sure! Here's the caption:\n\n\"{CAPTION}\"\n\nLet me know if you want more.",
     CAPTION),
    ("several lines", "A red fox sits in fresh snow.\nThe sky is pale.", "A red fox sits in fresh snow. The sky is pale."),
    ("extra whitespace", "  A red   fox\tsits.  ", "A red fox sits."),
    ("bullets", "- A red fox\n- fresh snow", "A red fox fresh snow"),
    ("quoted word inside stays", 'A sign reads "OPEN" above the door.', 'A sign reads "OPEN" above the door.'),
    ("apostrophes stay", "The fox's tail isn't visible.", "The fox's tail isn't visible."),
    ("only think", "<think>all reasoning, no answer</think>", ""),
    ("only preamble", "Here is the caption:", ""),
]


@pytest.mark.parametrize(("raw", "expected"), [case[1:] for case in PROSE], ids=[c[0] for c in PROSE])
def test_clean_prose(raw, expected):
    assert og.clean(raw, og.STYLES["training"]).text == expected


# (raw tag answer, the tags we keep)
TAGS = [
    ("plain", "1girl, solo, red hair, smile", ["1girl", "solo", "red hair", "smile"]),
    ("trailing comma and period", "1girl, solo, smile,.", ["1girl", "solo", "smile"]),
    ("trailing period", "1girl, solo, smile.", ["1girl", "solo", "smile"]),
    ("newlines", "1girl\nsolo\nsmile", ["1girl", "solo", "smile"]),
    ("bullets", "- 1girl\n- solo\n* smile", ["1girl", "solo", "smile"]),
    ("numbered", "1. 1girl\n2. solo\n3) smile", ["1girl", "solo", "smile"]),
    ("duplicates any case", "1girl, Solo, solo, SOLO, smile", ["1girl", "solo", "smile"]),
    ("empties", "1girl,, ,solo , ,", ["1girl", "solo"]),
    ("preamble", "Here are the tags:\n1girl, solo", ["1girl", "solo"]),
    ("label", "Tags: 1girl, solo", ["1girl", "solo"]),
    ("think", "<think>tags...</think>1girl, solo", ["1girl", "solo"]),
    ("quoted tags", '"1girl", "solo"', ["1girl", "solo"]),
    ("spaces collapse", "  long   hair ,  blue eyes ", ["long hair", "blue eyes"]),
    ("semicolons", "1girl; solo; smile", ["1girl", "solo", "smile"]),
    ("trailing offer", "1girl, solo\nLet me know if you need more tags.", ["1girl", "solo"]),
    ("kaomoji stays", "1girl, ^_^, smile", ["1girl", "^_^", "smile"]),
    ("note after tags", "1girl, solo\n\nNote: I omitted the background.", ["1girl", "solo"]),
    ("score tags keep underscores", "score_9, score_8_up, long_hair", ["score_9", "score_8_up", "long hair"]),
]


@pytest.mark.parametrize(("raw", "expected"), [case[1:] for case in TAGS], ids=[c[0] for c in TAGS])
def test_clean_tags(raw, expected):
    assert og.clean(raw, og.STYLES["tags"]).text.split(", ") == expected


@pytest.mark.parametrize(
    ("raw", "style", "trigger", "prefix", "expected"),
    [
        (CAPTION, "training", "", "", CAPTION),
        (CAPTION, "training", "ohwx", "", f"ohwx, {LOWER}"),
        (CAPTION, "training", "", "photo", f"photo, {LOWER}"),
        (CAPTION, "training", "ohwx", "photo", f"photo, ohwx, {LOWER}"),
        (CAPTION, "training", "ohwx", "photo, ", f"photo, ohwx, {LOWER}"),
        (CAPTION, "detailed", "ohwx", "", f"ohwx, {LOWER}"),
        # A name or acronym keeps its capital; only common openers are lower-cased.
        ("Tokyo at night.", "training", "ohwx", "", "ohwx, Tokyo at night."),
        ("THE END sign.", "training", "ohwx", "", "ohwx, THE END sign."),
        # Removing the model's trigger leaves no stray punctuation behind.
        ("A woman walks through snow, ohwx.", "training", "ohwx", "", "ohwx, a woman walks through snow."),
        ("A woman (ohwx) ; smiles.", "training", "ohwx", "", "ohwx, a woman; smiles."),
        # The model wrote the trigger itself: code removes its copies.
        ("ohwx, a red fox sits in snow.", "training", "ohwx", "", "ohwx, a red fox sits in snow."),
        ("A photo of OHWX fox, ohwx sitting in snow.", "training", "ohwx", "",
         "ohwx, a photo of fox, sitting in snow."),
        # A trigger inside a longer word is not the trigger.
        ("The ohwxian fox sits.", "training", "ohwx", "", "ohwx, the ohwxian fox sits."),
        # The prefix already holds the trigger: it is not added twice.
        (CAPTION, "training", "ohwx", "ohwx woman", f"ohwx woman, {LOWER}"),
        # A lower-case answer is capitalised only when it starts the line.
        ("a red fox.", "training", "", "", "A red fox."),
        # Tags: trigger first, prefix tags before it, duplicates of either dropped.
        ("1girl, solo, smile", "tags", "ohwx", "", "ohwx, 1girl, solo, smile"),
        ("1girl, OHWX, solo", "tags", "ohwx", "", "ohwx, 1girl, solo"),
        ("score_9, 1girl, solo", "tags", "ohwx", "score_9, score_8_up", "score_9, score_8_up, ohwx, 1girl, solo"),
        ("1girl\nsolo\nsmile.", "tags", "", "", "1girl, solo, smile"),
        # The trigger inside a longer tag is removed too: it appears once, first.
        ("ohwx woman, 1girl, OHWX, solo", "tags", "ohwx", "", "ohwx, woman, 1girl, solo"),
        ("woman, ohwx woman, 1girl", "tags", "ohwx", "", "ohwx, woman, 1girl"),
        # Special characters in the trigger are taken literally.
        ("a c++ fox", "training", "c++", "", "c++, a fox"),
    ],
)
def test_the_caption_line_places_prefix_and_trigger(raw, style, trigger, prefix, expected):
    line = caption(raw, style, trigger=trigger, prefix=prefix)
    assert line == expected
    assert "\n" not in line
    if prefix:
        assert line.startswith(prefix.rstrip(", "))
    if trigger:
        chunks = [chunk.strip().lower() for chunk in line.split(",")]
        assert trigger.lower() in chunks[: len(prefix.split(",")) + 1] or trigger.lower() in prefix.lower()
        words = re.findall(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", line, re.I)
        assert len(words) == 1


@pytest.mark.parametrize("raw", ["", "   ", "<think>only thoughts</think>", "Here is the caption:", '""', ",,, ."])
@pytest.mark.parametrize("style", og.CAPTION_STYLES)
def test_an_answer_with_no_caption_content_is_unusable(raw, style):
    assert caption(raw, style, trigger="ohwx", prefix="photo") is None


def test_tags_that_only_repeat_the_trigger_are_empty():
    assert caption("ohwx, OHWX", "tags", trigger="ohwx") is None


def test_strip_think_keeps_text_between_blocks():
    assert og.strip_think("<think>a</think>One. <think>b</think>Two.") == "One. Two."


def test_strip_chatter_keeps_markdown_for_model_cards():
    card = "Intro paragraph.\n\n## How to use\n- **weight** 0.8"
    answer = f"Here is the model card:\n{card}\n\nLet me know if you want changes."
    assert og.clean(answer, og.STYLES["describe"]).text == card


def test_model_thinks_by_prompt_only_for_qwen3():
    assert og.model_thinks_by_prompt("qwen3-30b-a3b:latest")
    assert og.model_thinks_by_prompt("qwen3-vl:32b")
    assert og.model_thinks_by_prompt("hf.co/someone/Qwen3-8B-GGUF:Q4_K_M")
    assert not og.model_thinks_by_prompt("llama3.2")
    assert not og.model_thinks_by_prompt("qwen2.5vl:7b")


@pytest.mark.parametrize(
    ("raw", "style", "expected"),
    [
        ("1girl, solo, long hair, red ha", "tags", "1girl, solo, long hair"),
        ("A fox sits in snow. Its tail curls around", "training", "A fox sits in snow."),
        ("A fox sits in snow and", "detailed", "A fox sits in snow and"),
    ],
)
def test_an_answer_cut_off_at_the_token_limit_loses_its_unfinished_end(raw, style, expected):
    assert caption(raw, style, cut_off=True) == expected
