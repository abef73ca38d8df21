"""Video clips: frames sampled with ffmpeg and sent in one vision request, the video prompts, the
cache key, the frame count fitted to the context, clips without ffmpeg, and clips in the dry run,
manifest, stats and review. Clips are made by ffmpeg itself (a session fixture)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from cli import run
from images import png_bytes

import ollama_generate as og

pytestmark = pytest.mark.skipif(
    not (shutil.which("ffmpeg") and shutil.which("ffprobe")),
    reason="ffmpeg and ffprobe are not installed (CI installs them: apt-get install ffmpeg)")

VISION = og.DEFAULT_VISION_MODEL
COLOURS = ("red", "lime", "blue")  # one second each, in this order
RGB = {"red": (255, 0, 0), "lime": (0, 255, 0), "blue": (0, 0, 255)}


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, bytes]:
    """Small clips by name: testsrc (2 s), colour segments (3 s), a webm, and a Matroska stream
    written to a pipe, whose header states no duration."""
    folder = tmp_path_factory.mktemp("clips")
    testsrc = ["-f", "lavfi", "-i", "testsrc=duration=2:size=320x240:rate=10"]
    ffmpeg(*testsrc, "-pix_fmt", "yuv420p", str(folder / "testsrc.mp4"))
    inputs = [arg for colour in COLOURS
              for arg in ("-f", "lavfi", "-i", f"color=c={colour}:size=160x120:rate=10:d=1")]
    ffmpeg(*inputs, "-filter_complex", "".join(f"[{i}:v]" for i in range(len(COLOURS)))
           + f"concat=n={len(COLOURS)}:v=1[v]", "-map", "[v]", "-pix_fmt", "yuv420p",
           str(folder / "colours.mp4"))
    ffmpeg(*testsrc, "-c:v", "libvpx", "-b:v", "200k", str(folder / "testsrc.webm"))
    with open(folder / "piped.mkv", "wb") as out:
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", *testsrc, "-f", "matroska", "pipe:1"],
                       check=True, stdout=out, stdin=subprocess.DEVNULL)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def dataset(tmp_path, files: dict[str, bytes]):
    folder = tmp_path / "set"
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def vision_requests(server):
    return [rec for rec in server.requests_to("/api/chat")
            if rec.body.get("model") == VISION and "options" in rec.body]


def text_requests(server):
    return [rec for rec in server.generation_requests()
            if rec.body.get("model") == og.DEFAULT_MODEL and "options" in rec.body]


def prompt_of(rec) -> str:
    """What a text request asked, chat or generate."""
    return rec.body.get("prompt") or "".join(message["content"] for message in rec.body.get("messages") or [])


def frame_images(rec) -> list[bytes]:
    import base64

    return [base64.b64decode(image) for message in rec.body["messages"]
            for image in message.get("images") or []]


def mean_colour(jpeg: bytes) -> tuple[int, int, int]:
    """The frame's average colour, decoded by ffmpeg (no Pillow needed)."""
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "image2pipe", "-i", "-",
                          "-vf", "scale=1:1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         input=jpeg, capture_output=True,
                         check=True).stdout
    return tuple(raw[:3])


def nearest(rgb: tuple[int, int, int]) -> str:
    return min(RGB, key=lambda name: sum((a - b) ** 2 for a, b in zip(RGB[name], rgb)))


def test_a_clips_frames_go_in_time_order_in_one_request_with_the_video_prompt(ollama, capsys, tmp_path,
                                                                              clips):
    folder = dataset(tmp_path, {"clip.mp4": clips["colours.mp4"]})
    code, _out, err = run(capsys, "caption", folder, "--quiet", "--frames", "3")
    assert (code, err) == (0, "")
    [vision] = vision_requests(ollama)
    frames = frame_images(vision)
    assert [frame[:3] for frame in frames] == [b"\xff\xd8\xff"] * 3  # JPEG
    assert [nearest(mean_colour(frame)) for frame in frames] == list(COLOURS)
    info = og.probe_clip(str(folder / "clip.mp4"))
    times = og.frame_times(info.duration, 3)
    system, user = og.vision_prompt(og.Config(), "", "video", frames=3,
                                    duration=f"{info.duration:.1f} seconds",
                                    timestamps=", ".join(f"{at:.1f} s" for at in times))
    assert vision.body["messages"][0] == {"role": "system", "content": system}
    assert vision.body["messages"][1]["content"] == user
    assert "0.5 s, 1.5 s, 2.5 s" in user and "motion over time" in user
    [text] = text_requests(ollama)
    assert og.render("video_caption") in prompt_of(text)
    assert (folder / "clip.txt").read_text(encoding="utf-8").strip()


