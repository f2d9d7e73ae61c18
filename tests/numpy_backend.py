"""A third backend, in plain numpy, written from docs/io-contract.md: it proves the backend seam is real.

It reads a Hugging Face PaliGemma checkpoint's safetensors directly (no torch, no onnxruntime) and
implements SigLIP + projector (§1, §3) and the Gemma / Gemma 2 decoder (§3–6) in float64, including
the prefix-LM mask, 1-indexed RoPE, grouped-query attention, soft-caps and the sliding window. The
generation loop drives it exactly as it drives onnxruntime.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from paligemma_edge.runtime.backend import DecoderChunk
from paligemma_edge.runtime.export_format import IMAGE_SLOT


def _weights(checkpoint: Path) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        weights.update({k: v.astype(np.float64) for k, v in load_file(str(file)).items()})
    return weights


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Gemma's RMSNorm scales by (1 + w)."""
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * (1.0 + weight)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class NumpyVision:
    """SigLIP (no pooling head) + linear projector."""

    def __init__(self, checkpoint: Path):
        self.config = json.loads((Path(checkpoint) / "config.json").read_text())["vision_config"]
        self.w = {k: v for k, v in _weights(checkpoint).items() if not k.startswith("language_model")}

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        c, w = self.config, self.w
        patch, hidden, heads = c["patch_size"], c["hidden_size"], c["num_attention_heads"]
        eps = c.get("layer_norm_eps", 1e-6)
        batch, channels, size, _ = pixel_values.shape
        grid = size // patch
        patches = pixel_values.astype(np.float64).reshape(batch, channels, grid, patch, grid, patch)
        patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(batch, grid * grid, -1)  # row-major patches
        kernel = w["vision_tower.embeddings.patch_embedding.weight"].reshape(hidden, -1)
        x = patches @ kernel.T + w["vision_tower.embeddings.patch_embedding.bias"]
        x = x + w["vision_tower.embeddings.position_embedding.weight"]
        head_dim = hidden // heads
        for i in range(c["num_hidden_layers"]):
            p = f"vision_tower.encoder.layers.{i}."
            h = _layer_norm(x, w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], eps)

            def proj(name, h=h, p=p):
                out = h @ w[p + f"self_attn.{name}.weight"].T + w[p + f"self_attn.{name}.bias"]
                return out.reshape(batch, -1, heads, head_dim).transpose(0, 2, 1, 3)

            q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
            attn = _softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)) @ v
            attn = attn.transpose(0, 2, 1, 3).reshape(batch, -1, hidden)
            x = x + attn @ w[p + "self_attn.out_proj.weight"].T + w[p + "self_attn.out_proj.bias"]
            h = _layer_norm(x, w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], eps)
            h = _gelu_tanh(h @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"])
            x = x + h @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
        x = _layer_norm(x, w["vision_tower.post_layernorm.weight"], w["vision_tower.post_layernorm.bias"], eps)
        projected = x @ w["multi_modal_projector.linear.weight"].T + w["multi_modal_projector.linear.bias"]
        return projected.astype(np.float32)

    def close(self) -> None:
        self.w = {}


class NumpyCache:
    """Keys/values per layer [B, kv_heads, T, head_dim] and the flags of the T tokens."""

    def __init__(self, keys, values, is_suffix, valid, positions):
        self.keys, self.values = keys, values
        self.is_suffix, self.valid, self.positions = is_suffix, valid, positions

    @classmethod
    def empty(cls, batch: int, layers: int, kv_heads: int, head_dim: int) -> NumpyCache:
        empty = np.zeros((batch, kv_heads, 0, head_dim))
        flags = np.zeros((batch, 0), bool)
        return cls([empty] * layers, [empty] * layers, flags, flags, np.zeros((batch, 0), np.int64))

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def select(self, rows: Sequence[int]) -> NumpyCache:
        rows = list(rows)
        return NumpyCache(
            [k[rows] for k in self.keys],
            [v[rows] for v in self.values],
            self.is_suffix[rows],
            self.valid[rows],
            self.positions[rows],
        )

    def _left_padded(self, length: int) -> NumpyCache:
        pad = length - self.length

        def tokens(a, fill):
            return np.concatenate([np.full((a.shape[0], pad), fill, a.dtype), a], axis=1)

        def kv(a):
            return np.concatenate([np.zeros((*a.shape[:2], pad, a.shape[3])), a], axis=2)

        return NumpyCache(
            [kv(k) for k in self.keys],
            [kv(v) for v in self.values],
            tokens(self.is_suffix, False),
            tokens(self.valid, False),
            tokens(self.positions, 0),
        )

    def concat(self, others: Sequence[NumpyCache]) -> NumpyCache:
        parts = [self, *others]
        length = max(p.length for p in parts)
        padded = [p._left_padded(length) for p in parts]
        return NumpyCache(
            [np.concatenate([p.keys[i] for p in padded]) for i in range(len(self.keys))],
            [np.concatenate([p.values[i] for p in padded]) for i in range(len(self.values))],
            np.concatenate([p.is_suffix for p in padded]),
            np.concatenate([p.valid for p in padded]),
            np.concatenate([p.positions for p in padded]),
        )


class NumpyDecoder:
    """Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2), token by token as the contract describes."""

    def __init__(self, checkpoint: Path):
        self.config = json.loads((Path(checkpoint) / "config.json").read_text())["text_config"]
        self.w = {
            k.removeprefix("language_model.model."): v
            for k, v in _weights(checkpoint).items()
            if k.startswith("language_model")
        }
        c = self.config
        self.hidden_size = c["hidden_size"]
        self.gemma2 = c["model_type"] == "gemma2"
        self.layers = c["num_hidden_layers"]
        self.layer_types = c.get("layer_types") or ["full_attention"] * self.layers
        self.heads, self.kv_heads, self.head_dim = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.eps = c.get("rms_norm_eps", 1e-6)
        theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
        self.inv_freq = 1.0 / theta ** (np.arange(0, self.head_dim, 2) / self.head_dim)
        self.scale = (c.get("query_pre_attn_scalar") if self.gemma2 else self.head_dim) ** -0.5

    row_limit = None  # any batch

    def free_rows(self) -> None:
        return None

    def new_cache(self, batch_size: int, wait: bool = True) -> NumpyCache:
        return NumpyCache.empty(batch_size, self.layers, self.kv_heads, self.head_dim)

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        angles = positions[:, None, :, None] * self.inv_freq  # [B, 1, Q, d/2]
        cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
        half = self.head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def _visible(self, cache: NumpyCache, num_queries: int, sliding: bool) -> np.ndarray:
        """[B, Q, T]: prefix-LM rule (§4), and on sliding layers the window with prefix pairs exempt (§6)."""
        suffix_rank = np.cumsum(cache.is_suffix, axis=1)
        q = slice(cache.length - num_queries, None)
        visible = (suffix_rank[:, None, :] <= suffix_rank[:, q, None]) & cache.valid[:, None, :]
        visible &= cache.valid[:, q, None]
        if sliding:
            near = (cache.positions[:, q, None] - cache.positions[:, None, :]) < self.config["sliding_window"]
            prefix = ~cache.is_suffix
            visible &= near | (prefix[:, q, None] & prefix[:, None, :])
        return visible

    def forward(self, cache: NumpyCache, chunk: DecoderChunk) -> np.ndarray:
        w, c = self.w, self.config
        batch, num_queries = chunk.input_ids.shape
        cache.is_suffix = np.concatenate([cache.is_suffix, chunk.is_suffix], axis=1)
        cache.valid = np.concatenate([cache.valid, chunk.valid], axis=1)
        cache.positions = np.concatenate([cache.positions, chunk.positions], axis=1)
        table = w["embed_tokens.weight"]
        is_image = chunk.input_ids == IMAGE_SLOT
        x = table[np.where(is_image, 0, chunk.input_ids)] * np.sqrt(self.hidden_size)
        if chunk.image_embeds is not None:
            x = np.where(is_image[..., None], chunk.image_embeds.astype(np.float64), x)
        groups = self.heads // self.kv_heads
        for i in range(self.layers):
            p = f"layers.{i}."
            h = _rms_norm(x, w[p + "input_layernorm.weight"], self.eps)

            def heads(name, count, h=h, p=p):
                out = h @ w[p + f"self_attn.{name}.weight"].T
                return out.reshape(batch, num_queries, count, self.head_dim).transpose(0, 2, 1, 3)

            q = self._rope(heads("q_proj", self.heads), chunk.positions)
            k = self._rope(heads("k_proj", self.kv_heads), chunk.positions)
            cache.keys[i] = np.concatenate([cache.keys[i], k], axis=2)
            cache.values[i] = np.concatenate([cache.values[i], heads("v_proj", self.kv_heads)], axis=2)
            keys = np.repeat(cache.keys[i], groups, axis=1)
            values = np.repeat(cache.values[i], groups, axis=1)
            scores = q @ keys.transpose(0, 1, 3, 2) * self.scale
            if c.get("attn_logit_softcapping"):
                cap = c["attn_logit_softcapping"]
                scores = np.tanh(scores / cap) * cap
            visible = self._visible(cache, num_queries, self.layer_types[i] == "sliding_attention")
            weights = _softmax(np.where(visible[:, None], scores, -1e300))  # (padding rows: uniform, unused)
            attn = (weights @ values).transpose(0, 2, 1, 3).reshape(batch, num_queries, -1)
            attn = attn @ w[p + "self_attn.o_proj.weight"].T
            mlp_in = p + ("pre_feedforward_layernorm.weight" if self.gemma2 else "post_attention_layernorm.weight")
            if self.gemma2:
                attn = _rms_norm(attn, w[p + "post_attention_layernorm.weight"], self.eps)
            x = x + attn
            h = _rms_norm(x, w[mlp_in], self.eps)
            h = _gelu_tanh(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
            h = h @ w[p + "mlp.down_proj.weight"].T
            if self.gemma2:
                h = _rms_norm(h, w[p + "post_feedforward_layernorm.weight"], self.eps)
            x = x + h
        x = _rms_norm(x, w["norm.weight"], self.eps)
        rows = np.take_along_axis(x, chunk.logits_at[..., None], axis=1)
        logits = rows @ (table if chunk.vocab_rows is None else table[chunk.vocab_rows]).T
        if c.get("final_logit_softcapping"):
            cap = c["final_logit_softcapping"]
            logits = np.tanh(logits / cap) * cap
        return logits.astype(np.float32)
