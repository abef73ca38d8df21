"""What an operator sees: doctor, models, templates, --json, streaming, model cards, remote servers,
--verbose and terminal manners. Exact (exit code, stdout, stderr) and the requests the fake saw."""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys

import pytest
from cli import run, run_exit
from images import png_bytes
from traced import DESCRIPTION, TRAINING

import ollama_generate as og

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "ollama_generate.py")
TEXT = og.DEFAULT_MODEL  # qwen3-30b-a3b:latest: completion, tools, thinking
VISION = og.DEFAULT_VISION_MODEL  # qwen3-vl:32b: completion, vision, tools
SERVE_FIX = "start it with `ollama serve`, or set OLLAMA_HOST (or --host) to where it runs"
QWEN_NOTE = (f"note  text model: {TEXT} thinks; every request sends think:false and /no_think, "
             "and think blocks are stripped")
IMAGES_OK = (f"ok    images: Pillow {og.pillow_version()}: images over --max-side are scaled down, turned upright "
             "by their EXIF orientation, and BMP and GIF converted before sending")
IMAGES_OK_JSON = {"name": "images", "status": "ok", "detail": IMAGES_OK.removeprefix("ok    images: "), "fix": None}
VIDEO_OK = "ok    video: " + og.video_check().detail
VIDEO_OK_JSON = {"name": "video", "status": "ok", "detail": og.video_check().detail, "fix": None}


def structured_note(version: str = "0.13.0") -> str:
    """doctor's line on structured outputs for a server of this version (0.5 or later has them)."""
    return (f"note  structured outputs: tags are asked for as a JSON array of 20 to 40 (Ollama {version}); "
            "`caption --no-structured` asks for plain text instead")

# Fixed metrics for a scripted answer, and what --json makes of them.
METRICS = {"total_duration": 2_500_000_000, "load_duration": 1_250_000_000,
           "prompt_eval_count": 42, "eval_count": 7, "eval_duration": 1_000_000_000}
NUMBERS = {"done_reason": "stop", "prompt_tokens": 42, "answer_tokens": 7,
           "total_seconds": 2.5, "load_seconds": 1.25, "answer_seconds": 1.0}

# Two rows of `models` for the fake's default models (widths are those of the longest cells).
MODELS_HEAD = "NAME                  SIZE     FAMILY   PARAMS  QUANT   CAPABILITIES               USED AS"
TEXT_ROW = "qwen3-30b-a3b:latest  18.6 GB  qwen3    30.5B   Q4_K_M  completion,tools,thinking"
VISION_ROW = "qwen3-vl:32b          20.9 GB  qwen3vl  33.4B   Q4_K_M  completion,vision,tools"

ALL_TEMPLATES = [
    ("vision_system", "-"), ("vision_user", "-"),
    ("caption_training", "$description"), ("caption_training_creative", "$description"),
    ("caption_short", "$description"),
    ("caption_tags", "$description"), ("caption_tags_creative", "$description"),
    ("caption_detailed", "$description"), ("caption_detailed_creative", "$description"),
    ("prompt_t5", "$concept"), ("prompt_clip", "$concept"),
    ("enhance_mild", "$prompt"), ("enhance_moderate", "$prompt"), ("enhance_extreme", "$prompt"),
    ("describe", "$model_name $lora_type $tags $dataset"), ("lore", "$scenario $words"),
    ("hint", "$hint"), ("ground_existing", "$where $text"), ("ground_name", "$where $text"),
    ("reask", "$request $answer $problem"), ("reask_vision", "$problem"),
    ("vision_video_system", "-"), ("vision_video_user", "$frames $duration $timestamps"), ("video_caption", "-"),
    ("target_video", "-"),
    ("vision_probe", "-"),
]


def template_lines(out: str) -> list[str]:
    """The template rows of `templates`, without the targets section after them."""
    return out.split("\n\n")[0].splitlines()


def template_line(name: str, placeholders: str, source: str) -> str:
    return f"{name:<25}  {placeholders:<40}  {source}"


def only_generation(fake):
    requests = fake.generation_requests()
    assert len(requests) == 1
    return requests[0]


def one_json(out: str):
    """stdout holds exactly one JSON document and nothing else."""
    decoder = json.JSONDecoder()
    value, end = decoder.raw_decode(out)
    assert out[end:] == "\n"
    assert json.loads(out) == value
    return value


@pytest.fixture
def printers(monkeypatch):
    """Record every StreamPrinter a command makes: what it was fed and what it wrote, in order."""
    made: list[SpyPrinter] = []

    class Recording(SpyPrinter):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(og, "StreamPrinter", Recording)
    return made


class SpyPrinter(og.StreamPrinter):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def feed(self, piece: str) -> None:
        self.events.append(("feed", piece))
        super().feed(piece)

    def _write(self, text: str) -> None:
        if text:
            self.events.append(("write", text))
        super()._write(text)


# -- doctor ---------------------------------------------------------------------------------------


def test_doctor_all_good(ollama, capsys):
    code, out, err = run(capsys, "doctor")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"ok    server: Ollama 0.13.0 at {ollama.url}",
        structured_note(),
        f"ok    vision model: {VISION} is installed (completion, vision, tools)",
        f"ok    text model: {TEXT} is installed (completion, tools, thinking)",
        QWEN_NOTE,
        IMAGES_OK,
        VIDEO_OK,
        "ok    templates: all 26 templates are complete",
        "A caption run would work.",
    ]
    assert out.endswith("A caption run would work.\n")
    # Nothing is generated: version, a liveness call, and one /api/show per model.
    assert [(r.method, r.path) for r in ollama.requests] == [
        ("GET", "/api/version"), ("GET", "/api/ps"), ("POST", "/api/show"), ("POST", "/api/show")]
    assert [r.body for r in ollama.requests_to("/api/show")] == [{"model": VISION}, {"model": TEXT}]


def test_doctor_with_the_server_down_still_runs_and_exits_3(make_ollama, capsys):
    server = make_ollama()
    url = server.url
    server.stop()
    code, out, err = run(capsys, "doctor", "--host", url)
    assert code == 3
    assert out.splitlines() == [
        f"FAIL  server: cannot connect to Ollama at {url} (Connection refused)",
        f"      fix: {SERVE_FIX}",
        IMAGES_OK,
        VIDEO_OK,
        "ok    templates: all 26 templates are complete",
        "1 problem to fix before a caption run.",
    ]
    assert err == "ollama-generate: error: 1 check failed; see above\n"


def test_doctor_a_missing_model_gets_its_pull_line_and_exits_4(ollama, capsys):
    code, out, err = run(capsys, "doctor", "-m", "llama3.2")
    assert code == 4
    assert out.splitlines() == [
        f"ok    server: Ollama 0.13.0 at {ollama.url}",
        structured_note(),
        f"ok    vision model: {VISION} is installed (completion, vision, tools)",
        f"FAIL  text model: llama3.2 is not installed on {ollama.url}",
        "      fix: ollama pull llama3.2",
        IMAGES_OK,
        VIDEO_OK,
        "ok    templates: all 26 templates are complete",
        "1 problem to fix before a caption run.",
    ]
    assert err == "ollama-generate: error: 1 check failed; see above\n"


