"""CUDA graphs, the way to remove iabn's per-call host cost entirely: a training step with
InPlaceABN captured by hand (torch.cuda.CUDAGraph) and by torch.compile(mode="reduce-overhead")
must replay to the same numbers as the eager steps. GPU only (skipped without one)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iabn.torch as it

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), it.InPlaceABN(16),
        nn.Conv2d(16, 16, 3, padding=1, stride=2), it.InPlaceABN(16, activation="elu",
                                                                 activation_param=1.0),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).cuda()


def _data():
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(8, 3, 16, 16, generator=g).cuda()
    y = torch.randint(0, 4, (8,), generator=g).cuda()
    return x, y


def _stepper(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step(x, y):
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def _state(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def _close(a_list, b_list):
    for a, b in zip(a_list, b_list):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(a, b)


def test_manual_capture_replays_the_eager_steps():
    x, y = _data()
    eager = _net()
    graphed = copy.deepcopy(eager)
    eager_step, graphed_step = _stepper(eager), _stepper(graphed)

    # Warm-up on a side stream (compiles kernels, fills every cache), as torch's docs require
    # before capture; the eager twin takes the same steps.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            graphed_step(x, y)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        eager_step(x, y)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = graphed_step(x, y)
    # Capture records the step without running it; each replay is one training step.
    losses_graph, losses_eager = [], []
    for _ in range(4):
        graph.replay()
        losses_graph.append(static_loss.item())
        losses_eager.append(eager_step(x, y).item())
    torch.testing.assert_close(torch.tensor(losses_graph), torch.tensor(losses_eager),
                               rtol=1e-4, atol=1e-5)
    _close(_state(graphed), _state(eager))


def test_compile_reduce_overhead_matches_eager():
    x, y = _data()
    eager = _net()
    compiled_model = copy.deepcopy(eager)
    eager_step = _stepper(eager)
    compiled_fwd = torch.compile(compiled_model, mode="reduce-overhead", fullgraph=True)
    opt = torch.optim.SGD(compiled_model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):  # cudagraph trees record after warm-up runs
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(compiled_fwd(x), y)
        loss.backward()
        opt.step()
        torch.testing.assert_close(loss.detach(), eager_step(x, y).detach(), rtol=1e-4,
                                   atol=1e-5)
    _close(_state(compiled_model), _state(eager))
