"""The caption command end to end: two stages, what is sent, what is written, what is skipped."""

from __future__ import annotations

import base64
import os
import re

import pytest
from cli import run
from images import jpeg_bytes, png_bytes
from traced import ANSWERS, DESCRIPTION, TAGS, TRAINING

import ollama_generate as og

# In-range answers (the real ranges apply): a 71-word training caption whose every concrete
# word the description supports.
CAPTION = TRAINING


def numbered_description(name):
    """A description of image `name`, so its caption can be traced back to it."""
    return f"Picture {name} seen. {DESCRIPTION}"


def numbered_caption(name):
    """An in-range training caption of image `name`, as the model writes it (lower-case start)."""
    return f"picture {name} seen. {TRAINING}"


def written(name):
    """numbered_caption(name) as the caption file holds it: capitalised, one line."""
    return f"Picture {name} seen. {TRAINING}\n"




def queue_pair(ollama, description=DESCRIPTION, caption=CAPTION):
    ollama.reply(description, endpoint="/api/chat")
    ollama.reply(caption, endpoint="/api/generate")


def test_single_image_two_stages_and_stdout_only_the_caption(ollama, capsys, photo):
    queue_pair(ollama)
    code, out, err = run(capsys, "caption", photo)
    assert (code, out, err) == (0, CAPTION + "\n", "")
    assert [(r.method, r.path) for r in ollama.requests] == [
        ("GET", "/api/version"), ("POST", "/api/show"), ("POST", "/api/show"), ("POST", "/api/chat"),
        ("POST", "/api/generate")]  # the version says it is Ollama, and whether shift:false is understood
    assert [r.body["model"] for r in ollama.requests_to("/api/show")] == ["qwen3-vl:32b", "qwen3-30b-a3b:latest"]

    vision = ollama.requests_to("/api/chat")[0].body
    assert vision["model"] == "qwen3-vl:32b"
    assert vision["stream"] is True and vision["think"] is False
    assert vision["options"] == {"temperature": 0.2, "num_predict": 1024, "num_ctx": 8192}
    system, user = vision["messages"]
    assert system == {"role": "system", "content": og.render("vision_system")}
    assert user["role"] == "user"
    assert user["content"] == og.render("vision_user") + "\n/no_think"
    assert user["images"] == [base64.b64encode(png_bytes()).decode()]

    text = ollama.requests_to("/api/generate")[0].body
    assert text["model"] == "qwen3-30b-a3b:latest"
    assert text["prompt"] == og.render("caption_training", description=DESCRIPTION) + "\n/no_think"
    assert text["options"] == {"temperature": 0.3, "num_predict": 512, "num_ctx": 8192}
    assert text["stream"] is True and text["think"] is False
    # An in-range answer is not asked again: exactly one text request.
    assert len(ollama.requests_to("/api/generate")) == 1
    # A single image gets no caption file; its description goes to the cache beside it.
    assert sorted(os.listdir(photo.parent)) == [".ollama-generate", "photo.png"]
    assert not [name for name in os.listdir(photo.parent) if name.endswith(".txt")]


@pytest.mark.parametrize("style", og.CAPTION_STYLES)
@pytest.mark.parametrize("creative", [False, True])
def test_style_and_creative_pick_the_template_and_temperature(ollama, capsys, photo, style, creative):
    template = f"caption_{style}" + ("_creative" if creative else "")
    queue_pair(ollama, caption=ANSWERS[template])  # in range for that style and mood
    argv = ["caption", photo, "--style", style] + (["--creative"] if creative else [])
    code, out, err = run(capsys, *argv)
    assert (code, out) == (0, ANSWERS[template] + "\n")
    if template == "caption_tags_creative":  # 30 tags, some long: over CLIP's budget, written and flagged
        assert re.fullmatch(r"ollama-generate: warning: needs review: about \d+ CLIP tokens, "
                            r"over the 75-token budget\n", err)
    else:
        assert err == ""
    assert len(ollama.requests_to("/api/generate")) == 1
    text = ollama.requests_to("/api/generate")[0].body
    assert text["prompt"] == og.render(template, description=DESCRIPTION) + "\n/no_think"
    assert text["options"]["temperature"] == (0.8 if creative else 0.3)


