"""Ablation sweeps: a grid over any flags of a trainer, run through the suite's launchers, then
the ablation table (markdown, csv, LaTeX) and its figure.

    python scripts/ablate.py --name crd_nt --pair resnet32x4:resnet8x4 --trials 3 \
        --vary nce_k=256,1024,4096,16384 --vary nce_t=0.05,0.07,0.1 -- --distill crd
    python scripts/ablate.py --name kd_T --vary kd_T=1,2,4,8 --pair resnet32x4:resnet8x4 -- --distill kd
    python scripts/ablate.py ... --launcher slurm        # one Slurm job per run (scripts/slurm.py)
    python scripts/ablate.py ... --table_only            # the table of the runs finished so far

Every flag after `--` goes to every run; `--vary FLAG=V1,V2,...` (FLAG is the entry point's long
flag without its dashes, method options included) makes an axis, and the grid is every
combination of the axes' values, for each --pair (train_student.py: TEACHER:STUDENT, the teacher a
checkpoint or an architecture whose trial-0 run lies under --teachers) and each trial 1..--trials
(the trial sets the seed). Each run is named after its grid point
(<name>_<teacher>-<student>_<flag>-<value>..._trial<k>) and runs with --auto_resume: running the
same command again skips the finished runs and resumes the interrupted ones. The runs live under
--save (default ablations/<name>), apart from save/, so that the method tables never mix them in.

The launchers are the table scripts' (scripts/lib.sh): shell (scripts/run_commands.py, --jobs
processes), submitit-local or slurm (scripts/slurm.py submit, with the Slurm settings read from
the same environment variables as lib.sh's: PARTITION, TIME_LIMIT, GPUS_PER_JOB, CPUS_PER_JOB,
MEM_GB, AFTER, SWEEP). The command lines are written to <save>/commands.txt.

The table reads each run's results.json (scripts/make_table.py's reader) and takes the axis
values from its args.json, the pair from results.json: a cell is the mean ± sample std over the
trials, with their number; rows are the first axis' values (with more than two axes, the
combinations of all but the last), columns the last axis'. With several pairs the pair is the
first axis. --published STUDY puts the published number of scripts/published_ablations.csv beside
each cell it has. The figure: a line with its ±std band for one axis, a heatmap for two (one per
combination of the others for more), PNG and PDF.
"""
import argparse
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.errors import UserError, exits_cleanly  # noqa: E402  (after the path insert)
from engine.programs import TRAINERS  # noqa: E402
from engine.runs import load_run_args  # noqa: E402
from scripts.make_table import add_metric_flag, cell, load_runs, metric_label, stats  # noqa: E402

PUBLISHED = ROOT / "scripts" / "published_ablations.csv"
ENTRIES = {Path(p.script).name: p for p in TRAINERS}
# flags the sweep sets itself on every run
RESERVED = ("trial", "run_name", "save_dir", "auto_resume", "resume")
PAIR_FLAGS = ("path_t", "model_s")
PAIR = "pair"
FORMATS = {"markdown": "md", "csv": "csv", "latex": "tex"}


def parse_axis(text: str) -> tuple:
    """(flag, [values]) of one `--vary FLAG=V1,V2,...`; values that hold commas themselves
    (--lr_decay_epochs 150,180,210, --distill crd,kd) are separated by ';' instead."""
    flag, eq, values = text.partition("=")
    flag = flag.strip().lstrip("-")
    if not eq or not flag:
        raise UserError(f"--vary '{text}' is not FLAG=V1,V2,... (e.g. --vary nce_k=256,1024)")
    items = [v.strip() for v in values.split(";" if ";" in values else ",")]
    if not values.strip() or "" in items:
        raise UserError(f"--vary {flag}= has an empty value ('{values}'); give comma-separated values such as "
                        f"{flag}=1,2")
    if len(set(items)) < len(items):
        raise UserError(f"--vary {flag} repeats a value ('{values}'); a value would count its runs twice")
    return flag, items


def parse_axes(texts: list) -> dict:
    axes = {}
    for text in texts:
        flag, values = parse_axis(text)
        if flag in axes:
            raise UserError(f"--vary {flag} is given twice; give all its values in one --vary {flag}=V1,V2,...")
        if flag in RESERVED or flag == PAIR:
            raise UserError(f"--vary {flag}: the sweep sets --{flag} itself (use --trials for seeds, --save for "
                            "the folder)")
        axes[flag] = values
    return axes


