"""Data sets for the experiments: digits (shipped), MNIST / CIFAR-10 (from --data-dir), XOR clusters, modular addition.

Every loader returns float32 CPU tensors; nothing is downloaded.
"""
from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DIGITS_PATH = os.path.join(_DATA, "digits.npz")


@dataclass
class Split:
    """A train/test split: ``x_*: [N, *shape]`` float32, ``y_*: [N]`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    num_classes: int

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """The 1797 scikit-learn digits shipped in ``grokalign_fast/data/digits.npz``: (uint8 [N, 8, 8] in 0..16, labels)."""
    with np.load(DIGITS_PATH) as d:
        return d["images"], d["labels"].astype(np.int64)


def _split(x: torch.Tensor, y: torch.Tensor, n_train: int, split_seed: int, name: str, classes: int) -> Split:
    if not 0 < n_train < len(x):
        raise ValueError(f"n_train must be in (0, {len(x)}), got {n_train}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    tr, te = perm[:n_train], perm[n_train:]
    return Split(x[tr], y[tr], x[te], y[te], name, classes)


def digits(n_train: int = 1000, *, split_seed: int = 0, flatten: bool = True, classes=None) -> Split:
    """Digits scaled to [0, 1] (inputs / 16): ``n_train`` random training samples, the rest for test.

    ``flatten``: ``[N, 64]`` (MLP) or ``[N, 1, 8, 8]`` (CNN). ``classes``: keep only these
    labels, relabelled 0..k-1 in the given order.
    """
    images, labels = load_digits_arrays()
    x = torch.from_numpy(images.astype(np.float32) / 16.0)
    y = torch.from_numpy(labels)
    if classes is not None:
        keep = torch.zeros(len(y), dtype=torch.bool)
        new = torch.full_like(y, -1)
        for i, c in enumerate(classes):
            keep |= y == c
            new[y == c] = i
        x, y = x[keep], new[keep]
    x = x.reshape(len(x), -1) if flatten else x.reshape(len(x), 1, 8, 8)
    k = 10 if classes is None else len(classes)
    return _split(x, y, n_train, split_seed, "digits" if classes is None else f"digits{list(classes)}", k)


# ------------------------------------------------------------------ MNIST (IDX files)

_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find(data_dir: str, stem: str) -> Optional[str]:
    for root in (data_dir, os.path.join(data_dir, "MNIST", "raw"), os.path.join(data_dir, "mnist")):
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
            p = os.path.join(root, name)
            if os.path.isfile(p):
                return p
    return None


def mnist_available(data_dir: Optional[str]) -> bool:
    return bool(data_dir) and all(_find(data_dir, s) is not None for s in _MNIST_FILES.values())


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the MNIST format (magic, dims, big-endian uint8 data)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {arr.size}")
    return arr.reshape(dims)


def mnist(data_dir: str, n_train: int = 1000, *, split_seed: int = 0, flatten: bool = True) -> Split:
    """MNIST from the four standard IDX files in ``data_dir``: ``n_train`` random training images, the 10k test set."""
    paths = {k: _find(data_dir, s) for k, s in _MNIST_FILES.items()}
    missing = [_MNIST_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(f"MNIST IDX files not found in {data_dir!r}: {missing}")
    xtr = torch.from_numpy(read_idx(paths["train_x"]).astype(np.float32) / 255.0)
    ytr = torch.from_numpy(read_idx(paths["train_y"]).astype(np.int64))
    xte = torch.from_numpy(read_idx(paths["test_x"]).astype(np.float32) / 255.0)
    yte = torch.from_numpy(read_idx(paths["test_y"]).astype(np.int64))
    idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(split_seed))[:n_train]
    xtr, ytr = xtr[idx], ytr[idx]
    shape = (-1,) if flatten else (1, 28, 28)
    return Split(xtr.reshape(len(xtr), *shape), ytr, xte.reshape(len(xte), *shape), yte, "mnist", 10)


# ------------------------------------------------------------------ CIFAR-10 (python pickles)


def _cifar_dir(data_dir: Optional[str]) -> Optional[str]:
    if not data_dir:
        return None
    for d in (os.path.join(data_dir, "cifar-10-batches-py"), data_dir):
        if os.path.isfile(os.path.join(d, "data_batch_1")) and os.path.isfile(os.path.join(d, "test_batch")):
            return d
    return None


def cifar10_available(data_dir: Optional[str]) -> bool:
    return _cifar_dir(data_dir) is not None


def cifar10(data_dir: str, n_train: int = 5000, n_test: int = 1000, *, split_seed: int = 0) -> Split:
    """CIFAR-10 from the python pickle batches (``cifar-10-batches-py``): random subsets, [N, 3, 32, 32] in [0, 1]."""
    d = _cifar_dir(data_dir)
    if d is None:
        raise FileNotFoundError(f"cifar-10-batches-py not found in {data_dir!r}")

    def load(name):
        with open(os.path.join(d, name), "rb") as f:
            b = pickle.load(f, encoding="bytes")
        return np.asarray(b[b"data"], dtype=np.uint8), np.asarray(b[b"labels"], dtype=np.int64)

    parts = [load(f"data_batch_{i}") for i in range(1, 6) if os.path.isfile(os.path.join(d, f"data_batch_{i}"))]
    xtr = np.concatenate([p[0] for p in parts]); ytr = np.concatenate([p[1] for p in parts])
    xte, yte = load("test_batch")
    g = torch.Generator().manual_seed(split_seed)
    itr = torch.randperm(len(xtr), generator=g)[:n_train].numpy()
    ite = torch.randperm(len(xte), generator=g)[:n_test].numpy()

    def conv(x):
        return torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 3, 32, 32)

    return Split(conv(xtr[itr]), torch.from_numpy(ytr[itr]), conv(xte[ite]), torch.from_numpy(yte[ite]), "cifar10", 10)


# ------------------------------------------------------------------ synthetic


def xor_clusters(n: int, p: int, eps: float, *, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """XOR cluster data (Xu et al.): ``x = (s1, s2, noise)``, ``s_i`` uniform in {-1, +1}, the other
    ``p - 2`` coordinates uniform in {-eps, +eps}; label ``y = s1 * s2`` in {-1, +1}. Returns ([n, p], [n])."""
    if p < 3:
        raise ValueError(f"p must be >= 3, got {p}")
    signs = torch.randint(0, 2, (n, p), generator=generator).float().mul_(2).sub_(1)
    x = signs.clone()
    x[:, 2:] *= eps
    y = signs[:, 0] * signs[:, 1]
    return x, y


def modular_addition(p: int, train_frac: float, *, seed: int = 0):
    """All pairs (a, b) with label (a + b) mod p; tokens ``[a, b, p]`` (p is the "=" token).

    Returns (tokens_train [N, 3], y_train, tokens_test, y_test), a random ``train_frac`` split.
    """
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    y = (a + b) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    k = int(round(train_frac * p * p))
    return tokens[perm[:k]], y[perm[:k]], tokens[perm[k:]], y[perm[k:]]
