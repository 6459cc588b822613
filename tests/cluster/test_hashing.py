"""HashedNets: the hash against an independent MurmurHash3 and pinned values, the bucket gradients against a
manual scatter-add, the least-squares init against torch.linalg.lstsq, and the save -> rebuild -> load round
trip (bit for bit)."""
import io
import struct
import zlib

import pytest
import torch
from torch import nn

from smallify.cluster.hashing import (
    HashedConv2d,
    HashedLinear,
    HashShare,
    bucket_count,
    hash_index,
    hash_share,
    hashed_layers,
    layer_seed,
    murmur3,
    project,
    rebuild_hashed,
)
from smallify.errors import ConfigError, ModelError


def murmur3_reference(data: bytes, seed: int) -> int:
    """MurmurHash3_x86_32 in plain Python integers (Appleby's reference, byte by byte)."""
    m = 0xFFFFFFFF
    rotl = lambda x, r: ((x << r) | (x >> (32 - r))) & m
    h, n = seed & m, len(data) // 4
    for (k,) in struct.iter_unpack("<I", data[:4 * n]):
        k = rotl(k * 0xCC9E2D51 & m, 15) * 0x1B873593 & m
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & m
    tail = data[4 * n:]
    if tail:
        k = int.from_bytes(tail, "little")
        h ^= rotl(k * 0xCC9E2D51 & m, 15) * 0x1B873593 & m
    h ^= len(data)
    h ^= h >> 16
    h = h * 0x85EBCA6B & m
    h ^= h >> 13
    h = h * 0xC2B2AE35 & m
    return h ^ (h >> 16)


def test_reference_murmur3_matches_published_vectors():
    vectors = [(b"", 0, 0), (b"", 1, 0x514E28B7), (b"", 0xFFFFFFFF, 0x81F16F39), (b"\0\0\0\0", 0, 0x2362F9DE),
               (b"\x21\x43\x65\x87", 0, 0xF55B516B), (b"\x21\x43\x65\x87", 0x5082EDEE, 0x2362F9DE),
               (b"\x21\x43\x65", 0, 0x7E4A8634), (b"\x21\x43", 0, 0xA0F7B07A), (b"\x21", 0, 0x72661CF4),
               (b"\xff\xff\xff\xff", 0, 0x76293B50), (b"Hello, world!", 0x9747B28C, 0x24884CBA),
               (b"The quick brown fox jumps over the lazy dog", 0x9747B28C, 0x2FA826CD)]
    for data, seed, expected in vectors:
        assert murmur3_reference(data, seed) == expected, (data, seed)


def test_torch_hash_equals_reference_on_8_byte_positions():
    pos = [0, 1, 2, 3, 255, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 7, 2**40 + 12345, 2**62 + 1]
    for seed in (0, 1, 0x9747B28C, 0xFFFFFFFF):
        got = murmur3(torch.tensor(pos, dtype=torch.int64), seed).tolist()
        assert got == [murmur3_reference(struct.pack("<Q", p), seed) for p in pos]


def test_pinned_hash_values():
    # any change of hash, key layout, sign rule or layer seed breaks every saved hashed model: pinned here
    assert murmur3(torch.arange(5), 0).tolist() == [1669671676, 1392991556, 3323962100, 2738575283, 3491892518]
    assert murmur3(torch.tensor([0, 1, 2**32 + 7, 2**40]), 42).tolist() == [2624043101, 2582647965, 3157325889,
                                                                              2698199609]
    idx, sign = hash_index(12, 5, seed=123)
    assert idx.tolist() == PINNED_INDEX
    assert sign.tolist() == PINNED_SIGN
    # the rule: h(i) = murmur3(i, seed) mod K; xi(i) = -1 where the top bit of murmur3(i, seed + 0x9E3779B9) is set
    assert PINNED_INDEX == [murmur3_reference(struct.pack("<Q", i), 123) % 5 for i in range(12)]
    assert PINNED_SIGN == [1.0 - 2 * (murmur3_reference(struct.pack("<Q", i), 123 + 0x9E3779B9) >> 31)
                           for i in range(12)]
    assert layer_seed(0, "fc1") == zlib.crc32(b"0:fc1") == PINNED_LAYER_SEED
    assert hash_index(12, 5, seed=123, sign=False)[1] is None


