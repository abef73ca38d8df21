"""Right-sized images: sizes from headers, the image-token table, preparing images with Pillow,
one num_ctx per model per run, and what the server receives."""

from __future__ import annotations

import io
import random
import struct

import pytest
from cli import run
from images import _png_chunk, jpeg_bytes, picture, png_bytes

import ollama_generate as og

Image = pytest.importorskip("PIL.Image")
VISION = og.DEFAULT_VISION_MODEL


def received(data: bytes) -> tuple[str, int, int]:
    """What the server got: the format and the size Pillow reads."""
    with Image.open(io.BytesIO(data)) as image:
        return image.format, image.width, image.height


# -- sizes from headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "save", "chunk"), [
    ("PNG", {}, None), ("JPEG", {}, None), ("GIF", {}, None), ("BMP", {}, None),
    ("WEBP", {"quality": 80}, b"VP8 "), ("WEBP", {"lossless": True}, b"VP8L"),
    ("WEBP", {"quality": 80, "mode": "RGBA"}, b"VP8X"),
])
def test_each_format_gives_its_size_from_the_header(fmt, save, chunk):
    data = picture(123, 45, fmt, **save)
    if chunk:
        assert data[12:16] == chunk
    assert og.image_size_of(data) == og.ImageSize(123, 45)


def test_a_file_is_read_as_bytes_are(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(picture(640, 480, orientation=8))
    assert og.image_size(str(path)) == og.ImageSize(640, 480, 8) == og.image_size_of(path.read_bytes())
    assert og.image_size(str(tmp_path / "missing.jpg")) is None
    assert og.image_size(str(tmp_path)) is None  # a folder


def test_an_old_os2_bitmap_header_is_read():
    header = b"BM" + struct.pack("<IHHI", 26 + 6, 0, 0, 26) + struct.pack("<IHHHH", 12, 300, 200, 1, 24)
    assert og.image_size_of(header + bytes(6)) == og.ImageSize(300, 200)


def test_a_top_down_bitmap_has_a_positive_height():
    header = b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHH", 40, 64, -32, 1, 24)
    assert og.image_size_of(header + bytes(24)) == og.ImageSize(64, 32)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_swaps_the_shown_size_for_quarter_turns(orientation):
    size = og.image_size_of(picture(60, 30, orientation=orientation))
    assert size == og.ImageSize(60, 30, orientation)
    assert size.upright == ((30, 60) if orientation >= 5 else (60, 30))


def test_big_endian_exif_is_read():
    tiff = b"MM\0*" + struct.pack(">I", 8) + struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0)
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\0\0" + tiff
    data = jpeg_bytes()
    assert og.image_size_of(data[:2] + app1 + data[2:]) == og.ImageSize(2, 2, 6)


@pytest.mark.parametrize("segment", [
    b"Exif\0\0XX\0*\0\0\0\x08",  # no byte order
    b"Exif\0\0II*\0\xff\xff\0\0",  # a directory beyond the segment
    b"Exif\0\0II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0\x09\0",  # orientation 9: none
    b"JFXX\0",  # another APP1
])
def test_odd_exif_means_no_orientation(segment):
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + len(segment)) + segment
    data = jpeg_bytes()
    assert og.image_size_of(data[:2] + app1 + data[2:]) == og.ImageSize(2, 2)


@pytest.mark.parametrize("data", [
    b"", b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n" + bytes(8) + b"IHDX" + bytes(8),
    b"\xff\xd8\xff", b"\xff\xd8\xff\xd9", b"\xff\xd8\xff\xda\0\x02", b"\xff\xd8\xff\xe0\0\x01",
    b"\xff\xd8\x00\x00", b"\xff\xd8" + b"\xff\xd0" * 1200,
    b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0\0\0\0\0\0\0", b"RIFF\0\0\0\0WEBPVP8L\0\0\0\0\x00\0\0\0\0",
    b"RIFF\0\0\0\0WEBPALPH\0\0\0\0", b"GIF89a\0\0\0\0", b"BM" + bytes(12) + b"\x28\0\0\0",
    b"not an image at all",
])
def test_truncated_and_odd_files_have_no_size(data):
    assert og.image_size_of(data) is None


