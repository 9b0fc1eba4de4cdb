"""Quantization methods. Each is one module whose core is a pure function over arrays."""
