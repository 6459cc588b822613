"""The decomposed layer (smallify.lowrank.modules): built parts compute the composite weight exactly as the layer
computes its own, empty parts and manifest specs give back the same structure, and a decomposed (then quantized)
model survives save -> load with the same output."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smallify as sm
from smallify.errors import ModelError
from smallify.lowrank import factor as fa
from smallify.lowrank.modules import Decomposed, build, empty_parts, from_spec, parts_spec
from smallify.quant.modules import QuantLinear


pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def factors_of(layer: nn.Module, method: str, ranks: tuple[int, ...]) -> fa.Factors:
    W = layer.weight.detach()
    if method == "svd":
        return fa.svd_factors(W, ranks[0])
    if method == "spatial":
        return fa.SpatialFit(W).at(ranks[0])
    if method == "tucker":
        return fa.tucker_factors(W, *ranks)
    return fa.SeparableFit(W).at(ranks[0])


def composite_output(layer: nn.Module, f: fa.Factors, x: torch.Tensor) -> torch.Tensor:
    """The reference: the layer's own op with the composite weight (float64) in place of its weight."""
    bias = None if layer.bias is None else layer.bias.detach().double()
    Wc = f.composite()
    if isinstance(layer, nn.Linear):
        return F.linear(x.double(), Wc, bias)
    return F.conv2d(x.double(), Wc.reshape(layer.weight.shape), bias, layer.stride, layer.padding, layer.dilation)


def full_ranks(layer: nn.Module, method: str) -> tuple[int, ...]:
    W = layer.weight
    O, C = W.shape[:2]
    if method == "svd":
        return (min(O, W[0].numel()),)
    if method == "spatial":
        return (min(C * W.shape[2], O * W.shape[3]),)
    if method == "tucker":
        return (O, C)
    return (min(W.shape[2] * W.shape[3], O),)


CONV_GEOMETRY = [   # kernel, stride, padding, dilation
    ((3, 3), 1, 1, 1),
    ((5, 3), (2, 1), (2, 1), 1),
    ((3, 3), 2, 1, 1),
    ((3, 3), 1, 2, 2),
    ((3, 5), (1, 2), (0, 2), (2, 1)),
]

# (label, layer factory, method, low ranks, input)
CASES = [("linear", lambda b: nn.Linear(12, 10, bias=b), "svd", (4,), (5, 12)),
         ("linear3d", lambda b: nn.Linear(12, 10, bias=b), "svd", (3,), (2, 4, 12)),
         ("conv1x1_s2", lambda b: nn.Conv2d(6, 8, 1, stride=2, bias=b), "svd", (3,), (2, 6, 7, 9)),
         ("conv1x1_s2_p1", lambda b: nn.Conv2d(6, 8, 1, stride=2, padding=1, bias=b), "svd", (3,), (2, 6, 7, 9))]
for i, (k, s, p, d) in enumerate(CONV_GEOMETRY):
    for method, ranks in (("spatial", (4,)), ("tucker", (3, 2)), ("separable", (2,))):
        CASES.append((f"conv{k[0]}x{k[1]}_{i}_{method}",
                      lambda b, k=k, s=s, p=p, d=d: nn.Conv2d(4, 6, k, stride=s, padding=p, dilation=d, bias=b),
                      method, ranks, (2, 4, 11, 10)))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("label,make,method,ranks,shape", CASES, ids=[c[0] for c in CASES])
def test_build_computes_the_composite_and_at_full_rank_the_layer(label, make, method, ranks, shape, bias):
    layer = seeded(make(bias), seed=len(label))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for r in (ranks, full_ranks(layer, method)):
        f = factors_of(layer, method, r)
        d = build(layer, f)
        assert isinstance(d, Decomposed) and d.method == method and d.ranks == tuple(r)
        assert all(type(p) in (nn.Linear, nn.Conv2d) for p in d)
        assert all(p.weight.dtype == torch.float32 for p in d) and not d.training
        assert sum(p.bias is not None for p in d) == int(bias) and (d[-1].bias is not None) == bias
        with torch.no_grad():
            y = d(x)
        ref = composite_output(layer, f, x)
        assert y.shape == ref.shape
        assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)                    # float32 parts
    with torch.no_grad():                                                              # full rank: the layer
        assert torch.allclose(y, layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label,make,method,ranks,shape", CASES, ids=[c[0] for c in CASES])
def test_empty_parts_on_meta_have_builds_shapes(label, make, method, ranks, shape):
    layer = seeded(make(True), seed=3)
    meta = empty_parts(layer, method, ranks, device="meta")
    built = list(build(layer, factors_of(layer, method, ranks)))
    assert all(p.weight.device.type == "meta" for p in meta)
    assert [type(p) for p in meta] == [type(p) for p in built]
    for a, b in zip(meta, built):
        assert a.weight.shape == b.weight.shape and (a.bias is None) == (b.bias is None)
        if isinstance(a, nn.Conv2d):
            assert (a.stride, a.padding, a.dilation, a.groups) == (b.stride, b.padding, b.dilation, b.groups)
    assert parts_spec(Decomposed(method, ranks, *meta)) == parts_spec(Decomposed(method, ranks, *built))


@pytest.mark.parametrize("label,make,method,ranks,shape", CASES, ids=[c[0] for c in CASES])
def test_spec_round_trip_gives_the_same_module(label, make, method, ranks, shape):
    layer = seeded(make(True), seed=4)
    d = build(layer, factors_of(layer, method, ranks))
    spec = parts_spec(d)
    assert spec["method"] == method and spec["ranks"] == list(ranks) and len(spec["parts"]) == len(d)
    back = from_spec(copy.deepcopy(spec), "layer 'x'")
    assert parts_spec(back) == spec and back.method == method and back.ranks == tuple(ranks)
    back.load_state_dict(d.state_dict())                                              # strict: same keys, shapes
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back.eval()(x), d(x))


