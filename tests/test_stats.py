"""stats: what a dataset holds, read through caption's own walk, on datasets built here."""

from __future__ import annotations

import json
import os

import pytest
from cli import run, run_exit
from traced import DESCRIPTION, make_images

import ollama_generate as og

# -- helpers -------------------------------------------------------------------------------------


def dataset(folder, captions: dict, images=()):
    """Tiny PNGs named by captions' keys (and images); a caption of None is left unwritten."""
    make_images(folder, [*captions, *images])
    for name, text in captions.items():
        if text is not None:
            (folder / name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    return folder


def stats(capsys, *argv):
    """The --json document of a stats run that must succeed quietly."""
    code, out, err = run(capsys, "stats", *argv, "--json")
    assert (code, err) == (0, ""), err
    return json.loads(out)


def item(data, name):
    return next(entry for entry in data["items"] if entry["image"] == name)


TAGS = "1girl, solo, black hair, long hair, blue eyes, smile, park, bench, snow, tree"
# 10 tags each; with the trigger in front they are short for the tags style (20 to 40).

# -- counts --------------------------------------------------------------------------------------


def test_counts_images_captions_orphans_and_unreadable_images(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"a.png": TAGS, "b.jpg": "cat, sofa, window", "c.png": None,
                                        "d.png": "", "bad.png": "dog, lawn, ball"},
                     images=["sub/deep.png"])
    (folder / "d.txt").write_text("  \n\n")  # only whitespace: as empty as an empty file
    (folder / "orphan.txt").write_text("no image for this\n")
    (folder / "sub" / "deep.txt").write_text("a deep caption\n")
    data = stats(capsys, folder)
    assert (data["images"], data["captioned"], data["missing"], data["empty"]) == (5, 3, 1, 1)
    assert data["orphans"] == ["orphan.txt"]
    assert data["unreadable"] == [{"image": "bad.png", "reason": "the file is empty"}]
    assert item(data, "c.png")["flags"] == ["missing"]
    assert item(data, "d.png")["flags"] == ["empty"]
    assert item(data, "bad.png")["flags"][0] == "unreadable image"
    assert item(data, "bad.png")["caption"] == "dog, lawn, ball"
    # --recursive reads the subfolder too: its image, and its caption is no orphan.
    deep = stats(capsys, folder, "--recursive")
    assert (deep["images"], deep["captioned"], deep["orphans"]) == (6, 4, ["orphan.txt"])
    assert item(deep, "sub/deep.png")["caption"] == "a deep caption"


def test_symlinked_special_and_broken_caption_files_are_never_read(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"link.png": None, "fifo.png": None, "latin.png": None,
                                        "ok.png": "a cat"})
    (tmp_path / "secret.txt").write_text("the secret caption\n")
    (folder / "link.txt").symlink_to(tmp_path / "secret.txt")
    os.mkfifo(folder / "fifo.txt")  # reading it would wait for ever
    (folder / "latin.txt").write_bytes(b"caf\xe9 au lait\n")
    code, out, err = run(capsys, "stats", folder, "--json")
    assert (code, err) == (0, "")
    assert "secret" not in out
    data = json.loads(out)
    assert data["unreadable_captions"] == [
        {"image": "fifo.png", "reason": "the caption file is a FIFO"},
        {"image": "latin.png", "reason": "the caption file is not UTF-8"},
        {"image": "link.png", "reason": "the caption file is a symbolic link"}]
    assert (data["images"], data["captioned"], data["missing"], data["empty"]) == (4, 1, 0, 0)
    assert item(data, "link.png")["caption"] is None
    assert item(data, "link.png")["reasons"] == {"unreadable caption": "the caption file is a symbolic link"}


def test_an_oversized_caption_file_is_unreadable(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"a.png": None})
    (folder / "a.txt").write_text("tag, " * 20000)
    data = stats(capsys, folder)
    assert data["unreadable_captions"] == [{"image": "a.png", "reason": "the caption file is over 64 KB"}]


