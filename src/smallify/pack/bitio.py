"""Bit-level I/O of the entropy coders (``pack/entropy.py``, ``pack/rans.py``): unsigned integers packed at any
width, LEB128 varints, and a payload reader that turns running past the end into a ModelError."""
from __future__ import annotations

import numpy as np

from smallify.errors import ModelError
from smallify.quant.packing import pack, unpack

_PIECE = 1 << 20                     # symbols packed per call (a multiple of 8: every piece ends on a byte)


def _bits_for(alphabet: int) -> int:
    return (alphabet - 1).bit_length()          # ceil(log2 alphabet); 0 for a one-symbol alphabet


def _pack_uint(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative integers (< 2**width, width 0..64) packed at ``width`` bits: whole bytes first (8 bits per
    value each), then the remaining width % 8 bits, each plane through ``pack`` and in pieces to bound memory."""
    out, shift = [], 0
    while shift < width:
        bits = min(8, width - shift)
        for i in range(0, values.size, _PIECE):
            v = values[i:i + _PIECE]
            if width > 8:
                v = (v.astype(np.uint64) >> np.uint64(shift)) & np.uint64(2 ** bits - 1)
            out.append(pack(v, bits, 0))
        shift += bits
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


def _packed_size(count: int, width: int) -> int:
    return (width // 8) * count + -(-(width % 8) * count // 8)


def _unpack_uint(data: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of ``_pack_uint``; ``data`` must hold exactly ``_packed_size(count, width)`` bytes."""
    if width in (1, 2, 4):                      # whole values per byte: shifts, ~10x faster than ``unpack``
        return ((data[:, None] >> np.arange(0, 8, width, dtype=np.uint8)) & (2 ** width - 1)).ravel()[:count]
    out, shift, at = np.zeros(count, np.uint8 if width <= 8 else np.uint64), 0, 0
    while shift < width:
        bits = min(8, width - shift)
        size = -(-bits * count // 8)
        plane, step = data[at:at + size], _PIECE * bits // 8
        parts = [unpack(plane[j * step:(j + 1) * step], bits, 0, min(_PIECE, count - i))
                 for j, i in enumerate(range(0, count, _PIECE))]
        if parts:
            out |= np.concatenate(parts).astype(out.dtype) << out.dtype.type(shift)
        shift, at = shift + bits, at + size
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    """Reads a payload front to back; running past its end is a ModelError."""

    def __init__(self, data: np.ndarray, method: str):
        self.data, self.at, self.method = data, 0, method

    def fail(self, what: str):
        raise ModelError(f"corrupt {self.method!r} entropy-coded payload: {what}")

    def take(self, n: int) -> np.ndarray:
        if n < 0 or self.at + n > self.data.size:
            self.fail(f"truncated ({self.data.size} bytes, {self.at + n} needed)")
        self.at += n
        return self.data[self.at - n:self.at]

    def varint(self, limit: int = 2 ** 63) -> int:
        n = shift = 0
        for _ in range(10):
            byte = int(self.take(1)[0])
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if n > limit:
                    self.fail(f"a header value {n} is above {limit}")
                return n
        self.fail("a varint runs past 10 bytes")

    def rest(self) -> np.ndarray:
        return self.take(self.data.size - self.at)


def _as_bytes(symbols: np.ndarray) -> np.ndarray:
    return symbols.astype(symbols.dtype.newbyteorder("<"), copy=False).view(np.uint8)