def conv_spec() -> dict:
    layer = seeded(nn.Conv2d(4, 6, 3, padding=1), seed=5)
    return parts_spec(build(layer, fa.SeparableFit(layer.weight.detach()).at(2)))


def spec_with(edit) -> dict:
    spec = conv_spec()
    edit(spec)
    return spec


BAD_SPECS = [
    ("not a dict", lambda: [1, 2], "accepted: {'method': str"),
    ("no parts", lambda: spec_with(lambda s: s.pop("parts")), "accepted: {'method': str"),
    ("empty parts", lambda: spec_with(lambda s: s.update(parts=[])), "accepted: {'method': str"),
    ("method not str", lambda: spec_with(lambda s: s.update(method=3)), "accepted: {'method': str"),
    ("wrong type", lambda: spec_with(lambda s: s["parts"][0].update(type="conv3d")),
     "part 0: type must be 'linear' or 'conv2d'"),
    ("negative in", lambda: spec_with(lambda s: s["parts"][1].update({"in": -8})),
     "part 1 in/out is .*accepted: a list of 2 non-negative integers"),
    ("zero out", lambda: spec_with(lambda s: s["parts"][1].update(out=0)), "part 1: in/out must be >= 1"),
    ("negative padding", lambda: spec_with(lambda s: s["parts"][0].update(padding=[1, -1])),
     "part 0 padding is .*accepted: a list of 2 non-negative integers"),
    ("short kernel", lambda: spec_with(lambda s: s["parts"][0].update(kernel=[3])),
     "part 0 kernel is .*accepted: a list of 2 non-negative integers"),
    ("zero stride", lambda: spec_with(lambda s: s["parts"][0].update(stride=[0, 1])),
     "part 0: kernel, stride, dilation and groups must be >= 1, groups dividing in and out"),
    ("groups not dividing", lambda: spec_with(lambda s: s["parts"][0].update(groups=3)),
     "part 0: kernel, stride, dilation and groups must be >= 1, groups dividing in and out"),
    ("groups not dividing out", lambda: spec_with(lambda s: s["parts"][0].update(out=6)),
     "part 0: kernel, stride, dilation and groups must be >= 1, groups dividing in and out"),
    ("bool as int", lambda: spec_with(lambda s: s["parts"][1].update({"in": True})),
     "part 1 in/out is .*accepted: a list of 2 non-negative integers"),
    ("bool groups", lambda: spec_with(lambda s: s["parts"][0].update(groups=True)),
     "part 0 groups is .*accepted: a list of 1 non-negative integers"),
    ("bias not bool", lambda: spec_with(lambda s: s["parts"][1].update(bias=1)), "bias true or false"),
    ("float kernel", lambda: spec_with(lambda s: s["parts"][0].update(kernel=[3.0, 3])),
     "part 0 kernel is .*accepted: a list of 2 non-negative integers"),
    ("bad ranks", lambda: spec_with(lambda s: s.update(ranks=[-2])),
     "ranks is .*accepted: a list of some non-negative integers"),
    ("missing ranks", lambda: spec_with(lambda s: s.pop("ranks")),
     "ranks is .*accepted: a list of some non-negative integers"),
]


@pytest.mark.parametrize("label,make,message", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_from_spec_rejects_bad_specs_naming_the_layer(label, make, message):
    assert isinstance(from_spec(conv_spec(), "model.bin: decomposed layer 'conv'"), Decomposed)   # the base is fine
    with pytest.raises(ModelError, match=r"^model\.bin: decomposed layer 'conv'.*" + message) as e:
        from_spec(make(), "model.bin: decomposed layer 'conv'")
    assert "\n" not in str(e.value)


# ---- save / load of decomposed models -------------------------------------------------------------------------

def test_quantized_decomposed_linear_model_round_trips(tmp_path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()

    data = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    dec = sm.decompose(make(), sm.LowRank(method="svd", rank=4, runtime=None), progress=False)
    assert dec.report.decomposed == ["0", "2"]
    assert all(isinstance(dec.get_submodule(n), Decomposed) for n in ("0", "2"))
    q = sm.quantize(dec, sm.Int8Static(), data, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 4                  # every part quantized
    assert set(q.smallify_decomposed) == {"0", "2"}                                   # carry_structure kept them
    assert q.smallify_decomposed["0"]["ranks"] == [4] and len(q.smallify_decomposed["0"]["parts"]) == 2
    path = sm.save(q, tmp_path / "q.smallify")
    fresh = make()
    with torch.no_grad():
        fresh[0].weight.mul_(2)                                                       # the file fills every tensor
    back = sm.load(path, fresh)
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(back(x), q(x))                                             # exactly the same output
        assert not torch.equal(q(x), make()(x))                                       # and not the float model's


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = ConvNet().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.2, 0.2)
    return m


def test_decomposed_conv_model_with_batchnorm_round_trips(tmp_path):
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    dec = sm.decompose(conv_net(), sm.LowRank(method="spatial", rank=2, runtime=None), data, progress=False)
    assert dec.report.decomposed == ["conv1", "conv2"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dec.modules())               # folded first
    assert [dec.get_submodule(n).ranks for n in ("conv1", "conv2")] == [(2,), (2,)]
    path = sm.save(dec, tmp_path / "d.smallify")
    back = sm.load(path, conv_net(seed=1))                                             # other weights: the file's win
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    assert isinstance(back.get_submodule("conv1"), Decomposed)
    with torch.no_grad():
        assert torch.equal(back(x), dec(x))                                            # exactly the same output
        assert not torch.equal(dec(x), conv_net()(x))                                  # rank 2 of 9: not the original
