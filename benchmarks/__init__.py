"""iabn benchmark suite: `python -m benchmarks [--cpu-only] [--tiny] [--out DIR]`.

Modules:
  cases   the one setup factory (shapes, dtypes, layouts, inputs, network sizes)
  nets    ResNet-50-style and DeepLab-style networks with a pluggable BN+activation
  speed   GPU timing of iabn vs eager / torch.compile / checkpointing (CUDA events)
  memory  GPU peak memory per training step; bytes saved for backward (any device)
  counts  machine-independent counts: emulator traffic, launches, NVRTC compile time
  report  CSV, PNG plots and the Markdown summary
"""
