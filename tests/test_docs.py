"""Every public name is documented, with a runnable example (run by --doctest-modules)."""

from __future__ import annotations

import inspect

import pytest

import jquant

PUBLIC = sorted(jquant.__all__)


def test_all_is_sorted_and_complete():
    exported = {n for n in dir(jquant) if not n.startswith("_")}
    assert set(jquant.__all__) <= exported
    assert len(set(jquant.__all__)) == len(jquant.__all__)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_docstring(name):
    obj = getattr(jquant, name)
    doc = inspect.getdoc(obj)
    assert doc and len(doc.split()) >= 5, f"jquant.{name} needs a docstring"


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in PUBLIC
        if not (inspect.isclass(getattr(jquant, n)) and issubclass(getattr(jquant, n), Exception))
    ],
)
def test_public_name_has_a_runnable_example(name):
    obj = getattr(jquant, name)
    doc = inspect.getdoc(obj) or ""
    assert ">>>" in doc, f"jquant.{name}'s docstring needs an Example with >>> lines"