def test_short_creative_flag(ollama, capsys, photo):
    queue_pair(ollama)
    run(capsys, "caption", photo, "-c")
    assert ollama.requests_to("/api/generate")[0].body["prompt"].startswith(
        og.render("caption_training_creative", description=DESCRIPTION))


def test_the_vision_answer_is_cleaned_before_the_text_stage(ollama, capsys, photo):
    queue_pair(ollama, description=f"<think>looking</think>Here is a description:\n{DESCRIPTION}")
    run(capsys, "caption", photo)
    assert ollama.requests_to("/api/generate")[0].body["prompt"] == (
        og.render("caption_training", description=DESCRIPTION) + "\n/no_think")


def test_trigger_and_prefix_placed_by_code(ollama, capsys, photo):
    body = CAPTION[0].lower() + CAPTION[1:]
    assert ", wearing a long red wool coat" in body
    answer = "Here's the caption: ohwx, " + body.replace(", wearing a long", ", OHWX wearing a long")
    queue_pair(ollama, caption=answer)
    code, out, err = run(capsys, "caption", photo, "--trigger", "ohwx", "--prefix", "photo")
    assert (code, out, err) == (0, f"photo, ohwx, {body}\n", "")
    # The model is never asked to place the trigger.
    assert "ohwx" not in ollama.requests_to("/api/generate")[0].body["prompt"]


def test_tags_are_deduplicated_with_trigger_first(ollama, capsys, photo):
    assert TAGS.startswith("1girl, solo, short hair, ")
    answer = "Tags: " + TAGS.replace("solo, short hair, ", "solo, Solo, short hair,\n") + ", ohwx."
    queue_pair(ollama, caption=answer)
    code, out, err = run(capsys, "caption", photo, "--style", "tags", "--trigger", "ohwx")
    assert (code, out, err) == (0, f"ohwx, {TAGS}\n", "")
    assert len(ollama.requests_to("/api/generate")) == 1


def test_vision_model_flag_and_environment(ollama, capsys, photo, monkeypatch):
    ollama.add_model("llava:latest", capabilities=("completion", "vision"))
    monkeypatch.setenv("OLLAMA_VISION_MODEL", "gemma3")
    queue_pair(ollama)
    assert run(capsys, "caption", photo, "--vision-model", "llava")[0] == 0
    assert ollama.requests_to("/api/chat")[0].body["model"] == "llava"
    # llava is not qwen3: no /no_think in its message.
    assert ollama.requests_to("/api/chat")[0].body["messages"][1]["content"] == og.render("vision_user")


def make_dataset(folder, names):
    folder.mkdir(exist_ok=True)
    for seed, name in enumerate(names):
        data = jpeg_bytes() if name.lower().endswith((".jpg", ".jpeg")) else png_bytes(seed=seed)
        (folder / name).write_bytes(data)
    return folder


