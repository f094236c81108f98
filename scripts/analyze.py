"""A distilled student against its teacher, beyond accuracy: a report per run with its figures.

    python scripts/analyze.py save/students/<run> [more runs ...]

For each run directory (train_student.py's: args.json, best.pth; its teacher the run's --path_t)
one pass over the run's data set's test split, then in <run>/analysis/: report.md, analysis.json,
and every figure as PNG and PDF:

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

A run with several teachers is compared with each of them: a section of the report per teacher k
(0-based in --path_t's order), its figures <name>_teacher<k>, and the student's confusion matrix
once. Where its KD term learned from their ensemble (-a > 0), a last section compares the student
with that ensemble's mixture of the teachers' probabilities (distiller_zoo/multi_teacher.py, at
T = 1 like every prediction here): the figures that compare predictions (reliability, entropy,
per_class_accuracy)_ensemble; a mixture of probabilities has no logits or features to compare.
"""
import argparse
import math
import shutil
import sys
from pathlib import Path

import matplotlib
import numpy as np
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
from distiller_zoo.multi_teacher import ensemble_log_probs  # noqa: E402
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
STUDENT_FIGURES = ("confusion",)  # the same against every teacher: drawn once
PREDICTION_FIGURES = ("reliability", "entropy", "per_class_accuracy")  # those an ensemble's probabilities allow


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
    """The run, its student checkpoint and its teachers', all read before any data loads;
    'references': what the student is compared with (see `references`)."""
    found = read_run(run_dir)
    if not found["teachers"]:
        raise UserError(f"{run_dir} was trained from labels alone (its args.json names no --path_t); "
                        "name a distilled student's run directory")
    found["references"] = references(found)
    return found


def references(found: dict) -> list:
    """Per comparison: 'tag' (of its TensorBoard embedding and, with several teachers, of its
    figures), 'name' (in the figures), 'arch', 'path', 'figures'; a teacher's also 'state'; the
    ensemble's 'mode'. One teacher: 'teacher'; several: 'teacher<k>' each, then the ensemble
    where the run's KD term learned from it."""
    paths = found["teachers"]
    networks = [(path, *read_network(path, None, "--path_t")) for path in paths]
    if len(paths) == 1:
        path, state, arch = networks[0]
        return [{"tag": "teacher", "name": arch, "arch": arch, "path": str(path), "state": state,
                 "figures": tuple(FIGURES)}]
    teachers = [{"tag": f"teacher{k}", "name": f"{arch} (teacher {k})", "arch": arch, "path": str(path),
                 "state": state, "figures": tuple(name for name in FIGURES if name not in STUDENT_FIGURES)}
                for k, (path, state, arch) in enumerate(networks)]
    if not found["args"].get("alpha"):  # the teachers' ensemble was no part of the loss
        return teachers
    mode = found["args"].get("multi_teacher", "average")
    archs = " + ".join(arch for _, _, arch in networks)
    return teachers + [{"tag": "ensemble", "name": f"{mode} ensemble of {archs}", "arch": f"{mode} ensemble of {archs}",
                        "path": ",".join(map(str, paths)), "mode": mode, "figures": PREDICTION_FIGURES}]


# --- measurements ----------------------------------------------------------------------------
def measure(found: dict, args, ctx, amp_dtype) -> list:
    """Every number and array of the report, from one pass over the test split: one dict per
    reference of found['references'], in their order."""
    _, test_loader, info = build_loaders(found["dataset"], found["data_folder"], 1, loader=args.loader,
                                         device=ctx.device, num_workers=args.num_workers,
                                         test_batch_size=args.batch_size)
    classes = info.num_classes
    teachers = [ref for ref in found["references"] if "state" in ref]
    networks = [build_teacher(net["state"], net["arch"], classes, net["path"], found["dataset"]).to(ctx.device)
                for net in (found, *teachers)]
    (out_s, *outs_t), targets = analysis.collect_features(networks, test_loader, ctx.device, amp_dtype,
                                                          args.stage_images)
    compared = [compare(out_s, out_t, targets, classes, args.classes) for out_t in outs_t]
    for ref in found["references"][len(teachers):]:  # the ensemble, its log-probabilities read as logits
        log_probs = ensemble_log_probs(ref["mode"], [out["logits"].double() for out in outs_t], targets)
        compared.append(compare(out_s, {"logits": log_probs}, targets, classes, args.classes))
    return compared


