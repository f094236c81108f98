"""Latency against top-1 over every trained network found, with the Pareto front marked.

    python scripts/pareto.py save --figure pareto.png
    python scripts/pareto.py save/students save/teachers --runtime onnxruntime --batch 64 --json pareto.json

A run is a directory under FOLDERS holding results.json and best.pth (students, and the
teachers and vanilla networks under a teachers/ folder, drawn as stars). Top-1 is results.json's
best_top1, the accuracy of best.pth. Latency is measured here, on this machine: the median of
--runs forward passes of best.pth's fp32 network at --batch on the CPU, in PyTorch or ONNX
Runtime (after --warmup untimed ones, random input of the data set's image size). A run is on
the Pareto front when no other run is both at least as fast and more accurate.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")  # files only: no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.errors import UserError, exits_cleanly  # noqa: E402
from dataset import get_info  # noqa: E402
from deploy import extras  # noqa: E402
from deploy.export import export_onnx  # noqa: E402
from deploy.network import load_network  # noqa: E402
from deploy.runtime import median_ms, ort_runner, ort_session, random_batch, torch_runner  # noqa: E402
from engine import runs  # noqa: E402
from engine.programs import TEACHER  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Latency against top-1 over trained runs, Pareto front marked.")
    parser.add_argument("folders", nargs="+", help="folders searched for run directories")
    parser.add_argument("--figure", default=None, help="write the scatter plot to this PNG")
    parser.add_argument("--json", default=None, help="write every point to this JSON file")
    parser.add_argument("--runtime", default="pytorch", choices=("pytorch", "onnxruntime"))
    parser.add_argument("--batch", type=int, default=1, help="batch size of the timed forward passes")
    parser.add_argument("--runs", type=int, default=20, help="timed forward passes per network")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forward passes first")
    parser.add_argument("--cpu_threads", type=int, default=None, help="CPU threads (default: torch's own setting)")
    args = parser.parse_args(argv)
    for flag, low in {"batch": 1, "runs": 1, "warmup": 0, "cpu_threads": 1}.items():
        value = getattr(args, flag)
        if value is not None and value < low:
            raise UserError(f"--{flag} must be at least {low}, got {value}")
    return args


def find_runs(folders) -> list:
    """Run directories (results.json and best.pth) under `folders`, sorted; their results, read
    (an unreadable results.json is skipped with a warning, as make_table.py skips it)."""
    missing = [f for f in folders if not Path(f).is_dir()]
    if missing:
        raise UserError(f"no folder {', '.join(missing)}; name folders that hold run directories")
    paths = sorted({p for f in folders for p in Path(f).rglob(runs.RESULTS_FILE)
                    if (p.parent / runs.BEST_CKPT).is_file()})
    found = [(path.parent, results) for path in paths if (results := runs.read_results(path)) is not None]
    if not found:
        raise UserError(f"no run directory (readable results.json with best.pth) under {', '.join(folders)}; "
                        "train one first")
    return found


def pareto_front(points: list) -> list:
    """Flags, one per (latency, top1) point: True where no other point is at least as fast and more accurate."""
    best_so_far, flags = float("-inf"), [False] * len(points)
    for index in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        if points[index][1] > best_so_far:
            flags[index], best_so_far = True, points[index][1]
    return flags


def latency_ms(model, input_shape, args) -> float:
    inputs = random_batch(args.batch, input_shape)
    if args.runtime == "pytorch":
        return median_ms(torch_runner(model), inputs, args.runs, args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, random_batch(2, input_shape), Path(tmp) / "model.onnx")
        return median_ms(ort_runner(ort_session(path, args.cpu_threads)), inputs, args.runs, args.warmup)


def measure(run_dir: Path, results: dict, args) -> dict:
    info = get_info(results["dataset"])
    model, arch = load_network(run_dir / runs.BEST_CKPT, results.get("model"), info.num_classes, results["dataset"])
    return {"run": str(run_dir), "model": arch, "method": results.get("method", "?"),
            "teacher": run_dir.parent.name == TEACHER.kind, "top1": results["best_top1"],
            "latency_ms": latency_ms(model, (3, info.image_size, info.image_size), args)}


def draw(points: list, path: str, args) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for teacher, marker, label in ((False, "o", "student"), (True, "*", "teacher / from scratch")):
        chosen = [p for p in points if p["teacher"] == teacher]
        if chosen:
            ax.scatter([p["latency_ms"] for p in chosen], [p["top1"] for p in chosen], marker=marker,
                       s=90 if teacher else 40, label=label, zorder=3)
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["latency_ms"])
    ax.step([p["latency_ms"] for p in front], [p["top1"] for p in front], where="post", color="black",
            linewidth=1, label="Pareto front", zorder=2)
    for p in points:
        ax.annotate(f"{p['model']} ({p['method']})", (p["latency_ms"], p["top1"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel(f"latency, batch {args.batch}, {args.runtime} CPU (ms, median of {args.runs})")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(points: list) -> str:
    lines = ["| run | model | method | top-1 (%) | latency (ms) | Pareto |", "|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: p["latency_ms"]):
        lines.append(f"| {Path(p['run']).name} | {p['model']} | {p['method']} | {p['top1']:.2f} "
                     f"| {p['latency_ms']:.3f} | {'yes' if p['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


@exits_cleanly
def main(argv=None) -> list:
    args = parse_args(argv)
    found = find_runs(args.folders)
    if args.runtime == "onnxruntime":
        extras.require()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    points = [measure(run_dir, results, args) for run_dir, results in found]
    for point, on_front in zip(points, pareto_front([(p["latency_ms"], p["top1"]) for p in points])):
        point["pareto"] = on_front
    print(markdown(points), end="")
    if args.figure:
        draw(points, args.figure, args)
    if args.json:
        runs.write_json(Path(args.json), {"runtime": args.runtime, "batch": args.batch, "points": points})
    return points


if __name__ == "__main__":
    main()
