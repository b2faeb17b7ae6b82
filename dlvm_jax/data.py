"""Datasets, deterministic splits, preprocessing and input validation.

Embedded (no download): scikit-learn's 8x8 digits and a generator of the GMVAE paper's five-arc 'spiral' data.
Files under the data folder (``--data-dir`` on the command line or the ``DLVM_DATA_DIR`` environment variable)::

    DATA_DIR/mnist/            train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
                               t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]
    DATA_DIR/fashion_mnist/    the same four names (Fashion-MNIST); also found in Debian's
                               /usr/share/datasets/fashion-mnist (package dataset-fashion-mnist)
    DATA_DIR/binarized_mnist/  binarized_mnist_{train,valid,test}.amat[.gz] (Larochelle & Murray 2011)
    DATA_DIR/spiral/           spiral.npy (the GMVAE paper's file), arm_label_derived.npy

Every file is checked against the canonical sha256 of its UNCOMPRESSED bytes (so ``.gz`` or not does not matter)
and its structure is checked too (IDX magic number and sizes, ``.amat`` rows of 784 0/1 values); a missing,
truncated or corrupted file ends in ONE line naming the file and where to get it. Parsed files are cached in
this process (keyed by path, size and modification time); nothing is ever written into the data folder.
Optional: :func:`tfds_dataset` reads the same data sets through tensorflow-datasets (the ``tfds`` extra).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

DATA_DIR_ENV = "DLVM_DATA_DIR"


class Dataset(NamedTuple):
    """Train/test arrays (float32, values as the likelihood needs them) and optional integer labels."""

    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray | None = None
    y_test: np.ndarray | None = None
    name: str = ""

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def data_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The data folder: ``path`` if given, else ``$DLVM_DATA_DIR``, else None."""
    if path is not None:
        return Path(path)
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else None


# ------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------


def validate(x: np.ndarray, *, name: str = "data", likelihood: str | None = None,
             data_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Check a data array and return it as float32; raise ``ValueError`` with one line naming the problem."""
    x = np.asarray(x)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ValueError(f"{name} must be a numeric array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, ...) with one row per example, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        kind = "NaN" if np.isnan(x).any() else "infinite values"
        raise ValueError(f"{name} contains {kind} in {rows.size} row(s) (first: row {rows[0]}); "
                         "remove or impute them first")
    if data_shape is not None and tuple(x.shape[1:]) != tuple(data_shape):
        raise ValueError(f"{name} has examples of shape {tuple(x.shape[1:])}, but the model expects "
                         f"{tuple(data_shape)}")
    if likelihood in ("bernoulli", "continuous_bernoulli"):
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"a {likelihood} likelihood needs {name} in [0, 1], but its values span "
                             f"[{lo:.4g}, {hi:.4g}]; rescale the data or use --likelihood gaussian")
    return x


def split(x: np.ndarray, y: np.ndarray | None = None, *, test_fraction: float = 0.2,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Deterministic shuffled train/test split (same ``seed`` -> same split)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = x.shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    test, train = perm[:n_test], perm[n_test:]
    if y is None:
        return x[train], x[test], None, None
    return x[train], x[test], y[train], y[test]


# ------------------------------------------------------------------------------------------------------------
# Embedded data
# ------------------------------------------------------------------------------------------------------------


def digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, flattened to 64 values rescaled to [0, 1] (pixel / 16)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    return Dataset(*split(x, y, test_fraction=test_fraction, seed=seed), name="digits")


#: Geometry of the GMVAE paper's spiral data, fitted to the paper's own file (see shared/data/README.md):
#: five circles of radius 0.363 whose centres lie 0.60 from the origin at polar angles 4 + 72k degrees; on
#: each circle the points sit at an angle (from the centre's direction) of 86 +- 32 degrees (normal), with
#: radial noise sd 0.025; equal arm sizes.
SPIRAL_GEOMETRY = {"arms": 5, "centre_radius": 0.60, "first_angle_deg": 4.0, "circle_radius": 0.363,
                   "arc_mean_deg": 86.0, "arc_sd_deg": 32.0, "radial_sd": 0.025}


def make_spiral(num: int = 5000, *, seed: int = 0, arms: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``num`` points of the five-arc spiral data and their arc labels (float32 (num, 2), int32 (num,))."""
    if num < arms:
        raise ValueError(f"make_spiral needs at least {arms} points, got {num}")
    g = SPIRAL_GEOMETRY
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num) % arms).astype(np.int32)
    phi = np.deg2rad(g["first_angle_deg"] + 360.0 / arms * labels)
    centres = g["centre_radius"] * np.stack([np.cos(phi), np.sin(phi)], axis=1)
    theta = phi + np.deg2rad(g["arc_mean_deg"] + g["arc_sd_deg"] * rng.standard_normal(num))
    radius = g["circle_radius"] + g["radial_sd"] * rng.standard_normal(num)
    x = centres + radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return x.astype(np.float32), labels