def compare(out_s: dict, out_t: dict, targets, classes: int, k: int) -> dict:
    """The student against one reference: a teacher (collect_features's logits, pooled features
    and stages) or an ensemble (logits alone: log-probabilities, which softmax and argmax read
    as they are; the logit and feature comparisons are left out)."""
    probs_s, probs_t = F.softmax(out_s["logits"].double(), 1), F.softmax(out_t["logits"].double(), 1)
    accuracy_s = analysis.per_class_accuracy(out_s["logits"], targets, classes)
    accuracy_t = analysis.per_class_accuracy(out_t["logits"], targets, classes)
    m = {
        "classes": classes, "targets": targets, "pooled_s": out_s["pooled"],
        "top1_s": topk_accuracy(out_s["logits"], targets, (1,))[0],
        "top1_t": topk_accuracy(out_t["logits"], targets, (1,))[0],
        "ece_s": expected_calibration_error(probs_s, targets), "ece_t": expected_calibration_error(probs_t, targets),
        "entropy_s": prediction_entropy(probs_s), "entropy_t": prediction_entropy(probs_t),
        "agreement": agreement(out_s["logits"], out_t["logits"]),
        "kl_teacher_student": kl_teacher_student(out_s["logits"], out_t["logits"]),
        "reliability_s": analysis.reliability_bins(probs_s, targets),
        "reliability_t": analysis.reliability_bins(probs_t, targets),
        "accuracy_s": accuracy_s, "accuracy_t": accuracy_t,
        "disagreements": analysis.largest_disagreements(accuracy_s, accuracy_t, k),
        "confusion": analysis.confusion_matrix(out_s["logits"], targets, classes),
    }
    if "pooled" in out_t:
        n_stage = len(out_s["stages"][0]) if out_s["stages"] else 0
        m.update({
            "pooled_t": out_t["pooled"],
            "correlation_difference": analysis.logit_correlation_difference(out_s["logits"], out_t["logits"], targets,
                                                                            classes),
            "cka": analysis.cka_matrix(out_t["stages"], out_s["stages"]), "cka_images": n_stage,
            "cka_pooled": analysis.linear_cka(out_s["pooled"][:n_stage], out_t["pooled"][:n_stage]),
        })
    return m


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


def draw(m: dict, names: dict, args, which, suffix: str = "") -> dict:
    """The figures `which` of one comparison, keyed by their file names (the figure's + suffix)."""
    drawers = {"correlation_difference": correlation_figure, "cka": cka_figure,
               "tsne": lambda m, names: tsne_figure(m, names, args.tsne_images), "reliability": reliability_figure,
               "entropy": entropy_figure, "per_class_accuracy": per_class_figure, "confusion": confusion_figure}
    return {name + suffix: drawers[name](m, names) for name in which}


def draw_all(found: dict, compared: list, args) -> dict:
    """Every comparison's figures; with several teachers named per reference, the student's own once."""
    several = len(compared) > 1
    student = f"{found['arch']} ({found['args'].get('distill', '?')})"
    figures = {}
    for ref, m in zip(found["references"], compared):
        names = {"student": student, "teacher": ref["name"]}
        figures.update(draw(m, names, args, ref["figures"], f"_{ref['tag']}" if several else ""))
    if several:
        figures.update(draw(compared[0], {"student": student}, args, STUDENT_FIGURES))
    return figures


