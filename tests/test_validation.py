"""Bad input: a clear error naming the argument, raised before any byte is written."""
from __future__ import annotations

import numpy as np
import pytest

from iabn_core import ops
from iabn_core.validate import IABNError

C = 3


def make(dtype=np.float32, shape=(4, C, 5), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(dtype)
    pdt = np.float64 if dtype == np.float64 else np.float32
    params = dict(weight=rng.normal(size=shape[1]).astype(pdt),
                  bias=rng.normal(size=shape[1]).astype(pdt),
                  running_mean=np.zeros(shape[1], pdt), running_var=np.ones(shape[1], pdt))
    return x, params


def snapshot(*arrays):
    return [(a.copy(), a.tobytes()) if isinstance(a, np.ndarray) else None for a in arrays]


def assert_same(before, arrays):
    for b, a in zip(before, arrays):
        if b is not None:
            assert a.tobytes() == b[1], "input modified by a rejected call"


def rejects(match, x, params, backend="numpy", **kw):
    before = snapshot(x, *params.values())
    with pytest.raises(IABNError, match=match):
        ops.forward(x, **params, backend=backend, **kw)
    assert_same(before, [x, *params.values()])


@pytest.fixture(params=["numpy", "emulator"])
def backend(request):
    return request.param


def test_ndim_below_two(backend):
    x, p = make(shape=(4, C, 5))
    rejects(r"^x must have shape \(N, C, \*\)", x[:, 0, 0].copy(), {}, backend)


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_channel_mismatch(backend, name):
    x, p = make()
    p[name] = np.ones(C + 1, p[name].dtype)
    rejects(rf"^{name} must have shape \({C},\)", x, p, backend)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.uint8])
def test_unsupported_dtype(backend, dtype):
    x = np.ones((2, C, 4), dtype)
    rejects(r"^x has unsupported dtype", x, {}, backend)


def test_weight_dtype_incompatible(backend):
    x, p = make(np.float32)
    p = {k: v.astype(np.float16) for k, v in p.items()}
    rejects(r"^weight has dtype float16, which does not go with x of dtype float32", x, p, backend)


def test_params_must_share_a_dtype(backend):
    x, p = make(np.float16)
    p["bias"] = p["bias"].astype(np.float16)
    rejects(r"^bias has dtype float16 but weight has float32", x, p, backend)


def test_float64_input_needs_float64_params(backend):
    x, p = make(np.float64)
    p = {k: v.astype(np.float32) for k, v in p.items()}
    rejects(r"does not go with x of dtype float64", x, p, backend)


def test_unsupported_strides(backend):
    x, p = make(shape=(4, C, 6))
    rejects(r"^x has unsupported strides", x[:, :, ::2], p, backend)
    rejects(r"^x has unsupported strides", np.ones((6, C, 4), np.float32).transpose(2, 1, 0), p,
            backend)


def test_channels_last_is_accepted_not_copied():
    x = np.random.default_rng(0).normal(size=(2, 5, 5, C)).astype(np.float32).transpose(0, 3, 1, 2)
    ptr = x.ctypes.data
    ctx = ops.forward(x, backend="numpy")
    assert ctx.layout == "nsc" and x.ctypes.data == ptr


def test_unknown_activation(backend):
    x, p = make()
    rejects(r"^activation must be one of", x, p, backend, activation="relu")


@pytest.mark.parametrize("act,param", [("leaky_relu", 0.0), ("leaky_relu", -0.1), ("elu", 0.0),
                                       ("elu", -1.0), ("elu", float("nan"))])
def test_activation_param_must_be_positive(backend, act, param):
    x, p = make()
    rejects(r"^activation_param", x, p, backend, activation=act, activation_param=param)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("inf"), float("nan")])
def test_eps(backend, eps):
    x, p = make()
    rejects(r"^eps must be", x, p, backend, eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_momentum(backend, momentum):
    x, p = make()
    rejects(r"^momentum must be in \[0, 1\]", x, p, backend, momentum=momentum)


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1, 1)])
def test_one_value_per_channel_when_training(backend, shape):
    x, p = make(shape=shape)
    rejects(r"Expected more than 1 value per channel when training", x, p, backend)
    ops.forward(x, **p, training=False, backend=backend)  # eval is fine


@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_running_stat_without_partner(backend, given):
    x, p = make()
    other = "running_var" if given == "running_mean" else "running_mean"
    p[other] = None
    rejects(rf"^{other} is None but its partner is given", x, p, backend)


def test_eval_needs_running_stats(backend):
    x, p = make()
    p["running_mean"] = p["running_var"] = None
    rejects(r"running_mean and running_var are required when training=False", x, p, backend,
            training=False)


