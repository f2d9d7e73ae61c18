"""`paligemma-edge export MODEL OUT`: checkpoint → vision + decoder ONNX, tokenizer, manifest; verified."""

from __future__ import annotations

import errno
import itertools
import json
import logging
import multiprocessing
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from ..runtime import errors, spec
from ..runtime import export_format as fmt
from ..runtime.errors import CheckpointError, PaliGemmaEdgeError
from ..runtime.export_format import (
    DecoderBackend,
    Graph,
    GraphEntry,
    LanguageModelConfig,
    Manifest,
    Precision,
    TokenIds,
    VisionConfig,
    checksum_files,
    load_manifest,
    sha256_file,
)
from ..runtime.output_dirs import atomic_output_dir, is_storage_full, storage_full_as_typed_error
from .attention import QUERY_CHUNK
from .checkpoint import RANDOM_WEIGHTS_MARKER, SEG_DECODER_FILE, load_checkpoint, resolve_checkpoint
from .graphs import export_decoder, export_vision, opset_for
from .seg_decoder import load_vae_npz, write_mask_decoder
from .verify import Reference, raise_if_failed, transformers_reference, verify_export

log = logging.getLogger(__name__)
REFERENCE_FILE = ".transformers_reference.npz"
STORAGE_FULL_EXIT = 28  # the torch stage's exit code when it ran out of room (ENOSPC's number)
ERROR_FILE = ".export_error.json"
ISOLATE_BYTES = 2 * 1024**3


@dataclass
class ExportSettings:
    dtype: Precision = Precision.FP32
    verify: bool = True
    verify_prompt: str = "caption en"
    verify_steps: int = 16
    seg_decoder: Path | None = None  # big_vision's vae-oid.npz → mask_decoder.onnx
    find_seg_decoder: bool = True  # without seg_decoder: the checkpoint directory's own vae-oid.npz, if it has one
    isolate: bool | None = None  # torch stage in a child process; None: when the checkpoint is > ISOLATE_BYTES
    backend: DecoderBackend = DecoderBackend.ONNXRUNTIME  # LLAMACPP: the decoder as GGUF (vision stays ONNX)
    query_chunk: int = QUERY_CHUNK  # attention takes the queries this many rows at a time (export/attention.py)


def _token_ids(tokenizer_path: Path, model) -> TokenIds:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))

    def require(token: str) -> int:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"The tokenizer has no {token} token; is this a PaliGemma tokenizer?")
        return token_id

    eos = model.generation_config.eos_token_id
    eos = [require(spec.EOS_TOKEN)] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return TokenIds(
        image=require(spec.IMAGE_TOKEN),
        bos=require(spec.BOS_TOKEN),
        eos=tuple(eos),
        pad=require(spec.PAD_TOKEN),
        loc0=require(spec.loc_token(0)),
        seg0=require(spec.seg_token(0)),
        newline=tokenizer.token_to_id(spec.PROMPT_END),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
    )


def _write_tokenizer(checkpoint: Path, processor, out: Path) -> Path:
    path = out / fmt.TOKENIZER_FILE
    source = checkpoint / fmt.TOKENIZER_FILE
    if source.is_file():
        shutil.copyfile(source, path)
    else:  # only a SentencePiece model: let transformers convert it once
        processor.tokenizer.backend_tokenizer.save(str(path))
    return path