def test_a_dataset_without_captions(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"a.png": None, "b.png": None})
    data = stats(capsys, folder)
    assert (data["captioned"], data["missing"], data["style"], data["tags"]) == (0, 2, None, [])
    assert data["distributions"]["words"] == {"min": None, "median": None, "max": None}
    code, out, err = run(capsys, "stats", folder)
    assert (code, err) == (0, "")
    assert out == (f"{folder}: 2 images, 0 captioned, 2 missing, 0 empty, 0 orphan caption files, "
                   "0 unreadable images\nImage sizes: smallest 2x2 (a.png), median 0 MP, largest 2x2 "
                   "(b.png); 2 under 1024x1024 pixels (trainers upscale them; --json names them)\n"
                   "Missing captions (2):\n  a.png\n  b.png\n"
                   "Trigger: none found (give one with --trigger WORD)\n")


def test_output_dir_and_ext_are_where_caption_writes(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"a.png": None, "b.png": None}, images=["sub/c.png"])
    out_dir = tmp_path / "captions"
    (out_dir / "sub").mkdir(parents=True)
    (out_dir / "a.caption").write_text("a cat\n")
    (out_dir / "sub" / "c.caption").write_text("a dog\n")
    (out_dir / "gone.caption").write_text("an orphan\n")
    (folder / "b.txt").write_text("beside the image, not where --output-dir puts it\n")
    data = stats(capsys, folder, "--output-dir", out_dir, "--ext", "caption", "--recursive")
    assert (data["captioned"], data["missing"], data["orphans"]) == (2, 1, ["gone.caption"])
    assert item(data, "sub/c.png")["caption_file"] == str(out_dir / "sub" / "c.caption")
    assert item(data, "b.png")["flags"] == ["missing"]


# -- measures, ranges and the CLIP budget -----------------------------------------------------------


def test_measures_and_distributions(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"a.png": "a cat. a dog.", "b.png": "one, two, three",
                                        "c.png": "red, green, blue, cyan, black"})
    data = stats(capsys, folder)
    assert {key: item(data, "a.png")[key] for key in ("words", "sentences", "tags", "style")} == {
        "words": 4, "sentences": 2, "tags": 1, "style": "tags"}
    assert data["distributions"]["tags"] == {"min": 1, "median": 3, "max": 5}
    assert data["distributions"]["words"] == {"min": 3, "median": 4, "max": 5}
    assert item(data, "b.png")["clip_tokens"] == og.estimate_clip_tokens("one, two, three")


def test_over_clip_budget_and_out_of_range(capsys, tmp_path):
    long_tags = ", ".join(f"intricate ornament number{n}" for n in range(25))
    short_prose = "A woman in a red coat stands in a snowy park at dusk."
    in_range = ", ".join(("smile park bench snow tree lamp sky cloud moon sun rain cat dog bird fish road car "
                          "boat sea hill rock leaf wall door cup").split())
    folder = dataset(tmp_path / "set", {"long.png": long_tags, "short.png": short_prose, "ok.png": in_range})
    data = stats(capsys, folder)
    tokens = og.estimate_clip_tokens(long_tags)
    assert tokens > 75
    assert data["over_clip_budget"] == ["long.png"]
    assert item(data, "long.png")["reasons"]["over CLIP budget"] == (
        f"about {tokens} CLIP tokens, over the 75-token budget")
    # Prose is for T5-based models: the CLIP budget is not held against it (as in caption).
    assert og.estimate_clip_tokens(short_prose) < 75 and "over CLIP budget" not in item(data, "short.png")["flags"]
    assert data["out_of_range"] == [{"image": "short.png", "reason": (
        "it has 13 words, 1 sentence; the training style has 50 to 150 words, "
        "the detailed style has 2 to 4 sentences")}]
    assert item(data, "ok.png")["flags"] == []


def test_a_long_prose_caption_is_not_over_the_clip_budget(capsys, tmp_path):
    prose = ("A young woman with short black hair stands in a snowy park at dusk, wearing a long red wool "
             "coat. She holds a paper cup of coffee in her right hand while snow falls on the bench.")
    data = stats(capsys, dataset(tmp_path / "set", {"a.png": prose}))
    assert item(data, "a.png")["style"] == "prose"
    assert item(data, "a.png")["clip_tokens"] > 0
    assert data["over_clip_budget"] == []


