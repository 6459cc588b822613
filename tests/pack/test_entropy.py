"""Entropy coding of index streams (pack/entropy.py): every coder round-trips bit-exactly, Huffman sits between the
empirical entropy and entropy + 1 bit per symbol, rANS within 0.1 % of the entropy plus its lane states, the coders
beat bit packing on skewed streams, and a corrupt payload is a ModelError whatever is broken."""
import zlib

import numpy as np
import pytest

from smallify.errors import ConfigError, ModelError
from smallify.pack import entropy as E
from smallify.quant.packing import pack


def _skewed(n, k, seed=0, zeros=0.0):
    """Symbols of Gaussian weights rounded to k equal-width levels (a peaked histogram); ``zeros`` of them 0."""
    rng = np.random.default_rng(seed)
    s = np.clip(np.round(rng.standard_normal(n) * k / 6 + (k - 1) / 2), 0, k - 1)
    s[rng.random(n) < zeros] = 0
    return s.astype(np.uint8 if k <= 256 else np.uint16)


def _recrc(payload):
    """The payload with its checksum made to match again (to reach the structural checks behind it)."""
    body = payload[4:].tobytes()
    return np.frombuffer(zlib.crc32(body).to_bytes(4, "little") + body, np.uint8)


def _body_at(payload):
    """Offset of the method's body: after crc, item size and the two varints."""
    at = 5
    for _ in range(2):
        while payload[at] & 0x80:
            at += 1
        at += 1
    return at


CASES = {
    "empty": (np.zeros(0, np.uint8), 16),
    "one symbol": (np.full(1000, 3, np.uint8), 16),
    "alphabet 1": (np.zeros(77, np.uint8), 1),
    "alphabet 2": (np.random.default_rng(1).integers(0, 2, 999).astype(np.uint8), 2),
    "alphabet 5": (_skewed(3001, 5), 5),
    "alphabet 256": (np.random.default_rng(2).integers(0, 256, 5000).astype(np.uint8), 256),
    "skewed 256": (_skewed(5000, 256), 256),
    "uint16 alphabet 4096": (_skewed(20000, 4096), 4096),
    "uint16 small alphabet": (_skewed(3000, 16).astype(np.uint16), 16),
    "uint8 big alphabet": (_skewed(3000, 200), 1000),
    "many chunks": (_skewed(2048 * 9 + 17, 16, zeros=0.5), 16),
}


@pytest.mark.parametrize("method", E.METHODS)
@pytest.mark.parametrize("case", CASES)
def test_every_method_round_trips_bit_exactly(case, method):
    symbols, alphabet = CASES[case]
    payload = E.encode_as(method, symbols, alphabet)
    back = E.decode(method, payload, symbols.size, alphabet)
    assert back.dtype == symbols.dtype and np.array_equal(back, symbols)


def test_encode_keeps_the_smallest_payload():
    for case in ("empty", "alphabet 1", "alphabet 5", "skewed 256", "many chunks"):
        symbols, alphabet = CASES[case]
        method, payload = E.encode(symbols, alphabet)
        assert payload.size == min(E.encode_as(m, symbols, alphabet).size for m in E.METHODS)
        assert np.array_equal(E.decode(method, payload, symbols.size, alphabet), symbols)
    assert E.encode(CASES["alphabet 5"][0], 5, methods=("raw",))[0] == "raw"
    assert E.encode(_skewed(50_000, 16, zeros=0.9), 16, methods=E.FAST_METHODS)[0] == "rans"


def test_lockstep_chunks_with_a_short_last_one(monkeypatch):
    monkeypatch.setattr(E, "CHUNK_RANGE", (7, 7))
    monkeypatch.setattr(E, "MAX_CHUNKS", 5)
    for n in (1, 3, 7, 30, 100, 101, 104):        # 101: 21 symbols a chunk (at most 5 chunks), the last of 17
        symbols = _skewed(n, 16, seed=n)
        assert np.array_equal(E.decode("huffman", E.encode_as("huffman", symbols, 16), n, 16), symbols)