def _versions(backend: DecoderBackend) -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from .. import __version__

    versions = {
        "paligemma_edge": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    if backend == DecoderBackend.LLAMACPP:
        from importlib.metadata import version

        versions["gguf"] = version("gguf")
    return versions


def _release_weights(model) -> None:
    """Drop every parameter's and buffer's storage, so onnxruntime never runs beside the torch weights."""
    import torch

    for tensor in itertools.chain(model.parameters(), model.buffers()):
        tensor.data = torch.empty(0, dtype=tensor.dtype)


def _torch_stage(model: str | Path, out: Path, settings: ExportSettings) -> tuple[Manifest, Reference | None]:
    """Everything that needs torch: transformers' reference outputs, both graphs, tokenizer, manifest."""
    steps = ["load checkpoint", "export vision", "export decoder", "tokenizer + manifest"]
    with tqdm(steps, desc="export", unit="step") as bar:
        bar.set_postfix_str(steps[0])
        checkpoint = resolve_checkpoint(model)
        # GGUF --dtype fp16: fp16 weights in the GGUF only; llama.cpp computes in f32, so torch (the reference and
        # the vision graph) stays fp32 and the f16 weights are judged against it
        torch_dtype = Precision.FP32 if settings.backend == DecoderBackend.LLAMACPP else settings.dtype
        hf_model, processor = load_checkpoint(checkpoint, torch_dtype)
        out.mkdir(parents=True, exist_ok=True)
        config = hf_model.config
        text_config = config.text_config
        vision_config = config.vision_config
        image_size = vision_config.image_size
        bar.update()

        reference = None
        if settings.verify:  # computed now, so the torch model can be freed before onnxruntime runs
            reference = transformers_reference(hf_model, processor, settings.verify_prompt, settings.verify_steps)

        bar.set_postfix_str(steps[1])
        attention_record = {"attention": "query-chunked", "query_chunk": settings.query_chunk}
        vision = export_vision(hf_model, image_size, out / fmt.VISION_FILE, settings.query_chunk)
        bar.update()
        bar.set_postfix_str(steps[3])
        tokenizer_path = _write_tokenizer(checkpoint, processor, out)
        token_ids = _token_ids(tokenizer_path, hf_model)
        bar.set_postfix_str(steps[2])
        if settings.backend == DecoderBackend.LLAMACPP:
            from .gguf_decoder import write_gguf_decoder

            decoder_file = fmt.GGUF_DECODER_FILE
            written = write_gguf_decoder(hf_model, tokenizer_path, token_ids, out / decoder_file, settings.dtype)
            decoder_entry = GraphEntry(decoder_file, settings.dtype, [], [], source=written)
        else:
            decoder_file = fmt.DECODER_FILE
            decoder = export_decoder(hf_model, out / decoder_file, settings.query_chunk)
            decoder_entry = GraphEntry(
                decoder_file,
                settings.dtype,
                decoder["inputs"],
                decoder["outputs"],
                source=attention_record,
                kv_cache=settings.dtype,
            )
        bar.update()

        bar.set_postfix_str(steps[3])
        layer_types = list(
            getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
        )
        files = [*fmt.graph_files(fmt.VISION_FILE), *fmt.graph_files(decoder_file), fmt.TOKENIZER_FILE]
        files = [name for name in files if (out / name).is_file()]
        manifest = Manifest(
            model_type="paligemma2" if text_config.model_type == "gemma2" else "paligemma",
            source=str(model),
            random_weights=(checkpoint / RANDOM_WEIGHTS_MARKER).is_file(),
            image_size=image_size,
            num_image_tokens=(image_size // vision_config.patch_size) ** 2,
            language_model=LanguageModelConfig(
                architecture=text_config.model_type,
                hidden_size=text_config.hidden_size,
                intermediate_size=text_config.intermediate_size,
                num_layers=text_config.num_hidden_layers,
                num_heads=text_config.num_attention_heads,
                num_kv_heads=text_config.num_key_value_heads,
                head_dim=text_config.head_dim,
                vocab_size=text_config.vocab_size,
                layer_types=layer_types,
                sliding_window=getattr(text_config, "sliding_window", None)
                if "sliding_attention" in layer_types
                else None,
                attn_logit_softcapping=getattr(text_config, "attn_logit_softcapping", None),
                final_logit_softcapping=getattr(text_config, "final_logit_softcapping", None),
                max_positions=getattr(text_config, "max_position_embeddings", None),
            ),
            vision=VisionConfig(
                hidden_size=vision_config.hidden_size,
                intermediate_size=vision_config.intermediate_size,
                num_layers=vision_config.num_hidden_layers,
                num_heads=vision_config.num_attention_heads,
                patch_size=vision_config.patch_size,
            ),
            tokens=token_ids,
            decoder_backend=settings.backend,
            graphs={
                Graph.VISION: GraphEntry(
                    fmt.VISION_FILE, torch_dtype, vision["inputs"], vision["outputs"], source=attention_record
                ),
                Graph.DECODER: decoder_entry,
            },
            sliding_window_rule=(
                "transformers: sliding layers see keys < window positions back; prefix pairs always see each other"
            ),
            versions={**_versions(settings.backend), "opset": opset_for(hf_model.dtype)},
            files=checksum_files(out, files),
        )
        manifest.write(out)
        if settings.seg_decoder is not None:
            manifest = attach_mask_decoder(out, settings.seg_decoder)
        bar.update()

        _release_weights(hf_model)
    return manifest, reference


def _torch_stage_in_child(model: str, out: str, settings: dict) -> None:
    """Entry point of the isolated torch stage (a spawned process): results and typed errors go to disk."""
    from ..runtime.console import configure_output

    configure_output()  # as quiet (or verbose) as the command that spawned it
    try:
        manifest, reference = _torch_stage(model, Path(out), ExportSettings(**settings))
        if reference is not None:
            reference.save(Path(out) / REFERENCE_FILE)
    except OSError as error:
        if is_storage_full(error):  # no room to write the error down: the exit code says it
            raise SystemExit(STORAGE_FULL_EXIT) from error
        raise
    except PaliGemmaEdgeError as error:
        (Path(out) / ERROR_FILE).write_text(json.dumps({"type": type(error).__name__, "message": str(error)}))
        raise SystemExit(2) from error


def _run_isolated(model: str | Path, out: Path, settings: ExportSettings) -> tuple[Manifest, Reference | None]:
    """Run the torch stage in a child process, so its memory is gone before onnxruntime verifies.

    (torch.export keeps references to the weights that no Python-level release reaches.)
    """
    out.mkdir(parents=True, exist_ok=True)
    for leftover in (REFERENCE_FILE, ERROR_FILE):
        (out / leftover).unlink(missing_ok=True)
    child = multiprocessing.get_context("spawn").Process(
        target=_torch_stage_in_child, args=(str(model), str(out), asdict(settings))
    )
    child.start()
    child.join()
    if (out / ERROR_FILE).is_file():
        error = json.loads((out / ERROR_FILE).read_text())
        (out / ERROR_FILE).unlink()
        raise getattr(errors, error["type"], errors.PaliGemmaEdgeError)(error["message"])
    if child.exitcode == STORAGE_FULL_EXIT:
        raise OSError(errno.ENOSPC, "the export's torch stage ran out of room")
    if child.exitcode != 0:
        raise errors.PaliGemmaEdgeError(f"the export's torch stage died (exit code {child.exitcode}); see above.")
    reference = Reference.load(out / REFERENCE_FILE) if settings.verify else None
    (out / REFERENCE_FILE).unlink(missing_ok=True)
    return load_manifest(out), reference


def _checkpoint_bytes(model: str | Path) -> int:
    return sum(p.stat().st_size for p in resolve_checkpoint(model).glob("*.safetensors"))


def export_model(
    model: str | Path, out_dir: str | Path, settings: ExportSettings | None = None, overwrite: bool = False
) -> Manifest:
    """Export, write the manifest, verify against transformers; returns the manifest.

    The export is built in a temporary directory beside ``out_dir`` and appears there only once verified;
    a non-empty ``out_dir`` is refused unless ``overwrite``.
    """
    settings = settings or ExportSettings()
    checkpoint = resolve_checkpoint(model)
    if settings.seg_decoder is None and settings.find_seg_decoder and (checkpoint / SEG_DECODER_FILE).is_file():
        settings = replace(settings, seg_decoder=checkpoint / SEG_DECODER_FILE)
        log.info("masks: %s, the checkpoint's own VQ-VAE (--no-seg-decoder leaves it out)", settings.seg_decoder)
    if settings.seg_decoder is not None:
        load_vae_npz(settings.seg_decoder)  # a bad npz fails now, not after the export
    with atomic_output_dir(out_dir, overwrite, sources=[checkpoint]) as work:
        manifest = _export_into(model, work, settings)
    manifest.directory = Path(out_dir)
    return manifest


def _export_into(model: str | Path, out: Path, settings: ExportSettings) -> Manifest:
    isolate = settings.isolate if settings.isolate is not None else _checkpoint_bytes(model) > ISOLATE_BYTES
    manifest, reference = _run_isolated(model, out, settings) if isolate else _torch_stage(model, out, settings)
    if reference is not None:
        with tqdm(total=1, desc="verify against transformers", unit="step") as bar:
            report = verify_export(reference, out, settings.dtype)
            manifest.verification = report.to_dict()
            manifest.write(out)
            raise_if_failed(report)
            bar.update()
    return manifest


def attach_mask_decoder(export_dir: str | Path, npz_path: str | Path) -> Manifest:
    """Add big_vision's VQ-VAE mask decoder (vae-oid.npz) to an export as mask_decoder.onnx.

    The graph is written to a hidden file beside its place and renamed over it, then the manifest is replaced the
    same way: a failure (a full disk included: `StorageFullError`) leaves the export as it was, with nothing extra.
    """
    export_dir, npz_path = Path(export_dir), Path(npz_path)
    manifest = load_manifest(export_dir)
    partial = export_dir / f".{fmt.MASK_DECODER_FILE}.partial"
    try:
        with storage_full_as_typed_error(partial, export_dir / fmt.MASK_DECODER_FILE):
            write_mask_decoder(npz_path, partial)
            partial.replace(export_dir / fmt.MASK_DECODER_FILE)  # the graph, then the manifest: each replaced whole
    finally:
        partial.unlink(missing_ok=True)
    manifest.graphs[Graph.MASK_DECODER] = GraphEntry(
        fmt.MASK_DECODER_FILE,
        Precision.FP32,
        [fmt.SEG_CODES],
        [fmt.MASK_LOGITS],
        source={"file": npz_path.name, "sha256": sha256_file(npz_path)},
    )
    manifest.files.update(checksum_files(export_dir, [fmt.MASK_DECODER_FILE]))
    manifest.write(export_dir)
    return manifest
