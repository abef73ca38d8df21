"""Run the command line in-process and capture what it printed."""

from __future__ import annotations

import pytest

import ollama_generate as og


def run(capsys, *argv) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr)."""
    code = og.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_exit(capsys, *argv) -> tuple[int, str, str]:
    """Run a command line that argparse ends (--help, --version, a usage error)."""
    with pytest.raises(SystemExit) as caught:
        og.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return caught.value.code, out, err
