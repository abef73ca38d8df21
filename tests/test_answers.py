"""A corpus of raw answers as small local models send them, and the caption line each must become.

Every file in tests/fixtures/answers/ holds one answer and, per style, the line the
caption stage writes for it (null: the answer is unusable and is asked again or fails),
and optionally, per style, the cleaning rules that must flag it for review (none when
absent: the caption must come out clean). A fixture with the vision "description" the
answer was written from (the real answers of a small local model, category "real") lists
instead every reason the caption is listed as needs review: range, rules, inventions and
CLIP's budget. The answers go through judge_caption and finish_caption, the caption
stage's own calls. The expectations of the hand-made answers were written by hand from the
cleaning rules; those of the real answers were read and checked one by one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import ollama_generate as og

ANSWERS_DIR = Path(__file__).resolve().parent / "fixtures" / "answers"
STYLES = ("training", "detailed", "tags", "training-creative", "detailed-creative", "tags-creative")
CATEGORIES = frozenset({
    "think", "preamble", "refusal", "hedge", "loop", "markdown", "json-tags", "numbered",
    "quoted", "offer", "meta", "aside", "label", "filler", "boilerplate", "underscores",
    "kaomoji", "weights", "mixed-language", "truncated", "good", "real",
})
NAME = re.compile(r"^\d{3}-[a-z0-9]+(?:-[a-z0-9]+)*\.json$")


def _load() -> list[tuple[str, dict[str, Any]]]:
    fixtures = []
    for path in sorted(ANSWERS_DIR.glob("*.json")):
        with path.open(encoding="utf-8") as handle:
            fixtures.append((path.name, json.load(handle)))
    return fixtures


FIXTURES = _load()


def _categories(data: dict[str, Any]) -> list[str]:
    category = data.get("category", [])
    return [category] if isinstance(category, str) else list(category)


def _cases() -> list[Any]:
    cases = []
    for name, data in FIXTURES:
        for style in STYLES:
            if style in data.get("expected", {}):
                cases.append(pytest.param(
                    data["answer"], style, bool(data.get("cut_off", False)),
                    data["expected"][style], data.get("flags", {}).get(style, []), data.get("description"),
                    data.get("note", ""), id=f"{name.removesuffix('.json')}-{style}"))
    return cases


@pytest.mark.parametrize(("answer", "style", "cut_off", "expected", "flags", "description", "note"), _cases())
def test_answer_is_cleaned(answer: str, style: str, cut_off: bool, expected: str | None,
                           flags: list[str], description: str | None, note: str) -> None:
    spec = og.CaptionSpec(style=style.removesuffix("-creative"), creative=style.endswith("-creative"))
    draft = og.judge_caption(og.Answer(text=answer, done_reason="length" if cut_off else "stop"), spec)
    if expected is None:
        assert not draft.body, note
        return
    caption = og.finish_caption(draft, spec, description or "")
    assert caption.text == expected, note
    assert (caption.review if description is not None else draft.cleaned.flags) == flags, note


# -- The corpus itself ----------------------------------------------------------


@pytest.mark.parametrize(("name", "data"), FIXTURES, ids=[n for n, _ in FIXTURES])
def test_fixture_is_well_formed(name: str, data: dict[str, Any]) -> None:
    assert NAME.match(name), f"{name}: name must be NNN-short-name.json"
    assert {"answer", "cut_off", "note", "category", "expected"} <= set(data) <= {
        "answer", "cut_off", "note", "category", "expected", "flags", "description"}, name
    assert ("description" in data) == ("real" in _categories(data)), name
    assert set(data.get("flags", {})) <= set(data["expected"]), name
    assert isinstance(data["answer"], str) and data["answer"].strip()
    assert isinstance(data["cut_off"], bool)
    assert isinstance(data["note"], str) and data["note"].strip() and "\n" not in data["note"]
    categories = _categories(data)
    assert categories and set(categories) <= CATEGORIES, f"{name}: unknown category {categories}"
    expected = data["expected"]
    assert expected and set(expected) <= set(STYLES), f"{name}: expected needs 1-3 known styles"
    for style, value in expected.items():
        if value is None:
            continue
        assert isinstance(value, str) and value == value.strip() and value, (name, style)
        assert "\n" not in value and "  " not in value, f"{name}/{style}: must be one clean line"
        if style.startswith("tags"):
            tags = value.split(", ")
            assert all(t and t == t.strip() and "," not in t for t in tags), name
            assert len(tags) == len(set(tags)) and len(tags) <= 40, name
            assert not value.endswith((",", ".")), name
        else:
            assert value[0] == value[0].upper(), f"{name}/{style}: starts with a capital"


def test_corpus_size_and_coverage() -> None:
    assert len(FIXTURES) >= 100
    real = [n for n, d in FIXTURES if "real" in _categories(d)]
    assert len(real) >= 30, real
    # No real answer is written silently: each comes out clean (checked by hand) or needs review.
    silent = [n for n, d in FIXTURES if "real" in _categories(d)
              and any(d["expected"][s] is not None and not d["flags"][s] for s in d["expected"])]
    assert len(silent) <= len(real) // 3, silent
    with_tags = [n for n, d in FIXTURES if "tags" in d["expected"]]
    with_training = [n for n, d in FIXTURES if "training" in d["expected"]]
    assert len(with_tags) >= 30, with_tags
    assert len(with_training) >= 30, with_training
    covered = {c for _, d in FIXTURES for c in _categories(d)}
    assert covered == CATEGORIES, f"missing categories: {sorted(CATEGORIES - covered)}"
    good = [n for n, d in FIXTURES if "good" in _categories(d)]
    assert len(good) >= 10, good
    assert len({n[:3] for n, _ in FIXTURES}) == len(FIXTURES), "numbers must be unique"
