"""A distilled student against its teacher, beyond accuracy: a report per run with its figures.

    python scripts/analyze.py save/students/<run> [more runs ...]

For each run directory (train_student.py's: args.json, best.pth; its teacher is the first
checkpoint of the run's --path_t) one pass over the run's data set's test split, then in
<run>/analysis/: report.md, analysis.json, and every figure as PNG and PDF:

- correlation_difference: |student - teacher| of the class-mean logits (CRD's correlation figure, drawn as
  mdistiller draws it; deploy/analysis.py), colour scale 0..3;
- cka: linear CKA (Kornblith et al. 2019) of every teacher stage with every student stage, on
  the first --stage_images test images;
- tsne: t-SNE (scikit-learn) of both networks' penultimate features of the first --tsne_images
  test images, coloured by class;
- reliability: the reliability diagrams of both, in ECE's 15 bins (deploy/metrics.py);
- entropy: histograms of both networks' prediction entropy (nats);
- per_class_accuracy: each class's top-1 of the student against the teacher's, the --classes
  classes of largest disagreement named;
- confusion: the student's confusion matrix (rows: true class, in % of the class).

Each figure, the report's text and the penultimate features (TensorBoard's projector, labelled by
class) are also logged to the run's TensorBoard (its own event files, tags analysis/...).
"""
import argparse
import math
import shutil
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.manifold import TSNE

matplotlib.use("Agg")  # files only: no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.distributed import setup  # noqa: E402
from core.errors import UserError, exits_cleanly  # noqa: E402
from core.ranges import at_least  # noqa: E402
from dataset.loaders import LOADERS, build_loaders  # noqa: E402
from deploy import analysis  # noqa: E402
from deploy.metrics import (  # noqa: E402
    ECE_BINS,
    agreement,
    expected_calibration_error,
    kl_teacher_student,
    prediction_entropy,
    topk_accuracy,
)
from deploy.network import read_network, read_run  # noqa: E402
from engine import runs  # noqa: E402
from engine.args import Parser, check_ranges  # noqa: E402
from engine.atomic import write_atomic  # noqa: E402
from engine.precision import resolve_amp  # noqa: E402
from engine.teacher import build_teacher  # noqa: E402

FOLDER = "analysis"
EMBEDDING_STEP = "00000"  # where add_embedding writes a tag without a global step
FIGURES = {
    "correlation_difference": "|student − teacher| of the class-mean logits (CRD's correlation figure), diagonal left out",
    "cka": "linear CKA between every stage of teacher and student",
    "tsne": "t-SNE of the penultimate features, coloured by class",
    "reliability": f"reliability diagrams ({ECE_BINS} equal-width confidence bins, ECE's)",
    "entropy": "prediction entropy of every test image",
    "per_class_accuracy": "per-class top-1, student against teacher; the classes of largest disagreement named",
    "confusion": "the student's confusion matrix, in % of each true class",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description="A distilled student against its teacher: figures and a report per run.")
    parser.add_argument("runs", nargs="+", help="train_student.py run directories")
    parser.add_argument("--stage_images", type=int, default=1000, valid=at_least(2),
                        help="test images (the first of the split) that CKA compares the stages on")
    parser.add_argument("--tsne_images", type=int, default=2000, valid=at_least(6),
                        help="test images (the first of the split) in the t-SNE and the projector")
    parser.add_argument("--classes", type=int, default=5, valid=at_least(1),
                        help="classes of largest disagreement named in the report and figure")
    parser.add_argument("--batch_size", type=int, default=256, valid=at_least(1), help="test batch size")
    parser.add_argument("--loader", type=str, default="auto", choices=LOADERS)
    parser.add_argument("--num_workers", type=int, default=8, valid=at_least(0), help="DataLoader workers (torch loader)")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:<k>")
    parser.add_argument("--amp", type=str, default="off", choices=("off", "auto", "bf16", "fp16"),
                        help="autocast precision of the pass (default: full precision)")
    parser.add_argument("--no_tensorboard", action="store_true", help="write the files only")
    args = parser.parse_args(argv)
    check_ranges(parser, args)
    return args


def read_student(run_dir) -> dict:
    """The run, its student checkpoint and its (first) teacher's, all read before any data loads."""
    found = read_run(run_dir)
    if not found["teachers"]:
        raise UserError(f"{run_dir} was trained from labels alone (its args.json names no --path_t); "
                        "name a distilled student's run directory")
    found["path_t"] = found["teachers"][0]
    found["state_t"], found["arch_t"] = read_network(found["path_t"], None, "--path_t")
    return found


