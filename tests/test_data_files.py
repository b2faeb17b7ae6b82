"""data.py on real files: MNIST / Fashion-MNIST IDX files, binarized MNIST .amat files, checksums, one-line errors,
and the binarization preprocessing.

The real-data tests read ``$DLVM_DATA_DIR`` (``mnist/``, ``binarized_mnist/``, ``fashion_mnist/``; Fashion-MNIST
also from Debian's install location) and skip with the reason when it is unset or the files are absent. Every
error-path test writes small fake files into ``tmp_path`` and needs no real data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dlvm_jax import cli, data

_DATA_DIR = os.environ.get(data.DATA_DIR_ENV)

#: MNIST facts from shared/data/README.md (and the MNIST site): training class counts, training pixel mean / 255.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TRAIN_MEAN = 0.1306605


def _has_files(folder: Path, names) -> bool:
    return all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in names)


def _real_dir(sub: str, names) -> Path:
    if not _DATA_DIR:
        pytest.skip(f"{data.DATA_DIR_ENV} is not set: no real data to test")
    folder = Path(_DATA_DIR) / sub
    if not _has_files(folder, names):
        pytest.skip(f"{folder} does not hold {', '.join(names)} (or .gz)")
    return Path(_DATA_DIR)


@pytest.fixture(scope="module")
def real_mnist() -> data.Dataset:
    return data.mnist(_real_dir("mnist", data.IDX_FILES.values()))


@pytest.fixture(scope="module")
def real_binarized() -> data.Dataset:
    return data.binarized_mnist(_real_dir("binarized_mnist", data.BINARIZED_MNIST_FILES.values()), with_valid=True)


# ------------------------------------------------------------------------------------------------------------
# Real files (skip without DLVM_DATA_DIR)
# ------------------------------------------------------------------------------------------------------------


def test_mnist_real_files(real_mnist):
    ds = real_mnist
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0 and ds.x_test.max() == 1.0
    # Every value is an 8-bit grey level / 255, exactly.
    pixels = np.round(ds.x_test * 255)
    np.testing.assert_array_equal(ds.x_test, pixels.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(np.bincount(ds.y_train, minlength=10), MNIST_TRAIN_COUNTS)
    assert np.bincount(ds.y_test, minlength=10).sum() == 10000 and ds.y_test.max() == 9
    # Mean over 47M pixels in float64; the README's value has 7 digits.
    assert abs(ds.x_train.mean(dtype=np.float64) - MNIST_TRAIN_MEAN) < 1e-6
    assert ds.data_shape == (784,) and ds.name == "mnist"


def test_mnist_real_images_and_cache():
    root = _real_dir("mnist", data.IDX_FILES.values())
    flat = data.mnist(root)
    img = data.mnist(root, flat=False)
    assert img.x_train.shape == (60000, 28, 28, 1) and img.data_shape == data.IMAGE_SHAPE
    np.testing.assert_array_equal(img.x_test.reshape(10000, 784), flat.x_test)
    # Callers get their own arrays: changing one does not change the (cached) next result.
    flat.x_train[0] = 7.0
    assert data.mnist(root).x_train[0].max() <= 1.0
    # The folder itself (holding the four files) works too.
    np.testing.assert_array_equal(data.mnist(root / "mnist").y_test, flat.y_test)


def test_binarized_mnist_real_files(real_binarized):
    ds = real_binarized
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)  # 50,000 train + 10,000 valid
    assert ds.x_train.dtype == np.float32 and ds.y_train is None and ds.y_test is None
    assert set(np.unique(ds.x_train)) == {0.0, 1.0} and set(np.unique(ds.x_test)) == {0.0, 1.0}
    # A Bernoulli draw of MNIST's grey levels: the mean is close to the grey-level mean 0.1307 (observed 0.1306).
    assert abs(ds.x_train.mean(dtype=np.float64) - MNIST_TRAIN_MEAN) < 0.002
    root = Path(_DATA_DIR)
    plain = data.binarized_mnist(root)
    assert plain.x_train.shape == (50000, 784)
    np.testing.assert_array_equal(plain.x_train, ds.x_train[:50000])
    np.testing.assert_array_equal(plain.x_test, ds.x_test)
    assert data.binarized_mnist(root, flat=False).x_test.shape == (10000, 28, 28, 1)


def test_fashion_mnist_real_files():
    names = data.IDX_FILES.values()
    if _DATA_DIR and _has_files(Path(_DATA_DIR) / "fashion_mnist", names):
        folder = Path(_DATA_DIR)
    elif _has_files(data.FASHION_MNIST_SYSTEM_DIR, names):
        folder = None  # found through the Debian fallback (or DLVM_DATA_DIR)
    else:
        pytest.skip(f"no Fashion-MNIST files under ${data.DATA_DIR_ENV}/fashion_mnist or "
                    f"{data.FASHION_MNIST_SYSTEM_DIR}")
    ds = data.fashion_mnist(folder)
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(ds.y_train, minlength=10), [6000] * 10)  # balanced by design
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10), [1000] * 10)
    assert ds.name == "fashion-mnist"


def test_cli_registers_the_mnist_family():
    for name in ("mnist", "binarized-mnist", "fashion-mnist"):
        assert name in cli.DATASETS and cli.resolve_source(name, None) == name
    assert cli.DEFAULT_LIKELIHOOD["binarized-mnist"] == "bernoulli"
    assert cli.DEFAULT_LIKELIHOOD["mnist"] in ("bernoulli", "continuous_bernoulli")


def test_cli_load_data_binarized_mnist():
    root = _real_dir("binarized_mnist", data.BINARIZED_MNIST_FILES.values())
    ds = cli.load_data(cli.DataSpec(source="binarized-mnist", data_dir=str(root)), "bernoulli")
    assert ds.x_train.shape == (50000, 784) and ds.x_test.shape == (10000, 784)


# ------------------------------------------------------------------------------------------------------------
# Fake files: structure, checksums and one-line errors (no real data needed)
# ------------------------------------------------------------------------------------------------------------


def _idx_bytes(x: np.ndarray, *, type_code: int = 0x08, magic: bytes | None = None) -> bytes:
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    head = magic if magic is not None else bytes([0, 0, type_code, x.ndim])
    dims = np.asarray(x.shape, dtype=">u4").tobytes()
    return head + dims + np.asarray(x, dtype=dtype).tobytes()


def _write(path: Path, raw: bytes, gz: bool = False) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _fake_mnist(folder: Path, n_train: int = 20, n_test: int = 10, seed: int = 0, gz: bool = True) -> dict:
    """Four small IDX files (train files gzip-compressed when ``gz``); returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
              "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8)}
    for key, name in data.IDX_FILES.items():
        _write(folder / name, _idx_bytes(arrays[key]), gz=gz and key.startswith("train"))
    return arrays


