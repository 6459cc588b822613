"""Bit packing of low-bit integers: b-bit values stored in b/8 bytes each, so a 4-bit tensor really takes half
a byte per weight on disk. Little-endian bit order within the stream; pure numpy."""
from __future__ import annotations

import numpy as np

from smallify.errors import ConfigError


def pack(q: np.ndarray, bits: int, qmin: int) -> np.ndarray:
    """Pack integers in [qmin, qmin + 2**bits - 1] into a uint8 array of ceil(n * bits / 8) bytes."""
    if not 1 <= bits <= 8:
        raise ConfigError(f"bits={bits!r} cannot be packed; accepted: 1..8")
    u = q.astype(np.int64).ravel() - qmin
    if u.size and (u.min() < 0 or u.max() >= 2 ** bits):
        raise ConfigError(f"values outside the {bits}-bit range starting at {qmin}")
    if bits == 8:
        return u.astype(np.uint8)
    planes = ((u[:, None] >> np.arange(bits)) & 1).astype(np.uint8)   # (n, bits), least significant bit first
    return np.packbits(planes.ravel(), bitorder="little")


def unpack(packed: np.ndarray, bits: int, qmin: int, count: int) -> np.ndarray:
    """Inverse of ``pack``: the first ``count`` values, as int32."""
    if bits == 8:
        return packed[:count].astype(np.int32) + qmin
    planes = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits).astype(np.int32)
    return (planes << np.arange(bits)).sum(1).astype(np.int32) + qmin
