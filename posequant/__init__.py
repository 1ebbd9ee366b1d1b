"""posequant: trained PyTorch pose models to verified INT8 deployments.

The work lives in three packages: ``exporter`` (checkpoints, model zoo, ONNX export),
``calibration`` (datasets, preprocessing, quantization) and ``benchmarks`` (metrics,
evaluation, latency, gate). This package holds what they share: errors, keypoint sets,
the ONNX metadata schema, and the CLI.
"""

__version__ = "0.1.0"