PINNED_INDEX = [3, 3, 2, 2, 1, 1, 3, 3, 4, 3, 1, 1]
PINNED_SIGN = [-1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0]
PINNED_LAYER_SEED = 2881607826


def test_hash_spreads_evenly_and_signs_balance():
    n, k = 200_000, 1000
    idx, sign = hash_index(n, k, seed=7)
    assert int(idx.min()) == 0 and int(idx.max()) == k - 1
    counts = torch.bincount(idx, minlength=k).float()
    # multinomial counts: std sqrt(n/k (1 - 1/k)) = 14.1; allow 15 %
    assert abs(float(counts.std()) / 14.135 - 1) < 0.15
    assert abs(float(sign.mean())) < 4 / n ** 0.5     # 4 sigma of a fair coin
    other, _ = hash_index(n, k, seed=8)
    assert float((other == idx).float().mean()) < 0.01   # another seed: another (independent) map


@pytest.mark.parametrize("sign", [True, False])
def test_bucket_gradient_is_signed_scatter_add(sign):
    torch.manual_seed(0)
    layer = HashedLinear.from_float(nn.Linear(40, 30), compression=0.1, seed=11, sign=sign)
    x, target = torch.randn(16, 40), torch.randn(16, 30)
    ((layer(x) - target) ** 2).sum().backward()
    dense = nn.Linear(40, 30)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        dense.bias.copy_(layer.bias)
    ((dense(x) - target) ** 2).sum().backward()
    g = dense.weight.grad.flatten()
    s = layer.bucket_sign if sign else torch.ones_like(g)
    manual = torch.zeros(layer.num_buckets).index_add_(0, layer.bucket_index, s * g)
    torch.testing.assert_close(layer.buckets.grad, manual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, rtol=1e-6, atol=1e-6)


def test_conv_forward_and_gradient():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    h = HashedConv2d.from_float(conv, compression=0.3, seed=5)
    x = torch.randn(2, 4, 7, 7)
    ref = nn.functional.conv2d(x, h.weight.detach(), h.bias, padding=1, groups=2)
    torch.testing.assert_close(h(x), ref, rtol=0, atol=0)
    h(x).square().sum().backward()
    w = h.weight.detach().requires_grad_(True)
    nn.functional.conv2d(x, w, h.bias.detach(), padding=1, groups=2).square().sum().backward()
    manual = torch.zeros(h.num_buckets).index_add_(0, h.bucket_index, h.bucket_sign * w.grad.flatten())
    torch.testing.assert_close(h.buckets.grad, manual, rtol=1e-5, atol=1e-5)


def test_least_squares_init_is_the_projection():
    torch.manual_seed(2)
    w = torch.randn(12, 10)
    idx, sign = hash_index(w.numel(), 15, seed=3)
    b = project(w, idx, sign, 15)
    a = torch.zeros(w.numel(), 15)
    a[torch.arange(w.numel()), idx] = sign                     # w ~ A b: the hashed subspace
    lstsq = torch.linalg.lstsq(a.double(), w.flatten().double()[:, None]).solution.flatten()
    torch.testing.assert_close(b.double(), lstsq, rtol=1e-5, atol=1e-6)

    def sse(buckets):
        return float(((w.flatten() - buckets[idx] * sign) ** 2).sum())

    best = sse(b)
    for k in range(15):
        for eps in (1e-2, -1e-2):
            moved = b.clone()
            moved[k] += eps
            assert sse(moved) > best


def test_from_float_recovers_a_weight_in_the_hashed_subspace():
    torch.manual_seed(3)
    layer = HashedLinear.fresh(50, 20, compression=0.05, seed=9)   # 50 buckets for 1000 weights: all used
    dense = layer.to_float()
    again = HashedLinear.from_float(dense, compression=0.05, seed=9)
    torch.testing.assert_close(again.buckets, layer.buckets, rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 50)
    assert torch.equal(dense(x), layer(x))
    assert isinstance(dense, nn.Linear) and not isinstance(dense, HashedLinear)
    assert sorted(dense.state_dict()) == ["bias", "weight"]


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 32),
                         nn.ReLU(), nn.Linear(32, 10))