def test_folder_writes_a_caption_beside_each_image(ollama, capsys, tmp_path):
    dataset = make_dataset(tmp_path / "set", ["b.png", "a.jpg", "C.PNG"])
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in dataset.iterdir()}
    for n in range(3):
        queue_pair(ollama, description=numbered_description(n), caption=numbered_caption(n))
    code, out, err = run(capsys, "caption", dataset, "--trigger", "ohwx")
    assert (code, out) == (0, "")
    assert (dataset / "C.txt").read_text() == f"ohwx, {numbered_caption(0)}\n"
    assert (dataset / "a.txt").read_text() == f"ohwx, {numbered_caption(1)}\n"
    assert (dataset / "b.txt").read_text() == f"ohwx, {numbered_caption(2)}\n"
    lines = err.splitlines()
    assert lines[:3] == ["[1/3] C.PNG: written", "[2/3] a.jpg: written", "[3/3] b.png: written"]
    assert lines[3].startswith("Done after ")
    assert lines[3].endswith(": 3 written, 0 skipped, 0 failed (of 3 images).")
    assert lines[4].endswith("images/min; 6 model calls, 0 descriptions from the cache, 0 model loads seen.")
    # --jobs auto (the default) learned 1 at once from three images; the speed line says so.
    assert lines[5].startswith(f"{ollama.url}: vision ") and "(1 at once, learned)" in lines[5]
    assert len(lines) == 6
    # Each image's own bytes went to the vision model, in sorted order.
    sent = [r.body["messages"][1]["images"][0] for r in ollama.requests_to("/api/chat")]
    assert sent == [base64.b64encode((dataset / n).read_bytes()).decode() for n in ["C.PNG", "a.jpg", "b.png"]]
    # The images are untouched, and nothing but the captions was added.
    assert {n: (dataset / n).read_bytes() for n in before} == {n: b for n, (b, _) in before.items()}
    assert {n: (dataset / n).stat().st_mtime_ns for n in before} == {n: t for n, (_, t) in before.items()}
    assert sorted(p.name for p in dataset.iterdir()) == [
        ".ollama-generate", "C.PNG", "C.txt", "a.jpg", "a.txt", "b.png", "b.txt"]
    # Both models were checked once, up front.
    assert len(ollama.requests_to("/api/show")) == 2
    assert [r.path for r in ollama.requests[:3]] == ["/api/version", "/api/show", "/api/show"]


def test_folder_skips_existing_captions_unless_overwrite(ollama, capsys, tmp_path):
    dataset = make_dataset(tmp_path / "set", ["a.png", "b.png"])
    (dataset / "a.txt").write_text("keep me\n")
    queue_pair(ollama, caption=numbered_caption("new b"))
    code, out, err = run(capsys, "caption", dataset)
    assert code == 0
    assert (dataset / "a.txt").read_text() == "keep me\n"
    assert (dataset / "b.txt").read_text() == written("new b")
    assert err.splitlines()[:2] == [
        "Skipping 1 image that already has a caption (--overwrite redoes them).",
        "[1/1] b.png: written",
    ]
    assert ": 1 written, 1 skipped, 0 failed (of 2 images)." in err
    assert len(ollama.requests_to("/api/chat")) == 1

    queue_pair(ollama, caption=numbered_caption("fresh a"))
    queue_pair(ollama, caption=numbered_caption("fresh b"))
    code, out, err = run(capsys, "caption", dataset, "--overwrite")
    assert code == 0
    assert (dataset / "a.txt").read_text() == written("fresh a")
    assert (dataset / "b.txt").read_text() == written("fresh b")


def test_folder_all_captioned_makes_no_model_call(ollama, capsys, tmp_path):
    dataset = make_dataset(tmp_path / "set", ["a.png"])
    (dataset / "a.txt").write_text("done\n")
    code, out, err = run(capsys, "caption", dataset)
    assert (code, out) == (0, "")
    assert ollama.generation_requests() == []
    assert ": 0 written, 1 skipped, 0 failed (of 1 image)." in err


def test_bad_images_are_reported_never_sent_and_the_run_goes_on(ollama, capsys, tmp_path):
    dataset = make_dataset(tmp_path / "set", ["a.png", "d.png"])
    (dataset / "b.jpg").write_bytes(b"this is not a jpeg")
    (dataset / "c.png").write_bytes(b"")
    queue_pair(ollama, caption=numbered_caption("a"))
    queue_pair(ollama, caption=numbered_caption("d"))
    code, out, err = run(capsys, "caption", dataset)
    assert (code, out) == (1, "")
    assert (dataset / "a.txt").read_text() == written("a")
    assert (dataset / "d.txt").read_text() == written("d")
    assert not (dataset / "b.txt").exists() and not (dataset / "c.txt").exists()
    assert len(ollama.requests_to("/api/chat")) == 2
    lines = err.splitlines()
    # The vision stage finds the bad files; the text stage then writes the good ones.
    assert lines[:4] == [
        "[1/4] b.jpg: failed: not a supported image (its bytes are not PNG, JPEG, WebP, BMP or GIF)",
        "[2/4] c.png: failed: the file is empty",
        "[3/4] a.png: written",
        "[4/4] d.png: written",
    ]
    assert lines[4].endswith(": 2 written, 0 skipped, 2 failed (of 4 images).")
    assert lines[6].startswith(f"{ollama.url}: vision ")
    assert lines[7:] == [
        "Failed:",
        "  b.jpg: not a supported image (its bytes are not PNG, JPEG, WebP, BMP or GIF)",
        "  c.png: the file is empty",
        "ollama-generate: error: 2 of 4 images failed",
        "ollama-generate: hint: fix or remove them and run the same command again; finished captions are kept",
    ]


