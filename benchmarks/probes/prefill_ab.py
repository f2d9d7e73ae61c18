"""Two exports' prefills (and decode steps) alternated in one process: a small speed difference on a noisy host.

python -m paligemma_edge.benchmarks.probes.prefill_ab BEFORE AFTER [--runs 24] [--steps 8] [--threads 2] \
    [--context N] [--json]

`bench` runs each export in its own process, minutes apart, so a shared machine's drift (±5–10 % between rounds here)
hides a change of a few percent. This loads both exports, encodes the image once per export, then runs the prefill
(`DecodingBatch.join`: the prompt's decoder call and the first token) of each in turn, swapping the order every run,
and reports each export's median and the median of the per-run ratios AFTER ÷ BEFORE; with ``--steps`` the same for
the median decode step of each run (EOS ignored). It also reports whether the two chose the same first token with
the same log-probability: a graph change meant to be exact shows it here. ``--context N`` pads the prompt with a
filler word until the prefix holds about N tokens (a long cache behind the decode steps at 224 px).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...runtime.generation import DecodingBatch
from ...runtime.images import demo_image_path
from ...runtime.model import ImageFeatures, PaliGemma
from ..machine import run_times
from . import harness

WARMUP_RUNS = 2
FILLER = " cat"  # one token in random-checkpoint's tokenizer (padded_prompt measures it anyway)


def prefix_tokens(model: PaliGemma, features: ImageFeatures, prompt: str) -> int:
    """Tokens in the prefix of ``prompt`` on an encoded image (image tokens included)."""
    return len(model.new_sequence(features, prompt, max_new_tokens=1).prompt_ids)


def padded_prompt(model: PaliGemma, features: ImageFeatures, prompt: str, context: int, probe: int = 100) -> str:
    """``prompt`` followed by filler words, so that its prefix (image tokens included) holds about ``context``
    tokens; the filler's tokens per word are measured, not assumed."""

    def length(words: int) -> int:
        return prefix_tokens(model, features, prompt + FILLER * words)

    base = length(0)
    per_word = (length(probe) - base) / probe
    return prompt + FILLER * max(0, round((context - base) / per_word))


def _compare(paths: tuple[Path, Path], seconds: list[list[float]]) -> dict:
    ratios = np.array(seconds[1]) / np.array(seconds[0])
    sides = {
        side: {"export": str(path), "median_s": float(np.median(times)), "seconds": times}
        for side, path, times in zip(("before", "after"), paths, seconds)
    }
    quartiles = {name: float(np.percentile(ratios, q)) for name, q in harness.QUARTILES.items()}
    return {**sides, "ratio_after_before": quartiles}


def measure(
    before: Path,
    after: Path,
    runs: int,
    threads: int | None,
    steps: int = 0,
    prompt: str = "caption en",
    context: int | None = None,
) -> dict:
    models = [harness.load_export(path, threads) for path in (before, after)]
    features = [model.encode_image(demo_image_path()) for model in models]
    if context:
        prompt = padded_prompt(models[0], features[0], prompt, context)
    prefill: list[list[float]] = [[], []]
    step: list[list[float]] = [[], []]
    first: list[set[tuple[int, float]]] = [set(), set()]
    for run in tqdm(range(WARMUP_RUNS + runs), desc="prefill A/B", unit="pair"):
        for i in (0, 1) if run % 2 == 0 else (1, 0):
            model = models[i]
            batch = DecodingBatch(model.decoder, model.tokens)
            sequence = model.new_sequence(features[i], prompt, max_new_tokens=steps + 1, ignore_eos=True)
            (event,) = batch.join([sequence])
            step_times = run_times(batch.step, repeats=steps, warmup=0) if steps else []
            if run >= WARMUP_RUNS:
                prefill[i].append(sequence.timings.prefill_s)
                first[i].add((event.token_id, event.logprob))
                if steps:
                    step[i].append(float(np.median(step_times)))
    report = {
        "prefix_tokens": prefix_tokens(models[0], features[0], prompt),
        "prefill": _compare((before, after), prefill),
        "same_first_token_and_logprob": len(first[0]) == 1 and first[0] == first[1],
    }
    if steps:
        report["decode_step"] = _compare((before, after), step)
    return report


def text(report: dict) -> str:
    lines = []
    for part in ("prefill", "decode_step"):
        if part in report:
            times = {side: report[part][side]["median_s"] * 1e3 for side in ("before", "after")}
            q = report[part]["ratio_after_before"]
            lines.append(
                f"{part}: before {times['before']:.1f} ms, after {times['after']:.1f} ms; after ÷ before per run: "
                f"median {q['median']:.3f} (p25 {q['p25']:.3f}, p75 {q['p75']:.3f})"
            )
    lines.append(f"prefix: {report['prefix_tokens']} tokens")
    lines.append(f"same first token and log-probability: {report['same_first_token_and_logprob']}")
    return "\n".join(lines)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--runs", type=int, default=24, help="measured prefills per export, after two warm-up pairs")
    parser.add_argument("--steps", type=int, default=0, help="decode steps timed after each prefill")
    parser.add_argument("--prompt", default="caption en")
    parser.add_argument("--context", type=int, default=None, help="pad the prompt until the prefix holds ~N tokens")
    args = parser.parse_args()

    def measured() -> dict:
        report = measure(args.before, args.after, args.runs, args.threads, args.steps, args.prompt, args.context)
        return {"runs": args.runs, "steps": args.steps, **report}

    harness.run(args, measured, text)


if __name__ == "__main__":
    main()
