"""Synchronized InPlace-ABN across processes: torch.distributed (gloo on the CPU; gloo over
CUDA tensors with two ranks on one GPU; NCCL and cupyx.distributed with >= 2 GPUs), plus
the in-process communicator that runs the exact CUDA kernels (emulator) and the NumPy
backend through the sync path.

Multi-process tests spawn one group per world size (module-scoped fixtures) and run several
scenarios in it (tests/dist_workers.py); each test asserts on its scenario's per-rank result.
Every wait is bounded: gloo's timeout is 60 s and the parent kills the group after WAIT_S.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from conftest import gpu_available
from iabn_core import reference as ref
from iabn_core.comm import CommTimeout, InProcessGroup, RankErrors
from iabn_core.validate import IABNError

import iabn.cupy as iabn_arrays

WAIT_S = 150


def _run_group(tmp_dir, world, plan, backend="gloo", device=None, wait_s=WAIT_S):
    """Spawn `world` ranks running `plan` [(scenario, sizes)]; per-rank result dicts."""
    import torch.multiprocessing as mp

    import dist_workers

    init = os.path.join(tmp_dir, "rendezvous")
    ctx = mp.start_processes(dist_workers.worker, args=(world, init, tmp_dir, plan, backend,
                                                        device),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + wait_s
    crash = None
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                break
    except Exception as exc:  # a rank raised outside the scenarios, or died (signal, exit)
        crash = f"{type(exc).__name__}: {exc}"
    finally:
        alive = [p for p in ctx.processes if p.is_alive()]
        for p in alive:
            p.kill()
    results = []
    for r in range(world):
        path = os.path.join(tmp_dir, f"rank{r}.json")
        with open(path) if os.path.exists(path) else open(os.devnull) as f:
            text = f.read()
        results.append(json.loads(text) if text else {})
    problem = crash or (f"{len(alive)} rank(s) killed after {wait_s} s" if alive else None)
    return results, problem


def _scenario(group, name):
    """Each rank's value for `name`; fails with every rank's error otherwise."""
    results, timeout = group
    problems = [f"rank {r}: {res[name]['trace'] if name in res else 'no result (crash/hang)'}"
                for r, res in enumerate(results) if not res.get(name, {}).get("ok")]
    if timeout and problems:  # a crash after every scenario was recorded is torch's teardown
        problems.append(timeout)
    assert not problems, "\n".join(problems)
    return [res[name]["value"] for res in results]


def _run_group_once_more_on_crash(tmp_path_factory, name, world, plan):
    """A process group that died before every rank recorded every scenario (an
    infrastructure failure: spawn, rendezvous, a killed process) is started once more in a
    fresh directory; the first failure is printed, so it is visible in the test log. Wrong
    results are never retried: they are recorded, not crashes."""
    scenarios = [s for s, _ in plan]
    for attempt in (1, 2):
        results, problem = _run_group(str(tmp_path_factory.mktemp(name)), world, plan)
        complete = all(s in res for res in results for s in scenarios)
        if complete or attempt == 2:
            return results, problem
        print(f"{name}: process group failed before recording every result ({problem}); "
              "starting it once more")


@pytest.fixture(scope="module")
def gloo2(tmp_path_factory):
    sizes = [3, 5]
    plan = [("match", sizes), ("ddp", sizes), ("errors", None)]
    return _run_group_once_more_on_crash(tmp_path_factory, "gloo2", 2, plan)


@pytest.fixture(scope="module")
def gloo3(tmp_path_factory):
    plan = [("match", [4, 0, 1]), ("errors", None), ("active_group", [3, 0, 2])]
    return _run_group_once_more_on_crash(tmp_path_factory, "gloo3", 3, plan)


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_matches_single_process(world, request):
    values = _scenario(request.getfixturevalue(f"gloo{world}"), "match")
    assert all(v["cases"] == 12 and v["device"] == "cpu" for v in values)


def test_ddp_matches_single_process(gloo2):
    _scenario(gloo2, "ddp")


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_errors_on_every_rank(world, request):
    values = _scenario(request.getfixturevalue(f"gloo{world}"), "errors")
    assert len(values) == world
    for v in values:
        assert "channel counts differ" in v["mismatch"]
        assert "Expected more than 1 value per channel" in v["global_count"]
    assert "rejected" in values[0]["peer_invalid"]
    assert "weight" in values[-1]["peer_invalid"]


def test_active_group_with_gloo(gloo3):
    """Ranks 0 and 2 active, rank 1 not: see dist_workers.scenario_active_group."""
    assert _scenario(gloo3, "active_group") == [{"members": [0, 2]}] * 3


# ------------------------------------------------------------------------------------------
# In-process ranks: the exact kernels (emulator) and the NumPy backend in the sync path
# ------------------------------------------------------------------------------------------
def _channel_params(rng, c):
    """weight, bias, running mean, running var (positive) for c channels."""
    w, b = rng.normal(size=c), rng.normal(size=c)
    return w, b, rng.normal(size=c), rng.uniform(0.5, 2, size=c)


def _rank_part(sizes, layout):
    """part(a, k): rank k's slice of the batch a, always a copy (the op overwrites its input),
    in the layout under test."""
    off = np.cumsum([0] + sizes)
    if layout == "ncs":
        return lambda a, k: a[off[k]:off[k + 1]].copy()
    return lambda a, k: a[off[k]:off[k + 1]].transpose(0, 2, 1).copy().transpose(0, 2, 1)


def _inprocess(sizes, backend, layout, act, param, training, c=5, s=6, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    x = rng.normal(size=(n, c, s)) * 3 + 2
    dz = rng.normal(size=(n, c, s))
    w, b, rm, rv = _channel_params(rng, c)
    part = _rank_part(sizes, layout)

    def rank_fn(comm):
        r = comm.rank
        xr, dzr = part(x, r), part(dz, r)
        rmr, rvr = rm.copy(), rv.copy()
        ctx = iabn_arrays.forward(xr, w.copy(), b.copy(), rmr, rvr, training=training,
                                  activation=act, activation_param=param, backend=backend,
                                  comm=comm)
        dx, dw, db = iabn_arrays.backward(ctx, xr, dzr)
        return xr, dx, dw, db, rmr, rvr, np.array(ctx.stats)

    group = InProcessGroup(len(sizes), timeout=30)
    res = group.run(rank_fn)
    e = ref.forward(x, w, b, rm, rv, training=training, activation=act, param=param)
    g = ref.backward(e["z"], dz, e["invstd"], e["count"], w, b, training=training,
                     activation=act, param=param)
    return res, e, g, group


@pytest.mark.parametrize("backend", ["numpy", "emulator"])
@pytest.mark.parametrize("sizes", [[4, 0, 1], [3, 5]])
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("act,param", [("identity", 0.01), ("leaky_relu", 0.1), ("elu", 1.0)])
@pytest.mark.parametrize("training", [True, False])
def test_inprocess_matches_reference(backend, sizes, layout, act, param, training):
    res, e, g, group = _inprocess(sizes, backend, layout, act, param, training)
    tol = 1e-12
    assert ref.rel_error(np.concatenate([r[0] for r in res]), e["z"]) <= tol
    assert ref.rel_error(np.concatenate([r[1] for r in res]), g["dx"]) <= tol
    assert ref.rel_error(sum(r[2] for r in res), g["dweight"]) <= tol  # local, summed by DDP
    assert ref.rel_error(sum(r[3] for r in res), g["dbias"]) <= tol
    for r in res:
        assert ref.rel_error(r[4], e["running_mean"]) <= tol
        assert ref.rel_error(r[5], e["running_var"]) <= tol
        if training:  # every rank merged the same gathered rows in the same order
            assert np.array_equal(r[6], res[0][6])
    expected_calls = ["exchange_header", "all_gather", "all_reduce"] if training else []
    assert group.calls == expected_calls


def _errors_of(fn, size):
    with pytest.raises(RankErrors) as info:
        InProcessGroup(size, timeout=10).run(fn)
    return info.value.errors


@pytest.mark.parametrize("backend", ["numpy", "emulator"])
def test_inprocess_channel_mismatch_raises_on_every_rank(backend):
    def fn(comm):
        x = np.ones((2, 4 + comm.rank, 3))
        iabn_arrays.forward(x, backend=backend, comm=comm)

    t0 = time.monotonic()
    errors = _errors_of(fn, 3)
    assert time.monotonic() - t0 < 10
    assert all(isinstance(e, IABNError) and "channel counts differ" in str(e) for e in errors)
    assert "[4, 5, 6]" in str(errors[0])


@pytest.mark.parametrize("counts,ok", [([1, 0], False), ([1, 1], True), ([0, 0, 2], True)])
def test_inprocess_global_count(counts, ok):
    def fn(comm):
        x = np.arange(counts[comm.rank] * 3, dtype=np.float64).reshape(-1, 3)
        return iabn_arrays.forward(x, comm=comm).count

    if ok:
        assert InProcessGroup(len(counts)).run(fn) == [sum(counts)] * len(counts)
    else:
        errors = _errors_of(fn, len(counts))
        assert all("Expected more than 1 value per channel" in str(e) for e in errors)


def test_inprocess_local_validation_error_reaches_peers():
    def fn(comm):
        x = np.ones((2, 3, 4))
        w = np.ones(3 if comm.rank == 0 else 2)
        iabn_arrays.forward(x, w, comm=comm)

    errors = _errors_of(fn, 2)
    assert "rejected" in str(errors[0]) and "[1]" in str(errors[0])
    assert "weight must have shape (3,)" in str(errors[1])


def test_inprocess_missing_rank_times_out():
    """A rank that never joins a collective breaks the group in bounded time, not a hang."""
    def fn(comm):
        if comm.rank == 0:
            return iabn_arrays.forward(np.ones((2, 3, 4)), comm=comm)
        return None

    t0 = time.monotonic()
    group = InProcessGroup(2, timeout=0.5)
    with pytest.raises(RankErrors) as info:
        group.run(fn)
    assert isinstance(info.value.errors[0], CommTimeout)
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------------------------------
# GPUs: NCCL through torch.distributed, and cupyx.distributed
# ------------------------------------------------------------------------------------------
def _gpu_count() -> int:
    if not gpu_available():
        return 0
    import cupy

    return cupy.cuda.runtime.getDeviceCount()


needs_2_gpus = pytest.mark.skipif(_gpu_count() < 2, reason="needs >= 2 CUDA GPUs (NCCL); "
                                  "the sync path is verified here with gloo and in-process ranks")


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU on this machine")
def test_gloo_on_one_gpu_matches_single_process(tmp_path):
    """Two ranks share the one GPU (NCCL refuses two ranks on a device; gloo carries CUDA
    tensors through the host): InPlaceABNSync's forward, backward and running statistics on
    each rank's slice equal one process's over the concatenated batch, in every layout,
    activation and mode of scenario_match. The wait stays under the GPU suite's pytest
    limit: gloo's own timeout (60 s) ends a hung collective first."""
    results = _run_group(str(tmp_path), 2, [("match", [3, 5]), ("errors", None)], "gloo",
                         device="cuda:0", wait_s=90)
    values = _scenario(results, "match")
    assert [v["device"] for v in values] == ["cuda:0", "cuda:0"]
    assert all(v["cases"] == 12 for v in values)
    _scenario(results, "errors")


