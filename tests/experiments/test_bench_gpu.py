"""Smoke run of the accelerator benchmark: it runs its parts and collects their rows."""

import json

import pytest

from experiments import bench_gpu


def test_bench_gpu_smoke_collects_every_part(tmp_path, bars):
    record = bench_gpu.main(["--smoke", "--parts", "optax,stn", "--out", str(tmp_path)])
    own = [b for b in bars if b.desc == "bench_gpu"]
    assert len(own) == 1 and own[0].n == own[0].total == 2
    assert set(record["parts"]) == {"optax", "stn"}
    assert record["platform"] in ("cpu", "gpu") and record["device"]
    data = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert data["parts"]["stn"][0]["command"] == "python -m experiments.bench_stn --smoke"
    for part in ("optax", "stn"):
        (entry,) = data["parts"][part]
        assert entry["rows"], part
        # Each part's own results stay next to the collected table.
        assert (tmp_path / part / "0" / "summary.json").exists() or (
            tmp_path / part / "1" / "summary.json"
        ).exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["smoke"] is True
    n_rows = sum(len(data["parts"][p][0]["rows"]) for p in ("optax", "stn"))
    assert len(summary["rows"]) == n_rows
    assert all(r["what"].startswith(f"[{record['device']}]") for r in summary["rows"])
    assert (tmp_path / "bench_gpu.csv").exists()


def test_every_default_command_parses(monkeypatch):
    # The default (accelerator) arguments are valid for the module they go to: each module's
    # parser is run on them, and main stops right after parsing.
    import argparse
    import importlib

    class Parsed(Exception):
        pass

    def stop(self, *a, **k):
        raise Parsed

    for device in ("gpu", "cpu"):
        for jobs in bench_gpu._commands(device, smoke=False).values():
            for module, argv in jobs:
                monkeypatch.setattr(argparse.ArgumentParser, "parse_args", _parse_then(stop))
                with pytest.raises(Parsed):
                    importlib.import_module(f"experiments.{module}").main(argv)


def _parse_then(stop):
    import argparse

    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)  # a bad argument exits here (SystemExit)
        stop(self)

    return parse_args


def test_unknown_part_is_an_error():
    with pytest.raises(SystemExit):
        bench_gpu.main(["--parts", "optax,bogus", "--no-progress"])
