"""`review`: every API route of the review server, its security checks, the edits journal and
backups, `caption --overwrite` keeping captions a person edited, recaption, and the static export."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import zlib

import pytest

import ollama_generate as og
from cli import run
from images import png_bytes
from traced import CACHE, TAGS, make_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = {"a.png": "ohwx, 1girl, red hair, smile", "b.png": "ohwx, 1girl, red hair, frown",
            "c.png": "ohwx, 1boy, black hair, smile", "sub/d.png": "ohwx, 1boy, red hair, hat"}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_dataset(folder, captions=CAPTIONS, extra=()):
    """Images with the given captions (None: no caption file)."""
    make_images(folder, [*captions, *extra])
    for name, caption in captions.items():
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return folder


class Review:
    """A review server on a free port, and a client that can send any request to it."""

    def __init__(self, folder, *, recursive=True, config=None, **kwargs):
        options = og.BatchOptions(recursive=recursive, keep_alive=None, release_models=False, quiet=True)
        self.dataset = og.ReviewDataset(str(folder), options, config=config or og.Config(), **kwargs)
        self.server = og.review_server(self.dataset)
        self.port = self.server.port
        self.host = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def request(self, method, path, body=None, *, token=True, headers=None, raw=None):
        """(status, headers, parsed JSON or bytes); the cookie carries the token unless token=False."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = {"Host": self.host}
        if token:
            sent["Cookie"] = f"{self.server.cookie}={self.server.token}"
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None:
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for key, value in sent.items():
            if value is not None:
                connection.putheader(key, value)
        if data is not None and "Content-Length" not in sent:
            connection.putheader("Content-Length", str(len(data)))
        connection.endheaders()
        if data is not None:
            connection.send(data)
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        if payload and response.getheader("Content-Type", "").startswith("application/json"):
            payload = json.loads(payload)
        return response.status, response, payload

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, body, **kwargs):
        return self.request("POST", path, body, **kwargs)

    def item(self, name):
        return next(item for item in self.get("/api/items")[2]["items"] if item["image"] == name)

    def save(self, name, caption, base=...):
        if base is ...:
            base = self.item(name)["hash"]
        return self.post("/api/save", {"image": name, "caption": caption, "base": base})


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "set")


@pytest.fixture
def review(dataset):
    server = Review(dataset)
    yield server
    server.close()


def journal(folder):
    path = folder / ".ollama-generate" / "edits.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def backups(folder):
    root = folder / ".ollama-generate" / "backup"
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()) \
        if root.exists() else []


# -- access: token, Host, Origin ---------------------------------------------------------------


def test_the_page_needs_the_token_and_sets_a_strict_cookie(review):
    assert review.get("/", token=False)[0] == 403
    assert review.get("/?token=wrong", token=False)[0] == 403
    assert review.get("/api/items", token=False)[2]["error"].startswith("open the address")
    assert review.get("/api/items", token=False, headers={"Cookie": f"{review.server.cookie}=nope"})[0] == 403
    status, response, page = review.get(f"/?token={review.server.token}", token=False)
    assert status == 200 and b'"readonly":false' in page and b"__REVIEW_DATA__" not in page
    cookie = response.getheader("Set-Cookie")
    assert cookie == f"{review.server.cookie}={review.server.token}; HttpOnly; SameSite=Strict; Path=/"
    assert "default-src 'none'" in response.getheader("Content-Security-Policy")
    assert response.getheader("Referrer-Policy") == "no-referrer"
    assert review.get("/api/items")[0] == 200  # the cookie alone will do from now on


@pytest.mark.parametrize("host", ["evil.example:{port}", "127.0.0.1:1", "localhost", "127.0.0.1",
                                  "[::1]:{port}", "127.0.0.2:{port}", ""])
def test_a_foreign_host_header_is_refused(review, host):
    status, _, answer = review.get("/api/items", headers={"Host": host.format(port=review.port)})
    assert status == 403 and "127.0.0.1 or localhost" in answer["error"]


def test_localhost_with_the_port_is_served(review):
    assert review.get("/api/items", headers={"Host": f"localhost:{review.port}"})[0] == 200


