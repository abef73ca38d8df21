"""caption --variants: several captions per image from one description, as lines of one file or as
one file per variant, against the fake server."""

from __future__ import annotations

import json
import os

import pytest
from cli import run, run_exit
from traced import DESCRIPTION, SHORT, TAGS, TRAINING, make_images, og_render, realistic_answer

import ollama_generate as og


@pytest.fixture
def fake(ollama):
    ollama.default_text = realistic_answer
    return ollama


def chats(fake):
    return [r for r in fake.requests_to("/api/chat") if r.body.get("messages")]


def caption_prompts(fake):
    return [r.body["prompt"] for r in fake.requests_to("/api/generate") if r.body.get("prompt")]


def asked(*templates):
    """The text prompts one image's variants send, in order."""
    return [og.render(name, description=DESCRIPTION) + "\n/no_think" for name in templates]


def laid_out(trigger="", prefix=""):
    """What each variant's answer becomes with the trigger and prefix, laid out by the code's own rules."""
    def prose(text):
        body = og.continue_after_chunk(text) if trigger or prefix else text
        return og.layout_caption(body, trigger=trigger, prefix=prefix)

    return {"short": prose(SHORT), "long": prose(TRAINING), "training": prose(TRAINING),
            "tags": og.layout_caption(", ".join(og.arrange_tags(TAGS.split(", "), trigger=trigger, prefix=prefix)[0]),
                                      trigger=trigger, prefix=prefix)}


