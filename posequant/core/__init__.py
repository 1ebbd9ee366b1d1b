"""The ground floor every stage stands on: errors, keypoint sets, the ONNX metadata schema, file writing,
tables and the version. Nothing here imports a stage (``exporter``, ``calibration``, ``benchmarks``) or
the front end (``posequant``'s API, CLI, pipeline, demo).
"""
