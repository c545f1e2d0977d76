"""Hardware abstraction layer: profile and sample NVIDIA, AMD and Intel GPUs and the host."""

__version__ = "0.1.0"
