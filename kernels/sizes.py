"""The sizes every kernel and its callers agree on, defined once."""

# KV-cache page size in tokens; attention pads key lengths to a multiple of it.
PAGE = 16
# Softmax weights below exp(EXP_FLOOR) of the largest are raised to it (masked keys stay exactly 0): 4e-18 is far
# below float32's resolution, and it keeps denormal numbers (tens to hundreds of times slower to multiply) out of
# attention.
EXP_FLOOR = -40.0
# Rows per GEMM call: longer forwards (a trainer's) run in blocks, so a row meets the same kernel however many
# rows there are.
MAX_ROWS = 128
