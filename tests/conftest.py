import numpy as np
import pytest
import torch

from smallify.examples.models import ResNet


def small_resnet(seed: int = 0) -> torch.nn.Module:
    """A seeded ResNet (two stages, residual blocks with a downsample) with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    m = ResNet((1, 1), (8, 16), in_channels=1, num_classes=10, stem="small").eval()
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return m


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny float64 LAPACK calls and small CLI runs: one torch thread is several times faster than
    two contending ones on a busy 2-core machine (test_kmeans: 20 s against 5 s). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def model():
    return small_resnet()


@pytest.fixture(scope="session")
def calib():
    return torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def float_onnx(tmp_path_factory, model, calib):
    import smallify as sm

    path = tmp_path_factory.mktemp("models") / "float.onnx"
    sm.export_onnx(model, path, calib[:1])
    return path


@pytest.fixture(scope="session")
def calib_npz(tmp_path_factory, calib):
    path = tmp_path_factory.mktemp("data") / "calib.npz"
    np.savez(path, input=calib.numpy())
    return path


@pytest.fixture
def user_net(tmp_path, monkeypatch):
    """A user's model by import path, as the CLI's --model takes it: module ``usernet`` in the current folder,
    factory ``build`` (a small seeded conv net for 3-channel images, fast to prune)."""
    (tmp_path / "usernet.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),\n"
        "                               torch.nn.Conv2d(16, 4, 1))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "usernet:build"


def train_bpe(vocab_size: int = 400):
    """A byte-level BPE of ``vocab_size`` tokens trained in memory on stdlib docstrings (no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from smallify.llm.text import default_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(default_texts()[:200], trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return train_bpe()
