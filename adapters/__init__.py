"""iabn: In-Place Activated BatchNorm kernels for CuPy, NumPy and PyTorch.

    import iabn.cupy    # arrays: CuPy on the GPU, NumPy on the CPU
    import iabn.torch   # drop-in modules for PyTorch
"""
__version__ = "0.1.0"
