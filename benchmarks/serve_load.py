"""A bounded load run against `paligemma-edge serve`: N clients × M streamed chat requests, loopback only.

python -m paligemma_edge.benchmarks.serve_load http://127.0.0.1:8000 --clients 8 --requests 4 --max-tokens 32

Reports requests/s, completion tokens/s (all tokens over the wall time), decode tokens/s (tokens after each
request's first, over the time between its first and last token, summed over requests running at once), p50/p95
time to first token, and errors. Every request runs to its end; the run stops by itself.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from statistics import median
from urllib.parse import urlparse

import httpx

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _image_uri() -> str:
    from PIL import Image

    from ..runtime.images import demo_image_path

    buffer = io.BytesIO()
    Image.open(demo_image_path()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _one_request(url: str, body: dict, headers: dict) -> dict:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=600) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}"}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "first": first or end, "last": last or end, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


def run_load(
    url: str,
    clients: int,
    requests_per_client: int,
    max_tokens: int = 32,
    prompt: str = "caption en",
    api_key: str | None = None,
) -> dict:
    host = urlparse(url).hostname
    if host not in _LOOPBACK:
        raise SystemExit(f"serve_load only targets this machine (127.0.0.1 / localhost), not {host}")
    model = httpx.get(f"{url}/v1/models", headers=_headers(api_key), timeout=30).json()["data"][0]["id"]
    content = [{"type": "image_url", "image_url": {"url": _image_uri()}}, {"type": "text", "text": prompt}]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    def client(_: int) -> list[dict]:
        return [_one_request(url, body, _headers(api_key)) for _ in range(requests_per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttfts = [r["ttft"] for r in ok]
    decode_tokens = sum(max(r["tokens"] - 1, 0) for r in ok)
    decode_time = _union_seconds([(r["first"], r["last"]) for r in ok])
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "completion_tokens": sum(r["tokens"] for r in ok),
        "completion_tok_s": sum(r["tokens"] for r in ok) / wall,
        "decode_tok_s": decode_tokens / decode_time if decode_time else 0.0,
        "ttft_p50_s": median(ttfts) if ttfts else 0.0,
        "ttft_p95_s": percentile(ttfts, 0.95),
    }


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _union_seconds(spans: list[tuple[float, float]]) -> float:
    """Time during which at least one request was decoding."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000 (loopback only)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (EOS ignored)")
    parser.add_argument("--prompt", default="caption en", help="the prompt of every request")
    parser.add_argument("--api-key", default=None, help="the server's API key, if any")
    args = parser.parse_args()
    print(
        json.dumps(
            run_load(args.url, args.clients, args.requests, args.max_tokens, args.prompt, args.api_key), indent=2
        )
    )


if __name__ == "__main__":
    main()