def test_doctor_a_vision_model_that_cannot_see_exits_4(ollama, capsys):
    ollama.add_model("llama3.2", capabilities=("completion", "tools"))
    code, out, err = run(capsys, "doctor", "--vision-model", "llama3.2")
    assert code == 4
    assert out.splitlines() == [
        f"ok    server: Ollama 0.13.0 at {ollama.url}",
        structured_note(),
        "ok    vision model: llama3.2 is installed (completion, tools)",
        "FAIL  vision model: llama3.2 cannot see images",
        f"      fix: ollama pull {VISION}, then use it with --vision-model",
        f"ok    text model: {TEXT} is installed (completion, tools, thinking)",
        QWEN_NOTE,
        IMAGES_OK,
        VIDEO_OK,
        "ok    templates: all 26 templates are complete",
        "1 problem to fix before a caption run.",
    ]
    assert err == "ollama-generate: error: 1 check failed; see above\n"


def test_doctor_two_problems_are_counted(ollama, capsys):
    code, out, err = run(capsys, "doctor", "-m", "nope", "--vision-model", "gone")
    assert code == 4
    assert out.splitlines()[-1] == "2 problems to fix before a caption run."
    assert err == "ollama-generate: error: 2 checks failed; see above\n"


@pytest.mark.parametrize(("model", "capabilities", "note"), [
    ("deepseek-r1:8b", ("completion", "thinking"),
     ("note  text model: deepseek-r1:8b thinks; every request sends think:false, "
      "and think blocks are stripped")),
    ("llama3.2:latest", ("completion",), None),
])
def test_doctor_notes_a_thinking_model(ollama, capsys, model, capabilities, note):
    ollama.add_model(model, capabilities=capabilities)
    code, out, err = run(capsys, "doctor", "-m", model)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[3] == f"ok    text model: {model} is installed ({', '.join(capabilities)})"
    assert [line for line in lines if line.startswith("note  text model")] == ([note] if note else [])
    assert [line for line in lines if line.startswith("note")] == [structured_note()] + ([note] if note else [])
    assert lines[-1] == "A caption run would work."


def test_doctor_says_an_old_server_gets_tags_as_plain_text(make_ollama, capsys):
    server = make_ollama(version="0.4.7")
    code, out, err = run(capsys, "doctor", "--host", server.url)
    assert (code, err) == (0, "")
    assert out.splitlines()[:2] == [
        f"ok    server: Ollama 0.4.7 at {server.url}",
        "note  structured outputs: not available on Ollama 0.4.7 (needs 0.5 or later): "
        "tags are asked for as plain text",
    ]


def test_doctor_names_a_broken_template_override(ollama, capsys, tmp_path):
    (tmp_path / "prompt_t5.txt").write_text("Describe $idea\n")
    code, out, err = run(capsys, "doctor", "--prompts-dir", tmp_path)
    assert code == 1
    assert out.splitlines()[-3:] == [
        f"FAIL  templates: template {tmp_path / 'prompt_t5.txt'} is missing $concept; uses unknown $idea",
        "      fix: fix the placeholders, or remove the override",
        "1 problem to fix before a caption run.",
    ]
    assert err == "ollama-generate: error: 1 check failed; see above\n"
    assert ollama.generation_requests() == []


def test_doctor_says_when_overrides_are_in_use(ollama, capsys, tmp_path):
    (tmp_path / "prompt_t5.txt").write_text("Paint $concept\n")
    code, out, err = run(capsys, "doctor", "--prompts-dir", tmp_path)
    assert (code, err) == (0, "")
    line = f"ok    templates: all 26 templates are complete (with overrides from {tmp_path})"
    assert line in out.splitlines()


def test_doctor_json_is_one_document(ollama, capsys):
    code, out, err = run(capsys, "doctor", "--json")
    assert (code, err) == (0, "")
    assert one_json(out) == {"command": "doctor", "ok": True, "checks": [
        {"name": "server", "status": "ok", "detail": f"Ollama 0.13.0 at {ollama.url}", "fix": None},
        {"name": "structured outputs", "status": "note",
         "detail": structured_note().removeprefix("note  structured outputs: "), "fix": None},
        {"name": "vision model", "status": "ok",
         "detail": f"{VISION} is installed (completion, vision, tools)", "fix": None},
        {"name": "text model", "status": "ok",
         "detail": f"{TEXT} is installed (completion, tools, thinking)", "fix": None},
        {"name": "text model", "status": "note", "detail": QWEN_NOTE.removeprefix("note  text model: "),
         "fix": None},
        IMAGES_OK_JSON,
        VIDEO_OK_JSON,
        {"name": "templates", "status": "ok", "detail": "all 26 templates are complete", "fix": None},
    ]}


def test_doctor_json_with_a_failure_keeps_stdout_json_and_the_exit_code(make_ollama, capsys):
    server = make_ollama()
    url = server.url
    server.stop()
    code, out, err = run(capsys, "doctor", "--json", "--host", url)
    assert code == 3
    assert one_json(out) == {"command": "doctor", "ok": False, "checks": [
        {"name": "server", "status": "fail",
         "detail": f"cannot connect to Ollama at {url} (Connection refused)", "fix": SERVE_FIX},
        IMAGES_OK_JSON,
        VIDEO_OK_JSON,
        {"name": "templates", "status": "ok", "detail": "all 26 templates are complete", "fix": None},
    ]}
    assert err == (f"ollama-generate: error: 1 check failed: server: cannot connect to Ollama at {url} "
                   f"(Connection refused)\nollama-generate: hint: {SERVE_FIX}\n")


def test_doctor_checks_every_host(make_ollama, capsys):
    first = make_ollama()
    second = make_ollama(version="0.12.6")
    second.remove_model(VISION)
    code, out, err = run(capsys, "doctor", "--host", first.url, "--host", second.url)
    assert code == 4
    assert out.splitlines() == [
        f"ok    server: Ollama 0.13.0 at {first.url}",
        structured_note(),
        f"ok    vision model: {VISION} is installed (completion, vision, tools)",
        f"ok    text model: {TEXT} is installed (completion, tools, thinking)",
        QWEN_NOTE,
        f"ok    server: Ollama 0.12.6 at {second.url}",
        structured_note("0.12.6"),
        f"FAIL  vision model: {VISION} is not installed on {second.url}",
        f"      fix: ollama pull {VISION}",
        f"ok    text model: {TEXT} is installed (completion, tools, thinking)",
        QWEN_NOTE,
        IMAGES_OK,
        VIDEO_OK,
        "ok    templates: all 26 templates are complete",
        "1 problem to fix before a caption run.",
    ]
    assert err == "ollama-generate: error: 1 check failed; see above\n"
    for server in (first, second):
        assert [r.body for r in server.requests_to("/api/show")] == [{"model": VISION}, {"model": TEXT}]