def test_fake_mnist_loads_without_checksum(tmp_path):
    arrays = _fake_mnist(tmp_path / "mnist")
    ds = data.mnist(tmp_path, verify=False)
    assert ds.x_train.shape == (20, 784) and ds.x_test.shape == (10, 784)
    np.testing.assert_array_equal(ds.x_train, arrays["train_images"].reshape(20, 784).astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"])
    assert ds.y_train.dtype == np.int32
    assert data.mnist(tmp_path, flat=False, verify=False).x_test.shape == (10, 28, 28, 1)


def test_checksum_mismatch_is_one_line(tmp_path, assert_one_line):
    _fake_mnist(tmp_path / "mnist")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz does not match the canonical file: the "
                                         r"sha256 .* MNIST site") as excinfo:
        data.mnist(tmp_path)
    assert_one_line(excinfo.value)


def test_checksum_is_of_the_uncompressed_bytes(tmp_path, monkeypatch):
    arrays = _fake_mnist(tmp_path / "mnist", gz=True)
    digests = {name: hashlib.sha256(_idx_bytes(arrays[key])).hexdigest() for key, name in data.IDX_FILES.items()}
    monkeypatch.setattr(data, "MNIST_SHA256", digests)
    ds = data.mnist(tmp_path)  # verify=True: .gz and plain files both pass against the uncompressed digests
    assert ds.x_train.shape == (20, 784)


def test_missing_file_and_missing_folder(tmp_path, monkeypatch, assert_one_line):
    arrays = _fake_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"MNIST file t10k-labels-idx1-ubyte\(\.gz\) not found in .*mnist; "
                                                r"download .* DLVM_DATA_DIR") as excinfo:
        data.mnist(tmp_path, verify=False)
    assert_one_line(excinfo.value)
    del arrays
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*not found in") as excinfo:
        data.mnist(tmp_path / "empty")
    assert_one_line(excinfo.value)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="no data folder given.*--data-dir DIR or set DLVM_DATA_DIR") as excinfo:
        data.mnist()
    assert_one_line(excinfo.value)
    with pytest.raises(FileNotFoundError, match="binarized_mnist_train.amat.*no data folder") as excinfo:
        data.binarized_mnist()
    assert_one_line(excinfo.value)


