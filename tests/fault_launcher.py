"""``python tests/fault_launcher.py train ...``: ``masksub`` with the FAULT_* patches of
``faults.py`` installed first (for kill -9 / signal tests that need a separate process)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ == "__main__":
    import faults

    from masksub.cli import main

    faults.install_from_env()
    sys.exit(main(sys.argv[1:]))
