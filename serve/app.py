"""The HTTP server: OpenAI-style chat completions, typed detect/segment JSON, models, health, metrics, a page.

Every request's sequence joins one continuously batched decoding loop (engine.py). Bad input gets a 4xx
with an OpenAI-style error body, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..runtime import tasks
from ..runtime.errors import PaliGemmaEdgeError, PromptError
from ..runtime.generation import FINISH_LENGTH, GenerationResult, StopText, TokenEvent
from ..runtime.model import ImageFeatures, PaliGemma
from .engine import FINISH_TIMEOUT, Engine, Job, QueueFullError
from .image_cache import FeatureCache
from .inputs import ApiError, ImagePolicy, chat_inputs, generation_options, read_json
from .metrics import Metrics

log = logging.getLogger(__name__)
PAGE = Path(__file__).resolve().parent / "page.html"


@dataclass(frozen=True)
class ServerSettings:
    model_id: str
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    allow_local_files: Path | None = None
    max_body_bytes: int = 20 * 1024 * 1024
    request_timeout: float = 600.0
    prefills_per_step: int = 1
    image_cache_bytes: int = 256 * 1024 * 1024  # features of recently seen images (one image, many prompts)


class Server:
    """The app's state: the model (loaded in the background), the engine, metrics and settings."""

    def __init__(self, load_model: Callable[[], PaliGemma], settings: ServerSettings):
        self.load_model = load_model
        self.settings = settings
        self.metrics = Metrics()
        self.images = ImagePolicy(settings.allow_local_files)
        self.image_cache = FeatureCache(settings.image_cache_bytes, self.metrics)
        self.model: PaliGemma | None = None
        self.engine: Engine | None = None
        self.load_error: Exception | None = None

    def _load(self) -> None:
        try:
            model = self.load_model()
            settings = self.settings
            engine = Engine(
                model,
                self.metrics,
                settings.max_batch,
                settings.max_queue,
                settings.request_timeout,
                settings.prefills_per_step,
            )
            engine.start()
            self.model, self.engine = model, engine
            log.info("model %s loaded", self.settings.model_id)
        except Exception as error:
            self.load_error = error
            log.exception("loading the model failed")

    @asynccontextmanager
    async def lifespan(self, app: Starlette):
        threading.Thread(target=self._load, name="paligemma-load", daemon=True).start()
        yield
        if self.engine is not None:
            self.engine.stop()

    # ------------------------------------------------------------------ plumbing
    def ready(self) -> tuple[PaliGemma, Engine]:
        if self.engine is None or self.model is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise ApiError(503, message, "model_not_ready", kind="server_error", headers={"Retry-After": "5"})
        return self.model, self.engine

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", "invalid_api_key")

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.settings.model_id:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.settings.model_id!r}",
                "model_not_found",
                "model",
            )

    async def features(self, model: PaliGemma, image: bytes) -> ImageFeatures:
        """The image's features, encoded in a worker thread or taken from the cache of recent images."""
        try:
            return await run_in_threadpool(self.image_cache.features, image, model.encode_image)
        except PaliGemmaEdgeError as error:
            raise ApiError(400, str(error), type(error).__name__, "image") from error

    async def submit(self, build: Callable, *args, **kwargs) -> Job:
        """Build a sequence in a worker thread (image decoding, vision) and hand it to the engine."""
        _, engine = self.ready()
        try:
            sequence = await run_in_threadpool(build, *args, **kwargs)
        except PromptError as error:
            code = "context_length_exceeded" if "positions" in str(error) else "invalid_prompt"
            raise ApiError(400, str(error), code) from error
        except PaliGemmaEdgeError as error:
            raise ApiError(400, str(error), type(error).__name__) from error
        try:
            return engine.submit(sequence)
        except QueueFullError as error:
            raise ApiError(503, str(error), "queue_full", kind="server_error", headers={"Retry-After": "1"}) from error

    @staticmethod
    async def result(job: Job, request: Request) -> GenerationResult:
        """Wait for a job's result; a client that disconnects cancels it."""

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.2)
            job.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async for _kind, payload in job.stream():
                if isinstance(payload, Exception):
                    raise ApiError(
                        504 if isinstance(payload, TimeoutError) else 500,
                        str(payload),
                        "timeout" if isinstance(payload, TimeoutError) else "internal_error",
                        kind="server_error",
                    )
                if isinstance(payload, GenerationResult):
                    if payload.finish_reason == FINISH_TIMEOUT:
                        raise ApiError(
                            504, "the request took longer than the server's timeout", "timeout", kind="server_error"
                        )
                    return payload
        finally:
            watcher.cancel()
        raise ApiError(500, "the generation ended without a result", "internal_error", kind="server_error")

    def usage(self, result: GenerationResult) -> dict:
        return {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": len(result.token_ids),
            "total_tokens": result.prompt_tokens + len(result.token_ids),
        }

    # ------------------------------------------------------------------ endpoints
    async def chat_completions(self, request: Request) -> Response:
        self.authorize(request)
        body = await read_json(request, self.settings.max_body_bytes)
        self.check_model(body)
        image, prompt = chat_inputs(body, self.images)
        options = generation_options(body)
        model, _ = self.ready()
        features = await self.features(model, image)
        job = await self.submit(model.new_sequence, features, prompt, **options)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": completion_id, "created": created, "model": self.settings.model_id}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._chunks(job, base, include_usage), media_type="text/event-stream")
        result = await self.result(job, request)
        return JSONResponse(
            {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": _openai_finish(result.finish_reason),
                        "logprobs": None,
                    }
                ],
                "usage": self.usage(result),
            }
        )

    async def _chunks(self, job: Job, base: dict, include_usage: bool):
        """Server-sent events in OpenAI's chunk format, ending with [DONE]; a disconnect cancels the job."""

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            payload = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                **extra,
            }
            return f"data: {json.dumps(payload)}\n\n"

        text = StopText(job.sequence.detokenize, job.sequence.config.stop)
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for _kind, payload in job.stream():
                if isinstance(payload, TokenEvent):
                    piece = text.update(job.sequence.settled_ids)
                    if piece:
                        yield chunk({"content": piece})
                elif isinstance(payload, GenerationResult):
                    rest = text.flush(payload.token_ids)
                    if rest:
                        yield chunk({"content": rest})
                    yield chunk({}, _openai_finish(payload.finish_reason))
                    if include_usage:
                        usage_chunk = {
                            **base,
                            "object": "chat.completion.chunk",
                            "choices": [],
                            "usage": self.usage(payload),
                        }
                        yield f"data: {json.dumps(usage_chunk)}\n\n"
                else:
                    error = {"error": {"message": str(payload), "type": "server_error", "code": "internal_error"}}
                    yield f"data: {json.dumps(error)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # no-op once finished; a client that went away stops its generation

    async def localize(self, request: Request, task: str) -> Response:
        self.authorize(request)
        body = await read_json(request, self.settings.max_body_bytes)
        self.check_model(body)
        if "image" not in body:
            raise ApiError(400, "the body needs an image (a data: URI)", "missing_image", "image")
        image = self.images.read(body["image"], "image")
        labels = body.get("labels")
        iou = body.get("iou_threshold")
        if iou is not None and (isinstance(iou, bool) or not isinstance(iou, (int, float)) or not 0 <= iou <= 1):
            raise ApiError(
                400, f"iou_threshold must be a number in [0, 1], got {iou!r}", "invalid_value", "iou_threshold"
            )
        fields = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if k in body}
        options = generation_options({"constrained": True, **fields, **_field(body, "constrained")})
        model, _ = self.ready()
        try:
            prompt = tasks.TASKS[task].build(labels)
        except PaliGemmaEdgeError as error:
            raise ApiError(400, str(error), type(error).__name__, "labels") from error
        features = await self.features(model, image)
        job = await self.submit(model.new_sequence, features, prompt, **options)
        result = await self.result(job, request)
        parsed = await run_in_threadpool(model.objects_from, result, features, iou_threshold=iou)
        return JSONResponse(
            {
                "model": self.settings.model_id,
                "image_size": [features.width, features.height],
                **parsed.to_dict(mask_format="rle"),
                "raw_text": result.text,
                "finish_reason": _openai_finish(result.finish_reason),
                "constrained": options["constrained"],
                "usage": self.usage(result),
                "timings": result.timings.to_dict(),
            }
        )

    async def detect(self, request: Request) -> Response:
        return await self.localize(request, "detect")

    async def segment(self, request: Request) -> Response:
        return await self.localize(request, "segment")

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        model = {"id": self.settings.model_id, "object": "model", "created": 0, "owned_by": "paligemma-edge"}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self, request: Request) -> Response:
        if self.engine is not None:
            return JSONResponse({"status": "ok", "model": self.settings.model_id})
        status = "error" if self.load_error else "loading"
        return JSONResponse({"status": status}, status_code=503)

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE.read_text().replace("{{MODEL_ID}}", self.settings.model_id))


