"""Shared pytest configuration: fast XLA compilation, the ``slow`` marker, small helpers."""

import os

import pytest

# The suite is compile-bound on CPU (many small jitted programs, each run a few times): XLA's
# backend optimizations double its time. Set before any computation initializes the backend, so
# xdist workers and subprocesses (README blocks) inherit it; BILEVEL_TEST_XLA_FULL=1 keeps XLA's
# defaults. Results then differ from the defaults' in the last bits: tests check tolerances,
# bit-for-bit comparisons of two different programs allow 2 ulps under these flags
# (tests/bilevel/test_stateful.py), and the docs examples whose printed numbers are checked run
# at XLA's defaults, as a reader runs them (tests/_docs_examples.py).
FAST_XLA = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
FAST_XLA_ON = not os.environ.get("BILEVEL_TEST_XLA_FULL")
if FAST_XLA_ON:
    _flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in FAST_XLA if f not in _flags])


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