def test_an_empty_caption_is_a_failure_not_an_empty_file(ollama, capsys, tmp_path):
    dataset = make_dataset(tmp_path / "set", ["a.png", "b.png"])
    queue_pair(ollama, caption="Here is the caption:")
    ollama.reply("<think>still nothing</think>", endpoint="/api/generate")  # asked again: no better
    queue_pair(ollama, caption=numbered_caption("b"))
    code, out, err = run(capsys, "caption", dataset)
    assert code == 1
    assert not (dataset / "a.txt").exists()
    assert (dataset / "b.txt").read_text() == written("b")
    assert "[1/2] a.png: failed: the text model qwen3-30b-a3b:latest gave an empty answer" in err


def test_an_empty_description_fails_that_image(ollama, capsys, tmp_path):
    dataset = make_dataset(tmp_path / "set", ["a.png"])
    ollama.reply("<think>hmm</think>", endpoint="/api/chat")
    ollama.reply("", endpoint="/api/chat")  # asked again, once
    code, out, err = run(capsys, "caption", dataset)
    assert code == 1
    assert "[1/1] a.png: failed: the vision model qwen3-vl:32b gave an empty description, twice" in err
    assert [r for r in ollama.requests_to("/api/generate") if r.body.get("prompt")] == []


def test_single_bad_image_is_an_error(ollama, capsys, tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"GIF89a but cut")
    code, out, err = run(capsys, "caption", path)
    assert (code, out) == (1, "")
    assert err == f"ollama-generate: error: {path}: the GIF file is truncated\n"
    assert ollama.generation_requests() == []


def test_path_not_found(ollama, capsys, tmp_path):
    code, out, err = run(capsys, "caption", tmp_path / "nope")
    assert (code, out) == (2, "")
    assert err == f"ollama-generate: error: {tmp_path / 'nope'} does not exist\n"
    assert ollama.requests == []


def test_folder_without_images(ollama, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    code, out, err = run(capsys, "caption", tmp_path)
    assert (code, out) == (2, "")
    assert err == (f"ollama-generate: error: {tmp_path} has no images (.png, .jpg, .jpeg, .webp, .bmp, .gif, .mp4, .webm, .mov, .mkv, .avi); "
                   "--recursive looks in subfolders\n")
    assert ollama.requests == []


def test_a_caption_written_meanwhile_is_not_overwritten(ollama, capsys, tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "set", ["a.png", "b.png", "c.png"])
    real_write = og.write_caption_file
    real_caption = og.write_caption

    def write_and_race(path, caption):
        real_write(path, caption)
        if path.endswith("a.txt"):  # another process captions b meanwhile
            (dataset / "b.txt").write_text("b by someone else\n")

    def caption_then_race(client, config, spec, description, **kwargs):
        text = real_caption(client, config, spec, description, **kwargs)
        if description == numbered_description("c"):  # ... and c while its caption is being written
            (dataset / "c.txt").write_text("c by someone else\n")
        return text

    monkeypatch.setattr(og, "write_caption_file", write_and_race)
    monkeypatch.setattr(og, "write_caption", caption_then_race)
    for name in "abc":
        queue_pair(ollama, description=numbered_description(name), caption=numbered_caption(name))
    code, out, err = run(capsys, "caption", dataset)
    assert code == 0
    assert (dataset / "a.txt").read_text() == written("a")
    assert (dataset / "b.txt").read_text() == "b by someone else\n"
    assert (dataset / "c.txt").read_text() == "c by someone else\n"
    assert "[2/3] b.png: skipped (caption appeared during the run; kept it)" in err
    assert "[3/3] c.png: skipped (caption appeared during the run; kept it)" in err
    # b's caption was never asked for: the check comes before each stage's model call.
    prompts = [r.body["prompt"] for r in ollama.requests_to("/api/generate") if r.body.get("prompt")]
    assert len(prompts) == 2 and numbered_description("b") not in " ".join(prompts)
    assert numbered_description("a") in prompts[0] and numbered_description("c") in prompts[1]


def test_a_folder_that_cannot_be_written_is_refused_before_model_calls(ollama, capsys, tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "set", ["a.png"])
    monkeypatch.setattr(og.os, "access", lambda path, mode: False)
    code, out, err = run(capsys, "caption", dataset)
    assert (code, out) == (2, "")
    assert err == f"ollama-generate: error: cannot write caption files into {dataset} (permission denied)\n"
    assert ollama.requests == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trigger", "ohwx, woman"],
         "--trigger must be one word or phrase without commas, got 'ohwx, woman'"),
        (["--prefix", "line one\nline two"], "--prefix must be a single line: a caption file is one line"),
    ],
)
def test_caption_flag_values_are_checked(ollama, capsys, photo, argv, message):
    code, out, err = run(capsys, "caption", photo, *argv)
    assert (code, out) == (2, "")
    assert err.splitlines()[0] == f"ollama-generate: error: {message}"
    assert ollama.requests == []