def test_lines_one_vision_call_and_one_text_call_per_variant(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    code, out, err = run(capsys, "caption", dataset, "--variants", "short,long,tags", "--trigger", "ohwx",
                         "--jobs", "1", "--report", tmp_path / "r.json")
    assert (code, out) == (0, ""), err
    assert len(chats(fake)) == 2
    assert caption_prompts(fake) == asked("caption_short", "caption_training", "caption_tags") * 2
    want = laid_out(trigger="ohwx")
    for name in "ab":
        assert (dataset / f"{name}.txt").read_text() == f"{want['short']}\n{want['long']}\n{want['tags']}\n"
        assert not (dataset / f"{name}.tags.txt").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert [[(one["variant"], one["text"]) for one in record["variants"]] for record in report["captions"]] == [
        [("short", want["short"]), ("long", want["long"]), ("tags", want["tags"])]] * 2
    assert report["needs_review"] == []


def test_files_one_per_variant_with_trigger_and_prefix_and_a_rerun_asks_nothing(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    flags = ("--variants", "training,tags,short", "--variants-to", "files", "--trigger", "ohwx",
             "--prefix", "photo")
    assert run(capsys, "caption", dataset, *flags)[0] == 0
    want = laid_out(trigger="ohwx", prefix="photo")
    assert {name: (dataset / name).read_text() for name in ("a.txt", "a.tags.txt", "a.short.txt")} == {
        "a.txt": want["training"] + "\n", "a.tags.txt": want["tags"] + "\n", "a.short.txt": want["short"] + "\n"}
    before = (len(chats(fake)), len(caption_prompts(fake)))
    code, _out, err = run(capsys, "caption", dataset, *flags)
    assert code == 0 and (len(chats(fake)), len(caption_prompts(fake))) == before
    # A set only partly there is kept as it is; --overwrite writes the whole set again.
    (dataset / "a.short.txt").unlink()
    (dataset / "a.txt").write_text("my own words\n")
    code, _out, err = run(capsys, "caption", dataset, *flags)
    assert code == 0 and "only part of its variant captions exist (a.txt, a.tags.txt" in err
    assert (dataset / "a.txt").read_text() == "my own words\n" and not (dataset / "a.short.txt").exists()
    assert run(capsys, "caption", dataset, *flags, "--overwrite")[0] == 0
    assert (dataset / "a.short.txt").read_text() == want["short"] + "\n"
    assert (dataset / "a.txt").read_text() == want["training"] + "\n"


def test_each_variant_is_judged_on_its_own_range_and_review_names_it(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    two = SHORT + " Snowflakes fall around her."
    fake.default_text = lambda rec: two if og_render("caption_short") in rec.body.get("prompt", "") \
        else realistic_answer(rec)
    code, _out, err = run(capsys, "caption", dataset, "--variants", "long,short", "--report", tmp_path / "r.json")
    assert code == 0, err
    # The short one was out of range, asked again once, and kept for review; long was not asked again.
    prompts = caption_prompts(fake)
    assert len(prompts) == 3 and prompts[0] == asked("caption_training")[0]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["needs_review"] == [{"image": "a.png", "rules": [],
                                       "reason": "short: it has 2 sentences; a short caption has 1 to 1"}]
    assert (dataset / "a.txt").read_text() == f"{TRAINING}\n{two}\n"


def test_a_variant_that_fails_fails_the_image_and_writes_no_file(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    fake.default_text = lambda rec: "" if rec.body.get("format") or og_render("caption_tags") in \
        rec.body.get("prompt", "") else realistic_answer(rec)
    code, _out, err = run(capsys, "caption", dataset, "--variants", "training,tags", "--variants-to", "files")
    assert code == 1
    assert "a.png: the tags variant: the text model" in err
    assert sorted(os.listdir(dataset)) == [".ollama-generate", "a.png"]


def test_single_image_prints_every_variant_on_its_own_line(fake, capsys, tmp_path):
    image = make_images(tmp_path / "set", ["a.png"]) / "a.png"
    code, out, err = run(capsys, "caption", image, "--variants", "short,tags", "--no-cache")
    assert (code, out) == (0, f"{SHORT}\n{laid_out()['tags']}\n"), err
    assert len(chats(fake)) == 1


def test_dry_run_lists_every_variant_file(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    code, out, _err = run(capsys, "caption", dataset, "--variants", "long,tags,short", "--variants-to", "files",
                          "--dry-run")
    assert code == 0
    assert out.endswith(f"-> {dataset / 'a.txt'}, {dataset / 'a.tags.txt'}, {dataset / 'a.short.txt'}\n")
    code, out, _err = run(capsys, "caption", dataset, "--variants", "long,tags", "--dry-run", "--json")
    assert json.loads(out)["dry_run"][0]["caption_files"] == [str(dataset / "a.txt")]
    assert fake.requests_to("/api/chat") == [] and fake.requests_to("/api/generate") == []


@pytest.mark.parametrize(("spec", "message"), [
    ("short,medium", "--variants names unknown caption styles: 'medium'"),
    ("tags,short,tags", "--variants names tags more than once"),
    ("training,tags,detailed,short,long,training", "--variants names training more than once"),
    ("training,,tags", "--variants names unknown caption styles: ''"),
])
def test_a_bad_spec_is_a_usage_error_listing_the_choices(fake, capsys, tmp_path, spec, message):
    dataset = make_images(tmp_path / "set", ["a.png"])
    code, out, err = run(capsys, "caption", dataset, "--variants", spec)
    assert (code, out) == (2, "")
    assert err == (f"ollama-generate: error: {message}\nollama-generate: hint: choose from training, tags, "
                   "detailed, short, long, e.g. --variants short,long\n")
    assert fake.requests == []


def test_more_variants_than_the_limit_are_refused(monkeypatch):
    monkeypatch.setattr(og, "MAX_VARIANTS", 2)
    with pytest.raises(og.UsageError, match="names 3 styles; at most 2"):
        og.parse_variants("short,long,tags")


def test_variants_to_works_on_a_folder_only(fake, capsys, tmp_path):
    image = make_images(tmp_path / "set", ["a.png"]) / "a.png"
    code, _out, err = run(capsys, "caption", image, "--variants", "short,long", "--variants-to", "files")
    assert code == 2 and "--variants-to works on a folder" in err
    assert run_exit(capsys, "caption", image, "--variants-to", "both")[0] == 2


def test_manifest_has_a_column_per_variant_read_by_datasets(fake, capsys, tmp_path, monkeypatch):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    for layout in ("lines", "files"):
        assert run(capsys, "caption", dataset, "--variants", "long,tags,short", "--variants-to", layout,
                   "--overwrite", "--manifest")[0] == 0
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            monkeypatch.setenv(name, "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        import datasets

        rows = datasets.load_dataset("imagefolder", data_dir=str(dataset),
                                     cache_dir=str(tmp_path / layout))["train"]
        assert rows.column_names == ["image", "text", "text_tags", "text_short"]
        want = laid_out()
        assert [(row["text"], row["text_tags"], row["text_short"]) for row in rows] == \
            [(want["long"], want["tags"], want["short"])] * 2


def test_stats_takes_variant_files_for_the_images_own(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    assert run(capsys, "caption", dataset, "--variants", "training,tags", "--variants-to", "files")[0] == 0
    code, out, _err = run(capsys, "stats", dataset, "--json")
    assert code == 0 and json.loads(out)["orphans"] == []
    code, out, _err = run(capsys, "stats", dataset, "--ext", ".tags.txt", "--json")
    assert code == 0 and json.loads(out)["captioned"] == 1


def test_review_edits_the_first_line_and_keeps_the_other_variants(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    assert run(capsys, "caption", dataset, "--variants", "short,tags")[0] == 0
    review = og.ReviewDataset(str(dataset), og.BatchOptions(), config=og.Config())
    before = (dataset / "a.txt").read_text()
    review.write([("a.png", str(dataset / "a.txt"), "A woman in a red coat.")], by="review")
    assert (dataset / "a.txt").read_text() == "A woman in a red coat.\n" + before.split("\n", 1)[1]
