"""`PaliGemma`: load an export directory and generate with onnxruntime — no torch, no transformers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from . import prompts, spec
from .cache import KVCache
from .errors import CorruptExportError, GenerationError, ImageError, PromptError
from .images import ImageInput, load_image, preprocess
from .manifest import Manifest, load_manifest
from .masks import make_attn_mask, place_in_buffer, positions_from_valid, restrict_to_window
from .outputs import ParsedOutput, non_max_suppression, parse_output
from .segmentation import HOW_TO_ADD, MaskDecoder, paste_mask

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class ImageFeatures:
    """Projected image features of one image: encode once, prompt many times."""

    features: np.ndarray  # [num_image_tokens, hidden]
    width: int
    height: int


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    token_logprobs: list[float] = field(default_factory=list)  # log p of each generated token
    prompt: str = ""


@dataclass
class _Sequence:
    """Per-token bookkeeping of a batch (cache + current tokens) from which masks are built."""

    mask_ar: np.ndarray  # [B, K] 0 = prefix (bidirectional), 1 = suffix (causal)
    valid: np.ndarray  # [B, K] False = padding
    positions: np.ndarray  # [B, K] 1-indexed positions

    def extend(self, mask_ar: np.ndarray, valid: np.ndarray) -> None:
        last = self.positions[:, -1:] if self.positions.shape[1] else np.zeros((len(valid), 1), np.int64)
        steps = np.cumsum(valid, axis=1)
        self.positions = np.concatenate([self.positions, np.where(valid, last + steps, 1)], axis=1)
        self.mask_ar = np.concatenate([self.mask_ar, mask_ar], axis=1)
        self.valid = np.concatenate([self.valid, valid], axis=1)


def _session(
    path: Path, providers: list | None, threads: int | None, prepack: bool, memory_arena: bool = True
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = memory_arena
    if threads:
        options.intra_op_num_threads = threads
    if not prepack:
        # Prepacking would copy the tied [hidden, vocab] table next to the one the Gather reads.
        options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises several unrelated types for a bad file
        raise CorruptExportError(f"onnxruntime cannot load {path}: {error}. Re-run the export.") from error


class PaliGemma:
    """A PaliGemma export, ready to caption, answer, read, detect and segment."""

    def __init__(
        self,
        manifest: Manifest,
        vision: ort.InferenceSession,
        decoder: ort.InferenceSession,
        tokenizer: Tokenizer,
        mask_decoder: MaskDecoder | None = None,
    ):
        self.manifest = manifest
        self.mask_decoder = mask_decoder
        self.vision = vision
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.tokens = manifest.tokens
        text = manifest.text
        self.num_layers = int(text["num_layers"])
        self.kv_heads = int(text["num_kv_heads"])
        self.head_dim = int(text["head_dim"])
        self.hidden_size = int(text["hidden_size"])
        self.sliding_window = text.get("sliding_window")
        self._decoder_inputs = {i.name: i for i in decoder.get_inputs()}
        self._cache_names = [name for name in self._decoder_inputs if name.startswith("past_key_values.")]
        self._has_sliding = "sliding_attention_mask" in self._decoder_inputs
        self._embed_dtype = _ORT_TYPES[self._decoder_inputs["image_embeds"].type]
        self._cache_dtype = _ORT_TYPES[self._decoder_inputs[self._cache_names[0]].type]
        self._check_graphs()

    @classmethod
    def load(
        cls,
        path: str | Path,
        providers: list | None = None,
        threads: int | None = None,
        verify_checksums: bool = True,
        memory_arena: bool = True,
    ) -> PaliGemma:
        """Open an export directory made by `paligemma-edge export`.

        ``memory_arena=False`` returns onnxruntime's activation memory to the OS after each call: at 896 px
        the prefill's peak RSS drops (int4: 8.0 → 6.3 GB) for ~15 % slower prefill and decode steps.
        """
        manifest = load_manifest(path)
        manifest.verify_files(checksums=verify_checksums)
        arena = memory_arena
        vision = _session(manifest.path(manifest.graph("vision")["file"]), providers, threads, True, arena)
        decoder_graph = manifest.graph("decoder")
        tied = decoder_graph.get("tied_table", True)  # quantized LM heads need prepacking, tied tables must avoid it
        decoder = _session(manifest.path(decoder_graph["file"]), providers, threads, not tied, arena)
        try:
            tokenizer = Tokenizer.from_file(str(manifest.path(manifest.data["tokenizer"])))
        except Exception as error:
            raise CorruptExportError(f"Cannot read the tokenizer of {path}: {error}. Re-run the export.") from error
        mask_graph = manifest.data["graphs"].get("mask_decoder")
        mask_decoder = MaskDecoder.from_onnx(manifest.path(mask_graph["file"]), providers) if mask_graph else None
        return cls(manifest, vision, decoder, tokenizer, mask_decoder)

    def _check_graphs(self) -> None:
        expected = set(self.manifest.graph("decoder")["inputs"])
        if expected != set(self._decoder_inputs):
            raise CorruptExportError(
                f"decoder graph inputs {sorted(self._decoder_inputs)} differ from the manifest's {sorted(expected)}; "
                "the export directory mixes files from different exports. Re-run the export."
            )
        if len(self._cache_names) != 2 * self.num_layers:
            raise CorruptExportError("The decoder's KV-cache inputs do not match the manifest's layer count.")

    # ----------------------------------------------------------------- images
    def encode_image(self, image: ImageInput | ImageFeatures) -> ImageFeatures:
        """Run the vision graph once; pass the result to generate() in place of the image."""
        return self.encode_images([image])[0]

    def encode_images(self, images: Sequence[ImageInput | ImageFeatures]) -> list[ImageFeatures]:
        first_of = {id(img): i for i, img in reversed(list(enumerate(images)))}  # one encode per object
        todo = [i for i, img in enumerate(images) if first_of[id(img)] == i and not isinstance(img, ImageFeatures)]
        encoded: dict[int, ImageFeatures] = {}
        if todo:
            loaded = [load_image(images[i]) for i in todo]
            pixels = np.stack([preprocess(image, self.manifest.image_size) for image in loaded])
            (features,) = self.vision.run(None, {self.vision.get_inputs()[0].name: pixels})
            for row, (i, image) in enumerate(zip(todo, loaded)):
                encoded[i] = ImageFeatures(features[row], image.width, image.height)
        return [img if isinstance(img, ImageFeatures) else encoded[first_of[id(img)]] for img in images]

    # ----------------------------------------------------------------- prompts
    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the prefix for one prompt, exactly as PaliGemmaProcessor builds them."""
        text = prompts.prefix_text(prompt, self.manifest.num_image_tokens)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if ids.count(self.tokens.image) != self.manifest.num_image_tokens:
            raise CorruptExportError("The tokenizer does not encode <image> as one token; the export is broken.")
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # ----------------------------------------------------------------- decoder calls
    def _run_decoder(
        self, ids: np.ndarray, embeds: np.ndarray, seq: _Sequence, cache: KVCache, logits_positions: np.ndarray
    ) -> np.ndarray:
        num_queries = ids.shape[1]
        mask = make_attn_mask(seq.mask_ar, seq.valid, num_queries)
        feeds = {
            "input_ids": ids.astype(np.int64),
            "image_embeds": embeds,
            "position_ids": seq.positions[:, -num_queries:],
            "logits_positions": logits_positions.astype(np.int64),
            "attention_mask": place_in_buffer(mask, cache.capacity),
            **cache.feeds(),
        }
        if self._has_sliding:
            window = restrict_to_window(mask, seq.positions, seq.mask_ar, int(self.sliding_window))
            feeds["sliding_attention_mask"] = place_in_buffer(window, cache.capacity)
        logits, *new_keys_values = self.decoder.run(None, feeds)
        cache.append(new_keys_values)
        return logits

    def _prefill(
        self, features: list[ImageFeatures], prompt_ids: list[list[int]], suffix_ids: list[list[int]] | None = None
    ):
        """Left-pad the prefixes (+ optional suffixes), run them in one call, return logits and state."""
        batch = len(prompt_ids)
        suffix_ids = suffix_ids or [[] for _ in range(batch)]
        rows = [p + s for p, s in zip(prompt_ids, suffix_ids)]
        length = max(map(len, rows))
        ids = np.full((batch, length), self.tokens.pad, dtype=np.int64)
        mask_ar = np.zeros((batch, length), dtype=np.int32)
        valid = np.zeros((batch, length), dtype=bool)
        embeds = np.zeros((batch, length, self.hidden_size), dtype=self._embed_dtype)
        for b, (prefix, suffix) in enumerate(zip(prompt_ids, suffix_ids)):
            start = length - len(prefix) - len(suffix)
            ids[b, start:] = prefix + suffix
            valid[b, start:] = True
            mask_ar[b, start + len(prefix) :] = 1
            slots = np.zeros(length, dtype=bool)
            slots[start : start + len(prefix)] = np.asarray(prefix) == self.tokens.image
            ids[b, slots] = spec.IMAGE_SLOT
            embeds[b, slots] = features[b].features
        seq = _Sequence(mask_ar, valid, positions_from_valid(valid))
        cache = KVCache(self._cache_names, batch, self.kv_heads, self.head_dim, self._cache_dtype)
        num_scored = max(map(len, suffix_ids)) + 1
        logits_positions = np.tile(np.arange(length - num_scored, length), (batch, 1))
        logits = self._run_decoder(ids, embeds, seq, cache, logits_positions)
        return logits, seq, cache

    def _greedy(
        self, features: list[ImageFeatures], prompt_list: list[str], max_new_tokens: int, stop_at_eos: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (next token ids [B], their log-probs [B]) per step; stops when every row hit eos
        (``stop_at_eos=False``: always ``max_new_tokens`` steps, as benchmarks need)."""
        if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
        ids = [self.prompt_ids(p) for p in prompt_list]
        logits, seq, cache = self._prefill(features, ids)
        batch = len(ids)
        eos = np.array(self.tokens.eos)
        finished = np.zeros(batch, dtype=bool)
        step_embeds = np.zeros((batch, 1, self.hidden_size), dtype=self._embed_dtype)
        last_position = np.zeros((batch, 1), dtype=np.int64)
        for step in range(max_new_tokens):
            step_logits = logits[:, -1, :].astype(np.float32)
            next_ids = step_logits.argmax(axis=-1)
            top = step_logits[np.arange(batch), next_ids]
            logsumexp = top + np.log(np.exp(step_logits - top[:, None]).sum(axis=-1))
            yield next_ids, top - logsumexp
            finished |= np.isin(next_ids, eos)
            if (stop_at_eos and finished.all()) or step == max_new_tokens - 1:
                return
            seq.extend(np.ones((batch, 1), np.int32), np.ones((batch, 1), bool))
            logits = self._run_decoder(next_ids[:, None], step_embeds, seq, cache, last_position)

    # ----------------------------------------------------------------- public generation API
    def generate(
        self,
        image: ImageInput | ImageFeatures | Sequence[ImageInput | ImageFeatures],
        prompt: str | Sequence[str],
        max_new_tokens: int = spec.DEFAULT_MAX_NEW_TOKENS,
    ) -> GenerationResult | list[GenerationResult]:
        """Greedy generation. Lists of images and/or prompts run as one batch and return a list."""
        batched = _is_batch(image) or not isinstance(prompt, str)
        images, prompt_list = _pair(image, prompt)
        features = self._features_for(images)
        steps = list(self._greedy(features, prompt_list, max_new_tokens))
        results = []
        for b, text_prompt in enumerate(prompt_list):
            token_ids: list[int] = []
            logprobs: list[float] = []
            for next_ids, step_logprobs in steps:
                if int(next_ids[b]) in self.tokens.eos:
                    break
                token_ids.append(int(next_ids[b]))
                logprobs.append(float(step_logprobs[b]))
            results.append(GenerationResult(self.decode(token_ids), token_ids, logprobs, text_prompt))
        return results if batched else results[0]

    def stream(
        self,
        image: ImageInput | ImageFeatures,
        prompt: str,
        max_new_tokens: int = spec.DEFAULT_MAX_NEW_TOKENS,
    ) -> Iterator[str]:
        """Yield text pieces as they decode; their concatenation equals generate(...).text."""
        if _is_batch(image) or not isinstance(prompt, str):
            raise PromptError("stream() takes one image and one prompt; use generate() for batches.")
        features = self._features_for([image])
        token_ids: list[int] = []
        emitted = ""
        for next_ids, _ in self._greedy(features, [prompt], max_new_tokens):
            if int(next_ids[0]) in self.tokens.eos:
                break
            token_ids.append(int(next_ids[0]))
            text = self.decode(token_ids)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte token
                continue
            if text.startswith(emitted) and len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text
        final = self.decode(token_ids)
        if final != emitted and final.startswith(emitted):
            yield final[len(emitted) :]

    def score(self, image: ImageInput | ImageFeatures, prompt: str, continuation_ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits [len(continuation)+1, vocab] in one decoder call.

        Row 0 predicts continuation[0] from the prefix; row t predicts the token after
        continuation[t-1]. The continuation is causal, the prefix bidirectional (spec §3.4).
        """
        features = self._features_for([image])
        logits, _, _ = self._prefill(features, [self.prompt_ids(prompt)], [list(map(int, continuation_ids))])
        return logits[0].astype(np.float32)

    def _features_for(self, images: list) -> list[ImageFeatures]:
        if not images:
            raise ImageError("No image given.")
        return self.encode_images(images)

    # ----------------------------------------------------------------- task helpers
    def caption(
        self,
        image: ImageInput | ImageFeatures,
        lang: str = "en",
        style: str = "caption",
        max_new_tokens: int = spec.DEFAULT_MAX_NEW_TOKENS,
    ) -> str:
        return self.generate(image, prompts.caption_prompt(lang, style), max_new_tokens).text

    def answer(
        self,
        image: ImageInput | ImageFeatures,
        question: str,
        lang: str = "en",
        max_new_tokens: int = spec.DEFAULT_MAX_NEW_TOKENS,
    ) -> str:
        return self.generate(image, prompts.answer_prompt(question, lang), max_new_tokens).text

    def ocr(self, image: ImageInput | ImageFeatures, max_new_tokens: int = spec.DEFAULT_MAX_NEW_TOKENS) -> str:
        return self.generate(image, prompts.ocr_prompt(), max_new_tokens).text

    def detect(
        self,
        image: ImageInput | ImageFeatures,
        labels: str | Sequence[str],
        max_new_tokens: int = spec.DEFAULT_MAX_NEW_TOKENS_LOCALIZATION,
        divisor: float = spec.LOC_DIVISOR_HF,
        iou_threshold: float | None = None,
    ) -> ParsedOutput:
        """Boxes in pixels of the original image (x0, y0, x1, y1) with scores, one object per instance.

        ``iou_threshold`` applies per-label non-maximum suppression.
        """
        return self.localize(image, prompts.detect_prompt(labels), max_new_tokens, divisor, iou_threshold)

    def segment(
        self,
        image: ImageInput | ImageFeatures,
        labels: str | Sequence[str],
        max_new_tokens: int = spec.DEFAULT_MAX_NEW_TOKENS_LOCALIZATION,
        divisor: float = spec.LOC_DIVISOR_HF,
        iou_threshold: float | None = None,
        soft_masks: bool = False,
    ) -> ParsedOutput:
        """Objects with boxes, scores, `<seg>` codes and ``.mask`` (H×W bool; float with ``soft_masks``).

        Without a mask decoder in the export, masks stay None and ``.notes`` says how to add one.
        """
        return self.localize(image, prompts.segment_prompt(labels), max_new_tokens, divisor, iou_threshold, soft_masks)

    def localize(
        self,
        image: ImageInput | ImageFeatures,
        prompt: str,
        max_new_tokens: int = spec.DEFAULT_MAX_NEW_TOKENS_LOCALIZATION,
        divisor: float = spec.LOC_DIVISOR_HF,
        iou_threshold: float | None = None,
        soft_masks: bool = False,
    ) -> ParsedOutput:
        """Run any prompt (e.g. a fine-tuned RefCOCO referring expression) and parse its output into objects."""
        features = self.encode_image(image)
        result = self.generate(features, prompt, max_new_tokens)
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
        loc_ids = range(self.tokens.loc0, self.tokens.loc0 + spec.NUM_LOC_TOKENS)
        loc_logprobs = [lp for t, lp in zip(result.token_ids, result.token_logprobs) if t in loc_ids]
        parsed = parse_output(result.text, features.width, features.height, divisor, loc_logprobs)
        if iou_threshold is not None:
            parsed.objects = non_max_suppression(parsed.objects, iou_threshold)
        with_codes = [obj for obj in parsed.objects if obj.seg_codes is not None]
        if with_codes and self.mask_decoder is None:
            parsed.notes.append(HOW_TO_ADD)
        elif with_codes:
            logits = self.mask_decoder.decode(np.array([obj.seg_codes for obj in with_codes]))
            for obj, mask_logits in zip(with_codes, logits):
                obj.mask = paste_mask(mask_logits, obj.box, features.width, features.height, soft_masks)
        return parsed


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
