"""The export directory's manifest: what the graphs are, how to feed them, and file checksums."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import ChecksumMismatchError, CorruptExportError, ExportNotFoundError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "paligemma-edge"
FORMAT_VERSION = 2  # v2: the decoder reads a KV buffer and returns only the new tokens' keys/values
_HASH_CHUNK = 16 * 1024 * 1024


def sha256_file(path: Path, progress: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()


def checksum_files(directory: Path, names: list[str], desc: str = "sha256") -> dict[str, dict[str, Any]]:
    """{name: {"sha256", "bytes"}} for files in ``directory``, with one progress bar over all bytes."""
    paths = [directory / name for name in names]
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=total < 256 << 20) as bar:
        return {p.name: {"sha256": sha256_file(p, bar), "bytes": p.stat().st_size} for p in paths}


@dataclass(frozen=True)
class TokenIds:
    image: int
    bos: int
    eos: tuple[int, ...]
    pad: int
    newline: int | None
    loc0: int
    seg0: int


@dataclass(frozen=True)
class Manifest:
    """Parsed manifest.json of an export directory."""

    directory: Path
    data: dict[str, Any]

    @property
    def model_type(self) -> str:
        return self.data["model_type"]

    @property
    def image_size(self) -> int:
        return int(self.data["image_size"])

    @property
    def num_image_tokens(self) -> int:
        return int(self.data["num_image_tokens"])

    @property
    def text(self) -> dict[str, Any]:
        return self.data["text"]

    @property
    def tokens(self) -> TokenIds:
        t = self.data["tokens"]
        return TokenIds(
            image=t["image"],
            bos=t["bos"],
            eos=tuple(t["eos"]),
            pad=t["pad"],
            newline=t.get("newline"),
            loc0=t["loc0"],
            seg0=t["seg0"],
        )

    def graph(self, name: str) -> dict[str, Any]:
        return self.data["graphs"][name]

    def path(self, name: str) -> Path:
        return self.directory / name

    def summary(self) -> str:
        """A few human-readable lines (what `paligemma-edge info` prints)."""
        text, data = self.text, self.data
        lines = [
            f"{self.model_type} {self.image_size}px, {self.num_image_tokens} image tokens, from {data.get('source')}",
            f"decoder: {text['architecture']} {text['num_layers']} layers, hidden {text['hidden_size']}, "
            f"{text['num_heads']} heads / {text['num_kv_heads']} kv, head_dim {text['head_dim']}, "
            f"vocab {text['vocab_size']}",
            "graphs: " + ", ".join(f"{name} {g['file']} ({g['dtype']})" for name, g in data["graphs"].items()),
            "files: " + ", ".join(f"{k} {v['bytes'] / 1e6:.1f} MB" for k, v in data["files"].items()),
        ]
        if "quantization" in data:
            recipe = data["quantization"]["recipe"]
            lines.append(
                f"quantization: {recipe['name']} (vision {recipe['vision']}, decoder {recipe['decoder']}, "
                f"LM head {recipe['lm_head']}, embeddings {recipe['embeddings']}, block {recipe['block_size']}, "
                f"{'symmetric' if recipe['symmetric'] else 'asymmetric'})"
            )
        for reference, quality in data.get("quality", {}).items():
            lines.append(
                f"quality vs {reference}: top-1 {quality['top1_agreement']:.4f}, KL {quality['mean_kl']:.2e}, "
                f"greedy exact {quality['greedy_exact_match']:.2f}"
                + (" (random weights)" if quality["random_weights"] else "")
            )
        if "verification" in data:
            v = data["verification"]
            lines.append(
                f"verification: {'passed' if v['passed'] else 'FAILED'}: greedy tokens agree={v['tokens_agree']} "
                f"over {len(v['hf_tokens'])} tokens, max |Δlogit| {v['max_abs_logit_diff']:.2e} "
                f"(tolerance {v['tolerance']:.2e})"
            )
        return "\n".join(lines)

    def verify_files(self, checksums: bool = True) -> None:
        """Raise if a listed file is missing, has the wrong size or (checksums=True) wrong sha256."""
        files: dict[str, dict[str, Any]] = self.data["files"]
        for name, entry in files.items():
            path = self.path(name)
            if not path.is_file():
                raise ExportNotFoundError(f"{path} is listed in the manifest but missing; re-run the export.")
            if path.stat().st_size != entry["bytes"]:
                raise ChecksumMismatchError(
                    f"{path} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}: the file is "
                    "truncated or was replaced; re-run the export (or copy the directory again)."
                )
        if not checksums:
            return
        actual = checksum_files(self.directory, list(files), desc="verifying export")
        for name, entry in files.items():
            if actual[name]["sha256"] != entry["sha256"]:
                raise ChecksumMismatchError(
                    f"{self.path(name)} does not match the sha256 in {MANIFEST_NAME}: the file is corrupt or "
                    "was modified; re-run the export, or load with verify_checksums=False if you changed it on "
                    "purpose."
                )


_REQUIRED_KEYS = ("format", "model_type", "image_size", "num_image_tokens", "text", "tokens", "graphs", "files")


def load_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    if not directory.exists():
        raise ExportNotFoundError(
            f"Export directory {directory} does not exist; create one with `paligemma-edge export MODEL {directory}`."
        )
    if not directory.is_dir():
        raise ExportNotFoundError(f"{directory} is a file, not an export directory.")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise CorruptExportError(
            f"{directory} has no {MANIFEST_NAME}; it is not a paligemma-edge export "
            f"(create one with `paligemma-edge export MODEL {directory}`)."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptExportError(f"{path} is not valid JSON ({error}); re-run the export.") from error
    if not isinstance(data, dict) or any(key not in data for key in _REQUIRED_KEYS):
        missing = [key for key in _REQUIRED_KEYS if not isinstance(data, dict) or key not in data]
        raise CorruptExportError(f"{path} lacks required keys {missing}; re-run the export.")
    if data["format"] != FORMAT_NAME or data.get("format_version", 0) > FORMAT_VERSION:
        raise CorruptExportError(
            f"{path} is format {data['format']!r} v{data.get('format_version')}; this paligemma-edge reads "
            f"{FORMAT_NAME!r} up to v{FORMAT_VERSION}. Upgrade paligemma-edge or re-export."
        )
    if data.get("format_version", 0) < FORMAT_VERSION:
        raise CorruptExportError(
            f"{path} is {FORMAT_NAME!r} v{data.get('format_version')}, made by an older paligemma-edge whose decoder "
            f"graph has another KV-cache interface; re-run the export (this version reads v{FORMAT_VERSION})."
        )
    return Manifest(directory=directory, data=data)


def write_manifest(directory: Path, data: dict[str, Any]) -> Path:
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path
