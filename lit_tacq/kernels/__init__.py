"""Triton kernels for the packed TaCQ format (importing this needs triton)."""

from lit_tacq.kernels.quant_matmul import quant_matmul

__all__ = ["quant_matmul"]
