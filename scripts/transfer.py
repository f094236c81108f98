"""How well a distilled student's representation transfers: CRD's linear-probe protocol.

    python scripts/transfer.py save/students/<kd run> save/students/<crd run> save/students/<vanilla run> \\
        --probe stl10,tinyimagenet --data_folder ./data --out save/transfer

Tian et al., "Contrastive Representation Distillation" (ICLR 2020), "Transferability of
representations": the network is frozen, its penultimate features (the layer before the logits)
are the input of a linear classifier trained on another data set, STL-10 (10 classes) or
Tiny-ImageNet (200), both downsampled to 32 x 32 (dataset/probe.py). CRD released no code for
it; the probe's training follows DCD's transfer_student.py (giakoumoglou/distillers, commit
a2ee80b), the public code of the protocol: SGD with momentum 0.9 and weight decay 5e-4, batch 64,
120 epochs, the learning rate 0.05 (0.01 for MobileNetV2, ShuffleV1, ShuffleV2: the suite's
registry rule, which is DCD's) divided by 10 at epochs 30, 60 and 90, the classifier initialised
N(0, 0.01) with zero bias. Unlike DCD's script the frozen network stays in eval mode, so its
BatchNorm statistics do not move while the probe trains: frozen means frozen.

Rows: every teacher the distilled runs name (their --path_t), every run trained from labels alone
(the vanilla students) and every distilled student; a column per probe data set with the test
top-1 (%) after the last epoch. Written to --out as transfer.md, transfer.csv, transfer.json and
a bar chart (transfer.png, transfer.pdf), and printed.
"""
import argparse
import csv
import io
import sys
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from torch import nn

matplotlib.use("Agg")  # files only: no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.distributed import setup  # noqa: E402
from core.errors import UserError, exits_cleanly  # noqa: E402
from core.ranges import NON_NEGATIVE, POSITIVE, Parsed, at_least, within  # noqa: E402
from dataset import get_info  # noqa: E402
from dataset.loaders import TorchLoader  # noqa: E402
from dataset.probe import PROBES, probe_dataset  # noqa: E402
from deploy.network import read_network, read_run, run_data  # noqa: E402
from engine import runs  # noqa: E402
from engine.args import Parser, check_ranges, milestones  # noqa: E402
from engine.atomic import write_atomic  # noqa: E402
from engine.build import default_lr  # noqa: E402
from engine.loop import move_batch, topk_correct  # noqa: E402
from engine.teacher import build_teacher  # noqa: E402

ROLES = ("teacher", "vanilla", "student")


def probe_names(text) -> list:
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in PROBES]
    if unknown or not names:
        raise UserError(f"unknown probe data set {', '.join(unknown) or repr(text)}; use --probe with "
                        f"{' or '.join(PROBES)} (comma-separated for both)")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description="CRD's transfer protocol: a linear probe on frozen penultimate features.")
    parser.add_argument("runs", nargs="+", help="run directories: distilled students and vanilla students")
    parser.add_argument("--probe", type=str, default="stl10,tinyimagenet",
                        valid=Parsed("stl10, tinyimagenet, or both comma-separated", probe_names),
                        help="probe data sets, comma-separated")
    parser.add_argument("--data_folder", type=str, default="./data",
                        help="the folder holding stl10_binary/ and tiny-imagenet-200/ (or train/ and val/)")
    parser.add_argument("--out", type=str, default="save/transfer", help="folder of transfer.md/.csv/.json")
    parser.add_argument("--epochs", type=int, default=120, valid=at_least(1))
    parser.add_argument("--learning_rate", type=float, default=None, valid=POSITIVE,
                        help="default: the student architecture's (0.05; 0.01 for MobileNetV2, ShuffleV1/V2)")
    parser.add_argument("--lr_decay_epochs", type=milestones, default="30,60,90",
                        help="epochs after which the learning rate is multiplied by --lr_decay_rate")
    parser.add_argument("--lr_decay_rate", type=float, default=0.1, valid=within(0, 1, "(]"))
    parser.add_argument("--weight_decay", type=float, default=5e-4, valid=NON_NEGATIVE)
    parser.add_argument("--momentum", type=float, default=0.9, valid=within(0, 1, "[)"))
    parser.add_argument("--batch_size", type=int, default=64, valid=at_least(1))
    parser.add_argument("--image_size", type=int, default=32, valid=at_least(8),
                        help="probe images are resized to this square size")
    parser.add_argument("--num_workers", type=int, default=8, valid=at_least(0))
    parser.add_argument("--seed", type=int, default=0, valid=at_least(0))
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:<k>")
    args = parser.parse_args(argv)
    check_ranges(parser, args)
    args.probe = probe_names(args.probe)
    return args