def test_doctor_with_one_of_two_hosts_down_exits_3(make_ollama, capsys):
    up = make_ollama()
    down = make_ollama()
    down_url = down.url
    down.stop()
    code, out, err = run(capsys, "doctor", "--host", up.url, "--host", down_url)
    assert (code, err) == (3, "ollama-generate: error: 1 check failed; see above\n")
    lines = out.splitlines()
    assert lines[0] == f"ok    server: Ollama 0.13.0 at {up.url}"
    assert lines[1] == structured_note()
    assert lines[5:7] == [f"FAIL  server: cannot connect to Ollama at {down_url} (Connection refused)",
                          f"      fix: {SERVE_FIX}"]
    assert len(up.requests_to("/api/show")) == 2


# -- models ---------------------------------------------------------------------------------------


def test_models_table_marks_the_configured_models(ollama, capsys):
    code, out, err = run(capsys, "models")
    assert (code, err) == (0, "")
    assert out == "\n".join([MODELS_HEAD, TEXT_ROW + "  text", VISION_ROW + "    vision"]) + "\n"


def test_models_on_an_old_server_asks_show_for_capabilities(ollama, capsys):
    run(capsys, "models")
    assert [r.path for r in ollama.requests] == ["/api/version", "/api/tags", "/api/show", "/api/show"]
    assert [r.body for r in ollama.requests_to("/api/show")] == [{"model": TEXT}, {"model": VISION}]


@pytest.mark.parametrize("version", ["0.30.0", "0.31.2"])
def test_models_on_a_new_server_takes_capabilities_from_tags(make_ollama, capsys, version):
    # A server that would not say them in /api/show: the table can only be right from /api/tags.
    server = make_ollama(version=version, show_capabilities=False)
    code, out, err = run(capsys, "models", "--host", server.url)
    assert (code, err) == (0, "")
    assert out == "\n".join([MODELS_HEAD, TEXT_ROW + "  text", VISION_ROW + "    vision"]) + "\n"
    assert server.requests_to("/api/show") == []


def test_models_without_known_capabilities_shows_a_question_mark(make_ollama, capsys):
    server = make_ollama(version="0.6.0", show_capabilities=False)
    code, out, err = run(capsys, "models", "--host", server.url)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "NAME                  SIZE     FAMILY   PARAMS  QUANT   CAPABILITIES  USED AS",
        "qwen3-30b-a3b:latest  18.6 GB  qwen3    30.5B   Q4_K_M  ?             text",
        "qwen3-vl:32b          20.9 GB  qwen3vl  33.4B   Q4_K_M  ?             vision",
    ]


def test_models_a_configured_model_not_installed_gets_its_pull_line(ollama, capsys):
    ollama.add_model("llava:7b", capabilities=("completion", "vision"), family="llama",
                     parameter_size="7B", quantization_level="Q4_0", size=4_700_000_000)
    code, out, err = run(capsys, "models", "-m", "llama3.2", "--vision-model", "llava:7b")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "NAME                  SIZE     FAMILY   PARAMS  QUANT   CAPABILITIES               USED AS",
        "qwen3-30b-a3b:latest  18.6 GB  qwen3    30.5B   Q4_K_M  completion,tools,thinking",
        "qwen3-vl:32b          20.9 GB  qwen3vl  33.4B   Q4_K_M  completion,vision,tools",
        "llava:7b              4.7 GB   llama    7B      Q4_0    completion,vision          vision",
        "text model llama3.2:latest is not installed: ollama pull llama3.2:latest",
    ]


def test_models_one_model_for_both_roles(ollama, capsys):
    code, out, err = run(capsys, "models", "-m", VISION)
    assert (code, err) == (0, "")
    assert out.splitlines()[2].endswith("completion,vision,tools    text+vision")
    assert out.splitlines()[1].endswith("completion,tools,thinking")


def test_models_json_shape(ollama, capsys):
    code, out, err = run(capsys, "models", "--json", "-m", "llama3.2")
    assert (code, err) == (0, "")
    assert one_json(out) == {"command": "models", "api": "ollama", "models": [
        {"name": TEXT, "size": 18_556_701_140, "family": "qwen3", "parameter_size": "30.5B",
         "quantization_level": "Q4_K_M", "capabilities": ["completion", "tools", "thinking"],
         "configured_as": None},
        {"name": VISION, "size": 20_932_475_000, "family": "qwen3vl", "parameter_size": "33.4B",
         "quantization_level": "Q4_K_M", "capabilities": ["completion", "vision", "tools"],
         "configured_as": "vision"},
    ], "missing": [{"name": "llama3.2:latest", "configured_as": "text"}]}


def test_models_with_the_server_down_exits_3(make_ollama, capsys):
    server = make_ollama()
    url = server.url
    server.stop()
    code, out, err = run(capsys, "models", "--host", url)
    assert (code, out) == (3, "")
    assert err == (f"ollama-generate: error: cannot connect to Ollama at {url} (Connection refused)\n"
                   f"ollama-generate: hint: {SERVE_FIX}\n")


# -- templates ------------------------------------------------------------------------------------


def test_templates_lists_every_template_as_built_in(capsys):
    code, out, err = run(capsys, "templates")
    assert (code, err) == (0, "")
    assert template_lines(out) == [template_line(name, fields, "built-in") for name, fields in ALL_TEMPLATES]
    assert [name for name, _ in ALL_TEMPLATES] == list(og.TEMPLATE_FIELDS)


@pytest.mark.parametrize("name", ["caption_tags", "caption_tags.txt"])
def test_templates_name_prints_the_file(capsys, name):
    with open(os.path.join(ROOT, "prompts", "caption_tags.txt"), encoding="utf-8") as handle:
        text = handle.read()
    code, out, err = run(capsys, "templates", name)
    assert (code, out, err) == (0, text.rstrip("\n") + "\n", "")
    assert "$description" in out


def test_templates_name_json(capsys):
    code, out, err = run(capsys, "templates", "lore", "--json")
    assert (code, err) == (0, "")
    with open(os.path.join(ROOT, "prompts", "lore.txt"), encoding="utf-8") as handle:
        text = handle.read()
    assert one_json(out) == {"command": "templates", "name": "lore",
                             "path": os.path.join(ROOT, "prompts", "lore.txt"),
                             "placeholders": ["scenario", "words"], "text": text}


def test_templates_unknown_name_exits_2(capsys):
    code, out, err = run(capsys, "templates", "nope")
    assert (code, out) == (2, "")
    assert err == ("ollama-generate: error: there is no template 'nope'\n"
                   "ollama-generate: hint: `ollama-generate templates` lists them\n")


def test_an_override_is_used_by_file_name_and_listed(ollama, capsys, tmp_path):
    (tmp_path / "prompt_t5.txt").write_text("OVERRIDE: paint $concept in oils.\n")
    ollama.reply("A fox in oils.")
    code, out, err = run(capsys, "prompt", "a fox", "--prompts-dir", tmp_path)
    assert (code, out, err) == (0, "A fox in oils.\n", "")
    assert only_generation(ollama).body["prompt"] == "OVERRIDE: paint a fox in oils.\n\n/no_think"

    code, out, err = run(capsys, "templates", "--prompts-dir", tmp_path)
    assert (code, err) == (0, "")
    assert template_lines(out) == [
        template_line(name, fields, "override" if name == "prompt_t5" else "built-in")
        for name, fields in ALL_TEMPLATES]

    code, out, err = run(capsys, "templates", "--json", "--prompts-dir", tmp_path)
    rows = {row["name"]: row for row in one_json(out)["templates"]}
    assert rows["prompt_t5"] == {"name": "prompt_t5", "placeholders": ["concept"],
                                 "path": str(tmp_path / "prompt_t5.txt"), "source": "override",
                                 "problem": None}
    assert rows["prompt_clip"] == {"name": "prompt_clip", "placeholders": ["concept"],
                                   "path": os.path.join(ROOT, "prompts", "prompt_clip.txt"),
                                   "source": "built-in", "problem": None}


