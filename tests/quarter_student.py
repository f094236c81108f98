"""train_student.py on every fourth digit (method_helpers.quarter_digits), as a program: for the
tests that start train_student.py runs as processes (scripts/tune.py's trials). With
QUARTER_STUDENT_HOLD set, a run waits for a signal before it starts, so that a test can kill its
worker while the trial is surely running."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pytest  # noqa: E402

import train_student  # noqa: E402
from method_helpers import quarter_digits  # noqa: E402

if __name__ == "__main__":
    if os.environ.get("QUARTER_STUDENT_HOLD") and "--help" not in sys.argv:
        signal.pause()
    quarter_digits(pytest.MonkeyPatch())
    train_student.main()