def network_rows(run_dirs) -> list:
    """The networks of the table, teachers first, each read before any data loads."""
    found = [read_run(run) for run in run_dirs]
    rows, seen = [], set()
    for run in found:
        for path in run["teachers"]:
            if path not in seen:
                seen.add(path)
                state, arch = read_network(path, None, "--path_t")
                dataset, _ = run_data(path, state)
                rows.append({"role": "teacher", "method": "", "arch": arch, "path": path, "state": state,
                             "dataset": dataset})
    for run in found:
        role = "student" if run["teachers"] else "vanilla"
        rows.append({"role": role, "method": run["args"].get("distill", "") if run["teachers"] else "",
                     "arch": run["arch"], "path": run["path"], "state": run["state"], "dataset": run["dataset"]})
    return sorted(rows, key=lambda r: ROLES.index(r["role"]))


def features(network, images) -> torch.Tensor:
    with torch.no_grad():
        return network.forward_features(images).pooled.float()


def probe_top1(network, probe: str, args, device, lr: float) -> float:
    """Test top-1 (%) of a linear classifier trained on the frozen network's penultimate features."""
    train_set = probe_dataset(probe, args.data_folder, True, args.image_size)
    test_set = probe_dataset(probe, args.data_folder, False, args.image_size)
    loader = dict(num_workers=args.num_workers, seed=args.seed, pin_memory=device.type == "cuda")
    train_loader = TorchLoader(train_set, batch_size=args.batch_size, train=True, **loader)
    test_loader = TorchLoader(test_set, batch_size=256, train=False, **loader)
    torch.manual_seed(args.seed)
    images = move_batch(next(iter(test_loader)), device, False)[0]
    head = nn.Linear(features(network, images).shape[1], PROBES[probe].num_classes).to(device)
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_decay_epochs, args.lr_decay_rate)
    for epoch in range(args.epochs):
        train_loader.set_epoch(epoch)
        for batch in train_loader:
            images, labels, _ = move_batch(batch, device, False)
            loss = F.cross_entropy(head(features(network, images)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    correct = total = 0
    with torch.no_grad():
        for batch in test_loader:
            images, labels, _ = move_batch(batch, device, False)
            correct += int(topk_correct(head(features(network, images)), labels, (1,))[0])
            total += len(labels)
    return 100.0 * correct / total


def table(rows: list, probes: list) -> tuple:
    """(Markdown, CSV) of the rows."""
    header = ["role", "method", "network", "checkpoint"] + [f"{PROBES[p].title} top-1 (%)" for p in probes]
    cells = [[r["role"], r["method"], r["arch"], str(r["path"])] + [f"{r[p]:.2f}" for p in probes] for r in rows]
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]) + "\n"
    text = io.StringIO(newline="")
    csv.writer(text).writerows([header] + cells)
    return markdown, text.getvalue()


def row_label(row: dict) -> str:
    return f"{row['method'] or row['role']}: {row['arch']}"


def figure(rows: list, probes: list, path: Path) -> None:
    """One horizontal bar per network and probe data set, the value written at its end; PNG and PDF."""
    height = 0.8 / len(probes)
    fig, ax = plt.subplots(figsize=(6.5, 0.9 + 0.45 * len(rows) * len(probes)))
    for k, probe in enumerate(probes):
        ys = [i + k * height for i in range(len(rows))]
        values = [r[probe] for r in rows]
        ax.barh(ys, values, height=height, label=PROBES[probe].title)
        for y, value in zip(ys, values):
            ax.text(value + 0.5, y, f"{value:.1f}", va="center", fontsize=8)
    ax.set_yticks([i + height * (len(probes) - 1) / 2 for i in range(len(rows))], [row_label(r) for r in rows])
    ax.invert_yaxis()
    ax.set(xlim=(0, 105), xlabel="linear-probe test top-1 (%)", title="transfer of the frozen penultimate features")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside: long bars never hide it
    for suffix in ("png", "pdf"):
        fig.savefig(path.with_suffix(f".{suffix}"), dpi=150, bbox_inches="tight")
    plt.close(fig)


@exits_cleanly
def main(argv=None) -> list:
    args = parse_args(argv)
    rows = network_rows(args.runs)
    for probe in args.probe:  # a missing or damaged probe set is one line before any training
        probe_dataset(probe, args.data_folder, False, args.image_size)
    device = setup(args.device).device
    for row in rows:
        network = build_teacher(row["state"], row["arch"], get_info(row["dataset"]).num_classes, row["path"],
                                row["dataset"]).to(device)
        lr = args.learning_rate or default_lr(row["arch"])
        for probe in args.probe:
            row[probe] = probe_top1(network, probe, args, device, lr)
            print(f"{row['role']} {row['arch']} ({row['path']}): {PROBES[probe].title} top-1 {row[probe]:.2f}")
    markdown, text = table(rows, args.probe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "transfer.md", markdown.encode())
    write_atomic(out / "transfer.csv", text.encode())
    figure(rows, args.probe, out / "transfer.png")
    runs.write_json(out / "transfer.json", {"probes": args.probe, "epochs": args.epochs, "rows": [
        {k: str(v) if k == "path" else v for k, v in r.items() if k != "state"} for r in rows]})
    print(markdown, end="")
    return rows


if __name__ == "__main__":
    main()
