"""OLLAMA_HOST parsing: the official Python client's table, and where the value comes from."""

from __future__ import annotations

import argparse

import pytest

import ollama_generate as og

# ../shared/reference/ollama-api.md section 6.1: the upstream doctests, then cases derived
# by running the official function.
OFFICIAL = [
    (None, "http://127.0.0.1:11434"),
    ("", "http://127.0.0.1:11434"),
    ("1.2.3.4", "http://1.2.3.4:11434"),
    (":56789", "http://127.0.0.1:56789"),
    ("1.2.3.4:56789", "http://1.2.3.4:56789"),
    ("http://1.2.3.4", "http://1.2.3.4:80"),
    ("https://1.2.3.4", "https://1.2.3.4:443"),
    ("https://1.2.3.4:56789", "https://1.2.3.4:56789"),
    ("example.com", "http://example.com:11434"),
    ("example.com:56789", "http://example.com:56789"),
    ("http://example.com", "http://example.com:80"),
    ("https://example.com", "https://example.com:443"),
    ("https://example.com:56789", "https://example.com:56789"),
    ("example.com/", "http://example.com:11434"),
    ("example.com:56789/", "http://example.com:56789"),
    ("example.com/path", "http://example.com:11434/path"),
    ("example.com:56789/path", "http://example.com:56789/path"),
    ("https://example.com:56789/path", "https://example.com:56789/path"),
    ("example.com:56789/path/", "http://example.com:56789/path"),
    ("[0001:002:003:0004::1]", "http://[0001:002:003:0004::1]:11434"),
    ("[0001:002:003:0004::1]:56789", "http://[0001:002:003:0004::1]:56789"),
    ("http://[0001:002:003:0004::1]", "http://[0001:002:003:0004::1]:80"),
    ("https://[0001:002:003:0004::1]", "https://[0001:002:003:0004::1]:443"),
    ("https://[0001:002:003:0004::1]:56789", "https://[0001:002:003:0004::1]:56789"),
    ("[0001:002:003:0004::1]/", "http://[0001:002:003:0004::1]:11434"),
    ("[0001:002:003:0004::1]:56789/", "http://[0001:002:003:0004::1]:56789"),
    ("[0001:002:003:0004::1]/path", "http://[0001:002:003:0004::1]:11434/path"),
    ("[0001:002:003:0004::1]:56789/path", "http://[0001:002:003:0004::1]:56789/path"),
    ("https://[0001:002:003:0004::1]:56789/path", "https://[0001:002:003:0004::1]:56789/path"),
    ("[0001:002:003:0004::1]:56789/path/", "http://[0001:002:003:0004::1]:56789/path"),
    ("[::1]", "http://[::1]:11434"),
    ("[::1]:56789", "http://[::1]:56789"),
    ("0.0.0.0", "http://0.0.0.0:11434"),
    (":0", "http://127.0.0.1:11434"),
    ("localhost", "http://localhost:11434"),
    ("http://localhost:11434", "http://localhost:11434"),
    ("Example.COM:8080", "http://example.com:8080"),
    ("https://example.com/ollama/", "https://example.com:443/ollama"),
    ("example.com//a//b//", "http://example.com:11434/a//b"),
    ("user:pw@host:1", "http://host:1"),
    ("HTTP://1.2.3.4", "HTTP://1.2.3.4:11434"),
    ("ftp://x", "ftp://x:11434"),
    (" 1.2.3.4 ", "http:// 1.2.3.4 :11434"),
]


@pytest.mark.parametrize(("value", "expected"), OFFICIAL)
def test_parse_host_matches_the_official_client(value, expected):
    assert og.parse_host(value) == expected


@pytest.mark.parametrize("value", ["::1", "example.com:abc"])
def test_parse_host_rejects_what_the_official_client_rejects(value):
    with pytest.raises(ValueError):
        og.parse_host(value)