# --- the report ------------------------------------------------------------------------------
def summary(found: dict, ref: dict, m: dict) -> dict:
    """The numbers of one comparison, as analysis.json keeps them (an ensemble's without the
    logit and feature comparisons)."""
    features = {}
    if "cka" in m:
        off = analysis.off_diagonal(m["correlation_difference"])
        features = {"correlation_difference_mean": float(off.nanmean()),
                    "correlation_difference_max": float(off.nan_to_num(0).max()),
                    "cka_images": m["cka_images"], "cka": m["cka"].tolist(), "cka_pooled": m["cka_pooled"]}
    return {"run": str(found["dir"]), "student": found["arch"], "teacher": ref["arch"],
            "teacher_checkpoint": ref["path"], "dataset": found["dataset"], "n_test": len(m["targets"]),
            "top1_student": m["top1_s"], "top1_teacher": m["top1_t"], "agreement": m["agreement"],
            "kl_teacher_student": m["kl_teacher_student"], "ece_student": m["ece_s"], "ece_teacher": m["ece_t"],
            "ece_bins": ECE_BINS, "mean_entropy_student": float(m["entropy_s"].mean()),
            "mean_entropy_teacher": float(m["entropy_t"].mean()), **features,
            "per_class_top1_student": m["accuracy_s"].tolist(), "per_class_top1_teacher": m["accuracy_t"].tolist(),
            "largest_disagreements": m["disagreements"], "confusion_student": m["confusion"].tolist()}


def comparison_markdown(s: dict, figures: dict, level: int, who: str = "teacher") -> list:
    """One comparison's table, classes of largest disagreement and figures ({file name: figure
    name}), under headings of `level`; `who`: the reference's column."""
    rows = [("top-1 (%)", f"{s['top1_student']:.2f}", f"{s['top1_teacher']:.2f}"),
            (f"ECE ({s['ece_bins']} bins)", f"{s['ece_student']:.4f}", f"{s['ece_teacher']:.4f}"),
            ("mean prediction entropy (nats)", f"{s['mean_entropy_student']:.4f}", f"{s['mean_entropy_teacher']:.4f}"),
            (f"top-1 agreement with the {who} (%)", f"{s['agreement']:.2f}", ""),
            (f"KL({who} ‖ student), T=1 (nats)", f"{s['kl_teacher_student']:.4f}", "")]
    if "cka" in s:
        rows += [("class-mean logit difference, mean / max off the diagonal",
                  f"{s['correlation_difference_mean']:.4f} / {s['correlation_difference_max']:.4f}", ""),
                 ("linear CKA, last stages / penultimate features",
                  f"{s['cka'][-1][-1]:.4f} / {s['cka_pooled']:.4f}", "")]
    heading = "#" * level
    lines = [f"| metric | student | {who} |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", f"{heading} Classes of largest disagreement", "",
              f"| class | student top-1 (%) | {who} top-1 (%) | student − {who} |", "|---|---|---|---|"]
    for c in s["largest_disagreements"]:
        a, b = s["per_class_top1_student"][c], s["per_class_top1_teacher"][c]
        lines.append(f"| {c} | {a:.1f} | {b:.1f} | {a - b:+.1f} |")
    lines += ["", f"{heading} Figures", ""]
    lines += figure_lines(figures, level + 1)
    return lines


def figure_lines(figures: dict, level: int) -> list:
    """Each figure ({file name: figure name}) under a heading of `level` with its caption."""
    lines = []
    for file, name in figures.items():
        caption = FIGURES[name]
        lines += [f"{'#' * level} {caption[0].upper()}{caption[1:]}", "", f"![{name}]({file}.png) ([PDF]({file}.pdf))", ""]
    return lines


