"""The CPU reference runtime: runs a container's model on the packed blocks.

``kernels`` holds the matrix products on packed weights; the model files (``llama.py`` ...)
only call :func:`qconvert.runtime.kernels.linear` and
:func:`qconvert.runtime.kernels.embedding_rows`.
"""
