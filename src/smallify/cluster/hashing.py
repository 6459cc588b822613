"""HashedNets (Chen et al., 2015, "Compressing Neural Networks with the Hashing Trick").

Each layer stores K shared values, ``buckets``; weight i of the layer (flat position, row-major) is
``buckets[h(i)] * xi(i)``: ``h`` maps a position to a bucket, ``xi`` to a sign ±1, both by a hash, so nothing
but the K buckets (and the bias) is stored: the index is recomputed from the layer's seed whenever the layer
is built. Autograd gives each bucket the sum over its members of ``xi(i) * dL/dw_i`` (the paper's rule).

    hashed = hash_share(model, HashShare(compression=1/8))      # K = round(numel / 8) per layer
    smallify.train(hashed, data, TrainConfig(...))              # the paper trains from scratch
    fresh = rebuild_hashed(float_model, hashed.cluster_config, hashed_layers(hashed))
    fresh.load_state_dict(hashed.state_dict())                  # the same outputs, bit for bit

The hash is MurmurHash3_x86_32 (Appleby) of the position as an 8-byte little-endian unsigned integer, with a
32-bit seed, computed in torch int64 with every intermediate kept below 2^49 (32-bit products are split
in 16-bit halves), so no signed overflow occurs and the values are the same on every platform and torch
version. ``h(i) = murmur3(i, seed) mod K``; ``xi(i) = +1`` when the top bit of ``murmur3(i, seed + 0x9E3779B9)``
is 0, else -1. A layer's seed is ``zlib.crc32(f"{config.seed}:{layer name}")``: stable across processes
(Python's ``hash`` of a str is not).
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
import numbers
import zlib

import torch
from torch import nn
from torch.nn.utils import parametrize

from smallify.config import Config, check_config
from smallify.errors import ConfigError, ModelError

MASK32 = 0xFFFFFFFF
SIGN_SALT = 0x9E3779B9          # the sign hash's seed offset (2^32 / golden ratio): independent of h


@dataclasses.dataclass
class HashShare(Config):
    """HashedNets: every Conv2d/Linear not matched by ``skip`` (fnmatch patterns of layer names) keeps
    ``compression`` x its weights as hashed buckets (K = max(``min_buckets``, round(compression x numel)));
    ``sign``: multiply by the sign hash xi(i) (the paper's, it makes the collisions unbiased); ``seed``: the
    hashes' seed (each layer's own is derived from it and the layer's name)."""

    kind = "hash_share"
    verbs = ("cluster",)
    compression: float = 1 / 8
    seed: int = 0
    skip: tuple[str, ...] = ()
    sign: bool = True
    min_buckets: int = 1

    def __post_init__(self):
        c = self.compression
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 < c < 1:
            raise ConfigError(f"compression={c!r} is not supported; accepted: a number in (0, 1), e.g. 0.125")
        self.compression = float(c)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} is not supported; accepted: an integer >= 0")
        if not isinstance(self.sign, bool):
            raise ConfigError(f"sign={self.sign!r} is not supported; accepted: True, False")
        m = self.min_buckets
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0:
            raise ConfigError(f"min_buckets={m!r} is not supported; accepted: an integer >= 0, e.g. 1")
        self.skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)

    def describe(self) -> str:
        return f"hashing trick, {self.compression:.4g} of the weights" + ("" if self.sign else ", no sign hash")


# ---- the hash (pure) -------------------------------------------------------------------------------------

def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for int64 ``a`` in [0, 2^32) and a constant ``c`` < 2^32, without overflow: a's low and
    high 16 bits are multiplied apart (each product < 2^48)."""
    return ((a & 0xFFFF) * c + ((((a >> 16) * (c & 0xFFFF)) & 0xFFFF) << 16)) & MASK32


def _rotl32(a: torch.Tensor, r: int) -> torch.Tensor:
    return ((a << r) & MASK32) | (a >> (32 - r))


def murmur3(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """MurmurHash3_x86_32 of each position (int64 >= 0, hashed as 8 bytes little-endian) with ``seed`` in
    [0, 2^32): int64 values in [0, 2^32)."""
    h = torch.full_like(positions, seed & MASK32, dtype=torch.int64)
    for block in (positions & MASK32, (positions >> 32) & MASK32):
        k = _mul32(_rotl32(_mul32(block, 0xCC9E2D51), 15), 0x1B873593)
        h = (_rotl32(h ^ k, 13) * 5 + 0xE6546B64) & MASK32
    h = h ^ 8                                   # the key's length in bytes
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def layer_seed(seed: int, name: str) -> int:
    """The hash seed of layer ``name`` under config seed ``seed``: crc32 of 'seed:name' (stable everywhere)."""
    return zlib.crc32(f"{seed}:{name}".encode())


def hash_index(numel: int, num_buckets: int, seed: int, sign: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(bucket of each flat position: int64 (numel,) in [0, K), its sign xi: float32 (numel,) of ±1, or None
    when ``sign`` is False)."""
    pos = torch.arange(numel, dtype=torch.int64)
    idx = murmur3(pos, seed) % num_buckets
    if not sign:
        return idx, None
    top = murmur3(pos, (seed + SIGN_SALT) & MASK32) >> 31
    return idx, (1 - 2 * top).to(torch.float32)


