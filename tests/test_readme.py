"""The README runs as written: every Python block, the setup commands, the generated tables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)


def _first_line(block: str) -> str:
    return next(line for line in block.splitlines() if line and not line.startswith("import"))


def test_the_readme_has_its_python_blocks():
    assert len(BLOCKS) >= 4, "the README lost Python examples (or the fence pattern changed)"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_each_python_block_runs_alone_and_prints_its_result(index):
    """Run the block in a fresh interpreter from the repository root, as a reader would."""
    env = dict(os.environ, BILEVEL_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"README block {index} ({_first_line(BLOCKS[index])!r}) failed:\n{proc.stderr[-3000:]}"
    )
    assert proc.stdout.strip(), f"README block {index} prints nothing"
    assert "nan" not in proc.stdout.lower(), proc.stdout


def test_the_readme_test_command_is_what_ci_runs():
    """`.ci/run` runs exactly the README's test command (plus lint and the docs build)."""
    match = re.search(r"Run the tests.*?```bash\n(.*?)\n```", README, re.S)
    assert match, "the README lost its test command"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in match.group(1).split(" && "):
        command = command.strip()
        assert any(line.strip() == command for line in ci), f"{command!r} is not in .ci/run"


def test_the_results_tables_are_generated_from_the_tracked_summaries():
    """The README's experiments/results sections equal what `experiments.report` writes."""
    from experiments import report

    fresh = report.render_readme(README, report.load_summaries())
    assert fresh == README, "README tables are out of date: run python -m experiments.report"


def test_report_rewrites_only_between_the_markers(tmp_path):
    from experiments import report

    summary = {
        "experiment": "quickstart",
        "command": "python -m experiments.quickstart",
        "smoke": False,
        "seconds": 95.0,
        "machine": "2-core CPU",
        "rows": [{"what": "a | b", "result": "0.1", "target": "-"}],
    }
    text = "intro\n<!-- experiments:start -->\nold\n<!-- experiments:end -->\nmiddle\n"
    text += "<!-- results:start -->\nold\n<!-- results:end -->\nend\n"
    out = report.render_readme(text, {"quickstart": summary})
    assert out.startswith("intro\n") and "\nmiddle\n" in out and out.endswith("end\n")
    assert "| a \\| b | `python -m experiments.quickstart` | 0.1 | - |" in out
    assert "1.6 min (2-core CPU)" in out
    assert "Not measured yet: `hd_optimizers`" in out
    with pytest.raises(ValueError, match="exactly once"):
        report.render_readme("no markers", {})