@pytest.mark.parametrize("corrupt, match", [
    (lambda raw: raw[:-100], r"is truncated: its header announces shape \(20, 28, 28\)"),
    (lambda raw: raw[:10], r"is truncated: 10 bytes, shorter than its 16-byte header"),
    (lambda raw: raw + b"\0" * 5, "5 bytes of trailing data"),
    (lambda raw: b"\x12\x34" + raw[2:], "is not an IDX file: its magic number is 0x12340803"),
    (lambda raw: b"", "too short to be an IDX file"),
])
def test_corrupted_idx_is_one_line(tmp_path, corrupt, match, assert_one_line):
    arrays = _fake_mnist(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(_idx_bytes(arrays["train_images"])))
    with pytest.raises(ValueError, match=match) as excinfo:
        data.mnist(tmp_path, verify=False)
    assert_one_line(excinfo.value)
    assert "MNIST file" in str(excinfo.value) and "download" in str(excinfo.value)


def test_corrupted_gzip_is_one_line(tmp_path, assert_one_line):
    _fake_mnist(tmp_path / "mnist", gz=True)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="is a truncated gzip file") as excinfo:
        data.mnist(tmp_path, verify=False)
    assert_one_line(excinfo.value)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="is not a valid gzip file") as excinfo:
        data.mnist(tmp_path, verify=False)
    assert_one_line(excinfo.value)
    flipped = bytearray(raw)
    flipped[-6] ^= 0xFF  # inside the CRC32 / size trailer
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="is not a valid gzip file") as excinfo:
        data.mnist(tmp_path, verify=False)
    assert_one_line(excinfo.value)


def test_wrong_idx_contents_are_one_line(tmp_path, assert_one_line):
    arrays = _fake_mnist(tmp_path / "mnist", gz=False)
    folder = tmp_path / "mnist"
    # A labels file where the images belong.
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(arrays["test_labels"]))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 28, 28\), uint8") as excinfo:
        data.mnist(tmp_path, verify=False)
    assert_one_line(excinfo.value)
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(arrays["test_images"]))
    # A label out of 0..9.
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.full(10, 12, np.uint8)))
    with pytest.raises(ValueError, match="holds label 12, expected classes 0..9") as excinfo:
        data.mnist(tmp_path, verify=False)
    assert_one_line(excinfo.value)
    # Images and labels disagree in number.
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(9, np.uint8)))
    with pytest.raises(ValueError, match="test files in .* disagree: 10 images but 9 labels") as excinfo:
        data.mnist(tmp_path, verify=False)
    assert_one_line(excinfo.value)


def test_replaced_file_is_reread(tmp_path):
    _fake_mnist(tmp_path / "mnist", n_test=10, gz=False)
    assert data.mnist(tmp_path, verify=False).x_test.shape == (10, 784)
    _fake_mnist(tmp_path / "mnist", n_test=12, seed=1, gz=False)
    assert data.mnist(tmp_path, verify=False).x_test.shape == (12, 784)


@pytest.mark.parametrize("type_code, dtype", [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16),
                                              (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)])
def test_parse_idx_types(type_code, dtype):
    x = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if type_code != 0x08 else np.arange(24, dtype=dtype)
    got = data.parse_idx(_idx_bytes(x, type_code=type_code))
    assert got.dtype == np.dtype(dtype).newbyteorder("=") and got.dtype.isnative
    np.testing.assert_array_equal(got, x)
    with pytest.raises(ValueError, match="not a valid IDX file: it is not an IDX file"):
        data.parse_idx(b"\x00\x00\x07\x01" + bytes(8))  # unknown type code 0x07


