"""The signature cache (iabn_core.signature) and the eager torch path: a cache hit skips no
check that depends on the call's buffers, reuses what was derived from the signature, and the
eager path keeps autograd's in-place bookkeeping."""
from __future__ import annotations

import numpy as np
import pytest

from iabn_core import backends, ops, plan, signature
from iabn_core.validate import IABNError

C = 4


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, C, 5)).astype(np.float32)
    return (x, np.ones(C, np.float32), np.zeros(C, np.float32), np.zeros(C, np.float32),
            np.ones(C, np.float32))


def _fwd(x, w, b, rm, rv, **kw):
    return ops.forward(x, w, b, rm, rv, backend="numpy", **kw)


def test_hit_returns_the_cached_signature():
    x, w, b, rm, rv = _inputs()
    first = _fwd(x, w, b, rm, rv).sig
    x2, w2, b2, rm2, rv2 = _inputs(1)  # other buffers, same signature
    assert _fwd(x2, w2, b2, rm2, rv2).sig is first
    # another eps, activation or layout is another signature
    assert _fwd(x2, w2, b2, rm2, rv2, eps=1e-3).sig is not first
    x3 = np.moveaxis(np.ascontiguousarray(np.moveaxis(x2, 1, -1)), -1, 1)  # channels-last
    assert _fwd(x3, w2, b2, rm2, rv2).sig.layout == "nsc"


def test_unusual_scalar_types_are_validated_every_time():
    """A bool passed as training=1 must not hit the entry cached for training=True."""
    x, w, b, rm, rv = _inputs()
    _fwd(x, w, b, rm, rv, training=True)
    with pytest.raises(IABNError, match="training must be a bool"):
        _fwd(x, w, b, rm, rv, training=1)
    sig = _fwd(x, w, b, rm, rv, eps=np.float64(1e-5)).sig  # NumPy scalar: uncached, valid
    assert sig.prob.eps == 1e-5


def _hostile_hits():
    """(name, builder) pairs: each builds a call with a cached signature whose buffers (or
    momentum, outside the key) are wrong."""
    def read_only_x(x, w, b, rm, rv):
        x.flags.writeable = False
        return (x, w, b, rm, rv), {}, "x is read-only"

    def read_only_running(x, w, b, rm, rv):
        rv.flags.writeable = False
        return (x, w, b, rm, rv), {}, "running_var is read-only"

    def shared_params(x, w, b, rm, rv):
        return (x, w, w, rm, rv), {}, "bias shares memory with weight"

    def stats_in_x(x, w, b, rm, rv):
        return (x, w, b, x[0, 0, :C], rv), {}, "running_mean shares memory with x"

    def bad_momentum(x, w, b, rm, rv):
        return (x, w, b, rm, rv), dict(momentum=1.5), "momentum must be in"

    return [("read-only x", read_only_x), ("read-only running_var", read_only_running),
            ("weight is bias", shared_params), ("running_mean inside x", stats_in_x),
            ("momentum", bad_momentum)]


@pytest.mark.parametrize("backend", ["numpy", "null"])
@pytest.mark.parametrize("case", _hostile_hits(), ids=lambda c: c[0])
def test_hit_still_runs_the_buffer_checks(case, backend):
    _, build = case
    good = _inputs()
    ops.forward(*good, backend=backend)  # the signature is cached now
    args, kw, match = build(*_inputs(1))
    assert signature._key(args[0], args[1:], True, 1e-5, "leaky_relu", 0.01, 2) in \
        signature._cache, "the hostile call must share the cached signature"
    before = [a.copy() for a in args]
    with pytest.raises(IABNError, match=match):
        ops.forward(*args, backend=backend, **kw)
    for a, a0 in zip(args, before):
        assert a.tobytes() == a0.tobytes()


def test_backward_hit_still_runs_the_buffer_checks():
    x, w, b, rm, rv = _inputs()
    ctx = _fwd(x, w, b, rm, rv)
    dz = np.ones_like(x)
    dz.flags.writeable = False
    with pytest.raises(IABNError, match="dz is read-only"):
        ops.backward(ctx, x, dz)
    with pytest.raises(IABNError, match="z and dz share memory"):
        ops.backward(ctx, x, x)
    with pytest.raises(IABNError, match="out shares memory"):
        ops.backward(ctx, x, np.ones_like(x), out=x)
    with pytest.raises(IABNError, match="same memory layout"):  # other geometry: full checks
        ops.backward(ctx, x, np.asfortranarray(np.ones_like(x)))


