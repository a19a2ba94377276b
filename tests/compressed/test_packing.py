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


@pytest.mark.parametrize(
    ("bits", "codes"),
    [(4, [[16, 0]]), (3, [[9, 1, 2]]), (2, [[-1, 0]]), (8, [[256, 0]]), (1, [[2]])],
)
def test_out_of_range_codes_are_refused(bits, codes):
    """A code >= 2**bits spilled into its neighbour (4-bit [16, 0] unpacked as [0, 1]) or lost its high
    bits, and a negative one wrapped: refuse instead of storing different codes."""
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(torch.tensor(codes), bits)


def test_float_codes_are_refused():
    with pytest.raises(ValueError, match="integer tensor"):
        pack_bits(torch.tensor([[1.7, 2.0]]), 4)


def test_unpack_refuses_signed_bytes():
    """int8 packed bytes (e.g. read back from another tool) shifted in sign bits: 4-bit 15 became -1."""
    packed = pack_bits(torch.tensor([[15, 15]], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(packed.view(torch.int8), 4, 2)


@pytest.mark.parametrize("bits", [1, 3, 4, 6, 8])
@pytest.mark.parametrize("shape", [(7,), (2, 3, 5), (0, 9), (4, 1)])
def test_roundtrip_odd_shapes(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.shape == (*shape[:-1], packed_length(shape[-1], bits))
    assert torch.equal(unpack_bits(packed, bits, shape[-1]), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_unpacking_stays_on_the_device_of_the_codes(bits):
    """3-bit codes and sparsity bitmaps were unpacked with CPU shift tensors, so a CompressedLinear moved
    to CUDA failed its forward ("not on the expected device") while 4-bit ones ran. The meta device stands
    in for CUDA here: any CPU helper tensor mixed in raises the same way."""
    from trtcompress.compressed.sparsity import SparsityMask

    packed = torch.zeros(2, packed_length(11, bits), dtype=torch.uint8, device="meta")
    assert unpack_bits(packed, bits, 11).device.type == "meta"
    assert SparsityMask(torch.zeros(2, 2, dtype=torch.uint8, device="meta"), 11).dense().device.type == "meta"