def report_markdown(found: dict, records: list) -> str:
    """The report: one teacher's comparison, or a section per teacher (and the ensemble)."""
    refs, first = found["references"], records[0]
    if len(refs) == 1:
        lines = [f"# {Path(first['run']).name}: student against its teacher", "",
                 f"Student {first['student']}, teacher {first['teacher']} (`{first['teacher_checkpoint']}`), "
                 f"{first['dataset']} test split ({first['n_test']} images; CKA on the first {first['cka_images']}).", ""]
        return "\n".join(lines + comparison_markdown(first, {name: name for name in FIGURES}, 2))
    teachers = [ref for ref in refs if "state" in ref]
    lines = [f"# {Path(first['run']).name}: student against its {len(teachers)} teachers", "",
             f"Student {first['student']}, {first['dataset']} test split ({first['n_test']} images; CKA on the first "
             f"{first['cka_images']}): a section per teacher (0-based in `--path_t`'s order)"
             + (", then the ensemble its KD term learned from" if len(refs) > len(teachers) else "")
             + ", then the student's confusion matrix.", ""]
    for k, (ref, record) in enumerate(zip(refs, records)):
        lines += section_intro(k, ref)
        lines += comparison_markdown(record, {f"{name}_{ref['tag']}": name for name in ref["figures"]}, 3,
                                     "teacher" if "state" in ref else "ensemble")
    return "\n".join(lines + ["## The student", ""] + figure_lines({name: name for name in STUDENT_FIGURES}, 3))


def section_intro(k: int, ref: dict) -> list:
    """The heading and first paragraph of teacher k's section, or of the ensemble's."""
    if "state" in ref:
        return [f"## Teacher {k}: {ref['arch']}", "", f"`{ref['path']}`", ""]
    weights = ("w_k = 1/K" if ref["mode"] == "average" else
               "CA-MKD's w_k, from each teacher's cross-entropy with the test label, so its top-1 uses the labels")
    return [f"## The {ref['mode']} ensemble of the teachers", "",
            f"The mixture sum_k w_k softmax(z_k) of the teachers' probabilities at T = 1 that the KD term's "
            f"`--multi_teacher {ref['mode']}` target is (distiller_zoo/multi_teacher.py; {weights}). "
            "It has no logits or features: no logit difference, CKA or t-SNE.", ""]


def write_outputs(found: dict, compared: list, args) -> Path:
    folder = found["dir"] / FOLDER
    folder.mkdir(exist_ok=True)
    records = [summary(found, ref, m) for ref, m in zip(found["references"], compared)]
    text = report_markdown(found, records)
    figures = draw_all(found, compared, args)
    for name, fig in figures.items():
        for suffix in ("png", "pdf"):
            fig.savefig(folder / f"{name}.{suffix}", dpi=150, bbox_inches="tight")
    teachers = len(found["teachers"])
    runs.write_json(folder / "analysis.json", records[0] if len(records) == 1 else
                    {"teachers": records[:teachers], "ensemble": records[teachers] if len(records) > teachers else None})
    write_atomic(folder / "report.md", text.encode())
    if not args.no_tensorboard:
        embeddings = {"student": compared[0]["pooled_s"], **{ref["tag"]: m["pooled_t"] for ref, m in
                                                              zip(found["references"], compared) if "pooled_t" in m}}
        log_tensorboard(found["dir"], figures, text, embeddings, compared[0]["targets"], args.tsne_images)
    for fig in figures.values():
        plt.close(fig)
    return folder / "report.md"


def log_tensorboard(run_dir: Path, figures: dict, text: str, embeddings: dict, targets, n: int) -> None:
    """Into the run's own TensorBoard folder: the figures, the report and the penultimate
    features of each network ({tag: features}) for the projector (metadata: the class)."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        for name in figures:  # the PNGs written, not a second rendering of each figure
            image = np.asarray(Image.open(run_dir / FOLDER / f"{name}.png").convert("RGB"))
            writer.add_image(f"{FOLDER}/{name}", image, dataformats="HWC")
        writer.add_text(f"{FOLDER}/report", text)
        labels = targets[:n].tolist()
        for who, features in embeddings.items():
            tag = f"{FOLDER}_penultimate_{who}"
            shutil.rmtree(run_dir / EMBEDDING_STEP / tag, ignore_errors=True)  # an earlier analysis's
            writer.add_embedding(features[:n], metadata=labels, tag=tag)
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
        report = write_outputs(run, measure(run, args, ctx, amp_dtype), args)
        print(f"{run['dir']}: {report}")
        reports.append(report)
    return reports


if __name__ == "__main__":
    main()
