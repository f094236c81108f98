"""Latency against top-1 over every trained network found, with the Pareto front marked.

    python scripts/pareto.py save --figure pareto.png
    python scripts/pareto.py save/students save/teachers --runtime onnxruntime --batch 64 --json pareto.json

A run is a directory under FOLDERS holding results.json and best.pth. Top-1 is the tables'
--metric (scripts/make_table.py): results.json's last_top1, RepDistiller's last epoch (the
default), or best_top1. Latency is measured here, on this machine, once per architecture and data
set (runs of one architecture share it: the weights do not change an fp32 network's speed):
--runs forward passes of best.pth's fp32 network at --batch on the CPU, in PyTorch or ONNX
Runtime, after --warmup untimed ones, on a random input of the data set's image size; reported as
the median and the interquartile range (deploy/metrics.py). A run is on the Pareto front when no
other run is both at least as fast (median) and more accurate.

Each run has a role. A distilled student is a run of any method but train_teacher.py's
('vanilla', older runs 'teacher'). A network trained from labels alone is a teacher when a
distilled run found names its best.pth in path_t; otherwise it is the vanilla student when it
lies under students/ or its architecture is the student of a distilled run found on its data set;
otherwise a teacher. Teachers are drawn as stars, students (distilled and vanilla) as dots.
"""
import argparse
import sys
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")  # files only: no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.errors import UserError, exits_cleanly  # noqa: E402
from dataset import get_info  # noqa: E402
from deploy import extras, metrics  # noqa: E402
from deploy.network import load_network, read_network  # noqa: E402
from engine import runs  # noqa: E402
from engine.programs import STUDENT  # noqa: E402
from scripts.make_table import FROM_LABELS, METRICS, add_metric_flag, metric_label  # noqa: E402