# -- tags ----------------------------------------------------------------------------------------


def test_tag_frequencies_count_each_tag_once_per_caption(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"a.png": "smile, Park, smile, tree", "b.png": "park, smile",
                                        "c.png": "tree, park, bench."})
    data = stats(capsys, folder)
    assert data["style"] == "tags"
    assert data["tags"] == [["park", 3], ["smile", 2], ["tree", 2], ["bench", 1]]


def test_prose_frequencies_are_words_and_phrases(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"a.png": "A woman in a red coat walks through the snowy park.",
                                        "b.png": "A man in a red coat waits in the snowy park.",
                                        "c.png": "A dog sleeps by the fire."})
    data = stats(capsys, folder)
    assert data["style"] == "prose"
    assert data["tags"][:3] == [["red coat", 2], ["snowy park", 2], ["woman", 1]]
    assert ["dog", 1] in data["tags"]


def test_top_limits_the_text_but_not_the_json(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"a.png": "one, two, three, four", "b.png": "one, two, five"})
    code, out, err = run(capsys, "stats", folder, "--top", "2")
    assert (code, err) == (0, "")
    assert "Top tags (2 of 5):\n  one 2, two 2\n" in out
    assert len(stats(capsys, folder, "--top", "2")["tags"]) == 5


# -- duplicates ----------------------------------------------------------------------------------


def test_exact_and_near_duplicates(capsys, tmp_path):
    near = TAGS.replace("tree", "lamp")  # one tag of ten differs: 9 of 11 shared
    folder = dataset(tmp_path / "set", {"a.png": TAGS, "b.png": TAGS.upper().replace(", ", ",  "),
                                        "c.png": near, "d.png": "a cat, sofa, window, cushion",
                                        "e.png": "a cat, sofa, window, blanket, lamp, rug"})
    data = stats(capsys, folder)
    assert data["duplicates"] == [["a.png", "b.png"]]
    assert data["near_duplicates"] == [["a.png", "b.png", "c.png"]]
    assert item(data, "a.png")["reasons"] == {"out of range": item(data, "a.png")["reasons"]["out of range"],
                                              "duplicate": "the same caption as b.png",
                                              "near duplicate": "nearly the same caption as c.png"}
    assert item(data, "c.png")["reasons"]["near duplicate"] == "nearly the same caption as a.png, b.png"
    assert "duplicate" not in item(data, "d.png")["flags"] and "near duplicate" not in item(data, "d.png")["flags"]


def test_near_duplicates_agree_with_comparing_every_pair(tmp_path):
    import itertools
    import random

    rng = random.Random(7)
    for _ in range(40):
        items = []
        for number in range(25):
            tags = rng.sample([f"t{n}" for n in range(10)], rng.randint(3, 8))
            entry = og.StatsItem(f"{number:02d}.png", "x")
            og._measure(entry, ", ".join(tags))
            items.append(entry)
        keyed = {}
        for entry in items:
            keyed.setdefault(entry.key, []).append(entry)
        keys = list(keyed)
        parent = list(range(len(keys)))

        def root(node):
            while parent[node] != node:
                node = parent[node]
            return node

        for first, second in itertools.combinations(range(len(keys)), 2):
            one, two = set(keyed[keys[first]][0].chunks), set(keyed[keys[second]][0].chunks)
            if min(len(one), len(two)) >= 3 and len(one & two) * 5 >= 4 * len(one | two):
                parent[root(first)] = root(second)
        groups = {}
        for position in range(len(keys)):
            groups.setdefault(root(position), []).append(position)
        expected = sorted(sorted(entry.name for position in members for entry in keyed[keys[position]])
                          for members in groups.values() if len(members) > 1)
        assert og._near_duplicates(items, "") == expected


# -- trigger -------------------------------------------------------------------------------------