def test_raw_is_the_quant_packing_layout():
    symbols = _skewed(1001, 8)
    payload = E.encode_as("raw", symbols, 8)
    assert np.array_equal(payload[_body_at(payload):], pack(symbols, 3, 0))
    wide = _skewed(999, 4096)                      # 12 bits: a byte plane, then a 4-bit plane
    body = E.encode_as("raw", wide, 4096)
    assert body.size - _body_at(body) == 999 + 500
    for width in (1, 2, 4):                        # the fast unpacking path agrees with the packing
        s = np.random.default_rng(width).integers(0, 2 ** width, 1003).astype(np.uint8)
        assert np.array_equal(E._unpack_uint(pack(s, width, 0), width, 1003), s)


def test_entropy_bits_closed_form():
    assert E.entropy_bits(np.array([0, 0, 1, 1, 1, 1, 2, 2], np.uint8), 4) == pytest.approx(1.5, abs=1e-12)
    assert E.entropy_bits(np.arange(256, dtype=np.uint8).repeat(3), 256) == pytest.approx(8.0, abs=1e-12)
    assert E.entropy_bits(np.full(10, 7, np.uint16), 4096) == 0.0
    assert E.entropy_bits(np.zeros(0, np.uint8), 2) == 0.0


def _package_merge(freq, limit):
    """Reference: optimal length-limited code lengths (Larmore & Hirschberg's package-merge), for small alphabets."""
    leaves = sorted((int(f), (i,)) for i, f in enumerate(freq))
    items = list(leaves)
    for _ in range(limit - 1):
        packages = [(items[i][0] + items[i + 1][0], items[i][1] + items[i + 1][1]) for i in range(0, len(items) - 1, 2)]
        items = sorted(leaves + packages, key=lambda x: x[0])
    chosen = [s for _, syms in items[:2 * len(freq) - 2] for s in syms]
    return np.bincount(chosen, minlength=len(freq))


def test_huffman_lengths_are_optimal_and_limited():
    freq = np.array([45, 13, 12, 16, 9, 5])        # the textbook example: lengths 1, 3, 3, 3, 4, 4 (224 bits)
    lengths = E.huffman_lengths(freq)
    assert (lengths * freq).sum() == 224 and sorted(lengths) == [1, 3, 3, 3, 4, 4]
    fib = np.array([1, 1] + [0] * 28)              # Fibonacci counts: the unlimited code is 29 bits deep
    for i in range(2, 30):
        fib[i] = fib[i - 1] + fib[i - 2]
    free, limited = E.huffman_lengths(fib, 64), E.huffman_lengths(fib)
    assert free.max() == 29 and limited.max() == 16
    assert sum(2.0 ** -limited) == 1.0             # still a complete prefix code
    best = (_package_merge(fib, 16) * fib).sum()  # the optimal 16-bit-limited code: 5,702,866 bits
    assert best <= (limited * fib).sum() <= 1.001 * best            # the JPEG rule costs 0.09 % here
    symbols = np.repeat(np.arange(30, dtype=np.uint8), fib)        # 2.2 M symbols, 16-bit codes
    assert np.array_equal(E.decode("huffman", E.encode_as("huffman", symbols, 30), symbols.size, 30), symbols)


