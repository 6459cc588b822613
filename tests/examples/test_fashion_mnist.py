import gzip

import numpy as np
import pytest

from smallify.errors import DataError
from smallify.examples import fashion_mnist


def write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_reads_any_folder_of_idx_files(tmp_path, compress):
    imgs = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs, compress)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2, 9]), compress)
    x, y = fashion_mnist.load("test", tmp_path)
    assert x.shape == (3, 28, 28) and np.array_equal(x, imgs) and y.tolist() == [1, 2, 9]
    z = fashion_mnist.normalize(x)
    assert z.shape == (3, 1, 28, 28) and z.dtype == np.float32
    assert z[0, 0, 0, 0] == pytest.approx((0 - fashion_mnist.MEAN) / fashion_mnist.STD)


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist.load("train", tmp_path)


def test_truncated_and_bad_magic(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") * 3 + b"\0" * 10)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(10), False)
    with pytest.raises(DataError, match="truncated"):
        fashion_mnist.load("test", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="bad magic"):
        fashion_mnist.load("test", tmp_path)


def test_real_data_set_when_installed():
    if not (fashion_mnist.DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (make test installs it)")
    x, y = fashion_mnist.load("test")
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10
