"""Entropy coding of the index streams a weight-shared model stores (Deep Compression's last stage).

``encode`` tries every coder and keeps the smallest payload; ``decode`` is its bit-exact inverse and checks
everything it reads, so a corrupt or truncated payload is a ``ModelError``, never an ``IndexError`` or a hang.

Every payload starts with the same header: crc32 of the rest (4 bytes, little-endian), the symbols' item size
(1 byte: 1 = uint8, 2 = uint16), then the alphabet and the symbol count as LEB128 varints. The body that follows:

- ``raw``: the symbols bit-packed at ceil(log2 alphabet) bits (``smallify.quant.packing``; above 8 bits, the low
  bytes of all symbols first, then their remaining high bits).
- ``huffman``: a canonical Huffman code whose lengths are limited to 16 bits. Body: the longest length L (1 byte),
  every symbol's code length at 5 bits, the chunk length C (varint), then the bit length of each of the
  ceil(count / C) chunks (a varint base plus a width byte and the packed excesses over the base), then the codes,
  first bit first, little-endian bit order. Chunks are decoded in lockstep: one vectorized table lookup (L-bit
  window -> symbol, length) per step, so the Python loop runs C times, not count times.
- ``rans``: interleaved rANS (Duda's asymmetric numeral systems; 64-bit states, 32-bit words, frequencies
  quantized to 2**16): within ~0.01 bit a symbol of the empirical entropy, where Huffman needs up to 1 bit more
  (and at least 1 bit a symbol: a pruned stream's dominant zero). Body: precision (1 byte), every symbol's
  frequency at 17 bits, the lane length (varint), each lane's final state (8 bytes), the 32-bit words moved out of
  each lane (base + packed excesses, as Huffman's chunk bit lengths), then the words, lane after lane.
- ``zstd-packed`` / ``zstd-bytes``: zstd level 19 of the bit-packed bytes / of the symbols one item per symbol.
- ``lzma-packed``: raw LZMA2 (preset 9 extreme, no literal context: the symbols are nearly independent) of the
  bit-packed bytes; of one byte per symbol it never won in our measurements, so it is not tried.
"""
from __future__ import annotations

import heapq
import lzma
import math
import zlib

import numpy as np

from smallify.errors import ConfigError, ModelError
from smallify.pack.bitio import (
    _PIECE,
    _as_bytes,
    _bits_for,
    _pack_uint,
    _packed_size,
    _Reader,
    _unpack_uint,
    _varint,
)
from smallify.pack.rans import (  # noqa: F401  (rans_frequencies, _rans_chunk: this module's API and tests use them)
    RANS_LANES,
    RANS_PRECISION,
    _decode_rans,
    _encode_rans,
    _rans_chunk,
    rans_frequencies,
)

MAX_CODE_LENGTH = 16                 # longest Huffman code; the decode table has 2**L entries
MAX_ALPHABET = 2 ** 16
MAX_CHUNKS = 4096                    # Huffman chunks decoded in lockstep, at most
CHUNK_RANGE = (256, 2048)            # symbols per chunk ~ 2 sqrt(count) within these (each chunk costs ~1 byte of
                                     # header; the decode loop runs once per symbol of a chunk)
ZSTD_LEVEL = 19
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 0, "lp": 0, "pb": 0}]


# --------------------------------------------------------------------------------------------------- Huffman

