"""CPU emulator that runs the iabn CUDA C++ kernel sources on the host.

    mod = build_module(source, name_expressions)          # g++, cached on disk
    k = mod.get_function(name_expression)
    k(grid, block, args, shared_mem=nbytes)               # like cupy.RawKernel
    k.last_traffic, k.signature

Each CUDA thread block runs on one OS thread with its threads as fibers;
barriers and warp collectives are scheduling points, and anything that could
hang on a GPU (divergent barriers, bad collective masks, __trap) becomes an
EmulatorError naming the file:line of each waiting site.

Extra passes:
  * reverse thread order (exposes missing barriers):
        IABN_EMULATOR_REVERSE=1 python -m pytest ...   or  ``with options(reverse=True):``
  * AddressSanitizer builds (``asan=True`` or IABN_EMULATOR_ASAN=1):
        ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD=$(g++ -print-file-name=libasan.so) \\
            IABN_EMULATOR_ASAN=1 python -m pytest ...
"""

from .errors import EmulatorError, LaunchConfigError
from .runtime import Kernel, Module, asan_loaded, build_module, options

__all__ = ["build_module", "EmulatorError", "LaunchConfigError", "options", "Module", "Kernel",
           "asan_loaded"]
