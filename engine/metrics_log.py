"""Per-epoch metrics: one CSV row, TensorBoard scalars and hyper-parameters.

Each stage of a run (an init stage such as FT's paraphraser training, then the
main training) logs to its own TensorBoard writer, so epoch numbers stay each
stage's own. The main stage writes into the run directory itself; an init stage
into a sub-directory named after it.
"""
import csv
import io
import os
import sys
from pathlib import Path

from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import summary

from core.errors import UserError
from engine.atomic import appending, write_atomic

METRICS_FILE = "metrics.csv"
MAIN_STAGE = "main"
# TensorBoard's HParams view sorts its columns by (differs across runs first, name) and ticks
# only the first five; these are the ones a comparison of runs is about.
LEADING_HPARAMS = ("student", "teacher", "method", "alpha", "beta")


class MetricsLog:
    def __init__(self, run_dir: Path, resume_position: dict = None, enabled: bool = True):
        """resume_position: {'rows': CSV rows to keep, 'stage': ..., 'epoch': ...} from the
        checkpoint being resumed; what was logged after that checkpoint is dropped."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.resume_position = resume_position or {"rows": 0, "stage": None, "epoch": 0}
        self.writers = {}
        self.rows = self.resume_position["rows"]
        if enabled:
            self._keep_first_rows(self.rows)

    def _keep_first_rows(self, n: int) -> None:
        """Keep the rows the resumed checkpoint counts, less any torn row (cut short by an
        interruption: DictReader fills its missing columns with None), said in a warning."""
        if not self.path.exists():
            return
        rows, fields = self._read()
        kept, torn = [], []
        for row in rows[:n]:
            (torn if None in row.values() or None in row else kept).append(row)
        if torn:
            where = ", ".join(f"{row['stage']} epoch {row['epoch']}" for row in torn)
            print(f"warning: {self.path} holds torn rows ({where}), cut short when the run was "
                  "interrupted; dropped, so those epochs' figures are missing from it", file=sys.stderr)
        self._rewrite(kept, fields)
        self.rows = len(kept)

    def _read(self):
        """(rows, field names) of metrics.csv; an unreadable file is moved aside with a warning
        and the log starts afresh (the run itself is in the checkpoint, not here)."""
        try:
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                fields = list(reader.fieldnames or [])
            if fields and not {"stage", "epoch"} <= set(fields):
                raise csv.Error("no stage and epoch columns")
            return rows, fields
        except (csv.Error, UnicodeDecodeError) as err:
            aside = self.path.with_name(self.path.name + ".unreadable")
            os.replace(self.path, aside)
            print(f"warning: {self.path} is unreadable ({err}); moved to {aside.name}, "
                  "new rows start a fresh file", file=sys.stderr)
            self.rows = 0
            return [], []

    def _rewrite(self, rows, fields) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fields)
        if fields:
            writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path, text.getvalue().encode())

    def last_evaluation(self) -> dict:
        """test_top1 and test_top5 of the last main-stage row (a resumed run that had finished)."""
        rows = [r for r in self._read()[0] if r["stage"] == MAIN_STAGE] if self.path.exists() else []
        if not rows:
            raise UserError(f"{self.path} holds no evaluated epoch to report; "
                            "evaluate the run's checkpoint with evaluate.py instead")
        return {k: float(rows[-1][k]) for k in ("test_top1", "test_top5")}

    def _writer(self, stage: str):
        if stage not in self.writers:
            from torch.utils.tensorboard import SummaryWriter
            log_dir = self.run_dir if stage == MAIN_STAGE else self.run_dir / stage
            purge = None
            if self.resume_position["stage"] == stage:
                purge = self.resume_position["epoch"] + 1
            self.writers[stage] = SummaryWriter(log_dir=str(log_dir), purge_step=purge)
        return self.writers[stage]

    def log_epoch(self, stage: str, epoch: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self._append({"stage": stage, "epoch": epoch, **metrics})
        writer = self._writer(stage)
        for key, value in metrics.items():
            writer.add_scalar(_tb_tag(key), value, epoch)
        writer.flush()

    def _append(self, row: dict) -> None:
        fields, old_rows = [], []
        if self.path.exists() and self.path.stat().st_size:
            old_rows, fields = self._read()
        new_fields = [k for k in row if k not in fields]
        if new_fields:  # a later stage logs terms the earlier did not: widen the header
            fields += new_fields
            self._rewrite(old_rows, fields)
        with appending(self.path) as f:
            csv.DictWriter(f, fieldnames=fields).writerow(row)
        self.rows += 1

    def log_hparams(self, hparams: dict, final_metrics: dict) -> None:
        """Hyper-parameters with the final figures, for TensorBoard's HParams comparison."""
        if not self.enabled:
            return
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        metrics = {f"hparam/{k}": v for k, v in final_metrics.items()}
        experiment, session_start, session_end = summary.hparams(clean, metrics)
        _lead_with(experiment, LEADING_HPARAMS)
        writer = self._writer(MAIN_STAGE)
        for record in (experiment, session_start, session_end):
            writer.file_writer.add_summary(record)
        for name, value in metrics.items():
            writer.add_scalar(name, value)
        writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _lead_with(experiment, names) -> None:
    """Mark `names` as the columns that differ between runs, so TensorBoard shows them first."""
    value = experiment.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in names
    value.metadata.plugin_data.content = data.SerializeToString()


def _tb_tag(key: str) -> str:
    """train_top1 -> train/top1, so TensorBoard groups scalars by phase."""
    phase, _, rest = key.partition("_")
    return f"{phase}/{rest}" if phase in ("train", "test") and rest else key