def test_a_change_from_another_origin_is_refused(review, dataset):
    status, _, answer = review.post("/api/save", {"image": "a.png", "caption": "x", "base": None},
                                    headers={"Origin": "http://evil.example"})
    assert status == 403 and "review page" in answer["error"]
    assert (dataset / "a.txt").read_text() == CAPTIONS["a.png"] + "\n"


def test_the_server_listens_on_loopback_only(review):
    assert review.server.server_address[0] == "127.0.0.1"
    assert review.server.url == f"http://127.0.0.1:{review.port}/?token={review.server.token}"
    assert len(review.server.token) >= 40


# -- images: only the walk's, by relative path -------------------------------------------------


def test_images_are_served_by_relative_path(review, dataset):
    status, response, data = review.get("/image/sub/d.png")
    assert status == 200 and data == (dataset / "sub" / "d.png").read_bytes()
    assert response.getheader("Content-Type") == "image/png"
    assert review.get("/image/sub%2Fd.png")[0] == 200


@pytest.mark.parametrize("path", [
    "/image/../outside.png", "/image/%2e%2e/outside.png", "/image/sub/../../outside.png",
    "/image/..%2Foutside.png", "/image//etc/passwd", "/image/%2Fetc%2Fpasswd", "/image/a.txt",
    "/image/sub", "/image/", "/image/.hidden.png", "/image/A.PNG", "/image/a.png%00", "/images/a.png",
    "/sub/", "/a.png", "/api/", "/favicon.ico", "/image/%ff.png"])
def test_anything_but_a_walked_image_is_404(review, dataset, path):
    (dataset.parent / "outside.png").write_bytes(png_bytes())
    (dataset / ".hidden.png").write_bytes(png_bytes())
    status, _, answer = review.get(path)
    assert status == 404, path
    assert isinstance(answer, dict) and answer["error"] == "not found"


def test_a_symlink_out_of_the_dataset_is_404(tmp_path):
    folder = make_dataset(tmp_path / "set")
    (tmp_path / "secret.png").write_bytes(png_bytes(seed=7))
    os.symlink(tmp_path / "secret.png", folder / "out.png")
    os.symlink(folder / "a.png", folder / "in.png")
    server = Review(folder)
    try:
        assert [item["image"] for item in server.get("/api/items")[2]["items"]].count("out.png") == 1
        assert server.get("/image/out.png")[0] == 404
        assert server.get("/image/in.png")[0] == 200
    finally:
        server.close()


def test_head_and_other_methods_get_no_listing(review):
    assert review.request("HEAD", "/")[0] == 405
    assert review.request("PUT", "/api/save", {})[0] == 405
    assert review.request("DELETE", "/image/a.png")[0] == 405
    assert review.post("/api/nothing", {})[0] == 404


# -- request bodies ----------------------------------------------------------------------------


def test_a_body_over_the_cap_is_413_without_reading_it(review):
    status, _, answer = review.post("/api/save", None, raw=b"{}",
                                    headers={"Content-Length": str(og.REVIEW_BODY_LIMIT + 1)})
    assert status == 413 and "over 4 MB" in answer["error"]


def test_a_body_without_length_or_json_is_refused(review):
    assert review.post("/api/save", None, raw=b"", headers={"Content-Length": None})[0] == 411
    assert review.post("/api/save", None, raw=b"{not json")[0] == 400
    assert review.post("/api/save", None, raw=b"[1, 2]")[2]["error"] == "the request body must be a JSON object"


# -- saves -------------------------------------------------------------------------------------


def test_a_save_writes_one_line_journals_it_and_backs_up_the_old_text(review, dataset):
    old = review.item("a.png")["hash"]
    assert old == sha(CAPTIONS["a.png"] + "\n")
    status, _, answer = review.save("a.png", "ohwx, 1girl, red hair,\nbig smile  ")
    assert status == 200
    assert (dataset / "a.txt").read_text(encoding="utf-8") == "ohwx, 1girl, red hair, big smile\n"
    assert answer["item"]["caption"] == "ohwx, 1girl, red hair, big smile"
    assert answer["item"]["hash"] == sha("ohwx, 1girl, red hair, big smile\n")
    assert answer["summary"]["images"] == 4 and "items" not in answer["summary"]
    [entry] = journal(dataset)
    assert entry["image"] == "a.png" and entry["caption_file"] == "a.txt" and entry["by"] == "review"
    assert (entry["old"], entry["new"]) == (old, answer["item"]["hash"])
    assert entry["time"].endswith("Z") and len(entry["time"]) == 22
    [backup] = backups(dataset)
    assert backup.startswith("a.") and backup.endswith(".txt")
    assert (dataset / ".ollama-generate" / "backup" / backup).read_text() == CAPTIONS["a.png"] + "\n"


