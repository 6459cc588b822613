"""Interleaved rANS (range asymmetric numeral systems) coding of a symbol stream, the coder that came closest to the
entropy on every skewed index stream measured (``pack/entropy.py`` picks it when it is the smallest).

Body: the frequency precision P (1 byte), every symbol's frequency at P + 1 bits, the lane chunk length (varint),
each lane's final 64-bit state, then the number of 32-bit words each lane wrote (a varint base, a width byte and
the packed excesses), then the words. The lanes are decoded in lockstep: one vectorized step per symbol of a lane.
"""
from __future__ import annotations

import math

import numpy as np

from smallify.pack.bitio import _pack_uint, _packed_size, _Reader, _unpack_uint, _varint

RANS_PRECISION = 16                  # symbol frequencies are quantized to sum 2**16
RANS_LANES = 2048                    # rANS lanes coded in lockstep, at most
_RANS_LOW = 1 << 31                  # 64-bit states live in [2**31, 2**63); 32-bit words are moved out and in


def rans_frequencies(counts: np.ndarray, precision: int = RANS_PRECISION) -> np.ndarray:
    """``counts`` scaled to integers that sum to 2**precision, every present symbol at least 1."""
    total, scale = int(counts.sum()), 1 << precision
    f = counts * scale // max(total, 1)
    f[(counts > 0) & (f == 0)] = 1
    order = np.argsort(-counts, kind="stable")
    while f.sum() != scale:                       # give the rounding slack to, or take it from, the most frequent
        diff = scale - int(f.sum())
        if diff > 0:
            f[order[0]] += diff
        else:
            big = order[f[order] > 1][:-diff]
            f[big] -= 1
    return f


def _rans_chunk(count: int) -> int:
    """Symbols a lane: ~8 sqrt(count) within 256..8192, and at most RANS_LANES lanes (each costs an 8-byte state;
    the decode loop runs once per symbol of a lane)."""
    return max(1, min(count, max(-(-count // RANS_LANES), min(8192, max(256, math.ceil(8 * math.sqrt(count)))))))


def _encode_rans(symbols: np.ndarray, alphabet: int) -> bytes:
    """Interleaved rANS (64-bit states, 32-bit renormalization): chunk j of the symbols is coded by lane j, all
    lanes in lockstep, last symbol first (so the decoder reads forwards)."""
    count = symbols.size
    if count == 0:
        return bytes([0])
    counts = np.bincount(symbols, minlength=alphabet)
    freq = rans_frequencies(counts)
    start = (np.cumsum(freq) - freq).astype(np.uint64)
    chunk = _rans_chunk(count)
    chunks = -(-count // chunk)
    grid = np.zeros(chunks * chunk, np.int32)
    grid[:count] = symbols
    grid = np.ascontiguousarray(grid.reshape(chunks, chunk).T)     # (chunk, chunks): step t of every lane
    last = count - chunk * (chunks - 1)
    f64 = freq.astype(np.uint64)
    x = np.full(chunks, _RANS_LOW, np.uint64)
    words = np.zeros((chunk, chunks), np.uint32)
    moved = np.zeros((chunk, chunks), bool)
    b = np.uint64(RANS_PRECISION)
    for t in range(chunk - 1, -1, -1):
        n = chunks if t < last else chunks - 1
        s = grid[t, :n]
        f, xs = f64[s], x[:n]
        out = xs >= (f << np.uint64(63 - RANS_PRECISION))          # x would leave [L, 2**63): move 32 bits out
        words[t, :n] = np.where(out, xs & np.uint64(0xFFFFFFFF), 0)
        moved[t, :n] = out
        xs = np.where(out, xs >> np.uint64(32), xs)
        x[:n] = ((xs // f) << b) + xs % f + start[s]
    per_lane = moved.sum(0)
    base = int(per_lane.min())
    width = int(per_lane.max() - base).bit_length()
    head = bytes([RANS_PRECISION]) + _pack_uint(freq, RANS_PRECISION + 1).tobytes() + _varint(chunk) \
        + x.astype("<u8").tobytes() + _varint(base) + bytes([width]) + _pack_uint(per_lane - base, width).tobytes()
    return head + words.T[moved.T].astype("<u4").tobytes()


def _decode_rans(r: _Reader, count: int, alphabet: int) -> np.ndarray:
    precision = int(r.take(1)[0])
    if count == 0:
        if precision or r.rest().size:
            r.fail("a payload of 0 symbols holds codes")
        return np.zeros(0, np.int64)
    if precision != RANS_PRECISION:
        r.fail(f"frequency precision {precision} is not {RANS_PRECISION}")
    freq = _unpack_uint(r.take(_packed_size(alphabet, precision + 1)), precision + 1, alphabet).astype(np.int64)
    if freq.sum() != 1 << precision:
        r.fail(f"the frequencies sum to {freq.sum()}, not {1 << precision}")
    chunk = r.varint()
    if not 1 <= chunk <= count:
        r.fail(f"chunk length {chunk} is outside 1..{count}")
    chunks = -(-count // chunk)
    x = r.take(8 * chunks).view("<u8").astype(np.uint64)
    if ((x < _RANS_LOW) | (x >= np.uint64(1 << 63))).any():
        r.fail("a lane's state is outside [2**31, 2**63)")
    base, width = r.varint(2 ** 48), int(r.take(1)[0])
    if width > 48:
        r.fail(f"word-count width {width} is above 48 bits")
    per_lane = _unpack_uint(r.take(_packed_size(chunks, width)), width, chunks).astype(np.int64) + base
    data = r.rest()
    if data.size != 4 * int(per_lane.sum()) or (per_lane > chunk).any():
        r.fail(f"{data.size} bytes of words, {4 * int(per_lane.sum())} expected")
    words = np.concatenate([data.view("<u4"), np.zeros(chunk + 1, np.uint32)]).astype(np.uint64)  # pad: see ptr
    ends = np.cumsum(per_lane)
    ptr = ends - per_lane
    slot_symbol = np.repeat(np.arange(alphabet), freq)
    f64, start = freq.astype(np.uint64), (np.cumsum(freq) - freq).astype(np.uint64)
    b, mask = np.uint64(precision), np.uint64((1 << precision) - 1)
    out = np.empty((chunk, chunks), np.int32)
    last = count - chunk * (chunks - 1)
    for t in range(chunk):
        if t == last:                                     # the last lane is done
            if x[-1] != _RANS_LOW or ptr[-1] != ends[-1]:
                r.fail("the last lane does not end in the encoder's first state")
            x, ptr = x[:-1], ptr[:-1]
        slot = x & mask
        s = slot_symbol[slot]
        out[t, :x.size] = s
        x = f64[s] * (x >> b) + slot - start[s]
        need = np.flatnonzero(x < _RANS_LOW)
        x[need] = (x[need] << np.uint64(32)) | words[ptr[need]]
        ptr[need] += 1
    if last < chunk:
        out[last:, -1] = 0
    if (x != _RANS_LOW).any() or not np.array_equal(ptr, ends[:ptr.size]):
        r.fail("a lane does not end in the encoder's first state")
    return out.T.ravel()[:count]
