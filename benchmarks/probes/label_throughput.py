"""Images per second of `paligemma-edge label`: the embedded engine at several batch sizes, and Ray Data on this
machine, each a whole command as a user runs it (its own process), in one invocation.

    python -m paligemma_edge.benchmarks.probes.label_throughput EXPORT INPUT [--task detect] [--labels "a ; b"]
        [--batches 1 4 8 16] [--ray 2x1 1x2] [--limit N] [--max-new-tokens N] [--json]

`--ray AxT` runs `--engine ray --actors A --threads T`. Reported per run: the command's own summary (images/s over
the labelling, the model already loaded) and the process's wall seconds (Python, the export's loading and, for
Ray, starting a local cluster and its actors: what a short job pays once). Random-weight exports never end an
answer early: give them `--max-new-tokens` so every image costs the same known number of steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from . import harness


def label_run(export_dir: Path, items: Path, out: Path, task: str, labels: str | None, extra: list[str]) -> dict:
    """One `label` command, its `--json` summary and wall seconds."""
    command = [sys.executable, "-m", "paligemma_edge.cli", "label", str(export_dir), str(items), "--out", str(out)]
    command += ["--task", task, "--json", "--overwrite", *extra] + (["--labels", labels] if labels else [])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout.splitlines()[-1])
    if summary["errors"]:  # the speed of error records says nothing
        raise SystemExit(f"error: {summary['errors']} images failed in {out}: {out.read_text()[:1000]}")
    return {"command": " ".join(command[3:]), "wall_s": round(wall, 2), **summary}


def measure(args) -> dict:
    from ...label.inputs import read_items

    items = read_items(str(args.input), None)[: args.limit]
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        listing = Path(work) / "images.txt"  # the same images, in order, for every run
        listing.write_text("".join(f"{Path(str(item.path)).resolve()}\n" for item in items))  # read from elsewhere
        common = ["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else []
        plans = [(f"local, batch {b}", ["--batch", str(b), "--threads", str(args.threads or 2)]) for b in args.batches]
        for spec in args.ray:
            actors, threads = spec.split("x")
            extra = ["--engine", "ray", "--actors", actors, "--threads", threads, "--batch", str(args.ray_batch)]
            plans.append((f"ray, {actors} actor(s) × {threads} thread(s), batch {args.ray_batch}", extra))
        for name, extra in tqdm(plans, desc="label runs", unit="run"):
            out = Path(work) / "out.jsonl"
            runs[name] = label_run(args.export_dir, listing, out, args.task, args.labels, [*extra, *common])
    return {
        "export": str(args.export_dir),
        "images": len(items),
        "task": args.task,
        "labels": args.labels,
        "max_new_tokens": args.max_new_tokens,
        "runs": runs,
    }


def text(report: dict) -> str:
    lines = [f"{report['export']}: {report['images']} images, {report['task']} {report['labels'] or ''}"]
    for name, run in report["runs"].items():
        lines.append(f"  {name:<40} {run['images_per_s']:6.2f} images/s labelling, {run['wall_s']:6.1f} s wall")
    return "\n".join(lines)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("input", type=Path, help="what `label` reads: a folder, glob or list of images")
    parser.add_argument("--task", default="detect")
    parser.add_argument("--labels", default=None)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4, 8, 16], help="local engine batch sizes")
    parser.add_argument("--ray", nargs="*", default=["2x1", "1x2"], help="Ray runs as ACTORSxTHREADS")
    parser.add_argument("--ray-batch", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="the first N images only")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    args = parser.parse_args()
    harness.run(args, lambda: measure(args), text)


if __name__ == "__main__":
    main()
