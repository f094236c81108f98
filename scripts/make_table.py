"""Turn a tree of run directories into the paper's tables.

    python scripts/make_table.py save/students save/teachers
    python scripts/make_table.py save --metric best --format latex --out table.tex --figure table.png

Reads every results.json under the given folders. Rows are methods (with the teacher
and the vanilla student first), columns teacher -> student pairs; each cell is the
mean ± sample std over trials with the number of trials, and for CIFAR-100 the
published number beside ours with the difference. RepDistiller's tables report the
last epoch of one run, mdistiller's the best epoch averaged over 5 runs: --metric
chooses, and the header says which.
"""
import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.runs import read_results  # noqa: E402  (after the path insert)

HERE = Path(__file__).resolve().parent
PUBLISHED = {"cifar100": HERE / "published_cifar100.csv", "imagenet": HERE / "published_imagenet.csv"}
REFERENCE_ROWS = ("teacher", "vanilla")
FROM_LABELS = ("vanilla", "teacher")  # results.json's method of train_teacher.py runs (older runs: 'teacher')
# the top-1 a table ranks by, by its results.json key: RepDistiller's tables report the last
# epoch (the default), mdistiller's the best
METRICS = {"last": "last_top1", "best": "best_top1"}


def add_metric_flag(parser) -> None:
    """--metric, the same in every script that ranks runs (this one and pareto.py)."""
    parser.add_argument("--metric", choices=tuple(METRICS), default="last",
                        help="last epoch (RepDistiller's tables, the default) or best epoch (mdistiller's)")


def metric_label(metric: str) -> str:
    return f"{metric}-epoch top-1 (%)"


def load_runs(folders) -> pd.DataFrame:
    records = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            r = read_results(path)
            if r is None:
                continue
            records.append({"dataset": r.get("dataset"), "model": r.get("model"), "teacher": r.get("teacher"),
                            "method": r.get("method", "teacher"), "beta": str(r.get("beta", "")),
                            "trial": r.get("trial"), **{m: r.get(key) for m, key in METRICS.items()},
                            "run": str(path.parent)})
    return pd.DataFrame.from_records(records, columns=["dataset", "model", "teacher", "method", "beta", "trial",
                                                      *METRICS, "run"])


def label_weights(students: pd.DataFrame) -> pd.DataFrame:
    """A method run at several -b weights on one data set gets a row per weight ('cat_kd (b 1.5)'),
    so that runs at different weights never share a cell."""
    several = students.groupby(["dataset", "method"])["beta"].transform("nunique") > 1
    labelled = students["method"] + " (b " + students["beta"] + ")"
    return students.assign(method=students["method"].where(~several, labelled))