def test_fill_bytes_and_markers_without_length_are_walked():
    data = jpeg_bytes()
    padded = data[:2] + b"\xff\xff\xff\x01" + data[2:]
    assert og.image_size_of(padded) == og.ImageSize(2, 2)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_damaged_headers_never_raise(fmt):
    data = picture(40, 30, fmt, orientation=6) if fmt == "JPEG" else picture(40, 30, fmt)
    rng = random.Random(fmt)
    for _ in range(300):
        damaged = bytearray(data[:rng.randrange(1, min(len(data), 400))])
        for _ in range(rng.randrange(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        size = og.image_size_of(bytes(damaged))
        assert size is None or isinstance(size, og.ImageSize)


# -- image tokens and the context -----------------------------------------------------------------


@pytest.mark.parametrize(("family", "width", "height", "tokens"), [
    ("qwen25vl", 1536, 1024, 2035), ("qwen3vl", 6000, 4000, 4056), ("qwen2vl", 200, 200, 1024),
    ("gemma3", 6000, 4000, 256), ("llava", 50, 50, 576),
    ("mllama", 500, 500, 1601), ("mllama", 1120, 560, 3202), ("mllama", 6000, 4000, 6404),
    ("", 1536, 1024, 2035), ("someday-vl", 6000, 4000, 30602),
])
def test_image_tokens_per_family(family, width, height, tokens):
    assert og.image_tokens(family, width, height) == tokens


def test_the_vision_context_has_room_and_steps():
    assert og.vision_context(256, 100) == og.NUM_CTX  # never below the default
    assert og.vision_context(30602, 200) == 32 * 1024 + 1024  # 30602 + 200 + 2 x 1024, rounded up


def test_llava_is_known_by_the_clip_in_its_families(make_ollama, capsys, tmp_path, monkeypatch):
    # Ollama reports llava as family "llama", families ["llama", "clip"]: its images cost 576 tokens,
    # not the unknown family's one per 28 x 28 pixels of a full-size original.
    server = make_ollama(models={
        VISION: {"capabilities": ("completion", "vision"), "family": "llama", "families": ("llama", "clip"),
                 "context_length": 8192},
        og.DEFAULT_MODEL: {"capabilities": ("completion",), "family": "qwen3"}})
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    folder = dataset(tmp_path, {"a.png": picture(3000, 2000, "PNG")})
    code, _out, err = run(capsys, "caption", folder, "--quiet", "--max-side", "0")
    assert (code, err) == (0, "")
    assert contexts(server) == {og.NUM_CTX}
    assert og.vision_family({"details": {"family": "llama", "families": ["llama", "clip"]}}) == "clip"
    assert og.vision_family({"details": {"family": "qwen3", "families": ["qwen3"]}}) == "qwen3"


def test_family_and_context_length_come_from_api_show():
    details = {"details": {"family": "qwen25vl"},
               "model_info": {"general.architecture": "qwen25vl", "qwen25vl.context_length": 128000}}
    assert (og.vision_family(details), og.context_length(details)) == ("qwen25vl", 128000)
    assert (og.vision_family({"model_info": {"general.architecture": "gemma3"}}), og.context_length({})) == (
        "gemma3", None)


# -- preparing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "size", "max_side", "pillow", "tag"), [
    ("jpeg", og.ImageSize(6000, 4000), 1536, True, "pillow max-side 1536"),
    ("jpeg", og.ImageSize(6000, 4000), 1536, False, ""),
    ("jpeg", og.ImageSize(1000, 800), 1536, True, ""),
    ("jpeg", og.ImageSize(1000, 800, 6), 1536, True, "pillow max-side 1536"),
    ("bmp", og.ImageSize(10, 10), 0, True, "pillow max-side 0"),
    ("png", og.ImageSize(6000, 4000), 0, True, ""),
    ("png", None, 1536, True, ""),
])
def test_what_is_prepared(kind, size, max_side, pillow, tag):
    assert og.preparation(kind, size, max_side, pillow=pillow) == tag


def test_a_file_pillow_cannot_read_is_one_error():
    with pytest.raises(og.ImageError) as caught:
        og.prepare_image(b"\xff\xd8\xff" + bytes(100), 1536)
    assert str(caught.value) == "cannot prepare the image with Pillow (cannot identify image file)"
    assert caught.value.hint.endswith("with --max-side 0")


# -- what the server receives ---------------------------------------------------------------------


