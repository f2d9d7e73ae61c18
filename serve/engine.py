"""Continuous batching: one thread drives one `DecodingBatch`; requests join it between steps and leave it
when they finish, are cancelled or time out. Other threads (the HTTP handlers) submit sequences and read
their events from an asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..runtime.generation import GenerationResult, RunningSequence, TokenEvent
from ..runtime.model import PaliGemma
from .metrics import Metrics

log = logging.getLogger(__name__)

FINISH_CANCELLED, FINISH_TIMEOUT = "cancelled", "timeout"


class QueueFullError(RuntimeError):
    """More requests are waiting than the server accepts; retry later (HTTP 503)."""


@dataclass
class Job:
    """One request in the engine: its sequence and the queue its events go to."""

    sequence: RunningSequence
    loop: asyncio.AbstractEventLoop
    deadline: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    cancelled: bool = False

    def push(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    async def stream(self) -> AsyncIterator[tuple[str, TokenEvent | GenerationResult | Exception]]:
        """("token", TokenEvent)… then ("done", GenerationResult) or ("error", exception)."""
        while True:
            kind, payload = await self.events.get()
            yield kind, payload
            if kind != "token":
                return

    def cancel(self) -> None:
        """The client went away: the sequence leaves the batch at the next step."""
        self.cancelled = True


class Engine:
    """Owns the model's decoding: at most ``max_batch`` sequences decode together, ``max_queue`` more may wait."""

    def __init__(
        self,
        model: PaliGemma,
        metrics: Metrics,
        max_batch: int = 8,
        max_queue: int = 64,
        request_timeout: float = 600.0,
        prefills_per_step: int = 1,
    ):
        self.model = model
        self.metrics = metrics
        self.max_batch = max_batch
        # new sequences prefilled between two decoding steps: 1 keeps the running ones decoding while a burst of
        # arrivals is admitted one prefill at a time, instead of stalling them for one long batched prefill
        self.prefills_per_step = prefills_per_step
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.pending: deque[Job] = deque()
        self.active: dict[int, Job] = {}
        self.batch = model.new_batch()
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="paligemma-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=30)

    def submit(self, sequence: RunningSequence) -> Job:
        job = Job(sequence, asyncio.get_running_loop(), time.perf_counter() + self.request_timeout)
        with self.wake:
            if len(self.pending) >= self.max_queue:
                raise QueueFullError(f"{len(self.pending)} requests are already waiting; retry in a moment.")
            self.pending.append(job)
            self.metrics.queue_depth.set(len(self.pending))
            self.wake.notify()
        return job

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self.pending and not self.active:
                    self.wake.wait()
                if self.stopping:
                    break
                admitted: list[Job] = []
                while (
                    self.pending
                    and len(self.active) + len(admitted) < self.max_batch
                    and len(admitted) < min(self.prefills_per_step, self._room())
                ):
                    admitted.append(self.pending.popleft())
                self.metrics.queue_depth.set(len(self.pending))
            try:
                self._expire()
                events = []
                if admitted:
                    now = time.perf_counter()
                    for job in admitted:
                        if now > job.deadline:
                            job.push("error", TimeoutError("the request waited longer than the server's timeout"))
                    admitted = [job for job in admitted if not job.cancelled and now <= job.deadline]
                    for job in admitted:
                        self.active[id(job.sequence)] = job
                    events += self.batch.join([job.sequence for job in admitted])
                events += self.batch.step()
                self._dispatch(events)
            except Exception as error:  # a backend failure ends every running request, not the server
                log.exception("decoding failed")
                for job in list(self.active.values()):
                    job.push("error", error)
                self.active.clear()
                self.batch = self.model.new_batch()
            self.metrics.active.set(len(self.active))
        for job in [*self.pending, *self.active.values()]:
            job.push("error", RuntimeError("the server is shutting down"))

    def _room(self) -> int:
        """Sequences the decoder can take now: all the batch allows, unless its rows are limited (llama.cpp's
        sequences shared with other users of the model); an empty batch may wait for one."""
        free = self.batch.room()
        if free is None:
            return self.max_batch
        return free if self.active else max(free, 1)

    def _expire(self) -> None:
        """Cancelled and timed-out sequences stop; they leave the batch at the next step."""
        now = time.perf_counter()
        for job in self.active.values():
            if job.cancelled:
                job.sequence.stop(FINISH_CANCELLED)
            elif now > job.deadline:
                job.sequence.stop(FINISH_TIMEOUT)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        for event in events:
            job = self.active.get(id(event.sequence))
            if job is None:
                continue
            if job.first_token is None:
                job.first_token = now
                self.metrics.ttft.observe(now - job.submitted)
            elif job.last_token is not None:
                self.metrics.time_per_token.observe(now - job.last_token)
            job.last_token = now
            job.push("token", event)
        for key, job in list(self.active.items()):
            if job.sequence.finished:
                result = job.sequence.result()
                self.metrics.generated_tokens.inc(len(result.token_ids))
                self.metrics.prompt_tokens.inc(result.prompt_tokens)
                job.push("done", result)
                del self.active[key]