def spiral(*, num: int = 5000, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """The generated five-arc spiral, split into train and test."""
    x, y = make_spiral(num, seed=seed)
    return Dataset(*split(x, y, test_fraction=test_fraction, seed=seed), name="spiral")


def load_npy(path: str | os.PathLike, *, name: str | None = None) -> np.ndarray:
    """Load an (N, D) numeric ``.npy`` file (``allow_pickle`` stays off) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path} is not a plain numeric .npy array ({err})") from None
    return validate(x, name=name or path.name)


def paper_spiral(folder: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The GMVAE paper's spiral file ``spiral/spiral.npy`` under the data folder, with the derived arc labels
    (``spiral/arm_label_derived.npy``) when present."""
    root = data_dir(folder)
    if root is None:
        raise FileNotFoundError(f"no data folder: pass --data-dir or set {DATA_DIR_ENV}")
    x = load_npy(root / "spiral" / "spiral.npy")
    label_path = root / "spiral" / "arm_label_derived.npy"
    y = np.load(label_path, allow_pickle=False).astype(np.int32) if label_path.is_file() else None
    return x, y


def standardize(x_train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Centre and scale every array by the training mean and standard deviation (per column)."""
    mean = x_train.mean(0, keepdims=True)
    std = x_train.std(0, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    return tuple((a - mean) / std for a in (x_train,) + others)


def num_batches(num: int, batch_size: int) -> int:
    return math.ceil(num / batch_size)


# ------------------------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------------------------


_UINT8_SCALE = np.arange(256, dtype=np.float32) / np.float32(255.0)


def scale_pixels(pixels: np.ndarray, max_value: float = 255.0) -> np.ndarray:
    """Integer pixel intensities in [0, max_value] -> float32 in [0, 1] (for continuous likelihoods)."""
    pixels = np.asarray(pixels)
    if pixels.dtype == np.uint8 and max_value == 255.0:
        return _UINT8_SCALE[pixels]  # one pass (a table of the 256 values float32(p) / 255)
    return pixels.astype(np.float32) / np.float32(max_value)


def threshold(x: Any, level: float = 0.5) -> Any:
    """Fixed binarization: 1.0 where ``x > level`` else 0.0, same array type (numpy or JAX), float32.

    With ``x = pixel / 255`` and ``level = 0.5`` this is ``pixel > 127.5``, i.e. ``pixel >= 128``.
    """
    return (x > level).astype(np.float32)


def dynamic_binarize(key: Any, x: Any) -> Any:
    """Dynamic binarization (IWAE paper, Burda et al. 2016): ``b ~ Bernoulli(x)`` element-wise, float.

    ``x`` holds probabilities in [0, 1] (grey levels scaled to [0, 1]). A pure, jittable JAX function: the same
    key gives the same draw, so draw a fresh binarization per batch with a fresh key (e.g. ``fold_in(key, step)``);
    ``E[b] = x``.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return jax.random.bernoulli(key, x).astype(dtype)


# ------------------------------------------------------------------------------------------------------------
# Real data files: MNIST, Fashion-MNIST (IDX) and binarized MNIST (.amat)
# ------------------------------------------------------------------------------------------------------------

IMAGE_SHAPE = (28, 28, 1)
NUM_PIXELS = 28 * 28

#: The four IDX files of MNIST and Fashion-MNIST (each may also be gzip-compressed, ``NAME.gz``).
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: Canonical sha256 of the UNCOMPRESSED MNIST IDX files (LeCun, Cortes & Burges).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: sha256 of the UNCOMPRESSED Fashion-MNIST IDX files (Xiao, Rasul & Vollgraf 2017). Upstream
#: (github.com/zalandoresearch/fashion-mnist) publishes only the md5 of its .gz files. These values were computed
#: from the files of Debian's package dataset-fashion-mnist 0.0~git20200523.55506a9-1 (the .deb checked against
#: the Debian archive's SHA256; Debian recompressed the .gz files, so only uncompressed checksums agree across
#: sources) and equal the values pinned by independent public loaders that download upstream's .gz files.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

#: The three files of binarized MNIST (Larochelle & Murray 2011), each may also be ``NAME.gz``.
BINARIZED_MNIST_FILES = {
    "train": "binarized_mnist_train.amat",
    "valid": "binarized_mnist_valid.amat",
    "test": "binarized_mnist_test.amat",
}

#: sha256 of the UNCOMPRESSED .amat text (the values tensorflow-datasets pins for ``binarized_mnist``).
BINARIZED_MNIST_SHA256 = {
    "binarized_mnist_train.amat": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "binarized_mnist_valid.amat": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "binarized_mnist_test.amat": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
}

#: Where Debian's package ``dataset-fashion-mnist`` installs the Fashion-MNIST IDX files (a fallback location).
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_MNIST_HINT = ("download the four IDX files from the MNIST site (http://yann.lecun.com/exdb/mnist/) or the mirror "
               "tensorflow-datasets uses (https://storage.googleapis.com/cvdf-datasets/mnist/) into DIR/mnist and "
               f"pass --data-dir DIR or set {DATA_DIR_ENV}")
_FASHION_HINT = ("download the four IDX files from https://github.com/zalandoresearch/fashion-mnist (data/fashion) "
                 f"into DIR/fashion_mnist and pass --data-dir DIR or set {DATA_DIR_ENV}, or install Debian's "
                 f"dataset-fashion-mnist package ({FASHION_MNIST_SYSTEM_DIR})")
_BINARIZED_HINT = ("download binarized_mnist_{train,valid,test}.amat from "
                   "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/ (the files "
                   f"tensorflow-datasets uses) into DIR/binarized_mnist and pass --data-dir DIR or set {DATA_DIR_ENV}")


class _Problem(Exception):
    """Why a data file is unusable; completed into a one-line ``ValueError`` naming the file and the fix."""


_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(raw: bytes) -> np.ndarray:
    """Parse the bytes of an IDX file (LeCun's format): magic ``00 00 TT NN`` (TT: element type, NN: number of
    dimensions), NN big-endian uint32 sizes, then the values, big-endian, row-major. Raises ``ValueError``."""
    try:
        return _parse_idx(raw)
    except _Problem as err:
        raise ValueError(f"not a valid IDX file: it {err}") from None


def _parse_idx(raw: bytes) -> np.ndarray:
    if len(raw) < 4:
        raise _Problem(f"is too short to be an IDX file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise _Problem(f"is not an IDX file: its magic number is 0x{raw[:4].hex()} (expected 0x0000TTNN, "
                       "e.g. 0x00000803 for images, 0x00000801 for labels)")
    ndim, dtype = raw[3], _IDX_DTYPES[raw[2]]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _Problem(f"is truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(raw) < expected:
        raise _Problem(f"is truncated: its header announces shape {dims} ({expected} bytes) but it holds "
                       f"{len(raw)} bytes")
    if len(raw) > expected:
        raise _Problem(f"has {len(raw) - expected} bytes of trailing data after the shape {dims} its header "
                       "announces")
    x = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return x if dtype.itemsize == 1 else x.astype(dtype.newbyteorder("="))


def parse_amat(raw: bytes, width: int = NUM_PIXELS) -> np.ndarray:
    """Parse ``.amat`` text of 0/1 values (one example per line, ``width`` values separated by white space) into a
    uint8 (N, width) array. Raises ``ValueError``."""
    try:
        return _parse_amat(raw, width)
    except _Problem as err:
        raise ValueError(f"not a valid .amat file of 0/1 values: it {err}") from None


def _parse_amat(raw: bytes, width: int = NUM_PIXELS) -> np.ndarray:
    buf = np.frombuffer(raw, dtype=np.uint8)
    row = 2 * width  # the canonical layout: "d d ... d\n", every value one character
    if buf.size and buf.size % row == 0:
        table = buf.reshape(-1, row)
        values, seps = table[:, 0::2], table[:, 1::2]
        if ((values | 1) == ord("1")).all() and (seps[:, :-1] == ord(" ")).all() and (seps[:, -1] == ord("\n")).all():
            return values - np.uint8(ord("0"))
    # Any other white space: every value must still be a single character 0 or 1.
    is_digit = (buf | 1) == ord("1")
    is_space = (buf == ord(" ")) | (buf == ord("\n")) | (buf == ord("\r")) | (buf == ord("\t"))
    bad = ~(is_digit | is_space)
    if bad.any():
        pos = int(np.argmax(bad))
        raise _Problem(f"holds a character other than 0, 1 and white space ({bytes(buf[pos:pos + 1])!r} at byte "
                       f"{pos})")
    if (is_digit[:-1] & is_digit[1:]).any():
        raise _Problem("holds a value that is not a single 0 or 1")
    digit_at = np.flatnonzero(is_digit)
    line_ends = np.append(np.flatnonzero(buf == ord("\n")), buf.size)
    per_line = np.diff(np.searchsorted(digit_at, line_ends), prepend=0)  # number of values on each line
    rows = np.flatnonzero(per_line)
    if rows.size == 0:
        raise _Problem("holds no values")
    wrong = rows[per_line[rows] != width]
    if wrong.size:
        raise _Problem(f"is truncated or malformed: line {int(wrong[0]) + 1} has {int(per_line[wrong[0]])} values, "
                       f"expected {width}")
    return (buf[digit_at] - np.uint8(ord("0"))).reshape(-1, width)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed if its name ends in ``.gz``."""
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            return gzip.decompress(raw)
        except EOFError:
            raise _Problem("is a truncated gzip file (it ends before the end of its compressed stream)") from None
        except (OSError, zlib.error) as err:
            raise _Problem(f"is not a valid gzip file ({err})") from None
    return raw


@functools.lru_cache(maxsize=12)
def _load_cached(path: str, size: int, mtime_ns: int, fmt: str, sha256: str | None) -> np.ndarray:
    """Read, decompress, parse and verify one file; cached per (path, size, mtime) so a replaced file is re-read.
    The array is shared by every caller: it is read-only."""
    raw = _read_bytes(Path(path))
    x = _parse_idx(raw) if fmt == "idx" else _parse_amat(raw)
    if sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != sha256:
            raise _Problem(f"does not match the canonical file: the sha256 of its uncompressed bytes is "
                           f"{got[:16]}..., expected {sha256[:16]}... (corrupted, or a different version)")
    x.flags.writeable = False
    return x


def _load_file(path: Path, fmt: str, sha256: str | None, label: str, hint: str) -> np.ndarray:
    st = path.stat()
    try:
        return _load_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, fmt, sha256)
    except _Problem as err:
        raise ValueError(f"{label} file {path} {err}; {hint}") from None


def _find_file(folder: Path, name: str, label: str, hint: str) -> Path:
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{label} file {name}(.gz) not found in {folder}; {hint}")


def _locate(folder: str | os.PathLike | None, subdirs: tuple[str, ...], names: tuple[str, ...], label: str,
            hint: str, fallback: tuple[Path, ...] = ()) -> Path:
    """The first folder holding any of ``names`` (or ``NAME.gz``): DATA_DIR/<subdir>, DATA_DIR itself, then the
    fallback locations. Missing everywhere: one line naming the places looked in and where to get the data."""
    root = data_dir(folder)
    candidates = ([root / s for s in subdirs] + [root] if root is not None else []) + list(fallback)
    for cand in candidates:
        if any((cand / n).is_file() or (cand / f"{n}.gz").is_file() for n in names):
            return cand
    where = ", ".join(str(c) for c in candidates)
    if root is None:
        where = (f"{where} (no data folder given: pass --data-dir DIR or set {DATA_DIR_ENV})" if where else
                 f"no data folder given (pass --data-dir DIR or set {DATA_DIR_ENV})")
        raise FileNotFoundError(f"{label} file {names[0]}(.gz) not found: {where}; {hint}")
    raise FileNotFoundError(f"{label} file {names[0]}(.gz) not found in {where}; {hint}")


def _idx_dataset(folder: str | os.PathLike | None, *, label: str, name: str, subdirs: tuple[str, ...],
                 checksums: dict[str, str], hint: str, fallback: tuple[Path, ...], flat: bool,
                 verify: bool) -> Dataset:
    where = _locate(folder, subdirs, tuple(IDX_FILES.values()), label, hint, fallback)
    arrays: dict[str, np.ndarray] = {}
    for key, fname in IDX_FILES.items():
        path = _find_file(where, fname, label, hint)
        x = _load_file(path, "idx", checksums[fname] if verify else None, label, hint)
        # The structure is checked even when the checksum is (with verify=True it holds by construction).
        if key.endswith("images") and (x.dtype != np.uint8 or x.shape[1:] != (28, 28) or x.ndim != 3):
            raise ValueError(f"{label} file {path} holds an array of shape {x.shape} and type {x.dtype}, expected "
                             f"images of shape (N, 28, 28), uint8 (IDX magic 0x00000803); {hint}")
        if key.endswith("labels"):
            if x.dtype != np.uint8 or x.ndim != 1:
                raise ValueError(f"{label} file {path} holds an array of shape {x.shape} and type {x.dtype}, "
                                 f"expected labels of shape (N,), uint8 (IDX magic 0x00000801); {hint}")
            if x.size and int(x.max()) > 9:
                raise ValueError(f"{label} file {path} holds label {int(x.max())}, expected classes 0..9; {hint}")
        arrays[key] = x
    for part in ("train", "test"):
        n_img, n_lab = arrays[f"{part}_images"].shape[0], arrays[f"{part}_labels"].shape[0]
        if n_img != n_lab:
            raise ValueError(f"{label} {part} files in {where} disagree: {n_img} images but {n_lab} labels; {hint}")
    shape = (NUM_PIXELS,) if flat else IMAGE_SHAPE
    x_train = scale_pixels(arrays["train_images"]).reshape((-1,) + shape)
    x_test = scale_pixels(arrays["test_images"]).reshape((-1,) + shape)
    return Dataset(x_train, x_test, arrays["train_labels"].astype(np.int32), arrays["test_labels"].astype(np.int32),
                   name=name)


def mnist(folder: str | os.PathLike | None = None, *, flat: bool = True, verify: bool = True) -> Dataset:
    """MNIST from the four canonical IDX files (``.gz`` or not) in ``DATA_DIR/mnist`` (or ``folder`` itself).

    Returns 60,000 train and 10,000 test images as float32 pixel / 255 in [0, 1], shape (N, 784) (``flat``) or
    (N, 28, 28, 1), and int32 labels 0..9. Binarize with :func:`threshold` (fixed) or :func:`dynamic_binarize`
    (per batch). ``verify=False`` skips the sha256 check (the IDX structure is still checked): for subsets or
    re-encoded copies only.
    """
    return _idx_dataset(folder, label="MNIST", name="mnist", subdirs=("mnist",), checksums=MNIST_SHA256,
                        hint=_MNIST_HINT, fallback=(), flat=flat, verify=verify)


def fashion_mnist(folder: str | os.PathLike | None = None, *, flat: bool = True, verify: bool = True) -> Dataset:
    """Fashion-MNIST, same format and API as :func:`mnist`: the four IDX files in ``DATA_DIR/fashion_mnist``
    (or ``DATA_DIR/fashion-mnist``, or ``folder`` itself), else Debian's :data:`FASHION_MNIST_SYSTEM_DIR`."""
    return _idx_dataset(folder, label="Fashion-MNIST", name="fashion-mnist", subdirs=("fashion_mnist", "fashion-mnist"),
                        checksums=FASHION_MNIST_SHA256, hint=_FASHION_HINT, fallback=(FASHION_MNIST_SYSTEM_DIR,),
                        flat=flat, verify=verify)


def binarized_mnist(folder: str | os.PathLike | None = None, *, with_valid: bool = False, flat: bool = True,
                    verify: bool = True) -> Dataset:
    """The fixed binarization of MNIST by Larochelle & Murray (2011), as used by NADE and the IWAE paper.

    ``binarized_mnist_{train,valid,test}.amat`` (``.gz`` or not) in ``DATA_DIR/binarized_mnist`` (or ``folder``
    itself): train = the 50,000 training rows (``with_valid``: + the 10,000 validation rows), test = the 10,000 test
    rows (sorted by class). float32 values in {0, 1}, shape (N, 784) or (N, 28, 28, 1); no labels.
    """
    label, hint = "binarized MNIST", _BINARIZED_HINT
    where = _locate(folder, ("binarized_mnist",), tuple(BINARIZED_MNIST_FILES.values()), label, hint)
    parts = ("train", "valid", "test") if with_valid else ("train", "test")
    arrays = {}
    for part in parts:
        fname = BINARIZED_MNIST_FILES[part]
        path = _find_file(where, fname, label, hint)
        arrays[part] = _load_file(path, "amat", BINARIZED_MNIST_SHA256[fname] if verify else None, label, hint)
    shape = (NUM_PIXELS,) if flat else IMAGE_SHAPE
    train = np.concatenate([arrays["train"], arrays["valid"]]) if with_valid else arrays["train"]
    return Dataset(train.astype(np.float32).reshape((-1,) + shape),
                   arrays["test"].astype(np.float32).reshape((-1,) + shape), name="binarized-mnist")


# ------------------------------------------------------------------------------------------------------------
# tensorflow-datasets (optional: pip install 'dlvm_jax[tfds]')
# ------------------------------------------------------------------------------------------------------------

#: Data sets :func:`tfds_dataset` reads (tensorflow-datasets names).
TFDS_NAMES = ("mnist", "fashion_mnist", "binarized_mnist")


def tfds_dataset(name: str, *, train_split: str = "train", test_split: str = "test",
                 data_dir: str | os.PathLike | None = None, download: bool = True, flat: bool = True,
                 batch_size: int = 10_000) -> Dataset:
    """``mnist``, ``fashion_mnist`` or ``binarized_mnist`` through tensorflow-datasets, in the same form as the
    file loaders (:func:`mnist` ...): float32 in [0, 1] ({0, 1} for ``binarized_mnist``), int32 labels.

    Splits use tfds syntax (``train_split="train+validation"`` for binarized MNIST's 60,000). tfds needs the
    internet to prepare a data set once (``download=True``) and TensorFlow to read it.
    """
    if name not in TFDS_NAMES:
        raise ValueError(f"tfds_dataset reads {', '.join(TFDS_NAMES)}; got {name!r}")
    # distrax must be imported before TensorFlow (else it looks for tf_keras); dlvm_jax.distributions imports it.
    import dlvm_jax.distributions  # noqa: F401

    try:
        import tensorflow  # noqa: F401
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(f"tfds_dataset needs tensorflow-datasets and TensorFlow ({err}); install them with "
                          "pip install 'dlvm_jax[tfds]', or read the IDX/.amat files with mnist(), "
                          "fashion_mnist() or binarized_mnist()") from None

    def load(split: str) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            ds = tfds.load(name, split=split, data_dir=None if data_dir is None else str(data_dir),
                           download=download, shuffle_files=False)
        except Exception as err:  # tfds raises many types (missing data, no network, bad split): one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise FileNotFoundError(f"tensorflow-datasets could not load {name} split {split!r} "
                                    f"({type(err).__name__}: {first}); it needs the internet to prepare the data "
                                    "once (download=True), or read the files with the IDX/.amat loaders") from err
        images, labels = [], []
        for batch in tfds.as_numpy(ds.batch(batch_size)):
            images.append(batch["image"])
            if "label" in batch:
                labels.append(batch["label"])
        if not images:
            raise ValueError(f"tensorflow-datasets split {split!r} of {name} is empty")
        x = np.concatenate(images)
        if x.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"tensorflow-datasets {name} images have shape {x.shape[1:]}, expected {IMAGE_SHAPE}")
        if name == "binarized_mnist":
            if x.size and int(x.max()) > 1:
                raise ValueError(f"tensorflow-datasets {name} split {split!r} holds values up to {int(x.max())}, "
                                 "expected 0/1 pixels")
            x = x.astype(np.float32)
        else:
            x = scale_pixels(x)
        x = x.reshape((-1, NUM_PIXELS) if flat else (-1,) + IMAGE_SHAPE)
        return x, (np.concatenate(labels).astype(np.int32) if labels else None)

    x_train, y_train = load(train_split)
    x_test, y_test = load(test_split)
    return Dataset(x_train, x_test, y_train, y_test, name=f"tfds:{name}")
