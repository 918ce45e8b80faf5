"""The examples in the public docstrings run and give what they show."""

import doctest
import importlib

import pytest

MODULES = [
    "solvers._linear",
    "solvers._implicit",
    "solvers._argmin",
    "solvers._methods",
    "solvers._status",
    "solvers.checks",
    "bilevel.hparams",
    "bilevel._bilevel",
    "bilevel._utils",
    "bilevel._hd",
    "bilevel._hyper_adapt",
    "bilevel.stn._layers",
    "bilevel.stn._perturb",
    "bilevel.stn._augment",
    "bilevel.stn._trainer",
    "bilevel.stn._methods",
    "bilevel._fit",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
