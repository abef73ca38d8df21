"""Our dataset outputs read by the tools that consume them: the --manifest by Hugging Face
`datasets`, model card front matter by PyYAML and huggingface_hub, CLIP token counts by the real
tokenizer's rules. Everything runs offline: a local imagefolder, card text parsed without the Hub."""

from __future__ import annotations

import json
import os

import pytest
from cli import run
from traced import derived_answer, expected_caption, make_images

import ollama_generate as og


@pytest.fixture
def fake(ollama):
    ollama.default_text = derived_answer
    return ollama


def load_imagefolder(folder, cache, monkeypatch):
    """Load FOLDER as `datasets` does for a trainer, offline: {file name: (size, text)}."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(cache / "datasets"))
    rows = loaded["train"]
    assert rows.column_names == ["image", "text"]
    return {os.path.relpath(row["image"].filename, folder): (row["image"].size, row["text"]) for row in rows}


# -- --manifest ------------------------------------------------------------------------------------


def test_a_manifest_is_loaded_by_datasets_with_images_and_captions(fake, capsys, tmp_path, monkeypatch):
    dataset = make_images(tmp_path / "set", ["a.png", "bad.png", "sub/b.png", "sub/c.png"])
    (dataset / "sub" / "b.txt").write_text("café, 🌸 latte art\n", encoding="utf-8")
    code, out, _err = run(capsys, "caption", dataset, "-r", "--manifest")  # bare: DATASET/metadata.jsonl
    assert (code, out) == (1, "")  # bad.png failed: no row, and datasets leaves it out
    assert load_imagefolder(dataset, tmp_path, monkeypatch) == {
        "a.png": ((2, 2), expected_caption(dataset / "a.png").strip()),
        os.path.join("sub", "b.png"): ((2, 2), "café, 🌸 latte art"),
        os.path.join("sub", "c.png"): ((2, 2), expected_caption(dataset / "sub" / "c.png").strip()),
    }


def test_a_manifest_with_output_dir_pairs_each_image_with_its_caption(fake, capsys, tmp_path, monkeypatch):
    dataset = make_images(tmp_path / "set", ["a.png", "sub/b.png"])
    out_dir = tmp_path / "captions"
    code, out, _err = run(capsys, "caption", dataset, "-r", "--output-dir", out_dir,
                          "--manifest", dataset / "metadata.jsonl")
    assert (code, out) == (0, "")
    assert not (dataset / "a.txt").exists() and (out_dir / "sub" / "b.txt").exists()
    assert load_imagefolder(dataset, tmp_path, monkeypatch) == {
        "a.png": ((2, 2), (out_dir / "a.txt").read_text(encoding="utf-8").strip()),
        os.path.join("sub", "b.png"): ((2, 2), (out_dir / "sub" / "b.txt").read_text(encoding="utf-8").strip()),
    }
    assert not (out_dir / "metadata.jsonl").exists()


def manifest_refusal(dataset, given, why):
    return (2, "", f"ollama-generate: error: --manifest {given} {why}\n"
                   f"ollama-generate: hint: write it to {dataset}/metadata.jsonl, or give --manifest "
                   "without a file name\n")


OUTSIDE = "is outside the dataset {dataset}: Hugging Face datasets reads file_name relative to the manifest's folder"
WRONG_NAME = 'is not named metadata.jsonl: load_dataset("imagefolder") finds the manifest only by that name'


@pytest.mark.parametrize(("where", "why"), [
    ("hf/metadata.jsonl", OUTSIDE),              # beside the dataset: ../set/a.png
    ("metadata.jsonl", OUTSIDE),                 # its parent: set/a.png, with whatever else is there
    ("set/sub/metadata.jsonl", OUTSIDE),         # inside, but a.png would be ../a.png
    ("captions/metadata.jsonl", OUTSIDE),        # the --output-dir
    ("set/manifest.jsonl", WRONG_NAME),
    ("set/metadata.json", WRONG_NAME),
    ("set/metadata.csv", WRONG_NAME),            # a name datasets knows, but we write JSON lines
])
def test_a_manifest_datasets_could_not_load_is_refused_before_any_model_call(fake, capsys, tmp_path, where, why):
    dataset = make_images(tmp_path / "set", ["a.png", "sub/b.png"])
    (tmp_path / "hf").mkdir()
    given = tmp_path / where
    code, out, err = run(capsys, "caption", dataset, "-r", "--output-dir", tmp_path / "captions",
                         "--manifest", given)
    assert (code, out, err) == manifest_refusal(dataset, given, why.format(dataset=dataset))
    assert fake.requests == []
    assert not given.exists() and not (tmp_path / "captions").exists()


def test_a_refused_manifest_is_refused_in_a_dry_run_too(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    code, out, err = run(capsys, "caption", dataset, "--dry-run", "--manifest", tmp_path / "metadata.jsonl")
    assert (code, out, err) == manifest_refusal(dataset, tmp_path / "metadata.jsonl",
                                                OUTSIDE.format(dataset=dataset))


def test_a_manifest_given_by_a_relative_path_into_the_dataset_is_fine(fake, capsys, tmp_path, monkeypatch):
    dataset = make_images(tmp_path / "set", ["a.png"])
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "caption", "set", "--manifest", "set/../set/metadata.jsonl")[0] == 0
    assert json.loads((dataset / "metadata.jsonl").read_text(encoding="utf-8"))["file_name"] == "a.png"


def test_a_bare_manifest_on_a_single_image_is_refused(fake, capsys, tmp_path):
    photo = make_images(tmp_path, ["a.png"]) / "a.png"
    assert run(capsys, "caption", photo, "--manifest") == (
        2, "", f"ollama-generate: error: --manifest works on a folder, and {photo} is a file\n")


# -- model cards -------------------------------------------------------------------------------------


def card(ollama, capsys, *flags):
    ollama.reply("A body.")
    code, out, err = run(capsys, "describe", "Sakura 🌸", "--type", "style", "--no-stream", *flags)
    assert (code, err) == (0, "")
    return out


def front_matter(text):
    assert text.startswith("---\n")
    return text.split("---\n")[1]


def test_card_front_matter_is_utf8_that_yaml_and_model_card_read_back(ollama, capsys):
    import yaml
    from huggingface_hub import ModelCard

    out = card(ollama, capsys, "--trigger", "🌸 sakura", "--tags", "桜, ünïcode, \"quoted\"",
               "--base-model", "black-forest-labs/FLUX.1-dev", "--license", "other",
               "--license-name", "flux-1-dev-non-commercial-license", "--license-link", "LICENSE.md")
    front = front_matter(out)
    assert '"🌸 sakura"' in front and "\\ud83c" not in front and "\\u" not in front
    data = yaml.safe_load(front)
    assert data == {"base_model": "black-forest-labs/FLUX.1-dev", "instance_prompt": "🌸 sakura",
                    "tags": ["text-to-image", "lora", "style", "桜", "ünïcode", '"quoted"'],
                    "license": "other", "license_name": "flux-1-dev-non-commercial-license",
                    "license_link": "LICENSE.md"}
    parsed = ModelCard(out)  # parses the text; nothing is fetched or pushed
    assert parsed.data.instance_prompt == "🌸 sakura"
    assert (parsed.data.license, parsed.data.license_name, parsed.data.license_link) == (
        "other", "flux-1-dev-non-commercial-license", "LICENSE.md")
    assert parsed.data.tags[3] == "桜"
    assert parsed.text.startswith("\n# Sakura 🌸\n\nA body.")
    json.dumps(parsed.data.to_dict()).encode("utf-8")  # no lone surrogates anywhere


def test_card_front_matter_escapes_what_yaml_cannot_hold_raw(ollama, capsys):
    import yaml

    out = card(ollama, capsys, "--trigger", "a\x85b\u2028c\x7f", "--license", "mit")
    front = front_matter(out)
    assert 'instance_prompt: "a\\u0085b\\u2028c\\u007f"' in front
    assert yaml.safe_load(front)["instance_prompt"] == "a\x85b\u2028c\x7f"


def test_license_other_without_a_name_is_refused_with_a_hint(ollama, capsys):
    code, out, err = run(capsys, "describe", "X", "--type", "style", "--license", "other")
    assert (code, out, err) == (2, "", (
        "ollama-generate: error: --license other needs --license-name: the Hugging Face Hub wants a name "
        "for a license that is not on its list\n"
        "ollama-generate: hint: add --license-name my-license and --license-link LICENSE.md (a file in "
        "the repository, or a URL)\n"))
    assert ollama.requests == []


@pytest.mark.parametrize("flag", ["--license-name", "--license-link"])
def test_license_name_or_link_without_license_other_is_refused(ollama, capsys, flag):
    code, out, err = run(capsys, "describe", "X", "--type", "style", "--license", "mit", flag, "x")
    assert (code, out, err) == (2, "", (
        f"ollama-generate: error: {flag} goes with --license other\n"
        f"ollama-generate: hint: add --license other, or leave {flag} off for a license on the Hub's list\n"))
    assert ollama.requests == []


# -- CLIP token counts --------------------------------------------------------------------------------

# Real counts from OpenAI's CLIP tokenizer (bench/clip_tokens.py); before the estimate priced these
# classes it said 4, 4, 4, 6 and 5 for the first five.
@pytest.mark.parametrize(("text", "real", "low", "high"), [
    ("crème brûlée", 8, 6, 9),
    ("Αθήνα", 10, 9, 11),
    ("❤️", 1, 1, 1),
    ("שלום ירושלים", 22, 20, 24),
    ("Москва, привет", 14, 12, 16),
    ("東京, 桜", 6, 5, 8),
    ("🌸 sakura, 🔥🔥", 6, 5, 7),
    ("1girl, long_hair, looking at viewer, (masterpiece:1.2)", 18, 17, 20),
    ("A cat on a velvet sofa.", 7, 7, 7),
])
def test_the_estimate_prices_accents_scripts_and_emoji(text, real, low, high):
    assert low <= og.estimate_clip_tokens(text) <= high


def write_vocabulary(path, merges, *, gzip_it=False):
    """A CLIP-shaped vocabulary: the header, the merges given, then filler up to CLIP's count."""
    import gzip

    lines = ["#version: 0.2", *merges] + ["\u0101 \u0101"] * (og.CLIP_MERGES - len(merges))
    data = "\n".join(lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gzip_it else data)
    return path


