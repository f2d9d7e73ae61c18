"""Request bodies → validated model inputs, with OpenAI-style errors for everything a client can get wrong."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request

from ..runtime.errors import GenerationError
from ..runtime.generation import GenerationConfig


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


async def read_json(request: Request, max_bytes: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"the request body is larger than {max_bytes:,} bytes", "request_too_large")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise ApiError(413, f"the request body is larger than {max_bytes:,} bytes", "request_too_large")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error})", "invalid_json") from error
    except RecursionError as error:  # json's decoder recurses per nesting level
        raise ApiError(400, "the request body nests arrays or objects too deeply", "invalid_json") from error
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    return body


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from: data: URIs always; local files only inside ``local_dir``."""

    local_dir: Path | None = None

    def read(self, reference: Any, param: str) -> bytes:
        if not isinstance(reference, str) or not reference:
            raise ApiError(400, "an image must be a data: URI string", "invalid_image", param)
        if reference.startswith("data:"):
            header, _, payload = reference.partition(",")
            if ";base64" not in header:
                raise ApiError(400, "image data: URIs must be base64-encoded", "invalid_image", param)
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as error:
                raise ApiError(400, f"the image's base64 data is invalid ({error})", "invalid_image", param) from error
        if reference.startswith(("http://", "https://")):
            raise ApiError(400, "image URLs are not fetched; send the image as a data: URI", "invalid_image", param)
        if self.local_dir is None:
            raise ApiError(
                403,
                "local image paths are disabled; start the server with --allow-local-files DIR",
                "local_files_disabled",
                param,
            )
        if "\x00" in reference:
            raise ApiError(400, "an image path cannot contain a NUL character", "invalid_image", param)
        path = Path(reference.removeprefix("file://")).expanduser()
        resolved = (self.local_dir / path).resolve() if not path.is_absolute() else path.resolve()
        root = self.local_dir.resolve()
        if resolved != root and root not in resolved.parents:
            raise ApiError(403, f"{reference} is outside the allowed directory", "path_not_allowed", param)
        if not resolved.is_file():
            raise ApiError(400, f"{reference} is not a file in the allowed directory", "invalid_image", param)
        return resolved.read_bytes()


def chat_inputs(body: dict, images: ImagePolicy) -> tuple[bytes, str]:
    """The one image and the prompt of a chat request (one user message: an image part and a text part)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "invalid_messages", "messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if len(users) != 1 or any(not isinstance(m, dict) or m.get("role") not in ("user", "system") for m in messages):
        raise ApiError(
            400, "send exactly one user message (PaliGemma is not a chat model)", "invalid_messages", "messages"
        )
    content = users[0].get("content")
    if isinstance(content, str):
        raise ApiError(
            400, "the message needs an image: give content parts [image_url, text]", "missing_image", "messages"
        )
    if not isinstance(content, list):
        raise ApiError(400, "content must be a list of parts", "invalid_messages", "messages")
    image_parts = [p for p in content if isinstance(p, dict) and p.get("type") == "image_url"]
    text_parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
    if not image_parts:
        raise ApiError(400, "the message has no image part", "missing_image", "messages")
    if len(image_parts) > 1:
        raise ApiError(400, f"one image per request, got {len(image_parts)}", "too_many_images", "messages")
    if not text_parts or not all(isinstance(p.get("text"), str) for p in text_parts):
        raise ApiError(
            400, "the message needs a text part: the PaliGemma prompt (e.g. 'caption en')", "missing_prompt", "messages"
        )
    url = image_parts[0].get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    return images.read(url, "messages"), " ".join(p["text"] for p in text_parts)


# GenerationConfig's option → the request field a client sets it with (OpenAI's names where OpenAI has one)
REQUEST_FIELDS = {"max_new_tokens": "max_tokens"}


def generation_options(body: dict) -> dict:
    """OpenAI's sampling fields (+ top_k, repetition_penalty, ignore_eos) → GenerationConfig options, validated by
    GenerationConfig itself (the one place generation options are checked) before any image work. temperature
    defaults to 0 (greedy), PaliGemma's decoding, not OpenAI's 1."""
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1", "invalid_value", "n")
    given = body.get("max_completion_tokens")
    options = {
        "max_new_tokens": given if given is not None else body.get("max_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "top_k": body.get("top_k"),
        "seed": body.get("seed"),
        "repetition_penalty": body.get("repetition_penalty"),
        "stop": body.get("stop"),
        "ignore_eos": body.get("ignore_eos"),
        "constrained": body.get("constrained"),  # our extension: detect / segment prompts under the grammar
    }
    try:
        GenerationConfig.from_options(**options).validated(default_max_new_tokens=1)
    except GenerationError as error:
        param = REQUEST_FIELDS.get(error.option or "", error.option)
        raise ApiError(400, str(error), "invalid_value", param) from error
    return options
