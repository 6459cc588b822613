import numpy as np
import pytest

from smallify.errors import ConfigError
from smallify.quant.packing import pack, unpack


@pytest.mark.parametrize("bits,qmin", [(2, -2), (3, -4), (4, -8), (4, 0), (5, -16), (8, -128), (8, 0)])
def test_round_trip_and_size(bits, qmin):
    rng = np.random.default_rng(bits)
    q = rng.integers(qmin, qmin + 2 ** bits, size=1001)
    p = pack(q, bits, qmin)
    assert p.dtype == np.uint8 and p.size == -(-1001 * bits // 8)      # ceil(n * bits / 8) bytes
    assert np.array_equal(unpack(p, bits, qmin, 1001), q)


def test_known_layout():
    # 4-bit, unsigned: two values a byte, the first in the low nibble
    assert pack(np.array([1, 2, 15, 0]), 4, 0).tolist() == [0x21, 0x0F]


def test_out_of_range():
    with pytest.raises(ConfigError, match="outside the 4-bit range"):
        pack(np.array([8]), 4, -8)
