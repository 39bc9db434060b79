"""The per-call host path (issue 19): launch programs and iabn.torch's eager path over pointers.

Machine-independent counts only (Python frames, launches, which route a call takes, bits);
the timings are in `python -m benchmarks --parts overhead`."""
from __future__ import annotations

import threading
import types

import numpy as np
import pytest

from iabn_core import backends, ops
from iabn_core.backends.base import Composites
from iabn_core.comm import InProcessGroup
from iabn_core.layout import view3
from iabn_core.validate import IABNError

torch = pytest.importorskip("torch")

from iabn import torch_bridge, torch_fast, torch_ops  # noqa: E402
from iabn.torch import InPlaceABN  # noqa: E402
from benchmarks import overhead  # noqa: E402
from benchmarks.overhead import python_calls  # noqa: E402


@pytest.mark.parametrize("residual", [False, True])
def test_python_frames_per_training_step(monkeypatch, residual):
    """A later change cannot regrow the per-call path: frames of one training step (clone,
    forward, backward) beyond the same step without the layer, counted as the overhead
    benchmark counts them, against its budget (issue 19)."""
    monkeypatch.setenv("IABN_BACKEND", "null")
    m = InPlaceABN(8)
    x = torch.randn(2, 8, 4, 4)
    dy = torch.randn(2, 8, 4, 4)
    r = torch.randn(2, 8, 4, 4, requires_grad=True) if residual else None
    _, step = overhead.closures(m, x, dy, "step", r)
    extra = overhead.frames_per_step(step, x, dy, r)
    assert 0 < extra <= overhead.FRAME_BUDGET, extra


def test_later_calls_cross_no_dlpack_and_count_launches(monkeypatch):
    """After a signature's first call nothing crosses into CuPy/NumPy arrays: the bridge
    fails if called. Launches stay 2 + 2 per step and the kernel counts the batches."""
    monkeypatch.setenv("IABN_BACKEND", "null")
    torch_fast.clear()
    m = InPlaceABN(8)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    m(x.clone()).sum().backward()

    def no_crossing(*a, **k):
        raise AssertionError("the eager fast path crossed into the array API")

    monkeypatch.setattr(torch_ops, "to_core", no_crossing)
    monkeypatch.setattr(torch_bridge, "to_core", no_crossing)
    be = torch_bridge._null_backend()
    for step in range(1, 4):
        n0 = be.launches
        m(x.clone()).sum().backward()
        assert be.launches - n0 == 4
    # null launches nothing, so only the general path counted (the forward kernel counts the
    # rest: test_fast_path_counts_batches_in_the_kernel)
    assert int(m.num_batches_tracked) == 1


def test_null_and_cuda_take_the_same_route():
    """A program's one native call per launch is a C-level callable bound once (a partial of
    the runtime's launch) on both runtimes, so `null` times exactly the Python route a GPU
    call takes: running a program is one Python frame, whatever the launches."""
    import functools

    from iabn_core.backends.null import NullRuntime
    from iabn_core.program import Launch, Program, Ref

    cupy = pytest.importorskip("cupy")
    be = backends.get("null")
    launches = [Launch(None, (2, 1, 1), (256, 1, 1), (Ref("x"), Ref("ws", 16), np.int64(3))),
                Launch(None, (4, 2, 1), (32, 8, 1), (Ref("x"), Ref("ws"), np.float32(0.5)))]

    class CudaLike:  # the cuda runtime's native pieces, without a device
        launch_packed = cupy.cuda.driver.launchKernel

        @staticmethod
        def handle(fn):
            return 0

    progs = [Program(rt, ("x",), launches, 64, "float32", be)
             for rt in (NullRuntime(), CudaLike())]
    for prog in progs:
        for launch, params in prog._launches:
            assert isinstance(launch, functools.partial) and isinstance(params, int)
            assert not isinstance(launch.func, types.FunctionType)  # C: no Python frame
    n0 = be.launches
    assert python_calls(lambda: progs[0].run((1024,), 4096, 0.1, 0)) == 2  # the lambda and run
    assert be.launches - n0 == 2
    cells = progs[0].cell_values()
    assert cells[0] == 1024 and 4096 in cells and 4096 + 16 in cells and 3 in cells


