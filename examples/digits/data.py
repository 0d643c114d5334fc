"""Multi-MNIST-style two-digit images composed from the UCI handwritten digits bundled with scikit-learn.

``sklearn.datasets.load_digits`` holds 1,797 grey 8 × 8 digits (values 0..16), no download needed. They are
split into train and test sources *before* any composition, so no source digit is seen in both. Each composed
image puts a left digit near the top-left and a right digit near the bottom-right of a 10 × 14 canvas, each
at a random offset of 0..2 pixels per axis; the two overlap on 2 to 6 of their 8 columns and are merged by a
pixel-wise maximum (as Multi-MNIST overlays two MNIST digits on a 36 × 36 canvas). Tasks: the left digit,
the right digit and, when ``tasks=3``, their sum (0..18), which needs both digits at once.

Two harder settings, both on the training set only (the test set stays full and clean):

- noisy labels: exactly ``round(noisy · n)`` training labels of one task are replaced by a different class
  drawn uniformly, the others stay clean;
- low resource: only a ``low_resource`` fraction of the training source digits (stratified by class) is
  composed into a proportionally smaller training set.

Everything is drawn from one numpy generator seeded with ``seed``: the same arguments give the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

TASK_NAMES = ("left", "right", "sum")
NUM_CLASSES = (10, 10, 19)
CANVAS = (10, 14)  # height, width
MAX_SHIFT = 2  # each digit moves 0..MAX_SHIFT pixels down and right from its anchor
RIGHT_ANCHOR = (0, 4)  # the right digit's top-left corner before its shift (the left digit's is (0, 0))
N_TRAIN, N_TEST = 6000, 2000  # composed images at the default size


@dataclass
class MultiDigits:
    """A composed data set of n images with K task labels.

    Attributes:
        images: (n, 1, H, W) float32 in [0, 1].
        labels: (n, K) int64, the training targets (possibly noisy).
        clean_labels: (n, K) int64, the true labels.
        sources: (n, 2) int64, the indices in ``load_digits()`` of the left and right digit.
    """

    images: Tensor
    labels: Tensor
    clean_labels: Tensor
    sources: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> MultiDigits:
        """The same data on ``device``."""
        return MultiDigits(*(t.to(device) for t in (self.images, self.labels, self.clean_labels, self.sources)))


def compose(
    digits: np.ndarray, digit_labels: np.ndarray, source_ids: np.ndarray, n: int, tasks: int, rng: np.random.Generator
) -> MultiDigits:
    """Compose ``n`` two-digit images from the given source digits (drawn uniformly, with replacement).

    Args:
        digits: (m, 8, 8) source images in [0, 1].
        digit_labels: (m,) their classes.
        source_ids: (m,) their indices in ``load_digits()`` (kept to prove train and test sources are disjoint).
        n: number of images to compose.
        tasks: 2 (left, right) or 3 (left, right, sum).
        rng: the generator every draw comes from.
    """
    pick = rng.integers(0, len(digits), size=(n, 2))
    shifts = rng.integers(0, MAX_SHIFT + 1, size=(n, 2, 2))
    images = np.zeros((n, *CANVAS), dtype=np.float32)
    for i in range(n):
        for side, (row0, col0) in enumerate(((0, 0), RIGHT_ANCHOR)):
            r, c = row0 + shifts[i, side, 0], col0 + shifts[i, side, 1]
            window = images[i, r : r + 8, c : c + 8]
            np.maximum(window, digits[pick[i, side]], out=window)
    left, right = digit_labels[pick[:, 0]], digit_labels[pick[:, 1]]
    labels = np.stack([left, right, left + right][:tasks], axis=1)
    return MultiDigits(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels).long(),
        clean_labels=torch.from_numpy(labels).long(),
        sources=torch.from_numpy(source_ids[pick]).long(),
    )


def flip_labels(data: MultiDigits, task: int, fraction: float, rng: np.random.Generator) -> MultiDigits:
    """Replace exactly ``round(fraction · n)`` labels of ``task`` by a different class, drawn uniformly."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"noisy fraction must be in [0, 1], got {fraction}")
    n, classes = len(data), NUM_CLASSES[task]
    rows = torch.from_numpy(rng.choice(n, size=round(fraction * n), replace=False))
    # An offset in 1..C-1 modulo C moves to each other class with equal probability and never stays.
    offsets = torch.from_numpy(rng.integers(1, classes, size=len(rows)))
    labels = data.labels.clone()
    labels[rows, task] = (labels[rows, task] + offsets) % classes
    return MultiDigits(data.images, labels, data.clean_labels, data.sources)


def make_datasets(
    *,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    tasks: int = 3,
    noisy: float = 0.0,
    noisy_task: int = 0,
    low_resource: float = 1.0,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> tuple[MultiDigits, MultiDigits]:
    """The composed (train, test) sets; see the module docstring for the settings.

    Args:
        n_train: composed training images at full resource (scaled by ``low_resource``).
        n_test: composed test images (always from all test sources, labels always clean).
        tasks: 2 or 3 (see :func:`compose`).
        noisy: fraction of ``noisy_task``'s training labels to flip.
        noisy_task: which task's labels are flipped (0 = left digit).
        low_resource: fraction of the training source digits (and of ``n_train``) to keep, in (0, 1].
        test_fraction: fraction of the 1,797 source digits held out for testing (stratified by class).
        seed: seeds the split, the composition and the flips.
    """
    if tasks not in (2, 3):
        raise ValueError(f"tasks must be 2 or 3, got {tasks}")
    if not 0 <= noisy_task < tasks:
        raise ValueError(f"noisy_task must be in [0, {tasks}), got {noisy_task}")
    if not 0.0 < low_resource <= 1.0:
        raise ValueError(f"low_resource must be in (0, 1], got {low_resource}")
    source = load_digits()
    pixels = (source.images / 16.0).astype(np.float32)
    ids = np.arange(len(pixels))
    train_ids, test_ids = train_test_split(ids, test_size=test_fraction, stratify=source.target, random_state=seed)
    if low_resource < 1.0:
        train_ids, _ = train_test_split(
            train_ids, train_size=low_resource, stratify=source.target[train_ids], random_state=seed
        )
    rng = np.random.default_rng(seed)
    n_kept = max(1, round(n_train * low_resource))
    train = compose(pixels[train_ids], source.target[train_ids], train_ids, n_kept, tasks, rng)
    test = compose(pixels[test_ids], source.target[test_ids], test_ids, n_test, tasks, rng)
    return flip_labels(train, noisy_task, noisy, rng), test
