"""Issue 9, the file side: odd file names, links, FIFOs, empty and foreign captions, a cache that
cannot be trusted or written, signals, stale temp files, special report paths, big images, and the
messages around them. Every test writes captions with the real length ranges."""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from cli import run, run_exit
from images import png_bytes
from traced import CACHE, VISION, make_images

import ollama_generate as og

pytestmark = pytest.mark.strict_ranges

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "ollama_generate.py")

DESCRIPTION = "A red fox sits in fresh snow beside a wooden fence under a pale morning sky."
PARAGRAPH = ("A red fox sits in fresh snow beside a weathered wooden fence, its thick winter coat glowing "
             "against the pale morning light. Frost clings to the fence rails and the bare birch trees behind "
             "it. The fox looks toward the camera with calm amber eyes, ears alert, tail curled around its "
             "paws. Soft shadows fall across the untouched snow, and a faint mist hangs over the distant field.")


def answer(rec) -> str:
    """A description for the vision stage, a caption in the training range (68 words) for the text stage."""
    return DESCRIPTION if rec.path == "/api/chat" else PARAGRAPH


@pytest.fixture
def fake(ollama):
    ollama.default_text = answer
    return ollama


def chats(fake):
    return fake.requests_to("/api/chat")


def caption_prompts(fake):
    return [r.body["prompt"] for r in fake.requests_to("/api/generate") if r.body.get("prompt")]