def slug(text: str) -> str:
    """A run-name-safe form of a value (a path's separators become '-')."""
    return re.sub(r"[^A-Za-z0-9._+]", "-", str(text))


def label(value) -> str:
    """The value as the table shows it: numbers in their shortest form, so that 0.10, '0.1' and a
    stored 0.1 are one label."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (list, tuple)):  # --lr_decay_epochs 150,180 is stored as [150, 180]
        return ",".join(map(label, value))
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


class Pair:
    """One TEACHER:STUDENT of train_student.py: the flags it sets and its name in run names."""

    def __init__(self, text: str, teachers: Path, dataset: str):
        teacher, colon, student = text.rpartition(":")
        if not colon or not teacher or not student:
            raise UserError(f"--pair '{text}' is not TEACHER:STUDENT (e.g. resnet32x4:resnet8x4, or "
                            "save/teachers/<run>/ckpt_last.pth:resnet8x4)")
        is_name = "/" not in teacher and not teacher.endswith(".pth") and not teacher.startswith("torchvision:")
        self.path = (str(teachers / f"{teacher}_{dataset}_trial0" / "ckpt_last.pth") if is_name else teacher)
        self.name = teacher if is_name else slug(Path(teacher).parent.name or teacher)
        self.student = student

    def flags(self) -> list:
        return ["--path_t", self.path, "--model_s", self.student]


class Grid:
    """The sweep: every (pair, axis values, trial) as a command line with its run name."""

    def __init__(self, args, base: list):
        self.entry, self.name, self.save = args.entry, args.name, Path(args.save or f"ablations/{args.name}")
        self.base, self.axes, self.trials = base, parse_axes(args.vary), args.trials
        self.program = ENTRIES[args.entry]
        self.parse = self.entry_parser()
        given = self.parse(base)
        reserved = sorted(set(given.command_line) & {*RESERVED, *(PAIR_FLAGS if args.pair else ())})
        if reserved:
            raise UserError(f"--{reserved[0]} after '--': the sweep sets it itself "
                            f"{'(--pair sets the teacher and student)' if reserved[0] in PAIR_FLAGS else ''}".rstrip())
        twice = sorted(set(given.command_line) & set(self.axes))
        if twice:
            raise UserError(f"--{twice[0]} is both fixed after '--' and varied by --vary {twice[0]}; give it once")
        if args.pair and self.entry != "train_student.py":
            raise UserError(f"--pair is for train_student.py; {self.entry} takes its network from its own flags")
        if len(set(args.pair)) < len(args.pair):
            raise UserError("--pair repeats a pair; each pair once")
        self.pairs = [Pair(p, Path(args.teachers), given.dataset) for p in args.pair] or [None]
        self.points = self.expand()

    def entry_parser(self):
        """The entry point's own parse function (what it accepts is what the runs accept)."""
        import importlib
        return importlib.import_module(self.program.module).parse_args

    def expand(self) -> list:
        """[(run name, index of its pair, argv)] of every run, each grid point's argv checked by the
        entry's parser."""
        points, names = [], set()
        for pair, values in itertools.product(self.pairs, itertools.product(*self.axes.values())):
            flags = [*(pair.flags() if pair else []), *itertools.chain.from_iterable(
                (f"--{flag}", value) for flag, value in zip(self.axes, values))]
            parsed = self.parse([*self.base, *flags])
            for flag in self.axes:  # argparse takes a flag's prefix (--print for --print_freq); the table needs its name
                if flag not in vars(parsed):
                    raise UserError(f"--vary {flag}: {self.entry} has no flag --{flag} (see its --help)")
            name = "_".join([self.name, *([f"{pair.name}-{pair.student}"] if pair else []),
                             *(f"{flag}-{slug(value)}" for flag, value in zip(self.axes, values))])
            if name in names:
                raise UserError(f"two grid points share the run name {name}; give values that differ in letters "
                                "or digits")
            names.add(name)
            for trial in range(1, self.trials + 1):
                run = f"{name}_trial{trial}"
                points.append((run, self.pairs.index(pair), [*self.base, *flags, "--trial", str(trial), "--save_dir",
                                                             str(self.save), "--run_name", run, "--auto_resume"]))
        return points

    def lines(self, python: str) -> list:
        entry = os.path.relpath(ROOT / self.entry)  # train_student.py from the checkout, as the table scripts'
        return [shlex.join([python, entry, *argv]) for _, _, argv in self.points]

    def run_dirs(self) -> dict:
        """{run directory: the index of its pair}"""
        return {str(self.save / self.program.kind / name): pair for name, pair, _ in self.points}

    def table_axes(self) -> list:
        """The table's axes, in order: the pair when there are several, then the --vary flags."""
        return ([PAIR] if len(self.pairs) > 1 else []) + list(self.axes)