def _args(**kw):
    base = dict(og.SERVER_DEFAULTS)
    base.update(kw)
    return argparse.Namespace(**base)


def test_config_defaults_without_environment():
    config = og.Config.resolve(_args(), {})
    assert config.host == "http://localhost:11434"
    assert config.model == "qwen3-30b-a3b:latest"
    assert config.vision_model == "qwen3-vl:32b"


def test_config_reads_environment():
    env = {"OLLAMA_HOST": "gpu-box", "OLLAMA_MODEL": "llama3.2", "OLLAMA_VISION_MODEL": "llava"}
    config = og.Config.resolve(_args(), env)
    assert (config.host, config.model, config.vision_model) == (
        "http://gpu-box:11434", "llama3.2", "llava")


def test_flags_override_environment():
    env = {"OLLAMA_HOST": "gpu-box", "OLLAMA_MODEL": "llama3.2", "OLLAMA_VISION_MODEL": "llava"}
    config = og.Config.resolve(_args(host=[":9999"], model="mistral", vision_model="gemma3"), env)
    assert (config.host, config.model, config.vision_model) == (
        "http://127.0.0.1:9999", "mistral", "gemma3")


def test_empty_host_variable_means_the_official_default():
    assert og.Config.resolve(_args(), {"OLLAMA_HOST": ""}).host == "http://127.0.0.1:11434"


def test_bad_host_is_a_usage_error_naming_its_source(capsys):
    with pytest.raises(og.UsageError) as caught:
        og.Config.resolve(_args(), {"OLLAMA_HOST": "::1"})
    assert str(caught.value) == "OLLAMA_HOST is not a valid server address: '::1'"
    assert caught.value.exit_code == 2
    with pytest.raises(og.UsageError, match=r"^--host is not a valid"):
        og.Config.resolve(_args(host=["example.com:abc"]), {})


def test_bad_host_from_cli_exits_2(capsys, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "::1")
    assert og.main(["prompt", "x"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "ollama-generate: error: OLLAMA_HOST is not a valid server address: '::1'",
        "ollama-generate: hint: use a form like http://localhost:11434, gpu-box:11434 or [::1]:11434",
    ]


def test_a_host_with_spaces_is_a_usage_error():
    with pytest.raises(og.UsageError, match=r"^OLLAMA_HOST is not a valid server address: ' 127.0.0.1 '$"):
        og.Config.resolve(_args(), {"OLLAMA_HOST": " 127.0.0.1 "})


def test_loopback_is_never_reached_through_a_proxy(ollama, capsys, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    ollama.reply("Through no proxy.")
    assert og.main(["prompt", "x"]) == 0
    assert capsys.readouterr() == ("Through no proxy.\n", "")


def test_remote_hosts_use_the_configured_proxy(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    opener = og.OllamaClient("http://gpu-box:11434")._opener()
    proxies = [h.proxies for h in opener.handlers if type(h).__name__ == "ProxyHandler"]
    assert proxies == [{"http": "http://proxy.invalid:3128"}]
    loopback = og.OllamaClient("http://127.0.0.1:11434")._opener()
    assert [h for h in loopback.handlers if type(h).__name__ == "ProxyHandler"] == []


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        (None, "a,b:1234", ("http://a:11434", "http://b:1234")),
        (None, "a, b ,", ("http://a:11434", "http://b:11434")),
        (None, "a,a", ("http://a:11434",)),
        (["x", "y"], "a,b", ("http://x:11434", "http://y:11434")),
    ],
)
def test_several_hosts(flags, env, expected):
    assert og.Config.resolve(_args(host=flags), {"OLLAMA_HOST": env}).hosts == expected


def test_one_bad_host_in_a_list_is_named():
    with pytest.raises(og.UsageError, match=r"^OLLAMA_HOST is not a valid server address: 'b:x'$"):
        og.Config.resolve(_args(), {"OLLAMA_HOST": "a,b:x"})
