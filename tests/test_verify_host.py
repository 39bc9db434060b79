"""iabn.check's device round trip, on the CPU: verify.Host with a stand-in for CuPy whose
arrays are copies in their own class. The first GPU run failed every case of
`python -m iabn.check --backend cuda` because Host.get was handed host originals too; this
runs the same code path without a GPU."""
from __future__ import annotations

import types

import numpy as np
import pytest

from iabn_core import arrays, verify
from iabn_core.dtypes import PAIRS


class DeviceArray(np.ndarray):
    """An array 'on the device': only reachable through copies, like a CuPy array."""

    def get(self):
        return np.array(self)


@pytest.fixture(autouse=True)
def _device_arrays_run_on_numpy(monkeypatch):
    """The core takes exact ndarrays only (a subclass may change indexing or reductions);
    this stand-in changes neither, so it is registered as a NumPy kind for these tests."""
    monkeypatch.setitem(arrays._KINDS, DeviceArray, "numpy")


def _device_copy(a):
    return np.array(a, copy=True).view(DeviceArray)


def _asnumpy(a):
    return np.array(a, copy=True)  # a plain host copy, from either side, as cupy.asnumpy


FAKE_CUPY = types.SimpleNamespace(asarray=_device_copy, moveaxis=np.moveaxis, asnumpy=_asnumpy)

CASES = [verify.Case(PAIRS[0], layout, act, training, shape, affine=affine, residual=residual)
         for layout, act, training, shape, affine, residual in [
             ("ncs", "leaky_relu", True, (4, 8, 4, 4), True, False),
             ("nsc", "elu", True, (3, 8, 5), True, False),
             ("ncs", "identity", False, (3, 5, 7), False, False),
             ("nsc", "leaky_relu", True, (4, 8, 3), True, True)]]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_check_runs_across_a_device_boundary(case):
    host = verify.Host("numpy", xp=FAKE_CUPY)
    result = verify.run_case(case, "numpy", host=host)
    assert result.checks, "no stage was checked"
    assert result.passed, [(c.stage, c.max_rel) for c in result.checks if not c.passed]


def test_host_put_leaves_the_original_and_get_takes_both_sides():
    host = verify.Host("numpy", xp=FAKE_CUPY)
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    dev = host.put(x)
    assert isinstance(dev, DeviceArray) and dev is not x
    dev[...] = 0  # an in-place kernel writes the device copy only
    assert x.sum() == 276
    assert host.get(dev).sum() == 0 and host.get(x).dtype == np.float64
