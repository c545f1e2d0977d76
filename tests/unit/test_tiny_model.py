"""The tiny GGUF model the llama-server tests serve: it parses back as the llama
architecture with its metadata, vocabulary and tensor shapes, and its bytes depend only on
its parameters."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gguf
import pytest
from support.tiny_model import (
    CHAT_TEMPLATE,
    SPECIALS,
    TinyModel,
    pieces,
    tiny_model,
    write_tiny_model,
)

SMALL = TinyModel(seed=7, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_ctx=512)


def _value(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.get_field(key)
    assert field is not None, key
    return field.contents()


def test_the_same_parameters_write_the_same_bytes(tmp_path: Path) -> None:
    first = write_tiny_model(tmp_path / "a.gguf", SMALL).read_bytes()
    second = write_tiny_model(tmp_path / "b.gguf", SMALL).read_bytes()
    other_seed = write_tiny_model(tmp_path / "c.gguf", replace(SMALL, seed=8))
    assert first == second
    assert other_seed.read_bytes() != first
    assert len(first) == len(other_seed.read_bytes())  # only the weights differ


def test_the_file_parses_back_with_llamas_metadata(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_tiny_model(tmp_path / "m.gguf", SMALL))
    assert _value(reader, "general.architecture") == "llama"
    expected = {
        "llama.context_length": 512,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
    }
    assert {key: _value(reader, key) for key in expected} == expected
    assert _value(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert _value(reader, "tokenizer.chat_template") == CHAT_TEMPLATE


def test_the_vocabulary_is_sentencepiece_style(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_tiny_model(tmp_path / "m.gguf", SMALL))
    tokens = _value(reader, "tokenizer.ggml.tokens")
    types = _value(reader, "tokenizer.ggml.token_type")
    scores = _value(reader, "tokenizer.ggml.scores")
    assert isinstance(tokens, list)
    assert isinstance(types, list)
    assert isinstance(scores, list)
    assert _value(reader, "tokenizer.ggml.model") == "llama"
    assert tokens[:3] == list(SPECIALS)
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert tokens[259:] == pieces()
    assert 300 <= len(pieces()) <= 1000
    assert len(set(tokens)) == len(tokens) == len(types) == len(scores)
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert set(types[3:259]) == {gguf.TokenType.BYTE}
    assert set(types[259:]) == {gguf.TokenType.NORMAL}
    assert [_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos")] == [
        0,
        1,
        2,
    ]
    assert _value(reader, "llama.vocab_size") == len(tokens)


@pytest.mark.parametrize("f16", [False, True])
def test_tensors_have_llamas_names_and_shapes(tmp_path: Path, f16: bool) -> None:
    model = replace(SMALL, f16=f16)
    reader = gguf.GGUFReader(write_tiny_model(tmp_path / "m.gguf", model))
    vocab = len(SPECIALS) + 256 + len(pieces())
    matrix = "F16" if f16 else "F32"
    # GGUF's shape is ne: {n_in, n_out}, the reverse of numpy's.
    expected = {
        "token_embd.weight": ([64, vocab], matrix),
        "output_norm.weight": ([64], "F32"),
        "output.weight": ([64, vocab], matrix),
    }
    for layer in range(2):
        expected |= {
            f"blk.{layer}.attn_norm.weight": ([64], "F32"),
            f"blk.{layer}.attn_q.weight": ([64, 64], matrix),
            f"blk.{layer}.attn_k.weight": ([64, 32], matrix),
            f"blk.{layer}.attn_v.weight": ([64, 32], matrix),
            f"blk.{layer}.attn_output.weight": ([64, 64], matrix),
            f"blk.{layer}.ffn_norm.weight": ([64], "F32"),
            f"blk.{layer}.ffn_gate.weight": ([64, 128], matrix),
            f"blk.{layer}.ffn_down.weight": ([128, 64], matrix),
            f"blk.{layer}.ffn_up.weight": ([64, 128], matrix),
        }
    found = {t.name: ([int(n) for n in t.shape], t.tensor_type.name) for t in reader.tensors}
    assert found == expected
    assert _value(reader, "general.file_type") == int(
        gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32
    )


def test_the_cache_writes_a_model_once_per_parameter_set(tmp_path: Path) -> None:
    first = tiny_model(SMALL, cache=tmp_path)
    written = first.stat().st_mtime_ns
    again = tiny_model(SMALL, cache=tmp_path)
    other = tiny_model(replace(SMALL, seed=9), cache=tmp_path)
    assert again == first
    assert again.stat().st_mtime_ns == written
    assert first.stat().st_mode & 0o777 == 0o644  # the server's container runs as nobody
    assert other != first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])


def test_a_shape_whose_heads_do_not_divide_is_refused() -> None:
    with pytest.raises(ValueError, match="divide"):
        TinyModel(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="divide"):
        TinyModel(n_head=4, n_head_kv=3)
