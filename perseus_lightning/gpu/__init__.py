"""GPU control: one object per local GPU to read clocks, energy and power, and to lock the SM clock.

Two implementations share :class:`~perseus_lightning.gpu.device.GPUDevice`: NVML (real GPUs,
through nvidia-ml-py) and an emulated GPU (CPU machines, tests, demos, benchmarks).
"""