def test_an_image_keeps_the_image_prompt_and_no_video_note(ollama, capsys, tmp_path, clips):
    folder = dataset(tmp_path, {"a.png": png_bytes(40, 30), "clip.mp4": clips["testsrc.mp4"]})
    code, _out, err = run(capsys, "caption", folder, "--quiet", "--frames", "2")
    assert (code, err) == (0, "")
    by_count = sorted(len(frame_images(rec)) for rec in vision_requests(ollama))
    assert by_count == [1, 2]
    image_request = next(rec for rec in vision_requests(ollama) if len(frame_images(rec)) == 1)
    assert image_request.body["messages"][0]["content"] == og.render("vision_system")
    notes = [og.render("video_caption") in prompt_of(rec) for rec in text_requests(ollama)]
    assert sorted(notes) == [False, True]


@pytest.mark.parametrize("name", ["testsrc.webm", "piped.mkv"])
def test_a_webm_and_a_clip_without_a_stated_duration_are_sampled_over_their_length(ollama, capsys, tmp_path,
                                                                                    clips, name):
    folder = dataset(tmp_path, {name: clips[name]})
    assert og.probe_clip(str(folder / name)).duration > 1.5  # piped.mkv: from its packets
    code, _out, err = run(capsys, "caption", folder, "--quiet", "--frames", "4")
    assert (code, err) == (0, "")
    [vision] = vision_requests(ollama)
    assert len(frame_images(vision)) == 4
    times = og.frame_times(og.probe_clip(str(folder / name)).duration, 4)
    stamps = ", ".join(f"{at:.1f} s" for at in times)
    assert times[-1] > 1.5 and stamps in vision.body["messages"][1]["content"]


def test_max_side_scales_the_frames_with_ffmpeg(ollama, capsys, tmp_path, clips):
    folder = dataset(tmp_path, {"clip.mp4": clips["testsrc.mp4"]})
    code, _out, _err = run(capsys, "caption", folder, "--quiet", "--frames", "1", "--max-side", "160")
    assert code == 0
    [frame] = frame_images(vision_requests(ollama)[0])
    assert og.image_size_of(frame) == og.ImageSize(160, 120)


def test_a_rerun_uses_the_cache_and_other_frames_miss_it(ollama, capsys, tmp_path, clips):
    folder = dataset(tmp_path, {"clip.mp4": clips["testsrc.mp4"]})
    assert run(capsys, "caption", folder, "--quiet", "--frames", "2")[0] == 0
    assert len(vision_requests(ollama)) == 1
    assert run(capsys, "caption", folder, "--quiet", "--frames", "2", "--overwrite")[0] == 0
    assert len(vision_requests(ollama)) == 1  # from the cache
    assert run(capsys, "caption", folder, "--quiet", "--frames", "3", "--overwrite")[0] == 0
    assert len(vision_requests(ollama)) == 2
    assert len(frame_images(vision_requests(ollama)[-1])) == 3
    assert run(capsys, "caption", folder, "--quiet", "--frames", "3", "--max-side", "100",
               "--overwrite")[0] == 0
    assert len(vision_requests(ollama)) == 3


def test_a_clip_file_is_hashed_in_pieces_and_has_no_image_size_limit(tmp_path, monkeypatch, clips):
    path = tmp_path / "clip.mp4"
    path.write_bytes(clips["testsrc.mp4"])
    monkeypatch.setattr(og, "MAX_IMAGE_BYTES", 10)
    assert og.sniff_image(str(path)) == "video"
    import hashlib
    assert og.file_sha256(str(path)) == hashlib.sha256(clips["testsrc.mp4"]).hexdigest()


def test_frames_the_context_cannot_hold_are_lowered_with_one_warning(ollama, capsys, tmp_path, clips):
    folder = dataset(tmp_path, {"a.mp4": clips["testsrc.mp4"], "b.mp4": clips["colours.mp4"]})
    code, _out, err = run(capsys, "caption", folder, "--quiet", "--frames", "64", "--num-ctx", "8192")
    assert code == 0
    per_frame = og.image_tokens("qwen3vl", 320, 240)
    sent = {len(frame_images(rec)) for rec in vision_requests(ollama)}
    [fits] = sent
    assert 1 <= fits < 64 and fits * per_frame <= 8192
    assert err.count("warning:") == 1 and f"sending {fits} frames per clip" in err


