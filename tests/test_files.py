"""Images in, caption files out: sniffing, discovery, and atomic UTF-8 writes."""

from __future__ import annotations

import os
import struct

import pytest
from images import jpeg_bytes, png_bytes

import ollama_generate as og


def _gif() -> bytes:
    return b"GIF89a" + struct.pack("<HH", 1, 1) + b"\x00\x00\x00" + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"


def _webp(size: int | None = None) -> bytes:
    payload = b"WEBPVP8 " + b"\x00" * 20
    declared = len(payload) if size is None else size
    return b"RIFF" + struct.pack("<I", declared) + payload


def _bmp(extra: int = 0) -> bytes:
    body = struct.pack("<I", 40) + b"\x00" * 36
    total = 14 + len(body)
    return b"BM" + struct.pack("<I", total + extra) + b"\x00" * 8 + body


@pytest.mark.parametrize(
    ("name", "data", "kind"),
    [
        ("a.png", png_bytes(), "png"),
        ("a.jpg", jpeg_bytes(), "jpeg"),
        ("a.gif", _gif(), "gif"),
        ("a.webp", _webp(), "webp"),
        ("a.bmp", _bmp(), "bmp"),
        # The bytes decide, not the name: a PNG saved as .jpg is still a fine image.
        ("mislabeled.jpg", png_bytes(), "png"),
    ],
)
def test_sniff_image_accepts_real_images(tmp_path, name, data, kind):
    path = tmp_path / name
    path.write_bytes(data)
    assert og.sniff_image(str(path)) == kind


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "the file is empty"),
        (b"hello, this is text", "not a supported image (its bytes are not PNG, JPEG, WebP, BMP or GIF)"),
        (b"II*\x00" + b"\x00" * 40, "not a supported image (its bytes are not PNG, JPEG, WebP, BMP or GIF)"),
        (png_bytes()[:-20], "the PNG file is truncated"),
        (jpeg_bytes()[:-10], "the JPEG file is truncated"),
        (_gif()[:-1], "the GIF file is truncated"),
        (_webp(size=500), "the WEBP file is truncated"),
        (_bmp(extra=100), "the BMP file is truncated"),
    ],
    ids=["empty", "text", "tiff", "png-cut", "jpeg-cut", "gif-cut", "webp-cut", "bmp-cut"],
)
def test_sniff_image_rejects_what_is_not_a_whole_image(tmp_path, data, reason):
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with pytest.raises(og.ImageError) as caught:
        og.sniff_image(str(path))
    assert str(caught.value) == reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_sniff_image_reports_an_unreadable_file(tmp_path):  # pragma: no cover - CI runs as root
    path = tmp_path / "locked.png"
    path.write_bytes(png_bytes())
    path.chmod(0)
    with pytest.raises(og.ImageError, match="cannot read the file"):
        og.sniff_image(str(path))


def test_sniff_image_reports_a_missing_file(tmp_path):
    with pytest.raises(og.ImageError, match=r"^cannot read the file \(No such file or directory\)$"):
        og.sniff_image(str(tmp_path / "gone.png"))


def test_find_images_sorted_any_case_skipping_hidden_and_others(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JpEg", "d.webp", "e.bmp", "f.gif", "notes.txt", "g.tiff",
                 ".hidden.png", "._a.jpg", "z.heic"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    found = [os.path.basename(p) for p in og.find_images(str(tmp_path))]
    assert found == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.bmp", "f.gif"]


def test_caption_path_swaps_the_extension():
    assert og.caption_path("/data/set/img_001.PNG") == "/data/set/img_001.txt"
    assert og.caption_path("a.b.jpg") == "a.b.txt"


def test_write_caption_file_is_one_utf8_line_without_bom(tmp_path):
    path = tmp_path / "a.txt"
    og.write_caption_file(str(path), "ohwx, ein Fuchs im Schnee \u2014 caf\u00e9\n")
    data = path.read_bytes()
    assert data == "ohwx, ein Fuchs im Schnee \u2014 caf\u00e9\n".encode()
    assert not data.startswith(b"\xef\xbb\xbf")
    assert list(tmp_path.iterdir()) == [path]


def test_write_caption_file_respects_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        og.write_caption_file(str(tmp_path / "a.txt"), "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640


def test_write_caption_file_refuses_empty(tmp_path):
    with pytest.raises(og.ImageError, match="refusing to write an empty caption"):
        og.write_caption_file(str(tmp_path / "a.txt"), " \n ")
    assert list(tmp_path.iterdir()) == []


def test_write_caption_file_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("old caption\n")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(og.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        og.write_caption_file(str(target), "new caption")
    assert target.read_text() == "old caption\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_plan_jobs_skips_existing_and_flags_shared_caption_files(tmp_path):
    for name in ["a.png", "b.jpg", "b.png", "c.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "c.txt").write_text("done\n")
    images = og.find_images(str(tmp_path))
    jobs = og.plan_jobs(str(tmp_path), images, og.BatchOptions())
    assert [(j.name, j.status, j.reason) for j in jobs] == [
        ("a.png", "pending", ""),
        ("b.jpg", "pending", ""),
        ("b.png", "failed", "shares its caption file b.txt with b.jpg"),
        ("c.png", "skipped", "caption exists"),
    ]
    again = og.plan_jobs(str(tmp_path), images, og.BatchOptions(overwrite=True))
    assert [j.status for j in again] == ["pending", "pending", "failed", "pending"]
