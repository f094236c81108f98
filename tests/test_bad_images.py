"""Unreadable files in an ImageFolder tree (a truncated JPEG, a text file named .JPEG): one line
naming the file, or with --skip_bad_images skipped and counted, in both ImageFolder loaders (torch, jpeg), with and
without DataLoader workers; scripts/verify_data.py finds them before a run."""
import sys

import pytest

import train_teacher
from conftest import ROOT
from dataset.loaders import build_loaders
from tests.imagenet_tree import write_tree

sys.path.insert(0, str(ROOT / "scripts"))
import verify_data  # noqa: E402  (scripts/verify_data.py)


@pytest.fixture(scope="module")
def damaged_tree(tmp_path_factory):
    """Real JPEGs (2 classes, 3 training and 2 validation images each), one training file
    truncated to half its bytes, and a text file named .JPEG among the validation images:
    (tree, truncated file, text file)."""
    tree = write_tree(tmp_path_factory.mktemp("imagenet"), train_per_class=3, val_per_class=2)
    truncated = tree / "train" / "n01" / "n01_1.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
    text = tree / "val" / "n02" / "notes.JPEG"
    text.write_text("not an image\n")
    return tree, truncated, text


@pytest.mark.parametrize("loader", ["torch", "jpeg"])
@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_file_stops_the_loader_with_one_line_naming_it(damaged_tree, loader, workers):
    tree, truncated, _ = damaged_tree
    train, _, _ = build_loaders("imagenet", tree, 3, loader=loader, num_workers=workers)
    train.set_epoch(0)
    with pytest.raises(Exception) as stop:
        list(train)
    message = str(stop.value)
    assert type(stop.value).__name__ == "UserError" and len(message.splitlines()) == 1, message
    assert message.startswith(f"cannot read image {truncated} (") and "--skip_bad_images" in message


@pytest.mark.parametrize("loader", ["torch", "jpeg"])
@pytest.mark.parametrize("workers", [0, 1])
def test_skipped_files_are_left_out_warned_once_and_counted(damaged_tree, loader, workers, capsys):
    tree, truncated, text = damaged_tree
    train, test, _ = build_loaders("imagenet", tree, 3, loader=loader, num_workers=workers, skip_bad_images=True)
    for epoch in (0, 1):
        train.set_epoch(epoch)
        seen = sorted(int(i) for _, _, indices in train for i in indices)
        assert seen == [i for i in range(6) if train.dataset.samples[i][0] != str(truncated)]
    assert sum(len(targets) for _, targets, _ in test) == 4
    assert train.bad_images is test.bad_images and sorted(train.bad_images.seen) == sorted([str(truncated), str(text)])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 2 and str(truncated) in warnings[0]


def test_verify_data_lists_bad_files_and_counts_per_class(damaged_tree, capsys):
    tree, truncated, text = damaged_tree
    assert verify_data.main([str(tree), "--workers", "2"]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["train/n01: 3 images", "train/n02: 3 images", "val/n01: 2 images", "val/n02: 3 images"]
    assert f"bad: {truncated} (image file is truncated" in out[4] and out[5] == f"bad: {text} (not an image file)"
    assert out[6] == f"11 images in 4 folders under {tree}; 2 do not decode"
    assert verify_data.main([str(tree / "train" / "n02"), "--workers", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("all decode")


def imagenet_run(tree, save, *extra):
    return ["--model", "imagenet_resnet18", "--dataset", "imagenet", "--data_folder", str(tree), "--epochs", "1",
            "--batch_size", "3", "--device", "cpu", "--amp", "off", "--no-channels_last", "--save_dir", str(save),
            "--print_freq", "1", *extra]


def test_a_run_meets_a_bad_file_in_a_worker_as_one_line(damaged_tree, tmp_path, capsys):
    tree, truncated, _ = damaged_tree
    with pytest.raises(SystemExit) as stop:
        train_teacher.main(imagenet_run(tree, tmp_path, "--num_workers", "1"))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot read image {truncated}")


def test_a_run_with_skip_bad_images_records_the_count(damaged_tree, tmp_path):
    tree, _, _ = damaged_tree
    results = train_teacher.main(imagenet_run(tree, tmp_path, "--num_workers", "0", "--skip_bad_images"))
    assert results["skipped_images"] == 2 and results["epochs"] == 1
