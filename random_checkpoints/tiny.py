"""Random PaliGemma checkpoints in Hugging Face format, for tests, demos and benchmarks.

No weights can be downloaded here, so every test builds its own checkpoint: a synthetic tokenizer
with the real special-token layout (`<pad>`, `<eos>`, `<bos>`, `<loc0000>`…, `<seg000>`…,
`<image>`) and a randomly initialised model whose init is scaled so greedy decoding does not
collapse to one repeated token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..export.checkpoint import RANDOM_WEIGHTS_MARKER
from ..runtime import spec

# Words the synthetic BPE is trained on; enough variety that greedy output is readable text.
_CORPUS_WORDS = (  # noqa: SIM905 — a readable word list
    "a the cat dog on in of and with red blue green small large sitting standing near car tree house sky "
    "person two three white black man woman table street water grass image photo picture shows there is "
    "are left right top bottom answer caption describe detect segment ocr question en fr de what where how "
    "many colour color yes no"
).split()


_WEIGHT_GAIN = 3.0  # ×1/sqrt(fan_in): blocks outweigh the residual token embedding
_LOGIT_SPREAD = 2.0  # final-norm gain (1 + w) ≈ this
_POST_NORM_GAIN = 5.0  # Gemma 2 post-attention / post-ffw norm gains
_SCRIPT_EMBED_NORM = 3.0  # scripted checkpoints: norm of each script token's embedding
_SCRIPT_GAIN = 30.0  # scripted checkpoints: MLP lookup gain, ≫ the residual embedding


@dataclass(frozen=True)
class CheckpointShape:
    """Shape of a random PaliGemma checkpoint (defaults: tiny — a few MB, seconds to export;
    full_size.PRESETS holds the real 3B shapes)."""

    version: int = 1  # 1 = Gemma decoder, 2 = Gemma 2 decoder
    image_size: int = 224
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    kv_heads: int = 1
    head_dim: int = 16
    text_mlp: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_mlp: int = 64
    sliding_window: int = 4096  # Gemma 2 only
    init_std: float = 0.2
    seed: int = 0
    vocab_size: int | None = None  # > tokenizer size adds padding rows, like HF's 257216 vs 257152


def build_tokenizer(base_vocab_size: int | None = None, words: Sequence[str] = _CORPUS_WORDS):
    """A Gemma-like fast tokenizer: BPE over '▁'-marked ``words``, "\\n" a normal piece, the
    PaliGemma special tokens at the end of the vocabulary and a `<bos>` post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[spec.PAD_TOKEN, spec.EOS_TOKEN, spec.BOS_TOKEN, "<unk>"],
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789▁\n?.,;:'-"),
        show_progress=False,
    )
    words = list(words)
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    tokenizer.train_from_iterator(lines, trainer)
    if base_vocab_size is not None:  # the real id layout: unreachable filler pieces up to 256000
        vocab = tokenizer.get_vocab()
        vocab.update({f"<unused{i}>": i for i in range(len(vocab), base_vocab_size)})
        merges = json.loads(tokenizer.to_str())["model"]["merges"]
        pre_tokenizer, decoder = tokenizer.pre_tokenizer, tokenizer.decoder
        tokenizer = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges],
                unk_token="<unk>",
            )
        )
        tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizer, decoder
        tokenizer.add_special_tokens([spec.PAD_TOKEN, spec.EOS_TOKEN, spec.BOS_TOKEN, "<unk>"])
    tokenizer.add_tokens([spec.loc_token(i) for i in range(spec.NUM_LOC_TOKENS)])
    tokenizer.add_tokens([spec.seg_token(i) for i in range(spec.NUM_SEG_TOKENS)])
    tokenizer.add_special_tokens([spec.IMAGE_TOKEN])
    bos_id = tokenizer.token_to_id(spec.BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{spec.BOS_TOKEN} $A", special_tokens=[(spec.BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=spec.BOS_TOKEN,
        eos_token=spec.EOS_TOKEN,
        pad_token=spec.PAD_TOKEN,
        unk_token="<unk>",
        padding_side="left",
    )


def paligemma_config(shape: CheckpointShape, tokenizer):
    from transformers import Gemma2Config, GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

    vocab_size = shape.vocab_size or len(tokenizer)
    vision: Any = SiglipVisionConfig(  # type: ignore[call-arg]  # PaliGemma reads projection_dim from it
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_mlp,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        patch_size=spec.PATCH_SIZE,
        image_size=shape.image_size,
        vision_use_head=False,
        projection_dim=shape.text_hidden,
    )
    text_kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_mlp,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=shape.init_std,
    )
    text: Any
    if shape.version == 1:
        text = GemmaConfig(hidden_act="gelu_pytorch_tanh", **text_kwargs)
    elif shape.version == 2:
        text = Gemma2Config(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=shape.head_dim,
            sliding_window=shape.sliding_window,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            **text_kwargs,
        )
    else:
        raise ValueError(f"PaliGemma version must be 1 or 2, not {shape.version}")
    return PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(spec.IMAGE_TOKEN),
        projection_dim=shape.text_hidden,
        hidden_size=shape.text_hidden,
        vocab_size=vocab_size,
    )


