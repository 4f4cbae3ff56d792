"""Triton kernels, the GPU path of tdiff's fused ops (installed as tdiff.kernels).

Methods never call these directly: tdiff.ops dispatches to them for CUDA tensors, or on CPU under the Triton
interpreter (TRITON_INTERPRET=1) in tests.
"""
