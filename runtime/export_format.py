"""The export directory's format, in one place: file names, graph input/output names, the manifest schema.

Export and quantize write it, the runtime, quant and bench read it; nothing else spells these names.
The manifest is `manifest.json`, a versioned set of dataclasses (`Manifest.to_dict` / `Manifest.from_dict`).
The graphs' contract is described in docs/io-contract.md §10.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .checks import is_int, is_number
from .errors import ChecksumMismatchError, CorruptExportError, ExportNotFoundError, OutputPathError
from .output_dirs import new_file_mode

if TYPE_CHECKING:
    from .recipes import Quantization

FORMAT_NAME = "paligemma-edge"
# v2: the decoder reads a KV buffer and returns only the new tokens' keys/values.
# v3: "text" renamed "language_model", "decoder_backend" recorded (v2 manifests are read as v3).
FORMAT_VERSION = 3
OLDEST_READABLE_VERSION = 2

MANIFEST_FILE = "manifest.json"
VISION_FILE = "vision.onnx"
DECODER_FILE = "decoder.onnx"
GGUF_DECODER_FILE = "decoder.gguf"  # the llama.cpp backend's decoder
# default query rows per attention chunk in exported graphs (export/attention.py): 67 MB of scores at 896 px
QUERY_CHUNK = 512
TOKENIZER_FILE = "tokenizer.json"
MASK_DECODER_FILE = "mask_decoder.onnx"
EXTERNAL_DATA_SUFFIX = ".data"


class NamedValue(str, Enum):
    """A closed set whose members are the very strings manifests hold and command lines take."""

    def __str__(self) -> str:
        return self.value


class Graph(NamedValue):
    """The graphs an export directory can hold (`Manifest.graphs` keys)."""

    VISION = "vision"
    DECODER = "decoder"
    MASK_DECODER = "mask_decoder"


class DecoderBackend(NamedValue):
    """What runs an export's decoder (`Manifest.decoder_backend`); the vision graph is always ONNX."""

    ONNXRUNTIME = "onnxruntime"
    LLAMACPP = "llamacpp"