def _in_layout(a, layout):
    if layout == "ncs":
        return np.ascontiguousarray(a)
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_program_matches_the_stages_bitwise_on_the_emulator(training, layout):
    """The emulator runs a program's packed cells through the kernels' real entry points:
    a wrong cell gives other bits than the stage-by-stage launches (argument-checked)."""
    be = backends.get("emulator")
    rng = np.random.default_rng(0)
    shape = (3, 8, 5, 4)
    x = _in_layout(rng.standard_normal(shape).astype(np.float32), layout)
    r = _in_layout(rng.standard_normal(shape).astype(np.float32), layout)
    dz = _in_layout(rng.standard_normal(shape).astype(np.float32), layout)
    w, b = rng.uniform(-1, 1, 8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    rm, rv = rng.normal(size=8).astype(np.float32), rng.uniform(0.5, 2, 8).astype(np.float32)

    x1, rm1, rv1 = x.copy(order="K"), rm.copy(), rv.copy()
    ctx = ops.forward(x1, w, b, rm1, rv1, training=training, backend="emulator", residual=r)
    dx1, dw1, db1, dr1 = ops.backward(ctx, x1, dz.copy(order="K"), residual=r)

    lay, prob = ctx.layout, ctx.prob
    x2, rm2, rv2, dz2 = x.copy(order="K"), rm.copy(), rv.copy(), dz.copy(order="K")
    stats2 = Composites.forward_all(be, prob, view3(x2, lay), rm2, rv2, 0.1, training, w, b,
                                    view3(r, lay))
    dr2 = np.empty_like(x2)
    dw2, db2 = Composites.backward_all(be, prob, view3(x2, lay), view3(dz2, lay), stats2, w,
                                       b, training, None, view3(r, lay), view3(dr2, lay))
    for got, want in ((x1, x2), (rm1, rm2), (rv1, rv2), (ctx.stats, stats2), (dx1, dz2),
                      (dw1, dw2), (db1, db2), (dr1, dr2)):
        np.testing.assert_array_equal(got, want)


def test_rejected_fast_calls_write_nothing(monkeypatch):
    """A cache hit skips no check that depends on this call's buffers or autograd state."""
    monkeypatch.setenv("IABN_BACKEND", "null")
    m = InPlaceABN(8)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    m(x.clone())
    before = [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
    leaf = torch.randn(2, 8, 4, 4, requires_grad=True)
    with pytest.raises(IABNError, match="leaf"):
        m(leaf)
    bad = torch.randn(2, 8, 4, 4)
    with torch.no_grad(), pytest.raises(IABNError, match="running_mean"):
        torch_ops.inplace_abn(bad, m.weight, m.bias, m.running_mean, m.running_mean,
                              True, 0.1)
    with torch.inference_mode():
        inf = torch.randn(2, 8, 4, 4)
    with pytest.raises(IABNError, match="inference"):
        m(inf)
    with pytest.raises(IABNError, match="momentum"):
        torch_ops.inplace_abn(bad, m.weight, m.bias, m.running_mean, m.running_var, True, 2.0)
    with torch.no_grad():  # checked parameters cached, then a weight inside x: refused
        for _ in range(2):
            torch_ops.inplace_abn(bad, m.weight.detach(), m.bias.detach(), None, None, True)
        xb = bad.clone()
        snap = xb.clone()
        with pytest.raises(IABNError, match="shares memory"):
            torch_ops.inplace_abn(xb, xb.view(-1)[8:16], m.bias.detach(), None, None, True)
        torch.testing.assert_close(xb, snap, rtol=0, atol=0)
    for t, t0 in zip((m.running_mean, m.running_var, m.num_batches_tracked), before):
        torch.testing.assert_close(t, t0, rtol=0, atol=0)


def test_fast_path_threads_give_the_same_bits(monkeypatch):
    """Programs share their packed cells; concurrent calls must not mix their pointers."""
    monkeypatch.setenv("IABN_BACKEND", "emulator")
    torch.manual_seed(0)
    xs = [torch.randn(2, 4, 3, 3, dtype=torch.float64) for _ in range(6)]
    m = InPlaceABN(4).double()
    with torch.no_grad():
        m(xs[0].clone())  # make the entry
        want = []
        for x in xs:
            mm = InPlaceABN(4).double()
            want.append(mm(x.clone()).clone())
    got = [None] * len(xs)

    def work(i):
        mm = InPlaceABN(4).double()
        with torch.no_grad():
            for _ in range(3):
                got[i] = mm(xs[i].clone()).clone()
                mm.reset_running_stats()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert torch_fast._entries, "the fast path was never set up"


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fast_path_counts_batches_in_the_kernel(monkeypatch, momentum):
    """On the fast path the forward kernel increments num_batches_tracked (no add_ launch);
    running stats and counts match nn.BatchNorm2d step for step, momentum=None included."""
    monkeypatch.setenv("IABN_BACKEND", "emulator")
    torch.manual_seed(0)
    m = InPlaceABN(4, momentum=momentum, activation="identity").double()
    bn = torch.nn.BatchNorm2d(4, momentum=momentum).double()
    with torch.no_grad():
        m.weight.fill_(1.0 - m.eps)  # |w| + eps = 1, bn's weight
    for _ in range(4):
        x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
        torch.testing.assert_close(m(x.clone()), bn(x))
    assert int(m.num_batches_tracked) == int(bn.num_batches_tracked) == 4
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)


def test_single_layer_conversions_keep_bias_false():
    """to_batchnorm / to_sync of a layer built with bias=False (no bias key on either side)."""
    from iabn.torch import to_batchnorm, to_sync

    m = InPlaceABN(3, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
    bn = to_batchnorm(m).eval()
    assert bn[0].bias is None and "bias" not in dict(bn[0].named_parameters())
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(bn(x), m.eval()(x.clone()))
    s = to_sync(m)
    assert s.bias is None and set(s.state_dict()) == set(m.state_dict())


def test_cuda_runtime_relies_on_cupy_api_that_exists():
    """The GPU route's native pieces, checked against the installed CuPy without a GPU:
    RawModule.get_function's RawKernel exposes the loaded Function (`kernel`), whose `ptr` is
    the CUfunction the driver launch takes, and launchKernel takes kernelParams."""
    cupy = pytest.importorskip("cupy")
    from iabn_core.backends.cuda import CudaRuntime

    assert "kernel" in dir(cupy.RawKernel)
    assert "ptr" in dir(cupy.cuda.function.Function)
    doc = cupy.cuda.driver.launchKernel.__doc__ or ""
    assert "kernel_params" in doc and "stream" in doc

    class Loaded:
        ptr = 1234

    class Raw:
        kernel = Loaded()

    assert CudaRuntime.handle(Raw()) == 1234


def test_custom_op_bodies_take_the_programs(monkeypatch):
    """torch.compile / export call the custom ops at run time: after a signature's first call
    their bodies run the programs over pointers (no crossing), with the same bits, and a
    backward op handed an output that overlaps its inputs still goes to the checks that
    refuse it."""
    monkeypatch.setenv("IABN_BACKEND", "emulator")
    torch_fast.clear()
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 4, 3, 2, dtype=torch.float64, generator=g)
    dz = torch.randn(3, 4, 3, 2, dtype=torch.float64, generator=g)
    w = torch.rand(4, dtype=torch.float64, generator=g) + 0.5
    b = torch.randn(4, dtype=torch.float64, generator=g)
    outs = []
    for call in range(3):
        if call == 2:
            monkeypatch.setattr(torch_ops, "to_core", lambda *a: pytest.fail("crossed"))
        x, rm, rv = x0.clone(), torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        stats = torch.ops.iabn.inplace_abn_forward(x, w, b, rm, rv, True, 0.1, 1e-5, "elu",
                                                   0.5, "", None)
        dx = torch.empty_like(x)
        dw, db = torch.ops.iabn.inplace_abn_backward(x, dz, dx, stats, w, b, True, 1e-5, "elu",
                                                     0.5, "", None, None)
        outs.append([t.clone() for t in (x, rm, rv, stats, dx, dw, db)])
    for a, b_ in zip(outs[0], outs[2]):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)
    monkeypatch.undo()
    monkeypatch.setenv("IABN_BACKEND", "emulator")
    x = x0.clone()
    stats = torch.ops.iabn.inplace_abn_forward(x, w, b, None, None, True, 0.1, 1e-5, "elu",
                                               0.5, "", None)
    before = x.clone()
    with pytest.raises(IABNError):
        torch.ops.iabn.inplace_abn_backward(x, dz, x, stats, w, b, True, 1e-5, "elu", 0.5, "",
                                            None, None)
    torch.testing.assert_close(x, before, rtol=0, atol=0)


