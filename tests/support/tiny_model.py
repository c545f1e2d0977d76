"""A tiny real model: a GGUF file of the ``llama`` architecture with seeded random weights.

No model hub is reachable here, so the tests write their own model: the real architecture
with every metadata key llama.cpp requires, a small SentencePiece-style vocabulary (the
three specials, the 256 byte tokens, a few hundred pieces with scores and types), a chat
template, and weights drawn from ``numpy.random.default_rng(seed)``. It makes nonsense, but
through the real kernels, tokenizer and sampling: what a server test needs. The same
parameters give a byte-identical file; ``tiny_model`` keeps one per parameter set in a cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

__all__ = ["CHAT_TEMPLATE", "SPECIALS", "TinyModel", "pieces", "tiny_model", "write_tiny_model"]

#: <unk>, <s>, </s> at the ids llama's SentencePiece vocabulary gives them.
SPECIALS = ("<unk>", "<s>", "</s>")

#: Zephyr's layout: one llama.cpp knows, and a Jinja simple enough for its own engine.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

#: SentencePiece's word boundary: a piece that starts a word starts with it.
_SPACE = "\u2581"

#: Common words: each one, with every prefix of it, is a piece.
_WORDS = """
the of and to in is that it was for on are as with his they at be this from have or by
one had not but what all were when we there can an your which their said if do will each
about how up out them then she many some so these would other into has more her two like
him see time could no make than first been its who now people my made over did down only
way find use may water long little very after words called just where most know get
through back much before go good new write our used me man too any day same right look
think also around another came come work three word must because does part even place
well such here take why things help put years different model server token stream hello
world
"""


@dataclass(frozen=True)
class TinyModel:
    """The shape of the model; the defaults make a file of about 4 MB (f32)."""

    seed: int = 0
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 384
    n_ctx: int = 2048
    f16: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")

    @property
    def head_dim(self) -> int:
        """The width of one attention head (and of its rotary embedding)."""
        return self.n_embd // self.n_head


def pieces() -> list[str]:
    """The ordinary pieces: characters, then every word with its prefixes (so SentencePiece's
    pairwise merges can reach it), each once, in a fixed order."""
    chars = [*"abcdefghijklmnopqrstuvwxyz", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ", *"0123456789"]
    out = [_SPACE, *chars, *".,!?'\"-:;()", *(_SPACE + c for c in chars)]
    for word in _WORDS.split():
        out += [_SPACE + word[:end] for end in range(2, len(word) + 1)]
    return list(dict.fromkeys(out))


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types: the specials, the 256 bytes, then the pieces."""
    specials = [
        (SPECIALS[0], 0.0, gguf.TokenType.UNKNOWN),
        (SPECIALS[1], 0.0, gguf.TokenType.CONTROL),
        (SPECIALS[2], 0.0, gguf.TokenType.CONTROL),
    ]
    byte_tokens = [(f"<0x{b:02X}>", 0.0, gguf.TokenType.BYTE) for b in range(256)]
    # A higher score merges first; earlier (shorter, commoner) pieces win ties of length.
    ordinary = [(p, -float(i), gguf.TokenType.NORMAL) for i, p in enumerate(pieces())]
    rows = [*specials, *byte_tokens, *ordinary]
    return [r[0] for r in rows], [r[1] for r in rows], [int(r[2]) for r in rows]


def write_tiny_model(path: Path, model: TinyModel = TinyModel()) -> Path:
    """Write the model to ``path``; the same ``model`` always writes the same bytes."""
    tokens, scores, types = _vocabulary()
    rng = np.random.default_rng(model.seed)
    dtype = np.float16 if model.f16 else np.float32

    def matrix(rows: int, cols: int) -> npt.NDArray[np.generic]:
        # numpy's (rows, cols) is GGUF's ne = (cols, rows): llama.cpp's {n_in, n_out}.
        drawn: npt.NDArray[np.generic] = rng.standard_normal((rows, cols)) / np.sqrt(cols)
        return drawn.astype(dtype)

    def norm() -> npt.NDArray[np.float32]:
        return np.ones(model.n_embd, dtype=np.float32)  # 1-D tensors stay f32 in llama.cpp

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"tiny-llama-seed{model.seed}")
    writer.add_context_length(model.n_ctx)
    writer.add_embedding_length(model.n_embd)
    writer.add_block_count(model.n_layer)
    writer.add_feed_forward_length(model.n_ff)
    writer.add_head_count(model.n_head)
    writer.add_head_count_kv(model.n_head_kv)
    writer.add_rope_dimension_count(model.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if model.f16 else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    q_out, kv_out = model.n_head * model.head_dim, model.n_head_kv * model.head_dim
    writer.add_tensor("token_embd.weight", matrix(len(tokens), model.n_embd))
    for layer in range(model.n_layer):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", norm())
        writer.add_tensor(f"{block}.attn_q.weight", matrix(q_out, model.n_embd))
        writer.add_tensor(f"{block}.attn_k.weight", matrix(kv_out, model.n_embd))
        writer.add_tensor(f"{block}.attn_v.weight", matrix(kv_out, model.n_embd))
        writer.add_tensor(f"{block}.attn_output.weight", matrix(model.n_embd, q_out))
        writer.add_tensor(f"{block}.ffn_norm.weight", norm())
        writer.add_tensor(f"{block}.ffn_gate.weight", matrix(model.n_ff, model.n_embd))
        writer.add_tensor(f"{block}.ffn_down.weight", matrix(model.n_embd, model.n_ff))
        writer.add_tensor(f"{block}.ffn_up.weight", matrix(model.n_ff, model.n_embd))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", matrix(len(tokens), model.n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model(model: TinyModel = TinyModel(), cache: Path | None = None) -> Path:
    """The model's file in ``cache`` (default ``~/.cache/gpu-agent-test/models``), written
    there once per parameter set and writer version."""
    if cache is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cache = Path(base) / "gpu-agent-test" / "models"
    key = json.dumps(
        {
            "model": dataclasses.asdict(model),
            "gguf": importlib.metadata.version("gguf"),
            "numpy": importlib.metadata.version("numpy"),
            "writer": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        },
        sort_keys=True,
    )
    path = cache / f"tiny-llama-{hashlib.sha256(key.encode()).hexdigest()[:16]}.gguf"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a reader never sees half a file.
        fd, staging = tempfile.mkstemp(dir=cache, suffix=".part")
        os.close(fd)
        try:
            write_tiny_model(Path(staging), model)
            # Readable by all: the server in its container runs as nobody.
            os.chmod(staging, 0o644)
            os.replace(staging, path)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
    return path