def test_not_an_array(backend):
    x, p = make()
    p["weight"] = list(p["weight"])
    rejects(r"^weight must be a NumPy or CuPy array", x, p, backend)


def test_read_only_output(backend):
    x, p = make()
    x.flags.writeable = False
    rejects(r"^x is read-only", x, p, backend)
    x2, p2 = make()
    p2["running_var"].flags.writeable = False
    rejects(r"^running_var is read-only", x2, p2, backend)


def test_unknown_backend():
    x, p = make()
    before = snapshot(x)
    with pytest.raises(ValueError, match="backend must be"):
        ops.forward(x, **p, backend="opencl")
    with pytest.raises(ValueError, match="backend='cuda' needs CuPy arrays"):
        ops.forward(x, **p, backend="cuda")
    assert_same(before, [x])


def _ctx(backend):
    x, p = make()
    ctx = ops.forward(x, **p, backend=backend)
    return ctx, x, np.ones_like(x)


def test_backward_rejects_overlapping_z_and_dz(backend):
    ctx, z, _ = _ctx(backend)
    before = snapshot(z)
    with pytest.raises(IABNError, match="^z and dz share memory"):
        ops.backward(ctx, z, z)
    assert_same(before, [z])


@pytest.mark.parametrize("which", ["z", "dz"])
def test_backward_rejects_other_shape_or_dtype(backend, which):
    ctx, z, dz = _ctx(backend)
    bad_shape = np.ones((4, C, 6), np.float32)
    bad_dtype = dz.astype(np.float64)
    for bad, match in ((bad_shape, "has shape"), (bad_dtype, "has dtype")):
        args = {"z": z, "dz": dz, which: bad}
        before = snapshot(z, dz, bad)
        with pytest.raises(IABNError, match=f"^{which} {match}"):
            ops.backward(ctx, args["z"], args["dz"])
        assert_same(before, [z, dz, bad])


def test_backward_rejects_read_only_dz_and_other_layout(backend):
    ctx, z, dz = _ctx(backend)
    dz.flags.writeable = False
    with pytest.raises(IABNError, match="^dz is read-only"):
        ops.backward(ctx, z, dz)
    x = np.ones((2, 4, 4, C), np.float32).transpose(0, 3, 1, 2)  # channels-last forward
    ctx = ops.forward(x, backend=backend)
    dz_ncs = np.ones(x.shape, np.float32)
    with pytest.raises(IABNError, match="^dz must have the same memory layout"):
        ops.backward(ctx, x, dz_ncs)


def test_backward_rejects_a_foreign_ctx():
    x, _ = make()
    with pytest.raises(IABNError, match="^ctx must be the Context"):
        ops.backward({"mean": 0}, x, np.ones_like(x))


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("conftest").gpu_available(), reason="no CUDA GPU on this machine")
def test_numpy_cupy_mix_and_devices():
    import cupy

    x_host, p = make()
    x = cupy.asarray(x_host)
    before = x.get().tobytes()
    with pytest.raises(IABNError, match="^weight is a numpy array but x is a cupy array"):
        ops.forward(x, **p)
    assert x.get().tobytes() == before
    with pytest.raises(IABNError, match="^running_var is a cupy array but x is a numpy array"):
        ops.forward(x_host, running_mean=p["running_mean"], running_var=cupy.ones(C, np.float32))
    if cupy.cuda.runtime.getDeviceCount() > 1:
        with cupy.cuda.Device(1):
            w1 = cupy.ones(C, np.float32)
        with pytest.raises(IABNError, match="^weight is on cuda:1 but x is on cuda:0"):
            ops.forward(x, weight=w1)


def test_backward_out_must_not_overlap_z_or_dz(backend):
    ctx, z, dz = _ctx(backend)
    before = snapshot(z, dz)
    for bad in (z, dz[:2]):
        with pytest.raises(IABNError, match="^out (has shape|shares memory)"):
            ops.backward(ctx, z, dz, out=bad)
    assert_same(before, [z, dz])
    ro = np.zeros_like(z)
    ro.flags.writeable = False
    with pytest.raises(IABNError, match="^out is read-only"):
        ops.backward(ctx, z, dz, out=ro)


@pytest.mark.parametrize("case", ["stats_alias", "weight_in_x", "bias_is_running_mean"])
def test_buffers_sharing_memory_are_refused(backend, case):
    x, p = make()
    if case == "stats_alias":
        p["running_var"] = p["running_mean"]
        match = "^running_var shares memory with running_mean"
    elif case == "weight_in_x":
        p["weight"] = x.reshape(-1)[:C]  # a contiguous view into x
        match = "^weight shares memory with x"
    else:
        p["bias"] = p["running_mean"]
        match = "^running_mean shares memory with bias"
    rejects(match, x, p, backend)
