"""Fixtures of the experiment tests: the progress bars a script creates, counted."""

import pytest

from experiments import _common


class FakeBar:
    """Stands in for the tqdm bar of ``_common.progress``: counts what the script reports."""

    def __init__(self, iterable=None, *, total=None, initial=0, **kwargs):
        self.iterable = iterable
        self.total = len(iterable) if total is None and iterable is not None else total
        self.n = initial
        self.desc = kwargs.get("desc")

    def update(self, k=1):
        self.n += k

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1


@pytest.fixture
def bars(monkeypatch):
    """The progress bars a script creates (each must end at total)."""
    made = []

    def progress(iterable=None, **kwargs):
        made.append(FakeBar(iterable, **kwargs))
        return made[-1]

    monkeypatch.setattr(_common, "progress", progress)
    return made
