"""Quantization math and the packed format. Knows nothing about model families."""