def test_a_save_in_a_subfolder_backs_up_under_the_same_path(review, dataset):
    assert review.save("sub/d.png", "ohwx, hat")[0] == 200
    [backup] = backups(dataset)
    assert backup.startswith("sub/d.") and backup.endswith(".txt")
    assert journal(dataset)[0]["caption_file"] == "sub/d.txt"


def test_a_missing_caption_can_be_written(tmp_path):
    folder = make_dataset(tmp_path / "set", {"a.png": None, "b.png": "x, y"})
    server = Review(folder)
    try:
        assert server.item("a.png")["hash"] is None and "missing" in server.item("a.png")["flags"]
        assert server.save("a.png", "a new caption")[0] == 200
        assert (folder / "a.txt").read_text() == "a new caption\n"
        assert backups(folder) == [] and journal(folder)[0]["old"] is None
    finally:
        server.close()


@pytest.mark.parametrize("caption", ["", "   ", "\n\n", " , "[:1], None, 42])
def test_an_empty_caption_is_refused_with_a_message(review, dataset, caption):
    status, _, answer = review.save("a.png", caption)
    assert status == 400
    assert answer["error"] == "an empty caption is not saved: a caption file is never empty"
    assert (dataset / "a.txt").read_text() == CAPTIONS["a.png"] + "\n"
    assert journal(dataset) == [] and backups(dataset) == []


def test_a_file_changed_on_disk_is_not_overwritten(review, dataset):
    base = review.item("a.png")["hash"]
    (dataset / "a.txt").write_text("changed by another program\n")
    status, _, answer = review.save("a.png", "mine", base=base)
    assert status == 409 and "changed on disk" in answer["error"] and "reload" in answer["error"]
    assert (dataset / "a.txt").read_text() == "changed by another program\n"
    assert journal(dataset) == []


@pytest.mark.parametrize("name", ["../a.png", "/etc/passwd", "a.txt", "sub", "missing.png", None, ["a.png"]])
def test_a_save_names_only_walked_images(review, dataset, name):
    status, _, answer = review.post("/api/save", {"image": name, "caption": "x", "base": None})
    assert status == 404 and "there is no image" in answer["error"]
    assert sorted(os.listdir(dataset)) == ["a.png", "a.txt", "b.png", "b.txt", "c.png", "c.txt", "sub"]


def test_a_save_never_writes_through_a_linked_caption_file(tmp_path):
    folder = make_dataset(tmp_path / "set", {"a.png": None})
    (tmp_path / "target.txt").write_text("keep me\n")
    os.symlink(tmp_path / "target.txt", folder / "a.txt")
    server = Review(folder)
    try:
        status, _, answer = server.save("a.png", "new text", base=None)
        assert status == 409 and "symbolic link" in answer["error"]
        assert (tmp_path / "target.txt").read_text() == "keep me\n"
    finally:
        server.close()