# --- measurements ----------------------------------------------------------------------------
def measure(found: dict, args, ctx, amp_dtype) -> dict:
    """Every number and array of the report, from one pass over the test split."""
    _, test_loader, info = build_loaders(found["dataset"], found["data_folder"], 1, loader=args.loader,
                                         device=ctx.device, num_workers=args.num_workers,
                                         test_batch_size=args.batch_size)
    classes = info.num_classes
    student = build_teacher(found["state"], found["arch"], classes, found["path"], found["dataset"])
    teacher = build_teacher(found["state_t"], found["arch_t"], classes, found["path_t"], found["dataset"])
    (out_s, out_t), targets = analysis.collect_features([student.to(ctx.device), teacher.to(ctx.device)],
                                                        test_loader, ctx.device, amp_dtype, args.stage_images)
    probs_s, probs_t = F.softmax(out_s["logits"].double(), 1), F.softmax(out_t["logits"].double(), 1)
    accuracy_s = analysis.per_class_accuracy(out_s["logits"], targets, classes)
    accuracy_t = analysis.per_class_accuracy(out_t["logits"], targets, classes)
    n_stage = len(out_s["stages"][0]) if out_s["stages"] else 0
    return {
        "classes": classes, "targets": targets, "pooled_s": out_s["pooled"], "pooled_t": out_t["pooled"],
        "top1_s": topk_accuracy(out_s["logits"], targets, (1,))[0],
        "top1_t": topk_accuracy(out_t["logits"], targets, (1,))[0],
        "ece_s": expected_calibration_error(probs_s, targets), "ece_t": expected_calibration_error(probs_t, targets),
        "entropy_s": prediction_entropy(probs_s), "entropy_t": prediction_entropy(probs_t),
        "agreement": agreement(out_s["logits"], out_t["logits"]),
        "kl_teacher_student": kl_teacher_student(out_s["logits"], out_t["logits"]),
        "correlation_difference": analysis.logit_correlation_difference(out_s["logits"], out_t["logits"], targets,
                                                                        classes),
        "cka": analysis.cka_matrix(out_t["stages"], out_s["stages"]), "cka_images": n_stage,
        "cka_pooled": analysis.linear_cka(out_s["pooled"][:n_stage], out_t["pooled"][:n_stage]),
        "reliability_s": analysis.reliability_bins(probs_s, targets),
        "reliability_t": analysis.reliability_bins(probs_t, targets),
        "accuracy_s": accuracy_s, "accuracy_t": accuracy_t,
        "disagreements": analysis.largest_disagreements(accuracy_s, accuracy_t, args.classes),
        "confusion": analysis.confusion_matrix(out_s["logits"], targets, classes),
    }


# --- figures ---------------------------------------------------------------------------------
def class_ticks(ax, classes: int) -> None:
    """Every class on both axes where they fit."""
    if classes <= 20:
        ax.set_xticks(range(classes))
        ax.set_yticks(range(classes))


def correlation_figure(m: dict, names: dict):
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    diff = m["correlation_difference"].numpy()
    image = ax.imshow(diff, vmin=0, vmax=analysis.CORRELATION_SCALE, cmap="PuBuGn")
    fig.colorbar(image, ax=ax, label="|difference| of mean logits")
    class_ticks(ax, m["classes"])
    off = analysis.off_diagonal(m["correlation_difference"])
    ax.set(xlabel="logit of class", ylabel="true class",
           title=f"{names['student']} vs {names['teacher']}\nmean {off.nanmean():.3f}, max {off.nan_to_num(0).max():.3f}")
    return fig


def cka_figure(m: dict, names: dict):
    cka = m["cka"].numpy()
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * cka.shape[1], 1.0 + 1.0 * cka.shape[0]))
    image = ax.imshow(cka, vmin=0, vmax=1, cmap="magma")
    for (i, j), value in np.ndenumerate(cka):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_xticks(range(cka.shape[1]), [f"{k + 1}" for k in range(cka.shape[1])])
    ax.set_yticks(range(cka.shape[0]), [f"{k + 1}" for k in range(cka.shape[0])])
    ax.set(xlabel=f"student stage ({names['student']})", ylabel=f"teacher stage ({names['teacher']})",
           title=f"linear CKA, {m['cka_images']} test images")
    fig.colorbar(image, ax=ax)
    return fig


def tsne_figure(m: dict, names: dict, n: int):
    targets = m["targets"][:n].numpy()
    cmap = plt.get_cmap("tab10" if m["classes"] <= 10 else "tab20" if m["classes"] <= 20 else "nipy_spectral")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    for ax, key, who in zip(axes, ("pooled_s", "pooled_t"), ("student", "teacher")):
        features = m[key][:n].double().numpy()
        points = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(features) - 1) / 3), random_state=0,
                      ).fit_transform(features)
        scatter = ax.scatter(points[:, 0], points[:, 1], c=targets, cmap=cmap, s=6, alpha=0.8,
                             vmin=-0.5, vmax=m["classes"] - 0.5)
        ax.set(xticks=[], yticks=[], title=f"{who}: {names[who]}")
    if m["classes"] <= 20:
        fig.colorbar(scatter, ax=axes, ticks=range(m["classes"]), label="class")
    fig.suptitle(f"t-SNE of the penultimate features, {len(targets)} test images")
    return fig


