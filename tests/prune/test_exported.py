"""The torch.export path of the dependency graph (``prune/exported.py``) reads the same structure as the fx
path: a CNN that torch.fx cannot trace (control flow on a shape) is pruned exactly as its traceable twin."""
import torch
import torch.nn.functional as F
from torch import nn

import smallify as sm


class Net(nn.Module):
    def __init__(self, branchy: bool):
        super().__init__()
        self.branchy = branchy
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        if not self.branchy or x.shape[-1] > 4:          # fx: a Proxy's shape cannot decide a branch
            x = F.max_pool2d(x, 2)
        y = F.relu(self.b1(self.c1(x)))
        y = y + F.relu(self.b2(self.c2(y)))              # residual: c1 and c2 one group
        z = F.relu(self.c3(y))
        z = F.adaptive_avg_pool2d(z * z.mean((2, 3), keepdim=True), 4)     # c3 through a reduction and a pool
        return self.fc(torch.flatten(z, 1))              # flatten: each channel 16 features of fc


def test_an_untraceable_cnn_is_pruned_as_its_traceable_twin():
    torch.manual_seed(0)
    plain = Net(branchy=False).eval()
    branchy = Net(branchy=True).eval()
    branchy.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain(x), branchy(x))
    try:
        torch.fx.symbolic_trace(branchy)
        raise AssertionError("torch.fx traced the branchy net: the test would not reach the export path")
    except torch.fx.proxy.TraceError:
        pass
    want = sm.prune(plain, sm.ChannelPrune(ratio=0.5), x)
    got = sm.prune(branchy, sm.ChannelPrune(ratio=0.5), x)
    summary = [(g["producers"], g["before"], g.get("after")) for g in got.report.groups]
    assert summary == [(g["producers"], g["before"], g.get("after")) for g in want.report.groups]
    assert summary == [(["c1", "c2"], 16, 8), (["c3"], 32, 16), (["fc"], 10, None)]
    with torch.no_grad():
        assert torch.equal(got(x), want(x))
