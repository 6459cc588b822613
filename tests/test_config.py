"""The config registry keyed by kind: every config class that names a kind is found by it, so that files
(the .smallify manifest, recipes) name configs without a hand-written list."""
import dataclasses

import pytest
import torch
from torch import nn

import smallify as sm
from smallify.config import REGISTRY, Config, config_from_dict


def test_every_config_is_registered_by_kind():
    for klass in (sm.Int8Static, sm.FP8Static, sm.WeightOnly, sm.Float16, sm.Int8Dynamic, sm.MixedPrecision,
                  sm.ChannelPrune, sm.Unstructured, sm.AttentionPrune, sm.KD, sm.TrainConfig):
        assert REGISTRY[klass.kind] is klass
    c = sm.WeightOnly(bits=3, group_size=32)
    assert config_from_dict(c.to_dict()) == c
    assert config_from_dict(c.to_dict(), "quantize") == c
    with pytest.raises(sm.ConfigError, match=r"unknown config kind 'kd'; accepted: \[.*'int8_static'"):
        config_from_dict(sm.KD().to_dict(), "quantize")
    with pytest.raises(sm.ConfigError, match="unknown config kind 'nope'"):
        config_from_dict({"kind": "nope"})


def test_a_new_config_kind_is_one_class(tmp_path):
    from smallify.pack.container import STRUCTURES, _config_from

    @dataclasses.dataclass
    class Halve(Config):
        kind = "test_halve"
        verbs = ("quantize",)
        factor: float = 0.5

    try:
        assert config_from_dict({"kind": "test_halve", "factor": 0.25}) == Halve(0.25)
        assert _config_from(Halve().to_dict()) == Halve()          # the container reads it without a list
        with pytest.raises(sm.ConfigError, match=r"quantize\(\) takes config of type .*, Halve, .*; got KD"):
            sm.quantize(nn.Linear(4, 4), sm.KD())                   # quantize's accepted types: the registry's
        saved = nn.Linear(4, 4)
        saved.quant_config = Halve()
        sm.save(saved, tmp_path / "halve.smallify")
        with pytest.raises(sm.ModelError, match=r"cannot rebuild a model quantized with Halve \(kind 'test_halve'\)"):
            sm.load(tmp_path / "halve.smallify", nn.Linear(4, 4))
        STRUCTURES["test_halve"] = lambda model, config, specs: model     # how load rebuilds it: one table entry
        assert torch.equal(sm.load(tmp_path / "halve.smallify", nn.Linear(4, 4)).weight, saved.weight)
    finally:
        del REGISTRY["test_halve"]
        STRUCTURES.pop("test_halve", None)


def test_a_new_quantization_method_is_one_registration():
    """A config + register_quantizer is all quantize needs: no list of configs to edit elsewhere."""
    import sys
    import types

    from smallify.api import QUANTIZERS, register_quantizer
    from smallify.config import Config

    @dataclasses.dataclass
    class Halve(Config):
        kind = "halve_test"
        verbs = ("quantize",)

    try:
        register_quantizer(Halve, "tests_halve_helpers:halve", "tests_halve_helpers:halve_onnx")
        helpers = types.ModuleType("tests_halve_helpers")
        helpers.halve = lambda model, config: nn.Sequential(model, nn.Identity())
        sys.modules["tests_halve_helpers"] = helpers
        out = sm.quantize(nn.Linear(2, 2), Halve())
        assert isinstance(out, nn.Sequential)
        with pytest.raises(sm.ConfigError, match="has no quantizer"):
            from smallify.api import quantizer_for

            del QUANTIZERS[Halve]
            quantizer_for(Halve(), "pytorch")
    finally:
        QUANTIZERS.pop(Halve, None)
        sys.modules.pop("tests_halve_helpers", None)
        from smallify import config as config_mod

        config_mod.REGISTRY.pop("halve_test", None)
