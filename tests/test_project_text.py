"""The code, the docs and what users see speak of the project and its users only: no ticket
numbers, nothing about the remote GPU service or development tools the project was built with."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATTERN = r"device tool|quarter of an hour|issue [0-9]|[$]OUT"


@pytest.mark.skipif(shutil.which("grep") is None, reason="no grep on this machine")
def test_no_ticket_numbers_or_dev_service_in_code_docs_and_output() -> None:
    res = subprocess.run(["grep", "-rniE", PATTERN, "src", "benchmarks", "README.md"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stdout[-3000:] or res.stderr  # 1: grep found nothing
