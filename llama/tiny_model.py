"""Write a tiny random-weight GGUF model that a real llama-server can serve, and print its path.

Nothing can be downloaded from a model hub on the machines this project is tested on, so the
tests generate their model. It is a real llama-architecture model (2 layers, n_embd 64) with a
real tokenizer (llama.cpp's own `ggml-vocab-llama-spm.gguf`) and a tool-capable chat template
(Qwen 2.5's, with `<tool_call>` tags), so llama-server exercises its real chat, tool-call,
tokenizer and prompt-cache paths. Its words are noise; its structure is real.

Facts that make it work (see also llama-server's own behaviour notes in CONTRIBUTING.md):
- `tokenizer.ggml.add_space_prefix = false`, otherwise every tool request fails with
  "Failed to initialize samplers".
- a separate, untied `output.weight`: a tied output only repeats newlines.
- random weights never choose end-of-turn, so every reply would run to `max_tokens`. We make
  `<|im_end|>` likely after a random ~10% of tokens: one embedding dimension is 1.0 for those
  tokens and 0.0 for all others, that dimension is zeroed in every `output.weight` row and set
  to 2.0 in the `<|im_end|>` row. Replies then end on their own after a few dozen tokens.
  Every token ending in `>` is one of those, so a finished tool call (`...</tool_call>`) ends the
  turn, and tokens with a `>` inside (such as `><`) are never chosen (a constant bias dimension).

Usage: python llama/tiny_model.py [--layers N] [OUTPUT.gguf]   (default: the llamabridge cache)

--layers N gives a second model, with another KV cache shape than the first, for tests of what must
not cross from one model to another, such as a prompt cache saved by one and restored into the other.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import source  # the sibling module: this file is run as a script, not imported from a package

MODEL_VERSION = "3"  # bump when the generated weights or metadata change: part of the cache key
N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_FF = 128
N_CTX_TRAIN = 32768
SEED = 1234
END_DIM = 0  # the embedding dimension that carries the "end the turn now" signal
BIAS_DIM = 1  # a dimension that is 1.0 for every token: a constant bias on chosen output logits
ENDER_BOOST = 0.0015  # of the order of the logit noise: llama-server's top_k=40 keeps only the highest logits
END_FRACTION = 0.10

ADDED_TOKENS = [
    # (text, gguf token type)
    ("<|im_start|>", gguf.TokenType.CONTROL),
    ("<|im_end|>", gguf.TokenType.CONTROL),
    ("<tool_call>", gguf.TokenType.USER_DEFINED),
    ("</tool_call>", gguf.TokenType.USER_DEFINED),
]


def default_output(layers: int = N_LAYER) -> Path:
    suffix = "" if layers == N_LAYER else f"-{layers}layers"  # the default keeps its cached name
    return source.cache_dir() / f"tiny-model-v{MODEL_VERSION}-llama-{source.DEFAULT_VERSION}{suffix}.gguf"


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def build(output: Path, llama_src: Path, layers: int = N_LAYER) -> Path:
    vocab = gguf.GGUFReader(llama_src / "models" / "ggml-vocab-llama-spm.gguf")
    tokens: list[str] = list(_field(vocab, "tokenizer.ggml.tokens"))
    scores: list[float] = list(_field(vocab, "tokenizer.ggml.scores"))
    types: list[int] = list(_field(vocab, "tokenizer.ggml.token_type"))
    min_score = min(scores)
    for text, kind in ADDED_TOKENS:
        tokens.append(text)
        scores.append(min_score)
        types.append(int(kind))
    ids = {text: tokens.index(text) for text, _ in ADDED_TOKENS}
    n_vocab = len(tokens)
    template = (llama_src / "models" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()

    rng = np.random.default_rng(SEED)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float16)

    # Small weights keep the random logits nearly equal, so the end-of-turn signal below (a
    # logit of about 10 after the final norm) wins whenever it is present.
    token_embd = weight(n_vocab, N_EMBD).astype(np.float32)
    lm_head = weight(n_vocab, N_EMBD).astype(np.float32)

    # The end-of-turn signal (see the module docstring).
    newline = tokens.index("<0x0A>")
    keep_out = {newline, ids["<|im_start|>"], ids["<|im_end|>"]}
    candidates = np.array([i for i in range(n_vocab) if i not in keep_out])
    enders = rng.choice(candidates, size=int(len(candidates) * END_FRACTION), replace=False)
    # A finished tool call ends the turn: without this, the tool grammar lets a near-uniform
    # model open a second call instead of stopping. Under the grammar the closing tag comes out
    # in pieces ("</", "tool", "_call", ">"), so every token ending in ">" carries the signal.
    closers = [i for i, text in enumerate(tokens) if text.endswith(">") and i not in keep_out]
    enders = np.union1d(enders, closers)
    # Merged pieces such as "><" would close one tag and open the next in one token, skipping
    # the signal; a constant negative bias keeps the model from ever choosing them.
    token_embd[:, BIAS_DIM] = 1.0
    lm_head[:, BIAS_DIM] = 0.0
    for i, text in enumerate(tokens):
        if ">" in text[:-1] and i not in keep_out:
            lm_head[i, BIAS_DIM] = -3.0
    # A slight preference for the enders themselves, so greedy decoding (temperature 0), which
    # follows one fixed path through near-equal logits, reaches an ender too instead of cycling.
    lm_head[enders, BIAS_DIM] = ENDER_BOOST
    token_embd[:, END_DIM] = 0.0
    token_embd[enders, END_DIM] = 1.0
    lm_head[:, END_DIM] = 0.0
    lm_head[ids["<|im_end|>"], END_DIM] = 2.0

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("llamabridge-tiny")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(int(_field(vocab, "tokenizer.ggml.bos_token_id")))
    writer.add_unk_token_id(int(_field(vocab, "tokenizer.ggml.unknown_token_id")))
    writer.add_eos_token_id(ids["<|im_end|>"])
    writer.add_pad_token_id(ids["<|im_end|>"])
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(template)

    writer.add_tensor("token_embd.weight", token_embd.astype(np.float16))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", lm_head.astype(np.float16))
    for layer in range(layers):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_q.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_k.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_v.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_output.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weight(N_EMBD, N_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=N_LAYER, help=f"transformer blocks (default {N_LAYER})")
    args = parser.parse_args()
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    output = args.output or default_output(args.layers)
    if not output.exists():
        build(output, source.ensure_source(), args.layers)
    print(output)


if __name__ == "__main__":
    main()