def test_trigger_first_missing_and_repeated(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {
        "first.png": "ohwx, 1girl, smile", "woman.png": "ohwx woman, smile",
        "late.png": "1girl, ohwx, smile", "twice.png": "ohwx, 1girl, ohwx, smile",
        "none.png": "1girl, smile", "word.png": "ohwxy, smile"})
    data = stats(capsys, folder, "--trigger", "OHWX")
    assert data["trigger"] == {"word": "ohwx", "source": "--trigger", "captions": 4, "first": 3,
                               "missing": ["none.png", "word.png"], "not_first": ["late.png"],
                               "repeated": ["twice.png"]}
    assert "trigger not first" in item(data, "late.png")["flags"]
    assert "trigger not first" not in item(data, "woman.png")["flags"]
    assert item(data, "twice.png")["reasons"]["trigger repeated"] == "ohwx is there 2 times"
    assert item(data, "none.png")["reasons"]["missing trigger"] == "ohwx is not in the caption"


def test_a_prefix_every_caption_has_may_come_before_the_trigger(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"a.png": "score_9, ohwx, smile", "b.png": "score_9, ohwx, tree",
                                        "c.png": "score_9, 1girl, ohwx"})
    data = stats(capsys, folder, "--trigger", "ohwx")
    assert (data["trigger"]["first"], data["trigger"]["not_first"]) == (2, ["c.png"])


def test_without_trigger_the_most_common_first_chunk_is_taken(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"a.png": "1girl, mira, smile", "b.png": "1girl, mira, tree",
                                        "c.png": "1girl, mira, park"})
    data = stats(capsys, folder)
    assert data["trigger"]["word"] == "mira" and data["trigger"]["source"] == "first chunk"
    assert data["trigger"]["first"] == 3  # after 1girl, which every caption starts with
    # Most, not all: the chunk first in at least half the captions.
    folder = dataset(tmp_path / "two", {"a.png": "mira, smile", "b.png": "mira, tree", "c.png": "tree, mira",
                                        "d.png": "park"})
    data = stats(capsys, folder)
    assert (data["trigger"]["word"], data["trigger"]["missing"], data["trigger"]["not_first"]) == (
        "mira", ["d.png"], ["c.png"])


def test_no_trigger_when_no_first_chunk_is_common(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"a.png": "smile, tree", "b.png": "tree, park", "c.png": "1girl, x",
                                        "d.png": "1girl, y"})
    data = stats(capsys, folder)
    assert data["trigger"] == {"word": None, "source": None, "captions": 0, "first": 0, "missing": [],
                               "not_first": [], "repeated": []}


# -- identity leakage ----------------------------------------------------------------------------

CHARACTER = {
    "a.png": "ohwx, 1girl, black hair, long hair, blue eyes, red coat, smile, park",
    "b.png": "ohwx, 1girl, black hair, long hair, blue eyes, sitting, bench",
    "c.png": "ohwx, 1girl, black hair, long hair, blue eyes, red coat, snow",
    "d.png": "ohwx, 1girl, black hair, short hair, green eyes, street, night",
}


def test_identity_leakage_with_a_trigger(capsys, tmp_path):
    data = stats(capsys, dataset(tmp_path / "set", CHARACTER), "--trigger", "ohwx")
    assert data["identity"] == [
        {"phrase": "black hair", "share": 1.0, "trait": "hair colour", "captions": 4},
        {"phrase": "blue eyes", "share": 0.75, "trait": "eye colour", "captions": 3},
        {"phrase": "long hair", "share": 0.75, "trait": "hair length", "captions": 3}]
    # red coat is in 2 of 4: half, but fewer than IDENTITY_MIN_CAPTIONS captions.
    assert data["exclude_tags"] == '--exclude-tags "black hair, blue eyes, long hair"'


def test_identity_leakage_takes_the_first_chunk_as_trigger_without_one(capsys, tmp_path):
    data = stats(capsys, dataset(tmp_path / "set", CHARACTER))
    assert data["trigger"]["word"] == "ohwx"
    assert [entry["phrase"] for entry in data["identity"]] == ["black hair", "blue eyes", "long hair"]


def test_no_identity_leakage_without_any_trigger(capsys, tmp_path):
    captions = {name: text.replace("ohwx, ", "") for name, text in CHARACTER.items()}
    captions["e.png"] = "solo, black hair, long hair, blue eyes"
    data = stats(capsys, dataset(tmp_path / "set", captions))
    assert data["trigger"]["word"] is None  # 1girl and solo are never triggers
    assert (data["identity"], data["exclude_tags"]) == ([], None)
    assert ["black hair", 5] in data["tags"]


