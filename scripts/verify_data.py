"""Check an ImageFolder tree before a long run: every image file decodes with both loaders'
decoders (PIL for --loader torch, torchvision for --loader jpeg).

    python scripts/verify_data.py data/imagenet
    python scripts/verify_data.py data/imagenet/train --workers 16

Reads every file whose extension ImageFolder reads (.JPEG, .png, ...) under TREE; prints the
number of images per folder (per class: train/n01440764 ...), each file that does not decode
with the reason, and a summary. Exit status 2 when a file is bad (or TREE holds no image), 0
otherwise. A run meets a bad file as one line naming it, or skips it with --skip_bad_images.
"""
import argparse
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchvision.datasets.folder import IMG_EXTENSIONS  # noqa: E402

from core.errors import EXIT_USAGE, UserError, exits_cleanly  # noqa: E402
from dataset.unreadable import check_image  # noqa: E402

CHUNK = 64  # files per task handed to a worker process


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Check that every image of an ImageFolder tree decodes.")
    parser.add_argument("tree", type=Path, help="a data folder (train/ and val/), or one split of it")
    parser.add_argument("--workers", type=int, default=8, help="processes decoding files")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if not args.tree.is_dir():
        raise UserError(f"{args.tree} is not a folder; name the folder holding <class>/*.JPEG or train/ and val/")
    return args


def image_files(tree: Path) -> list:
    return sorted(p for p in tree.rglob("*") if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))


def scan(files: list, workers: int) -> list:
    """(file, reason) of every file that does not decode."""
    if workers == 1:
        reasons = map(check_image, files)
    else:
        with ProcessPoolExecutor(workers) as pool:
            reasons = list(pool.map(check_image, files, chunksize=CHUNK))
    return [(path, why) for path, why in zip(files, reasons) if why is not None]


def report(tree: Path, files: list, bad: list) -> str:
    per_folder = Counter(str(path.parent.relative_to(tree)) for path in files)
    lines = [f"{folder}: {count} images" for folder, count in sorted(per_folder.items())]
    lines += [f"bad: {path} ({why})" for path, why in bad]
    lines.append(f"{len(files)} images in {len(per_folder)} folders under {tree}; "
                 + (f"{len(bad)} do not decode" if bad else "all decode"))
    return "\n".join(lines)


@exits_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    files = image_files(args.tree)
    if not files:
        raise UserError(f"{args.tree} holds no image files ({', '.join(IMG_EXTENSIONS)})")
    bad = scan(files, args.workers)
    print(report(args.tree, files, bad))
    return EXIT_USAGE if bad else 0


if __name__ == "__main__":
    sys.exit(main())
