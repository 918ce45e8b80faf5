"""Results report: the README's experiments and results tables, generated from the scripts' outputs.

Every experiment script writes ``results/NAME/summary.json`` (its headline rows, wall time and
machine). This script copies the summaries of full (non ``--smoke``) runs into the tracked folder
``experiments/summaries/`` and rewrites the README between the markers
``<!-- experiments:start -->`` / ``<!-- experiments:end -->`` and ``<!-- results:start -->`` /
``<!-- results:end -->``, so the tables cannot drift from what the scripts printed. The test suite
checks that the README equals what this script would write.

    python -m experiments.quickstart     # any experiment, full run
    python -m experiments.report          # refresh the README's tables
    python -m experiments.report --check  # exit 1 if the README is out of date
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from experiments import _common

# The order of the tables.
EXPERIMENTS = (
    "quickstart",
    "hd_optimizers",
    "bench_optax",
    "hypergrad_accuracy",
    "curvature",
    "bench_solvers",
    "hyper_cleaning",
    "hpo_benchmark",
    "weight_decay",
    "batchnorm",
    "stn_ridge",
    "stn_digits",
    "stn_mnist_cnn",
    "bench_stn",
    "bench_bilevel",
    "bench_population",
    "bench_gpu",
    "bench_scale",
    "bench_bilevel_methods",
    "fedhyper",
    "pbt",
    "imaml_sinusoid",
)
README = Path(__file__).resolve().parent.parent / "README.md"
MARKERS = {
    "experiments": ("<!-- experiments:start -->", "<!-- experiments:end -->"),
    "results": ("<!-- results:start -->", "<!-- results:end -->"),
}


def _description(name: str) -> str:
    """First line of the experiment module's docstring (read without importing it)."""
    import ast

    source = (Path(__file__).parent / f"{name}.py").read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    return doc.splitlines()[0].rstrip(".") if doc else ""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def load_summaries(folder: Path = _common.SUMMARIES) -> dict[str, dict]:
    """The tracked summaries, by experiment name."""
    out = {}
    for name in EXPERIMENTS:
        path = Path(folder) / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def render_experiments(summaries: dict[str, dict]) -> str:
    """Markdown table: command, what it does, measured default run time."""
    lines = ["| command | what | default run |", "| --- | --- | --- |"]
    for name in EXPERIMENTS:
        summary = summaries.get(name)
        runtime = (
            f"{_common.format_seconds(summary['seconds'])} ({summary['machine']})"
            if summary
            else "not measured yet"
        )
        lines.append(
            f"| `python -m experiments.{name}` | {_cell(_description(name))} | {runtime} |"
        )
    return "\n".join(lines)


def render_results(summaries: dict[str, dict]) -> str:
    """Markdown table of every summary row: what, command, result, target."""
    lines = ["| what | command | result | target |", "| --- | --- | --- | --- |"]
    for name in EXPERIMENTS:
        summary = summaries.get(name)
        if summary is None:
            continue
        for row in summary["rows"]:
            lines.append(
                f"| {_cell(row['what'])} | `{summary['command']}` | {_cell(row['result'])} "
                f"| {_cell(row.get('target', '-'))} |"
            )
    missing = [n for n in EXPERIMENTS if n not in summaries]
    if missing:
        lines.append("")
        lines.append("Not measured yet: " + ", ".join(f"`{n}`" for n in missing) + ".")
    return "\n".join(lines)


def rewrite(text: str, key: str, body: str) -> str:
    """``text`` with the part between the two markers of ``key`` replaced by ``body``."""
    start, end = MARKERS[key]
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"README must contain {start!r} and {end!r} exactly once each")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{body}\n{end}{tail}"


def render_readme(text: str, summaries: dict[str, dict]) -> str:
    """The README with both generated tables refreshed."""
    text = rewrite(text, "experiments", render_experiments(summaries))
    return rewrite(text, "results", render_results(summaries))


def collect(results: Path, folder: Path = _common.SUMMARIES) -> list[str]:
    """Copy ``results/NAME/summary.json`` of full runs into ``folder``; returns the names copied."""
    copied = []
    Path(folder).mkdir(parents=True, exist_ok=True)
    for name in EXPERIMENTS:
        path = Path(results) / name / "summary.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        if summary.get("smoke") or not {"experiment", "rows", "seconds", "machine"} <= set(summary):
            continue  # a --smoke run, or a file from before summaries existed
        shutil.copyfile(path, Path(folder) / f"{name}.json")
        copied.append(name)
    return copied


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description=__doc__.split("\n\n")[0] + " Runs in a second.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--results", type=Path, default=_common.RESULTS_ROOT, help="results root")
    parser.add_argument("--readme", type=Path, default=README, help="README to rewrite")
    parser.add_argument(
        "--check", action="store_true", help="only check the README is up to date (exit 1 if not)"
    )
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    if args.check:
        fresh = render_readme(text, load_summaries())
        if fresh != text:
            print(f"{args.readme} is out of date: run python -m experiments.report")
            return 1
        print(f"{args.readme} is up to date")
        return 0
    copied = collect(args.results)
    summaries = load_summaries()
    args.readme.write_text(render_readme(text, summaries))
    print(f"summaries taken from {args.results}/: {', '.join(copied) or 'none (no full runs)'}")
    print(
        f"tables in {args.readme} rewritten from {len(summaries)} of {len(EXPERIMENTS)} experiments"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