def test_plans_and_handles_are_derived_once(monkeypatch):
    """A repeated call plans no grid and looks up no kernel: both come from the cached
    Problem's memo (machine-independent counts, not timings)."""
    be = backends.get("null")
    x, w, b, rm, rv = _inputs()
    ctx = ops.forward(x, w, b, rm, rv, backend=be)
    ops.backward(ctx, x, np.ones_like(x))
    calls = {"plan": 0, "function": 0}
    real_plan, real_fn = plan.elementwise, be.rt.function

    def counting_plan(*a, **k):
        calls["plan"] += 1
        return real_plan(*a, **k)

    def counting_fn(*a, **k):
        calls["function"] += 1
        return real_fn(*a, **k)

    monkeypatch.setattr(plan, "elementwise", counting_plan)
    monkeypatch.setattr(be.rt, "function", counting_fn)
    n0 = be.launches
    for seed in range(3):
        x, w, b, rm, rv = _inputs(seed)
        ctx = ops.forward(x, w, b, rm, rv, backend=be)
        ops.backward(ctx, x, np.ones_like(x))
    assert be.launches - n0 == 3 * 4
    assert calls == {"plan": 0, "function": 0}


def test_backend_object_with_only_the_stages():
    """validate.backend accepts any object with the stage methods; the unsynchronised path
    then runs the generic stage sequence (Composites) for it."""
    from iabn_core.backends.base import Composites
    from iabn_core.backends.numpy_backend import NumpyBackend

    inner = NumpyBackend()

    class StagesOnly:
        def __getattr__(self, name):
            if name in ("forward_all", "backward_all"):
                raise AttributeError(name)
            return getattr(inner, name)

    x, w, b, rm, rv = _inputs()
    ref = [a.copy() for a in (x, rm, rv)]
    ctx = ops.forward(x, w, b, rm, rv, backend=StagesOnly())
    dx, dw, db = ops.backward(ctx, x, np.ones_like(x))
    ctx2 = ops.forward(ref[0], w, b, ref[1], ref[2], backend=inner)
    dx2, dw2, db2 = ops.backward(ctx2, ref[0], np.ones_like(x))
    assert not hasattr(StagesOnly(), "forward_all") and hasattr(inner, "forward_all")
    assert isinstance(inner, Composites)
    for a, a2 in zip((x, rm, rv, dx, dw, db), (ref[0], ref[1], ref[2], dx2, dw2, db2)):
        assert a.tobytes() == a2.tobytes()


def test_cache_is_bounded():
    signature.clear()
    x, w, b, rm, rv = _inputs()
    for i in range(signature.MAX_ENTRIES + 5):
        _fwd(x, w, b, rm, rv, eps=1e-5 + i * 1e-9)
    assert 0 < len(signature._cache) <= signature.MAX_ENTRIES


# ------------------------------------------------------------------------------ torch
torch = pytest.importorskip("torch")


def _module_step(m, x):
    y = m(x.clone())
    y.sum().backward()
    return y


def test_eager_and_custom_op_paths_agree_bitwise(monkeypatch):
    import iabn.torch_ops as to
    from iabn.torch import InPlaceABN

    torch.manual_seed(0)
    x = torch.randn(4, C, 6, 6, requires_grad=True)
    outs = []
    for eager in (True, False):
        monkeypatch.setattr(to, "_eager", lambda t, e=eager: e)
        m = InPlaceABN(C, activation="elu", activation_param=0.5)
        x.grad = None
        y = _module_step(m, x)
        outs.append([t.detach().clone() for t in (y, x.grad, m.weight.grad, m.bias.grad,
                                                  m.running_mean, m.running_var)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_eager_path_bumps_what_it_writes():
    """mark_dirty bumps x; the running stats are written outside autograd's view, so the
    eager path bumps them itself (as the mutating custom op does)."""
    from iabn.torch import inplace_abn

    x = torch.randn(2, C, 3)
    rm, rv = torch.zeros(C), torch.ones(C)
    v = [t._version for t in (x, rm, rv)]
    inplace_abn(x, None, None, rm, rv)
    assert [t._version for t in (x, rm, rv)] == [v[0] + 1, v[1] + 1, v[2] + 1]


def test_dispatch_modes_take_the_custom_op():
    """Under a dispatch mode (what make_fx, FakeTensorMode and friends install) the layer
    goes through the custom ops, which those modes can see and trace."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from iabn.torch import inplace_abn

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, C, 3)
    with Log():
        inplace_abn(x, None, None, None, None)
    assert any("iabn.inplace_abn_forward" in s for s in seen), seen