@pytest.mark.gpu
@needs_2_gpus
def test_nccl_matches_single_process(tmp_path):
    results = _run_group(str(tmp_path), 2, [("match", [3, 5]), ("errors", None)], "nccl")
    _scenario(results, "match")
    _scenario(results, "errors")


@pytest.mark.gpu
@needs_2_gpus
def test_cupyx_matches_reference(tmp_path):
    import multiprocessing

    import cupyx_worker

    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=cupyx_worker.run, args=(r, 2, [3, 5], q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        out = [q.get(timeout=WAIT_S) for _ in procs]
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    assert all(o == "ok" for o in out), out


# ------------------------------------------------------------------------------------------
# Conversion (single process: structure and state only; the DDP test trains it)
# ------------------------------------------------------------------------------------------
def test_convert_model_sync_converts_bn_and_inplace_abn():
    import torch
    from torch import nn

    import iabn.torch as it

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
                          nn.Conv2d(4, 4, 1), it.InPlaceABN(4, activation="elu"),
                          it.ABN(4)).double()
    with torch.no_grad():
        model[4].running_mean.fill_(0.5)
    group = object()  # stored only; nothing is called on it without torch.distributed
    out = it.convert_model(model, sync=True, group=group)
    assert type(out[1]) is it.InPlaceABNSync and out[1].activation_param == 0.2
    assert type(out[4]) is it.InPlaceABNSync and out[4].activation == "elu"
    assert out[1].group is group and out[4].group is group
    assert type(out[5]) is it.ABN
    assert out[4].running_mean.dtype == torch.float64
    assert torch.all(out[4].running_mean == 0.5)


