"""Problems from real data: the out-of-distribution tests of the MS4L2O protocol.

* :func:`image_patch_lasso`: LASSO on 8x8 natural-image patches over a dictionary learned
  with scikit-learn (lam = 0.5). Images: scikit-learn's two sample photographs by
  default, or every image in a folder (BSDS500, say).
* :func:`uci_logistic`: L1 logistic regression on Ionosphere or Spambase (UCI), read
  from a data directory (``TORCH_L2O_DATA``); features z-scored, ``lam = 0.1``.
* :func:`sklearn_logistic`: the same on a data set that ships with scikit-learn
  (``breast_cancer`` by default), so the suite runs with no download.

Each returns a :class:`~torch_l2o.problems.Problem`; data sets are never bundled.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .families import LassoProblem, LogisticProblem

__all__ = ["image_patch_lasso", "uci_logistic", "sklearn_logistic", "data_dir", "UCI_FILES"]

UCI_FILES = {"ionosphere": "ionosphere.data", "spambase": "spambase.data"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def data_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The data directory: ``path``, else the ``TORCH_L2O_DATA`` environment variable."""
    p = path or os.environ.get("TORCH_L2O_DATA")
    return Path(p) if p else None


def _grey_images(folder: str | os.PathLike | None) -> list[np.ndarray]:
    if folder is None:
        from sklearn.datasets import load_sample_images

        return [im.astype(np.float64).mean(-1) for im in load_sample_images().images]
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return [np.asarray(Image.open(f).convert("L"), dtype=np.float64) for f in files]


def _patches(images: list[np.ndarray], count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((count, size * size))
    for i in range(count):
        im = images[rng.integers(len(images))]
        r = rng.integers(im.shape[0] - size + 1)
        c = rng.integers(im.shape[1] - size + 1)
        p = im[r : r + size, c : c + size].reshape(-1)
        p = (p - p.min()) / (p.max() - p.min() + 1e-3)
        out[i] = p - p.mean()
    return out


def image_patch_lasso(images: str | os.PathLike | None = None, *, patches: int = 1000, size: int = 8,
                      atoms: int = 128, lam: float = 0.5, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> LassoProblem:
    """LASSO on natural-image patches: one instance per patch ``b`` (64 values, scaled to
    [0, 1] and mean-removed), a shared ``64 x 128`` dictionary ``A`` with unit-norm atoms,
    learned by scikit-learn's ``MiniBatchDictionaryLearning`` on other patches of the
    same images. ``images``: a folder of images; default: scikit-learn's samples."""
    from sklearn.decomposition import MiniBatchDictionaryLearning

    imgs = _grey_images(images)
    rng = np.random.default_rng(seed)
    train = _patches(imgs, 10 * patches, size, rng)
    test = _patches(imgs, patches, size, rng)
    dl = MiniBatchDictionaryLearning(n_components=atoms, alpha=lam, batch_size=256, max_iter=20,
                                     random_state=seed)
    D = dl.fit(train).components_.T  # (64, atoms)
    D = D / np.maximum(np.linalg.norm(D, axis=0, keepdims=True), 1e-12)
    A = torch.from_numpy(D).expand(patches, -1, -1)
    return LassoProblem(A=A, b=torch.from_numpy(test), prox="l1", prox_params={"lam": lam}).to(dtype=dtype)


def _logistic(X: np.ndarray, y: np.ndarray, lam: float, dtype) -> LogisticProblem:
    std = X.std(0)
    X = (X - X.mean(0)) / np.where(std > 0, std, 1.0)
    W = torch.from_numpy(X)[None]
    return LogisticProblem(W=W, y=torch.from_numpy(y.astype(np.float64))[None], prox="l1",
                           prox_params={"lam": lam}).to(dtype=dtype)


def uci_logistic(name: str, directory: str | os.PathLike | None = None, *, lam: float = 0.1,
                 dtype: torch.dtype = torch.float32) -> LogisticProblem:
    """L1 logistic regression on a UCI data set (``"ionosphere"`` or ``"spambase"``): all
    samples form one instance, features z-scored (a constant feature keeps std 1)."""
    if name not in UCI_FILES:
        raise ValueError(f"unknown UCI data set {name!r}; known: {', '.join(UCI_FILES)}")
    d = data_dir(directory)
    if d is None:
        raise FileNotFoundError(f"{name}: give a data directory (--data-dir or TORCH_L2O_DATA) holding {UCI_FILES[name]}")
    path = d / UCI_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no {UCI_FILES[name]} in {d}")
    rows = [line.strip().split(",") for line in path.read_text().splitlines() if line.strip()]
    X = np.array([[float(v) for v in r[:-1]] for r in rows])
    labels = [r[-1] for r in rows]
    y = np.array([1.0 if v in ("g", "1") else 0.0 for v in labels])
    return _logistic(X, y, lam, dtype)


def sklearn_logistic(name: str = "breast_cancer", *, lam: float = 0.1,
                     dtype: torch.dtype = torch.float32) -> LogisticProblem:
    """L1 logistic regression on a binary data set that ships with scikit-learn."""
    from sklearn import datasets

    loaders = {"breast_cancer": datasets.load_breast_cancer}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; built in: {', '.join(loaders)}")
    X, y = loaders[name](return_X_y=True)
    return _logistic(X.astype(np.float64), y, lam, dtype)
