"""Deployment: ONNX export and runtime, int8 quantization and depth pruning."""
