"""The .smallify container (pack/): a channel-pruned model's shapes come back from the file onto the float
architecture a factory builds (fit_shapes, through the resize handlers pruning uses), exactly."""
import torch
from torch import nn

import smallify as sm
from smallify.pack import fit_shapes
from tests.conftest import small_resnet


def test_fit_shapes_takes_every_layer_type_from_the_state():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, groups=8), nn.GroupNorm(2, 8),
                             nn.Flatten(), nn.Linear(8 * 4 * 4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=4), nn.GroupNorm(2, 4),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).eval()
    target = net().eval()
    fit_shapes(target, small.state_dict())
    target.load_state_dict(small.state_dict())
    assert (target[0].out_channels, target[1].num_features, target[2].groups, target[3].num_channels) == (4, 4, 4, 4)
    assert (target[5].in_features, target[5].out_features, target[6].normalized_shape, target[7].in_features) == \
        (64, 3, (3,), 3)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(target(x), small(x))


def test_pruned_quantized_model_round_trip(tmp_path, calib):
    pruned = sm.prune(small_resnet(), sm.ChannelPrune(ratio=0.5), calib[:2])
    for config in (None, sm.WeightOnly(bits=4, group_size=None), sm.Int8Static()):
        model = pruned if config is None else sm.quantize(pruned, config, calib, progress=False)
        sm.save(model, tmp_path / "m.smallify")
        back = sm.load(tmp_path / "m.smallify", small_resnet())
        with torch.no_grad():
            assert torch.equal(back(calib), model(calib)), config


def test_file_written_before_reduce_range_loads_its_8_bit_grid(tmp_path, calib):
    """A manifest without reduce_range (files from before it existed) holds 8-bit grids: it must not be read as
    'auto' and re-gridded to 7 bits on a machine without VNNI (outputs then differed by up to 0.41)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    q = sm.quantize(small_resnet(), sm.Int8Static(reduce_range=False), calib, progress=False)
    y = q(calib)
    sm.save(q, tmp_path / "q.smallify")
    with safe_open(str(tmp_path / "q.smallify"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(meta["smallify"])
    del manifest["config"]["reduce_range"]
    save_file(tensors, str(tmp_path / "old.smallify"), metadata={**meta, "smallify": json.dumps(manifest)})
    loaded = sm.load(tmp_path / "old.smallify", small_resnet())
    assert torch.equal(loaded(calib), y)
    assert {m.spec.fmt.bits for m in loaded.modules() if getattr(getattr(m, "spec", None), "fmt", None)} == {8}


def test_fp8_has_no_reduced_range():
    assert sm.FP8Static().reduce_range is False and "7-bit" not in str(
        sm.quantize(nn.Sequential(nn.Linear(4, 4)), sm.FP8Static(), torch.randn(8, 4), progress=False).report)