def test_identity_leakage_in_prose_captions(capsys, tmp_path):
    captions = {
        "a.png": "mira, a woman with long, wavy black hair and green eyes wears a red wool coat in a park.",
        "b.png": "mira, a woman with long black hair sits on a bench in a red coat and black gloves.",
        "c.png": "mira, a woman with black hair and green eyes reads a book by the window.",
        "d.png": "mira, a woman with long black hair and green eyes walks a dog in the rain."}
    code, out, err = run(capsys, "stats", dataset(tmp_path / "set", captions), "--trigger", "mira")
    assert (code, err) == (0, "")
    data = json.loads(run(capsys, "stats", tmp_path / "set", "--trigger", "mira", "--json")[1])
    assert [(entry["phrase"], entry["share"]) for entry in data["identity"]] == [
        ("black hair", 1.0), ("green eyes", 0.75), ("long hair", 0.75)]
    assert data["exclude_tags"] is None  # --exclude-tags works on tag captions only
    assert ("Identity leakage: these traits are in most captions, so mira cannot absorb them:\n"
            "  black hair               100%  hair colour\n"
            "  green eyes                75%  eye colour\n"
            "  long hair                 75%  hair length\n"
            "  to leave them out: remove them in the captions, or recaption with a --hint that says "
            "the trigger stands for them\n") in out


def test_identity_phrases_reads_the_trait_table():
    assert og.identity_phrases("very long hair") == {"very long hair": "hair length"}
    assert og.identity_phrases("light brown hair") == {"light brown hair": "hair colour"}
    assert og.identity_phrases("blue school uniform") == {"blue school uniform": "outfit"}
    assert og.identity_phrases("mole under eye") == {"mole": "body mark"}
    assert og.identity_phrases("dark-skinned female") == {"dark-skinned female": "skin"}
    assert og.identity_phrases("cat ears") == {"cat ears": "body"}
    assert og.identity_phrases("black hair and blue eyes") == {"black hair": "hair colour",
                                                                "blue eyes": "eye colour"}
    for not_a_trait in ("holding cup", "looking at viewer", "white background", "her eyes are blue"):
        assert og.identity_phrases(not_a_trait) == {}


# -- needs review from the last run's report -----------------------------------------------------


def test_needs_review_comes_from_a_real_caption_run_report(ollama, capsys, tmp_path):
    folder = make_images(tmp_path / "set", ["a.png"])
    report = tmp_path / "run.json"
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply("A woman.", endpoint="/api/generate")
    ollama.reply("A woman in a coat.", endpoint="/api/generate")
    assert run(capsys, "caption", folder, "--report", report)[0] == 0
    reason = "it has 5 words; a training caption has 50 to 150"
    data = stats(capsys, folder, "--report", report)
    assert data["needs_review"] == [{"image": "a.png", "reason": reason, "rules": []}]
    assert data["report"] == str(report)
    assert item(data, "a.png")["reasons"]["needs review"] == reason
    # Without --report, the copy of its report every run keeps in .ollama-generate/ is read.
    assert json.loads((folder / ".ollama-generate" / "last-report.json").read_text()) == json.loads(report.read_text())
    data = stats(capsys, folder)
    assert (data["needs_review"][0]["image"], data["report"]) == (
        "a.png", str(folder / ".ollama-generate" / "last-report.json"))
    code, out, err = run(capsys, "stats", folder)
    assert f"Needs review (from {folder / '.ollama-generate' / 'last-report.json'}) (1):\n  a.png: {reason}\n" in out


