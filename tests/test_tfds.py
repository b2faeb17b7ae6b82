"""data.tfds_dataset through ``tfds.testing.mock_data`` (no download).

Needs the optional ``tfds`` extra (tensorflow-datasets and TensorFlow); skips cleanly without it, as in the default
CI, which installs only the ``test`` extra.
"""

from __future__ import annotations

import numpy as np
import pytest

from dlvm_jax import data  # first: dlvm_jax imports distrax before TensorFlow (see data.tfds_dataset)

pytest.importorskip("tensorflow", reason="the tfds extra is not installed (pip install 'dlvm_jax[tfds]')")
tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed")

N = 7  # mock examples per split


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_tfds_mnist_like(name):
    with tfds.testing.mock_data(num_examples=N):
        ds = data.tfds_dataset(name, batch_size=3)  # several batches, concatenated
        img = data.tfds_dataset(name, flat=False)
    assert ds.x_train.shape == (N, 784) and ds.x_test.shape == (N, 784)
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.y_train.shape == (N,) and ds.y_train.dtype == np.int32
    assert 0 <= ds.y_train.min() and ds.y_train.max() <= 9
    # Values are 8-bit grey levels / 255.
    np.testing.assert_array_equal(ds.x_train, np.round(ds.x_train * 255).astype(np.float32) / np.float32(255))
    assert img.x_train.shape == (N, 28, 28, 1)
    np.testing.assert_array_equal(img.x_train.reshape(N, 784), ds.x_train)
    assert ds.name == f"tfds:{name}"


def test_tfds_binarized_mnist():
    with tfds.testing.mock_data(num_examples=N, max_value=1):
        ds = data.tfds_dataset("binarized_mnist", train_split="train+validation")
    # tfds split syntax passes through (mock_data yields num_examples for any split, even a union).
    assert ds.x_train.shape == (N, 784) and ds.x_test.shape == (N, 784)
    assert set(np.unique(ds.x_train)) <= {0.0, 1.0} and ds.x_train.dtype == np.float32
    assert ds.y_train is None and ds.y_test is None


def test_tfds_errors(assert_one_line):
    with pytest.raises(ValueError, match="tfds_dataset reads mnist, fashion_mnist, binarized_mnist"):
        data.tfds_dataset("cifar10")
    with tfds.testing.mock_data(num_examples=N):  # values up to 255: not a binarization
        with pytest.raises(ValueError, match="expected 0/1 pixels") as excinfo:
            data.tfds_dataset("binarized_mnist")
    assert_one_line(excinfo.value)


def test_tfds_not_prepared_is_one_line(tmp_path, assert_one_line):
    with pytest.raises(FileNotFoundError, match="tensorflow-datasets could not load mnist split 'train'") as excinfo:
        data.tfds_dataset("mnist", data_dir=tmp_path, download=False)
    assert_one_line(excinfo.value)