def dataset(tmp_path, files: dict[str, bytes]):
    folder = tmp_path / "set"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def contexts(server, path: str = "/api/chat") -> set:
    """The num_ctx values sent to path (a request without options only sets keep_alive)."""
    return {rec.body["options"]["num_ctx"] for rec in server.requests_to(path) if "options" in rec.body}


def test_large_images_are_scaled_and_each_model_keeps_one_num_ctx(ollama, capsys, tmp_path):
    folder = dataset(tmp_path, {"a.jpg": picture(3000, 2000), "b.png": png_bytes(40, 30),
                                "c.jpg": picture(1200, 2400)})
    code, out, err = run(capsys, "caption", folder, "--quiet")
    assert (code, out, err) == (0, "", "")
    assert [received(data) for data in ollama.sent_images()] == [
        ("JPEG", 1536, 1024), ("PNG", 40, 30), ("JPEG", 768, 1536)]
    assert ollama.sent_images()[1] == png_bytes(40, 30)  # small and readable: sent as it is
    assert contexts(ollama) == {og.NUM_CTX}  # 2,035 image tokens fit the default
    assert contexts(ollama, "/api/generate") == {og.NUM_CTX}


def test_a_run_of_large_originals_gets_one_larger_context(make_ollama, capsys, tmp_path, monkeypatch):
    server = make_ollama(models={
        VISION: {"capabilities": ("completion", "vision"), "family": "someday-vl", "context_length": 262144},
        og.DEFAULT_MODEL: {"capabilities": ("completion",), "family": "qwen3"}})
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    folder = dataset(tmp_path, {"a.png": png_bytes(2, 2), "b.png": picture(2800, 1400, "PNG"),
                                "c.png": picture(1400, 700, "PNG")})
    code, _out, err = run(capsys, "caption", folder, "--quiet", "--max-side", "0")
    assert (code, err) == (0, "")
    assert [received(data)[1:] for data in server.sent_images()] == [(2, 2), (2800, 1400), (1400, 700)]
    prompt = og.prompt_tokens("".join(og.vision_prompt(og.Config())))
    assert contexts(server) == {og.vision_context(100 * 50, prompt)}  # the largest, for all three
    assert contexts(server, "/api/generate") == {og.NUM_CTX}


def test_a_context_too_small_for_the_largest_image_is_warned(make_ollama, capsys, tmp_path, monkeypatch):
    server = make_ollama(models={
        VISION: {"capabilities": ("completion", "vision"), "family": "someday-vl", "context_length": 8192},
        og.DEFAULT_MODEL: {"capabilities": ("completion",), "family": "qwen3"}})
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    folder = dataset(tmp_path, {"a.png": picture(2800, 2800, "PNG")})
    code, _out, err = run(capsys, "caption", folder, "--quiet", "--max-side", "0")
    prompt = og.prompt_tokens("".join(og.vision_prompt(og.Config())))
    needed = og.vision_context(100 * 100, prompt)
    assert code == 0
    assert err == (f"ollama-generate: warning: the largest image (a.png, 2800x2800 as sent) needs about {needed} "
                   f"context tokens with {VISION} (10000 image tokens estimated for the someday-vl family), "
                   "more than its context length of 8192; the server may cut the prompt: lower --max-side "
                   "or pick a vision model with a longer context\n")
    assert contexts(server) == {needed}


def test_an_explicit_num_ctx_wins_for_every_request_and_is_warned_when_small(ollama, capsys, tmp_path):
    folder = dataset(tmp_path, {"a.jpg": picture(3000, 2000), "b.jpg": picture(100, 100)})
    code, _out, err = run(capsys, "caption", folder, "--quiet", "--num-ctx", "3000")
    assert code == 0
    assert "needs about 8192 context tokens" in err and "more than --num-ctx 3000" in err
    assert contexts(ollama) | contexts(ollama, "/api/generate") == {3000}


def test_max_side_0_sends_the_original_bytes(ollama, capsys, tmp_path):
    original = picture(2000, 1000)
    folder = dataset(tmp_path, {"a.jpg": original})
    assert run(capsys, "caption", folder, "--quiet", "--max-side", "0")[0] == 0
    assert ollama.sent_images() == [original]


