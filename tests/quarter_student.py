"""train_student.py on every fourth digit (method_helpers.quarter_digits), as a program: for the
tests that start train_student.py runs as processes (scripts/tune.py's trials)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pytest  # noqa: E402

import train_student  # noqa: E402
from method_helpers import quarter_digits  # noqa: E402

if __name__ == "__main__":
    quarter_digits(pytest.MonkeyPatch())
    train_student.main()
