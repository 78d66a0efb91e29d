"""gptfast's Triton kernels.

Each op lives in `kernels/<op>.py` (Triton kernel -> launcher -> custom op with autograd ->
functional). Kernels run on CUDA tensors, or on CPU tensors when `TRITON_INTERPRET=1` is set before
this package is imported; they never fall back to PyTorch on their own: choosing between Triton
and PyTorch ops is the model's job (`[kernels]` in the config).
"""

from kernels._utils import triton_supports
from kernels.cross_entropy import cross_entropy, linear_cross_entropy
from kernels.layernorm import add_layer_norm, add_rms_norm, layer_norm, rms_norm

__all__ = ["add_layer_norm", "add_rms_norm", "cross_entropy", "layer_norm", "linear_cross_entropy", "rms_norm",
           "triton_supports"]