def reliability_figure(m: dict, names: dict):
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, who, key in zip(axes, ("student", "teacher"), ("s", "t")):
        bins = m[f"reliability_{key}"]
        edges = bins["edges"].numpy()
        centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        accuracy = bins["accuracy"].nan_to_num(0).numpy()
        confidence = bins["confidence"].numpy()
        ax.bar(centres, accuracy, width=width, edgecolor="black", color="tab:blue", label="accuracy")
        ax.bar(centres, abs(confidence - accuracy), bottom=np.minimum(confidence, accuracy), width=width,
               fill=False, hatch="//", edgecolor="tab:red", label="gap to the mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)",
               title=f"{who}: {names[who]}, ECE {m[f'ece_{key}']:.4f}")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    return fig


def entropy_figure(m: dict, names: dict):
    fig, ax = plt.subplots(figsize=(6, 4))
    top = math.log(m["classes"])
    for who, key, colour in (("student", "s", "tab:blue"), ("teacher", "t", "tab:orange")):
        values = m[f"entropy_{key}"].numpy()
        ax.hist(values, bins=30, range=(0, top), alpha=0.55, color=colour,
                label=f"{who} ({names[who]}), mean {values.mean():.3f}")
    ax.set(xlabel="prediction entropy (nats)", ylabel="test images", xlim=(0, top),
           title=f"prediction entropy (max log {m['classes']} = {top:.2f})")
    ax.legend()
    return fig


def per_class_figure(m: dict, names: dict):
    fig, ax = plt.subplots(figsize=(5, 5))
    teacher, student = m["accuracy_t"].numpy(), m["accuracy_s"].numpy()
    ax.plot([0, 100], [0, 100], "k--", lw=1)
    ax.scatter(teacher, student, s=18, color="tab:blue", alpha=0.7)
    for c in m["disagreements"]:
        ax.scatter(teacher[c], student[c], s=40, facecolor="none", edgecolor="tab:red")
        ax.annotate(str(c), (teacher[c], student[c]), textcoords="offset points", xytext=(4, 4), color="tab:red")
    ax.set(xlim=(-2, 102), ylim=(-2, 102), xlabel=f"teacher top-1 per class (%) ({names['teacher']})",
           ylabel=f"student top-1 per class (%) ({names['student']})",
           title=f"per-class top-1; red: the {len(m['disagreements'])} largest gaps")
    return fig


def confusion_figure(m: dict, names: dict):
    confusion = m["confusion"].double()
    percent = (100 * confusion / confusion.sum(1, keepdim=True).clamp(min=1)).numpy()
    size = 4.5 if m["classes"] <= 20 else 7
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(percent, vmin=0, vmax=100, cmap="Blues")
    if m["classes"] <= 10:
        for (i, j), count in np.ndenumerate(m["confusion"].numpy()):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if percent[i, j] > 50 else "black")
    fig.colorbar(image, ax=ax, label="% of the true class")
    class_ticks(ax, m["classes"])
    ax.set(xlabel="predicted class", ylabel="true class", title=f"student ({names['student']}): confusion")
    return fig


def draw(m: dict, names: dict, args) -> dict:
    return {"correlation_difference": correlation_figure(m, names), "cka": cka_figure(m, names),
            "tsne": tsne_figure(m, names, args.tsne_images), "reliability": reliability_figure(m, names),
            "entropy": entropy_figure(m, names), "per_class_accuracy": per_class_figure(m, names),
            "confusion": confusion_figure(m, names)}


# --- the report ------------------------------------------------------------------------------
def summary(found: dict, m: dict) -> dict:
    """The report's numbers, as analysis.json keeps them."""
    off = analysis.off_diagonal(m["correlation_difference"])
    return {"run": str(found["dir"]), "student": found["arch"], "teacher": found["arch_t"],
            "teacher_checkpoint": str(found["path_t"]), "dataset": found["dataset"], "n_test": len(m["targets"]),
            "top1_student": m["top1_s"], "top1_teacher": m["top1_t"], "agreement": m["agreement"],
            "kl_teacher_student": m["kl_teacher_student"], "ece_student": m["ece_s"], "ece_teacher": m["ece_t"],
            "ece_bins": ECE_BINS, "mean_entropy_student": float(m["entropy_s"].mean()),
            "mean_entropy_teacher": float(m["entropy_t"].mean()),
            "correlation_difference_mean": float(off.nanmean()), "correlation_difference_max": float(off.nan_to_num(0).max()),
            "cka_images": m["cka_images"], "cka": m["cka"].tolist(), "cka_pooled": m["cka_pooled"],
            "per_class_top1_student": m["accuracy_s"].tolist(), "per_class_top1_teacher": m["accuracy_t"].tolist(),
            "largest_disagreements": m["disagreements"], "confusion_student": m["confusion"].tolist()}