def _field(body: dict, name: str) -> dict:
    return {name: body[name]} if name in body else {}


def _openai_finish(reason: str) -> str:
    return "length" if reason == FINISH_LENGTH else "stop"


def create_app(load_model: Callable[[], PaliGemma], settings: ServerSettings) -> Starlette:
    server = Server(load_model, settings)

    def endpoint(name: str, handler: Callable) -> Callable:
        async def wrapped(request: Request) -> Response:
            try:
                response = await handler(request)
            except ApiError as error:
                response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
            except Exception:  # never a crash: the server answers 500 and keeps serving
                log.exception("unhandled error in %s", name)
                response = JSONResponse(
                    ApiError(500, "internal server error", "internal_error", kind="server_error").body(),
                    status_code=500,
                )
            server.metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return wrapped

    routes = [
        Route("/v1/chat/completions", endpoint("chat_completions", server.chat_completions), methods=["POST"]),
        Route("/v1/detect", endpoint("detect", server.detect), methods=["POST"]),
        Route("/v1/segment", endpoint("segment", server.segment), methods=["POST"]),
        Route("/v1/models", endpoint("models", server.models), methods=["GET"]),
        Route("/health", endpoint("health", server.health), methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
        Route("/", endpoint("page", server.page), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=server.lifespan)
    app.state.server = server
    return app