def test_an_exif_rotated_jpeg_arrives_upright(ollama, capsys, tmp_path):
    folder = dataset(tmp_path, {"a.jpg": picture(60, 30, orientation=6)})
    assert run(capsys, "caption", folder, "--quiet")[0] == 0
    [sent] = ollama.sent_images()
    assert og.image_size_of(sent) == og.ImageSize(30, 60)  # no orientation left to apply
    with Image.open(io.BytesIO(sent)) as image:
        top, bottom = image.convert("RGB").getpixel((15, 5)), image.convert("RGB").getpixel((15, 55))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the left half (red) is now on top


def test_a_transparent_png_stays_png_and_bmp_and_gif_are_converted(ollama, capsys, tmp_path):
    folder = dataset(tmp_path, {"a.png": picture(3000, 1000, "PNG", mode="RGBA"), "b.bmp": picture(20, 10, "BMP"),
                                "c.gif": picture(20, 10, "GIF", mode="P", transparency=1),
                                "d.gif": picture(20, 10, "GIF", mode="P")})
    assert run(capsys, "caption", folder, "--quiet")[0] == 0
    sent = ollama.sent_images()
    assert [received(data) for data in sent] == [("PNG", 1536, 512), ("JPEG", 20, 10), ("PNG", 20, 10),
                                                 ("JPEG", 20, 10)]
    with Image.open(io.BytesIO(sent[0])) as image:
        assert image.mode == "RGBA" and image.getpixel((1000, 10))[3] == 0


