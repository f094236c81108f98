"""The published ablations on CIFAR-100, each a scripts/ablate.py sweep with its table (the
published numbers of scripts/published_ablations.csv beside ours) and figure.

    python scripts/ablate_cifar.py [--dry-run] [--launcher shell|submitit-local|slurm] [--table_only]
        [--study NAME ...] [--metric last|best]
    EPOCHS=240 TRIALS=3 GPU=0 SAVE=save DATA=./data ABLATIONS=ablations JOBS=1 PY=python from the
    environment, as the table scripts (scripts/lib.sh) read them

The studies (every other setting is the method's published recipe):
  crd_nce                CRD (Tian et al., ICLR 2020): negatives nce_k x temperature nce_t
  kd_temperature_weight  KD (Hinton et al., 2015): temperature kd_T x KD weight -a (CE weight -r 0.1,
                         RepDistiller's, fixed)
  dkd_beta               DKD (Zhao et al., CVPR 2022): the NCKD weight beta
  capacity_gap           KD, DKD and CRD into wrn_16_2 from ever larger teachers, DKD's Table 11 ladder:
                         wrn_28_2, wrn_40_2, wrn_16_4, wrn_28_4 (DKD's beta 6 on every rung)
The first three distil resnet32x4 into resnet8x4. Train the teachers first
(scripts/run_cifar_vanilla.sh; the capacity gap's wrn_28_2, wrn_16_4 and wrn_28_4 with
train_teacher.py --model NAME --trial 0, as that script trains its teachers). A study's runs, commands, table and figure live in
$ABLATIONS/<study>/, apart from $SAVE, so that the method tables never mix them in. On Slurm the
runs are queued; the same command with --table_only makes the tables once they finished.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import scripts.ablate as ablate  # noqa: E402  (after the path insert)
from core.errors import exits_cleanly  # noqa: E402

PAIR = "resnet32x4:resnet8x4"
CAPACITY_LADDER = ("wrn_28_2", "wrn_40_2", "wrn_16_4", "wrn_28_4")  # by parameter count
# study -> (ablate.py's grid options, train_student.py flags)
STUDIES = {
    "crd_nce": (["--pair", PAIR, "--vary", "nce_k=256,1024,4096,16384", "--vary", "nce_t=0.05,0.07,0.1"],
                ["--distill", "crd"]),
    # registry departure (kd): the KD weight -a is an axis (0.9, RepDistiller's, is one of its values)
    "kd_temperature_weight": (["--pair", PAIR, "--vary", "kd_T=1,2,4,8,16", "--vary", "alpha=0.1,0.5,0.9"],
                              ["--distill", "kd"]),
    "dkd_beta": (["--pair", PAIR, "--vary", "dkd_beta=1,2,4,8,16"], ["--distill", "dkd"]),
    # DKD (Zhao et al., CVPR 2022) Table 11: WRN teachers of growing size into WRN-16-2. DKD's beta
    # is 6 on every rung (its wrn_40_2 -> wrn_16_2 config; 6 also for ResNet50 -> WRN-16-2, the
    # authors' reply in mdistiller issue 6), so that the teachers differ in size alone; KD and CRD
    # ignore the flag
    "capacity_gap": ([*(arg for t in CAPACITY_LADDER for arg in ("--pair", f"{t}:wrn_16_2")),
                      "--vary", "distill=kd,dkd,crd"], ["--dkd_beta", "6"]),
}


def study_argv(study: str, args, env) -> list:
    """ablate.py's command line of one study."""
    grid, flags = STUDIES[study]
    save = env.get("SAVE", "save")
    return ["--name", study, "--save", str(Path(env.get("ABLATIONS", "ablations")) / study),
            "--teachers", f"{save}/teachers", "--trials", env.get("TRIALS", "3"), "--launcher", args.launcher,
            "--jobs", env.get("JOBS", "1"), "--published", study, "--metric", args.metric,
            *(["--dry-run"] if args.dry_run else []),
            *(["--table_only"] if args.table_only else []), *grid,
            "--", *flags, "--epochs", env.get("EPOCHS", "240"), "--data_folder", env.get("DATA", "./data")]


def main(argv=None) -> int:
    parser = ablate.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", action="append", choices=tuple(STUDIES), default=None,
                        help="run this study only (repeatable); default: all")
    parser.add_argument("--launcher", choices=("shell", "submitit-local", "slurm"), default="shell")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the command lines and stop")
    parser.add_argument("--table_only", action="store_true", help="make the tables of the runs finished; run nothing")
    ablate.add_metric_flag(parser)
    args = exits_cleanly(parser.parse_args)(argv)
    if args.launcher == "shell" and "GPU" in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["GPU"]
    status = 0
    for study in args.study or STUDIES:
        status |= ablate.main(study_argv(study, args, os.environ))
    return status


if __name__ == "__main__":
    sys.exit(main())
