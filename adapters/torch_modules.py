"""Modules (ABN, InPlaceABN, InPlaceABNSync); single layers to and from torch.nn.BatchNorm
are in torch_layer_convert, whole models in torch_convert / torch_revert.

Names, arguments, defaults and state_dict keys follow the official `inplace_abn` package, so
switching is a one-line import change and its checkpoints load unchanged. Like the official
package, ABN uses `weight` as the BN scale directly, while the in-place modules use
gamma = |weight| + eps (a scale that is never 0 keeps the affine map invertible).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from iabn_core.activations import check_activation, check_real
from iabn_core.validate import IABNError

from .torch_checks import _check_hyperparameters, _check_residual, _fail
from .torch_ops import _apply, _sync_group_name

__all__ = ["ABN", "InPlaceABN", "InPlaceABNSync", "IN_PLACE_MODULES", "IABNConversionWarning"]

# ABN does not invert its activation, so it also takes relu; in-place modules cannot.
_ABN_ACTIVATIONS = ("relu", "leaky_relu", "elu", "identity")


def _activation_repr(m: nn.Module) -> str:
    """How reprs name a layer's activation: leaky_relu and elu with their parameter."""
    act = m.activation
    return f"{act}[{m.activation_param}]" if act in ("leaky_relu", "elu") else act


class IABNConversionWarning(UserWarning):
    """A BatchNorm could not be converted exactly (or was left as it is)."""


class ABN(nn.Module):
    r"""Activated batch norm: ``act(BatchNorm(x))``, computed out of place with PyTorch's own
    ops (``F.batch_norm`` and the activation), as the official ``inplace_abn.ABN``.

    Per channel, with the batch's mean and biased variance in training (the running
    statistics in eval)::

        y = act(weight * (x - mean) / sqrt(var + eps) + bias [+ residual])

    The running statistics follow ``nn.BatchNorm``: ``running = (1 - momentum) * running +
    momentum * batch``, with the unbiased batch variance. Unlike :class:`InPlaceABN` the scale
    is ``weight`` itself, ``"relu"`` is allowed, and the input is left as it is; use ABN where
    an in-place layer cannot go (README, "In-place hazards") and for inference.

    Args:
        num_features, momentum, affine, track_running_stats, activation_param, bias,
            device, dtype: as in :class:`InPlaceABN`.
        eps: added to the variance for numerical stability (the in-place modules also add
            it to ``|weight|``). Default: 1e-5.
        activation: ``"leaky_relu"``, ``"elu"``, ``"identity"``, or ``"relu"`` (ABN only).
            Default: ``"leaky_relu"``.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, *)`, contiguous or ``channels_last``.
        - residual (optional second argument of ``forward``): the shape of the input.
        - Output: the shape of the input.

    The state_dict keys are ``nn.BatchNorm2d``'s (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``).

    Examples::

        >>> import torch
        >>> from iabn.torch import ABN
        >>> layer = ABN(16, activation="relu")
        >>> x = torch.randn(8, 16, 32, 32)
        >>> y = layer(x)                                  # relu(BN(x)); x is unchanged
        >>> y = layer(x, torch.randn(8, 16, 32, 32))      # relu(BN(x) + residual)
        >>> layer = ABN(16, activation="elu", activation_param=1.0).eval()
    """

    _version = 2  # version 2 added num_batches_tracked (as in nn.BatchNorm)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01, *,
                 bias: bool = True, device=None, dtype=None):
        """The arguments are described in the class docstring (``help(type(self))``)."""
        # bias, device and dtype as nn.BatchNorm takes them; keyword-only here, since the
        # official positional order puts activation where BatchNorm has device.
        super().__init__()
        _check_hyperparameters(num_features, eps, momentum)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.activation = activation
        self.activation_param = activation_param
        self._check_activation()
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def _check_activation(self):
        if self.activation not in _ABN_ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, _ABN_ACTIVATIONS))}"
                             f", got {self.activation!r}")
        # Not inverted here, so any finite slope/alpha does (the in-place classes need > 0).
        if not math.isfinite(check_real("activation_param", self.activation_param, _fail)):
            _fail(f"activation_param must be finite, got {self.activation_param!r}")

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def effective_weight(self) -> Optional[torch.Tensor]:
        """The scale gamma that multiplies the normalised input."""
        return self.weight

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """act(BN(x)), or act(BN(x) + residual) with a residual like x.

        nn.BatchNorm's rules are spelled out here rather than taken from the helpers the
        in-place classes share, so that torch.jit.script and trace compile this method (as
        they do the official ABN); the result is the same."""
        if residual is not None:
            if not isinstance(residual, torch.Tensor):  # statically false when scripted
                raise IABNError(f"residual must be a tensor like x, got a "
                                f"{type(residual).__name__}")
            if not torch.jit.is_tracing():  # a trace sees sizes as tensors; it fixes them
                _check_residual(x, residual)
        counts = self.training and self.track_running_stats
        momentum = 0.0
        if self.momentum is not None:
            momentum = float(self.momentum)
        count = self.num_batches_tracked
        if counts and self.momentum is None and count is not None:
            momentum = 1.0 / (float(count) + 1.0)  # cumulative average over counted batches
        # Training without tracked stats: batch stats, nothing to update. Eval without
        # running stats (track_running_stats=False): batch stats too.
        keep = self.track_running_stats or not self.training
        y = F.batch_norm(x, self.running_mean if keep else None,
                         self.running_var if keep else None, self.weight, self.bias,
                         self.training or self.running_mean is None, momentum, float(self.eps))
        if counts and count is not None:  # only once batch_norm has succeeded
            count.add_(1)
        if residual is not None:
            y = y.add_(residual)
        # y is batch_norm's fresh output, so activating it in place never touches x.
        if self.activation == "relu":
            return F.relu(y, inplace=True)
        if self.activation == "leaky_relu":
            return F.leaky_relu(y, float(self.activation_param), inplace=True)
        if self.activation == "elu":
            return F.elu(y, float(self.activation_param), inplace=True)
        return y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # nn.BatchNorm's rule: a state dict older than num_batches_tracked (version < 2, or
        # a plain dict with no version) that lacks it keeps the module's own count (0 for a
        # fresh module, or a meta one); a current one lacking it is reported as a missing
        # key, or, with strict=False, leaves the count as it is too.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            own = self.num_batches_tracked
            state_dict[key] = (own if own is not None and own.device.type != "meta"
                               else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        no_bias = ", bias=False" if self.affine and self.bias is None else ""
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}{no_bias}, track_running_stats={self.track_running_stats}"
                f", activation={_activation_repr(self)}")