def report_markdown(s: dict) -> str:
    cka = torch.tensor(s["cka"])
    rows = [("top-1 (%)", f"{s['top1_student']:.2f}", f"{s['top1_teacher']:.2f}"),
            (f"ECE ({s['ece_bins']} bins)", f"{s['ece_student']:.4f}", f"{s['ece_teacher']:.4f}"),
            ("mean prediction entropy (nats)", f"{s['mean_entropy_student']:.4f}", f"{s['mean_entropy_teacher']:.4f}"),
            ("top-1 agreement with the teacher (%)", f"{s['agreement']:.2f}", ""),
            ("KL(teacher ‖ student), T=1 (nats)", f"{s['kl_teacher_student']:.4f}", ""),
            ("class-mean logit difference, mean / max off the diagonal",
             f"{s['correlation_difference_mean']:.4f} / {s['correlation_difference_max']:.4f}", ""),
            ("linear CKA, last stages / penultimate features",
             f"{cka[-1, -1].item():.4f} / {s['cka_pooled']:.4f}", "")]
    lines = [f"# {Path(s['run']).name}: student against its teacher", "",
             f"Student {s['student']}, teacher {s['teacher']} (`{s['teacher_checkpoint']}`), "
             f"{s['dataset']} test split ({s['n_test']} images; CKA on the first {s['cka_images']}).", "",
             "| metric | student | teacher |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "## Classes of largest disagreement", "",
              "| class | student top-1 (%) | teacher top-1 (%) | student − teacher |", "|---|---|---|---|"]
    for c in s["largest_disagreements"]:
        a, b = s["per_class_top1_student"][c], s["per_class_top1_teacher"][c]
        lines.append(f"| {c} | {a:.1f} | {b:.1f} | {a - b:+.1f} |")
    lines += ["", "## Figures", ""]
    for name, caption in FIGURES.items():
        lines += [f"### {caption[0].upper()}{caption[1:]}", "", f"![{name}]({name}.png) ([PDF]({name}.pdf))", ""]
    return "\n".join(lines)


def write_outputs(found: dict, m: dict, figures: dict, args) -> Path:
    folder = found["dir"] / FOLDER
    folder.mkdir(exist_ok=True)
    numbers = summary(found, m)
    text = report_markdown(numbers)
    for name, fig in figures.items():
        for suffix in ("png", "pdf"):
            fig.savefig(folder / f"{name}.{suffix}", dpi=150, bbox_inches="tight")
    runs.write_json(folder / "analysis.json", numbers)
    write_atomic(folder / "report.md", text.encode())
    if not args.no_tensorboard:
        log_tensorboard(found["dir"], m, figures, text, args.tsne_images)
    for fig in figures.values():
        plt.close(fig)
    return folder / "report.md"


def log_tensorboard(run_dir: Path, m: dict, figures: dict, text: str, n: int) -> None:
    """Into the run's own TensorBoard folder: the figures, the report and both penultimate
    feature sets for the projector (metadata: the class)."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        for name in figures:  # the PNGs written, not a second rendering of each figure
            image = np.asarray(Image.open(run_dir / FOLDER / f"{name}.png").convert("RGB"))
            writer.add_image(f"{FOLDER}/{name}", image, dataformats="HWC")
        writer.add_text(f"{FOLDER}/report", text)
        labels = m["targets"][:n].tolist()
        for who, key in (("student", "pooled_s"), ("teacher", "pooled_t")):
            tag = f"{FOLDER}_penultimate_{who}"
            shutil.rmtree(run_dir / EMBEDDING_STEP / tag, ignore_errors=True)  # an earlier analysis's
            writer.add_embedding(m[key][:n], metadata=labels, tag=tag)
    finally:
        writer.close()


@exits_cleanly
def main(argv=None) -> list:
    args = parse_args(argv)
    found = [read_student(run) for run in args.runs]
    ctx = setup(args.device)
    amp_dtype = resolve_amp(args.amp, ctx.device)
    reports = []
    for run in found:
        m = measure(run, args, ctx, amp_dtype)
        names = {"student": f"{run['arch']} ({run['args'].get('distill', '?')})", "teacher": run["arch_t"]}
        report = write_outputs(run, m, draw(m, names, args), args)
        print(f"{run['dir']}: {report}")
        reports.append(report)
    return reports


if __name__ == "__main__":
    main()
