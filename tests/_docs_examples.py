"""Run the Python example between a docs page's snippet markers, as a reader would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import FAST_XLA

ROOT = Path(__file__).resolve().parent.parent


def run_example(page: str, marker: str, max_lines: int = 30, xla_defaults: bool = True) -> str:
    """Run ``docs/<page>``'s ``python`` block between ``[start:<marker>]`` and ``[end:<marker>]``.

    In a fresh interpreter from the repository root (CPU, no progress bars); fails when the
    block is missing, longer than ``max_lines``, exits non-zero or prints nothing. Returns its
    standard output. ``xla_defaults=False`` keeps the suite's fast-compile flags (for examples
    whose printed numbers are not compared with the page's).
    """
    text = (ROOT / "docs" / page).read_text()
    section = re.search(
        rf"<!-- --8<-- \[start:{marker}\] -->(.*?)<!-- --8<-- \[end:{marker}\] -->", text, re.S
    )
    assert section, f"docs/{page} lost its {marker!r} snippet markers"
    blocks = re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)
    assert len(blocks) == 1, f"docs/{page}: expected one python block in {marker!r}"
    code = blocks[0]
    assert len(code.splitlines()) <= max_lines, f"docs/{page}'s example is over {max_lines} lines"
    # By default what a reader gets: XLA's default optimizations (the suite's fast-compile flags
    # change the last bits of floating-point results, and training amplifies them past the
    # page's "It prints").
    flags = [
        f for f in os.environ.get("XLA_FLAGS", "").split() if not xla_defaults or f not in FAST_XLA
    ]
    env = dict(
        os.environ, BILEVEL_NO_PROGRESS="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
        XLA_FLAGS=" ".join(flags),
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), f"docs/{page}'s example prints nothing"
    return proc.stdout