def test_a_trigger_with_stray_commas_is_tidied(ollama, capsys, photo):
    queue_pair(ollama)
    code, out, err = run(capsys, "caption", photo, "--trigger", " ohwx , ")
    assert out == "ohwx, " + CAPTION[0].lower() + CAPTION[1:] + "\n"


def test_a_dangling_link_is_reported_not_ignored(ollama, capsys, tmp_path):
    dataset = make_dataset(tmp_path / "set", ["a.png"])
    (dataset / "b.png").symlink_to(tmp_path / "gone.png")
    queue_pair(ollama)
    code, out, err = run(capsys, "caption", dataset)
    assert code == 1
    assert "[1/2] b.png: failed: cannot read the file (No such file or directory)" in err


def test_a_single_file_that_is_not_an_image_needs_no_server(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    code, out, err = run(capsys, "caption", path)
    assert (code, out) == (1, "")
    assert err == (f"ollama-generate: error: {path}: not a supported image (its bytes are not PNG, JPEG, "
                   "WebP, BMP or GIF)\n")


def test_a_cut_off_caption_loses_its_unfinished_end(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat")
    ollama.reply(TAGS + ", sno", endpoint="/api/generate", done_reason="length")
    code, out, err = run(capsys, "caption", photo, "--style", "tags")
    assert (code, out, err) == (0, TAGS + "\n", "")
    assert len(ollama.requests_to("/api/generate")) == 1


def test_an_empty_description_at_the_token_limit_says_so(ollama, capsys, photo):
    # The model spent its whole answer thinking: asked once more with 4x the budget, then a
    # clear error that says the model thinks and suggests an -instruct tag (issue 8).
    for _ in range(2):
        ollama.reply("<think>looking at every pixel", endpoint="/api/chat", done_reason="length")
    code, out, err = run(capsys, "caption", photo)
    assert (code, out) == (1, "")
    error, hint = err.splitlines()
    assert error == ("ollama-generate: error: the model qwen3-vl:32b spent its whole answer thinking "
                     "and wrote nothing, twice")
    assert hint.startswith("ollama-generate: hint: use a variant that does not think, such as an "
                           "-instruct tag of qwen3-vl")
    # --max-tokens does not reach the vision stage (its num_predict is fixed), so it is no fix here.
    assert "--max-tokens" not in hint
    chats = ollama.requests_to("/api/chat")
    assert [c.body["options"]["num_predict"] for c in chats] == [1024, 4 * 1024]
    assert all(c.body["think"] is False for c in chats)
    assert ollama.requests_to("/api/generate") == []
