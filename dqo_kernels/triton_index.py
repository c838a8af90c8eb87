"""Index arithmetic shared by the Triton kernels, in one jitted helper so that the tests can
run the very expression the kernels use with offsets no test could allocate."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def offsets64(i, s_i, o, s_o):
    """``i * s_i + o * s_o`` in int64. Triton passes every integer argument that fits as
    int32, so a row offset ``i_b * s_b`` or a column offset ``o_t * s_t`` (a transposed
    ``[B, T]`` view has ``s_t = B``) computed in int32 wraps past 2^31 elements although
    each factor fits."""
    return i.to(tl.int64) * s_i + o.to(tl.int64) * s_o
