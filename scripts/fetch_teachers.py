"""Download the released CIFAR-100 teachers that the published tables distil from.

RepDistiller (Tian et al., CRD, ICLR 2020) publishes one `ckpt_epoch_240.pth` per teacher
(its scripts/fetch_pretrained_teachers.sh); mdistiller (Zhao et al., DKD, CVPR 2022) releases
the same six teachers as one `cifar_teachers.tar`. Either way the files land in RepDistiller's
layout, `<save_dir>/models/<arch>_vanilla/ckpt_epoch_240.pth`, where train_student.py finds the
best teacher by itself and infers the architecture from the folder name.

A download resumes from its `.part` file (an HTTP range request); a file counts as fetched only
once it loads with strict=True into its architecture; with CIFAR-100 in --data_folder each
teacher's test top-1 is printed beside the published accuracy.

    python scripts/fetch_teachers.py --list
    python scripts/fetch_teachers.py                          # RepDistiller's six teachers
    python scripts/fetch_teachers.py --source mdistiller --models resnet32x4 vgg13
"""
import argparse
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from core.errors import UserError, exits_cleanly  # noqa: E402  (after the path insert)
from dataset.loaders import build_loaders  # noqa: E402
from deploy.network import load_network  # noqa: E402
from engine.loop import evaluate  # noqa: E402

TEACHERS = ("wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50")
CHECKPOINT = "ckpt_epoch_240.pth"
NUM_CLASSES = 100
CHUNK = 1 << 20
TIMEOUT_S = 30
PUBLISHED_CSV = Path(__file__).resolve().parent / "published_cifar100.csv"


@dataclass(frozen=True)
class Source:
    """Where a release lives: one file per teacher, or one archive holding them all."""
    name: str
    base_url: str
    archive: str = ""           # a tar of `<archive_root>/<arch>_vanilla/ckpt_epoch_240.pth`
    archive_root: str = ""

    def url(self, arch: str, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/{arch}_vanilla/{CHECKPOINT}"


SOURCES = {
    "repdistiller": Source("repdistiller", "http://shape2prog.csail.mit.edu/repo"),
    "mdistiller": Source("mdistiller", "https://github.com/megvii-research/mdistiller/releases/download/checkpoints",
                         archive="cifar_teachers.tar", archive_root="cifar_teachers"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", choices=sorted(SOURCES), default="repdistiller", help="whose release")
    parser.add_argument("--models", nargs="+", choices=TEACHERS, default=list(TEACHERS), metavar="ARCH",
                        help=f"teachers to fetch, of {', '.join(TEACHERS)}")
    parser.add_argument("--save_dir", default="./save", help="teachers go to SAVE_DIR/models/<arch>_vanilla/")
    parser.add_argument("--base_url", default=None, help="a mirror of the release (default: the source's own)")
    parser.add_argument("--data_folder", default="./data",
                        help="where CIFAR-100 is; when it is there, each teacher's test top-1 is checked")
    parser.add_argument("--list", action="store_true", help="print what would be fetched, from where, and stop")
    return parser.parse_args(argv)


def destination(save_dir, arch: str) -> Path:
    return Path(save_dir).resolve() / "models" / f"{arch}_vanilla" / CHECKPOINT


def download(url: str, target: Path) -> None:
    """`url` into `target`, continuing a `.part` file left by an interrupted download."""
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            resumed = have and response.status == 206
            part.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "ab" if resumed else "wb") as out:
                shutil.copyfileobj(response, out, CHUNK)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the .part already holds the whole file
            part.replace(target)
            return
        raise UserError(f"cannot download {url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"cannot download {url} ({reason}); offline? copy the files into {target.parent.parent} "
                        "by hand or pass --base_url of a mirror; run again to resume") from None
    part.replace(target)


def extract_teacher(archive: Path, root: str, arch: str, target: Path) -> None:
    """One teacher's checkpoint out of the release archive (only that member is read)."""
    member = f"{root}/{arch}_vanilla/{CHECKPOINT}"
    try:
        with tarfile.open(archive) as tar:
            source = tar.extractfile(member)
            if source is None:
                raise KeyError(member)
            target.parent.mkdir(parents=True, exist_ok=True)
            with source, open(target.with_name(target.name + ".part"), "wb") as out:
                shutil.copyfileobj(source, out, CHUNK)
    except KeyError:
        raise UserError(f"{archive} holds no {member}; is it {SOURCES['mdistiller'].archive}?") from None
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"cannot read {archive} ({err}); delete it and run again") from None
    target.with_name(target.name + ".part").replace(target)


def check_loads(path: Path, arch: str):
    """The teacher built from `path` (strict=True), or one line saying why not, the file removed."""
    try:
        return load_network(path, arch, NUM_CLASSES, "cifar100")[0]
    except UserError as err:
        path.replace(path.with_name(path.name + ".bad"))
        raise UserError(f"{err} (moved to {path.name}.bad; run again to download it anew)") from None


def published_accuracy() -> dict:
    rows = pd.read_csv(PUBLISHED_CSV)
    return rows[rows.method == "teacher"].groupby("teacher")["top1"].first().to_dict()


def test_accuracy(model, data_folder: str) -> float:
    # a training batch of 1: only the test split is used, whatever the training split's size
    _, test_loader, _ = build_loaders("cifar100", data_folder, 1, device="cpu", num_workers=0, test_batch_size=256)
    return evaluate(model, test_loader, device=torch.device("cpu"), amp_dtype=None, channels_last=False)["test_top1"]


def list_plan(source: Source, args) -> None:
    base = args.base_url or source.base_url
    if source.archive:
        print(f"{source.name}: {base.rstrip('/')}/{source.archive} (one archive), then for each teacher:")
    for arch in args.models:
        origin = f"{source.archive}:{source.archive_root}/{arch}_vanilla/{CHECKPOINT}" if source.archive \
            else source.url(arch, base)
        state = "present" if destination(args.save_dir, arch).is_file() else "to fetch"
        print(f"  {arch:<10} {origin} -> {destination(args.save_dir, arch)} [{state}]")


def fetch(source: Source, args) -> list:
    """Paths of the requested teachers, each present and loading strictly."""
    base = args.base_url or source.base_url
    missing = [arch for arch in args.models if not destination(args.save_dir, arch).is_file()]
    archive = Path(args.save_dir).resolve() / "models" / source.archive if source.archive and missing else None
    if archive is not None and not archive.is_file():
        print(f"downloading {source.archive} from {base}", flush=True)
        download(f"{base.rstrip('/')}/{source.archive}", archive)
    for arch in missing:
        target = destination(args.save_dir, arch)
        if archive is not None:
            extract_teacher(archive, source.archive_root, arch, target)
        else:
            print(f"downloading {arch} from {source.url(arch, base)}", flush=True)
            download(source.url(arch, base), target)
    return [destination(args.save_dir, arch) for arch in args.models]


@exits_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    source = SOURCES[args.source]
    if args.list:
        list_plan(source, args)
        return 0
    paths = fetch(source, args)
    with_data = (Path(args.data_folder) / "cifar-100-python").is_dir()
    published = published_accuracy()
    for arch, path in zip(args.models, paths):
        model = check_loads(path, arch)
        line = f"{arch:<10} {path} loads strictly"
        if with_data:
            line += f"; test top-1 {test_accuracy(model, args.data_folder):.2f} (published {published[arch]:.2f})"
        print(line, flush=True)
    if not with_data:
        print(f"CIFAR-100 is not in {args.data_folder}: accuracies not checked (pass --data_folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
