"""Writers of source and adapted packages (safetensors, ONNX, manifest)."""
