"""What README and the docstrings tell a newcomer, run: the quick start, the docstring examples
of the public modules, and the in-place hazard README lists first (a ReLU right before an
in-place layer fails at backward; ABN there works)."""
from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iabn.torch import ABN, InPlaceABN

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs():
    text = README.read_text()
    section = text[text.index("\n## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    scope: dict = {}
    exec(compile(code, "README quick start", "exec"), scope)
    assert isinstance(scope["model"][1], InPlaceABN)


@pytest.mark.parametrize("cls", [ABN, InPlaceABN])
def test_module_docstring_examples_run(cls):
    assert all(word in cls.__doc__ for word in ("Args:", "Shape:", "Examples::"))
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(cls, cls.__name__, globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 3


RELU_FORMS = {
    "F.relu": lambda t: F.relu(t),
    "F.relu(inplace=True)": lambda t: F.relu(t, inplace=True),
    "torch.relu": torch.relu,
    "torch.relu_": torch.relu_,
    "nn.ReLU(inplace=True)": nn.ReLU(inplace=True),
}


def _conv_relu_norm(relu, norm):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    return norm(relu(conv(x)))


@pytest.mark.parametrize("form", RELU_FORMS)
def test_relu_right_before_an_inplace_layer_fails_at_backward(form):
    out = _conv_relu_norm(RELU_FORMS[form], InPlaceABN(8))  # forward itself works
    with pytest.raises(RuntimeError, match="modified by an inplace operation.*Relu"):
        out.sum().backward()


@pytest.mark.parametrize("form", RELU_FORMS)
def test_relu_before_abn_or_under_no_grad_works(form):
    _conv_relu_norm(RELU_FORMS[form], ABN(8)).sum().backward()
    with torch.no_grad():
        _conv_relu_norm(RELU_FORMS[form], InPlaceABN(8))
