"""Weight-apply and model kernels with CPU Paddle references (not built yet: issue 3)."""
