"""`PaliGemma`: an export, ready to caption, answer, read, detect and segment — no torch, no transformers.

It turns images and prompts into `RunningSequence`s and lets the loop in generation.py decode them
on the export's backend (backends/); task helpers and output parsing sit on top.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
from tokenizers import Tokenizer

from . import spec, tasks
from .backend import Decoder, VisionEncoder
from .backends import backend_of
from .backends.options import BackendOptions, LlamaCppOptions, OnnxOptions
from .errors import CorruptExportError, GenerationError, ImageError, PromptError
from .export_format import Graph, Manifest, load_manifest
from .generation import (
    DecodingBatch,
    GenerationConfig,
    GenerationResult,
    RunningSequence,
    StopText,
    Timings,
    TokenEvent,
    run_to_completion,
    teacher_forced_logits,
)
from .grammar import GroundingGrammar, Spelling, spell
from .images import ImageInput, load_image, preprocess
from .outputs import ParsedOutput, non_max_suppression, parse_output
from .segmentation import NO_MASK_DECODER_NOTE, MaskDecoder, paste_mask


@dataclass(frozen=True)
class ImageFeatures:
    """Projected image features of one image: encode once, prompt many times."""

    features: np.ndarray  # [num_image_tokens, hidden]
    width: int
    height: int
    timings: Timings = field(default_factory=Timings, compare=False)  # preprocess_s, vision_s of its batch


class PaliGemma:
    """A PaliGemma export, ready to caption, answer, read, detect and segment."""

    def __init__(
        self,
        manifest: Manifest,
        tokenizer: Tokenizer,
        vision: VisionEncoder,
        decoder: Decoder[Any],
        mask_decoder: MaskDecoder | None = None,
    ):
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.vision = vision
        self.decoder = decoder
        self.mask_decoder = mask_decoder
        self.tokens = manifest.tokens
        self._spellings: dict[str, Spelling] = {}  # grounding prompts' label and separator tokens

    @classmethod
    def load(
        cls,
        path: str | Path,
        options: BackendOptions | OnnxOptions | LlamaCppOptions | None = None,
        *,
        verify_checksums: bool | str = True,
        **keywords: Any,
    ) -> PaliGemma:
        """Open an export directory made by `paligemma-edge export` (or `quantize`).

        ``options``: the backends' settings (`BackendOptions`, or one backend's `OnnxOptions` / `LlamaCppOptions`).
        For convenience their fields can be given as keywords instead: providers, threads, memory_arena,
        device_cache (onnxruntime), gpu_layers, max_sequences, context_tokens, cache_type, flash_attention
        (llama.cpp), threads for both.

        ``verify_checksums``: True checks each file's sha256 once per file version (remembered in the user's
        cache), "full" every time, False only sizes.

        ``memory_arena=False`` returns onnxruntime's activation memory to the OS after each call (lower peak RSS,
        slower calls). None: on; at 896 px the vision and decoder sessions share one arena grown by exactly
        what a call asks for, the vision call and a prefill of 2,048 tokens or more hand its free memory back
        when they end (onnxruntime's arena shrinkage), and a GGUF export's vision graph runs without it
        (docs/performance.md).

        ``device_cache``: the KV cache as onnxruntime values on the provider's device, written in place, so a
        CUDA decode step moves only its inputs and the last logits (None: on for CUDA, off on the CPU).

        GGUF exports (llama.cpp): ``gpu_layers`` layers go to a GPU build's device (-1: all);
        ``max_sequences`` sequences (default 4; 1 at 896 px) decode together, larger batches in waves, each with
        ``context_tokens`` KV cells; ``cache_type`` ("f32"/"f16") and ``flash_attention`` default to exact (f32,
        off) for full-precision exports and to f16 + flash attention for quantized ones (see `LlamaCppOptions`).
        """
        if options is not None and keywords:
            raise GenerationError("give load options either as `options` or as keywords, not both.")
        settings = BackendOptions.of(options) if options is not None else BackendOptions.from_keywords(**keywords)
        manifest = load_manifest(path)
        backend = backend_of(manifest)
        backend.check(settings)  # before minutes of checksums: a CUDA run that cannot be one says so now
        manifest.verify_files(checksums=verify_checksums)
        vision, decoder = backend.load(manifest, settings)
        try:
            tokenizer = Tokenizer.from_file(str(manifest.path(manifest.tokenizer)))
        except Exception as error:
            raise CorruptExportError(f"Cannot read the tokenizer of {path}: {error}. Re-run the export.") from error
        mask_graph = manifest.graphs.get(Graph.MASK_DECODER)
        providers = settings.onnx.providers
        mask_decoder = MaskDecoder.from_onnx(manifest.path(mask_graph.file), providers) if mask_graph else None
        return cls(manifest, tokenizer, vision, decoder, mask_decoder)

    @property
    def hidden_size(self) -> int:
        return self.manifest.language_model.hidden_size

    # ----------------------------------------------------------------- images
    def encode_image(self, image: ImageInput | ImageFeatures) -> ImageFeatures:
        """Run the vision encoder once; pass the result to generate() in place of the image."""
        return self.encode_images([image])[0]

    def encode_images(self, images: Sequence[ImageInput | ImageFeatures]) -> list[ImageFeatures]:
        """Encode several images in one vision call (each row independent of its batch-mates)."""
        first_of = {id(img): i for i, img in reversed(list(enumerate(images)))}  # one encode per object
        todo = {i: img for i, img in enumerate(images) if first_of[id(img)] == i and not isinstance(img, ImageFeatures)}
        encoded: dict[int, ImageFeatures] = {}
        if todo:
            start = time.perf_counter()
            loaded = [load_image(image) for image in todo.values()]
            pixels = np.stack([preprocess(image, self.manifest.image_size) for image in loaded])
            encoded_at = time.perf_counter()
            features = self.vision.encode(pixels)
            expected = (self.manifest.num_image_tokens, self.hidden_size)
            if features.shape[1:] != expected:
                raise CorruptExportError(
                    f"the vision encoder returns features of shape {list(features.shape[1:])}, the manifest "
                    f"expects {list(expected)}; re-run the export."
                )
            timings = Timings(preprocess_s=encoded_at - start, vision_s=time.perf_counter() - encoded_at)
            for row, (i, image) in enumerate(zip(todo, loaded)):
                encoded[i] = ImageFeatures(features[row], image.width, image.height, timings)
        return [img if isinstance(img, ImageFeatures) else encoded[first_of[id(img)]] for img in images]

    def close_vision(self) -> None:
        """Release the vision encoder's weights (e.g. before a long prefill); encode_image fails afterwards."""
        self.vision.close()

    # ----------------------------------------------------------------- prompts
    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the prefix for one prompt, exactly as PaliGemmaProcessor builds them."""
        text = tasks.prefix_text(prompt, self.manifest.num_image_tokens)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if ids.count(self.tokens.image) != self.manifest.num_image_tokens:
            raise CorruptExportError("The tokenizer does not encode <image> as one token; the export is broken.")
        return ids

    def _token_ids(self, token_ids: Sequence[int]) -> list[int]:
        """Validated token ids (a negative id would be read as an image slot, a large one crash the graph)."""
        vocab = self.manifest.language_model.vocab_size
        try:
            ids = [int(t) for t in token_ids if not isinstance(t, bool) and int(t) == t]
        except (TypeError, ValueError, OverflowError) as error:
            raise GenerationError(f"token ids must be integers: {error}.") from error
        if len(ids) != len(token_ids) or any(not 0 <= t < vocab for t in ids):
            raise GenerationError(f"token ids must be integers in [0, {vocab}), got {list(token_ids)[:8]}….")
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # ----------------------------------------------------------------- sequences and batches
    def new_batch(self) -> DecodingBatch:
        """An empty decoding batch: sequences from `new_sequence` join it and leave it between steps."""
        return DecodingBatch(self.decoder, self.tokens)

    def new_sequence(
        self, image: ImageInput | ImageFeatures, prompt: str, config: GenerationConfig | None = None, **options
    ) -> RunningSequence:
        """One prompt on one image, ready to join a `DecodingBatch`; ``options`` are GenerationConfig fields."""
        return self._sequences([image], [prompt], GenerationConfig.from_options(config, **options))[0]

    @property
    def max_positions(self) -> int:
        """Tokens a sequence may hold: prefix + generated (or scored) tokens."""
        return self.manifest.language_model.max_positions or spec.DEFAULT_MAX_POSITIONS

    def _check_length(self, prefix_tokens: int, more: int) -> None:
        if prefix_tokens + more > self.max_positions:
            raise PromptError(
                f"{prefix_tokens} prefix tokens (image + prompt) + {more} more exceed the model's "
                f"{self.max_positions} positions; shorten the prompt or lower max_new_tokens."
            )

    def _sequences(self, images: list, prompts: list[str], config: GenerationConfig) -> list[RunningSequence]:
        prompt_ids = [self.prompt_ids(p) for p in prompts]  # prompt errors before any image work
        configs = [config.validated(tasks.default_max_new_tokens(p)) for p in prompts]
        for ids, cfg in zip(prompt_ids, configs):
            self._check_length(len(ids), int(cfg.max_new_tokens or 0))  # validated: an integer >= 1
        grammars = [self.grammar(p) if cfg.constrained else None for p, cfg in zip(prompts, configs)]
        if not images:
            raise ImageError("No image given.")
        features = self.encode_images(images)
        sequences = []
        for ids, encoded, cfg, prompt, grammar in zip(prompt_ids, features, configs, prompts, grammars):
            # the encode that made these features, also when it ran before this call (ImageFeatures passed in)
            timings = Timings(preprocess_s=encoded.timings.preprocess_s, vision_s=encoded.timings.vision_s)
            sequences.append(
                RunningSequence(ids, encoded.features, cfg, self.tokens, self.decode, prompt, timings, grammar)
            )
        return sequences

    def grammar(self, prompt: str) -> GroundingGrammar:
        """The grounding grammar of a `detect` / `segment` prompt (PromptError for other prompts)."""
        key = prompt.strip()
        if key not in self._spellings:
            self._spellings[key] = spell(self.tokenizer, prompt)
        return GroundingGrammar(self._spellings[key], self.tokens)

    # ----------------------------------------------------------------- public generation API
    @overload
    def generate(
        self,
        image: ImageInput | ImageFeatures,
        prompt: str,
        max_new_tokens: int | None = None,
        *,
        config: GenerationConfig | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
        **options: Any,
    ) -> GenerationResult: ...

    @overload
    def generate(
        self,
        image: list | tuple,
        prompt: str | list[str] | tuple[str, ...],
        max_new_tokens: int | None = None,
        *,
        config: GenerationConfig | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
        **options: Any,
    ) -> list[GenerationResult]: ...

    @overload
    def generate(
        self,
        image: ImageInput | ImageFeatures,
        prompt: list[str] | tuple[str, ...],
        max_new_tokens: int | None = None,
        *,
        config: GenerationConfig | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
        **options: Any,
    ) -> list[GenerationResult]: ...

    def generate(
        self,
        image: ImageInput | ImageFeatures | Sequence[ImageInput | ImageFeatures],
        prompt: str | Sequence[str],
        max_new_tokens: int | None = None,
        *,
        config: GenerationConfig | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
        **options,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate (greedy by default). Lists of images and/or prompts run as one batch and return a list.

        ``options``: temperature, top_k, top_p, seed, repetition_penalty, stop, ignore_eos (GenerationConfig).
        ``max_new_tokens`` defaults to the task's (tasks.py). ``on_token`` sees every chosen token with its
        log-probability. Each result carries ``.timings`` and ``.finish_reason``.
        """
        batched = _is_batch(image) or not isinstance(prompt, str)
        images, prompt_list = _pair(image, prompt)
        config = GenerationConfig.from_options(config, max_new_tokens=max_new_tokens, **options)
        sequences = self._sequences(images, prompt_list, config)
        for event in run_to_completion(self.new_batch(), sequences):
            if on_token is not None:
                on_token(event)
        results = [sequence.result() for sequence in sequences]
        return results if batched else results[0]

    def stream_tokens(
        self,
        image: ImageInput | ImageFeatures,
        prompt: str,
        max_new_tokens: int | None = None,
        *,
        config: GenerationConfig | None = None,
        **options,
    ) -> Iterator[TokenEvent]:
        """Every token as it is chosen, with its log-probability; the last one has ``finish_reason`` set."""
        if _is_batch(image) or not isinstance(prompt, str):
            raise PromptError("stream_tokens() takes one image and one prompt; use generate() for batches.")
        config = GenerationConfig.from_options(config, max_new_tokens=max_new_tokens, **options)
        sequence = self._sequences([image], [prompt], config)[0]
        yield from run_to_completion(self.new_batch(), [sequence])

    def stream(
        self,
        image: ImageInput | ImageFeatures,
        prompt: str,
        max_new_tokens: int | None = None,
        *,
        config: GenerationConfig | None = None,
        **options,
    ) -> Iterator[str]:
        """Yield text pieces as they decode; their concatenation equals generate(...).text."""
        config = GenerationConfig.from_options(config, max_new_tokens=max_new_tokens, **options)
        text = StopText(self.decode, config.stop)
        sequence = None
        for event in self.stream_tokens(image, prompt, config=config):
            sequence = event.sequence
            piece = text.update(sequence.settled_ids)
            if piece:
                yield piece
        if sequence is not None:
            rest = text.flush(sequence.token_ids)
            if rest:
                yield rest

    def score(self, image: ImageInput | ImageFeatures, prompt: str, continuation_ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits [len(continuation)+1, vocab] in one decoder call.

        Row 0 predicts continuation[0] from the prefix; row t predicts the token after
        continuation[t-1]. The continuation is causal, the prefix bidirectional (docs/io-contract.md §4).
        """
        ids = self.prompt_ids(prompt)
        continuation = self._token_ids(continuation_ids)
        self._check_length(len(ids), len(continuation))
        features = self.encode_image(image)
        return teacher_forced_logits(self.decoder, ids, features.features, self.tokens, continuation)

    # ----------------------------------------------------------------- task helpers
    # ``options`` of every helper: GenerationConfig fields (temperature, top_k, …) as for generate().
    def caption(
        self,
        image: ImageInput | ImageFeatures,
        lang: str = "en",
        style: str = "caption",
        max_new_tokens: int | None = None,
        **options,
    ) -> str:
        """``style``: cap (short), caption (COCO-like) or describe (long)."""
        return self.generate(image, tasks.caption_prompt(lang, style), max_new_tokens, **options).text

    def answer(
        self,
        image: ImageInput | ImageFeatures,
        question: str,
        lang: str = "en",
        max_new_tokens: int | None = None,
        **options,
    ) -> str:
        return self.generate(image, tasks.TASKS["answer"].build(lang, question), max_new_tokens, **options).text

    def ocr(self, image: ImageInput | ImageFeatures, max_new_tokens: int | None = None, **options) -> str:
        return self.generate(image, tasks.TASKS["ocr"].build(), max_new_tokens, **options).text

    def detect(
        self,
        image: ImageInput | ImageFeatures,
        labels: str | Sequence[str],
        max_new_tokens: int | None = None,
        divisor: float = spec.LOC_DIVISOR_HF,
        iou_threshold: float | None = None,
        constrained: bool = True,
        **options,
    ) -> ParsedOutput:
        """Boxes in pixels of the original image (x0, y0, x1, y1) with scores, one object per instance.

        ``iou_threshold`` applies per-label non-maximum suppression. ``constrained`` (default): decoded under the
        grounding grammar (runtime/grammar.py): every object whole, labelled with one of ``labels``, none repeated.
        """
        prompt = tasks.TASKS["detect"].build(labels)
        return self.localize(image, prompt, max_new_tokens, divisor, iou_threshold, constrained=constrained, **options)

    def segment(
        self,
        image: ImageInput | ImageFeatures,
        labels: str | Sequence[str],
        max_new_tokens: int | None = None,
        divisor: float = spec.LOC_DIVISOR_HF,
        iou_threshold: float | None = None,
        soft_masks: bool = False,
        constrained: bool = True,
        **options,
    ) -> ParsedOutput:
        """Objects with boxes, scores, `<seg>` codes and ``.mask`` (H×W bool; float with ``soft_masks``).

        Without a mask decoder in the export, masks stay None and ``.notes`` says how to add one. ``constrained``:
        as for `detect`.
        """
        prompt = tasks.TASKS["segment"].build(labels)
        return self.localize(
            image, prompt, max_new_tokens, divisor, iou_threshold, soft_masks, constrained=constrained, **options
        )

    def localize(
        self,
        image: ImageInput | ImageFeatures,
        prompt: str,
        max_new_tokens: int | None = None,
        divisor: float = spec.LOC_DIVISOR_HF,
        iou_threshold: float | None = None,
        soft_masks: bool = False,
        constrained: bool | None = None,
        **options,
    ) -> ParsedOutput:
        """Run any prompt (e.g. a fine-tuned RefCOCO referring expression) and parse its output into objects.
        ``constrained`` None: under the grounding grammar for `detect` / `segment` prompts, freely otherwise."""
        if constrained is None:
            constrained = tasks.is_grounding(prompt)
        features = self.encode_image(image)
        result = self.generate(
            features,
            prompt,
            spec.DEFAULT_MAX_NEW_TOKENS_LOCALIZATION if max_new_tokens is None else max_new_tokens,
            constrained=constrained,
            **options,
        )
        return self.objects_from(result, features, divisor, iou_threshold, soft_masks)

    def objects_from(
        self,
        result: GenerationResult,
        features: ImageFeatures,
        divisor: float = spec.LOC_DIVISOR_HF,
        iou_threshold: float | None = None,
        soft_masks: bool = False,
    ) -> ParsedOutput:
        """Parse a generation into scored objects (and masks where `<seg>` codes and a decoder exist)."""
        loc_scores, label_scores = self._object_scores(result)
        parsed = parse_output(result.text, features.width, features.height, divisor, loc_scores, label_scores)
        if iou_threshold is not None:
            parsed.objects = non_max_suppression(parsed.objects, iou_threshold)
        with_codes = [obj for obj in parsed.objects if obj.seg_codes is not None]
        if with_codes and self.mask_decoder is None:
            parsed.notes.append(NO_MASK_DECODER_NOTE)
        elif with_codes and self.mask_decoder is not None:
            logits = self.mask_decoder.decode(np.array([obj.seg_codes for obj in with_codes]))
            for obj, mask_logits in zip(with_codes, logits):
                obj.mask = paste_mask(mask_logits, obj.box, features.width, features.height, soft_masks)
        return parsed

    def _object_scores(self, result: GenerationResult) -> tuple[list[float] | None, dict[int, float]]:
        """Each <loc> token's confidence, and each label's probability (the product of its tokens') by the index
        of the first <loc> of the run of <loc> / <seg> tokens before it (outputs.parse_output)."""
        if len(result.token_confidences) != len(result.token_ids):  # a result made elsewhere
            return None, {}
        loc0, seg0 = self.tokens.loc0, self.tokens.seg0
        separators = {self.tokenizer.token_to_id(piece) for piece in ("▁;", ";")} - {None}
        loc_scores: list[float] = []
        label_scores: dict[int, float] = {}
        run_start: int | None = None  # index of the first <loc> of the object being read
        in_label = False
        for token, confidence in zip(result.token_ids, result.token_confidences):
            is_loc = loc0 <= token < loc0 + spec.NUM_LOC_TOKENS
            if is_loc and (run_start is None or in_label):  # a box begins
                run_start, in_label = len(loc_scores), False
            if is_loc:
                loc_scores.append(confidence)
            elif seg0 <= token < seg0 + spec.NUM_SEG_TOKENS:
                continue
            elif token in separators:
                run_start, in_label = None, False
            elif run_start is not None:
                in_label = True
                label_scores[run_start] = label_scores.get(run_start, 1.0) * confidence
        return loc_scores, label_scores


def _is_batch(value) -> bool:
    return isinstance(value, (list, tuple))


def _pair(image, prompt) -> tuple[list, list[str]]:
    """Broadcast one image over many prompts or one prompt over many images."""
    images = list(image) if _is_batch(image) else [image]
    if isinstance(prompt, str):
        prompt_list = [prompt]
    elif isinstance(prompt, (list, tuple)):
        prompt_list = list(prompt)
    else:
        raise PromptError(f"A prompt must be a string or a list of strings, got {type(prompt).__name__}.")
    if not prompt_list:
        raise PromptError("No prompt given.")
    if len(images) == 1 and len(prompt_list) > 1:
        images = images * len(prompt_list)
    elif len(prompt_list) == 1 and len(images) > 1:
        prompt_list = prompt_list * len(images)
    if len(images) != len(prompt_list):
        raise PromptError(f"Got {len(images)} images for {len(prompt_list)} prompts; give one each, or one of either.")
    return images, prompt_list
