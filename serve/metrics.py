"""Prometheus metrics of the server (prometheus_client, a registry of its own per app)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "paligemma_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.generated_tokens = Counter("paligemma_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("paligemma_prompt_tokens", "prefix tokens prefilled", registry=r)
        self.queue_depth = Gauge("paligemma_queue_depth", "requests waiting to join the batch", registry=r)
        self.active = Gauge("paligemma_active_sequences", "sequences decoding in the batch", registry=r)
        self.ttft = Histogram(
            "paligemma_time_to_first_token_seconds", "submission to first token", buckets=_TTFT_BUCKETS, registry=r
        )
        self.time_per_token = Histogram(
            "paligemma_time_per_token_seconds", "time between a sequence's tokens", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.image_cache_bytes = Gauge("paligemma_image_cache_bytes", "image features kept for reuse", registry=r)
        self.image_cache_entries = Gauge("paligemma_image_cache_entries", "images whose features are kept", registry=r)
        self.image_cache_hits = Counter(
            "paligemma_image_cache_hits", "requests whose image was encoded before", registry=r
        )
        self.image_cache_misses = Counter(
            "paligemma_image_cache_misses", "requests whose image was encoded", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
