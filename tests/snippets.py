"""Run a page's Python blocks in order, in one namespace, in a fresh interpreter (README and docs tests).

Each block is a dict ``{"page", "line", "code", "mode"}``; a ``"sketch"`` block is
compiled but not run.  The run fails on the first block that raises, naming its
page and line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

DRIVER = """
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
ns = {"__name__": "__snippets__"}
for b in blocks:
    try:
        code = compile(b["code"], f"{b['page']} block at line {b['line']}", "exec")
        if b["mode"] != "sketch":
            exec(code, ns)
    except BaseException:
        traceback.print_exc()
        print(f"{b['page']} block at line {b['line']} failed", file=sys.stderr)
        sys.exit(1)
    print(f"ok line {b['line']}")
"""


def run_snippets(blocks: list[dict[str, Any]], tmp_path: Path, env: dict[str, str], timeout: int) -> None:
    """Run ``blocks`` in a fresh interpreter in ``tmp_path/work``; assert every block ran."""
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "driver.py").write_text(DRIVER)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "blocks.json")], cwd=work,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert proc.stdout.count("ok line") == len(blocks), proc.stdout