@pytest.mark.parametrize("k,zeros", [(16, 0.0), (16, 0.9), (4, 0.0), (4, 0.9), (256, 0.0)])
def test_huffman_size_between_entropy_and_entropy_plus_one(k, zeros):
    symbols = _skewed(100_000, k, zeros=zeros)
    n, h = symbols.size, E.entropy_bits(symbols, k)
    payload = E.encode_as("huffman", symbols, k)
    chunks = -(-n // E._chunk_length(n))
    header = 32 + -(-5 * k // 8) + 3 * chunks    # checksum, varints, 5-bit code lengths, chunk bit lengths
    assert h * n / 8 <= payload.size <= (h + 1) * n / 8 + header


def test_skewed_streams_beat_bit_packing():
    gauss, pruned = _skewed(200_000, 16), _skewed(200_000, 16, zeros=0.9)
    raw = E.encode_as("raw", gauss, 16).size
    assert raw == 9 + 100_000                       # 4 bits per symbol plus the 9-byte header
    assert E.encode_as("huffman", gauss, 16).size < 0.875 * raw      # entropy 3.46 bits: 0.865 of 4
    assert E.encode_as("zstd-bytes", gauss, 16).size < 0.875 * raw
    assert E.encode_as("huffman", pruned, 16).size < 0.35 * raw      # entropy 0.82 bits, Huffman takes >= 1
    for m in ("zstd-packed", "zstd-bytes", "lzma-packed"):           # below Huffman's 1 bit per symbol
        assert E.encode_as(m, pruned, 16).size < 0.27 * raw
    uniform = np.random.default_rng(0).integers(0, 16, 200_000).astype(np.uint8)
    assert E.encode(uniform, 16)[0] == "raw"


def test_bad_input_to_encode_is_a_config_error():
    for symbols, alphabet in [(np.zeros(4, np.float32), 16), (np.zeros((2, 2), np.uint8), 16),
                              (np.array([16], np.uint8), 16), (np.zeros(4, np.uint8), 0),
                              (np.zeros(4, np.uint8), 2 ** 16 + 1), ([1, 2], 16)]:
        with pytest.raises(ConfigError):
            E.encode(symbols, alphabet)
    with pytest.raises(ConfigError, match="unknown"):
        E.encode_as("arith", np.zeros(4, np.uint8), 16)


@pytest.mark.parametrize("method", E.METHODS)
def test_corrupt_payloads_are_model_errors(method):
    symbols = _skewed(5000, 16, zeros=0.3)
    payload = E.encode_as(method, symbols, 16)
    flipped = payload.copy()
    flipped[-1] ^= 0x10
    for bad, count, alphabet, message in [
            (flipped, 5000, 16, "checksum"), (payload[:-1], 5000, 16, "checksum"), (payload[:3], 5000, 16, "truncated"),
            (payload, 4999, 16, "4999 of 16 expected"), (payload, 5000, 17, "5000 of 17 expected"),
            (_recrc(payload[:-1]), 5000, 16, None),
            (_recrc(np.concatenate([payload, [0]]).astype(np.uint8)), 5000, 16, None),
            (payload.astype(np.int16), 5000, 16, "uint8"), (payload, -1, 16, "count"), (payload, 5000, 0, "alphabet")]:
        with pytest.raises(ModelError, match=message):
            E.decode(method, bad, count, alphabet)
    with pytest.raises(ModelError, match="unknown"):
        E.decode("arith", payload, 5000, 16)


def test_symbols_outside_the_alphabet_are_model_errors():
    symbols = np.array([0, 4, 7, 2], np.uint8)      # packed at 3 bits: 7 fits the bits, not an alphabet of 5
    for method in ("raw", "zstd-packed", "zstd-bytes", "lzma-packed"):
        payload = E.encode_as(method, symbols, 8).copy()
        payload[5] = 5                               # the alphabet varint: 8 -> 5 (same 3 bits per symbol)
        with pytest.raises(ModelError, match="outside the alphabet of 5"):
            E.decode(method, _recrc(payload), 4, 5)


def test_broken_huffman_headers_are_model_errors():
    symbols = _skewed(10_000, 16)
    payload = E.encode_as("huffman", symbols, 16)
    at = _body_at(payload)
    top = int(payload[at])

    def broken(offset, value):
        p = payload.copy()
        p[at + offset] = value
        return _recrc(p)
    lengths = np.full(16, 1, np.int64)              # sixteen 1-bit codes: Kraft sum 8
    lengths[0] = top
    kraft = np.concatenate([payload[:at + 1], E._pack_uint(lengths, 5), payload[at + 11:]])
    chunk_at = at + 11                               # the chunk length varint (10000 symbols -> 256 a chunk: 2 bytes)
    for bad, message in [(broken(0, 17), "outside 1..16"), (broken(0, top - 1), "maximum"),
                         (_recrc(kraft), "Kraft"), (broken(11, 0), "chunk length 0"),
                         (broken(12, 0x7F), "chunk length 16256 is outside 1..10000"),
                         (_recrc(payload[:-1]), "bytes of codes")]:
        with pytest.raises(ModelError, match=message):
            E.decode("huffman", bad, 10_000, 16)
    assert E._chunk_length(10_000) == 256 and list(payload[chunk_at:chunk_at + 2]) == [0x80, 2]


@pytest.mark.parametrize("method", E.METHODS)
def test_random_corruption_never_escapes_as_another_error(method):
    rng = np.random.default_rng(3)
    symbols = _skewed(6000, 16, zeros=0.5)
    payload = E.encode_as(method, symbols, 16)
    for _ in range(150):
        bad = payload.copy()
        where = rng.integers(4, bad.size, rng.integers(1, 4))
        bad[where] = rng.integers(0, 256, where.size)
        try:
            back = E.decode(method, _recrc(bad), 6000, 16)
        except ModelError:
            continue
        assert back.shape == (6000,) and back.dtype == np.uint8 and back.max() < 16


def test_swapped_chunk_bit_lengths_are_model_errors():
    symbols = _skewed(10_000, 16, zeros=0.5)         # 40 chunks of 256 symbols, of different bit lengths
    payload = E.encode_as("huffman", symbols, 16)
    r = E._Reader(payload, "huffman")
    r.take(_body_at(payload) + 1 + 10)               # header, longest length, 16 code lengths at 5 bits
    r.varint(), r.varint()                           # chunk length, base
    width = int(r.take(1)[0])
    size = E._packed_size(40, width)
    excess = E._unpack_uint(payload[r.at:r.at + size], width, 40)
    i = int(np.flatnonzero(excess != excess[0])[0])
    excess[[0, i]] = excess[[i, 0]]                  # same total, same byte count: only the chunk ends move
    bad = np.concatenate([payload[:r.at], E._pack_uint(excess, width), payload[r.at + size:]])
    with pytest.raises(ModelError, match="do not end where its bit length says"):
        E.decode("huffman", _recrc(bad), 10_000, 16)


def test_rans_frequencies_sum_to_the_precision():
    assert E.rans_frequencies(np.array([1, 1, 2, 0])).tolist() == [16384, 16384, 32768, 0]
    counts = np.array([10 ** 9, 1, 0, 1, 3])         # rare symbols keep a slot, the rounding goes to the big one
    f = E.rans_frequencies(counts)
    assert f.sum() == 2 ** 16 and f.tolist() == [65533, 1, 0, 1, 1]
    assert E.rans_frequencies(np.array([0, 5, 0])).tolist() == [0, 65536, 0]


@pytest.mark.parametrize("k,zeros", [(16, 0.0), (16, 0.9), (4, 0.9), (256, 0.0)])
def test_rans_size_is_the_entropy_plus_its_lane_states(k, zeros):
    symbols = _skewed(200_000, k, zeros=zeros)
    n, h = symbols.size, E.entropy_bits(symbols, k)
    lanes = -(-n // E._rans_chunk(n))
    header = 32 + -(-17 * k // 8) + 8 * lanes + 3 * lanes   # table at 17 bits, a 64-bit state a lane, word counts
    size = E.encode_as("rans", symbols, k).size
    assert h * n / 8 <= size <= 1.001 * h * n / 8 + 4 * lanes + header   # 0.1 % + a partly used last word a lane
    if zeros:                                          # entropy well below 1 bit: Huffman cannot follow
        assert size < 0.7 * E.encode_as("huffman", symbols, k).size


def test_broken_rans_payloads_are_model_errors():
    symbols = _skewed(10_000, 4, zeros=0.5)
    payload = E.encode_as("rans", symbols, 4)
    at = _body_at(payload)
    lanes = -(-10_000 // E._rans_chunk(10_000))
    states = at + 1 + E._packed_size(4, 17) + 2         # precision, table, chunk varint (800: 2 bytes)
    assert E._rans_chunk(10_000) == 800 and lanes == 13
    r = E._Reader(payload, "rans")
    r.take(states + 8 * lanes)
    r.varint()
    width = int(r.take(1)[0])
    count_at, size = r.at, E._packed_size(lanes, width)
    excess = E._unpack_uint(payload[count_at:count_at + size], width, lanes)
    i = int(np.flatnonzero(excess != excess[0])[0])
    excess[[0, i]] = excess[[i, 0]]                  # same words, assigned to other lanes
    swapped = np.concatenate([payload[:count_at], E._pack_uint(excess, width), payload[count_at + size:]])
    low_state = payload.copy()
    low_state[states:states + 8] = 0                 # the first lane's state 0, below 2**31
    table = payload.copy()
    table[at + 1] ^= 1                               # the first frequency off by one
    for bad, message in [(swapped, "does not end in the encoder's first state"), (low_state, "outside"),
                         (table, "sum to"), (payload[:-4], "bytes of words")]:
        with pytest.raises(ModelError, match=message):
            E.decode("rans", _recrc(bad), 10_000, 4)