class Precision(NamedValue):
    """What a graph's weights (or a KV cache) hold."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


# what an ONNX decoder's KV cache holds → onnxruntime's type of the cache inputs
KV_CACHE_TYPES = {Precision.FP32: "tensor(float)", Precision.FP16: "tensor(float16)"}

# vision graph: pixel_values [B, 3, R, R] float32 → image_features [B, N, hidden]
PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"

# decoder graph inputs (the cache buffers follow) and outputs
INPUT_IDS = "input_ids"
IMAGE_EMBEDS = "image_embeds"
POSITION_IDS = "position_ids"
LOGITS_POSITIONS = "logits_positions"
ATTENTION_MASK = "attention_mask"
SLIDING_ATTENTION_MASK = "sliding_attention_mask"
LOGITS = "logits"
VOCAB_ROWS = "vocab_rows"  # int64 [K] sorted ids: logits for these only; empty: every id (export/shortlisted_head.py)
DECODER_INPUTS = (INPUT_IDS, IMAGE_EMBEDS, POSITION_IDS, LOGITS_POSITIONS, ATTENTION_MASK)

# mask decoder graph: codes [B, 16] int64 → mask_logits [B, 64, 64]
SEG_CODES = "codes"
MASK_LOGITS = "mask_logits"

# initializers of an untied embedding lookup (quantize writes them; bench leaves them out of per-token bytes)
EMBED_ROWS_PREFIX = "embed_rows."
# initializers only prompts read (the int4-fast-prefill recipe's int8 body; bench leaves them out of per-token bytes)
PREFILL_WEIGHTS_PREFIX = "prefill."

IMAGE_SLOT = -1  # a negative decoder input id marks a position filled from image_embeds
_HASH_CHUNK = 16 * 1024 * 1024


def cache_input_names(num_layers: int) -> list[str]:
    """The KV buffers the decoder reads, layer by layer, key before value."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def cache_output_names(num_layers: int) -> list[str]:
    """This call's keys/values only (not past + new): the runtime writes them into its buffer."""
    return [f"new.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def external_data(graph_file: str) -> str:
    return graph_file + EXTERNAL_DATA_SUFFIX


def graph_files(graph_file: str) -> list[str]:
    """A graph and its external weights file."""
    return [graph_file, external_data(graph_file)]


# ---------------------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class LanguageModelConfig:
    """Hyper-parameters of the Gemma / Gemma 2 decoder."""

    architecture: str  # "gemma" or "gemma2"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    layer_types: list[str]
    sliding_window: int | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    max_positions: int | None = None


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int


@dataclass(frozen=True)
class TokenIds:
    """Special token ids, read from the checkpoint's tokenizer (never hard-coded)."""

    image: int
    bos: int
    eos: tuple[int, ...]
    pad: int
    loc0: int
    seg0: int
    newline: int | None = None
    vocab_size: int | None = None


@dataclass
class GraphEntry:
    file: str
    dtype: str
    inputs: list[str]
    outputs: list[str]
    tied_table: bool = True  # decoder: one table serves the lookup and the LM head (opened without prepacking)
    lm_head: str | None = None  # decoder of a quantized export: precisions of the LM head and the lookup
    embeddings: str | None = None
    source: dict[str, Any] | None = None  # mask decoder: the npz it was built from; GGUF decoder: what was folded
    kv_cache: str | None = None  # ONNX decoder: what its KV cache holds, "fp32" or "fp16" (older manifests: unset)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """manifest.json of an export directory. ``directory`` is where it was read from (not serialized)."""

    model_type: str  # "paligemma" or "paligemma2"
    source: str
    image_size: int
    num_image_tokens: int
    language_model: LanguageModelConfig
    vision: VisionConfig
    tokens: TokenIds
    graphs: dict[str, GraphEntry]
    files: dict[str, FileEntry] = field(default_factory=dict)
    tokenizer: str = TOKENIZER_FILE
    decoder_backend: DecoderBackend = DecoderBackend.ONNXRUNTIME
    random_weights: bool = False
    versions: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] | None = None
    source_verification: dict[str, Any] | None = None
    quantization: Quantization | None = None
    quality: dict[str, Any] = field(default_factory=dict)
    sliding_window_rule: str | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    directory: Path | None = field(default=None, compare=False)

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_FILE) -> Manifest:
        """Validate and parse; every problem is a CorruptExportError naming the field."""
        if not isinstance(data, dict):
            raise CorruptExportError(f"{where} does not hold a JSON object; re-run the export.")
        version = data.get("format_version")
        if data.get("format") != FORMAT_NAME or not isinstance(version, int) or isinstance(version, bool):
            raise CorruptExportError(
                f"{where} is not a {FORMAT_NAME!r} manifest with an integer format_version "
                f"(format {data.get('format')!r}, format_version {version!r}); re-run the export."
            )
        if version > FORMAT_VERSION:
            raise CorruptExportError(
                f"{where} is {FORMAT_NAME!r} v{version}; this paligemma-edge reads up to v{FORMAT_VERSION}. "
                "Upgrade paligemma-edge or re-export."
            )
        if version < OLDEST_READABLE_VERSION:
            raise CorruptExportError(
                f"{where} is {FORMAT_NAME!r} v{version}, made by an older paligemma-edge whose decoder graph has "
                f"another KV-cache interface; re-run the export (this version reads v{OLDEST_READABLE_VERSION}"
                f"–v{FORMAT_VERSION})."
            )
        data = dict(data)
        if version == 2 and "text" in data:  # v2 → v3: same graphs, renamed key
            data["language_model"] = data.pop("text")
        try:
            from .recipes import Quantization  # recipes name their precisions with this module's enums

            tokens = dict(_require(data, "tokens", dict, where))
            tokens["eos"] = tuple(tokens.get("eos", ()))
            manifest = cls(
                **{
                    **_plain(data, cls, where),
                    "language_model": _build(LanguageModelConfig, _require(data, "language_model", dict, where)),
                    "vision": _build(VisionConfig, _require(data, "vision", dict, where)),
                    "tokens": _build(TokenIds, tokens),
                    "graphs": {k: _build(GraphEntry, v) for k, v in _require(data, "graphs", dict, where).items()},
                    "files": {k: _build(FileEntry, v) for k, v in _require(data, "files", dict, where).items()},
                    "decoder_backend": _backend(data.get("decoder_backend", DecoderBackend.ONNXRUNTIME)),
                    "quantization": Quantization.from_dict(data["quantization"]) if data.get("quantization") else None,
                    "format_version": FORMAT_VERSION,
                }
            )
            _check_types(manifest, skip=("directory", "decoder_backend", "quantization"))
            lm = manifest.language_model
            if min(lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.head_dim, lm.hidden_size, lm.vocab_size) < 1:
                raise ValueError("language_model sizes must be positive")
            return manifest
        except CorruptExportError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError) as error:
            raise CorruptExportError(f"{where} is malformed ({error}); re-run the export.") from error

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "directory"}
        for key in ("language_model", "vision", "tokens"):
            data[key] = asdict(data[key])
        data["tokens"]["eos"] = list(self.tokens.eos)
        data["graphs"] = {k: {n: v for n, v in asdict(g).items() if v is not None} for k, g in self.graphs.items()}
        data["files"] = {k: asdict(v) for k, v in self.files.items()}
        data["quantization"] = self.quantization.to_dict() if self.quantization else None
        return {k: v for k, v in data.items() if v is not None}

    def write(self, directory: str | Path | None = None) -> Path:
        """Write manifest.json atomically (a temporary file renamed over the old one)."""
        directory = Path(directory) if directory is not None else self.home
        path = directory / MANIFEST_FILE
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{MANIFEST_FILE}.")
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(self.to_dict(), indent=2) + "\n")
            os.chmod(tmp, new_file_mode())  # mkstemp's file is private
            os.replace(tmp, path)
        except OSError as error:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise OutputPathError(f"cannot write {path}: {error.strerror or error}.") from error
        self.directory = directory
        return path

    # ------------------------------------------------------------------ use
    @property
    def home(self) -> Path:
        """The export directory this manifest was read from (or written to)."""
        if self.directory is None:
            raise CorruptExportError("this manifest was not read from a directory")
        return self.directory

    def path(self, name: str) -> Path:
        return self.home / name

    def graph(self, name: Graph) -> GraphEntry:
        if name not in self.graphs:
            raise CorruptExportError(f"the manifest lists no {name!r} graph; re-run the export.")
        return self.graphs[name]

    @property
    def is_quantized(self) -> bool:
        return self.quantization is not None

    @property
    def precision(self) -> str:
        """The recipe name of a quantized export, else the decoder's dtype."""
        return self.quantization.recipe.name if self.quantization else self.graph(Graph.DECODER).dtype

    def graph_bytes(self, name: Graph) -> int:
        return sum(self.files[f].bytes for f in graph_files(self.graph(name).file) if f in self.files)

    def summary(self) -> str:
        """A few human-readable lines (what `paligemma-edge info` prints)."""
        lm = self.language_model
        lines = [
            f"{self.model_type} {self.image_size}px, {self.num_image_tokens} image tokens, from {self.source}",
            f"decoder ({self.decoder_backend}): {lm.architecture} {lm.num_layers} layers, hidden {lm.hidden_size}, "
            f"{lm.num_heads} heads / {lm.num_kv_heads} kv, head_dim {lm.head_dim}, vocab {lm.vocab_size}",
            "graphs: "
            + ", ".join(
                f"{name} {g.file} ({g.dtype}{f', KV cache {g.kv_cache}' if g.kv_cache else ''})"
                for name, g in self.graphs.items()
            ),
            "files: " + ", ".join(f"{k} {v.bytes / 1e6:.1f} MB" for k, v in self.files.items()),
        ]
        if self.quantization:
            lines.append(self.quantization.summary())
        for reference, quality in self.quality.items():
            lines.append(
                f"quality vs {reference}: top-1 {quality['top1_agreement']:.4f}, KL {quality['mean_kl']:.2e}, "
                f"greedy exact {quality['greedy_exact_match']:.2f}"
                + (" (random weights)" if quality["random_weights"] else "")
            )
        if self.verification:
            v = self.verification
            lines.append(
                f"verification: {'passed' if v['passed'] else 'FAILED'}: greedy tokens agree={v['tokens_agree']} "
                f"over {len(v['hf_tokens'])} tokens, max |Δlogit| {v['max_abs_logit_diff']:.2e} "
                f"(tolerance {v['tolerance']:.2e})"
            )
        return "\n".join(lines)

    def verify_files(self, checksums: bool | str = True) -> None:
        """Raise if a listed file is missing, has the wrong size or (``checksums``) the wrong sha256.

        ``checksums=True`` hashes each file once per version: a file whose path, size, mtime and inode match a
        record of an earlier successful check (in the user's cache, see `verified_cache_path`) is not hashed
        again. ``checksums="full"`` always hashes; ``False`` checks only presence and sizes.
        """
        for name, entry in self.files.items():
            path = self.path(name)
            if not path.is_file():
                raise ExportNotFoundError(f"{path} is listed in the manifest but missing; re-run the export.")
            if path.stat().st_size != entry.bytes:
                raise ChecksumMismatchError(
                    f"{path} has {path.stat().st_size} bytes, the manifest says {entry.bytes}: the file is "
                    "truncated or was replaced; re-run the export (or copy the directory again)."
                )
        if not checksums:
            return
        verified = {} if checksums == "full" else _read_verified()
        todo = [name for name, entry in self.files.items() if verified.get(_file_key(self.path(name))) != entry.sha256]
        actual = checksum_files(self.home, todo, desc="verifying export")
        for name in todo:
            if actual[name].sha256 != self.files[name].sha256:
                raise ChecksumMismatchError(
                    f"{self.path(name)} does not match the sha256 in {MANIFEST_FILE}: the file is corrupt or "
                    "was modified; re-run the export, or load with verify_checksums=False if you changed it on "
                    "purpose."
                )
        if todo:
            _record_verified({_file_key(self.path(name)): actual[name].sha256 for name in todo})


