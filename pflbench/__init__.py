"""pflbench: personalized federated learning benchmarks for multi-site medical image segmentation."""

__version__ = "0.1.0"
