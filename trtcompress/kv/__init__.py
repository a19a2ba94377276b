"""KV-cache compression: codecs (FP16, INT8, FP8, KIVI, GEAR) and the paged compressed cache."""

from trtcompress.kv import scalar  # noqa: F401, I001  (registers fp16, int8, fp8 first)
from trtcompress.kv import kivi, gear  # noqa: F401  (then KIVI, GEAR)
from trtcompress.kv.codec import CODEC_FACTORIES, FieldSpec, KVCodec, codec_names, get_codec, register_codec

__all__ = ["CODEC_FACTORIES", "FieldSpec", "KVCodec", "codec_names", "get_codec", "register_codec"]
