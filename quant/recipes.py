"""Named quantization recipes: a precision per component, plus the int4 block settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..runtime import export_format as fmt
from ..runtime.errors import QuantizationError

VISION_PRECISIONS = ("fp32", "fp16", "int8")
DECODER_PRECISIONS = ("fp32", "fp16", "int8", "int4")
LM_HEAD_PRECISIONS = ("fp32", "fp16", "int8", "int4")
EMBEDDING_PRECISIONS = ("fp32", "fp16", "int8")
BLOCK_SIZES = (32, 64, 128, 256)
# 128, not 32: ×1.4 int4 decode and ×0.7 TTFT at full size, within 1 point on every task metric of both trained
# shapes models (benchmarks/RESULTS.md, "The default block")
DEFAULT_BLOCK_SIZE = 128
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
PREFILL_WEIGHTS = ("same", "int8")  # "int8": a second, int8 copy of the body that prompts run on (prefill_weights.py)
KV_CACHE_PRECISIONS = tuple(fmt.KV_CACHE_PRECISIONS)  # what the KV-cache buffers hold (kv_cache.py)


@dataclass(frozen=True)
class Recipe:
    """What each component becomes. ``decoder`` is the decoder body (every MatMul but the LM head)."""

    name: str
    vision: str = "fp32"
    decoder: str = "fp32"
    lm_head: str = "fp32"
    embeddings: str = "fp32"
    block_size: int = DEFAULT_BLOCK_SIZE  # int4 / int8 MatMulNBits block along K
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits compute type on CPU: 4 = int8 activations
    prefill: str = "same"  # "int8": prompts run on an int8 copy of the body, decode steps on the MatMulNBits one
    # fp32 on CPUs: onnxruntime's CPU kernels would cast the whole fp16 cache back every step (RESULTS.md)
    kv_cache: str = "fp32"

    def __post_init__(self) -> None:
        for field, allowed in (
            ("vision", VISION_PRECISIONS),
            ("decoder", DECODER_PRECISIONS),
            ("lm_head", LM_HEAD_PRECISIONS),
            ("embeddings", EMBEDDING_PRECISIONS),
            ("kv_cache", KV_CACHE_PRECISIONS),
        ):
            if getattr(self, field) not in allowed:
                raise QuantizationError(f"{field} precision must be one of {allowed}, got {getattr(self, field)!r}")
        if self.block_size not in BLOCK_SIZES:
            raise QuantizationError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise QuantizationError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {self.accuracy_level}")
        if self.prefill not in PREFILL_WEIGHTS:
            raise QuantizationError(f"prefill must be one of {PREFILL_WEIGHTS}, got {self.prefill!r}")
        if self.prefill == "int8" and self.decoder != "int4":
            raise QuantizationError(
                f"an int8 prefill copy speeds up a 4-bit decoder body's prompts; the body here is {self.decoder}"
            )
        if "fp16" in (self.decoder, self.lm_head) and self.decoder != self.lm_head:
            raise QuantizationError(
                "fp16 applies to the whole decoder: set --decoder and --lm-head to fp16 together (or use --recipe fp16)"
            )

    @property
    def tied(self) -> bool:
        """The LM head and the embedding lookup still share one table."""
        return self.lm_head == self.embeddings and self.lm_head in ("fp32", "fp16")

    def with_overrides(self, **overrides) -> Recipe:
        given = {key: value for key, value in overrides.items() if value is not None}
        if not given:
            return self
        return replace(self, name=f"{self.name}+custom", **given)

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES: dict[str, Recipe] = {
    # int8 weights everywhere: vision quantize_dynamic, decoder 8-bit MatMulNBits (int8 activations on CPU),
    # int8 embedding rows
    "int8": Recipe("int8", vision="int8", decoder="int8", lm_head="int8", embeddings="int8"),
    # MatMulNBits 4-bit decoder body, 8-bit LM head, int8 vision, int8 embedding rows
    "int4": Recipe("int4", vision="int8", decoder="int4", lm_head="int8", embeddings="int8"),
    # int4 plus an int8 copy of the decoder body for prompts: a faster time to first token on CPUs, for the body's
    # size again in memory and on disk
    "int4-fast-prefill": Recipe(
        "int4-fast-prefill", vision="int8", decoder="int4", lm_head="int8", embeddings="int8", prefill="int8"
    ),
    # GPUs: fp16 weights and activations, an fp16 KV cache; norms, softmax, residual adds and masks stay fp32
    "fp16": Recipe("fp16", vision="fp16", decoder="fp16", lm_head="fp16", embeddings="fp16", kv_cache="fp16"),
}


@dataclass(frozen=True)
class GgufRecipe:
    """A GGUF export's recipe: llama.cpp's own quantizer picks each decoder tensor's type from its file type
    (``name``); the ONNX vision graph takes ``vision``."""

    name: str  # a llama.cpp file type: q8_0, q4_0, q4_k_m, f16
    vision: str = "int8"

    def __post_init__(self) -> None:
        if self.name not in GGUF_FILE_TYPES:
            raise QuantizationError(f"GGUF recipes are {', '.join(GGUF_FILE_TYPES)}, not {self.name!r}")
        if self.vision not in VISION_PRECISIONS:
            raise QuantizationError(f"vision precision must be one of {VISION_PRECISIONS}, got {self.vision!r}")

    def with_overrides(self, **overrides) -> GgufRecipe:
        given = {key: value for key, value in overrides.items() if value is not None}
        other = sorted(set(given) - {"vision"})
        if other:
            raise QuantizationError(
                f"GGUF recipes take only --vision; llama.cpp's quantizer chooses the rest (got {', '.join(other)})"
            )
        return replace(self, name=self.name, **given) if given else self

    def to_dict(self) -> dict:
        return {**asdict(self), "decoder": f"llama.cpp {self.name}"}


# llama.cpp's file types (gguf.LlamaFileType member names), by recipe name
GGUF_FILE_TYPES = {"q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_k_m": "MOSTLY_Q4_K_M", "f16": "MOSTLY_F16"}
GGUF_RECIPES: dict[str, GgufRecipe] = {
    "q8_0": GgufRecipe("q8_0"),
    "q4_0": GgufRecipe("q4_0"),
    "q4_k_m": GgufRecipe("q4_k_m"),
    "f16": GgufRecipe("f16", vision="fp16"),
}


def get_recipe(name: str) -> Recipe | GgufRecipe:
    """An ONNX recipe (int8, int4, fp16) or a GGUF one (q8_0, q4_0, q4_k_m, f16)."""
    if name in GGUF_RECIPES:
        return GGUF_RECIPES[name]
    if name not in RECIPES:
        raise QuantizationError(
            f"Unknown recipe {name!r}; choose one of {', '.join(RECIPES)} (ONNX exports) or "
            f"{', '.join(GGUF_RECIPES)} (GGUF exports)."
        )
    return RECIPES[name]
