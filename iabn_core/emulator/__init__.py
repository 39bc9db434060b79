"""CPU emulator that runs the iabn CUDA C++ kernel sources on the host.

Each CUDA thread block runs on one OS thread with its threads as fibers;
barriers and warp collectives are scheduling points, and anything that could
hang on a GPU (divergent barriers, bad collective masks, __trap) becomes an
EmulatorError naming the file:line of each waiting site.
"""

from .errors import EmulatorError, LaunchConfigError
from .runtime import Kernel, Module, asan_loaded, build_module, options

__all__ = ["build_module", "EmulatorError", "LaunchConfigError", "options", "Module", "Kernel",
           "asan_loaded"]
