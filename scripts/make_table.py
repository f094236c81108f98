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
import json
import sys
from pathlib import Path

import pandas as pd

PUBLISHED = Path(__file__).resolve().parent / "published_cifar100.csv"
REFERENCE_ROWS = ("teacher", "vanilla")


def load_runs(folders) -> pd.DataFrame:
    records = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            with open(path) as f:
                r = json.load(f)
            records.append({"dataset": r.get("dataset"), "model": r.get("model"), "teacher": r.get("teacher"),
                            "method": r.get("method", "teacher"), "trial": r.get("trial"),
                            "best": r.get("best_top1"), "last": r.get("last_top1"), "run": str(path.parent)})
    return pd.DataFrame.from_records(records, columns=["dataset", "model", "teacher", "method", "trial",
                                                      "best", "last", "run"])


def summarise(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (dataset, pair, method): mean, std, n of `metric`, plus published and diff."""
    students = runs[runs["method"] != "teacher"]
    trained = runs[runs["method"] == "teacher"]
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


def attach_published(table: pd.DataFrame) -> pd.DataFrame:
    published = pd.read_csv(PUBLISHED).rename(columns={"top1": "published"})
    published["dataset"] = "cifar100"
    published = published.groupby(["dataset", "teacher", "student", "method"], as_index=False)["published"].first()
    table = table.merge(published, on=["dataset", "teacher", "student", "method"], how="left")
    table["diff"] = table["mean"] - table["published"]
    return table


def method_order(methods) -> list:
    published = list(dict.fromkeys(pd.read_csv(PUBLISHED)["method"]))
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
    epoch = "last-epoch" if metric == "last" else "best-epoch"
    note = " [published, ours − published]" if dataset == "cifar100" else ""
    return f"{dataset}: {epoch} top-1 (%), mean ± std over trials (number of trials){note}"


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


def plot(summary: pd.DataFrame, metric: str, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = list(dict.fromkeys(zip(summary["dataset"], summary["teacher"], summary["student"])))
    fig, axes = plt.subplots(1, len(pairs), figsize=(max(4, 0.5 * summary["method"].nunique()) * len(pairs), 4),
                             squeeze=False)
    for ax, (dataset, teacher, student) in zip(axes[0], pairs):
        group = summary[(summary["dataset"] == dataset) & (summary["teacher"] == teacher)
                        & (summary["student"] == student) & (summary["n"] > 0)]
        order = method_order(set(group["method"]))
        group = group.sort_values("method", key=lambda col: col.map(order.index))
        ax.bar(group["method"], group["mean"], yerr=group["std"].fillna(0), capsize=3, color="tab:blue")
        ax.set_ylim(max(0, group["mean"].min() - 5), min(100, group["mean"].max() + 3))
        ax.set_title(f"{teacher} → {student} ({dataset})")
        ax.set_ylabel(f"{metric}-epoch top-1 (%)")
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="folders to search for results.json")
    parser.add_argument("--metric", choices=("last", "best"), default="last",
                        help="last epoch (RepDistiller's tables, the default) or best epoch (mdistiller's)")
    parser.add_argument("--format", choices=("markdown", "csv", "latex"), default="markdown")
    parser.add_argument("--out", type=str, default=None, help="write the table here instead of stdout")
    parser.add_argument("--figure", type=str, default=None, help="also write a PNG of top-1 per method")
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