def huffman_lengths(freq: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Code length of each symbol (0 for absent ones) of a Huffman code for ``freq``, limited to ``max_length``
    bits by the JPEG rule (Annex K.3: move pairs of over-long codes up, keeping the Kraft sum 1). A single
    present symbol gets length 1."""
    present = np.flatnonzero(freq)
    lengths = np.zeros(freq.size, np.int64)
    if present.size <= 1:
        lengths[present] = 1
        return lengths
    heap = [(int(freq[s]), i) for i, s in enumerate(present)]
    heapq.heapify(heap)
    parent = list(range(present.size))            # node -> parent; leaves are 0..n-1
    while len(heap) > 1:
        (fa, a), (fb, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent.append(len(parent))
        parent[a] = parent[b] = len(parent) - 1
        heapq.heappush(heap, (fa + fb, len(parent) - 1))
    depth = [0] * len(parent)
    for node in range(len(parent) - 2, -1, -1):   # parents come after their children
        depth[node] = depth[parent[node]] + 1
    leaf = np.array(depth[:present.size], np.int64)
    count = np.bincount(leaf, minlength=max(max_length, int(leaf.max())) + 1)
    for i in range(count.size - 1, max_length, -1):
        while count[i] > 0:
            j = i - 2
            while count[j] == 0:
                j -= 1
            count[i] -= 2
            count[i - 1] += 1
            count[j + 1] += 2
            count[j] -= 1
    order = present[np.lexsort((present, -freq[present]))]      # most frequent first
    lengths[order] = np.repeat(np.arange(count.size), count)
    return lengths


def _canonical(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes for ``lengths``, bit-reversed so the code's first bit is the value's least significant."""
    codes = np.zeros(lengths.size, np.int64)
    code, prev = 0, 0
    for s in np.lexsort((np.arange(lengths.size), lengths)):
        n = int(lengths[s])
        if n == 0:
            continue
        code <<= n - prev
        codes[s] = int(format(code, f"0{n}b")[::-1], 2)
        code, prev = code + 1, n
    return codes


def _huffman_bits(symbols: np.ndarray, lengths: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Concatenate every symbol's code, first bit first, into little-endian bytes (vectorized, in pieces)."""
    width = int(lengths.max())
    shifts = np.arange(width)
    out, carry = [], np.zeros(0, np.uint8)
    for i in range(0, symbols.size, _PIECE):
        s = symbols[i:i + _PIECE]
        n, c = lengths[s], codes[s]
        bits = ((c[:, None] >> shifts) & 1).astype(np.uint8)[shifts < n[:, None]]   # row-major: stream order
        bits = np.concatenate([carry, bits])
        whole = bits.size - bits.size % 8
        out.append(np.packbits(bits[:whole], bitorder="little"))
        carry = bits[whole:]
    out.append(np.packbits(carry, bitorder="little"))
    return np.concatenate(out)


def _chunk_length(count: int) -> int:
    low, high = CHUNK_RANGE
    return max(1, min(count, max(-(-count // MAX_CHUNKS), min(high, max(low, math.ceil(2 * math.sqrt(count)))))))


def _encode_huffman(symbols: np.ndarray, alphabet: int) -> bytes:
    if symbols.size == 0:
        return bytes([0])
    sym = symbols.astype(np.intp)
    lengths = huffman_lengths(np.bincount(sym, minlength=alphabet))
    codes = _canonical(lengths)
    chunk = _chunk_length(sym.size)
    sizes = np.add.reduceat(lengths.astype(np.uint8)[sym], np.arange(0, sym.size, chunk), dtype=np.int64)
    base = int(sizes.min())
    width = int(sizes.max() - base).bit_length()
    head = bytes([int(lengths.max())]) + _pack_uint(lengths, 5).tobytes() + _varint(chunk) + _varint(base) \
        + bytes([width]) + _pack_uint(sizes - base, width).tobytes()
    return head + _huffman_bits(sym, lengths, codes).tobytes()


def _decode_huffman(r: _Reader, count: int, alphabet: int) -> np.ndarray:
    top = int(r.take(1)[0])
    if count == 0:
        if top or r.rest().size:
            r.fail("a payload of 0 symbols holds codes")
        return np.zeros(0, np.int64)
    if not 1 <= top <= MAX_CODE_LENGTH:
        r.fail(f"longest code length {top} is outside 1..{MAX_CODE_LENGTH}")
    lengths = _unpack_uint(r.take(_packed_size(alphabet, 5)), 5, alphabet).astype(np.int64)
    if lengths.max() != top:
        r.fail(f"the code lengths' maximum {lengths.max()} is not the stated {top}")
    if int((np.left_shift(1, top - lengths[lengths > 0])).sum()) > 2 ** top:
        r.fail("the code lengths break the Kraft inequality")
    chunk = r.varint()
    if not 1 <= chunk <= count:
        r.fail(f"chunk length {chunk} is outside 1..{count}")
    chunks = -(-count // chunk)
    base, width = r.varint(2 ** 48), int(r.take(1)[0])
    if width > 48:
        r.fail(f"chunk-size width {width} is above 48 bits")
    sizes = _unpack_uint(r.take(_packed_size(chunks, width)), width, chunks).astype(np.int64) + base
    per = np.full(chunks, chunk, np.int64)
    per[-1] = count - chunk * (chunks - 1)                # symbols in each chunk
    shortest = int(lengths[lengths > 0].min())
    if ((sizes < per * shortest) | (sizes > per * top)).any():
        r.fail("a chunk's bit length does not fit its symbol count")
    ends = np.cumsum(sizes)
    data = r.rest()
    if data.size != -(-int(ends[-1]) // 8):
        r.fail(f"{data.size} bytes of codes, {-(-int(ends[-1]) // 8)} expected")
    # lookup table: every top-bit window -> (symbol, code length); windows no code starts: (alphabet, 0)
    table_sym = np.full(2 ** top, alphabet, np.int32)
    table_len = np.zeros(2 ** top, np.int64)
    codes = _canonical(lengths)
    for s in np.flatnonzero(lengths):
        table_sym[codes[s]::1 << int(lengths[s])] = s
        table_len[codes[s]::1 << int(lengths[s])] = lengths[s]
    # 24-bit little-endian words at every byte: a window starting at bit p is (word[p >> 3] >> (p & 7)) & mask;
    # the zero padding covers any run a corrupt chunk takes past its end (at most chunk * top bits)
    pad = np.zeros(chunk * top // 8 + 4, np.uint8)
    b = np.concatenate([data, pad]).astype(np.uint32)
    word = b[:-2] | (b[1:-1] << 8) | (b[2:] << 16)
    pos = ends - sizes
    mask = 2 ** top - 1
    out = np.empty((chunk, chunks), np.int32)
    last = int(per[-1])
    for t in range(chunk):
        if t == last:                                     # the last chunk is done: go on with the others
            if pos[-1] != ends[-1]:
                r.fail("the last chunk's codes do not end where its bit length says")
            pos = pos[:-1]
        window = (word[pos >> 3] >> (pos & 7).astype(np.uint32)) & mask
        out[t, :pos.size] = table_sym[window]
        pos = pos + table_len[window]
    if last < chunk:
        out[last:, -1] = 0
    if not np.array_equal(pos, ends[:pos.size]):
        r.fail("a chunk's codes do not end where its bit length says")
    return out.T.ravel()[:count]         # a window no code starts decodes to ``alphabet``: decode rejects it


# --------------------------------------------------------------------------------------------------- coders

def _zstd_encode(data: np.ndarray) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data.tobytes())


def _zstd_decode(r: _Reader, size: int) -> np.ndarray:
    import zstandard
    data = r.rest().tobytes()
    try:
        stated = zstandard.frame_content_size(data)
        if stated != size:
            r.fail(f"the zstd frame holds {stated} bytes, {size} expected")
        d = zstandard.ZstdDecompressor().decompressobj()
        out = d.decompress(data)
        ok = d.eof and not d.unused_data and len(out) == size
    except zstandard.ZstdError as e:
        r.fail(f"zstd: {e}")
    if not ok:
        r.fail(f"the zstd frame is incomplete or followed by data ({size} bytes expected)")
    return np.frombuffer(out, np.uint8)


def _lzma_encode(data: np.ndarray) -> bytes:
    return lzma.compress(data.tobytes(), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


def _lzma_decode(r: _Reader, size: int) -> np.ndarray:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    try:
        out = d.decompress(r.rest().tobytes(), max_length=size + 1)
    except lzma.LZMAError as e:
        r.fail(f"lzma: {e}")
    if len(out) != size or not d.eof or d.unused_data:
        r.fail(f"the lzma stream holds {len(out)}{'+' if not d.eof else ''} bytes, {size} expected")
    return np.frombuffer(out, np.uint8)


def _from_packed(data: np.ndarray, count: int, alphabet: int) -> np.ndarray:
    return _unpack_uint(data, _bits_for(alphabet), count)


def _from_items(data: np.ndarray, itemsize: int) -> np.ndarray:
    return data.view("<u2") if itemsize == 2 else data


_ENCODERS = {
    "raw": lambda s, a: _pack_uint(s, _bits_for(a)).tobytes(),
    "huffman": _encode_huffman,
    "rans": _encode_rans,
    "zstd-packed": lambda s, a: _zstd_encode(_pack_uint(s, _bits_for(a))),
    "zstd-bytes": lambda s, a: _zstd_encode(_as_bytes(s)),
    "lzma-packed": lambda s, a: _lzma_encode(_pack_uint(s, _bits_for(a))),
}
METHODS = tuple(_ENCODERS)
FAST_METHODS = ("raw", "huffman", "rans", "zstd-packed")   # ~10x faster to encode: zstd-bytes and lzma-packed
                                                             # take ~45 s and ~10 s a 20 M-symbol stream


def _decode_body(method: str, r: _Reader, count: int, alphabet: int, itemsize: int) -> np.ndarray:
    packed, items = _packed_size(count, _bits_for(alphabet)), count * itemsize
    if method == "raw":
        if r.data.size - r.at != packed:
            r.fail(f"{r.data.size - r.at} bytes of packed symbols, {packed} expected")
        return _from_packed(r.take(packed), count, alphabet)
    if method == "huffman":
        return _decode_huffman(r, count, alphabet)
    if method == "rans":
        return _decode_rans(r, count, alphabet)
    if method == "zstd-packed":
        return _from_packed(_zstd_decode(r, packed), count, alphabet)
    if method == "zstd-bytes":
        return _from_items(_zstd_decode(r, items), itemsize)
    return _from_packed(_lzma_decode(r, packed), count, alphabet)      # lzma-packed


# --------------------------------------------------------------------------------------------------- API

def _check_alphabet(alphabet, error) -> int:
    if isinstance(alphabet, bool) or not isinstance(alphabet, (int, np.integer)) or \
            not 1 <= alphabet <= MAX_ALPHABET:
        raise error(f"alphabet={alphabet!r} is not a symbol count; accepted: an int in 1..{MAX_ALPHABET}")
    return int(alphabet)


def _check_symbols(symbols, alphabet) -> tuple[np.ndarray, int]:
    if not isinstance(symbols, np.ndarray) or symbols.ndim != 1 or symbols.dtype not in (np.uint8, np.uint16):
        what = f"{symbols.dtype} array of shape {symbols.shape}" if isinstance(symbols, np.ndarray) \
            else type(symbols).__name__
        raise ConfigError(f"symbols is a {what}; accepted: a 1-D uint8 or uint16 numpy array")
    alphabet = _check_alphabet(alphabet, ConfigError)
    if symbols.size and int(symbols.max()) >= alphabet:
        raise ConfigError(f"symbol {int(symbols.max())} is outside the alphabet of {alphabet} (0..{alphabet - 1})")
    return symbols, alphabet


def entropy_bits(symbols: np.ndarray, alphabet: int) -> float:
    """Empirical Shannon entropy of ``symbols`` in bits per symbol (0.0 for an empty or constant stream)."""
    symbols, alphabet = _check_symbols(symbols, alphabet)
    if symbols.size == 0:
        return 0.0
    p = np.bincount(symbols, minlength=alphabet) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def encode_as(method: str, symbols: np.ndarray, alphabet: int) -> np.ndarray:
    """The payload of ``symbols`` coded with one ``method`` (one of ``METHODS``)."""
    symbols, alphabet = _check_symbols(symbols, alphabet)
    if method not in _ENCODERS:
        raise ConfigError(f"entropy coder {method!r} is unknown; accepted: {', '.join(METHODS)}")
    body = bytes([symbols.dtype.itemsize]) + _varint(alphabet) + _varint(symbols.size) \
        + _ENCODERS[method](symbols, alphabet)
    return np.frombuffer(zlib.crc32(body).to_bytes(4, "little") + body, np.uint8)


def encode(symbols: np.ndarray, alphabet: int, methods: tuple[str, ...] = METHODS) -> tuple[str, np.ndarray]:
    """(method, payload) of the smallest of ``methods``' payloads for ``symbols`` (1-D uint8 or uint16, every value
    < ``alphabet``); ties go to the earlier method (raw first: the fastest to decode). ``FAST_METHODS`` skips the
    slow level-19 zstd of one byte a symbol and lzma, which rANS beat on every skewed stream we measured."""
    best = None
    for method in methods:
        payload = encode_as(method, symbols, alphabet)
        if best is None or payload.size < best[1].size:
            best = (method, payload)
    if best is None:
        raise ConfigError(f"methods={methods!r} is empty; accepted: some of {', '.join(METHODS)}")
    return best


def decode(method: str, payload: np.ndarray, count: int, alphabet: int) -> np.ndarray:
    """Inverse of ``encode``: the ``count`` symbols, bit-exact and of the dtype they were encoded from. A payload
    that is corrupt, truncated, of another count or alphabet, or of an unknown method is a ``ModelError``."""
    if method not in _ENCODERS:
        raise ModelError(f"entropy coder {method!r} is unknown; accepted: {', '.join(METHODS)}")
    if not isinstance(payload, np.ndarray) or payload.dtype != np.uint8 or payload.ndim != 1:
        raise ModelError(f"the {method!r} payload is not a 1-D uint8 array")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ModelError(f"symbol count {count!r} is not a non-negative int")
    alphabet = _check_alphabet(alphabet, ModelError)
    r = _Reader(payload, method)
    crc = int.from_bytes(r.take(4).tobytes(), "little")
    if zlib.crc32(payload[4:].tobytes()) != crc:
        r.fail("checksum mismatch")
    itemsize = int(r.take(1)[0])
    if itemsize not in (1, 2):
        r.fail(f"item size {itemsize} is not 1 or 2")
    stated_alphabet, stated_count = r.varint(), r.varint()
    if (stated_alphabet, stated_count) != (alphabet, count):
        r.fail(f"it holds {stated_count} symbols of an alphabet of {stated_alphabet}, "
               f"{count} of {alphabet} expected")
    symbols = _decode_body(method, r, count, alphabet, itemsize)
    if r.at != payload.size:
        r.fail(f"{payload.size - r.at} bytes are left after the symbols")
    limit = min(alphabet, 256 ** itemsize)
    if count and int(symbols.max()) >= limit:
        r.fail(f"symbol {int(symbols.max())} is outside the alphabet of {limit}")
    return symbols.astype(np.uint8 if itemsize == 1 else np.uint16)