def test_the_prompts_dir_environment_variable_works_like_the_flag(ollama, capsys, tmp_path, monkeypatch):
    (tmp_path / "lore.txt").write_text("ENV: $words words about $scenario.\n")
    monkeypatch.setenv("OLLAMA_GENERATE_PROMPTS_DIR", str(tmp_path))
    ollama.reply("Once.")
    code, out, err = run(capsys, "lore", "a keeper", "--length", "short")
    assert (code, out, err) == (0, "Once.\n", "")
    assert only_generation(ollama).body["prompt"] == "ENV: 150 words about a keeper.\n\n/no_think"
    code, out, err = run(capsys, "templates")
    assert template_line("lore", "$scenario $words", "override") in out.splitlines()
    assert template_line("describe", "$model_name $lora_type $tags $dataset", "built-in") in out.splitlines()


def test_the_flag_wins_over_the_environment_variable(ollama, capsys, tmp_path, monkeypatch):
    flag, env = tmp_path / "flag", tmp_path / "env"
    flag.mkdir()
    env.mkdir()
    (flag / "prompt_t5.txt").write_text("FLAG $concept\n")
    (env / "prompt_t5.txt").write_text("ENV $concept\n")
    monkeypatch.setenv("OLLAMA_GENERATE_PROMPTS_DIR", str(env))
    ollama.reply("A fox.")
    assert run(capsys, "prompt", "x", "--prompts-dir", flag) == (0, "A fox.\n", "")
    assert only_generation(ollama).body["prompt"] == "FLAG x\n\n/no_think"


@pytest.mark.parametrize(("text", "problem"), [
    ("Paint something.\n", "is missing $concept"),
    ("Paint $concept in $mood.\n", "uses unknown $mood"),
])
def test_a_broken_override_names_the_file_and_sends_nothing(ollama, capsys, tmp_path, text, problem):
    (tmp_path / "prompt_t5.txt").write_text(text)
    code, out, err = run(capsys, "prompt", "a fox", "--prompts-dir", tmp_path)
    assert (code, out) == (1, "")
    assert err == (f"ollama-generate: error: template {tmp_path / 'prompt_t5.txt'} {problem}\n"
                   "ollama-generate: hint: prompt_t5.txt takes $concept\n")
    assert ollama.requests == []


def test_a_file_that_replaces_no_template_is_warned_about(capsys, tmp_path):
    (tmp_path / "caption-tags.txt").write_text("$description\n")
    (tmp_path / "notes.md").write_text("not a template\n")
    code, out, err = run(capsys, "templates", "--prompts-dir", tmp_path)
    assert code == 0
    assert template_lines(out) == [template_line(name, fields, "built-in") for name, fields in ALL_TEMPLATES]
    assert err == (f"ollama-generate: warning: {tmp_path / 'caption-tags.txt'} replaces no template "
                   "(check its name)\n")


def test_a_prompts_dir_with_a_trailing_slash_still_lists_overrides(capsys, tmp_path):
    (tmp_path / "prompt_t5.txt").write_text("Paint $concept\n")
    code, out, err = run(capsys, "templates", "--prompts-dir", str(tmp_path) + os.sep)
    assert (code, err) == (0, "")
    assert template_line("prompt_t5", "$concept", "override") in out.splitlines()


def test_a_misnamed_override_is_warned_about_when_it_is_used(ollama, capsys, tmp_path):
    (tmp_path / "prompt-t5.txt").write_text("Paint $concept\n")
    ollama.reply("A fox.")
    code, out, err = run(capsys, "prompt", "a fox", "--prompts-dir", tmp_path)
    assert (code, out) == (0, "A fox.\n")
    assert err == (f"ollama-generate: warning: {tmp_path / 'prompt-t5.txt'} replaces no template "
                   "(check its name)\n")


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_prompts_dir_that_is_not_a_folder_exits_2(ollama, capsys, tmp_path, kind):
    path = tmp_path / "prompts.txt"
    if kind == "file":
        path.write_text("x")
    code, out, err = run(capsys, "prompt", "x", "--prompts-dir", path)
    assert (code, out) == (2, "")
    assert err == (f"ollama-generate: error: --prompts-dir (or OLLAMA_GENERATE_PROMPTS_DIR) {path} is not a folder\n"
                   "ollama-generate: hint: give a folder of .txt templates; `ollama-generate templates` "
                   "lists the names\n")
    assert ollama.requests == []


def test_a_prompts_dir_variable_that_is_not_a_folder_exits_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_GENERATE_PROMPTS_DIR", str(tmp_path / "nowhere"))
    code, out, err = run(capsys, "templates")
    assert (code, out) == (2, "")
    assert err.startswith(f"ollama-generate: error: --prompts-dir (or OLLAMA_GENERATE_PROMPTS_DIR) {tmp_path / 'nowhere'} is not a folder\n")


# -- --json ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "answer", "text", "rules"), [
    (["prompt", "a fox"], "Here is your prompt:\nA red fox in snow.", "A red fox in snow.", ["lead-in"]),
    (["lore", "a keeper"], "The keeper climbed.\n\nThe lamp was cold.",
     "The keeper climbed.\n\nThe lamp was cold.", []),
    (["describe", "X", "--type", "style"], "A style LoRA.", "# X\n\nA style LoRA.", []),
])
def test_json_text_commands_print_one_document(ollama, capsys, printers, argv, answer, text, rules):
    ollama.reply(answer, final_fields=METRICS)
    code, out, err = run(capsys, *argv, "--json")
    assert (code, err) == (0, "")
    # rules: what cleaning removed or flagged (the lead-in); nothing was flagged for review.
    assert one_json(out) == {"command": argv[0], "text": text, "needs_review": None, "rules": rules,
                             "model": TEXT, **NUMBERS}
    assert printers == []  # never streamed


def test_json_enhance_adds_clip_tokens(ollama, capsys):
    ollama.reply("A cat on a velvet sofa.", final_fields=METRICS)
    code, out, err = run(capsys, "enhance", "a cat", "--json")
    assert (code, err) == (0, "")
    assert one_json(out) == {"command": "enhance", "text": "A cat on a velvet sofa.", "needs_review": None,
                             "rules": [], "model": TEXT, **NUMBERS, "clip_tokens": 7}