@contextlib.contextmanager
def no_hang(seconds: float = 10.0):
    """Fail a test that blocks (on a FIFO) instead of hanging the suite."""
    def timed_out(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fifo_reader(path):
    """A FIFO with a reader that never blocks; read() returns what was written to it."""
    os.mkfifo(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)

    def read() -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(fd)
        return b"".join(chunks)

    return read


# -- 4. file names that are not UTF-8, lone surrogates -------------------------------------------


def test_a_file_name_that_is_not_utf8_works_end_to_end(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    raw = os.path.join(os.fsencode(str(dataset)), b"caf\xe9.png")
    with open(raw, "wb") as handle:
        handle.write(png_bytes(seed=7))
    report, manifest = tmp_path / "r.json", dataset / "metadata.jsonl"

    code, out, err = run(capsys, "caption", dataset, "--dry-run")
    assert (code, out.splitlines()[1]) == (0, f"caption: caf\\xe9.png (2x2) -> {dataset}/caf\\xe9.txt")

    code, out, err = run(capsys, "caption", dataset, "--report", report, "--manifest", manifest)
    assert (code, out) == (0, "")
    assert "caf\\xe9.png: written" in err
    assert "Traceback" not in err and "internal error" not in err
    with open(os.path.join(os.fsencode(str(dataset)), b"caf\xe9.txt"), encoding="utf-8") as handle:
        assert handle.read() == PARAGRAPH + "\n"
    assert json.loads(report.read_text(encoding="utf-8"))["written"] == 2
    # No file_name could name it for `datasets`: the manifest leaves it out and says so.
    assert [json.loads(line)["file_name"] for line in manifest.read_text(encoding="utf-8").splitlines()] == [
        "a.png"]
    assert f"warning: {manifest} leaves out 1 image whose file name is not UTF-8 (caf\\xe9.png)" in err
    cached = [json.loads(line) for line in (dataset / CACHE).read_text(encoding="utf-8").splitlines()]
    assert [line["image"] for line in cached] == ["a.png", "caf\\xe9.png"]

    # A rerun skips both and asks nothing; with --json the document is valid UTF-8 JSON.
    asked = len(chats(fake))
    code, out, err = run(capsys, "caption", dataset, "--overwrite", "--json")
    assert code == 0
    assert len(chats(fake)) == asked
    assert json.loads(out)["cached_descriptions"] == 2


def test_a_lone_surrogate_in_a_model_answer_is_dropped_not_a_crash(fake, capsys, tmp_path, monkeypatch):
    dataset = make_images(tmp_path / "set", ["a.png"])
    real_describe = og.describe_image
    monkeypatch.setattr(og, "describe_image", lambda *a, **k: real_describe(*a, **k) + "\ud800")
    real_write = og.write_caption

    def write_caption(*args, **kwargs):
        caption = real_write(*args, **kwargs)
        caption.text += "\udcff"
        return caption

    monkeypatch.setattr(og, "write_caption", write_caption)
    code, out, err = run(capsys, "caption", dataset)
    assert (code, out) == (0, "")
    assert (dataset / "a.txt").read_text(encoding="utf-8") == PARAGRAPH + "\n"
    assert json.loads((dataset / CACHE).read_text(encoding="utf-8"))["description"] == DESCRIPTION
    # A single image prints it too.
    code, out, err = run(capsys, "caption", dataset / "a.png")
    assert (code, out) == (0, PARAGRAPH + "\n")


# -- 5. link loops and broken entries ------------------------------------------------------------


def test_a_symlink_loop_is_one_failed_image_never_a_failed_run(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    (dataset / "self.png").symlink_to("self.png")
    (dataset / "sub").mkdir()
    (dataset / "sub" / "loop.jpg").symlink_to("loop.jpg")

    code, out, err = run(capsys, "caption", dataset, "--dry-run", "-r")
    assert code == 0
    assert out.splitlines()[1:] == ["fail: self.png (cannot read the file (Too many levels of symbolic links))",
                                    "fail: sub/loop.jpg (cannot read the file (Too many levels of symbolic links))"]

    code, out, err = run(capsys, "caption", dataset, "-r")
    assert (code, out) == (1, "")
    assert "self.png: failed: cannot read the file (Too many levels of symbolic links)" in err
    assert (dataset / "a.txt").read_text() == PARAGRAPH + "\n"
    assert err.splitlines()[-2:] == ["ollama-generate: error: 2 of 3 images failed",
                                     "ollama-generate: hint: fix or remove them and run the same command "
                                     "again; finished captions are kept"]

    fake.reply("A card body.", endpoint="/api/generate")
    code, out, err = run(capsys, "describe", "Fox", "--type", "style", "--dataset", dataset, "--no-stream")
    assert (code, err) == (0, "")
    assert "## Training data\n\n1 image, 1 captioned." in out  # loops are no training images


# -- 6. FIFOs and other special files ------------------------------------------------------------


def test_a_fifo_given_alone_is_a_usage_error_not_a_hang(fake, capsys, tmp_path):
    os.mkfifo(tmp_path / "p.png")
    with no_hang():
        code, out, err = run(capsys, "caption", tmp_path / "p.png")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"ollama-generate: error: {tmp_path / 'p.png'} is not a regular file (it is a FIFO)",
        "ollama-generate: hint: give an image file, or a folder of images"]
    assert fake.requests == []


def test_fifos_in_a_folder_fail_as_images_and_never_block(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    os.mkfifo(tmp_path / "pipe")
    (dataset / "linked.png").symlink_to(tmp_path / "pipe")
    os.mkfifo(dataset / "fifo.jpg")
    with no_hang():
        code, out, err = run(capsys, "caption", dataset, "--dry-run")
        assert code == 0
        assert out.splitlines() == [f"caption: a.png (2x2) -> {dataset / 'a.txt'}",
                                    "fail: fifo.jpg (not a regular file (it is a FIFO))",
                                    "fail: linked.png (not a regular file (it is a FIFO))"]
        code, out, err = run(capsys, "caption", dataset)
    assert (code, out) == (1, "")
    assert ("Failed:\n  fifo.jpg: not a regular file (it is a FIFO)\n"
            "  linked.png: not a regular file (it is a FIFO)\n") in err
    assert (dataset / "a.txt").read_text() == PARAGRAPH + "\n"
    assert stat.S_ISFIFO(os.stat(dataset / "fifo.jpg").st_mode)


def test_a_caption_file_that_is_a_fifo_is_left_alone_by_manifest_and_describe(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    os.mkfifo(dataset / "a.txt")
    with no_hang():
        code, out, err = run(capsys, "caption", dataset, "--manifest", dataset / "metadata.jsonl", "--overwrite")
        assert (code, out) == (0, "")
        assert "a.png: skipped: the caption file is a FIFO; left alone" in err
        assert [json.loads(line)["file_name"]
                for line in (dataset / "metadata.jsonl").read_text().splitlines()] == ["b.png"]
        fake.reply("A card body.", endpoint="/api/generate")
        code, out, err = run(capsys, "describe", "Fox", "--type", "style", "--dataset", dataset, "--no-stream")
    assert (code, err) == (0, "")
    assert "2 images, 1 of them captioned." in out  # a.png is an image; its caption is not read
    assert stat.S_ISFIFO(os.lstat(dataset / "a.txt").st_mode)


# -- 7. caption files that are symbolic links ----------------------------------------------------


def test_a_symlinked_caption_is_foreign_never_read_nor_written_through(fake, capsys, tmp_path):
    secret = tmp_path / "token.txt"
    secret.write_text("TOKEN=sk-do-not-leak\n")
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    (dataset / "a.txt").symlink_to(secret)
    manifest = dataset / "metadata.jsonl"

    code, out, err = run(capsys, "caption", dataset, "--overwrite", "--manifest", manifest)
    assert (code, out) == (0, "")
    assert "a.png: skipped: the caption file is a symbolic link; left alone" in err
    assert secret.read_text() == "TOKEN=sk-do-not-leak\n"
    assert os.path.islink(dataset / "a.txt")
    assert "sk-do-not-leak" not in manifest.read_text()
    assert [json.loads(line)["file_name"] for line in manifest.read_text().splitlines()] == ["b.png"]
    assert len(chats(fake)) == 1

    fake.reply("A card body.", endpoint="/api/generate")
    code, out, err = run(capsys, "describe", "Fox", "--type", "style", "--dataset", dataset, "--no-stream")
    assert (code, err) == (0, "")
    assert "sk-do-not-leak" not in out
    assert all("sk-do-not-leak" not in r.raw.decode() for r in fake.requests)


def test_a_caption_link_that_appears_during_the_run_is_not_written_through(fake, capsys, tmp_path):
    secret = tmp_path / "token.txt"
    secret.write_text("TOKEN=sk-do-not-leak\n")
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])

    def answer_and_plant_a_link(rec):
        if rec.path == "/api/chat" and not (dataset / "b.txt").is_symlink():
            (dataset / "b.txt").symlink_to(secret)
        return answer(rec)

    fake.default_text = answer_and_plant_a_link
    code, out, err = run(capsys, "caption", dataset)
    assert (code, out) == (0, "")
    assert "b.png: skipped (the caption file is a symbolic link; left alone)" in err
    assert secret.read_text() == "TOKEN=sk-do-not-leak\n"
    assert (dataset / "a.txt").read_text() == PARAGRAPH + "\n"


# -- 8. cache lines that are not what they should be ---------------------------------------------


def test_bad_cache_lines_are_ignored_and_never_become_captions(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png", "c.png"])
    assert run(capsys, "caption", dataset)[0] == 0
    keys = [json.loads(line)["key"] for line in (dataset / CACHE).read_text().splitlines()]
    bad = [{"key": keys[0], "image": "a.png"}, {"key": keys[1], "description": None},
           {"key": keys[2], "description": 12345}, {"key": keys[2], "description": "   "},
           [keys[0]], "just a string", {"key": 5, "description": "x"}, {"description": "no key"}]
    (dataset / CACHE).write_text("".join(json.dumps(line) + "\n" for line in bad))
    fake.requests.clear()
    code, out, err = run(capsys, "caption", dataset, "--overwrite")
    assert (code, out) == (0, "")
    assert len(chats(fake)) == 3  # described again
    assert all(DESCRIPTION in prompt and "None" not in prompt and "12345" not in prompt
               for prompt in caption_prompts(fake))
    for name in "abc":
        assert (dataset / f"{name}.txt").read_text() == PARAGRAPH + "\n"


# -- 9. a cache that cannot be written -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "link", "fifo", "linked folder"])
def test_a_cache_that_cannot_be_opened_is_one_warning_and_a_run_without_it(fake, capsys, tmp_path, kind):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    path = dataset / CACHE
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    reason = {"folder": "Is a directory", "link": "it is a symbolic link", "fifo": "it is a FIFO",
              "linked folder": "its folder is a symbolic link"}[kind]
    if kind == "linked folder":
        (tmp_path / "elsewhere").mkdir()
        path.parent.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    else:
        path.parent.mkdir()
    if kind == "folder":
        path.mkdir()
    elif kind == "link":
        path.symlink_to(outside)
    elif kind == "fifo":
        os.mkfifo(path)
    with no_hang():
        code, out, err = run(capsys, "caption", dataset, "--report", tmp_path / "r.json")
    assert (code, out) == (0, "")
    assert err.splitlines()[0] == (f"ollama-generate: warning: cannot use the description cache {path} "
                                   f"({reason}); going on without it")
    assert err.count("warning") == 1
    assert ": 2 written, 0 skipped, 0 failed (of 2 images)." in err
    assert json.loads((tmp_path / "r.json").read_text())["written"] == 2
    assert outside.read_text() == "not yours\n"
    assert not (tmp_path / "elsewhere" / "descriptions.jsonl").exists()


def test_a_full_disk_under_the_cache_keeps_every_description(fake, capsys, tmp_path, monkeypatch):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png", "c.png"])
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("descriptions.jsonl"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(og.os, "fsync", fsync)
    code, out, err = run(capsys, "caption", dataset, "--report", tmp_path / "r.json")
    assert (code, out) == (0, "")
    assert err.count(f"ollama-generate: warning: cannot use the description cache {dataset / CACHE} "
                     "(No space left on device); going on without it\n") == 1
    assert err.count("warning") == 1
    assert len(chats(fake)) == 3  # each description asked once, and used
    for name in "abc":
        assert (dataset / f"{name}.txt").read_text() == PARAGRAPH + "\n"
    assert "Done after" in err
    assert json.loads((tmp_path / "r.json").read_text())["written"] == 3


# -- 12. Ctrl-C with --json, SIGTERM -------------------------------------------------------------


def test_ctrl_c_with_json_prints_the_error_document(fake, capsys, tmp_path, monkeypatch):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(og, "write_caption", interrupted)
    code, out, err = run(capsys, "caption", dataset, "--json")
    assert code == 130
    document = json.loads(out)
    assert list(document) == ["error", "hint", "exit_code", "report"]
    assert (document["error"], document["exit_code"]) == ("interrupted", 130)
    assert document["hint"] == "run the same command again: finished captions and descriptions are kept"
    assert (document["report"]["interrupted"], document["report"]["total"]) == (True, 2)
    assert err.endswith("\nollama-generate: interrupted\n")

    monkeypatch.setattr(og.OllamaClient, "generate", interrupted)
    code, out, err = run(capsys, "prompt", "x", "--json")
    assert json.loads(out) == {"error": "interrupted", "hint": None, "exit_code": 130, "report": None}


def test_sigterm_finishes_like_ctrl_c_with_summary_report_and_143(make_ollama, tmp_path):
    server = make_ollama()
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    child: list[subprocess.Popen] = []

    def answer_then_terminate(rec):
        if rec.path == "/api/generate":
            child[0].send_signal(signal.SIGTERM)
            time.sleep(0.3)  # the signal lands while this answer is on its way
        return answer(rec)

    server.default_text = answer_then_terminate
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "COV_CORE"))}
    child.append(subprocess.Popen(
        [sys.executable, SCRIPT, "caption", str(dataset), "--json", "--report", str(tmp_path / "r.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "OLLAMA_HOST": server.url}))
    out, err = child[0].communicate(timeout=60)
    text = err.decode()
    assert child[0].returncode == 143, text
    assert "Traceback" not in text
    assert "Stopped after " in text
    assert text.endswith("ollama-generate: terminated (SIGTERM)\n")
    document = json.loads(out)
    assert (document["error"], document["exit_code"], document["report"]["interrupted"]) == (
        "terminated (SIGTERM)", 143, True)
    assert json.loads((tmp_path / "r.json").read_text())["interrupted"] is True
    leftovers = [p.name for p in dataset.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    for caption in dataset.glob("*.txt"):
        assert caption.read_text() == PARAGRAPH + "\n"


def test_sigterm_raises_terminated_once_and_is_restored_after_main(fake, capsys):
    before = signal.getsignal(signal.SIGTERM)
    restore = og.handle_sigterm()
    try:
        with pytest.raises(og.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a second one cannot cut the summary
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) == before
    assert run(capsys, "prompt", "x")[0] == 0
    assert signal.getsignal(signal.SIGTERM) == before
    # Outside the main thread (a program embedding main()) the handler is left alone.
    undo = []
    worker = threading.Thread(target=lambda: undo.append(og.handle_sigterm()))
    worker.start()
    worker.join()
    undo[0]()
    assert signal.getsignal(signal.SIGTERM) == before


# -- 13. stale temp files ------------------------------------------------------------------------


def test_a_run_removes_its_own_stale_temp_files_only(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "sub/b.png"])
    old = time.time() - 3600
    stale = [dataset / ".ollama-generate-k1lled.tmp", dataset / "sub" / ".ollama-generate-x.tmp",
             tmp_path / ".ollama-generate-report.tmp"]
    kept = [dataset / ".ollama-generate-fresh.tmp", dataset / ".ollama-generate-x.txt", dataset / "other.tmp",
            dataset / ".ollama-generate-dir.tmp"]
    for path in stale + kept[1:3]:
        path.write_text("half")
        os.utime(path, (old, old))
    kept[0].write_text("a write under way")
    kept[3].mkdir()
    os.utime(kept[3], (old, old))
    assert run(capsys, "caption", dataset, "-r", "--dry-run")[0] == 0
    assert all(path.exists() for path in stale)  # a dry run changes nothing
    assert run(capsys, "caption", dataset, "-r", "--report", tmp_path / "r.json")[0] == 0
    assert [path.name for path in stale if path.exists()] == []
    assert all(path.exists() for path in kept)


# -- 14. --report and --manifest to special files ------------------------------------------------


def test_report_and_manifest_stream_to_a_fifo_and_never_replace_it(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    read_report = fifo_reader(tmp_path / "report.fifo")
    read_manifest = fifo_reader(dataset / "metadata.jsonl")
    with no_hang():
        code, out, err = run(capsys, "caption", dataset, "--report", tmp_path / "report.fifo",
                             "--manifest", dataset / "metadata.jsonl")
    assert (code, out) == (0, "")
    assert "warning" not in err
    assert stat.S_ISFIFO(os.lstat(tmp_path / "report.fifo").st_mode)
    assert stat.S_ISFIFO(os.lstat(dataset / "metadata.jsonl").st_mode)
    assert json.loads(read_report())["written"] == 1
    assert json.loads(read_manifest()) == {"file_name": "a.png", "text": PARAGRAPH}


def test_a_fifo_nobody_reads_is_a_warning_not_a_hang(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    os.mkfifo(tmp_path / "report.fifo")
    with no_hang():
        code, out, err = run(capsys, "caption", dataset, "--report", tmp_path / "report.fifo",
                             "--manifest")
    assert (code, out) == (0, "")
    assert (f"ollama-generate: warning: cannot write {tmp_path / 'report.fifo'} "
            "(a FIFO that no program reads from)\n") in err
    assert stat.S_ISFIFO(os.lstat(tmp_path / "report.fifo").st_mode)
    assert json.loads((dataset / "metadata.jsonl").read_text())["file_name"] == "a.png"  # written all the same


def test_a_report_through_a_symlink_replaces_the_target_and_keeps_the_link(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "run.json").write_text("{}\n")
    (tmp_path / "latest.json").symlink_to(tmp_path / "reports" / "run.json")
    assert run(capsys, "caption", dataset, "--report", tmp_path / "latest.json")[0] == 0
    assert os.path.islink(tmp_path / "latest.json")
    assert json.loads((tmp_path / "reports" / "run.json").read_text())["written"] == 1


# -- 16. images: read once, a size limit ---------------------------------------------------------


def test_an_image_over_the_limit_is_refused_with_its_size(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    with open(dataset / "big.png", "wb") as handle:
        handle.write(png_bytes())
        handle.truncate(60_000_000)  # sparse: costs no disk
    code, out, err = run(capsys, "caption", dataset)
    assert (code, out) == (1, "")
    assert "  big.png: the file is 60.0 MB, over the 50 MB limit for an image\n" in err
    assert len(chats(fake)) == 1
    code, out, err = run(capsys, "caption", dataset / "big.png")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"ollama-generate: error: {dataset / 'big.png'}: the file is 60.0 MB, over the 50 MB limit for an image",
        "ollama-generate: hint: scale it down: vision models see a few megapixels"]


def test_each_image_is_read_once_in_a_folder_run(fake, capsys, tmp_path, monkeypatch):
    """Its header once, before the first request (every size is needed to fix the vision model's
    num_ctx for the whole run), and its content once, checked as it is read."""
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        opened.append(os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else "")
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        opened.append(os.fsdecode(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(og.os, "open", spy_os_open)
    assert run(capsys, "caption", dataset)[0] == 0
    a, b = str(dataset / "a.png"), str(dataset / "b.png")
    assert [path for path in opened if path.endswith(".png")] == [a, b, a, b]


# -- 17. empty caption files ---------------------------------------------------------------------


def test_an_empty_caption_file_counts_as_missing(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png", "c.png", "d.png"])
    (dataset / "a.txt").write_text("")
    (dataset / "b.txt").write_text("  \n\t\n")
    (dataset / "c.txt").write_text("kept\n")
    (dataset / "d.txt").write_bytes(b"\xef\xbb\xbf\n")
    code, out, err = run(capsys, "caption", dataset, "--dry-run")
    assert [line.split(":")[0] for line in out.splitlines()] == ["caption", "caption", "skip", "caption"]
    code, out, err = run(capsys, "caption", dataset)
    assert (code, out) == (0, "")
    assert ": 3 written, 1 skipped, 0 failed (of 4 images)." in err
    for name in "abd":
        assert (dataset / f"{name}.txt").read_text() == PARAGRAPH + "\n"
    assert (dataset / "c.txt").read_text() == "kept\n"


# -- 18. a single path that is not an image ------------------------------------------------------


def test_a_file_that_is_not_an_image_by_name_is_a_usage_error(fake, capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list\n")
    code, out, err = run(capsys, "caption", notes)
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"ollama-generate: error: {notes} is not an image file (expected .png, .jpg, .jpeg, .webp, .bmp, .gif, .mp4, .webm, .mov, .mkv, .avi)",
        "ollama-generate: hint: give an image file, or a folder of images"]
    fake_png = tmp_path / "photo.png"
    fake_png.write_text("shopping list\n")
    code, out, err = run(capsys, "caption", fake_png)
    assert (code, out) == (1, "")
    assert err == (f"ollama-generate: error: {fake_png}: not a supported image (its bytes are not PNG, "
                   "JPEG, WebP, BMP or GIF)\n")
    (tmp_path / "loop.png").symlink_to("loop.png")
    code, out, err = run(capsys, "caption", tmp_path / "loop.png")
    assert (code, out, err) == (2, "", f"ollama-generate: error: {tmp_path / 'loop.png'} cannot be used "
                                       "(Too many levels of symbolic links)\n")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    code, out, err = run(capsys, "caption", tmp_path / "gone.png")
    assert (code, out, err) == (2, "", f"ollama-generate: error: {tmp_path / 'gone.png'} does not exist "
                                       "(a symbolic link to nothing)\n")
    assert fake.requests == []


# -- 19. doctor --json names the failed check ----------------------------------------------------


def test_doctor_json_says_which_check_failed(fake, capsys):
    fake.remove_model(VISION)
    code, out, err = run(capsys, "doctor", "--json")
    assert code == 4
    assert json.loads(out)["ok"] is False
    assert err.splitlines() == [
        f"ollama-generate: error: 1 check failed: vision model: {VISION} is not installed on {fake.url}",
        f"ollama-generate: hint: ollama pull {VISION}"]


# -- 20. one and many ----------------------------------------------------------------------------


def test_summaries_say_one_image_and_one_description(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    assert run(capsys, "caption", dataset)[0] == 0
    code, out, err = run(capsys, "caption", dataset, "--overwrite")
    assert code == 0
    lines = err.splitlines()
    assert lines[1].endswith(": 1 written, 0 skipped, 0 failed (of 1 image).")
    assert lines[2].endswith("images/min; 1 model call, 1 description from the cache, 0 model loads seen.")
    code, out, err = run(capsys, "caption", dataset)
    assert err.splitlines()[0] == "Skipping 1 image that already has a caption (--overwrite redoes them)."
    code, out, err = run(capsys, "caption", dataset, "--dry-run")
    assert err == "Dry run: 0 to caption, 1 skipped, 0 failing, 0 left for later (of 1 image); no model was called.\n"
    bad = make_images(tmp_path / "bad", ["bad.png"])
    code, out, err = run(capsys, "caption", bad)
    assert (code, err.splitlines()[-2]) == (1, "ollama-generate: error: 1 of 1 image failed")


def test_plural():
    assert [og.plural(n, "tag") for n in (0, 1, 2)] == ["0 tags", "1 tag", "2 tags"]
    assert og.plural(1, "child", "children") == "1 child"
    assert og.plural(3, "child", "children") == "3 children"


# -- 23. describe --dataset on tag and prose datasets --------------------------------------------


def _captioned(folder, captions):
    make_images(folder, [f"{n:02d}.png" for n in range(len(captions))])
    for n, caption in enumerate(captions):
        (folder / f"{n:02d}.txt").write_text(caption + "\n")
    return folder


def test_dataset_facts_leave_out_the_trigger_and_tags_in_every_caption(tmp_path):
    folder = _captioned(tmp_path / "tags", [
        "score_9, score_8_up, ohwx, 1girl, red hair, smile",
        "score_9, score_8_up, ohwx, 1girl, blue dress",
        "score_9, score_8_up, ohwx, 1girl, red hair, outdoors",
        "score_9, score_8_up, ohwx, 1girl, red hair, smile"])
    facts = og.dataset_facts(str(folder), trigger="ohwx")
    assert (facts.form, facts.in_every) == ("tags", ["score_9", "score_8_up", "1girl"])
    assert facts.top_tags == [("red hair", 3), ("smile", 2), ("blue dress", 1), ("outdoors", 1)]
    assert facts.summary() == ("4 training images, 4 with captions; most frequent caption tags: red hair (3), "
                               "smile (2), blue dress (1), outdoors (1); in every caption: score_9, score_8_up, "
                               "1girl")
    card = og.card_tail(args=SimpleNamespace(trigger="ohwx"), dataset=facts)
    assert ("Most frequent tags: red hair (3), smile (2), blue dress (1), outdoors (1).\n\n"
            "In every caption: score_9, score_8_up, 1girl.") in card


def test_a_prose_dataset_is_summarised_by_words_and_phrases(fake, capsys, tmp_path):
    folder = _captioned(tmp_path / "prose", [
        "ohwx, a woman in a red coat walks through a snowy park at dusk, eye level, shallow depth of field.",
        "ohwx, a woman in a red coat stands by a frozen lake, snow falling, shallow depth of field.",
        "ohwx, an old man feeds pigeons in a snowy park, morning light, eye level."])
    facts = og.dataset_facts(str(folder), trigger="ohwx")
    assert facts.form == "prose"
    assert facts.top_tags[:6] == [("red coat", 2), ("snowy park", 2), ("eye level", 2), ("shallow depth", 2),
                                  ("depth of field", 2), ("woman", 2)]
    assert all(not term.endswith(".") and term != "ohwx" for term, _count in facts.top_tags)
    fake.reply("A card body.", endpoint="/api/generate")
    code, out, err = run(capsys, "describe", "Fox", "--type", "style", "--dataset", folder, "--trigger", "ohwx",
                         "--no-stream")
    assert (code, err) == (0, "")
    assert "\n\nFrequent words and phrases: red coat (2), snowy park (2), eye level (2)," in out
    assert "Most frequent tags" not in out
