"""Pure pieces around the services: the bounded `client` label and reading .env."""

from __future__ import annotations

from proxy.config import load_env_file
from proxy.metrics import ClientLabels, client_family


def test_client_family_drops_versions_and_keeps_the_agent():
    assert client_family("claude-cli/2.1.328 (external, cli)") == "claude-cli"
    assert client_family("Anthropic/Python 2.12.0") == "anthropic/python"
    assert client_family("OpenAI/Python 3.54.0") == "openai/python"
    assert client_family("python-requests/2.34.2") == "python-requests"
    assert client_family("Mozilla/5.0 (X11; Linux x86_64)") == "mozilla"
    assert client_family("") == client_family("-") == "unknown"
    assert client_family("Evil\"Agent{x}/1") == "evilagentx"  # only characters safe in a label value


def test_client_labels_are_bounded():
    labels = ClientLabels(limit=3)
    assert [labels(f"agent{i}/1.0") for i in range(5)] == ["agent0", "agent1", "agent2", "other", "other"]
    assert labels("agent1/2.0") == "agent1"  # a known family stays itself


def test_env_file_fills_only_unset_variables(tmp_path):
    path = tmp_path / "settings.env"
    path.write_text('# comment\nPROXY_PORT=9999\nexport QUEUE_MAX="12"\nLLAMA_URL=http://from-file:8080\n')
    env = {"LLAMABRIDGE_ENV_FILE": str(path), "LLAMA_URL": "http://from-environment:8080"}
    assert load_env_file(env) == str(path)
    assert env["PROXY_PORT"] == "9999" and env["QUEUE_MAX"] == "12"
    assert env["LLAMA_URL"] == "http://from-environment:8080"  # the environment wins, as with Compose
    assert load_env_file({"LLAMABRIDGE_ENV_FILE": str(tmp_path / "absent.env")}) is None
