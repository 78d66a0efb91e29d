"""gptfast's Triton kernels.

Each op lives in `kernels/<op>.py` (Triton kernel -> launcher -> autograd.Function -> functional).
Kernels run on CUDA tensors, or on CPU tensors under `TRITON_INTERPRET=1`; they never fall back to
PyTorch on their own: choosing between Triton and PyTorch ops is the model's job (`[kernels]`).
"""

__all__: list[str] = []
