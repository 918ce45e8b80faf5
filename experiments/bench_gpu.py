"""The key speed ratios on an accelerator, in one run: one JSON file and one table.

Runs four benchmarks back to back on JAX's default device (the GPU when there is one), each
with the settings below, and collects the headline rows of each into ``bench_gpu.json``:

- ``optax``: ``bilevel.hd_adam`` / ``optax.adam`` per-step time, MLP 784-512-512-10 (batch 256)
  and a 10M-parameter MLP (``experiments.bench_optax``; target <= 1.05x);
- ``scale``: one implicit outer step / 10 plain Optax steps at 1e6 and 1e7 parameters, MLP and
  BatchNorm ResNet at 1e6 (``experiments.bench_scale``; target <= 3x);
- ``stn``: Self-Tuning Network epoch / plain epoch, full and rank-8 responses
  (``experiments.bench_stn``; targets <= 2.2x and <= 1.5x);
- ``population``: vmapped population of 1..256 tuners vs a Python loop
  (``experiments.bench_population``; target >= 8x at 32 members).

Each part writes its own results (JSON, CSV, PNG) under ``results/bench_gpu/PART/``; this script
adds ``bench_gpu.json`` (device name, every part's rows and wall time) and prints one table.
On a machine without an accelerator it runs on the CPU and says so: the ratios are then the
CPU's, which the parts' own default runs already report.

    python -m experiments.bench_gpu                       # sized for < 10 min on one GPU (unmeasured)
    python -m experiments.bench_gpu --parts optax,stn     # a subset
    python -m experiments.bench_gpu --smoke               # every part tiny, for the test suite
"""

from __future__ import annotations

import json
import time

import jax

from experiments import _common

NAME = "bench_gpu"
PARTS = ("optax", "scale", "stn", "population")


def _commands(device: str, smoke: bool) -> dict[str, list[tuple[str, list[str]]]]:
    """Per part: ``(experiment module, its arguments)`` run in order (before ``--out``)."""
    if smoke:
        return {
            "optax": [("bench_optax", ["--smoke"])],
            "scale": [("bench_scale", ["--smoke", "--device", device])],
            "stn": [("bench_stn", ["--smoke"])],
            "population": [("bench_population", ["--smoke", "--device", device])],
        }
    return {
        "optax": [("bench_optax", ["--sizes", "mlp", "10m"])],
        "scale": [
            (
                "bench_scale",
                [
                    "--device",
                    device,
                    "--sizes",
                    "1e6,1e7",
                    "--resnet-sizes",
                    "1e6",
                    "--memory-steps",
                    "5,40",
                ],
            )
        ],
        "stn": [("bench_stn", [])],  # full and rank-8 responses, with the breakdown
        "population": [("bench_population", ["--device", device])],
    }


def _device() -> tuple[str, str]:
    """``("gpu" | "cpu", device description)`` of JAX's default device."""
    dev = jax.devices()[0]
    kind = "gpu" if dev.platform in ("gpu", "cuda", "rocm") else "cpu"
    return kind, f"{dev.platform}: {getattr(dev, 'device_kind', dev.platform)}"


def main(argv=None):
    import importlib

    wall = time.perf_counter()
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="comma-separated benchmarks to run: " + ",".join(PARTS),
    )
    args = parser.parse_args(argv)
    parts = _common.parse_choices(parser, args.parts, PARTS, "part")
    if not parts:
        parser.error("--parts names no benchmark")
    out = _common.results_dir(args)
    kind, device = _device()
    if kind == "cpu":
        _common.phase(f"no accelerator found: running on the CPU ({device})", quiet=False)
    commands = _commands(kind, args.smoke)
    jobs = [(part, module, argv_) for part in parts for module, argv_ in commands[part]]
    record = {"device": device, "platform": kind, "smoke": args.smoke, "parts": {}}
    rows = []
    bar = _common.progress(total=len(jobs), desc=NAME, unit="benchmark", disable=args.no_progress)
    for i, (part, module, extra) in enumerate(jobs):
        bar.set_postfix_str(f"{part}: {module} {' '.join(extra)}".strip())
        sub = out / part / str(i)
        t0 = time.perf_counter()
        importlib.import_module(f"experiments.{module}").main(
            [*extra, "--out", str(sub), "--seed", str(args.seed), "--no-progress"]
        )
        seconds = time.perf_counter() - t0
        summary = json.loads((sub / "summary.json").read_text())
        entry = {"command": f"python -m experiments.{module} {' '.join(extra)}".strip()}
        entry.update(seconds=seconds, rows=summary["rows"], results=str(sub))
        record["parts"].setdefault(part, []).append(entry)
        for row in summary["rows"]:
            rows.append({"part": part, **row})
        bar.update(1)
    bar.close()
    record["seconds"] = time.perf_counter() - wall
    _common.save_json(out / f"{NAME}.json", record)
    _common.save_csv(out / f"{NAME}.csv", rows)
    _common.print_table(
        [{"part": r["part"], "what": r["what"][:70], "result": r["result"]} for r in rows],
        title=f"key ratios on {device}",
    )
    summary = [
        {
            "what": f"[{device}] {r['what']}",
            "result": r["result"],
            "target": r.get("target", "-"),
        }
        for r in rows
    ]
    wall = time.perf_counter() - wall
    _common.write_summary(out, NAME, summary, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return record


if __name__ == "__main__":
    main()
