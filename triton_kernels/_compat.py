"""Helpers that behave the same in compiled Triton (3.0 to 3.9) and in the interpreter."""

import triton
import triton.language as tl  # noqa: F401 - the interpreter needs it in a jit function's globals


@triton.jit
def rint(y):
    """Round half to even for float32 |y| < 2**22 (libdevice.rint is not available in
    the interpreter): adding and subtracting 1.5 * 2**23 leaves the rounded value, as
    float32 addition rounds to nearest even."""
    return (y + 12582912.0) - 12582912.0
