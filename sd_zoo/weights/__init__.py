"""Weights files: safetensors with verified digests, the published manifest and the one model loader."""