def test_without_ffmpeg_a_clip_fails_alone_with_a_hint(ollama, capsys, tmp_path, monkeypatch, clips):
    folder = dataset(tmp_path, {"a.png": png_bytes(40, 30), "clip.mp4": clips["testsrc.mp4"]})
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code, _out, err = run(capsys, "caption", folder)
    assert code != 0 and "Traceback" not in err
    assert "clip.mp4" in err and "ffprobe is not installed" in err and "apt install ffmpeg" in err
    assert (folder / "a.txt").exists() and not (folder / "clip.txt").exists()
    code, out, _err = run(capsys, "doctor")
    assert "ffprobe and ffmpeg not found" in out and "brew install ffmpeg" in out


def test_doctor_says_clips_work_when_ffmpeg_is_found(ollama, capsys):
    _code, out, _err = run(capsys, "doctor")
    assert "ffmpeg and ffprobe found" in out


def test_one_clip_on_the_command_line_is_printed(ollama, capsys, tmp_path, clips):
    folder = dataset(tmp_path, {"clip.mov": clips["testsrc.mp4"]})
    code, out, err = run(capsys, "caption", folder / "clip.mov", "--frames", "2", "--no-cache")
    assert code == 0 and out.strip()
    assert len(frame_images(vision_requests(ollama)[0])) == 2


def test_the_dry_run_shows_duration_size_and_frames(capsys, tmp_path, clips):
    folder = dataset(tmp_path, {"clip.mp4": clips["testsrc.mp4"]})
    code, out, _err = run(capsys, "caption", folder, "--dry-run", "--frames", "5", "--max-side", "160")
    assert code == 0
    assert out.strip() == f"caption: clip.mp4 (2.0 s, 320x240; 5 frames at 160x120) -> {folder / 'clip.txt'}"


@pytest.mark.parametrize("frames", ["0", "65", "two"])
def test_frames_out_of_range_is_a_usage_error(capsys, tmp_path, frames):
    with pytest.raises(SystemExit) as caught:
        og.main(["caption", str(tmp_path), "--frames", frames])
    assert caught.value.code == 2
    assert "--frames" in capsys.readouterr().err


def test_clips_are_in_the_manifest_and_stats(ollama, capsys, tmp_path, clips):
    folder = dataset(tmp_path, {"a.png": png_bytes(40, 30), "clip.mp4": clips["testsrc.mp4"]})
    code, _out, _err = run(capsys, "caption", folder, "--quiet", "--frames", "2", "--manifest")
    assert code == 0
    rows = [json.loads(line) for line in (folder / og.MANIFEST_NAME).read_text().splitlines()]
    assert sorted(row["file_name"] for row in rows) == ["a.png", "clip.mp4"]
    code, out, _err = run(capsys, "stats", folder, "--json")
    assert code == 0
    document = json.loads(out)
    assert document["images"] == 2 and document["captioned"] == 2


def test_the_review_page_plays_a_clip_with_ranges(tmp_path, clips):
    from test_review import Review

    folder = dataset(tmp_path, {"clip.webm": clips["testsrc.webm"]})
    (folder / "clip.txt").write_text("a test pattern\n", encoding="utf-8")
    server = Review(folder)
    try:
        item = server.item("clip.webm")
        assert item["video"] is True and item["src"] == "/image/clip.webm"
        status, response, data = server.get("/image/clip.webm", headers={"Range": "bytes=10-19"})
        assert (status, data) == (206, clips["testsrc.webm"][10:20])
        assert response.getheader("Content-Type") == "video/webm"
        assert response.getheader("Content-Range") == f"bytes 10-19/{len(clips['testsrc.webm'])}"
        assert "media-src 'self'" in response.getheader("Content-Security-Policy")
        status, _response, data = server.get("/image/clip.webm")
        assert (status, data) == (200, clips["testsrc.webm"])
    finally:
        server.close()


def test_the_video_prompts_are_templates_with_their_fields():
    assert og.TEMPLATE_FIELDS["vision_video_user"] == ("frames", "duration", "timestamps")
    assert og.MEDIA["video"].user == "vision_video_user"
    assert os.path.exists(os.path.join(os.path.dirname(og.__file__), "prompts", "vision_video_system.txt"))
