"""Exception types of the CPU emulator."""


class EmulatorError(RuntimeError):
    """Compilation failure, deadlock, __trap(), or a bad launch configuration."""


class LaunchConfigError(EmulatorError, ValueError):
    """Invalid grid/block/shared-memory configuration (also a ValueError)."""
