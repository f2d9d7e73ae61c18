"""Quantization recipes and the record a quantized export's manifest keeps of one.

A recipe says what each component of an export becomes. ONNX exports take `OnnxRecipe`s (a precision per
component plus the int4 block settings; quant/quantize.py applies them with onnxruntime's tools), GGUF exports
`GgufRecipe`s (a llama.cpp file type; quant/gguf_quant.py). The named ones are `RECIPES` and `GGUF_RECIPES`.
To add a named recipe, add it to one of those tables; a new precision of a component also needs its code in
quant/quantize.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import QuantizationError
from .export_format import Graph, NamedValue, Precision

FP32, FP16, INT8, INT4 = Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT4
VISION_PRECISIONS = (FP32, FP16, INT8)
DECODER_PRECISIONS = (FP32, FP16, INT8, INT4)
LM_HEAD_PRECISIONS = (FP32, FP16, INT8, INT4)
EMBEDDING_PRECISIONS = (FP32, FP16, INT8)
KV_CACHE_PRECISIONS = (FP32, FP16)  # what the KV-cache buffers hold (quant/kv_cache.py)
BLOCK_SIZES = (32, 64, 128, 256)
# 128, not 32: ×1.4 int4 decode and ×0.7 TTFT at full size, within 1 point on every task metric of both trained
# shapes models (docs/quality.md, "The default block")
DEFAULT_BLOCK_SIZE = 128
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


class PrefillWeights(NamedValue):
    """What prompts run on: the decode body itself, or a second, int8 copy of it (quant/prefill_weights.py)."""

    SAME = "same"
    INT8 = "int8"


class GgufType(NamedValue):
    """llama.cpp's file types a GGUF decoder can be quantized to (`gguf.LlamaFileType` member: `file_type`)."""

    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_K_M = "q4_k_m"
    F16 = "f16"

    @property
    def file_type(self) -> str:
        return {"q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_k_m": "MOSTLY_Q4_K_M", "f16": "MOSTLY_F16"}[
            self.value
        ]


