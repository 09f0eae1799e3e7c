"""torch → ONNX export (``export.onnx_export``, needs torch) and the artifact loader the controller
trusts (``export.artifact``, onnxruntime only)."""