def expand(buckets: torch.Tensor, index: torch.Tensor, sign: torch.Tensor | None) -> torch.Tensor:
    """The flat weight: buckets[index] * sign (gather: its backward is a scatter-add onto the buckets)."""
    w = buckets.gather(0, index)
    return w if sign is None else w * sign


def project(w: torch.Tensor, index: torch.Tensor, sign: torch.Tensor | None, num_buckets: int) -> torch.Tensor:
    """The least-squares buckets for flat weights ``w``: argmin_b sum_i (w_i - xi_i b_h(i))^2, i.e. each bucket
    is the mean of xi_i w_i over its members (0 for a bucket with none): w's projection onto the hashed
    subspace."""
    w = w.detach().reshape(-1).to(torch.float32)
    sw = w if sign is None else w * sign.to(w.device)
    total = torch.zeros(num_buckets, dtype=torch.float32, device=w.device).index_add_(0, index.to(w.device), sw)
    count = torch.bincount(index.to(w.device), minlength=num_buckets).clamp(min=1)
    return total / count


def bucket_count(numel: int, compression: float, min_buckets: int = 1, name: str | None = None) -> int:
    """K = max(min_buckets, round(compression x numel)); a ModelError naming the layer when K < 1 or K > numel
    (hashing would then store no fewer values than the dense weight)."""
    k = max(int(min_buckets), round(compression * numel))
    what = f"layer {name!r}" if name is not None else "a layer"
    if k < 1:
        raise ModelError(f"{what} has {numel} weights: compression={compression:g} leaves no bucket; skip it "
                         "(skip=[...]) or set min_buckets >= 1")
    if k > numel:
        raise ModelError(f"{what} has {numel} weights, fewer than the {k} buckets asked (min_buckets="
                         f"{min_buckets}); skip it (skip=[...]) or lower min_buckets")
    return k


# ---- the layers ------------------------------------------------------------------------------------------

class HashedTwin:
    """Mixin of the hashed layers: ``buckets`` (K,) float32, a Parameter; ``bucket_index`` / ``bucket_sign``
    non-persistent buffers rebuilt from ``hash_seed``; ``weight`` computed on every access, so the float layer's
    own forward (F.linear / _conv_forward) runs unchanged."""

    float_type: type[nn.Module]

    @classmethod
    def _build(cls, m: nn.Module, num_buckets: int, seed: int, sign: bool, buckets: torch.Tensor | None):
        if parametrize.is_parametrized(m):
            raise ModelError(f"a {type(m).__name__} carries parametrizations (pruning masks?): fold them first "
                             "(smallify.finalize) and hash the result")
        shape = tuple(m.weight.shape)
        numel = math.prod(shape)
        dev = m.weight.device
        index, xi = hash_index(numel, num_buckets, seed, sign)
        new = copy.copy(m)
        new.__class__ = cls
        new._parameters = {k: v for k, v in m._parameters.items() if k != "weight"}
        new._buffers, new._modules = dict(m._buffers), dict(m._modules)
        new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
        new.weight_shape, new.hash_seed, new.num_buckets = shape, int(seed), int(num_buckets)
        new.register_buffer("bucket_index", index.to(dev), persistent=False)
        new.register_buffer("bucket_sign", None if xi is None else xi.to(dev), persistent=False)
        if buckets is None:
            buckets = project(m.weight, new.bucket_index, new.bucket_sign, num_buckets)
        new.buckets = nn.Parameter(buckets.detach().to(dev, torch.float32).clone())
        return new

    @classmethod
    def from_float(cls, m: nn.Module, compression: float, seed: int, sign: bool = True, min_buckets: int = 1):
        """The hashed form of float layer ``m`` with K = max(min_buckets, round(compression x numel)) buckets,
        hashed with ``seed`` (the layer's own, see ``layer_seed``), initialised by least squares from m's weight
        (``project``): a trained layer keeps as much as K values can hold."""
        k = bucket_count(m.weight.numel(), compression, min_buckets)
        return cls._build(m, k, seed, sign, None)

    @classmethod
    def fresh(cls, *args, compression: float, seed: int, sign: bool = True, min_buckets: int = 1, **kwargs):
        """A randomly initialised hashed layer (the paper trains from scratch): ``args``/``kwargs`` those of the
        float layer (e.g. ``HashedLinear.fresh(784, 1000, compression=1/8, seed=0)``); buckets uniform in
        ±1/sqrt(fan_in), the bound of the float layer's default init, bias as the float layer's."""
        template = cls.float_type(*args, **kwargs)
        k = bucket_count(template.weight.numel(), compression, min_buckets)
        fan_in = template.weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        buckets = torch.empty(k, dtype=torch.float32).uniform_(-bound, bound)
        return cls._build(template, k, seed, sign, buckets)

    @property
    def weight(self) -> torch.Tensor:
        return expand(self.buckets, self.bucket_index, self.bucket_sign).view(self.weight_shape)

    @property
    def compression(self) -> float:
        """Stored buckets / dense weights."""
        return self.num_buckets / self.bucket_index.numel()

    def to_float(self) -> nn.Module:
        """The plain float layer with the expanded weight (for ONNX export, or to drop the hashing)."""
        from smallify.cluster.modules import plain_layer

        return plain_layer(self, ("buckets",), ("bucket_index", "bucket_sign"), ("weight_shape", "hash_seed",
                                                                               "num_buckets"))

    def extra_repr(self) -> str:
        return (f"{self.float_type.extra_repr(self)}, buckets={self.num_buckets}, "
                f"compression={self.compression:.4g}{'' if self.bucket_sign is not None else ', no sign hash'}")