def _backend(value: Any) -> DecoderBackend:
    try:
        return DecoderBackend(value)
    except ValueError:
        raise CorruptExportError(
            f"this export's decoder runs on {value!r}, which this paligemma-edge does not support (it has: "
            f"{', '.join(DecoderBackend)}). Upgrade paligemma-edge or re-export."
        ) from None


def _require(data: dict, key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise CorruptExportError(f"{where} lacks the required key {key!r}; re-run the export.")
    if not isinstance(data[key], kind):
        raise CorruptExportError(f"{where}: {key!r} must be a {kind.__name__}; re-run the export.")
    return data[key]


def _build(cls: type, values: Any) -> Any:
    """A schema dataclass from a JSON object: unknown keys ignored, missing or mistyped ones rejected."""
    if not isinstance(values, dict):
        raise TypeError(f"{cls.__name__} must be a JSON object, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    instance = cls(**{k: v for k, v in values.items() if k in known})  # TypeError names a missing field
    _check_types(instance)
    return instance


_TYPE_CHECKS = {
    "int": is_int,
    "float": is_number,
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "tuple[int, ...]": lambda v: isinstance(v, tuple) and all(is_int(x) for x in v),
    "dict[str, Any]": lambda v: isinstance(v, dict),
}


def _check_types(instance: Any, skip: tuple[str, ...] = ()) -> None:
    """Check each field against its annotation (the JSON-level types the schema uses)."""
    for f in fields(instance):
        if f.name in skip or not isinstance(f.type, str):
            continue
        annotation = f.type.removesuffix(" | None")
        value = getattr(instance, f.name)
        check = _TYPE_CHECKS.get(annotation)
        if check is None or (value is None and f.type.endswith("| None")):
            continue
        if not check(value):
            raise TypeError(f"{type(instance).__name__}.{f.name} must be {annotation}, got {value!r}")


_NESTED = {
    "language_model",
    "vision",
    "tokens",
    "graphs",
    "files",
    "decoder_backend",
    "quantization",
    "format_version",
    "directory",
}


def _plain(data: dict, cls: type, where: str) -> dict:
    """The scalar top-level fields, required ones checked."""
    out = {}
    for f in fields(cls):
        if f.name in _NESTED:
            continue
        if f.name in data:
            out[f.name] = data[f.name]
    for required in ("model_type", "source", "image_size", "num_image_tokens"):
        if required not in out:
            raise CorruptExportError(f"{where} lacks the required key {required!r}; re-run the export.")
    for name in ("image_size", "num_image_tokens"):
        if not is_int(out[name]) or out[name] < 1:
            raise CorruptExportError(f"{where}: {name!r} must be a positive integer; re-run the export.")
    return out


# ---------------------------------------------------------------------------------------------- files


def sha256_file(path: Path, progress: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()


def checksum_files(directory: Path, names: list[str], desc: str = "sha256") -> dict[str, FileEntry]:
    """{name: FileEntry} for files in ``directory``, with one progress bar over all bytes."""
    paths = [Path(directory) / name for name in names]
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=total < 256 << 20) as bar:
        return {p.name: FileEntry(sha256_file(p, bar), p.stat().st_size) for p in paths}


def verified_cache_path() -> Path:
    """Where checksums already verified are remembered: $PALIGEMMA_EDGE_CACHE, else the user's cache dir."""
    root = os.environ.get("PALIGEMMA_EDGE_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "paligemma-edge"
    )
    return Path(root) / "verified-files.json"


def _file_key(path: Path) -> str:
    """A file version: its absolute path, size, mtime and inode (any rewrite changes one of them)."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_dev}:{stat.st_ino}"


def _read_verified() -> dict[str, str]:
    try:
        data = json.loads(verified_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_verified(entries: dict[str, str]) -> None:
    """Best effort: an unwritable cache only means hashing again next time."""
    path = verified_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        records = {**_read_verified(), **entries}
        if len(records) > 10_000:  # keep the newest
            records = dict(list(records.items())[-10_000:])
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".verified-")
        with os.fdopen(fd, "w") as handle:
            json.dump(records, handle)
        os.replace(tmp, path)
    except OSError:
        pass


def load_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    if not directory.exists():
        raise ExportNotFoundError(
            f"Export directory {directory} does not exist; create one with `paligemma-edge export MODEL {directory}`."
        )
    if not directory.is_dir():
        raise ExportNotFoundError(f"{directory} is a file, not an export directory.")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise CorruptExportError(
            f"{directory} has no {MANIFEST_FILE}; it is not a paligemma-edge export "
            f"(create one with `paligemma-edge export MODEL {directory}`)."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptExportError(f"{path} is not valid JSON ({error}); re-run the export.") from error
    manifest = Manifest.from_dict(data, str(path))
    manifest.directory = directory
    return manifest
