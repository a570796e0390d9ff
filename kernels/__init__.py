"""The kernels the server runs through: weight apply/cast and the decoder's compute.

Each op has a Paddle reference (``reference.py``, CPU and the test oracle) and a Triton kernel
(``triton_ops.py``, CUDA); ``dispatch.py`` picks one by the tensor's place.
"""

from kernels.dispatch import backend, cast_copy_, decode_attention, rms_norm, rotary_, swiglu

__all__ = ["backend", "cast_copy_", "decode_attention", "rms_norm", "rotary_", "swiglu"]
