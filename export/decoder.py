"""The PaliGemma text decoder as an export-friendly torch module with an explicit KV cache.

It reuses the Hugging Face layers' own submodules (norms, projections, MLP, rotary embedding)
so every number is computed the transformers way, and replaces only what tracing handles badly:
the Cache object and mask construction. Masks come in as boolean inputs built by the runtime
(`paligemma_edge.runtime.masks`), so no mask or length is baked into the graph. The cache is a
buffer the graph only reads; it returns the new tokens' keys/values (see `attention`).

Past the last layer's keys and values, only the rows whose logits are asked for (`logits_positions`) are computed:
the last layer's queries, attention output and MLP for one row instead of a whole prompt's (exact: no other row
feeds those logits).

The 257k-row embedding table lives once, transposed to [hidden, vocab]: the LM head is
`hidden @ table` (a MatMul that the quantization tools understand) and the embedding lookup is
a Gather along axis 1 of the same initializer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import rotate_half

from .attention import QUERY_CHUNK, attend


class ExportableDecoder(nn.Module):
    """(ids, image embeds, positions, masks, KV buffers) → (selected logits, new tokens' KV)."""

    def __init__(self, hf_model: Any, query_chunk: int = QUERY_CHUNK):  # PaliGemmaForConditionalGeneration
        super().__init__()
        self.query_chunk = query_chunk
        language_model: Any = hf_model.model.language_model
        config: Any = language_model.config
        self.config = config
        self.layers: Any = language_model.layers
        self.norm = language_model.norm
        self.rotary_emb = language_model.rotary_emb
        self.embed_scale = float(config.hidden_size) ** 0.5
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(self.layers))
        embedding = language_model.get_input_embeddings()
        # One [hidden, vocab] table serves as embedding (Gather axis 1) and tied LM head (MatMul).
        self.table = nn.Parameter(embedding.weight.detach().t().contiguous(), requires_grad=False)
        # transformers' embedding (and its tied LM head) now views the same storage: no second copy
        embedding.weight.data = self.table.data.t()

    @property
    def has_sliding_layers(self) -> bool:
        return "sliding_attention" in self.layer_types

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings × sqrt(hidden); positions whose id is negative
        (export_format.IMAGE_SLOT) take image_embeds (docs/io-contract.md §3).

        The runtime marks image positions with a negative id rather than the `<image>` id, so an
        `<image>` token the model itself generates is embedded like any token, as in transformers.
        """
        is_image = input_ids < 0
        safe_ids = torch.where(is_image, torch.zeros_like(input_ids), input_ids)
        batch, seq = input_ids.shape
        rows = torch.index_select(self.table, 1, safe_ids.reshape(-1))  # [hidden, batch*seq]
        text = rows.t().reshape(batch, seq, -1)
        text = text * torch.tensor(self.embed_scale, dtype=self.table.dtype)
        return torch.where(is_image.unsqueeze(-1), image_embeds.to(text.dtype), text)

    def attention(self, layer, hidden, cos, sin, mask, past_key, past_value, query_rows=None):
        """Grouped-query attention over (cache buffer, new tokens) → (output, new key, new value).

        query_rows [B, P] (positions in the call): queries and output for those rows only; keys and values for all.

        The query heads that share a KV head are folded into its rows, so nothing is repeated per
        query head (8× for MQA). The cache is never concatenated: scores against the past buffer and
        against the new keys are joined, a chunk of queries at a time (`attention.chunked_attention`),
        and only the new keys/values are returned, for the runtime to write into its buffer in place.
        The mask covers [buffer slots..., new tokens...]; unwritten buffer slots are masked out.
        """
        attn = layer.self_attn
        batch, seq, _ = hidden.shape
        shape = (batch, seq, -1, attn.head_dim)
        key = rotate(attn.k_proj(hidden).view(shape).transpose(1, 2), cos, sin)
        value = attn.v_proj(hidden).view(shape).transpose(1, 2)
        if query_rows is not None:
            hidden, cos, sin, mask = (select_rows(t, query_rows) for t in (hidden, cos, sin, mask[:, 0]))
            mask = mask.unsqueeze(1)
            seq = hidden.shape[1]
        query = rotate(attn.q_proj(hidden).view(batch, seq, -1, attn.head_dim).transpose(1, 2), cos, sin)
        kv_heads, groups = key.shape[1], attn.num_key_value_groups
        grouped = query.reshape(batch, kv_heads, groups, seq, attn.head_dim)  # head h = kv·groups + g
        softcap = getattr(attn, "attn_logit_softcapping", None)
        out = attend(
            grouped, key, value, past_key, past_value, mask, scale=attn.scaling, softcap=softcap, chunk=self.query_chunk
        )
        out = out.view(batch, -1, seq, attn.head_dim).transpose(1, 2)
        return attn.o_proj(out.reshape(batch, seq, -1)), key, value

    def forward(self, input_ids, image_embeds, position_ids, logits_positions, attention_mask, *rest):
        """rest = ([sliding_attention_mask,] past key/value per layer)."""
        sliding_mask = rest[0] if self.has_sliding_layers else attention_mask
        past = rest[1:] if self.has_sliding_layers else rest
        hidden = self.embed(input_ids, image_embeds)
        cos, sin = self.rotary_emb(hidden, position_ids)
        presents, last = [], len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            mask = sliding_mask if self.layer_types[i] == "sliding_attention" else attention_mask
            normed = layer.input_layernorm(hidden)
            rows = logits_positions if i == last else None
            attn_out, key, value = self.attention(layer, normed, cos, sin, mask, past[2 * i], past[2 * i + 1], rows)
            presents += [key, value]
            if i == last:  # from here on only the rows whose logits are asked for
                hidden = select_rows(hidden, logits_positions)
            if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2: post-norms around both blocks
                hidden = hidden + layer.post_attention_layernorm(attn_out)
                mlp_out = layer.mlp(layer.pre_feedforward_layernorm(hidden))
                hidden = hidden + layer.post_feedforward_layernorm(mlp_out)
            else:
                hidden = hidden + attn_out
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.norm(hidden) @ self.table
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return (logits.float(), *presents)


def select_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, S, ...] → [B, P, ...]: in each batch row, the positions rows [B, P]."""
    index = rows.reshape(*rows.shape, *([1] * (tensor.dim() - 2))).expand(*rows.shape, *tensor.shape[2:])
    return torch.gather(tensor, 1, index)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [B, heads, S, D] with cos/sin [B, S, D], as transformers' apply_rotary_pos_emb."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)
