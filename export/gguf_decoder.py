"""A PaliGemma checkpoint's Gemma / Gemma 2 language model → a GGUF file llama.cpp runs (io-contract §13).

Written with the `gguf` package, tensor by tensor (the file is streamed, never held whole in memory),
with the tokenizer's vocabulary so stock llama.cpp tools load it. What differs from transformers' weights:
RMSNorm gains are stored as ``1 + w`` (llama.cpp multiplies by the stored gain), and for Gemma 2 the
query projection absorbs the ratio between transformers' ``query_pre_attn_scalar ** -0.5`` and the
query scale llama.cpp applies.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..runtime.errors import CheckpointError
from ..runtime.export_format import Precision

GGUF_DTYPES = {Precision.FP32: np.float32, Precision.FP16: np.float16}
ARCHITECTURES = {"gemma": "GEMMA", "gemma2": "GEMMA2"}
_NORM_SUFFIXES = ("layernorm.weight", "norm.weight")


def llamacpp_query_scale(architecture: str, num_layers: int, hidden: int, heads: int, head_dim: int) -> float:
    """The factor llama.cpp multiplies queries by (its Gemma 2 graph: 1/√(hidden/heads) for the 46-layer
    27B shape, else 1/√head_dim; Gemma: 1/√head_dim)."""
    if architecture == "gemma2" and num_layers == 46:
        return 1.0 / math.sqrt(hidden / heads)
    return 1.0 / math.sqrt(head_dim)


def _sliding_layers(text_config) -> list[bool]:
    layer_types = getattr(text_config, "layer_types", None) or []
    return [kind == "sliding_attention" for kind in layer_types]


def _vocabulary(tokenizer_path: Path, rows: int):
    """Pieces, scores and token types for ``rows`` ids, read from tokenizer.json.

    A SentencePiece-style vocabulary ("llama" in GGUF terms): normal pieces scored by -id (the order
    SentencePiece's BPE merges them in), added special tokens as control tokens, other added tokens
    (<loc…>, <seg…>) as user-defined, <0x..> pieces as bytes, table rows past the tokenizer as unused.
    """
    import gguf

    data = json.loads(tokenizer_path.read_text())
    vocab: dict[str, int] = dict(data["model"].get("vocab") or {})
    if data["model"].get("type") == "Unigram":
        vocab = {piece: i for i, (piece, _score) in enumerate(data["model"]["vocab"])}
    added = {entry["id"]: entry for entry in data.get("added_tokens", [])}
    pieces = [""] * rows
    types = [gguf.TokenType.UNUSED] * rows
    scores = [0.0] * rows
    for piece, token_id in vocab.items():
        if token_id < rows:
            pieces[token_id], types[token_id], scores[token_id] = piece, gguf.TokenType.NORMAL, -float(token_id)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                types[token_id], scores[token_id] = gguf.TokenType.BYTE, 0.0
    for token_id, entry in added.items():
        if token_id < rows:
            pieces[token_id], scores[token_id] = entry["content"], 0.0
            types[token_id] = gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED
    unk = data["model"].get("unk_token")
    if unk in vocab and vocab[unk] < rows:
        types[vocab[unk]] = gguf.TokenType.UNKNOWN
    for token_id in range(rows):
        if not pieces[token_id]:
            pieces[token_id] = f"<unused_row{token_id}>"
    return pieces, scores, types


def _tensors(language_model, architecture: str, num_layers: int, query_factor: float, dtype: npt.DTypeLike):
    """(gguf name, array) per weight, in checkpoint order; arrays are views of the torch weights where possible."""
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[architecture]), num_layers)
    for hf_name, tensor in language_model.state_dict().items():
        if "rotary_emb" in hf_name:
            continue
        name = names.get_name("model." + hf_name, try_suffixes=(".weight",))
        if name is None:
            raise CheckpointError(f"the language model's weight {hf_name!r} has no GGUF name; unsupported checkpoint.")
        array = tensor.detach().float().numpy()
        if hf_name.endswith(_NORM_SUFFIXES):
            yield name, (array + 1.0).astype(np.float32)  # Gemma norms scale by (1 + w); kept f32 like llama.cpp
            continue
        if hf_name.endswith("q_proj.weight") and query_factor != 1.0:
            array = array * np.float32(query_factor)
        yield name, array.astype(dtype, copy=False)


def write_gguf_decoder(hf_model, tokenizer_path: Path, tokens, path: Path, dtype: Precision = Precision.FP32) -> dict:
    """Write ``path``; returns what the manifest records about it."""
    import gguf

    text_config = hf_model.config.text_config
    architecture = text_config.model_type
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"llama.cpp export supports Gemma and Gemma 2 decoders, not {architecture!r}.")
    if dtype not in GGUF_DTYPES:
        raise CheckpointError(f"GGUF export writes {sorted(GGUF_DTYPES)} weights, not {dtype!r}.")
    layers = text_config.num_hidden_layers
    hidden, heads, head_dim = text_config.hidden_size, text_config.num_attention_heads, text_config.head_dim
    sliding = _sliding_layers(text_config) if architecture == "gemma2" else []
    query_factor = 1.0
    if architecture == "gemma2":
        expected = 1.0 / math.sqrt(text_config.query_pre_attn_scalar)
        query_factor = expected / llamacpp_query_scale(architecture, layers, hidden, heads, head_dim)

    writer = gguf.GGUFWriter(path, ARCHITECTURES[architecture].lower())
    writer.add_name("PaliGemma language model")
    writer.add_context_length(getattr(text_config, "max_position_embeddings", 8192))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(text_config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(text_config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(text_config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(text_config, "rope_theta", None) or _rope_theta(text_config)))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == Precision.FP32 else gguf.LlamaFileType.MOSTLY_F16)
    if architecture == "gemma2":
        writer.add_sliding_window(text_config.sliding_window)
        writer.add_sliding_window_pattern(sliding)
        writer.add_attn_logit_softcapping(text_config.attn_logit_softcapping or 0.0)
        writer.add_final_logit_softcapping(text_config.final_logit_softcapping or 0.0)

    rows = text_config.vocab_size
    pieces, scores, types = _vocabulary(tokenizer_path, rows)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokens.bos)
    writer.add_eos_token_id(tokens.eos[0])
    writer.add_pad_token_id(tokens.pad)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)

    language_model = hf_model.model.language_model
    target = GGUF_DTYPES[dtype]
    infos = []
    for name, array in _tensors(language_model, architecture, layers, query_factor, target):
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes)
        infos.append(name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _name, array in _tensors(language_model, architecture, layers, query_factor, target):
        writer.write_tensor_data(array)
    writer.close()
    return {"tensors": len(infos), "query_scale_folded": query_factor, "sliding_layers": sliding}


def _rope_theta(text_config) -> float:
    parameters = getattr(text_config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", 10_000.0))