def _randomize(model, std: float, seed: int) -> None:
    """Re-draw every parameter with a scale large enough for varied greedy output.

    transformers' default init (std 0.02, zero norms) yields near-uniform logits and a model
    that repeats one token; parity tests on such a model prove nothing.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # norms and biases: small offsets around their defaults
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
            else:
                scale = std if "embed_tokens" in name else _WEIGHT_GAIN / param[0].numel() ** 0.5
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
        # Gemma norms scale by (1 + w): a larger final-norm weight spreads the logits, so greedy
        # choices are decided by margins far above float rounding (no flaky near-ties in tests).
        language_model = model.model.language_model
        language_model.norm.weight.add_(_LOGIT_SPREAD - 1.0)
        for layer in language_model.layers:
            if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2: let the post-normed blocks
                layer.post_attention_layernorm.weight.add_(_POST_NORM_GAIN - 1.0)  # outweigh the
                layer.post_feedforward_layernorm.weight.add_(_POST_NORM_GAIN - 1.0)  # embedding


def _build(shape: CheckpointShape):
    """(randomised model in eval mode, tokenizer)."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    tokenizer = build_tokenizer()
    torch.manual_seed(shape.seed)
    model = PaliGemmaForConditionalGeneration(paligemma_config(shape, tokenizer)).eval()
    _randomize(model, shape.init_std, shape.seed)
    return model, tokenizer


def _save(model, tokenizer, shape: CheckpointShape, out_dir: str | Path) -> Path:
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    out = Path(out_dir)
    model.save_pretrained(out)
    (out / RANDOM_WEIGHTS_MARKER).write_text(json.dumps({"random_weights": True, "spec": asdict(shape)}, indent=2))
    num_image_tokens = (shape.image_size // spec.PATCH_SIZE) ** 2
    image_processor: Any = SiglipImageProcessorPil(size={"height": shape.image_size, "width": shape.image_size})
    image_processor.image_seq_length = num_image_tokens
    PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def make_tiny_checkpoint(out_dir: str | Path, shape: CheckpointShape = CheckpointShape()) -> Path:
    """Write a tiny random PaliGemma checkpoint (model + processor) with `save_pretrained`."""
    model, tokenizer = _build(shape)
    return _save(model, tokenizer, shape, out_dir)


def make_scripted_checkpoint(
    out_dir: str | Path, continuation: str, shape: CheckpointShape = CheckpointShape()
) -> Path:
    """A tiny checkpoint whose greedy output is ``continuation`` then `<eos>`, whatever the image and prompt.

    For end-to-end tests of output decoding (boxes, masks, drawings) that a random model cannot
    produce. Attention is switched off (o_proj = 0) and layer 0's MLP becomes a lookup table that
    maps each token to the next one: every chain token gets an orthonormal embedding direction, the
    MLP's gate/up rows detect it and its down columns write the successor's direction.
    """
    import torch

    model, tokenizer = _build(shape)
    chain = [tokenizer.convert_tokens_to_ids(spec.PROMPT_END)]
    chain += tokenizer(continuation, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    hidden = shape.text_hidden
    if len(set(chain[:-1])) != len(chain) - 1 or len(chain) > min(hidden, shape.text_mlp):
        raise ValueError(f"a script needs distinct tokens, at most {min(hidden, shape.text_mlp) - 1}: {chain}")
    language_model = model.model.language_model
    with torch.no_grad():
        directions, _ = torch.linalg.qr(torch.randn(hidden, len(chain), generator=torch.Generator().manual_seed(0)))
        table = language_model.embed_tokens.weight
        table -= (table @ directions) @ directions.T  # other tokens: orthogonal to the script
        table[chain] = directions.T * _SCRIPT_EMBED_NORM
        for layer in language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.zero_()
            for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm"):
                if hasattr(layer, norm):
                    getattr(layer, norm).weight.zero_()
            if hasattr(layer, "post_feedforward_layernorm"):
                layer.post_feedforward_layernorm.weight.fill_(_SCRIPT_GAIN)
        mlp = language_model.layers[0].mlp
        detector = directions.T[:-1] * (_SCRIPT_GAIN / hidden**0.5)  # unit i fires on token chain[i]
        mlp.gate_proj.weight[: len(chain) - 1] = detector
        mlp.up_proj.weight[: len(chain) - 1] = detector
        mlp.down_proj.weight[:, : len(chain) - 1] = directions[:, 1:] * _SCRIPT_GAIN
        language_model.norm.weight.zero_()
    return _save(model, tokenizer, shape, out_dir)
