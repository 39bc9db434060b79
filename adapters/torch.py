"""Drop-in InPlace-ABN for PyTorch: switch from the official package by changing one import.

    from iabn.torch import InPlaceABN, InPlaceABNSync, ABN, inplace_abn, inplace_abn_sync

CPU tensors run the `numpy` backend zero-copy (the CUDA kernels in the CPU `emulator` when
IABN_BACKEND=emulator); CUDA tensors run the CUDA kernels through DLPack on torch's current
stream, with workspaces from torch's allocator. Works with torch.compile(fullgraph=True),
torch.autocast (float16/bfloat16 inputs with float32 parameters) and channels_last.
`convert_model`, `from_batchnorm` and `to_batchnorm` convert to and from torch.nn.BatchNorm;
`revert_model` turns a whole model back (for export); `load_batchnorm_state_dict` and
`batchnorm_state_dict` carry checkpoints across the two weight parametrisations.
Code that imports the official `inplace_abn` runs unchanged after `register_inplace_abn()`.
"""
from .torch_compat import register_inplace_abn
from .torch_checkpoint import batchnorm_state_dict, load_batchnorm_state_dict
from .torch_convert import convert_model
from .torch_group import active_group, set_active_group
from .torch_layer_convert import from_batchnorm, to_sync
from .torch_modules import (ABN, IN_PLACE_MODULES, IABNConversionWarning, InPlaceABN,
                            InPlaceABNSync)
from .torch_ops import IABNError, SyncFallbackWarning, inplace_abn, inplace_abn_sync
from .torch_revert import BatchNormAct, SyncBatchNormAct, revert_model, to_batchnorm

__all__ = ["ABN", "InPlaceABN", "InPlaceABNSync", "inplace_abn", "inplace_abn_sync",
           "active_group", "set_active_group", "register_inplace_abn", "IN_PLACE_MODULES",
           "convert_model", "revert_model", "from_batchnorm", "to_batchnorm", "to_sync",
           "batchnorm_state_dict", "load_batchnorm_state_dict", "BatchNormAct",
           "SyncBatchNormAct", "IABNError", "IABNConversionWarning", "SyncFallbackWarning"]
