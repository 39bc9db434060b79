"""Worker side of tests/test_distributed.py: scenarios run by every rank of a spawned
torch.distributed group (gloo on CPU, NCCL with one GPU per rank, or gloo with every rank's
tensors on one shared GPU).

Each scenario returns a JSON-able result or raises; `worker` records one entry per scenario in
out_dir/rank{r}.json after every scenario, so a hang or crash still leaves what ran before it.
Every rank builds the whole global batch from a fixed seed, runs its own slice synchronised,
and compares with a single-process run on the concatenated batch.
"""
from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import traceback

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import iabn.cupy as iabn_arrays
import iabn.torch as it
from iabn_core import reference as ref
from iabn_core.comm import TorchDistributedComm

TOL = 1e-10  # float64, relative to the expected values' scale (reference.rel_error)
ACTIVATIONS = (("identity", 0.01), ("leaky_relu", 0.1), ("elu", 1.0))
C, H, W = 5, 3, 2


def _offsets(sizes):
    return np.cumsum([0] + list(sizes)).tolist()


def _check(what, actual, expected, tol=TOL):
    err = ref.rel_error(torch.as_tensor(actual).detach().cpu().double().numpy(),
                        torch.as_tensor(expected).detach().cpu().double().numpy())
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3g} > {tol:g}")
    return err


def _data(n_total, seed, device):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    x = rnd(n_total, C, H, W) * 2 + 0.5
    dz = rnd(n_total, C, H, W)
    w = rnd(C)  # mixed signs: dweight carries sign(w)
    b = rnd(C)
    rm, rv = rnd(C), rnd(C).abs() + 0.5
    return x, dz, w, b, rm, rv


def _run_torch(fn, x, dz, w, b, rm, rv, training, act, param, fmt):
    """(out, dx, dweight, dbias, running_mean, running_var) of one forward/backward."""
    leaf = x.clone().requires_grad_()
    wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
    rm, rv = rm.clone(), rv.clone()
    out = fn(leaf.clone(memory_format=fmt), wl, bl, rm, rv, training, 0.1, 1e-5, act, param)
    out.backward(dz.contiguous(memory_format=fmt))
    return out.detach(), leaf.grad, wl.grad, bl.grad, rm, rv


class _Recorder:
    """A communicator that remembers what the all-reduce returned (the global sums)."""

    def __init__(self, inner):
        self.inner, self.size, self.rank, self.sums = inner, inner.size, inner.rank, []

    def all_gather(self, a):
        return self.inner.all_gather(a)

    def exchange_header(self, values, like):
        return self.inner.exchange_header(values, like)

    def all_reduce(self, a):
        out = self.inner.all_reduce(a)
        self.sums.append(np.array(out))
        return out


def scenario_match(rank, world, sizes, device="cpu"):
    """Sync == single process on the concatenated batch: outputs, dx, running stats, global
    sums and (summed over ranks) parameter grads; NCHW and channels_last, every activation,
    train and eval; running stats bitwise identical on every rank."""
    off = _offsets(sizes)
    sl = slice(off[rank], off[rank + 1])
    n_cases = 0
    for fmt in (torch.contiguous_format, torch.channels_last):
        for act, param in ACTIVATIONS:
            for training in (True, False):
                x, dz, w, b, rm, rv = _data(off[-1], seed=17 + n_cases, device=device)
                n_cases += 1
                tag = f"{fmt}/{act}/{'train' if training else 'eval'}"
                full = _run_torch(it.inplace_abn, x, dz, w, b, rm, rv, training, act, param, fmt)
                mine = _run_torch(it.inplace_abn_sync, x[sl], dz[sl], w, b, rm, rv, training,
                                  act, param, fmt)
                _check(f"{tag} out", mine[0], full[0][sl])
                _check(f"{tag} dx", mine[1], full[1][sl])
                for i, name in ((2, "dweight"), (3, "dbias")):  # local: sum them over ranks
                    total = mine[i].clone()
                    dist.all_reduce(total)
                    _check(f"{tag} {name} summed over ranks", total, full[i])
                _check(f"{tag} running_mean", mine[4], full[4])
                _check(f"{tag} running_var", mine[5], full[5])
                every = [torch.empty_like(mine[4]) for _ in range(world)]
                dist.all_gather(every, mine[4])
                if training and not all(torch.equal(e, every[0]) for e in every):
                    raise AssertionError(f"{tag}: running stats differ between ranks")
                if device == "cpu":
                    _core_case(tag, rank, sizes, sl, x, dz, w, b, rm, rv, training, act, param)
    return {"cases": n_cases, "device": str(mine[0].device)}


