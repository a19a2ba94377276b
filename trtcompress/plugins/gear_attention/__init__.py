"""Decode attention over a paged GEAR/KIVI cache without materializing K and V.

- `reference.py`: plain torch, the definition of correct;
- `kernel.py`: OpenAI Triton, fused dequantize + sparse outliers + low-rank + online softmax over
  blocks, split-K over the sequence, GQA; plus the quantize-and-pack kernel used when a block fills;
- `op.py`: the torch custom op `trtcompress::gear_attention` (Triton on CUDA, reference on CPU);
- `trt.py`: the TensorRT quickly-deployable plugin `trtcompress::gear_attention` whose `aot_impl` is
  PTX compiled ahead of time from the same Triton kernel (TensorRT imported lazily).
"""

from trtcompress.plugins.gear_attention.reference import (
    GearLayout,
    gear_attention_reference,
    layout_for_codec,
)

__all__ = ["GearLayout", "gear_attention_reference", "layout_for_codec"]