@pytest.mark.parametrize("backend", ["numpy", "emulator"])
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("training", [True, False])
def test_inprocess_residual_matches_reference(backend, layout, training):
    """Synchronized BN with a residual: each rank adds its own slice of r, the statistics are
    global, and dr = dy per rank; the result equals the float64 closed form on the full batch."""
    sizes, c, s, act, param = [3, 0, 2], 4, 5, "leaky_relu", 0.1
    rng = np.random.default_rng(7)
    n = sum(sizes)
    x, dz, r = (rng.normal(size=(n, c, s)) for _ in range(3))
    w, b, rm, rv = _channel_params(rng, c)
    part = _rank_part(sizes, layout)

    def rank_fn(comm):
        k = comm.rank
        xr, dzr, rr = (part(a, k) for a in (x, dz, r))
        ctx = iabn_arrays.forward(xr, w.copy(), b.copy(), rm.copy(), rv.copy(),
                                  training=training, activation=act, activation_param=param,
                                  backend=backend, comm=comm, residual=rr)
        dx, dw, db, dr = iabn_arrays.backward(ctx, xr, dzr, residual=rr)
        return xr, dx, dr

    res = InProcessGroup(len(sizes), timeout=30).run(rank_fn)
    e = ref.forward(x, w, b, rm, rv, training=training, activation=act, param=param, residual=r)
    g = ref.backward(e["z"], dz, e["invstd"], e["count"], w, b, training=training,
                     activation=act, param=param, residual=r)
    for i, key in ((0, "z"), (1, "dx"), (2, "dresidual")):
        got = np.concatenate([v[i] for v in res])
        assert ref.rel_error(got, (e if key == "z" else g)[key]) <= 1e-12, key