def test_a_broken_default_report_is_a_warning_and_a_symlinked_one_is_not_read(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"a.png": "a cat"})
    (folder / ".ollama-generate").mkdir()
    last = folder / ".ollama-generate" / "last-report.json"
    last.write_text("{not json")
    code, out, err = run(capsys, "stats", folder, "--json")
    assert code == 0 and json.loads(out)["needs_review"] == []
    assert err.startswith(f"ollama-generate: warning: {last} cannot be used: ")
    last.unlink()
    (tmp_path / "elsewhere.json").write_text(json.dumps({"needs_review": [{"image": "a.png", "reason": "x"}]}))
    last.symlink_to(tmp_path / "elsewhere.json")
    code, out, err = run(capsys, "stats", folder, "--json")
    assert (code, json.loads(out)["needs_review"]) == (0, [])
    assert err == (f"ollama-generate: warning: {last} cannot be used: not a regular file "
                   "(it is a symbolic link)\n")


def test_report_entries_for_other_images_or_malformed_are_left_out(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {"a.png": "a cat", "b.png": "a dog"})
    report = tmp_path / "run.json"
    report.write_text(json.dumps({"needs_review": [
        {"image": "a.png", "reason": "", "rules": ["hedge", 3]}, "junk", {"image": ["a.png"]},
        {"image": "gone.png", "reason": "deleted since"}]}))
    data = stats(capsys, folder, "--report", report)
    assert data["needs_review"] == [{"image": "a.png", "reason": "", "rules": ["hedge"]}]
    assert item(data, "a.png")["reasons"]["needs review"] == "hedge"
    assert "needs review" not in item(data, "b.png")["flags"]


# -- the document and the text -------------------------------------------------------------------


def test_json_keys_are_pinned(capsys, tmp_path):
    data = stats(capsys, dataset(tmp_path / "set", {"a.png": "a cat", "b.png": None}))
    assert list(data) == ["command", "folder", "images", "captioned", "missing", "empty",
                          "unreadable_captions", "orphans", "unreadable", "image_sizes", "style", "distributions",
                          "over_clip_budget", "out_of_range", "tags", "trigger", "duplicates",
                          "near_duplicates", "identity", "exclude_tags", "needs_review", "report", "items"]
    assert list(data["distributions"]) == ["words", "sentences", "tags", "clip_tokens"]
    assert list(data["trigger"]) == ["word", "source", "captions", "first", "missing", "not_first", "repeated"]
    assert item(data, "b.png") == {"image": "b.png", "caption_file": str(tmp_path / "set" / "b.txt"),
                                   "caption": None, "flags": ["missing"], "reasons": {}, "words": None,
                                   "sentences": None, "tags": None, "clip_tokens": None, "style": None,
                                   "width": 2, "height": 2}
    assert list(item(data, "a.png")) == list(item(data, "b.png"))
    assert set(og.STATS_FLAGS) >= {flag for entry in data["items"] for flag in entry["flags"]}


def test_dataset_stats_is_the_json_document(capsys, tmp_path):
    folder = dataset(tmp_path / "set", CHARACTER)
    options = og.BatchOptions()
    assert og.dataset_stats(str(folder), options, trigger="ohwx") == stats(capsys, folder, "--trigger", "ohwx")


def test_text_output(capsys, tmp_path):
    folder = dataset(tmp_path / "set", {**CHARACTER, "e.png": None, "f.png": CHARACTER["a.png"]})
    (folder / "old.txt").write_text("x\n")
    code, out, err = run(capsys, "stats", folder, "--top", "3")
    assert (code, err) == (0, "")
    tokens = sorted(og.estimate_clip_tokens(text) for text in [*CHARACTER.values(), CHARACTER["a.png"]])
    assert out == (
        f"{folder}: 6 images, 5 captioned, 1 missing, 0 empty, 1 orphan caption file, 0 unreadable images\n"
        "Image sizes: smallest 2x2 (a.png), median 0 MP, largest 2x2 (f.png); 6 under 1024x1024 pixels "
        "(trainers upscale them; --json names them)\n"
        "Orphan caption files (no image) (1):\n"
        "  old.txt\n"
        "Missing captions (1):\n"
        "  e.png\n"
        "Captions: tags style; min / median / max:\n"
        "  words           10      11    12\n"
        "  sentences        1       1     1\n"
        "  tags             7       7     8\n"
        f"  clip tokens  {tokens[0]:>5} {tokens[2]:>7} {tokens[4]:>5}\n"
        "Out of range (5):\n"
        "  a.png: it has 8 tags; the tags style has 20 to 40 tags\n"
        "  b.png: it has 7 tags; the tags style has 20 to 40 tags\n"
        "  c.png: it has 7 tags; the tags style has 20 to 40 tags\n"
        "  ... and 2 more (all in --json)\n"
        "Trigger ohwx (the most common first chunk): in 5 of 5 captions, first in 5\n"
        "Duplicate captions (1):\n"
        "  a.png = f.png\n"
        "Identity leakage: these traits are in most captions, so ohwx cannot absorb them:\n"
        "  black hair               100%  hair colour\n"
        "  blue eyes                 80%  eye colour\n"
        "  long hair                 80%  hair length\n"
        "  red coat                  60%  outfit\n"
        '  to leave them out of a new tag run: --exclude-tags "black hair, blue eyes, long hair, red coat"\n'
        "Top tags (3 of 15):\n"
        "  1girl 5, black hair 5, ohwx 5\n")


