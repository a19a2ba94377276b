"""The canonical compressed-weight state and the module that runs from it."""

from trtcompress.compressed.formats import IntFormat
from trtcompress.compressed.linear import CompressedLinear, compressed_linears, linear_state, set_module
from trtcompress.compressed.state import CompressedLinearState, QuantizedWeight

__all__ = [
    "CompressedLinear",
    "CompressedLinearState",
    "IntFormat",
    "QuantizedWeight",
    "compressed_linears",
    "linear_state",
    "set_module",
]
