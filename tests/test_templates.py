"""Prompt templates: every built-in one is complete, and a broken one fails loudly."""

from __future__ import annotations

import os

import pytest

import ollama_generate as og

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", sorted(og.TEMPLATE_FIELDS))
def test_every_builtin_template_renders(name):
    values = {field: f"<{field}>" for field in og.TEMPLATE_FIELDS[name]}
    text = og.render(name, **values)
    for value in values.values():
        assert value in text
    assert "$" not in text.replace("$$", "")


def test_every_template_file_is_known():
    files = {name[:-4] for name in os.listdir(os.path.join(ROOT, "prompts")) if name.endswith(".txt")}
    assert files == set(og.TEMPLATE_FIELDS)


def test_six_caption_templates_exist_and_the_short_variant_has_its_own():
    captions = [name for name in og.TEMPLATE_FIELDS if name.startswith("caption_") and name != "caption_short"]
    assert sorted(captions) == sorted(
        f"caption_{style}{mood}" for style in og.CAPTION_STYLES for mood in ("", "_creative"))
    assert len(captions) == 6
    # --variants: short asks with caption_short in both moods; long is the training row again.
    assert {og.STYLES[name].template for name in ("short", "short-creative")} == {"caption_short"}
    assert (og.STYLES["long"].template, og.STYLES["long-creative"].template) == (
        og.STYLES["training"].template, og.STYLES["training-creative"].template)
    # Each caption style and its -creative row in the style table asks with its own template.
    assert sorted(og.STYLES[style + mood].template for style in og.CAPTION_STYLES
                  for mood in ("", "-creative")) == sorted(captions)


def test_template_placeholders_in_order_without_escapes():
    assert og.template_placeholders("$b and ${a}, $b again, $$c") == ["b", "a"]


@pytest.fixture
def prompts(tmp_path, monkeypatch):
    """A private templates folder that load_template() searches first."""
    monkeypatch.setattr(og, "template_dirs", lambda: [str(tmp_path)])
    return tmp_path


def test_missing_placeholders_are_listed_together(prompts):
    (prompts / "describe.txt").write_text("Write a card for $model_name.\n")
    with pytest.raises(og.OllamaError) as caught:
        og.render("describe", model_name="x", lora_type="style", tags="none", dataset="none")
    assert str(caught.value) == f"template {prompts / 'describe.txt'} is missing $lora_type, $tags, $dataset"
    assert caught.value.hint == "describe.txt takes $model_name, $lora_type, $tags, $dataset"


def test_unknown_placeholders_are_listed_together(prompts):
    (prompts / "lore.txt").write_text("$scenario in $words words, $tone and $mood\n")
    with pytest.raises(og.OllamaError, match=r"lore.txt uses unknown \$tone, \$mood$"):
        og.render("lore", scenario="s", words=1)


def test_missing_and_unknown_in_one_error(prompts):
    (prompts / "prompt_t5.txt").write_text("Describe $idea\n")
    with pytest.raises(og.OllamaError, match=r"is missing \$concept; uses unknown \$idea$"):
        og.render("prompt_t5", concept="c")


def test_stray_dollar_is_reported_with_its_line(prompts):
    (prompts / "prompt_clip.txt").write_text("$concept\ncosts $ 5\n")
    with pytest.raises(og.OllamaError, match=r"has a stray \$ on line 2 \(write \$\$ for a dollar sign\)"):
        og.render("prompt_clip", concept="c")


def test_dollar_escape_renders_a_dollar(prompts):
    (prompts / "prompt_clip.txt").write_text("$concept for $$5\n")
    assert og.render("prompt_clip", concept="fox") == "fox for $5\n"


def test_missing_template_file_names_where_it_looked(prompts):
    with pytest.raises(og.OllamaError) as caught:
        og.load_template("lore")
    assert str(caught.value) == f"prompt template lore.txt was not found (looked in {prompts})"
    assert "reinstall" in caught.value.hint


def test_templates_are_found_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, text = og.load_template("caption_tags")
    assert path == os.path.join(ROOT, "prompts", "caption_tags.txt")
    assert "$description" in text


def test_installed_location_is_searched(tmp_path, monkeypatch):
    import sys

    # Installed, the module has no prompts/ beside it: pip's data folders are searched.
    monkeypatch.setattr(og, "__file__", str(tmp_path / "ollama_generate.py"))
    dirs = og.template_dirs()
    assert dirs[0] == str(tmp_path / "prompts")
    assert os.path.join(sys.prefix, "share", "ollama-generate", "prompts") in dirs


def test_a_checkout_uses_its_own_prompts_folder():
    assert og.template_dirs() == [os.path.join(ROOT, "prompts")]