def test_concurrent_saves_of_one_caption_let_exactly_one_win(review, dataset):
    base = review.item("a.png")["hash"]
    results = []

    def save(number):
        results.append(review.save("a.png", f"version {number}", base=base)[0])

    threads = [threading.Thread(target=save, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [200] + [409] * 11
    assert (dataset / "a.txt").read_text().startswith("version ")
    assert len(journal(dataset)) == 1 and len(backups(dataset)) == 1


def test_concurrent_saves_of_different_captions_all_land(review, dataset):
    bases = {name: review.item(name)["hash"] for name in CAPTIONS}
    results = {}

    def save(name):
        results[name] = review.save(name, f"new caption of {name}", base=bases[name])[0]

    threads = [threading.Thread(target=save, args=(name,)) for name in CAPTIONS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(results.values()) == {200}
    for name in CAPTIONS:
        assert (dataset / name).with_suffix(".txt").read_text() == f"new caption of {name}\n"
    assert sorted(entry["image"] for entry in journal(dataset)) == sorted(CAPTIONS)


def test_a_save_that_cannot_be_journaled_changes_nothing(review, dataset):
    (dataset / ".ollama-generate").mkdir()
    (dataset / ".ollama-generate" / "edits.jsonl").mkdir()
    status, _, answer = review.save("a.png", "new")
    assert status == 500 and answer["error"].startswith("nothing was changed: cannot keep the backup")
    assert (dataset / "a.txt").read_text() == CAPTIONS["a.png"] + "\n"


def test_a_linked_state_folder_is_never_written_through(tmp_path):
    folder = make_dataset(tmp_path / "set")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", folder / ".ollama-generate")
    server = Review(folder)
    try:
        status, _, answer = server.save("a.png", "new")
        assert status == 500 and "symbolic link" in answer["error"]
        assert os.listdir(tmp_path / "elsewhere") == []
    finally:
        server.close()


# -- bulk changes and undo ---------------------------------------------------------------------


def test_rename_a_tag_preview_apply_and_undo(review, dataset):
    request = {"op": "rename", "tag": "Red Hair", "to": "auburn hair"}
    status, _, preview = review.post("/api/preview", request)
    assert status == 200
    assert (preview["what"], preview["changes"], preview["left_empty"]) == ("rename 'Red Hair' to 'auburn hair'", 3, 0)
    assert preview["samples"][0] == {"image": "a.png", "old": CAPTIONS["a.png"],
                                     "new": "ohwx, 1girl, auburn hair, smile"}
    assert journal(dataset) == [] and (dataset / "a.txt").read_text() == CAPTIONS["a.png"] + "\n"
    status, _, applied = review.post("/api/apply", request)
    assert status == 200 and applied["applied"] and applied["changes"] == 3
    assert (dataset / "sub" / "d.txt").read_text() == "ohwx, 1boy, auburn hair, hat\n"
    assert (dataset / "c.txt").read_text() == CAPTIONS["c.png"] + "\n"
    assert [entry["by"] for entry in journal(dataset)] == ["bulk"] * 3
    assert len(backups(dataset)) == 3
    assert review.get("/api/items")[2]["undo"] == {"what": "rename 'Red Hair' to 'auburn hair'", "files": 3}
    status, _, undone = review.post("/api/undo", {})
    assert (status, undone["undone"], undone["changed_since"]) == (200, 3, [])
    for name, caption in CAPTIONS.items():
        assert (dataset / name).with_suffix(".txt").read_text() == caption + "\n"
    assert [entry["by"] for entry in journal(dataset)][3:] == ["undo"] * 3
    assert review.get("/api/items")[2]["undo"] is None
    assert review.post("/api/undo", {})[2]["error"] == "there is no bulk change to undo"


def test_merge_remove_and_scope(review, dataset):
    applied = review.post("/api/apply", {"op": "rename", "tag": "smile", "to": "1girl"})[2]
    assert applied["changes"] == 2
    assert (dataset / "a.txt").read_text() == "ohwx, 1girl, red hair\n"  # merged into the tag it had
    assert (dataset / "c.txt").read_text() == "ohwx, 1boy, black hair, 1girl\n"
    removed = review.post("/api/apply", {"op": "remove", "tag": "ohwx", "images": ["b.png", "c.png"]})[2]
    assert removed["changes"] == 2
    assert (dataset / "b.txt").read_text() == "1girl, red hair, frown\n"
    assert (dataset / "a.txt").read_text() == "ohwx, 1girl, red hair\n"


def test_a_change_that_would_empty_a_caption_leaves_it(tmp_path):
    folder = make_dataset(tmp_path / "set", {"a.png": "solo", "b.png": "solo, smile"})
    server = Review(folder)
    try:
        answer = server.post("/api/apply", {"op": "remove", "tag": "solo"})[2]
        assert (answer["changes"], answer["left_empty"]) == (1, 1)
        assert (folder / "a.txt").read_text() == "solo\n" and (folder / "b.txt").read_text() == "smile\n"
    finally:
        server.close()


def test_find_and_replace_preview_apply_and_undo(review, dataset):
    request = {"op": "replace", "find": "HAIR", "replace": "locks", "case": False}
    preview = review.post("/api/preview", request)[2]
    assert preview["changes"] == 4 and preview["what"] == "replace 'HAIR' with 'locks'"
    assert review.post("/api/preview", {**request, "case": True})[2]["changes"] == 0
    review.post("/api/apply", request)
    assert (dataset / "c.txt").read_text() == "ohwx, 1boy, black locks, smile\n"
    regex = {"op": "replace", "find": r"(\w+) locks", "replace": r"locks of \1", "regex": True}
    assert review.post("/api/apply", regex)[2]["changes"] == 4
    assert (dataset / "c.txt").read_text() == "ohwx, 1boy, locks of black, smile\n"
    assert review.post("/api/undo", {})[2]["undone"] == 4  # only the last bulk change
    assert (dataset / "c.txt").read_text() == "ohwx, 1boy, black locks, smile\n"


def test_undo_leaves_a_file_changed_since(review, dataset):
    review.post("/api/apply", {"op": "rename", "tag": "smile", "to": "grin"})
    assert review.save("a.png", "edited after the bulk change")[0] == 200
    answer = review.post("/api/undo", {})[2]
    assert (answer["undone"], answer["changed_since"]) == (1, ["a.png"])
    assert (dataset / "a.txt").read_text() == "edited after the bulk change\n"
    assert (dataset / "c.txt").read_text() == CAPTIONS["c.png"] + "\n"


@pytest.mark.parametrize("request_body, message", [
    ({"op": "rename", "tag": "smile"}, "name the tag and its new name"),
    ({"op": "remove", "tag": " "}, "name the tag"),
    ({"op": "rename", "tag": "a, b", "to": "c"}, "a tag has no commas"),
    ({"op": "replace", "find": ""}, "give the text to find"),
    ({"op": "replace", "find": "(", "regex": True}, "the pattern '(' cannot be used"),
    ({"op": "replace", "find": "a", "replace": r"\9", "regex": True}, "the pattern 'a' cannot be used"),
    ({"op": "shuffle"}, "op must be rename, remove or replace"),
    ({"op": "remove", "tag": 3}, "tag, to, find and replace must be text"),
    ({"op": "remove", "tag": "x", "images": "a.png"}, "images must be a list of image names"),
])
def test_bulk_requests_that_cannot_work_are_refused(review, request_body, message):
    status, _, answer = review.post("/api/preview", request_body)
    assert status == 400 and answer["error"].startswith(message)


def test_a_bulk_change_names_only_walked_images(review):
    status, _, answer = review.post("/api/apply", {"op": "remove", "tag": "smile", "images": ["../x.png"]})
    assert status == 404


# -- what the page is given --------------------------------------------------------------------


def test_items_carry_flags_hashes_and_the_summary(tmp_path):
    folder = make_dataset(tmp_path / "set", {"a.png": "ohwx, smile", "b.png": "red, blue", "c.png": None,
                                             "d.png": "", "e.png": "Red, blue", "f.png": "green"})
    server = Review(folder)
    try:
        data = server.get("/api/items")[2]
        # The page opens on the stats document: the same guess of the trigger (the first chunk of half
        # the captions), the same flags (two-tag captions are out of the tags range).
        assert data["trigger"] == "red" and data["style"] == "tags" and data["readonly"] is False
        assert data["trigger_summary"]["source"] == "first chunk"
        assert (data["images"], data["captioned"], data["missing"], data["empty"]) == (6, 4, 1, 1)
        assert data["duplicates"] == [["b.png", "e.png"]]
        flags = {item["image"]: item["flags"] for item in data["items"]}
        assert flags == {"a.png": ["out of range", "missing trigger"], "b.png": ["out of range", "duplicate"],
                         "c.png": ["missing"], "d.png": ["empty"], "e.png": ["out of range", "duplicate"],
                         "f.png": ["out of range", "missing trigger"]}
        assert {item["image"]: item["src"] for item in data["items"]}["a.png"] == "/image/a.png"
    finally:
        server.close()


def test_the_trigger_is_guessed_and_a_caption_without_it_flagged(review):
    data = review.get("/api/items")[2]
    assert data["trigger"] == "ohwx"
    review.save("a.png", "1girl, red hair")
    assert "missing trigger" in review.item("a.png")["flags"]


def test_the_last_report_and_cached_description_explain_a_flag(tmp_path):
    folder = make_dataset(tmp_path / "set", {"a.png": "ohwx, smile", "b.png": "ohwx, frown"})
    state = folder / ".ollama-generate"
    state.mkdir()
    (state / "descriptions.jsonl").write_text(json.dumps({"key": "k", "image": "a.png",
                                                          "description": "A woman smiles."}) + "\n")
    (state / "last-report.json").write_text(json.dumps({
        "needs_review": [{"image": "a.png", "reason": "list numbering", "rules": ["list-numbering"]}],
        "captions": [{"image": "a.png", "rules": ["list-numbering"], "raw": "1. ohwx, smile",
                      "spans": [{"rule": "list-numbering", "action": "strip", "text": "1. "}]}]}))
    server = Review(folder)
    try:
        item = server.item("a.png")
        assert item["review"] == "list numbering" and "needs review" in item["flags"]
        assert item["spans"] == [{"rule": "list-numbering", "action": "strip", "text": "1. "}]
        assert (item["raw"], item["description"]) == ("1. ohwx, smile", "A woman smiles.")
        assert server.item("b.png")["review"] is None and server.item("b.png")["description"] is None
        server.save("a.png", "ohwx, big smile")  # a person looked at it: the old reason is gone
        assert server.item("a.png")["review"] is None
    finally:
        server.close()


def test_server_state_says_when_no_server_is_reachable(tmp_path, dataset):
    config = og.Config(hosts=("http://127.0.0.1:9",))
    server = Review(dataset, config=config)
    try:
        state = server.get("/api/server")[2]
        assert state["reachable"] is False and "cannot connect" in state["message"]
        status, _, answer = server.post("/api/recaption", {"image": "a.png", "base": server.item("a.png")["hash"]})
        assert status == 503 and "cannot connect" in answer["error"] and "ollama serve" in answer["hint"]
        assert (dataset / "a.txt").read_text() == CAPTIONS["a.png"] + "\n"
    finally:
        server.close()


# -- recaption against the fake server ---------------------------------------------------------


def test_recaption_uses_the_cached_description_and_backs_up(ollama, capsys, tmp_path):
    folder = make_images(tmp_path / "set", ["a.png", "b.png"])
    assert run(capsys, "caption", folder, "--style", "tags")[0] == 0
    assert (folder / ".ollama-generate" / "last-report.json").exists()
    first = (folder / "a.txt").read_text()
    (folder / "a.txt").write_text("a person's caption\n")
    calls = len(ollama.requests)
    server = Review(folder, config=og.Config(hosts=(ollama.url,)))
    try:
        assert server.dataset.spec.style == "tags"
        assert server.get("/api/server")[2]["reachable"] is True
        status, _, answer = server.post("/api/recaption", {"image": "a.png", "base": sha("a person's caption\n")})
        assert status == 200 and answer["cached"] is True
        assert (folder / "a.txt").read_text() == first
        assert answer["item"]["caption"] == first.strip()
        generated = [r.path for r in ollama.requests[calls:] if r.path in ("/api/chat", "/api/generate")
                     and (r.body.get("prompt") or r.body.get("messages"))]
        assert generated == ["/api/generate"]  # one text call: the description came from the cache
        [backup] = backups(folder)
        assert (folder / ".ollama-generate" / "backup" / backup).read_text() == "a person's caption\n"
        assert journal(folder)[-1]["by"] == "recaption"
        status, _, answer = server.post("/api/recaption", {"image": "a.png", "base": "stale"})
        assert status == 409
    finally:
        server.close()


def test_recaption_sizes_the_vision_context_as_caption_does(make_ollama, capsys, tmp_path, monkeypatch):
    from images import picture

    server_ = make_ollama(models={
        og.DEFAULT_VISION_MODEL: {"capabilities": ("completion", "vision"), "family": "mllama"},
        og.DEFAULT_MODEL: {"capabilities": ("completion",), "family": "qwen3"}})
    monkeypatch.setenv("OLLAMA_HOST", server_.url)
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "a.png").write_bytes(picture(1200, 600, "PNG"))  # 3 x 2 tiles of 560: mllama's 4 x 1,601
    assert run(capsys, "caption", folder / "a.png", "--no-cache")[0] == 0
    prompt = og.prompt_tokens("".join(og.vision_prompt(og.Config())))
    needed = og.vision_context(4 * 1601, prompt)
    assert needed > og.NUM_CTX
    assert [rec.body["options"]["num_ctx"] for rec in server_.requests_to("/api/chat")] == [needed]
    (folder / og.CACHE_FOLDER / og.DescriptionCache.FILENAME).unlink()  # recaption describes it again
    review = Review(folder, config=og.Config(hosts=(server_.url,)))
    try:
        base = review.item("a.png")["hash"]
        status, _, _answer = review.post("/api/recaption", {"image": "a.png", "base": base})
        assert status == 200
    finally:
        review.close()
    assert [rec.body["options"]["num_ctx"] for rec in server_.requests_to("/api/chat")] == [needed, needed]


# -- caption --overwrite and edited captions ---------------------------------------------------


def test_caption_overwrite_keeps_edited_captions_and_overwrite_edited_replaces_them(ollama, capsys, tmp_path):
    folder = make_images(tmp_path / "set", ["a.png", "b.png", "c.png"])
    assert run(capsys, "caption", folder, "--style", "tags")[0] == 0
    server = Review(folder)
    try:
        assert server.save("a.png", "edited by hand")[0] == 200
    finally:
        server.close()
    (folder / "b.txt").write_text("changed outside review\n")  # not in the journal: replaced
    code, out, err = run(capsys, "caption", folder, "--style", "tags", "--overwrite")
    assert (code, out) == (0, "")
    assert "Keeping 1 caption a person edited (--overwrite-edited replaces it too)." in err
    assert "Done after" in err and "2 written, 1 skipped" in err
    assert (folder / "a.txt").read_text() == "edited by hand\n"
    assert (folder / "b.txt").read_text() != "changed outside review\n"
    kept = backups(folder)
    assert len(kept) == 1 + 2  # the review save, then b and c before --overwrite replaced them
    assert any(name.startswith("b.") for name in kept)
    dry = run(capsys, "caption", folder, "--overwrite", "--dry-run")[1]
    assert f"skip: a.png ({og.EDITED_REASON})" in dry
    code, _, err = run(capsys, "caption", folder, "--style", "tags", "--overwrite-edited")
    assert code == 0 and "Keeping" not in err and "3 written" in err
    assert (folder / "a.txt").read_text() == TAGS + "\n"
    assert len(backups(folder)) == 3 + 3
    edited = [path for path in backups(folder) if path.startswith("a.")]
    assert any((folder / ".ollama-generate" / "backup" / path).read_text() == "edited by hand\n"
               for path in edited)


def test_overwrite_edited_works_on_a_folder_only(ollama, capsys, tmp_path):
    image = make_images(tmp_path, ["one.png"]) / "one.png"
    code, _, err = run(capsys, "caption", image, "--overwrite-edited")
    assert code == 2
    assert err == f"ollama-generate: error: --overwrite-edited works on a folder, and {image} is a file\n"


def test_a_caption_that_cannot_be_backed_up_is_not_replaced(ollama, capsys, tmp_path):
    folder = make_images(tmp_path / "set", ["a.png"])
    (folder / "a.txt").write_text("old\n")
    (folder / ".ollama-generate").mkdir()
    (folder / ".ollama-generate" / "backup").write_text("a file in the way\n")
    code, _, err = run(capsys, "caption", folder, "--overwrite")
    assert code == 1 and "cannot back up" in err and "before replacing it" in err
    assert (folder / "a.txt").read_text() == "old\n"


def test_read_journal_skips_torn_lines(tmp_path):
    (tmp_path / ".ollama-generate").mkdir()
    (tmp_path / ".ollama-generate" / "edits.jsonl").write_text(
        '{"caption_file": "a.txt", "by": "review", "new": "1"}\n{"caption_fi\n[]\n')
    assert og.read_journal(str(tmp_path)) == {"a.txt": {"caption_file": "a.txt", "by": "review", "new": "1"}}


# -- static export and the command line --------------------------------------------------------


def test_static_export_is_one_read_only_file_with_relative_images(capsys, dataset, tmp_path):
    out_dir = tmp_path / "share"
    out_dir.mkdir()
    page = out_dir / "review.html"
    code, out, err = run(capsys, "review", dataset, "-r", "--html", page)
    assert (code, out) == (0, "")
    assert err == f"Wrote the review page of 4 images to {page} (read-only; images by relative path).\n"
    text = page.read_text(encoding="utf-8")
    data = json.loads(text.split('type="application/json">', 1)[1].split("</script>", 1)[0])
    assert data["readonly"] is True
    assert {item["image"]: item["src"] for item in data["items"]}["sub/d.png"] == "../set/sub/d.png"
    assert "?token=" not in text and "<script src" not in text and "http://" not in text.split("</style>")[0]
    assert run(capsys, "review", dataset, "--html", page, "--json")[1].startswith('{\n  "command": "review"')


def test_embedded_data_cannot_close_the_script(tmp_path, capsys):
    folder = make_dataset(tmp_path / "set", {"a.png": "</script><script>alert(1)</script>"})
    page = tmp_path / "page.html"
    assert run(capsys, "review", folder, "--html", page)[0] == 0
    text = page.read_text()
    assert "</script><script>alert" not in text and "\\u003c/script\\u003e" in text


@pytest.mark.parametrize("argv, message", [
    (["review", "{tmp}/nothing"], "ollama-generate: error: {tmp}/nothing is not a folder\n"),
    (["review", "{tmp}/empty"], "ollama-generate: error: {tmp}/empty has no images"),
    (["review", "{tmp}/set", "--json", "--no-browser"], "ollama-generate: error: --json works with review --html"),
    (["review", "{tmp}/set", "--trigger", "a, b"], "ollama-generate: error: --trigger must be one word"),
    (["review", "{tmp}/set", "--ext", "png"], "ollama-generate: error: --ext 'png' is not a caption extension"),
    (["review", "{tmp}/set", "--html", "{tmp}"], "ollama-generate: error: --html {tmp} is a folder"),
])
def test_review_usage_errors_are_one_line(capsys, tmp_path, argv, message):
    make_dataset(tmp_path / "set")
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, *[arg.format(tmp=tmp_path) for arg in argv])
    assert code == 2 and (out == "" or "--json" in argv)
    assert err.startswith(message.format(tmp=tmp_path)) and "Traceback" not in err


def test_a_port_in_use_is_one_error(capsys, dataset):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run(capsys, "review", dataset, "--port", port, "--no-browser")
    assert (code, out) == (1, "")
    assert err.startswith(f"ollama-generate: error: cannot listen on 127.0.0.1:{port} (")
    assert "ollama-generate: hint: choose another --port" in err


def test_review_prints_the_address_first_and_ctrl_c_ends_it_with_0(dataset):
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "ollama_generate.py"), "review", str(dataset),
                                "--no-browser", "-r"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        assert first.startswith("http://127.0.0.1:") and "/?token=" in first
        port = int(first.split(":")[2].split("/")[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/?" + first.strip().split("?", 1)[1])
        assert connection.getresponse().status == 200
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0 and out == ""
    assert err == f"Reviewing 4 images in {dataset}; Ctrl-C stops the server.\n\n" \
                  "Stopped the review server (0 captions saved).\n"


def test_the_page_is_found_like_the_templates(tmp_path, monkeypatch):
    monkeypatch.setattr(og, "PROMPTS_OVERRIDE", str(tmp_path))
    (tmp_path / "review.html").write_text("<p>no data here</p>")
    with pytest.raises(og.TemplateError, match="must hold __REVIEW_DATA__ once"):
        og.review_page()
    (tmp_path / "review.html").write_text("<p>__REVIEW_DATA__</p>")
    assert og.review_page() == "<p>__REVIEW_DATA__</p>"
    monkeypatch.setattr(og, "builtin_template_dirs", lambda: [])
    (tmp_path / "review.html").unlink()
    with pytest.raises(og.TemplateError, match="review page review.html was not found"):
        og.review_page()