def launch(grid: Grid, launcher: str, jobs: int, python: str) -> int:
    """Run the grid's command lines through the table scripts' launchers; the exit status."""
    lines = grid.lines(python)
    grid.save.mkdir(parents=True, exist_ok=True)
    (grid.save / "commands.txt").write_text("\n".join(lines) + "\n")
    if launcher == "shell":
        from scripts.run_commands import run_lines
        return run_lines(lines, jobs)
    # slurm.py reads the Slurm settings (PARTITION, TIME_LIMIT, ...) from the environment
    submit = [python, str(ROOT / "scripts" / "slurm.py"), "submit", "--launcher", launcher,
              "--folder", os.environ.get("SWEEP", str(grid.save / "slurm")), "--after", os.environ.get("AFTER", ""),
              "--jobs", str(jobs)]
    return subprocess.run(submit, input="\n".join(lines) + "\n", text=True).returncode


def collect(grid: Grid) -> pd.DataFrame:
    """The grid's finished runs (results.json through make_table's reader), with each axis'
    value read from the run's args.json and the pair from its results.json."""
    wanted = grid.run_dirs()
    runs = load_runs([grid.save / grid.program.kind])
    runs = runs[runs["run"].isin(wanted)]
    runs = runs.assign(pair_index=runs["run"].map(wanted)).sort_values("pair_index", kind="stable")
    if runs.empty:
        raise UserError(f"no finished run of ablation '{grid.name}' under {grid.save / grid.program.kind}; "
                        "run it first (without --table_only)")
    stored = [load_run_args(run) for run in runs["run"]]
    for flag in grid.axes:
        runs[flag] = [label(args.get(flag)) for args in stored]
    runs[PAIR] = [network(t, m) for t, m in zip(runs["teacher"], runs["model"])]
    return runs


def network(teacher, student) -> str:
    """'teacher → student' of a distilled run, the network alone of a run without a teacher."""
    return f"{teacher} → {student}" if isinstance(teacher, str) else str(student)


def summarise(runs: pd.DataFrame, axes: list, metric: str) -> pd.DataFrame:
    """One row per grid point: its axis values, mean, std and n of `metric`."""
    rows = [{**dict(zip(axes, key if isinstance(key, tuple) else (key,))), "teacher": group["teacher"].iloc[0],
             "student": group["model"].iloc[0], **stats(group[metric])}
            for key, group in runs.groupby(axes, sort=False)]
    return pd.DataFrame(rows, columns=[*axes, "teacher", "student", "mean", "std", "n"])


def published(study: str) -> pd.DataFrame:
    table = pd.read_csv(PUBLISHED, dtype=str, keep_default_na=False)
    rows = table[table["study"] == study]
    if rows.empty:
        raise UserError(f"--published {study}: no such study in {PUBLISHED.name} (it has "
                        f"{', '.join(sorted(set(table['study'])))})")
    return rows


def setting(text: str) -> dict:
    return {k: label(v) for k, _, v in (item.partition("=") for item in text.split())}


def attach_published(summary: pd.DataFrame, axes: list, study) -> pd.DataFrame:
    """Each cell's published number (and ours − published) where the study has a row with its
    pair and its setting of every --vary axis."""
    summary = summary.assign(published=float("nan"))
    references = published(study) if study else pd.DataFrame(columns=["teacher", "student", "setting", "top1"])
    for k, row in summary.iterrows():
        for _, ref in references.iterrows():
            if ((ref["teacher"], ref["student"]) == (row["teacher"], row["student"])
                    and all(setting(ref["setting"]).get(a) == row[a] for a in axes if a != PAIR)):
                summary.loc[k, "published"] = float(ref["top1"])
    summary["diff"] = summary["mean"] - summary["published"]
    return summary


def order(grid: Grid, summary: pd.DataFrame) -> dict:
    """Each axis' labels in the order the command gave them."""
    given = {flag: [label(v) for v in values] for flag, values in grid.axes.items()}
    given[PAIR] = list(dict.fromkeys(summary[PAIR])) if PAIR in summary else []
    return given