def summarise(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (dataset, pair, method): mean, std, n of `metric`, plus published and diff."""
    students = label_weights(runs[~runs["method"].isin(FROM_LABELS)])
    trained = runs[runs["method"].isin(FROM_LABELS)]
    rows = []
    for (dataset, teacher, student), group in students.groupby(["dataset", "teacher", "model"], sort=False):
        reference = {"teacher": trained[(trained["dataset"] == dataset) & (trained["model"] == teacher)],
                     "vanilla": trained[(trained["dataset"] == dataset) & (trained["model"] == student)]}
        for method, values in [*reference.items(), *group.groupby("method", sort=False)]:
            rows.append({"dataset": dataset, "teacher": teacher, "student": student, "method": method,
                         **stats(values[metric])})
    table = pd.DataFrame(rows, columns=["dataset", "teacher", "student", "method", "mean", "std", "n"])
    return attach_published(table)


def stats(values: pd.Series) -> dict:
    values = values.dropna()
    n = len(values)
    return {"mean": values.mean() if n else float("nan"),
            "std": values.std(ddof=1) if n > 1 else float("nan"), "n": n}


def published_numbers() -> pd.DataFrame:
    """Every published number the tables compare with, one row per (dataset, pair, method)."""
    return pd.concat([pd.read_csv(path).assign(dataset=dataset) for dataset, path in PUBLISHED.items()],
                     ignore_index=True)


def attach_published(table: pd.DataFrame) -> pd.DataFrame:
    published = published_numbers().rename(columns={"top1": "published"})
    published = published.groupby(["dataset", "teacher", "student", "method"], as_index=False)["published"].first()
    table = table.merge(published, on=["dataset", "teacher", "student", "method"], how="left")
    table["diff"] = table["mean"] - table["published"]
    return table


def method_order(methods) -> list:
    published = list(dict.fromkeys(published_numbers()["method"]))
    known = [m for m in published if m in methods and m not in REFERENCE_ROWS]
    return [*REFERENCE_ROWS, *known, *sorted(m for m in methods if m not in known and m not in REFERENCE_ROWS)]


def cell(row, latex: bool = False) -> str:
    if row["n"] == 0:
        return "—"
    pm = r"$\pm$" if latex else "±"
    text = f"{row['mean']:.2f}" + (f" {pm} {row['std']:.2f}" if row["n"] > 1 else "") + f" ({row['n']})"
    if pd.notna(row.get("published")):
        text += f" [{row['published']:.2f}, {row['diff']:+.2f}]"
    return text


def wide(summary: pd.DataFrame, latex: bool = False) -> pd.DataFrame:
    summary = summary.assign(pair=summary["teacher"] + " → " + summary["student"],
                             cell=summary.apply(cell, axis=1, latex=latex))
    table = summary.pivot(index="method", columns="pair", values="cell")
    table = table.reindex(index=method_order(set(summary["method"])),
                          columns=list(dict.fromkeys(summary["pair"]))).fillna("—")
    table.index.name = "method"
    return table


def header(dataset: str, metric: str) -> str:
    note = " [published, ours − published]" if dataset in PUBLISHED else ""
    return f"{dataset}: {metric_label(metric)}, mean ± std over trials (number of trials){note}"


def render(summary: pd.DataFrame, metric: str, fmt: str) -> str:
    if fmt == "csv":
        return summary.assign(metric=metric).to_csv(index=False, float_format="%.4f")
    parts = []
    for dataset, group in summary.groupby("dataset", sort=False):
        table = wide(group, latex=fmt == "latex")
        if fmt == "latex":
            body = table.to_latex(escape=False, column_format="l" + "c" * table.shape[1])
            parts.append(f"% {header(dataset, metric)}\n" + body.replace("→", r"$\rightarrow$"))
        else:
            parts.append(f"### {header(dataset, metric)}\n\n{table.to_markdown()}\n")
    return "\n".join(parts)


FAMILY_COLOURS = {"logit": "tab:blue", "feature": "tab:orange", "relation": "tab:green",
                  "contrastive": "tab:purple", "combined": "tab:gray"}


def method_family(method: str) -> str:
    """The registry's family of a method label (`crd+kd` is combined, `kd+ls` a logit method)."""
    from distiller_zoo import ALIASES, METHODS
    names = [n for n in method.split(" (b ")[0].split("+") if n != "ls"]
    families = {METHODS[ALIASES[n]].family for n in names if n in ALIASES}
    return families.pop() if len(families) == 1 else "combined"


def plot(summary: pd.DataFrame, metric: str, path) -> None:
    """One dot plot per pair: each method's mean top-1 with its value, error bars (sample std)
    only where there are several trials, colour by method family, the teacher and the vanilla
    student as reference lines. Written as PNG and, beside it, PDF."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = list(dict.fromkeys(zip(summary["dataset"], summary["teacher"], summary["student"])))
    n_methods = summary["method"].nunique()
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 1.2 + 0.32 * n_methods), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        draw_pair(ax, summary, pair, metric)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=f) for f, c in FAMILY_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    fig.savefig(path.with_suffix(".png"), dpi=120)
    fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)


def draw_pair(ax, summary: pd.DataFrame, pair, metric: str) -> None:
    dataset, teacher, student = pair
    group = summary[(summary["dataset"] == dataset) & (summary["teacher"] == teacher)
                    & (summary["student"] == student) & (summary["n"] > 0)]
    reference = group[group["method"].isin(REFERENCE_ROWS)].set_index("method")["mean"]
    methods = group[~group["method"].isin(REFERENCE_ROWS)]
    order = method_order(set(methods["method"]))
    methods = methods.sort_values("method", key=lambda col: col.map(order.index), ascending=False)
    y = range(len(methods))
    for row_y, (_, row) in zip(y, methods.iterrows()):
        colour = FAMILY_COLOURS[method_family(row["method"])]
        err = row["std"] if row["n"] > 1 else None
        ax.errorbar(row["mean"], row_y, xerr=err, fmt="o", color=colour, capsize=3)
        label = f"{row['mean']:.1f}" + (f" ± {row['std']:.1f}" if row["n"] > 1 else "") + f" (n={row['n']})"
        ax.annotate(label, (row["mean"], row_y), xytext=(6, 4), textcoords="offset points", fontsize=7)
    for name, style in (("teacher", "--"), ("vanilla", ":")):
        if name in reference:
            ax.axvline(reference[name], ls=style, color="black", lw=1)
            ax.annotate(f"{name} {reference[name]:.1f}", (reference[name], len(methods) - 0.5), rotation=90,
                        fontsize=7, ha="right", va="top")
    ax.set_yticks(list(y), list(methods["method"]))
    ax.set_ylim(-0.7, len(methods) - 0.3)
    ax.set_title(f"{teacher} → {student} ({dataset})")
    ax.set_xlabel(metric_label(metric))
    ax.grid(axis="x", alpha=0.3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="folders to search for results.json")
    add_metric_flag(parser)
    parser.add_argument("--format", choices=("markdown", "csv", "latex"), default="markdown")
    parser.add_argument("--out", type=str, default=None, help="write the table here instead of stdout")
    parser.add_argument("--figure", type=str, default=None,
                        help="also draw top-1 per method to this PNG, with a PDF beside it")
    args = parser.parse_args(argv)
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing:
        print(f"error: no such folder: {', '.join(missing)}; pass the save/ folder of your runs", file=sys.stderr)
        return 2
    runs = load_runs(args.folders)
    summary = summarise(runs, args.metric)
    if summary.empty:
        print(f"error: no student runs (results.json with a method) under {', '.join(args.folders)}; "
              "run train_student.py first", file=sys.stderr)
        return 2
    text = render(summary, args.metric, args.format)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    if args.figure:
        plot(summary, args.metric, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
