"""Demo: `python -m iabn.demo` trains a small residual conv net three times on synthetic
data: with standard BatchNorm2d + LeakyReLU, with InPlaceABN (convert_model with
fuse_residual=False), and with InPlaceABN plus the fused residual (convert_model, which turns
each block's BN -> add -> LeakyReLU into one layer), and shows that the losses agree while
InPlaceABN saves less for backward. Runs on the GPU when there is one, else on the CPU.
Ends with the correctness runner's quick verdict on the same machine: the CUDA kernels on the
GPU, else in the CPU emulator, else (no C++ compiler for the emulator) the NumPy backend.
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch
from torch import nn


def block(cin: int, cout: int, norm) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), *norm(cout)]


def standard(c: int):
    return [nn.BatchNorm2d(c), nn.LeakyReLU(0.01)]


class Residual(nn.Module):
    """conv -> BN -> LeakyReLU -> conv -> BN, + input, LeakyReLU (a ResNet basic block)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x):
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(out + x)


def make_net(norm, width: int = 32, classes: int = 10) -> nn.Sequential:
    layers = block(3, width, norm) + [Residual(width), nn.MaxPool2d(2)]
    layers += block(width, 2 * width, norm) + [Residual(2 * width)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes)]
    return nn.Sequential(*layers)


def saved_bytes(model, x, y) -> int:
    """Bytes autograd keeps for backward (distinct storages), for one forward pass."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    # the input batch is saved by the first conv in both nets; count only what the net adds
    seen.pop(x.untyped_storage().data_ptr(), None)
    return sum(seen.values())


def train(model, data, steps: int, device) -> tuple[list[float], float | None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps):
        x, y = data[step % len(data)]
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return losses, peak


def main(argv=None) -> int:
    from iabn.torch import convert_model

    ap = argparse.ArgumentParser(prog="python -m iabn.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=32, help="image side")
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device),
             torch.randint(0, 10, (args.batch,), generator=gen).to(device)) for _ in range(4)]

    base = make_net(standard).to(device)
    # same weights; BN+act -> InPlaceABN, with and without the residual fused in
    with warnings.catch_warnings():  # it lists each block's last BN (followed by the add)
        warnings.simplefilter("ignore")
        nets = {"InPlaceABN": convert_model(copy.deepcopy(base), fuse_residual=False)}
    nets["+ fused residual"] = convert_model(copy.deepcopy(base))
    print(f"device: {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}")
    print(f"net: 2 x (conv3x3 -> BN + LeakyReLU -> residual block), batch {args.batch}, "
          f"{args.size}x{args.size} images")
    print("data: random images and labels (4 fixed batches): the losses show that the three "
          "nets compute\nthe same function, not that they learn anything")

    bytes_std = saved_bytes(copy.deepcopy(base), *data[0])
    got = {k: (saved_bytes(copy.deepcopy(m), *data[0]), *train(m, data, args.steps, device))
           for k, m in nets.items()}
    loss_std, peak_std = train(base, data, args.steps, device)

    print(f"\n{'step':>4}  {'BatchNorm2d+LeakyReLU':>22}" + "".join(f"  {k:>16}" for k in got))
    for i, a in enumerate(loss_std):
        print(f"{i:>4}  {a:>22.5f}" + "".join(f"  {g[1][i]:>16.5f}" for g in got.values()))
    print("\nsaved for backward = the bytes autograd keeps from the forward pass until "
          "backward\n(activation memory; the input batch, kept by every net alike, not counted)")
    print(f"  {'standard':>16}: {bytes_std / 2**20:.2f} MiB")
    for k, (b, _, peak) in got.items():
        print(f"  {k:>16}: {b / 2**20:.2f} MiB ({100 * (1 - b / bytes_std):.0f}% less)"
              + (f"; peak GPU memory {peak:.1f} MiB (standard {peak_std:.1f})"
                 if peak is not None else ""))
    drift = max(abs(a - b) for g in got.values() for a, b in zip(loss_std, g[1]))
    print(f"largest loss difference over {args.steps} steps: {drift:.2e}")

    if args.no_check:
        return 0
    from iabn import check
    from iabn_core.backends.cuda import gpu_available

    print("\n--- correctness check (quick) ---")
    argv = ["--quick", "--summary"]
    if not gpu_available():
        why = check.emulator_unavailable()
        if why:  # one line, then the check the machine can run
            print(f"not checking the CUDA kernels in the CPU emulator: {why}. "
                  "Checking the NumPy backend instead.")
            argv += ["--backend", "numpy"]
    return check.main(argv)


if __name__ == "__main__":
    sys.exit(main())