def wide(summary: pd.DataFrame, axes: list, orders: dict, latex: bool) -> pd.DataFrame:
    """Rows: the first axes' values; columns: the last axis' (one 'top-1' column for one axis)."""
    cells = summary.assign(cell=summary.apply(cell, axis=1, latex=latex))
    if len(axes) == 1:
        return cells.set_index(axes[0])[["cell"]].reindex(orders[axes[0]]).rename(columns={"cell": "top-1"}).fillna("—")
    rows = (pd.MultiIndex.from_product([orders[a] for a in axes[:-1]], names=axes[:-1]) if len(axes) > 2
            else pd.Index(orders[axes[0]], name=axes[0]))
    table = cells.pivot(index=axes[:-1], columns=axes[-1], values="cell").reindex(index=rows, columns=orders[axes[-1]])
    table.columns = [f"{axes[-1]} = {value}" for value in table.columns]
    return table.fillna("—")


def header(grid: Grid, metric: str, study) -> str:
    note = " [published, ours − published]" if study else ""
    return (f"ablation {grid.name} ({grid.entry} {shlex.join(grid.base)}): {metric_label(metric)}, "
            f"mean ± std over trials (number of trials){note}")


def tex(text) -> str:
    """A label as LaTeX text (flag names hold underscores; the cells are LaTeX already)."""
    return str(text).replace("_", r"\_")


def render(grid: Grid, summary: pd.DataFrame, metric: str, fmt: str, study) -> str:
    axes, orders = grid.table_axes(), order(grid, summary)
    if fmt == "csv":
        return summary.assign(metric=metric).to_csv(index=False, float_format="%.4f")
    table = wide(summary, axes, orders, latex=fmt == "latex")
    if fmt == "latex":
        table = table.rename(index=tex, columns=tex).rename_axis(index=[tex(n) for n in table.index.names])
        body = table.to_latex(escape=False, column_format="l" * table.index.nlevels + "c" * table.shape[1])
        return f"% {header(grid, metric, study)}\n" + body.replace("→", r"$\rightarrow$")
    return f"### {header(grid, metric, study)}\n\n{table.reset_index().to_markdown(index=False)}\n"


def plot(grid: Grid, summary: pd.DataFrame, metric: str, path: Path) -> None:
    """A line with its ±std band for one axis, a heatmap of the means for two (one panel per
    combination of any further leading axes); PNG and PDF."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    axes, orders = grid.table_axes(), order(grid, summary)
    panels = list(itertools.product(*(orders[a] for a in axes[:-2]))) if len(axes) > 2 else [()]
    fig, subplots = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(subplots[0], panels):
        chosen = summary
        for a, value in zip(axes, panel):
            chosen = chosen[chosen[a] == value]
        if len(axes) == 1:
            draw_line(ax, chosen, axes[0], orders[axes[0]], metric)
        else:
            draw_heatmap(fig, ax, chosen, axes[-2:], orders, metric, (summary["mean"].min(), summary["mean"].max()))
        pairs = ", ".join(dict.fromkeys(map(network, chosen["teacher"], chosen["student"])))
        ax.set_title(", ".join([f"{a} {v}" for a, v in zip(axes, panel)] or [grid.name])
                     + ("" if PAIR in axes else f": {pairs}"))
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)


def draw_line(ax, summary: pd.DataFrame, axis: str, values: list, metric: str) -> None:
    rows = summary.set_index(axis).reindex(values)
    x = range(len(values))
    spread = rows["std"].where(rows["n"] > 1, 0).fillna(0)
    ax.plot(x, rows["mean"], "o-", label="ours (mean ± std)")
    ax.fill_between(x, rows["mean"] - spread, rows["mean"] + spread, alpha=0.25)
    if rows["published"].notna().any():
        ax.plot(x, rows["published"], "x", color="black", label="published")
    for k, (_, row) in zip(x, rows.iterrows()):
        if row["n"] > 0:
            ax.annotate(f"n={row['n']:.0f}", (k, row["mean"]), xytext=(4, -12), textcoords="offset points",
                        fontsize=7)
    ax.set_xticks(list(x), values)
    ax.set_xlabel(axis)
    ax.set_ylabel(metric_label(metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def draw_heatmap(fig, ax, summary: pd.DataFrame, axes: list, orders: dict, metric: str, limits: tuple) -> None:
    """The means of two axes; every panel on the same colour scale, `limits`."""
    rows, cols = (orders[a] for a in axes)
    means = summary.pivot_table(index=axes[0], columns=axes[1], values="mean").reindex(index=rows, columns=cols)
    cells = summary.set_index(axes)
    image = ax.imshow(means.to_numpy(dtype=float), cmap="viridis", aspect="auto", vmin=limits[0], vmax=limits[1])
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            if (r, c) not in cells.index:
                continue
            row = cells.loc[(r, c)]
            text = f"{row['mean']:.1f}" + (f"\n± {row['std']:.1f}" if row["n"] > 1 else "") + f"\nn={row['n']:.0f}"
            bright = image.norm(row["mean"]) > 0.6  # viridis turns yellow: dark text there
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if bright else "white")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(axes[1])
    ax.set_ylabel(axes[0])
    fig.colorbar(image, ax=ax, label=metric_label(metric))


def make_table(grid: Grid, metric: str, study) -> Path:
    """Write the table in every format and the figure under <save>; the markdown table's path."""
    axes = grid.table_axes()
    summary = attach_published(summarise(collect(grid), axes, metric), axes, study)
    for fmt, suffix in FORMATS.items():
        (grid.save / f"table.{suffix}").write_text(render(grid, summary, metric, fmt, study))
    plot(grid, summary, metric, grid.save / "figure.png")
    return grid.save / "table.md"


