"""Real processes: --help, usage errors, broken pipes, Ctrl-C, and the installed console script."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from images import png_bytes

import ollama_generate as og

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "ollama_generate.py")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "COV_CORE"))}
    env.update(extra)
    return env


def run_script(*argv: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True,
                          env=clean_env(**extra), timeout=60, stdin=subprocess.DEVNULL)


def test_help_runs_and_prints_only_to_stdout():
    done = run_script("--help")
    assert done.returncode == 0
    assert done.stderr == ""
    assert done.stdout.startswith("usage: ollama-generate ")
    for command in ("caption", "prompt", "enhance", "describe", "lore"):
        assert command in done.stdout


def test_usage_error_exits_2_with_argparse_message():
    done = run_script("caption")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "ollama-generate: error: the following arguments are required: PATH",
        "ollama-generate: hint: see `ollama-generate caption --help`",
    ]


def test_runtime_error_has_no_traceback(tmp_path):
    done = run_script("caption", str(tmp_path / "missing.png"))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"ollama-generate: error: {tmp_path / 'missing.png'} does not exist\n"


def test_unreachable_server_exits_3(make_ollama):
    server = make_ollama()
    url = server.url
    server.stop()
    done = run_script("prompt", "x", OLLAMA_HOST=url)
    assert done.returncode == 3
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[1].startswith("ollama-generate: hint: start it with `ollama serve`")


def test_broken_pipe_exits_quietly(make_ollama):
    server = make_ollama()
    server.reply("word " * 200_000)  # far more than a pipe holds
    process = subprocess.Popen([sys.executable, SCRIPT, "lore", "x"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=clean_env(OLLAMA_HOST=server.url))
    assert process.stdout.read(10) == b"word word "
    process.stdout.close()  # the reader goes away, as `| head -c 10` does
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0
    assert err == ""


def test_ctrl_c_in_a_folder_run_exits_130_without_partial_files(make_ollama, tmp_path):
    server = make_ollama()
    for seed in range(3):
        (tmp_path / f"{seed}.png").write_bytes(png_bytes(seed=seed))
    server.reply("a description", endpoint="/api/chat", delay=30)
    process = subprocess.Popen([sys.executable, SCRIPT, "caption", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=clean_env(OLLAMA_HOST=server.url))
    deadline = time.monotonic() + 30
    while not server.requests_to("/api/chat") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.requests_to("/api/chat"), "the run never reached the vision stage"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert out == b""
    text = err.decode()
    assert "Traceback" not in text
    assert text.endswith("ollama-generate: interrupted\n")
    assert "0 written, 0 skipped, 0 failed, 3 not reached (of 3 images)" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ollama-generate", "0.png", "1.png", "2.png"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """ollama-generate installed with pip into a fresh virtual environment, away from the checkout."""
    base = tmp_path_factory.mktemp("install")
    source = base / "src"
    source.mkdir()
    for name in ("ollama_generate.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    shutil.copytree(os.path.join(ROOT, "prompts"), source / "prompts")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    shutil.rmtree(source)  # the installed copy must not lean on the source tree
    return venv


def test_console_script_runs_after_pip_install(installed, tmp_path):
    done = subprocess.run([str(installed / "bin" / "ollama-generate"), "--version"],
                          capture_output=True, text=True, cwd=tmp_path, env=clean_env(), timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ollama-generate {og.__version__}\n", "")


def test_installed_script_finds_its_templates(installed, tmp_path, make_ollama):
    server = make_ollama()
    server.reply("A lighthouse in a storm.")
    (tmp_path / "prompts").mkdir()  # a decoy in the working directory must not be used
    done = subprocess.run([str(installed / "bin" / "ollama-generate"), "prompt", "a lighthouse"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env=clean_env(OLLAMA_HOST=server.url))
    assert (done.returncode, done.stdout, done.stderr) == (0, "A lighthouse in a storm.\n", "")
    sent = server.generation_requests()[0].body["prompt"]
    assert sent == og.render("prompt_t5", concept="a lighthouse") + "\n/no_think"
    assert (installed / "share" / "ollama-generate" / "prompts" / "caption_tags.txt").is_file()


def test_the_product_is_utf8_even_under_a_c_locale(make_ollama):
    server = make_ollama()
    server.reply("Un caf\u00e9 sous la neige \u2603.")
    done = subprocess.run([sys.executable, SCRIPT, "prompt", "x"], capture_output=True, timeout=60,
                          env=clean_env(OLLAMA_HOST=server.url, LC_ALL="C", LANG="C", PYTHONUTF8="0",
                                        PYTHONCOERCECLOCALE="0"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Un caf\u00e9 sous la neige \u2603.\n".encode()