MERGES = ["i n", "t h", "th in</w>", "i n</w>", "th in", "c a", "ca t</w>"]


def test_the_exact_tokenizer_merges_by_rank_and_splits_as_clip_does(tmp_path):
    tokenizer = og.ClipTokenizer(str(write_vocabulary(tmp_path / "bpe.txt.gz", MERGES, gzip_it=True)))
    assert tokenizer.count("thin") == 1          # th, then in</w>, then thin</w>: by rank
    assert tokenizer.count("tin") == 2           # t, in</w>: no merge joins them
    assert tokenizer.count("cat") == 1
    assert tokenizer.count("CAT's, “cat”") == 7  # cat, 's, ",", ", cat, " after ftfy's quotes
    assert tokenizer.count("ｃａｔ") == 1         # fullwidth letters, as ftfy fixes them
    assert tokenizer.count("") == 0


def test_a_vocabulary_is_found_and_used_only_when_there(tmp_path, monkeypatch, capsys):
    vocab = write_vocabulary(tmp_path / "merges.txt", MERGES)
    monkeypatch.setenv(og.CLIP_VOCAB_ENV, str(vocab))
    assert og.clip_tokens("cat") == (1, True)
    monkeypatch.setenv(og.CLIP_VOCAB_ENV, "none")
    assert og.clip_tokens("cat") == (og.estimate_clip_tokens("cat"), False)
    # Unset: an installed open_clip (located, never imported), then the Hugging Face cache.
    env = {"HF_HOME": str(tmp_path / "hf")}
    package = tmp_path / "site" / "open_clip"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert og.clip_vocabulary(env) is None
    write_vocabulary(package / "bpe_simple_vocab_16e6.txt.gz", MERGES, gzip_it=True)
    assert og.clip_vocabulary(env) == str(package / "bpe_simple_vocab_16e6.txt.gz")
    (package / "bpe_simple_vocab_16e6.txt.gz").unlink()
    snapshot = tmp_path / "hf" / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "merges.txt").write_text("#version: 0.2\n\u0120 t\n\u0120 a\n")  # GPT-2's: not CLIP's
    assert og.clip_vocabulary(env) is None
    write_vocabulary(snapshot / "merges.txt", MERGES)
    assert og.clip_vocabulary(env) == str(snapshot / "merges.txt")
    assert capsys.readouterr() == ("", "")