def test_fashion_mnist_debian_fallback(tmp_path, monkeypatch, assert_one_line):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = _fake_mnist(system, gz=True)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", system)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    ds = data.fashion_mnist(verify=False)
    np.testing.assert_array_equal(ds.y_train, arrays["train_labels"])
    # DATA_DIR/fashion_mnist comes first.
    mine = _fake_mnist(tmp_path / "data" / "fashion_mnist", n_train=4, seed=3)
    np.testing.assert_array_equal(data.fashion_mnist(tmp_path / "data", verify=False).y_train, mine["train_labels"])
    # The canonical checksums reject the fake files, naming Fashion-MNIST's sources.
    with pytest.raises(ValueError, match="Fashion-MNIST file .* sha256 .*zalandoresearch") as excinfo:
        data.fashion_mnist()
    assert_one_line(excinfo.value)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not found: .*nowhere \\(no data folder given") as excinfo:
        data.fashion_mnist()
    assert_one_line(excinfo.value)


def _amat(x: np.ndarray, newline: str = "\n") -> bytes:
    return "".join(" ".join(str(v) for v in row) + newline for row in x).encode()


def _fake_binarized(folder: Path, sizes=(6, 3, 4), gz: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for (part, name), n in zip(data.BINARIZED_MNIST_FILES.items(), sizes):
        arrays[part] = rng.integers(0, 2, (n, 784), dtype=np.uint8)
        _write(folder / name, _amat(arrays[part]), gz=gz)
    return arrays


def test_fake_binarized_mnist(tmp_path, assert_one_line):
    arrays = _fake_binarized(tmp_path / "binarized_mnist")
    ds = data.binarized_mnist(tmp_path, verify=False)
    np.testing.assert_array_equal(ds.x_train, arrays["train"])
    np.testing.assert_array_equal(ds.x_test, arrays["test"])
    assert ds.x_train.dtype == np.float32 and ds.y_train is None
    both = data.binarized_mnist(tmp_path, with_valid=True, verify=False)
    np.testing.assert_array_equal(both.x_train, np.concatenate([arrays["train"], arrays["valid"]]))
    with pytest.raises(ValueError, match="binarized_mnist_train.amat.gz does not match the canonical file.*"
                                         "larocheh") as excinfo:
        data.binarized_mnist(tmp_path)
    assert_one_line(excinfo.value)


@pytest.mark.parametrize("mangle, match", [
    (lambda raw: raw[:-100], r"is truncated or malformed: line 6 has 734 values, expected 784"),
    (lambda raw: raw.replace(b"1", b"2", 1), r"character other than 0, 1 and white space \(b'2' at byte"),
    (lambda raw: raw.replace(b"0 ", b"00 ", 1), "a value that is not a single 0 or 1"),
    (lambda raw: b"\n\n", "holds no values"),
])
def test_corrupted_amat_is_one_line(tmp_path, mangle, match, assert_one_line):
    arrays = _fake_binarized(tmp_path / "binarized_mnist", gz=False)
    path = tmp_path / "binarized_mnist" / "binarized_mnist_train.amat"
    path.write_bytes(mangle(_amat(arrays["train"])))
    with pytest.raises(ValueError, match=match) as excinfo:
        data.binarized_mnist(tmp_path, verify=False)
    assert_one_line(excinfo.value)
    assert "binarized MNIST file" in str(excinfo.value)


def test_parse_amat_other_white_space():
    x = np.random.default_rng(1).integers(0, 2, (5, 784), dtype=np.uint8)
    np.testing.assert_array_equal(data.parse_amat(_amat(x)), x)  # canonical layout (fast path)
    np.testing.assert_array_equal(data.parse_amat(_amat(x, newline=" \r\n")), x)  # Windows line ends
    np.testing.assert_array_equal(data.parse_amat(b"\n" + _amat(x).replace(b" ", b"\t")), x)  # tabs, blank line
    np.testing.assert_array_equal(data.parse_amat(_amat(x)[:-1]), x)  # no final newline
    with pytest.raises(ValueError, match=r"not a valid \.amat file"):
        data.parse_amat(b"0 1 0\n", width=4)


def test_tfds_missing_is_one_line(monkeypatch, assert_one_line):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if the tfds extra were not installed
    with pytest.raises(ImportError, match=r"tfds_dataset needs tensorflow-datasets and TensorFlow .*dlvm_jax\[tfds\]") \
            as excinfo:
        data.tfds_dataset("mnist")
    assert_one_line(excinfo.value)


# ------------------------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------------------------


def test_scale_pixels_and_threshold():
    pixels = np.arange(256, dtype=np.uint8)
    x = data.scale_pixels(pixels)
    assert x.dtype == np.float32 and x[0] == 0.0 and x[-1] == 1.0
    np.testing.assert_array_equal(x, pixels.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(data.scale_pixels(pixels.astype(np.int32), 255.0), x)
    b = data.threshold(x, 0.5)
    assert b.dtype == np.float32
    np.testing.assert_array_equal(b, (pixels > 127.5).astype(np.float32))  # the seeds' rule: pixel > 127.5
    jb = jax.jit(data.threshold)(x)
    np.testing.assert_array_equal(np.asarray(jb), b)


def test_dynamic_binarize_deterministic_and_unbiased():
    probs = np.linspace(0.0, 1.0, 11, dtype=np.float32)
    n = 20000
    x = np.broadcast_to(probs[:, None], (11, n))
    key = jax.random.key(0)
    b = data.dynamic_binarize(key, x)
    assert b.shape == x.shape and b.dtype == np.float32
    assert set(np.unique(np.asarray(b))) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(data.dynamic_binarize(key, x)), np.asarray(b))  # same key, same draw
    np.testing.assert_array_equal(np.asarray(jax.jit(data.dynamic_binarize)(key, x)), np.asarray(b))  # jittable
    assert not np.array_equal(np.asarray(data.dynamic_binarize(jax.random.key(1), x)), np.asarray(b))
    mean = np.asarray(b).mean(axis=1)
    # E[b] = p; within 5 standard errors sqrt(p (1 - p) / n) (plus float slack for p = 0, 1, which are exact).
    se = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(mean - probs) <= 5 * se + 1e-7), (mean, probs)
    assert mean[0] == 0.0 and mean[-1] == 1.0