def test_state_dict_holds_buckets_and_bias_only():
    torch.manual_seed(4)
    model = hash_share(_net(), HashShare(compression=1 / 8))
    assert sorted(model.state_dict()) == ["0.bias", "0.buckets", "3.bias", "3.buckets", "5.bias", "5.buckets"]
    for name, numel, bias in (("0", 8 * 3 * 9, 8), ("3", 200 * 32, 32), ("5", 320, 10)):
        m = model.get_submodule(name)
        k = round(numel / 8)
        assert m.num_buckets == k and m.buckets.shape == (k,)
        assert sum(p.numel() for p in m.parameters()) == k + bias
        assert f"buckets={k}" in repr(m) and "compression=0.125" in repr(m)
    assert model.cluster_config == HashShare(compression=1 / 8)


def test_rebuild_and_load_give_bit_identical_outputs():
    torch.manual_seed(5)
    config = HashShare(compression=0.2, seed=17, skip=("5",))
    model = hash_share(_net(), config)
    with torch.no_grad():                            # as if trained: buckets off the projection
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert hashed_layers(model) == ["0", "3"] and type(model[5]) is nn.Linear
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = rebuild_hashed(_net(), HashShare.from_dict(config.to_dict()), ["0", "3"])
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(fresh(x), model(x))
    assert fresh.cluster_config == config


def test_layers_get_their_own_seeds_and_the_root_can_be_hashed():
    model = hash_share(nn.Sequential(nn.Linear(30, 30), nn.Linear(30, 30)), HashShare(compression=0.25))
    assert model[0].hash_seed == layer_seed(0, "0") != model[1].hash_seed == layer_seed(0, "1")
    assert not torch.equal(model[0].bucket_index, model[1].bucket_index)
    root = hash_share(nn.Linear(30, 30), HashShare(compression=0.25, seed=3))
    assert isinstance(root, HashedLinear) and root.hash_seed == layer_seed(3, "")
    again = rebuild_hashed(nn.Linear(30, 30), root.cluster_config, [""])
    again.load_state_dict(root.state_dict())
    x = torch.randn(2, 30)
    assert torch.equal(again(x), root(x))


def test_fresh_init_bounds():
    torch.manual_seed(6)
    layer = HashedLinear.fresh(100, 40, compression=0.5, seed=1)
    assert layer.num_buckets == 2000 and float(layer.buckets.detach().abs().max()) <= 0.1
    assert float(layer.buckets.detach().abs().max()) > 0.09 and float(layer.bias.detach().abs().max()) <= 0.1


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True, "0.1", float("nan")])
def test_compression_validation(bad):
    with pytest.raises(ConfigError, match=r"a number in \(0, 1\), e\.g\. 0\.125") as e:
        HashShare(compression=bad)
    assert repr(bad) in str(e.value)


def test_other_validation_and_layer_errors():
    with pytest.raises(ConfigError, match="seed=-1"):
        HashShare(seed=-1)
    with pytest.raises(ConfigError, match="min_buckets=1.5"):
        HashShare(min_buckets=1.5)
    with pytest.raises(ConfigError, match="sign='yes'"):
        HashShare(sign="yes")
    with pytest.raises(ConfigError, match="hash_share.. takes config of type HashShare"):
        hash_share(_net(), object())
    tiny = nn.Sequential(nn.Linear(30, 30), nn.Linear(2, 1))
    with pytest.raises(ModelError, match="layer '1' has 2 weights: compression=0.1 leaves no bucket"):
        hash_share(tiny, HashShare(compression=0.1, min_buckets=0))
    with pytest.raises(ModelError, match="layer '1' has 2 weights, fewer than the 4 buckets"):
        hash_share(tiny, HashShare(compression=0.1, min_buckets=4))
    assert bucket_count(2, 0.1) == 1                       # min_buckets=1 (default) keeps one
    assert type(hash_share(tiny, HashShare(compression=0.1, skip="1"))[1]) is nn.Linear
    with pytest.raises(ModelError, match="no Conv2d or Linear layer to hash"):
        hash_share(tiny, HashShare(skip=("*",)))
    with pytest.raises(ModelError, match="layer 'nope' is not in the model"):
        rebuild_hashed(_net(), HashShare(), ["nope"])
    with pytest.raises(ModelError, match="layer '1' is a ReLU"):
        rebuild_hashed(_net(), HashShare(), ["1"])