class HashedLinear(HashedTwin, nn.Linear):
    float_type = nn.Linear


class HashedConv2d(HashedTwin, nn.Conv2d):
    float_type = nn.Conv2d


# float layer type -> its hashed twin, looked up along the layer's MRO (a subclass of Linear is a Linear)
TWINS: dict[type, type[HashedTwin]] = {nn.Linear: HashedLinear, nn.Conv2d: HashedConv2d}


def twin_of(m: nn.Module) -> type[HashedTwin] | None:
    from smallify.cluster.modules import lookup

    return lookup(m, TWINS, HashedTwin)


# ---- the verb --------------------------------------------------------------------------------------------

def _targets(model: nn.Module, config: HashShare) -> list[tuple[str, nn.Module, type[HashedTwin]]]:
    out = []
    for name, m in model.named_modules():
        twin = twin_of(m)
        if twin is not None and not any(fnmatch.fnmatchcase(name, p) for p in config.skip):
            out.append((name, m, twin))
    return out


def _replace(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """``root`` with the submodule ``name`` replaced by ``new`` ('' replaces the root: ``new`` is returned)."""
    if not name:
        return new
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)
    return root


def hash_share(model: nn.Module, config: HashShare | None = None, inplace: bool = False) -> nn.Module:
    """``model`` with every Linear/Conv2d not skipped replaced by its hashed twin (least-squares buckets from
    its weights); ``model.cluster_config`` records ``config``. A copy unless ``inplace``."""
    config = check_config(config, HashShare, "hash_share") or HashShare()
    model = model if inplace else copy.deepcopy(model)
    targets = _targets(model, config)
    if not targets:
        raise ModelError("no Conv2d or Linear layer to hash (all skipped, or already hashed?)")
    for name, m, twin in targets:       # every count checked before any layer changes
        bucket_count(m.weight.numel(), config.compression, config.min_buckets, name)
    for name, m, twin in targets:
        new = twin.from_float(m, config.compression, layer_seed(config.seed, name), config.sign, config.min_buckets)
        model = _replace(model, name, new)
    model.cluster_config = config
    return model


def hashed_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s hashed layers (what ``rebuild_hashed`` needs besides the config)."""
    return [name for name, m in model.named_modules() if isinstance(m, HashedTwin)]


def rebuild_hashed(model: nn.Module, config: HashShare, layer_names) -> nn.Module:
    """The hashed structure ``hash_share(model, config)`` made, rebuilt in place on a float model of the same
    architecture for the layers ``layer_names`` (the seeds give the same hashes; the buckets are zeros until
    ``load_state_dict`` fills them). Returned (a new object when the root layer itself is named: '')."""
    config = check_config(config, HashShare, "rebuild_hashed")
    if config is None:
        raise ConfigError("rebuild_hashed() needs the HashShare config the model was hashed with")
    for name in layer_names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"layer {name!r} is not in the model; it has: "
                             f"{[n for n, _ in model.named_modules() if n][:20]}") from None
        twin = twin_of(m)
        if twin is None:
            raise ModelError(f"layer {name!r} is a {type(m).__name__}; a hashed layer is rebuilt from a Linear "
                             "or Conv2d")
        k = bucket_count(m.weight.numel(), config.compression, config.min_buckets, name)
        new = twin._build(m, k, layer_seed(config.seed, name), config.sign, torch.zeros(k))
        model = _replace(model, name, new)
    model.cluster_config = config
    return model