def test_text_histograms_on_a_terminal(capsys, tmp_path):
    data = stats(capsys, dataset(tmp_path / "set", {"a.png": "one", "b.png": "one, two", "c.png": "one, two"}))
    plain = og.format_stats(data, top=50).splitlines()
    text = og.format_stats(data, top=50, histograms={"tags": [1, 2, 2]}).splitlines()
    row = next(line for line in plain if line.startswith("  tags "))
    assert row == "  tags             1       2     2"
    assert text == [line + "  " + og.histogram([1, 2, 2]) if line == row else line for line in plain]
    assert og.histogram([1, 2, 2], bins=2) == "\u2584\u2588"
    assert og.histogram([5, 5]) == "\u2588" + " " * (og.HISTOGRAM_BINS - 1)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("setup", "extra", "message", "hint"), [
    ("missing", [], "{folder} does not exist", "give the dataset's folder"),
    ("file", [], "{folder} is not a folder", "give the dataset's folder"),
    ("empty", [], "{folder} has no images (.png, .jpg, .jpeg, .webp, .bmp, .gif, .mp4, .webm, .mov, .mkv, .avi); --recursive looks in "
                  "subfolders", None),
    ("ok", ["--ext", ".png"], "--ext '.png' is not a caption extension", "use .txt (the default) or .caption"),
    ("ok", ["--output-dir", "{tmp}/nowhere"], "--output-dir {tmp}/nowhere is not a folder",
     "give the folder a caption run wrote the captions into"),
    ("ok", ["--report", "{tmp}/nowhere.json"], "--report {tmp}/nowhere.json does not exist",
     "give the file a `caption FOLDER --report FILE` run wrote"),
    ("ok", ["--report", "{tmp}/list.json"], "--report {tmp}/list.json cannot be used: it is not the report "
                                            "of a caption run (it has no needs_review list)",
     "give the file a `caption FOLDER --report FILE` run wrote"),
])
def test_errors_are_one_line_and_a_hint(capsys, tmp_path, setup, extra, message, hint):
    folder = tmp_path / "set"
    if setup == "file":
        folder.write_text("x")
    elif setup == "empty":
        folder.mkdir()
    elif setup == "ok":
        dataset(folder, {"a.png": "a cat"})
    (tmp_path / "list.json").write_text("[]")
    argv = [part.format(tmp=tmp_path) for part in extra]
    code, out, err = run(capsys, "stats", folder, *argv)
    expected = f"ollama-generate: error: {message.format(folder=folder, tmp=tmp_path)}\n"
    if hint:
        expected += f"ollama-generate: hint: {hint}\n"
    assert (code, out, err) == (2, "", expected)


def test_top_must_be_a_positive_number(capsys, tmp_path):
    code, out, err = run_exit(capsys, "stats", tmp_path, "--top", "0")
    assert (code, out) == (2, "")
    assert err.startswith("ollama-generate: error: argument --top: must be 1 or more, got '0'\n")


def test_stats_needs_no_server(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9")  # nothing listens there
    data = stats(capsys, dataset(tmp_path / "set", {"a.png": "a cat"}))
    assert data["captioned"] == 1
