"""Exporters: the container to other formats (GGUF for llama.cpp)."""