def test_json_never_streams_even_when_asked_or_on_a_terminal(ollama, capsys, printers, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    ollama.reply("The keeper climbed.", final_fields=METRICS, chunk_chars=2)
    code, out, err = run(capsys, "lore", "x", "--json", "--stream")
    assert (code, err) == (0, "")
    assert one_json(out)["text"] == "The keeper climbed."
    assert printers == []


def test_json_single_image_caption(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat", final_fields=METRICS)
    ollama.reply(TRAINING, endpoint="/api/generate",
                 final_fields={**METRICS, "eval_count": 9, "done_reason": "length"})
    code, out, err = run(capsys, "caption", photo, "--json")
    assert (code, err) == (0, "")
    assert one_json(out) == {
        "command": "caption", "image": str(photo), "style": "training", "target": None, "creative": False,
        "text": TRAINING, "description": DESCRIPTION, "cached": False,
        # In range, nothing cleaned away, every concrete word in the description.
        "needs_review": None, "rules": [], "unsupported_share": 0.0, "invented": [],
        "vision_model": VISION, "model": TEXT,
        "requests": [
            {"model": VISION, **NUMBERS},
            {"model": TEXT, **NUMBERS, "answer_tokens": 9, "done_reason": "length"},
        ],
    }


def make_dataset(folder, names):
    folder.mkdir(exist_ok=True)
    for seed, name in enumerate(names):
        (folder / name).write_bytes(b"" if "bad" in name else png_bytes(seed=seed))
    return folder


def test_json_folder_run_prints_the_run_report(ollama, capsys, tmp_path):
    folder = make_dataset(tmp_path / "ds", ["a.png", "b.png"])
    code, out, err = run(capsys, "caption", folder, "--json")
    assert code == 0
    report = one_json(out)
    assert isinstance(report.pop("seconds"), float)
    assert isinstance(report.pop("images_per_minute"), float)
    throughput = report.pop("throughput")
    assert [(host["url"], sorted(host["stages"])) for host in throughput] == [(ollama.url, ["text", "vision"])]
    assert report == {
        "command": "caption", "folder": str(folder), "total": 2, "written": 2, "skipped": 0,
        "failed": [], "needs_review": [], "not_reached": 0, "later": 0, "interrupted": False,
        "cached_descriptions": 0, "model_calls": 4, "model_loads": 0,
        "hosts": [{"url": ollama.url, "model_calls": 4, "model_loads": 0, "dropped": None, "api": "ollama", "not_reported": []}],
        "cleaning": {},
        "captions": [{"image": n, "rules": [], "unsupported_share": 0.0, "invented": []} for n in ["a.png", "b.png"]],
    }
    assert (folder / "a.txt").read_text() == TRAINING + "\n"  # the fake's in-range answer
    assert "Done after" in err


def test_json_folder_run_with_a_failed_image_still_prints_the_report(ollama, capsys, tmp_path):
    folder = make_dataset(tmp_path / "ds", ["a.png", "bad.png"])
    code, out, err = run(capsys, "caption", folder, "--json")
    assert code == 1
    report = one_json(out)
    assert (report["command"], report["total"], report["written"]) == ("caption", 2, 1)
    assert report["failed"] == [{"image": "bad.png", "reason": "the file is empty"}]
    assert err.endswith("ollama-generate: error: 1 of 2 images failed\n"
                        "ollama-generate: hint: fix or remove them and run the same command again; "
                        "finished captions are kept\n")


def test_json_dry_run_lists_the_plan(ollama, capsys, tmp_path):
    folder = make_dataset(tmp_path / "ds", ["a.png", "b.png", "bad.png"])
    (folder / "b.txt").write_text("old\n")
    code, out, err = run(capsys, "caption", folder, "--json", "--dry-run")
    assert code == 0
    assert one_json(out) == {"command": "caption", "dry_run": [
        {"image": "a.png", "action": "caption", "caption_file": str(folder / "a.txt"), "reason": None,
         "width": 2, "height": 2, "sent_width": 2, "sent_height": 2},
        {"image": "b.png", "action": "skip", "caption_file": str(folder / "b.txt"),
         "reason": "caption exists", "width": 2, "height": 2, "sent_width": 2, "sent_height": 2},
        {"image": "bad.png", "action": "fail", "caption_file": str(folder / "bad.txt"),
         "reason": "the file is empty", "width": None, "height": None, "sent_width": None, "sent_height": None},
    ]}
    assert err == ("Dry run: 1 to caption, 1 skipped, 1 failing, 0 left for later (of 3 images); "
                   "no model was called.\n")
    assert ollama.requests == []


def test_json_error_when_the_server_is_unreachable(make_ollama, capsys):
    server = make_ollama()
    url = server.url
    server.stop()
    code, out, err = run(capsys, "prompt", "x", "--json", "--host", url)
    assert code == 3
    assert one_json(out) == {"error": f"cannot connect to Ollama at {url} (Connection refused)",
                             "hint": SERVE_FIX, "exit_code": 3, "report": None}
    assert err == (f"ollama-generate: error: cannot connect to Ollama at {url} (Connection refused)\n"
                   f"ollama-generate: hint: {SERVE_FIX}\n")


def test_json_error_for_a_missing_model_exits_4(ollama, capsys):
    code, out, err = run(capsys, "enhance", "x", "--json", "-m", "nope")
    assert code == 4
    assert one_json(out) == {"error": f"model 'nope' is not installed on {ollama.url}",
                             "hint": "run `ollama pull nope`", "exit_code": 4, "report": None}
    assert err.startswith("ollama-generate: error: model 'nope' is not installed")


def test_json_error_for_a_usage_error_exits_2(capsys):
    code, out, err = run(capsys, "lore", " ", "--json")
    assert (code, err) == (2, "ollama-generate: error: the scenario is empty; give the scenario to work on\n")
    assert one_json(out) == {"error": "the scenario is empty; give the scenario to work on",
                             "hint": None, "exit_code": 2, "report": None}


def test_json_error_of_a_folder_run_that_stopped_holds_its_report(ollama, capsys, tmp_path):
    folder = make_dataset(tmp_path / "ds", ["a.png", "b.png"])
    ollama.reply(status=404, error=f"model '{VISION}' not found", endpoint="/api/chat")
    code, out, err = run(capsys, "caption", folder, "--json")
    assert code == 4
    assert "Stopped after" in err
    assert err.endswith(f"ollama-generate: error: model '{VISION}' is not installed on {ollama.url}\n"
                        f"ollama-generate: hint: run `ollama pull {VISION}`\n")
    document = one_json(out)
    assert set(document) == {"error", "hint", "exit_code", "report"}
    assert (document["error"], document["hint"], document["exit_code"]) == (
        f"model '{VISION}' is not installed on {ollama.url}", f"run `ollama pull {VISION}`", 4)
    report = document["report"]
    assert (report["folder"], report["total"], report["written"], report["interrupted"]) == (
        str(folder), 2, 0, True)
    assert not (folder / "a.txt").exists()


# -- streaming ------------------------------------------------------------------------------------


STORY = "The keeper climbed.\n\nThe lamp was cold."


def test_stream_prints_the_text_as_it_arrives(ollama, capsys, printers):
    ollama.reply(f"<think>plan the story</think>Here is your story:\n{STORY}", chunk_chars=3)
    code, out, err = run(capsys, "lore", "x", "--stream")
    assert (code, out, err) == (0, STORY + "\n", "")
    (printer,) = printers
    fed = [piece for kind, piece in printer.events if kind == "feed"]
    assert len(fed) > 10 and all(len(piece) <= 3 for piece in fed)
    # Text reached stdout before the answer was complete.
    first_write = next(i for i, (kind, _) in enumerate(printer.events) if kind == "write")
    assert any(kind == "feed" for kind, _ in printer.events[first_write:])
    assert "".join(text for kind, text in printer.events if kind == "write") == STORY + "\n"


def test_streamed_and_complete_output_agree(ollama, capsys):
    answer = f"<think>plan</think>Here is your story:\n{STORY}"
    ollama.reply(answer, chunk_chars=2)
    ollama.reply(answer, chunk_chars=2)
    streamed = run(capsys, "lore", "x", "--stream")
    complete = run(capsys, "lore", "x", "--no-stream")
    assert streamed == complete == (0, STORY + "\n", "")


def test_stream_hides_a_prompt_preamble(ollama, capsys, printers):
    ollama.reply("<think>hmm</think>Here is your prompt:\nA lighthouse on a cliff in a storm.", chunk_chars=1)
    code, out, err = run(capsys, "prompt", "a lighthouse", "--stream")
    assert (code, out, err) == (0, "A lighthouse on a cliff in a storm.\n", "")
    assert len(printers) == 1


def test_no_stream_forces_streaming_off_on_a_terminal(ollama, capsys, printers, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    ollama.reply(STORY, chunk_chars=3)
    assert run(capsys, "lore", "x", "--no-stream") == (0, STORY + "\n", "")
    assert printers == []


def test_streaming_is_off_by_default_when_stdout_is_not_a_terminal(ollama, capsys, printers):
    ollama.reply(STORY, chunk_chars=3)
    assert run(capsys, "lore", "x") == (0, STORY + "\n", "")
    assert printers == []


def test_streaming_is_on_by_default_on_a_terminal(ollama, capsys, printers, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    ollama.reply(STORY, chunk_chars=3)
    assert run(capsys, "lore", "x") == (0, STORY + "\n", "")
    assert len(printers) == 1
    assert printers[0].events[0] == ("feed", "The")


def test_a_stream_that_breaks_after_text_was_shown_is_not_retried(ollama, capsys):
    text = "The keeper climbed.\nThe lamp was cold and the sea was loud."  # 58 chars: 15 pieces of 4
    ollama.reply(text, chunk_chars=4, mid_stream=True)
    ollama.reply("A second answer that must not be asked for.")
    code, out, err = run(capsys, "lore", "x", "--stream")
    assert code == 1
    assert out == "The keeper climbed.\nThe lamp\n"  # the 7 pieces sent before the error, on their own line
    assert err == ("ollama-generate: error: Ollama failed while answering: an error was encountered "
                   "while running the model\n")
    assert len(ollama.generation_requests()) == 1


def test_a_stream_that_breaks_without_streaming_is_retried(ollama, capsys):
    ollama.reply("The keeper climbed.\nThe lamp was cold.", chunk_chars=4, mid_stream=True)
    ollama.reply(STORY)
    assert run(capsys, "lore", "x", "--no-stream") == (0, STORY + "\n", "")
    assert len(ollama.generation_requests()) == 2


def test_a_stream_that_breaks_before_its_first_line_loses_nothing(ollama, capsys):
    text = "A lighthouse on a cliff at night, waves crashing below."
    ollama.reply(text, chunk_chars=4, mid_stream=True)
    ollama.reply(text)
    code, out, err = run(capsys, "lore", "x", "--stream")
    requests = len(ollama.generation_requests())
    # Either it was retried (nothing had reached the screen) or what arrived is on stdout.
    assert (code, out, err, requests) == (0, text + "\n", "", 2) or (
        code == 1 and requests == 1 and out.startswith("A lighthouse on a"))


def feed_all(pieces) -> None:
    printer = og.StreamPrinter()
    for piece in pieces:
        printer.feed(piece)
    printer.finish()


@pytest.mark.parametrize("pieces", [
    ["<thi", "nk>pl", "an</th", "ink>", "The ke", "eper.\nIt <", "think>more</think", "> ended."],
    ["<", "t", "h", "i", "n", "k", ">", "p", "<", "/", "t", "h", "i", "n", "k", ">",
     *"The keeper.\nIt <think>x</think> ended."],
    ["<THINK>plan</Think>", "The keeper.\nIt ", "<think>", "more", "</think>", " ended."],
])
def test_stream_printer_holds_back_think_blocks_split_across_pieces(capsys, pieces):
    feed_all(pieces)
    assert capsys.readouterr() == ("The keeper.\nIt  ended.\n", "")


def test_stream_printer_drops_an_unclosed_think_block_and_a_preamble(capsys):
    feed_all(["Sure! Here is your ", "story:\nOnce upon", " a time.", "<think>and then I ran out"])
    assert capsys.readouterr() == ("Once upon a time.\n", "")


def test_stream_printer_keeps_a_text_that_only_looks_like_a_tag(capsys):
    feed_all(["a < b and <thin", "gs> stay"])
    assert capsys.readouterr().out == "a < b and <things> stay\n"


def test_stream_printer_prints_a_long_first_line_before_it_ends(capsys):
    printer = og.StreamPrinter()
    printer.feed("word " * 50)
    assert capsys.readouterr().out == ("word " * 50).lstrip()
    printer.finish()
    assert capsys.readouterr().out == "\n"


def test_stream_printer_holds_back_thinking_blocks(capsys):
    feed_all(["<thinking>plan</thinking>", "The keeper climbed."])
    assert capsys.readouterr().out == "The keeper climbed.\n"


@pytest.mark.xfail(strict=True, reason="known limitation: a stream cannot know that text is reasoning "
                   "until a bare </think> arrives; strip_think handles it for the printed, non-streamed text")
def test_stream_printer_drops_reasoning_before_a_bare_closing_tag(capsys):
    feed_all(["plan first", "</think>", "The keeper climbed."])
    assert capsys.readouterr().out == "The keeper climbed.\n"


@pytest.mark.parametrize("command", ["prompt", "lore"])
def test_an_answer_that_is_only_chatter_is_an_empty_answer(ollama, capsys, command):
    ollama.reply("Sure!")
    code, out, err = run(capsys, command, "x")
    assert (code, out) == (1, "")
    assert err.startswith(f"ollama-generate: error: the text model {TEXT} gave an empty answer\n")


# -- model cards ----------------------------------------------------------------------------------


CARD_BODY = "Neon Noir is a style LoRA.\n\n## How to use\n\nStart around 0.8."
FRONT_MATTER = """---
base_model: "black-forest-labs/FLUX.1-dev"
instance_prompt: "ohwx"
tags:
- "text-to-image"
- "lora"
- "style"
- "neon"
- "rain"
license: "mit"
---"""
TRIGGER_SECTION = "## Trigger words\n\nYou should use `ohwx` to trigger the image generation."
CARD_FLAGS = ["--type", "style", "--base-model", "black-forest-labs/FLUX.1-dev", "--trigger", "ohwx",
              "--license", "mit", "--tags", "neon, rain"]


def test_describe_writes_front_matter_and_a_trigger_section(ollama, capsys):
    ollama.reply(f"Here is the model card:\n\n{CARD_BODY}")
    code, out, err = run(capsys, "describe", "Neon Noir", *CARD_FLAGS)
    assert (code, err) == (0, "")
    assert out == f"{FRONT_MATTER}\n\n# Neon Noir\n\n{CARD_BODY}\n\n{TRIGGER_SECTION}\n"


def test_describe_front_matter_lists_a_tag_once_and_only_the_fields_given(ollama, capsys):
    ollama.reply("A body.")
    code, out, err = run(capsys, "describe", "X", "--type", "Style Transfer", "--license", "openrail",
                         "--tags", "lora, neon,, ")
    assert (code, err) == (0, "")
    assert out == ('---\ntags:\n- "text-to-image"\n- "lora"\n- "style-transfer"\n- "neon"\n'
                   'license: "openrail"\n---\n\n# X\n\nA body.\n')


def test_describe_without_card_flags_has_no_front_matter(ollama, capsys):
    ollama.reply(CARD_BODY)
    code, out, err = run(capsys, "describe", "Neon Noir", "--type", "style", "--tags", "neon, rain")
    assert (code, out, err) == (0, f"# Neon Noir\n\n{CARD_BODY}\n", "")


def test_describe_json_text_is_the_whole_card(ollama, capsys):
    ollama.reply(CARD_BODY, final_fields=METRICS)
    code, out, err = run(capsys, "describe", "Neon Noir", *CARD_FLAGS, "--json")
    assert (code, err) == (0, "")
    assert one_json(out) == {"command": "describe", "model": TEXT, **NUMBERS, "needs_review": None, "rules": [],
                             "text": f"{FRONT_MATTER}\n\n# Neon Noir\n\n{CARD_BODY}\n\n{TRIGGER_SECTION}"}


def test_describe_streamed_prints_the_same_card(ollama, capsys):
    ollama.reply(CARD_BODY, chunk_chars=5)
    ollama.reply(CARD_BODY, chunk_chars=5)
    streamed = run(capsys, "describe", "Neon Noir", *CARD_FLAGS, "--stream")
    complete = run(capsys, "describe", "Neon Noir", *CARD_FLAGS, "--no-stream")
    assert complete == (0, f"{FRONT_MATTER}\n\n# Neon Noir\n\n{CARD_BODY}\n\n{TRIGGER_SECTION}\n", "")
    assert streamed == complete


@pytest.fixture
def dataset(tmp_path):
    folder = make_dataset(tmp_path / "dataset", ["a.png", "b.png", "c.png", "d.png"])
    (folder / "a.txt").write_text("ohwx, neon, rain, night\n")
    (folder / "b.txt").write_text("ohwx, neon, rain, a long phrase of many words here\n")
    (folder / "c.caption").write_text("ohwx, Neon\n")
    return folder


DATASET_SUMMARY = ("4 training images, 3 with captions; most frequent caption tags: "
                   "neon (3), rain (2), night (1)")


def test_describe_dataset_grounds_the_card_and_the_request(ollama, capsys, dataset):
    ollama.reply(CARD_BODY)
    code, out, err = run(capsys, "describe", "Neon Noir", "--type", "style", "--trigger", "ohwx",
                         "--dataset", dataset)
    assert (code, err) == (0, "")
    assert out == (
        '---\ninstance_prompt: "ohwx"\ntags:\n- "text-to-image"\n- "lora"\n- "style"\n---\n\n'
        f"# Neon Noir\n\n{CARD_BODY}\n\n{TRIGGER_SECTION}\n\n"
        "## Training data\n\n4 images, 3 of them captioned.\n\n"
        "Most frequent tags: neon (3), rain (2), night (1).\n\n"
        "## Example prompts\n\n```\nohwx, neon, rain, night\n```\n\n"
        "```\nohwx, neon, rain, a long phrase of many words here\n```\n\n```\nohwx, Neon\n```\n")
    assert only_generation(ollama).body["prompt"] == og.render(
        "describe", model_name="Neon Noir", lora_type="style", tags="none",
        dataset=DATASET_SUMMARY) + "\n/no_think"
    assert DATASET_SUMMARY in only_generation(ollama).body["prompt"]


def test_describe_dataset_that_is_not_a_folder_exits_2(ollama, capsys, tmp_path):
    code, out, err = run(capsys, "describe", "X", "--type", "style", "--dataset", tmp_path / "missing")
    assert (code, out) == (2, "")
    assert err == f"ollama-generate: error: --dataset {tmp_path / 'missing'} is not a folder\n"
    assert ollama.requests == []


def test_dataset_facts_are_the_same_on_every_run(tmp_path):
    folder = make_dataset(tmp_path / "ds", ["a.png"])
    (folder / "a.txt").write_text("ohwx, neon, rain, night, city, fog, wet street\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import ollama_generate as og; "
            "print(og.dataset_facts(sys.argv[2], trigger='ohwx').summary())")
    summaries = set()
    for seed in ("0", "1", "2", "3"):
        done = subprocess.run([sys.executable, "-c", code, ROOT, str(folder)], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "PYTHONHASHSEED": seed}, check=False)
        assert done.returncode == 0, done.stderr
        summaries.add(done.stdout)
    assert len(summaries) == 1, summaries


# -- remote servers -------------------------------------------------------------------------------


KEY = "sk-secret-4f9a2c"


def test_the_api_key_is_sent_on_every_request_of_a_caption(ollama, capsys, photo, monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    code, out, err = run(capsys, "caption", photo, "--verbose")
    assert (code, out) == (0, TRAINING + "\n")  # the fake's in-range answer: not asked again
    assert [r.path for r in ollama.requests] == ["/api/version", "/api/show", "/api/show", "/api/chat",
                                                 "/api/generate"]
    assert [r.headers.get("authorization") for r in ollama.requests] == [f"Bearer {KEY}"] * 5
    assert len(err.splitlines()) == 2  # --verbose printed, without the key
    assert KEY not in out + err


def test_the_api_key_is_sent_by_doctor_models_and_tags_styles(ollama, capsys, photo, monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    ollama.reply("a fox, snow", endpoint="/api/generate")
    outputs = [run(capsys, "doctor", "-v"), run(capsys, "models", "-v"),
               run(capsys, "caption", photo, "--style", "tags", "-v")]
    paths = {r.path for r in ollama.requests}
    assert paths == {"/api/version", "/api/ps", "/api/show", "/api/tags", "/api/chat", "/api/generate"}
    assert {r.headers.get("authorization") for r in ollama.requests} == {f"Bearer {KEY}"}
    assert [code for code, _, _ in outputs] == [0, 0, 0]
    assert all(KEY not in out + err for _, out, err in outputs)


@pytest.mark.parametrize("argv", [["-m", "nope"], ["--timeout", "0.2", "--host", "http://127.0.0.1:9"]])
def test_the_api_key_never_appears_in_errors(ollama, capsys, monkeypatch, argv):
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    for extra in ([], ["--json"]):
        code, out, err = run(capsys, "prompt", "x", "-v", *argv, *extra)
        assert code in (3, 4)
        assert "ollama-generate: error: " in err
        assert KEY not in out + err


def test_without_a_key_no_authorization_header_is_sent(ollama, capsys, photo):
    assert run(capsys, "caption", photo)[0] == 0
    assert run(capsys, "doctor")[0] == 0
    assert len(ollama.requests) > 4
    assert all("authorization" not in r.headers for r in ollama.requests)


def test_an_empty_key_sends_no_header(ollama, capsys, monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEY", "")
    assert run(capsys, "prompt", "x") == (0, "A fake answer.\n", "")
    assert "authorization" not in only_generation(ollama).headers


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1: (cert, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def https_ollama(make_ollama, certificate):
    """A FakeOllama that speaks TLS: its listening socket wrapped server-side."""
    cert, key = certificate
    fake = make_ollama()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server = fake._server
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return fake


def run_script(*argv: str, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OLLAMA_", "COV_CORE", "SSL_CERT")) and k != "NO_COLOR"}
    env.update(extra)
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, env=env,
                          timeout=60, stdin=subprocess.DEVNULL, check=False)


def test_an_https_server_with_a_trusted_certificate_works(https_ollama, certificate):
    cert, _ = certificate
    https_ollama.reply("A lighthouse in a storm.")
    done = run_script("prompt", "a lighthouse", "--host", f"https://localhost:{https_ollama.port}",
                      SSL_CERT_FILE=str(cert), OLLAMA_API_KEY=KEY)
    assert (done.returncode, done.stdout, done.stderr) == (0, "A lighthouse in a storm.\n", "")
    request = only_generation(https_ollama)
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["prompt"] == og.render("prompt_t5", concept="a lighthouse") + "\n/no_think"


def test_an_https_server_with_an_untrusted_certificate_is_refused(https_ollama):
    done = run_script("prompt", "x", "--host", f"https://localhost:{https_ollama.port}")
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr == (f"ollama-generate: error: cannot make a secure connection to "
                           f"https://localhost:{https_ollama.port} (CERTIFICATE_VERIFY_FAILED)\n"
                           "ollama-generate: hint: if the server uses its own certificate, point SSL_CERT_FILE at it\n")
    assert https_ollama.generation_requests() == []


# -- --timeout and --verbose ----------------------------------------------------------------------


def test_the_default_timeout_is_300_seconds(capsys):
    code, out, err = run_exit(capsys, "prompt", "--help")
    assert (code, err) == (0, "")
    assert "--timeout SECONDS seconds to wait for the server to answer (default 300)" in " ".join(out.split())
    assert og.DEFAULT_TIMEOUT == 300.0


def verbose_line(path: str, model: str, host: str, rest: str) -> str:
    return rf"ollama-generate: {re.escape(path)} {re.escape(model)} on {re.escape(host)}: \d+\.\d\ds, {rest}"


def test_verbose_prints_one_line_per_request(ollama, capsys):
    ollama.reply("A fox.", final_fields=METRICS)
    code, out, err = run(capsys, "prompt", "x", "--verbose")
    assert (code, out) == (0, "A fox.\n")
    assert re.fullmatch(verbose_line("/api/generate", TEXT, ollama.url,
                                     r"load 1\.25s, prompt 42 tokens, answer 7 tokens \(7\.0/s\), stop")
                        + "\n", err), err


def test_verbose_on_a_caption_reports_both_stages(ollama, capsys, photo):
    ollama.reply(DESCRIPTION, endpoint="/api/chat", final_fields=METRICS)
    ollama.reply(TRAINING, endpoint="/api/generate",
                 final_fields={**METRICS, "eval_count": 30, "eval_duration": 2_000_000_000,
                               "load_duration": 0, "done_reason": None})
    code, out, err = run(capsys, "caption", photo, "-v")
    assert (code, out) == (0, TRAINING + "\n")
    first, second = err.splitlines()
    assert re.fullmatch(verbose_line("/api/chat", VISION, ollama.url,
                                     r"load 1\.25s, prompt 42 tokens, answer 7 tokens \(7\.0/s\), stop"),
                        first)
    assert re.fullmatch(verbose_line("/api/generate", TEXT, ollama.url,
                                     r"load 0\.00s, prompt 42 tokens, answer 30 tokens \(15\.0/s\), "
                                     r"no done_reason"), second)


def test_without_verbose_nothing_is_reported(ollama, capsys):
    ollama.reply("A fox.", final_fields=METRICS)
    assert run(capsys, "prompt", "x") == (0, "A fox.\n", "")


# -- terminal manners -----------------------------------------------------------------------------


def test_errors_are_red_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = run(capsys, "prompt", " ")
    assert (code, out) == (2, "")
    assert err == "ollama-generate: \x1b[31merror\x1b[0m: the concept is empty; give the concept to work on\n"


def test_warnings_are_yellow_on_a_terminal(ollama, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    ollama.reply("The keeper climbed the stairs and", done_reason="length")
    code, out, err = run(capsys, "lore", "x")
    assert (code, out) == (0, "The keeper climbed the stairs and\n")
    assert err == ("ollama-generate: \x1b[33mwarning\x1b[0m: the answer reached the token limit and "
                   "may end mid-sentence\n")


@pytest.mark.parametrize("value", ["1", "yes"])
def test_no_color_turns_colour_off_on_a_terminal(capsys, monkeypatch, value):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setenv("NO_COLOR", value)
    code, out, err = run(capsys, "prompt", " ")
    assert (code, out) == (2, "")
    assert err == "ollama-generate: error: the concept is empty; give the concept to work on\n"


def test_an_empty_no_color_does_not_count(capsys, monkeypatch):
    # no-color.org: NO_COLOR counts when it is present and not an empty string.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setenv("NO_COLOR", "")
    assert "\x1b[31merror\x1b[0m" in run(capsys, "prompt", " ")[2]


def test_no_colour_when_stderr_is_not_a_terminal(capsys):
    code, out, err = run(capsys, "prompt", " ")
    assert (code, out) == (2, "")
    assert err == "ollama-generate: error: the concept is empty; give the concept to work on\n"
    assert "\x1b" not in err


def test_doctor_marks_are_coloured_on_a_terminal(ollama, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, err = run(capsys, "doctor", "-m", "nope")
    assert (code, err) == (4, "ollama-generate: error: 1 check failed; see above\n")
    assert "\x1b[32mok  \x1b[0m" in out
    assert "\x1b[31mFAIL\x1b[0m" in out
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b" not in run(capsys, "doctor", "-m", "nope")[1]


def test_doctor_columns_line_up_on_a_terminal(ollama, capsys, monkeypatch):
    plain = run(capsys, "doctor")[1]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    coloured = run(capsys, "doctor")[1]
    assert coloured != plain
    assert re.sub(r"\x1b\[\d+m", "", coloured) == plain


def test_version_flag(capsys):
    assert run_exit(capsys, "--version") == (0, f"ollama-generate {og.__version__}\n", "")
    assert og.__version__ == "0.1.0"
