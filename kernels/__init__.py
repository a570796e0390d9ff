"""The kernels the server runs through: weight apply/cast and the decoder's compute.

Each op has a Paddle reference (``reference.py``, CPU and the test oracle) and a Triton kernel
(``triton_ops.py``, CUDA); ``dispatch.py`` picks one by the tensor's place. The ops are re-exported lazily so
``kernels.triton_ops`` can be imported on a host that has Triton and PyTorch but no Paddle (the GPU check).
"""

__all__ = ["MAX_ROWS", "PAGE", "Plan", "backend", "cast_copy_", "causal_attention", "decode_attention", "matmul",
           "new_kv_pages", "paged_attention", "rms_norm", "rotary", "rotary_", "same_machine", "store_kv", "swiglu",
           "use_every_core", "fingerprint", "xor_at_"]


def __getattr__(name: str):
    if name in __all__:
        from kernels import dispatch

        value = globals()[name] = getattr(dispatch, name)  # looked up once: ops are called per layer per step
        return value
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
