"""Run a launch script's ``main`` on several argument lists in one fresh interpreter.

For each case it records the exit code, what went to stdout and stderr, and whether Ray
had been imported by then, which is how the tests show that bad input is
refused before Ray starts.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]

_PROBE = r"""
import contextlib, io, json, sys
sys.path.insert(0, "launch")
script = __import__(sys.argv[1])
out = {}
for name, argv in json.loads(sys.argv[2]).items():
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            code = script.main(argv) or 0
        except SystemExit as e:
            code = e.code
    out[name] = {"code": code, "stderr": err.getvalue(), "stdout": std.getvalue(), "ray": "ray" in sys.modules}
print(json.dumps(out))
"""


def probe(script: str, cases: Dict[str, List[str]], env: Optional[dict] = None) -> Dict[str, dict]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, script, json.dumps(cases)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
