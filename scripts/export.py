"""Export a trained checkpoint for deployment and check every file against PyTorch.

    python scripts/export.py save/students/<run>/best.pth
    python scripts/export.py save/students/<run>/best.pth --int8 --calib_images 512

Writes into --out (default: <checkpoint folder>/export):
  model.onnx       ONNX, opset 18, dynamic batch, run with ONNX Runtime (deploy/export.py)
  model.pt2        the torch.export program (torch.export.load(...).module() runs it)
  model.int8.onnx  with --int8: ONNX Runtime's static QDQ int8 model, calibrated on
                   --calib_images training images (deploy/quantize.py)
  export.json      the checks: max |logit difference| and top-1 agreement with PyTorch on the
                   first --check_images test images, and with --int8 the test top-1 of fp32 and int8

The data set and data folder are those the checkpoint's run trained on (as evaluate.py takes
them), unless --dataset and --data_folder say. Exits with status 1 when an export's logits
leave the stated tolerance, 2 on a user mistake.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.errors import UserError, exits_cleanly  # noqa: E402
from deploy import data, extras  # noqa: E402
from deploy.export import ATOL, OPSET, RTOL, check_exports, export_onnx, export_program  # noqa: E402
from deploy.network import load_network, read_network, run_data  # noqa: E402
from deploy.quantize import CALIBRATION_IMAGES, quantize_int8  # noqa: E402
from deploy.runtime import batched_logits, ort_runner, ort_session, torch_runner  # noqa: E402
from engine import runs  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Export a checkpoint to ONNX and torch.export, checked.")
    parser.add_argument("checkpoint", help="a checkpoint file: ours, or RepDistiller's")
    parser.add_argument("--dataset", default=None,
                        help="the data set it was trained on (real images for the checks); default: the run's, "
                             "else cifar100")
    parser.add_argument("--model", default=None, help="architecture, if the checkpoint does not say")
    parser.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/export)")
    parser.add_argument("--data_folder", default=None, help="default: the run's, else ./data")
    parser.add_argument("--check_images", type=int, default=256, help="test images the exports are checked on")
    parser.add_argument("--int8", action="store_true", help="also write the int8 model (post-training quantisation)")
    parser.add_argument("--calib_images", type=int, default=CALIBRATION_IMAGES, help="training images to calibrate on")
    args = parser.parse_args(argv)
    for flag in ("check_images", "calib_images"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    return args


def test_top1(run, images, targets) -> float:
    return 100.0 * float(batched_logits(run, images).argmax(1).eq(targets).double().mean())


def quantize(model, onnx_path, out: Path, train_loader, test_split, calib_images: int) -> dict:
    calibration = data.first_images(train_loader, calib_images)
    int8_path = quantize_int8(onnx_path, out / "model.int8.onnx", calibration)
    return {"calibration_images": int(calibration.shape[0]),
            "top1_fp32_pytorch": test_top1(torch_runner(model), *test_split),
            "top1_int8_onnxruntime": test_top1(ort_runner(ort_session(int8_path)), *test_split),
            "file": str(int8_path)}


@exits_cleanly
def main(argv=None) -> dict:
    args = parse_args(argv)
    extras.require()
    state, _ = read_network(args.checkpoint, args.model)  # a wrong path or architecture fails before the data loads
    args.dataset, args.data_folder = run_data(args.checkpoint, state, args.dataset, args.data_folder)
    train_loader, test_loader, info = data.loaders(args.dataset, args.data_folder)
    model, arch = load_network(args.checkpoint, args.model, info.num_classes, args.dataset)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "export"
    out.mkdir(parents=True, exist_ok=True)
    test_split = data.split_tensors(test_loader)
    images = test_split[0][:args.check_images]
    onnx_path = export_onnx(model, images, out / "model.onnx")
    program_path = out / "model.pt2"
    export_program(model, images, program_path)
    report = {"checkpoint": args.checkpoint, "model": arch, "dataset": args.dataset, "opset": OPSET,
              "tolerance": {"atol": ATOL, "rtol": RTOL}, "checks": check_exports(model, images, onnx_path, program_path)}
    if args.int8:
        report["int8"] = quantize(model, onnx_path, out, train_loader, test_split, args.calib_images)
    runs.write_json(out / "export.json", report)
    _print(report, out)
    if not all(check["within_tolerance"] for check in report["checks"].values()):
        sys.exit(1)
    return report


def _print(report: dict, out: Path) -> None:
    for name, check in report["checks"].items():
        verdict = "ok" if check["within_tolerance"] else "MISMATCH"
        print(f"{name}: {verdict}, max |logit diff| {check['max_abs_diff']:.2e} on {check['images']} test images "
              f"(atol {ATOL}, rtol {RTOL}), top-1 agreement {check['top1_agreement']:.1f}%")
    if "int8" in report:
        q = report["int8"]
        print(f"int8 (ONNX Runtime, {q['calibration_images']} calibration images): test top-1 "
              f"{q['top1_int8_onnxruntime']:.2f}% (fp32 {q['top1_fp32_pytorch']:.2f}%)")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