class _RefusesTorchScript:
    """The in-place layers meet torch.jit (trace, script, the TorchScript ONNX exporter) with
    an error that names the fix, iabn.torch.revert_model. nn.Module calls _slow_forward
    instead of forward only while the tracer runs, and torch.jit.script calls
    __prepare_scriptable__ on every submodule first: eager calls pay nothing."""

    def _slow_forward(self, *args, **kwargs):
        from .torch_revert import _refuse_tracing

        _refuse_tracing(self)

    def __prepare_scriptable__(self):
        from .torch_revert import _refuse_scripting

        _refuse_scripting(self)


class InPlaceABN(_RefusesTorchScript, ABN):
    r"""In-place activated batch norm (Rota Bulò, Porzi, Kontschieder, CVPR 2018): BatchNorm
    and an invertible activation as one layer that writes its output over its input and keeps
    only that output for backward, so a BN + activation + conv block stores one activation
    tensor instead of two.

    Per channel, with the batch's mean and biased variance in training (the running
    statistics in eval)::

        x <- z = act(gamma * (x - mean) / sqrt(var + eps) + bias [+ residual])
        gamma = |weight| + eps

    Backward recovers what it needs from z by inverting the activation and the affine step,
    hence the activation must be invertible (leaky_relu, elu or identity; not relu) and the
    scale is ``|weight| + eps``, never 0. That scale is not ``nn.BatchNorm``'s ``weight``:
    turn a trained BatchNorm into this layer with :func:`from_batchnorm` (or
    :func:`convert_model` for a whole model) rather than by loading its state_dict. The
    running statistics follow ``nn.BatchNorm`` (unbiased batch variance, ``momentum=None``
    for a cumulative average).

    The input is overwritten, so it must not be needed afterwards: it may not be a leaf that
    requires grad, and the op before the layer must not save its own output for backward
    (e.g. a ReLU): see README, "In-place hazards". CUDA tensors run the CUDA kernels on
    torch's current stream; CPU tensors run the NumPy backend (``IABN_BACKEND=emulator``:
    the CUDA kernels in the CPU emulator).

    Args:
        num_features: C, the channels of an input of shape (N, C) or (N, C, *).
        eps: added to the variance and to ``|weight|``. Default: 1e-5.
        momentum: the weight of the batch in the running-statistics update, in [0, 1], or
            ``None`` for a cumulative average over the batches seen. Default: 0.1.
        affine: learn a per-channel ``weight`` (initialised to 1) and ``bias`` (0).
            Default: True.
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked``, and normalise with the running statistics in eval mode;
            if False, batch statistics are used in both modes. Default: True.
        activation: ``"leaky_relu"``, ``"elu"`` or ``"identity"``. Default: ``"leaky_relu"``.
        activation_param: the negative slope of leaky_relu or the alpha of elu, > 0.
            Default: 0.01.
        bias: keyword-only; with ``affine``, learn ``bias`` too. Default: True.
        device, dtype: keyword-only; of the parameters and buffers, as in ``nn.BatchNorm2d``.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, *)`, contiguous or ``channels_last``;
          float32, float64, float16 or bfloat16.
        - residual (optional second argument of ``forward``): the input's shape, dtype and
          memory layout; only read.
        - Output: the input tensor itself, holding z.

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from iabn.torch import InPlaceABN
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), InPlaceABN(16))
        >>> x = torch.randn(8, 3, 32, 32)
        >>> z = net(x)                      # the conv's output now holds z
        >>> z.sum().backward()
        >>> # residual block tail: z = leaky_relu(BN(y) + r), written over y
        >>> bn = InPlaceABN(16)
        >>> y, r = torch.randn(8, 16, 32, 32), torch.randn(8, 16, 32, 32)
        >>> z = bn(y, r)
        >>> z is y
        True
    """

    # InPlaceABNSync (not a subclass, see there) shares these methods; it synchronises.
    _synced = False

    def _check_activation(self):
        if self.activation == "relu":
            _fail("InPlaceABN cannot use relu: it is not invertible, and backward recovers the "
                  "input from the output. Use activation='leaky_relu' (e.g. activation_param="
                  "0.01) or ABN")
        check_activation(self.activation, self.activation_param, _fail)

    def effective_weight(self) -> Optional[torch.Tensor]:
        return None if self.weight is None else self.weight.abs() + self.eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x <- act(BN(x) [+ residual]) in place; returns x.

        Args:
            x: (N, C) or (N, C, *), overwritten with the output.
            residual: optional, x's shape, dtype and layout; added before the activation,
                only read (autograd keeps it as it is for backward).
        """
        # nn.BatchNorm's rules (ABN.forward spells them for TorchScript), inlined: this runs
        # once per layer per step, and each Module.__getattr__ or helper call is a frame.
        params, buffers = self._parameters, self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        momentum = self.momentum
        counts = self.training and self.track_running_stats
        if momentum is None:
            momentum = 1.0 / (float(buffers["num_batches_tracked"]) + 1.0) if counts else 0.0
        if self.training and not self.track_running_stats:
            running_mean = running_var = None
        return _apply(x, params["weight"], params["bias"], running_mean, running_var,
                      self.training or running_mean is None, momentum, self.eps,
                      self.activation, self.activation_param,
                      _sync_group_name(self.group, self.training, 2) if self._synced else "",
                      residual, buffers["num_batches_tracked"] if counts else None)


class InPlaceABNSync(_RefusesTorchScript, ABN):
    r"""InPlaceABN with batch statistics synchronised over a torch.distributed group (None:
    the default group). Without torch.distributed it runs locally and warns.

    In training each rank's per-channel count, mean and variance are gathered and merged, so
    every rank normalises with the statistics of the whole global batch, and backward
    all-reduces the two per-channel sums it needs; the layer is otherwise
    :class:`InPlaceABN` (in place, ``gamma = |weight| + eps``, no relu). Any backend works
    (NCCL for CUDA tensors, gloo on the CPU). Without an initialised ``torch.distributed``
    it runs unsynchronised and warns with ``SyncFallbackWarning``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, activation,
            activation_param, bias, device, dtype: as in :class:`InPlaceABN`.
        group: the process group to synchronise over; None for the default (world) group.
            ``active_group(active)`` builds a group of the ranks that pass ``active=True``.
            Default: None.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, *)`, each rank its own N; C the same on
          every rank.
        - residual (optional second argument of ``forward``): the input's shape, dtype and
          layout.
        - Output: the input tensor itself, holding z.

    Examples::

        >>> # in each process, after torch.distributed.init_process_group(...)
        >>> import torch
        >>> from iabn.torch import InPlaceABNSync
        >>> layer = InPlaceABNSync(16).cuda()
        >>> z = layer(torch.randn(8, 16, 32, 32, device="cuda"))   # statistics of all ranks
        >>> # or convert a model: convert_model(model, sync=True)

    Derives from ABN, not InPlaceABN, as in the official package: code that finds the
    unsynchronised layers with isinstance(m, InPlaceABN) must not pick these up. The
    in-place behaviour (no relu, gamma = |w| + eps) is InPlaceABN's, shared below."""

    _synced = True
    _check_activation = InPlaceABN._check_activation
    effective_weight = InPlaceABN.effective_weight
    forward = InPlaceABN.forward

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01,
                 group: Optional[Any] = None, *, bias: bool = True, device=None, dtype=None):
        """The arguments are described in the class docstring (``help(type(self))``)."""
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation,
                         activation_param, bias=bias, device=device, dtype=dtype)
        self.group = group

    def set_group(self, group: Optional[Any]) -> None:
        """Group to synchronise with; never change it between a forward and its backward."""
        self.group = group


# Every module that works in place (InPlaceABNSync is not an InPlaceABN, see its class).
IN_PLACE_MODULES = (InPlaceABN, InPlaceABNSync)
