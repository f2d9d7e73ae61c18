"""Image loading and preprocessing, identical to transformers' `SiglipImageProcessorPil` (docs/io-contract.md §1).

RGB (transparency composited onto white, grayscale replicated), bicubic squash to R×R with PIL,
``uint8 / 255`` in float64 then float32, ``(x − 0.5) / 0.5``, channels first.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import spec
from .errors import ImageError

ImageInput = str | Path | bytes | Image.Image | np.ndarray


def demo_image_path() -> Path:
    """The bundled image (a house, a car and the sun) that demos, verification and reports use."""
    return Path(__file__).resolve().parent / spec.DEMO_IMAGE


def load_image(image: ImageInput) -> Image.Image:
    """A path, the bytes of an image file, a PIL image or an HxW / HxWx{1,3,4} uint8 array → an RGB PIL image.

    Images of more than `spec.MAX_IMAGE_PIXELS` pixels are refused before they are decoded.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_dir():
            raise ImageError(f"{path} is a directory, not an image file.")
        if not path.is_file():
            raise ImageError(f"Image file {path} does not exist.")
        image = _decode(path, str(path))
    elif isinstance(image, bytes):
        image = _decode(io.BytesIO(image), "the image data")
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif not isinstance(image, Image.Image):
        raise ImageError(
            f"Unsupported image type {type(image).__name__}; pass a file path, image bytes, a PIL.Image or an "
            "HxWx3 uint8 array."
        )
    if image.width < 1 or image.height < 1:
        raise ImageError(f"Image has no pixels ({image.width}x{image.height}).")
    _check_pixels(image.width, image.height, "the image")
    return _to_rgb(image)


def _decode(source: Path | io.BytesIO, what: str) -> Image.Image:
    try:
        with Image.open(source) as opened:
            _check_pixels(opened.width, opened.height, what)
            opened.load()
            return opened.copy()
    except Image.DecompressionBombError as error:  # PIL's own check, at twice our limit
        raise ImageError(
            f"{what} claims too many pixels ({error}); the limit is {spec.MAX_IMAGE_PIXELS:,} "
            "pixels (a guard against decompression bombs)."
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"Cannot read {what} as an image ({error}); use a PNG, JPEG or WebP file.") from error


def _check_pixels(width: int, height: int, what: str) -> None:
    if width * height > spec.MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{what} has {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{spec.MAX_IMAGE_PIXELS:,} (a guard against decompression bombs); downscale it first."
        )


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"Image arrays must be uint8 (0–255), got {array.dtype}; convert with .astype(np.uint8).")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(array, mode="L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB" if array.shape[2] == 3 else "RGBA")
    raise ImageError(f"Image arrays must be HxW or HxWx{{1,3,4}}, got shape {array.shape}.")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale: scale, don't clip at 255
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image → float32 [3, size, size] pixel values."""
    resized = np.asarray(image.resize((size, size), resample=Image.Resampling.BICUBIC))
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalized = (scaled - np.float32(spec.IMAGE_MEAN)) / np.float32(spec.IMAGE_STD)
    return np.ascontiguousarray(normalized.transpose(2, 0, 1))
