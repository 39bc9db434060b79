"""ndarray subclasses that change indexing or reduction semantics (np.matrix keeps two dims
through every index and reduction; a masked array's reductions skip masked values) are
refused wherever an array is taken, naming the argument, before any byte is written, on every
NumPy backend. Only plain ndarrays (and CuPy's) are accepted; the message says how to get one
over the same memory (np.asarray), so the in-place contract still holds for the caller."""
from __future__ import annotations

import numpy as np
import pytest

from iabn_core import arrays, ops
from iabn_core.validate import IABNError
from test_validation import assert_same, snapshot

# np.matrix warns that it is pending deprecation: constructing one is the point here
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
BACKENDS = ["numpy", "emulator", "null"]
SUBCLASSES = {"matrix": np.asmatrix,
              "masked": lambda a: np.ma.masked_array(a, mask=np.zeros(a.shape, bool))}


def _setup(seed=0, n=6, c=3):
    """A 2-D problem (N, C): the only shape np.matrix can hold."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c)).astype(np.float32)
    params = dict(weight=rng.normal(size=c).astype(np.float32),
                  bias=rng.normal(size=c).astype(np.float32),
                  running_mean=np.zeros(c, np.float32), running_var=np.ones(c, np.float32))
    return x, params


def _every(*arrays_):
    return [a for a in arrays_ if a is not None]


# np.matrix cannot have shape (C,): a (1, C) one would fail the shape check anyway, so the
# per-channel arguments are tried as masked arrays, which keep the shape
FORWARD_CASES = [(sub, arg) for sub in sorted(SUBCLASSES)
                 for arg in ("x", "residual", "weight", "bias", "running_mean", "running_var")
                 if sub == "masked" or arg in ("x", "residual")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sub,arg", FORWARD_CASES)
def test_forward_refuses_subclass_before_any_write(backend, sub, arg):
    x, params = _setup()
    residual = np.ones_like(x) if arg == "residual" else None
    wrap = SUBCLASSES[sub]
    if arg == "x":
        x = wrap(x)
    elif arg == "residual":
        residual = wrap(residual)
    else:
        params[arg] = wrap(params[arg])
    everything = _every(x, residual, *params.values())
    before = snapshot(*[np.asarray(a) for a in everything])
    with pytest.raises(IABNError, match=rf"{arg} is a .*np\.asarray"):
        ops.forward(x, **params, training=True, backend=backend, residual=residual)
    assert_same(before, [np.asarray(a) for a in everything])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg", ["dz", "out", "residual", "residual_out", "z"])
def test_backward_refuses_matrix_before_any_write(backend, arg):
    x, params = _setup(seed=1)
    r = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    ctx = ops.forward(x, **params, training=True, backend=backend, residual=r)
    z = x
    bufs = dict(z=z, dz=np.ones_like(z), out=np.zeros_like(z), residual=r,
                residual_out=np.zeros_like(z))
    bufs[arg] = np.asmatrix(bufs[arg])
    plain = [np.asarray(b) for b in bufs.values()]
    before = snapshot(*plain, *params.values())
    with pytest.raises(IABNError, match=rf"{arg} is a numpy\.matrix.*np\.asarray"):
        ops.backward(ctx, bufs["z"], bufs["dz"], out=bufs["out"], residual=bufs["residual"],
                     residual_out=bufs["residual_out"])
    assert_same(before, plain + list(params.values()))


def test_the_issue_probe_np_matrix_x_is_refused_and_ndarray_view_matches():
    """The reported case: an np.matrix x gave a wrong z and wrong running stats on the NumPy
    backend. It is refused now, and np.asarray(m) (a view of the same memory) is the fix the
    message names: it computes in place into the matrix's own buffer."""
    x, params = _setup(seed=3)
    m = np.asmatrix(x.copy())
    with pytest.raises(IABNError, match="x is a numpy.matrix"):
        ops.forward(m, **params, backend="numpy")
    expected, p2 = x.copy(), {k: v.copy() for k, v in params.items()}
    ops.forward(expected, **p2, backend="numpy")
    ops.forward(np.asarray(m), **params, backend="numpy")
    np.testing.assert_array_equal(np.asarray(m), expected)
    np.testing.assert_array_equal(params["running_mean"], p2["running_mean"])


def test_kind_is_exact_type():
    """arrays.kind decides by the exact type (one dict lookup on the hot path): a subclass is
    not 'numpy', and plain ndarrays still are."""
    assert arrays.kind(np.zeros(3)) == "numpy"
    assert arrays.kind(np.asmatrix(np.zeros((2, 2)))) is None
    assert arrays.kind(np.ma.zeros(3)) is None
    assert arrays.kind([1.0]) is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["weight", "bias", "running_var"])
def test_a_param_of_a_dtype_no_kernel_takes_is_named_itself(backend, bad):
    """An int32 weight beside a float32 bias was reported as 'bias has dtype float32 but
    weight has int32': the argument at fault is the int32 one, whichever it is."""
    x, params = _setup(seed=4)
    params[bad] = params[bad].astype(np.int32)
    before = snapshot(x, *params.values())
    with pytest.raises(IABNError, match=rf"^{bad} has dtype int32, which does not go with x"):
        ops.forward(x, **params, backend=backend)
    assert_same(before, [x, *params.values()])