class Parser(argparse.ArgumentParser):
    """ablate.py's own mistakes are one line and status 2, like the entry points'."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def build_parser() -> Parser:
    parser = Parser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s [options] --vary FLAG=V1,V2,... [-- ENTRY POINT FLAGS]")
    parser.add_argument("--entry", choices=tuple(ENTRIES), default="train_student.py", help="the trainer swept")
    parser.add_argument("--name", required=True, help="the ablation's name: its runs' name prefix and its folder")
    parser.add_argument("--vary", action="append", default=[], metavar="FLAG=V1,V2,...",
                        help="an axis: the entry point's flag (without dashes) and its values; repeat for more axes; "
                             "values holding commas are separated by ';' (lr_decay_epochs='150,180;100,150')")
    parser.add_argument("--pair", action="append", default=[], metavar="TEACHER:STUDENT",
                        help="train_student.py's teacher (checkpoint or architecture) and student; repeatable")
    parser.add_argument("--teachers", default="save/teachers",
                        help="where --pair finds a teacher given by architecture (<arch>_<dataset>_trial0/ckpt_last.pth)")
    parser.add_argument("--trials", type=int, default=1, help="runs per grid point, trials 1..N (the trial sets the seed)")
    parser.add_argument("--save", default=None, help="the runs' --save_dir and the table's folder; default ablations/NAME")
    parser.add_argument("--launcher", choices=("shell", "submitit-local", "slurm"), default="shell")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (shell: worker processes)")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the command lines and stop")
    parser.add_argument("--table_only", action="store_true", help="make the table of the runs finished; run nothing")
    parser.add_argument("--published", default=None, metavar="STUDY",
                        help=f"show the published numbers of this study of {PUBLISHED.name} beside ours")
    add_metric_flag(parser)
    return parser


@exits_cleanly
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    base = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(own)
    if args.trials < 1 or args.jobs < 1:
        raise UserError("--trials and --jobs must be at least 1")
    if not args.vary and len(args.pair) < 2:
        raise UserError("nothing to ablate: give --vary FLAG=V1,V2,... or several --pair")
    if args.published:
        published(args.published)
    grid = Grid(args, base)
    python = os.environ.get("PY", sys.executable)
    if args.dry_run:
        print("\n".join(grid.lines(python)))
        return 0
    status = 0
    if not args.table_only:
        status = launch(grid, args.launcher, args.jobs, python)
        if args.launcher == "slurm":
            print(f"queued {len(grid.points)} runs; once `python scripts/slurm.py status --folder "
                  f"{os.environ.get('SWEEP', grid.save / 'slurm')}` says they finished, make the table with the "
                  "same command and --table_only")
            return status
    table = make_table(grid, args.metric, args.published)
    print(table.read_text())
    print(f"table:  {grid.save}/table.md, table.csv, table.tex\nfigure: {grid.save}/figure.png and figure.pdf")
    return status


if __name__ == "__main__":
    sys.exit(main())