def test_a_vocabulary_that_cannot_be_used_warns_once_and_the_estimate_counts(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "vocab.txt"
    bad.write_text("#version: 0.2\nnot merges\n")
    monkeypatch.setenv(og.CLIP_VOCAB_ENV, str(bad))
    assert og.clip_tokens("a cat") == (og.estimate_clip_tokens("a cat"), False)
    assert og.clip_tokens("a dog") == (og.estimate_clip_tokens("a dog"), False)
    assert capsys.readouterr() == ("", (
        f"ollama-generate: warning: OLLAMA_GENERATE_CLIP_VOCAB {bad} cannot be used (not a CLIP BPE "
        "vocabulary (bpe_simple_vocab_16e6.txt.gz or merges.txt)); CLIP tokens are estimated\n"))


def test_budget_calls_from_an_estimate_keep_a_margin(tmp_path, monkeypatch):
    text = ", ".join(f"tag number{n}" for n in range(17))
    assert og.estimate_clip_tokens(text) in (74, 75)
    assert og.over_clip_budget(text) == og.estimate_clip_tokens(text)  # may be over: flagged
    monkeypatch.setenv(og.CLIP_VOCAB_ENV, str(write_vocabulary(tmp_path / "merges.txt", MERGES)))
    assert og.clip_tokens(text)[1] and og.over_clip_budget("cat") is None
