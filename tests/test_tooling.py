"""The set-up targets' contracts: `make llama-server` and `make tiny-model` print a usable path
as their last line, and the generated model has the properties llama-server needs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import gguf
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def last_line(*cmd: str, env: dict | None = None) -> str:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, env=env, timeout=120).stdout
    return out.strip().splitlines()[-1]


def test_make_llama_server_prints_the_binary_it_would_use(llama_server_bin):
    env = dict(os.environ, LLAMA_SERVER_BIN=llama_server_bin)
    assert last_line("make", "-s", "llama-server", env=env) == llama_server_bin


def test_make_llama_server_rejects_a_bad_override():
    env = dict(os.environ, LLAMA_SERVER_BIN="/nonexistent/llama-server")
    result = subprocess.run(["bash", "llama/build.sh"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0 and "not an executable" in result.stderr


def test_make_tiny_model_prints_the_cached_model(tiny_model):
    assert last_line("make", "-s", "tiny-model") == tiny_model


@pytest.fixture(scope="module")
def model_fields(tiny_model):
    reader = gguf.GGUFReader(tiny_model)
    return reader, {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.token")}


def test_tiny_model_has_what_llama_server_needs(model_fields):
    reader, fields = model_fields
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is False  # else tool requests fail to build samplers
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert tokens[fields["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert {"<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"} <= set(tokens[-4:])
    assert "<tool_call>" in fields["tokenizer.chat_template"] and "tools" in fields["tokenizer.chat_template"]
    names = {t.name for t in reader.tensors}
    assert "output.weight" in names  # untied: a tied output only repeats newlines


def test_tiny_model_is_deterministic(tmp_path, tiny_model):
    subprocess.run([str(ROOT / ".venv/bin/python"), "llama/tiny_model.py", str(tmp_path / "again.gguf")], cwd=ROOT, check=True, timeout=120)
    assert (tmp_path / "again.gguf").read_bytes() == Path(tiny_model).read_bytes()