def _core_case(tag, rank, sizes, sl, x, dz, w, b, rm, rv, training, act, param):
    """The array API (iabn.cupy on NumPy) over TorchDistributedComm: the all-reduced sums
    equal the float64 closed form on the whole batch, and so do z, dx and running stats."""
    lay = "ncs"
    xa = x[sl].reshape(sizes[rank], C, H * W).numpy().copy()
    dza = dz[sl].reshape(sizes[rank], C, H * W).numpy().copy()
    rma, rva = rm.numpy().copy(), rv.numpy().copy()
    comm = _Recorder(TorchDistributedComm())
    ctx = iabn_arrays.forward(xa, w.numpy().copy(), b.numpy().copy(), rma, rva,
                              training=training, activation=act, activation_param=param,
                              comm=comm)
    if training and ctx.count != sum(sizes) * H * W:
        raise AssertionError(f"{tag}: ctx.count {ctx.count} is not the global count")
    dx, _, _ = iabn_arrays.backward(ctx, xa, dza)
    xf = x.reshape(-1, C, H * W).numpy()
    e = ref.forward(xf, w.numpy(), b.numpy(), rm.numpy(), rv.numpy(), training=training,
                    activation=act, param=param, layout=lay)
    g = ref.backward(e["z"], dz.reshape(-1, C, H * W).numpy(), e["invstd"], e["count"],
                     w.numpy(), b.numpy(), training=training, activation=act, param=param)
    _check(f"{tag} core z", xa, e["z"][sl])
    _check(f"{tag} core dx", dx, g["dx"][sl])
    _check(f"{tag} core running_mean", rma, e["running_mean"])
    _check(f"{tag} core running_var", rva, e["running_var"])
    if training:
        if len(comm.sums) != 1:
            raise AssertionError(f"{tag}: {len(comm.sums)} all-reduces in backward, expected 1")
        _check(f"{tag} all-reduced sum dy", comm.sums[0][0], g["sum_dy"])
        _check(f"{tag} all-reduced sum dy*xhat", comm.sums[0][1], g["sum_dy_xhat"])
    elif comm.sums:
        raise AssertionError(f"{tag}: eval backward must not communicate")


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        it.InPlaceABN(6, activation="leaky_relu", activation_param=0.1),
        nn.Conv2d(6, 4, 3, padding=1, bias=False),
        it.InPlaceABN(4, activation="elu", activation_param=1.0),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, it.InPlaceABN):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def scenario_ddp(rank, world, sizes, steps=3):
    """DDP over InPlaceABNSync (convert_model(sync=True)) == one process on the full batch."""
    off = _offsets(sizes)
    sl = slice(off[rank], off[rank + 1])
    n = off[-1]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, 6, 5, generator=g, dtype=torch.float64)
    t = torch.randn(n, 3, generator=g, dtype=torch.float64)
    single = _net()
    model = it.convert_model(copy.deepcopy(single), sync=True)
    if sum(isinstance(m, it.InPlaceABNSync) for m in model.modules()) != 2:
        raise AssertionError("convert_model(sync=True) did not produce InPlaceABNSync layers")
    ddp = nn.parallel.DistributedDataParallel(model)
    opt_s = torch.optim.SGD(single.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(steps):
        opt_s.zero_grad()
        ((single(x) - t) ** 2).sum().div(n).backward()
        opt_s.step()
        opt_d.zero_grad()
        # DDP averages gradients over ranks, so each rank's share of the global mean loss is
        # scaled by the world size.
        ((ddp(x[sl]) - t[sl]) ** 2).sum().mul(world / n).backward()
        opt_d.step()
    for (name, a), b in zip(model.state_dict().items(), single.state_dict().values()):
        if a.is_floating_point():
            _check(f"ddp {name}", a, b)
    return {"steps": steps}


def _expect_error(fn, *needles):
    try:
        fn()
    except it.IABNError as exc:
        msg = str(exc)
        missing = [s for s in needles if s not in msg]
        if missing:
            raise AssertionError(f"error message lacks {missing}: {msg}") from exc
        return msg
    raise AssertionError("no error raised")


def _call(n, c, shape_tail=(), weight_c=None, device="cpu"):
    x = torch.randn(n, c, *shape_tail, dtype=torch.float64, device=device)
    wc = c if weight_c is None else weight_c
    p = dict(dtype=torch.float64, device=device)
    return lambda: it.inplace_abn_sync(x, torch.ones(wc, **p), torch.zeros(wc, **p), None, None)


def scenario_errors(rank, world, sizes=None, device="cpu"):
    """Errors every rank must raise in bounded time, and the group stays usable after each."""
    out = {}
    call = functools.partial(_call, device=device)
    channels = [4 + 2 * r for r in range(world)]
    out["mismatch"] = _expect_error(call(2, channels[rank], (3,)), "channel counts differ",
                                    str(channels))
    # One rank's own validation fails (weight with the wrong length): its peers raise too.
    bad = call(2, 4, (3,), weight_c=5 if rank == world - 1 else 4)
    out["peer_invalid"] = _expect_error(bad, "weight" if rank == world - 1 else "rejected")
    counts = [1] + [0] * (world - 1)
    out["global_count"] = _expect_error(call(counts[rank], 3),
                                        "Expected more than 1 value per channel")
    call(1, 3)()  # one sample on every rank: a global count >= 2 is fine
    call(2, 3, (3,))()  # and the group still works
    return out


def scenario_active_group(rank, world, sizes, device="cpu"):
    """active_group/set_active_group: the ranks with sizes[r] > 0 form a group (created once,
    then cached), an InPlaceABNSync given that group matches one process on those ranks'
    concatenated batch, and the others take no part. All-active gives WORLD, none-active None."""
    members = [r for r in range(world) if sizes[r] > 0]
    group = it.active_group(sizes[rank] > 0)
    if it.active_group(sizes[rank] > 0) is not group:
        raise AssertionError("active_group did not return the cached group")
    if it.active_group(True) is not dist.group.WORLD or it.active_group(False) is not None:
        raise AssertionError("all-active must give WORLD and none-active None")
    if rank not in members:
        if group is not dist.GroupMember.NON_GROUP_MEMBER:
            raise AssertionError(f"rank {rank} is not active but got a group")
        return {"members": members}
    if dist.get_world_size(group) != len(members):
        raise AssertionError(f"group size {dist.get_world_size(group)} != {len(members)}")
    off = _offsets(sizes)
    sl = slice(off[rank], off[rank + 1])
    x, dz, w, b, rm, rv = _data(off[-1], seed=99, device=device)
    outs = []
    for cls in (it.InPlaceABN, it.InPlaceABNSync):
        m = cls(C, activation="leaky_relu", activation_param=0.1).double().to(device)
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
        if cls is it.InPlaceABNSync:
            it.set_active_group(nn.Sequential(m), group)
            xs, dzs = x[sl], dz[sl]
        else:
            xs, dzs = x, dz  # the inactive ranks' slices are empty: x is the members' batch
        leaf = xs.clone().requires_grad_()
        out = m(leaf.clone())
        out.backward(dzs)
        outs.append((out.detach(), leaf.grad, m.weight.grad, m.bias.grad, m.running_mean))
    full, mine = outs
    _check("active out", mine[0], full[0][sl])
    _check("active dx", mine[1], full[1][sl])
    for i, name in ((2, "dweight"), (3, "dbias")):
        total = mine[i].clone()
        dist.all_reduce(total, group=group)
        _check(f"active {name} summed over the group", total, full[i])
    _check("active running_mean", mine[4], full[4])
    return {"members": members}


SCENARIOS = {"match": scenario_match, "ddp": scenario_ddp, "errors": scenario_errors,
             "active_group": scenario_active_group}


def worker(rank, world, init_file, out_dir, plan, backend="gloo", device=None):
    """`device`: where the scenarios put their tensors (default: cuda:<rank> under NCCL,
    else the CPU); "cuda:0" with gloo puts every rank on the one GPU."""
    torch.set_num_threads(1)
    # Loopback only: gloo otherwise binds the interface the host name resolves to, which on
    # some CI machines is slow to connect or firewalled.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    device = device or (f"cuda:{rank}" if backend == "nccl" else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, sizes in plan:
            try:
                kw = {} if name == "ddp" else {"device": device}
                results[name] = {"ok": True, "value": SCENARIOS[name](rank, world, sizes, **kw)}
            except Exception as exc:
                results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                 "trace": traceback.format_exc()}
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()
