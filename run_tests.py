#!/usr/bin/env python3
"""Run the test suite: prepares the uv environment (like run_speedrun.py), then pytest.

python run_tests.py            # everything
python run_tests.py -k model   # extra arguments go to pytest
"""

import subprocess
import sys

from run_speedrun import ROOT, ensure_env

if __name__ == "__main__":
    python = ensure_env(extras=("torch",))  # torch: nanochat checkpoint import/export tests
    sys.exit(subprocess.run([str(python), "-m", "pytest", *sys.argv[1:]], cwd=ROOT).returncode)
