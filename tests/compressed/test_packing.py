import pytest
import torch

from trtcompress.compressed.packing import pack_bits, packed_length, unpack_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 96, 161])
def test_roundtrip_any_width(bits, n):
    codes = torch.randint(0, 2**bits, (5, n), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_length(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_int4_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0, 7]], dtype=torch.uint8)
    packed = pack_bits(codes, 4)
    assert packed.tolist() == [[0x21, 0x0F, 0x07]]


def test_int3_is_a_little_endian_bit_stream():
    codes = torch.tensor([[5, 3, 7]], dtype=torch.uint8)  # bits 101 011 111 -> LSB first stream
    packed = pack_bits(codes, 3)
    assert packed.tolist() == [[0b11011101, 0b1]]


def test_wrong_packed_length_is_an_error():
    with pytest.raises(ValueError, match="packed row has"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)
