"""Where a generation's time goes, per operator type, from onnxruntime's profiler.

python -m paligemma_edge.benchmarks.probes.profile_ops EXPORT_DIR [--prompt "caption en"] [--new-tokens 16] [--json]

One warm-up generation, then one profiled: its first decoder run is the prefill, the rest are decode steps. Prints
milliseconds and shares per op type for the prefill and for the mean decode step.
"""

from __future__ import annotations

import json
import tempfile
from bisect import bisect_left, bisect_right
from collections import defaultdict
from pathlib import Path

from tokenizers import Tokenizer

from ...runtime.backends.onnx_decoder import OnnxDecoder
from ...runtime.backends.onnx_vision import OnnxVision
from ...runtime.backends.options import OnnxOptions
from ...runtime.export_format import load_manifest
from ...runtime.images import demo_image_path
from ...runtime.model import PaliGemma
from . import harness

CONTROL_FLOW = {"If", "Loop", "Scan"}  # their kernel time includes their subgraphs' kernels


def _runs(trace: list[dict]) -> list[dict[str, float]]:
    """Per session run: {op type: microseconds}, in run order. A control-flow node counts only its own time (its
    span less the kernels that ran inside it), so no kernel is counted twice."""
    runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])
    nodes = sorted(
        (e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
        key=lambda e: e["ts"],
    )
    starts = [node["ts"] for node in nodes]
    out = []
    for run in runs:
        totals: dict[str, float] = defaultdict(float)
        first, last = bisect_left(starts, run["ts"]), bisect_right(starts, run["ts"] + run["dur"])
        for index in range(first, last):
            node, own = nodes[index], nodes[index]["dur"]
            if node["args"]["op_name"] in CONTROL_FLOW:
                end = bisect_right(starts, node["ts"] + node["dur"], lo=index + 1)
                own -= sum(
                    inner["dur"] for inner in nodes[index + 1 : end] if inner["args"]["op_name"] not in CONTROL_FLOW
                )
            totals[node["args"]["op_name"]] += own
        out.append(dict(totals))
    return out


def _shares(totals: dict[str, float], scale: float = 1.0) -> list[dict]:
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    return [{"op": op, "ms": us / 1e3 / scale, "share": us / whole} for op, us in ranked]


def profile(export_dir: Path, prompt: str, new_tokens: int, threads: int | None) -> dict:
    manifest = load_manifest(export_dir)
    manifest.verify_files(checksums=False)
    with tempfile.TemporaryDirectory() as tmp:
        options = OnnxOptions(threads=threads, profile_prefix=str(Path(tmp) / "ort"))
        vision, decoder = OnnxVision.load(manifest, options), OnnxDecoder.load(manifest, options)
        tokenizer = Tokenizer.from_file(str(manifest.path(manifest.tokenizer)))
        model = PaliGemma(manifest, tokenizer, vision, decoder)
        for _ in range(2):  # warm-up, then the profiled one
            model.generate(demo_image_path(), prompt, new_tokens, ignore_eos=True)
        trace = json.loads(Path(decoder.session.end_profiling()).read_text())
        assert vision.session is not None
        vision.session.end_profiling()
    runs = _runs(trace)[-new_tokens:]  # the profiled generation: 1 prefill + (new_tokens − 1) steps
    steps: dict[str, float] = defaultdict(float)
    for run in runs[1:]:
        for op, us in run.items():
            steps[op] += us
    return {
        "export": str(export_dir),
        "prefill": _shares(runs[0]),
        "decode_step": _shares(steps, scale=max(len(runs) - 1, 1)),
    }


def table(report: dict, top: int = 8) -> str:
    machine = report["machine"]
    lines = [f"{report['export']} · {machine['cpu']} ({' '.join(machine['cpu_flags'])})"]
    for phase in ("prefill", "decode_step"):
        total = sum(row["ms"] for row in report[phase])
        lines.append(f"{phase}: {total:.1f} ms in kernels")
        lines += [f"  {row['op']:<24} {row['ms']:10.2f} ms {100 * row['share']:6.1f} %" for row in report[phase][:top]]
    return "\n".join(lines)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("export_dir", type=Path, help="an export directory")
    parser.add_argument("--prompt", default="caption en", help="the prompt")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated (EOS ignored)")
    args = parser.parse_args()
    harness.run(args, lambda: profile(args.export_dir, args.prompt, args.new_tokens, args.threads), table)


if __name__ == "__main__":
    main()