def test_unrecorded_calls_skip_the_autograd_node_but_bump_versions(monkeypatch):
    """Under no_grad (validation, statistics recalibration) the fast path launches without an
    autograd node; x's version still moves, and the result is the recorded path's."""
    monkeypatch.setenv("IABN_BACKEND", "emulator")
    torch.manual_seed(1)
    m = InPlaceABN(4).double().eval()
    x0 = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    want = m(x0.clone().requires_grad_().clone()).detach()  # recorded (general, then fast)
    with torch.no_grad():
        for _ in range(3):
            x = x0.clone()
            v0 = x._version
            y = m(x)
            assert y is x and x._version == v0 + 1 and y.grad_fn is None
            torch.testing.assert_close(y, want, rtol=0, atol=0)
    with torch.inference_mode():
        xi = x0.clone()
        torch.testing.assert_close(m(xi), want, rtol=0, atol=0)


def _one_rank():
    """A communicator of one rank (the core's in-process group), for the synced path's host
    logic."""
    return InProcessGroup(1).comms()[0]


@pytest.mark.parametrize("backend", ["numpy", "emulator"])
def test_synced_empty_global_batch_is_an_empty_batch(backend):
    """Every rank empty: like nn.BatchNorm's empty batch (running stats kept, zero parameter
    gradients, no collective beyond the header), not an error; a global count of 1 is."""
    x = np.zeros((0, 3, 4, 4), np.float32)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    ctx = ops.forward(x, w, b, rm, rv, training=True, backend=backend, comm=_one_rank())
    np.testing.assert_array_equal(rm, np.full(3, 0.5, np.float32))
    np.testing.assert_array_equal(rv, np.full(3, 2.0, np.float32))
    dx, dw, db = ops.backward(ctx, x, np.zeros_like(x))
    assert dx.shape == x.shape and not dw.any() and not db.any()
    with pytest.raises(IABNError, match="more than 1 value"):
        ops.forward(np.ones((1, 3, 1, 1), np.float32), w, b, rm, rv, training=True,
                    backend=backend, comm=_one_rank())