def _closed(kind: type, value: Any, allowed: tuple, what: str) -> Any:
    """``value`` as a member of ``allowed`` (typed ``kind``), or a QuantizationError naming the choices."""
    try:
        member = kind(value)
    except ValueError:
        member = None
    if member not in allowed:
        raise QuantizationError(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return member


@dataclass(frozen=True)
class OnnxRecipe:
    """What each component of an ONNX export becomes. ``decoder`` is the decoder body (every MatMul but the LM
    head)."""

    name: str
    vision: Precision = FP32
    decoder: Precision = FP32
    lm_head: Precision = FP32
    embeddings: Precision = FP32
    block_size: int = DEFAULT_BLOCK_SIZE  # int4 / int8 MatMulNBits block along K
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits compute type on CPU: 4 = int8 activations
    prefill: PrefillWeights = PrefillWeights.SAME  # INT8: prompts run on an int8 copy of the body
    # fp32 on CPUs: onnxruntime's CPU kernels would cast the whole fp16 cache back every step (docs/performance.md)
    kv_cache: Precision = FP32

    def __post_init__(self) -> None:
        for name, allowed in (
            ("vision", VISION_PRECISIONS),
            ("decoder", DECODER_PRECISIONS),
            ("lm_head", LM_HEAD_PRECISIONS),
            ("embeddings", EMBEDDING_PRECISIONS),
            ("kv_cache", KV_CACHE_PRECISIONS),
        ):
            object.__setattr__(self, name, _closed(Precision, getattr(self, name), allowed, f"{name} precision"))
        object.__setattr__(self, "prefill", _closed(PrefillWeights, self.prefill, tuple(PrefillWeights), "prefill"))
        if self.block_size not in BLOCK_SIZES:
            raise QuantizationError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise QuantizationError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {self.accuracy_level}")
        if self.prefill == PrefillWeights.INT8 and self.decoder != INT4:
            raise QuantizationError(
                f"an int8 prefill copy speeds up a 4-bit decoder body's prompts; the body here is {self.decoder}"
            )
        if FP16 in (self.decoder, self.lm_head) and self.decoder != self.lm_head:
            raise QuantizationError(
                "fp16 applies to the whole decoder: set --decoder and --lm-head to fp16 together (or use --recipe fp16)"
            )

    @property
    def tied(self) -> bool:
        """The LM head and the embedding lookup still share one table."""
        return self.lm_head == self.embeddings and self.lm_head in (FP32, FP16)

    def precision_of(self, graph: Graph) -> Precision:
        """What a graph's weights become: vision's precision, or the decoder body's."""
        return self.vision if graph == Graph.VISION else self.decoder

    def with_overrides(self, **overrides: Any) -> OnnxRecipe:
        given = {key: value for key, value in overrides.items() if value is not None}
        return replace(self, name=f"{self.name}+custom", **given) if given else self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GgufRecipe:
    """A GGUF export's recipe: llama.cpp's own quantizer picks each decoder tensor's type from its file type
    (``name``); the ONNX vision graph takes ``vision``."""

    name: GgufType
    vision: Precision = INT8

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", _closed(GgufType, self.name, tuple(GgufType), "a GGUF recipe"))
        object.__setattr__(self, "vision", _closed(Precision, self.vision, VISION_PRECISIONS, "vision precision"))

    @property
    def decoder(self) -> str:
        return f"llama.cpp {self.name}"

    def precision_of(self, graph: Graph) -> str:
        return self.vision if graph == Graph.VISION else self.name

    def with_overrides(self, **overrides: Any) -> GgufRecipe:
        given = {key: value for key, value in overrides.items() if value is not None}
        other = sorted(set(given) - {"vision"})
        if other:
            raise QuantizationError(
                f"GGUF recipes take only --vision; llama.cpp's quantizer chooses the rest (got {', '.join(other)})"
            )
        return replace(self, **given) if given else self

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decoder": self.decoder}


Recipe = OnnxRecipe | GgufRecipe

RECIPES: dict[str, OnnxRecipe] = {
    # int8 weights everywhere: vision quantize_dynamic, decoder 8-bit MatMulNBits (int8 activations on CPU),
    # int8 embedding rows
    "int8": OnnxRecipe("int8", vision=INT8, decoder=INT8, lm_head=INT8, embeddings=INT8),
    # MatMulNBits 4-bit decoder body, 8-bit LM head, int8 vision, int8 embedding rows
    "int4": OnnxRecipe("int4", vision=INT8, decoder=INT4, lm_head=INT8, embeddings=INT8),
    # int4 plus an int8 copy of the decoder body for prompts: a faster time to first token on CPUs, for the body's
    # size again in memory and on disk
    "int4-fast-prefill": OnnxRecipe(
        "int4-fast-prefill", vision=INT8, decoder=INT4, lm_head=INT8, embeddings=INT8, prefill=PrefillWeights.INT8
    ),
    # GPUs: fp16 weights and activations, an fp16 KV cache; norms, softmax, residual adds and masks stay fp32
    "fp16": OnnxRecipe("fp16", vision=FP16, decoder=FP16, lm_head=FP16, embeddings=FP16, kv_cache=FP16),
}
GGUF_RECIPES: dict[str, GgufRecipe] = {
    kind.value: GgufRecipe(kind, vision=FP16 if kind == GgufType.F16 else INT8) for kind in GgufType
}


def get_recipe(name: str) -> Recipe:
    """An ONNX recipe (int8, int4, int4-fast-prefill, fp16) or a GGUF one (q8_0, q4_0, q4_k_m, f16)."""
    recipe = RECIPES.get(name) or GGUF_RECIPES.get(name)
    if recipe is None:
        raise QuantizationError(
            f"Unknown recipe {name!r}; choose one of {', '.join(RECIPES)} (ONNX exports) or "
            f"{', '.join(GGUF_RECIPES)} (GGUF exports)."
        )
    return recipe


@dataclass
class Quantization:
    """What a quantized export's manifest records: the recipe, where it came from, and each graph's bytes."""

    recipe: Recipe
    source_export: str
    bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.to_dict(), "source_export": self.source_export, "bytes": dict(self.bytes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Quantization:
        """Parse a manifest's record; a GGUF recipe is told apart by its llama.cpp file type name."""
        recipe = dict(data["recipe"])
        if recipe.get("name") in GGUF_RECIPES:
            parsed: Recipe = GgufRecipe(recipe["name"], recipe.get("vision", INT8))
        else:
            known = {f.name for f in fields(OnnxRecipe)}
            parsed = OnnxRecipe(**{key: value for key, value in recipe.items() if key in known})
        source, sizes = data.get("source_export", ""), data.get("bytes", {})
        if not isinstance(source, str) or not isinstance(sizes, dict):
            raise TypeError("quantization.source_export must be a string and quantization.bytes an object")
        return cls(parsed, source, sizes)

    def summary(self) -> str:
        r = self.recipe
        if isinstance(r, GgufRecipe):  # llama.cpp chose each tensor's type
            return f"quantization: {r.name} (vision {r.vision}, decoder {r.decoder})"
        prefill = f", prefill {r.prefill}" if r.prefill != PrefillWeights.SAME else ""
        return (
            f"quantization: {r.name} (vision {r.vision}, decoder {r.decoder}, LM head {r.lm_head}, embeddings "
            f"{r.embeddings}, block {r.block_size}, {'symmetric' if r.symmetric else 'asymmetric'}{prefill})"
        )