def test_a_16_bit_greyscale_png_keeps_its_tones_when_prepared(ollama, capsys, tmp_path):
    # Left to right from black to white in 16 bits; converted to 8 bits as it is, every value over
    # 255 would be clipped to white, and the model would see a blank picture.
    width = 3000
    ramp = b"".join(struct.pack("<H", x * 65535 // (width - 1)) for x in range(width)) * 4
    out = io.BytesIO()
    Image.frombytes("I;16", (width, 4), ramp).save(out, "PNG")
    folder = dataset(tmp_path, {"a.png": out.getvalue()})
    assert run(capsys, "caption", folder, "--quiet")[0] == 0
    [sent] = ollama.sent_images()
    with Image.open(io.BytesIO(sent)) as image:
        assert (image.format, image.size) == ("JPEG", (1536, 2))
        grey = image.convert("L")
        assert grey.getpixel((10, 0)) < 10 and 120 < grey.getpixel((768, 0)) < 135
        assert grey.getpixel((1525, 0)) > 245


def test_the_cache_is_hit_on_a_rerun_and_missed_after_a_new_max_side(ollama, capsys, tmp_path):
    folder = dataset(tmp_path, {"a.jpg": picture(3000, 2000), "b.png": png_bytes(4, 4)})
    assert run(capsys, "caption", folder, "--quiet")[0] == 0
    assert len(ollama.requests_to("/api/chat")) == 2
    assert run(capsys, "caption", folder, "--quiet", "--overwrite")[0] == 0
    assert len(ollama.requests_to("/api/chat")) == 2  # both from the cache
    assert run(capsys, "caption", folder, "--quiet", "--overwrite", "--max-side", "1024")[0] == 0
    assert len(ollama.requests_to("/api/chat")) == 3  # only the large one: it is sent otherwise now
    assert received(ollama.sent_images()[-1]) == ("JPEG", 1024, 683)


def test_webp_a_server_cannot_decode_is_sent_again_converted(make_ollama, capsys, tmp_path, monkeypatch):
    server = make_ollama(unreadable_formats={"webp"})
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    folder = dataset(tmp_path, {"a.webp": picture(64, 32, "WEBP")})
    code, _out, err = run(capsys, "caption", folder, "--quiet")
    assert (code, err) == (0, "")
    assert [received(data) for data in server.sent_images()] == [("WEBP", 64, 32), ("JPEG", 64, 32)]
    assert run(capsys, "caption", folder, "--quiet", "--overwrite")[0] == 0
    assert len(server.requests_to("/api/chat")) == 2  # the description was kept for the original


def test_an_image_pillow_cannot_prepare_fails_alone(ollama, capsys, tmp_path):
    broken = bytearray(picture(3000, 2000))
    broken[600:5000] = bytes(4400)  # the header says 3000x2000; the data is damaged
    folder = dataset(tmp_path, {"a.jpg": bytes(broken), "b.png": png_bytes()})
    code, _out, err = run(capsys, "caption", folder, "--quiet")
    assert code == 1
    assert "  a.jpg: cannot prepare the image with Pillow (" in err
    assert len(ollama.requests_to("/api/chat")) == 1


def broken_chunk_png(width: int, height: int) -> bytes:
    """A PNG whose image data is split in two IDAT chunks, the second with a damaged chunk type: the
    header and the IEND are intact, and Pillow raises SyntaxError (not OSError) when it decodes it."""
    data = picture(width, height, "PNG")
    length = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    idat, half = data[41:41 + length], length // 2
    second = _png_chunk(b"IDAT", idat[half:])
    return (data[:33] + _png_chunk(b"IDAT", idat[:half]) + second[:4] + b"\xf7DAT" + second[8:]
            + _png_chunk(b"IEND", b""))


def test_a_png_pillow_finds_broken_fails_alone_not_the_run(ollama, capsys, tmp_path):
    folder = dataset(tmp_path, {"a.png": broken_chunk_png(3000, 200), "b.png": png_bytes()})
    code, _out, err = run(capsys, "caption", folder, "--quiet")
    assert code == 1
    assert "  a.png: cannot prepare the image with Pillow (broken PNG file (chunk b'\\xf7DAT'))\n" in err
    assert "internal error" not in err
    assert len(ollama.requests_to("/api/chat")) == 1  # b.png was still captioned
    code, _out, err = run(capsys, "caption", folder / "a.png")
    assert code == 1
    assert err.startswith(f"ollama-generate: error: {folder / 'a.png'}: cannot prepare the image with Pillow")


def test_one_image_on_the_command_line_is_prepared_too(ollama, capsys, tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(picture(4000, 3000))
    code, out, _err = run(capsys, "caption", path, "--max-side", "800")
    assert code == 0 and out
    assert received(ollama.sent_images()[0]) == ("JPEG", 800, 600)


# -- what a dry run and stats show ----------------------------------------------------------------


def test_a_dry_run_shows_each_size_and_what_is_sent(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")
    folder = dataset(tmp_path, {"a.jpg": picture(3000, 2000, orientation=6), "b.png": png_bytes(4, 3)})
    code, out, _err = run(capsys, "caption", folder, "--dry-run")
    assert (code, out) == (0, f"caption: a.jpg (2000x3000, sent as 1024x1536) -> {folder / 'a.txt'}\n"
                              f"caption: b.png (4x3) -> {folder / 'b.txt'}\n")
    code, out, _err = run(capsys, "caption", folder, "--dry-run", "--json", "--max-side", "0")
    assert [(entry["width"], entry["height"], entry["sent_width"], entry["sent_height"])
            for entry in og.json.loads(out)["dry_run"]] == [(2000, 3000, 2000, 3000), (4, 3, 4, 3)]


def test_stats_shows_the_spread_of_sizes(capsys, tmp_path):
    folder = dataset(tmp_path, {"a.jpg": picture(3000, 2000), "b.png": png_bytes(4, 3),
                                "c.jpg": picture(1024, 1024, orientation=8), "d.png": b""})
    code, out, _err = run(capsys, "stats", folder, "--json")
    data = og.json.loads(out)
    assert code == 0
    assert data["image_sizes"] == {
        "known": 3, "megapixels": {"min": 0.0, "median": 1.05, "max": 6.0},
        "smallest": {"image": "b.png", "width": 4, "height": 3},
        "largest": {"image": "a.jpg", "width": 3000, "height": 2000},
        "under_training_size": ["b.png"]}
    assert [(item["width"], item["height"]) for item in data["items"]] == [
        (3000, 2000), (4, 3), (1024, 1024), (None, None)]
    code, out, _err = run(capsys, "stats", folder)
    assert ("Image sizes: smallest 4x3 (b.png), median 1.05 MP, largest 3000x2000 (a.jpg); "
            "1 under 1024x1024 pixels (trainers upscale them; --json names them)\n") in out


def test_max_side_is_checked_like_every_number(capsys):
    from cli import run_exit

    code, out, err = run_exit(capsys, "caption", "x", "--max-side", "20000")
    assert (code, out) == (2, "")
    assert err.startswith("ollama-generate: error: argument --max-side: must be at most 16384, got '20000'\n")


# -- without Pillow: the production path in a process that cannot import it ----------------------


def without_pillow(tmp_path, *argv: str, host: str = ""):
    """Run the script in a process where `import PIL` fails, as on an install without the extra."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "no_pillow"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['PIL'] = None  # import PIL fails\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OLLAMA_", "COV_CORE"))}
    env.update(PYTHONPATH=str(blocker), NO_COLOR="1")
    if host:
        env["OLLAMA_HOST"] = host
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ollama_generate.py")
    return subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=env, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_without_pillow_doctor_says_what_is_lost_and_how_to_install_it(ollama, tmp_path):
    done = without_pillow(tmp_path, "doctor", host=ollama.url)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    at = lines.index("note  images: Pillow is not installed, so images are sent as they are: full size "
                     "(upload time and image tokens), EXIF orientation not applied, BMP and GIF not converted")
    assert lines[at + 1] == "      fix: pip install 'ollama-generate[images]'"


def test_without_pillow_originals_are_sent(ollama, tmp_path):
    originals = {"a.jpg": picture(3000, 2000, orientation=6), "b.bmp": picture(20, 10, "BMP")}
    folder = dataset(tmp_path, originals)
    done = without_pillow(tmp_path, "caption", str(folder), "--quiet", host=ollama.url)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert ollama.sent_images() == list(originals.values())
    done = without_pillow(tmp_path, "caption", str(folder), "--dry-run", "--overwrite", host=ollama.url)
    assert done.stdout.splitlines()[0] == f"caption: a.jpg (2000x3000) -> {folder / 'a.txt'}"


def test_without_pillow_webp_the_server_cannot_read_fails_with_the_way_out(make_ollama, tmp_path):
    server = make_ollama(unreadable_formats={"webp"})
    folder = dataset(tmp_path, {"a.webp": picture(64, 32, "WEBP")})
    done = without_pillow(tmp_path, "caption", str(folder / "a.webp"), host=server.url)
    assert done.returncode == 1
    assert done.stderr == (
        f"ollama-generate: error: {folder / 'a.webp'}: Ollama at {server.url} cannot read the image "
        "(Failed to create new sequence: image: unknown format)\n"
        "ollama-generate: hint: install Pillow (pip install 'ollama-generate[images]') to send it converted\n")
    assert len(server.requests_to("/api/chat")) == 1  # not retried: the same bytes fail the same way


def test_a_very_large_image_is_prepared_without_a_python_warning(recwarn, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # as if it were over 89 megapixels
    assert received(og.prepare_image(picture(150, 100, "PNG"), 60)) == ("JPEG", 60, 40)
    assert [str(warning.message) for warning in recwarn] == []
    with pytest.raises(og.ImageError, match="cannot prepare the image with Pillow"):
        og.prepare_image(picture(300, 300, "PNG"), 60)  # over twice the limit: Pillow refuses it


def test_corrupt_exif_is_prepared_without_a_python_warning(ollama, capsys, recwarn, tmp_path):
    # An orientation entry whose data lies beyond the segment: Pillow warns "Tag data larger than file".
    tiff = b"II*\0" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x0112, 3, 1000, 0x1000) + bytes(4)
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\0\0" + tiff
    data = picture(200, 100)
    folder = dataset(tmp_path, {"a.jpg": data[:2] + app1 + data[2:]})
    assert run(capsys, "caption", folder, "--quiet", "--max-side", "100") == (0, "", "")
    assert received(ollama.sent_images()[0]) == ("JPEG", 100, 50)
    assert [str(warning.message) for warning in recwarn] == []


def test_without_pillow_in_process_nothing_is_prepared(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "PIL", None)
    assert (og.pillow_version(), og.pillow_installed()) == ("", False)
    assert og.image_check().status == "note"
    assert og.preparation("bmp", og.ImageSize(6000, 4000, 6), 1536, pillow=og.pillow_installed()) == ""


def test_an_image_the_server_cannot_read_even_converted_fails_alone(make_ollama, capsys, tmp_path, monkeypatch):
    server = make_ollama(unreadable_formats={"webp", "jpeg", "png"})
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    folder = dataset(tmp_path, {"a.webp": picture(64, 32, "WEBP"), "b.bmp": picture(20, 10, "BMP")})
    code, _out, err = run(capsys, "caption", folder, "--quiet")
    assert code == 1
    reason = (f"Ollama at {server.url} cannot read the image (Failed to create new sequence: image: unknown "
              "format), also converted")
    assert f"Failed:\n  a.webp: {reason}\n  b.bmp: {reason}\n" in err
    assert [received(data)[0] for data in server.sent_images()] == ["WEBP", "JPEG", "JPEG"]