ROLES = {"student": ("o", 40, "distilled student"), "vanilla": ("o", 40, "vanilla student (labels only)"),
         "teacher": ("*", 140, "teacher")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Latency against top-1 over trained runs, Pareto front marked.")
    parser.add_argument("folders", nargs="+", help="folders searched for run directories")
    parser.add_argument("--figure", default=None, help="write the scatter plot to this PNG")
    parser.add_argument("--json", default=None, help="write every point to this JSON file")
    add_metric_flag(parser)
    parser.add_argument("--runtime", default="pytorch", choices=("pytorch", "onnxruntime"))
    parser.add_argument("--batch", type=int, default=1, help="batch size of the timed forward passes")
    parser.add_argument("--runs", type=int, default=20, help="timed forward passes per architecture")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forward passes first")
    parser.add_argument("--cpu_threads", type=int, default=None, help="CPU threads (default: torch's own setting)")
    args = parser.parse_args(argv)
    for flag, low in {"batch": 1, "runs": 1, "warmup": 0, "cpu_threads": 1}.items():
        value = getattr(args, flag)
        if value is not None and value < low:
            raise UserError(f"--{flag} must be at least {low}, got {value}")
    return args


def find_runs(folders, metric: str) -> list:
    """Run directories (results.json and best.pth) under `folders`, sorted; their results, read
    (an unreadable results.json, or one without the metric, is skipped with a warning, as
    make_table.py skips it)."""
    missing = [f for f in folders if not Path(f).is_dir()]
    if missing:
        raise UserError(f"no folder {', '.join(missing)}; name folders that hold run directories")
    paths = sorted({p for f in folders for p in Path(f).rglob(runs.RESULTS_FILE)
                    if (p.parent / runs.BEST_CKPT).is_file()})
    found = [(path.parent, results) for path in paths
             if (results := runs.read_results(path)) is not None and has_metric(path, results, metric)]
    if not found:
        raise UserError(f"no run directory (readable results.json with best.pth) under {', '.join(folders)}; "
                        "train one first")
    return found


def has_metric(path: Path, results: dict, metric: str) -> bool:
    if results.get(METRICS[metric]) is None:
        print(f"warning: skipping {path} (no {METRICS[metric]})", file=sys.stderr)
        return False
    return True


def roles(found: list) -> list:
    """'student', 'vanilla' or 'teacher' for each (run directory, results) (the module's rule)."""
    distilled = [r for _, r in found if r.get("method", "teacher") not in FROM_LABELS]
    used = {Path(p).resolve() for r in distilled for p in str(r.get("path_t") or "").split(",") if p}
    student_archs = {(r.get("dataset"), r.get("model")) for r in distilled}
    out = []
    for run_dir, r in found:
        if r.get("method", "teacher") not in FROM_LABELS:
            out.append("student")
        elif (run_dir / runs.BEST_CKPT).resolve() in used:
            out.append("teacher")
        elif run_dir.parent.name == STUDENT.kind or (r.get("dataset"), r.get("model")) in student_archs:
            out.append("vanilla")
        else:
            out.append("teacher")
    return out


def pareto_front(points: list) -> list:
    """Flags, one per (latency, top1) point: True where no other point is at least as fast and more accurate."""
    best_so_far, flags = float("-inf"), [False] * len(points)
    for index in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        if points[index][1] > best_so_far:
            flags[index], best_so_far = True, points[index][1]
    return flags


def architecture(run_dir: Path, results: dict) -> tuple:
    """(architecture, data set): what the latency of a run depends on."""
    return results.get("model") or read_network(run_dir / runs.BEST_CKPT)[1], results["dataset"]


def time_network(run_dir: Path, arch: str, dataset: str, args) -> tuple:
    """(median, first quartile, third quartile) in ms of the run's fp32 network."""
    info = get_info(dataset)
    model, _ = load_network(run_dir / runs.BEST_CKPT, arch, info.num_classes, dataset)
    shape = (3, info.image_size, info.image_size)
    if args.runtime == "pytorch":
        return metrics.torch_latency(model, args.batch, shape, args.runs, args.warmup)
    return metrics.onnxruntime_latency(model, args.batch, shape, args.runs, args.warmup, args.cpu_threads)


def measure(found: list, args) -> list:
    """One point per run; each (architecture, data set) timed once, on its first run's network."""
    timed, points = {}, []
    for (run_dir, results), role in zip(found, roles(found)):
        key = architecture(run_dir, results)
        if key not in timed:
            timed[key] = time_network(run_dir, *key, args)
        median, q1, q3 = timed[key]
        points.append({"run": str(run_dir), "model": key[0], "dataset": key[1], "method": results.get("method", "?"),
                       "role": role, "top1": results[METRICS[args.metric]], "latency_ms": median,
                       "latency_iqr_ms": [q1, q3]})
    return points


def draw(points: list, path: str, args) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for role, (marker, size, label) in ROLES.items():
        chosen = [p for p in points if p["role"] == role]
        if chosen:
            x = [p["latency_ms"] for p in chosen]
            spread = [[p["latency_ms"] - p["latency_iqr_ms"][0] for p in chosen],
                      [p["latency_iqr_ms"][1] - p["latency_ms"] for p in chosen]]
            ax.errorbar(x, [p["top1"] for p in chosen], xerr=spread, fmt=marker, markersize=size ** 0.5,
                        capsize=2, elinewidth=0.8, label=label, zorder=3)
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["latency_ms"])
    ax.step([p["latency_ms"] for p in front], [p["top1"] for p in front], where="post", color="black",
            linewidth=1, label="Pareto front", zorder=2)
    for p in points:
        ax.annotate(f"{p['model']} ({p['method']})", (p["latency_ms"], p["top1"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel(f"latency, batch {args.batch}, {args.runtime} CPU (ms; median and interquartile range "
                  f"of {args.runs})")
    ax.set_ylabel(metric_label(args.metric))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(points: list, metric: str) -> str:
    lines = [f"| run | model | method | role | {metric_label(metric)} | latency, median (ms) "
             "| interquartile range (ms) | Pareto |", "|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: p["latency_ms"]):
        q1, q3 = p["latency_iqr_ms"]
        lines.append(f"| {Path(p['run']).name} | {p['model']} | {p['method']} | {p['role']} | {p['top1']:.2f} "
                     f"| {p['latency_ms']:.3f} | {q1:.3f}–{q3:.3f} | {'yes' if p['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


@exits_cleanly
def main(argv=None) -> list:
    args = parse_args(argv)
    found = find_runs(args.folders, args.metric)
    if args.runtime == "onnxruntime":
        extras.require()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    points = measure(found, args)
    for point, on_front in zip(points, pareto_front([(p["latency_ms"], p["top1"]) for p in points])):
        point["pareto"] = on_front
    print(markdown(points, args.metric), end="")
    if args.figure:
        draw(points, args.figure, args)
    if args.json:
        runs.write_json(Path(args.json), {"runtime": args.runtime, "batch": args.batch, "metric": args.metric,
                                          "runs": args.runs, "warmup": args.warmup,
                                          "cpu_threads": args.cpu_threads, "points": points})
    return points


if __name__ == "__main__":
    main()
