"""lit_restore: distributed training of all-in-one image restoration models on PyTorch Lightning."""

__version__ = "0.1.0"
