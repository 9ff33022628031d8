"""The committed fixtures are exactly what fixtures/make_fixtures.py generates."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fixtures_are_current():
    run = subprocess.run([sys.executable, "fixtures/make_fixtures.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
