"""Sampled training-set estimates: a fixed, seeded subset of the training set and the
standard error of every figure that is a mean of per-example values.

Why a fixed subset: a replay compares checkpoints with each other, so every checkpoint is
evaluated on the same examples (drawn once, without replacement, from a seeded generator);
the sampling error is then shared by all epochs and largely cancels in their differences.

The estimator. Every mean-type figure Keras reports is a ratio of sums over examples,
``R = sum(a_i) / sum(b_i)``: for the loss ``a_i`` is the example's weighted loss
(``sample_weight * loss``, summed over outputs with their loss weights) and ``b_i = 1``
(Keras divides by the number of examples, not by the sum of weights); for a mean metric
(``accuracy``...) ``a_i = w_i * v_i`` and ``b_i = w_i``. On a simple random sample of ``n``
of ``N`` examples drawn without replacement, the standard (linearised) ratio estimator's
standard error is

    SE(R) = sqrt((1 - n/N) * sum((a_i - R * b_i)**2) / (n * (n - 1))) / mean(b_i)

which is the familiar ``s / sqrt(n)`` for unweighted means, times the finite-population
correction ``sqrt(1 - n/N)``: a sample of the whole set has no sampling error.
"""

from __future__ import annotations

import hashlib
import numbers

import numpy as np

from trueloss_replay.data import ArraySplit, Split, take
from trueloss_replay.errors import DataError

#: The seed used when none is given: the same subset on every machine and every run.
DEFAULT_SAMPLE_SEED = 0
#: Added to a figure's key for its standard error: ``loss_se``, ``accuracy_se``.
SE_SUFFIX = "_se"


class SampledSplit(ArraySplit):
    """A fixed random subset of an array split, evaluated with per-example values.

    Attributes:
        population: the number of examples of the full split.
        indices: the chosen examples' positions in the full split (sorted).
        sample: ``{"size", "seed", "population", "indices_sha256"}``, stored in each result;
            it is also in ``fingerprint``, so a result of another sample (or of the full
            set) is never reused for this one, and vice versa.
    """

    per_example = True

    def __init__(self, full: ArraySplit, indices: np.ndarray, seed: int):
        super().__init__(
            full.name,
            take(full.x, indices),
            take(full.y, indices),
            take(full.sample_weight, indices),
        )
        self.population = full.count
        self.indices = indices
        self.sample = {
            "size": int(len(indices)),
            "seed": int(seed),
            "population": int(full.count),
            "indices_sha256": hashlib.sha256(indices.astype("<i8").tobytes()).hexdigest()[:16],
        }
        # The full set's fingerprint (it names the data) plus which examples were taken.
        self.fingerprint = {**full.fingerprint, "sample": dict(self.sample)}


def sample_size(train_sample: int | float, population: int) -> int:
    """How many examples ``train_sample`` (a count, or a fraction in (0, 1)) asks for.

    Raises:
        DataError: not a positive count or a fraction in (0, 1), fewer than 2 examples
            (no standard error), or more examples than the training set has.
    """
    if isinstance(train_sample, bool) or not isinstance(train_sample, numbers.Real):
        raise DataError(
            f"train_sample={train_sample!r} is neither a count nor a fraction; pass an int "
            "like 4000 or a fraction like 0.1.",
            usage=True,
            argument="train_sample",
        )
    if isinstance(train_sample, numbers.Integral):
        size = int(train_sample)
    elif 0 < float(train_sample) < 1:
        size = int(round(float(train_sample) * population))
    elif float(train_sample).is_integer() and train_sample >= 1:
        size = int(train_sample)
    else:
        raise DataError(
            f"train_sample={train_sample!r} is not a count (an int >= 2) or a fraction in (0, 1).",
            usage=True,
            argument="train_sample",
        )
    if size < 2:
        raise DataError(
            f"train_sample={train_sample!r} selects {size} of the {population} training "
            "examples; a standard error needs at least 2. Pass a larger sample.",
            usage=True,
            argument="train_sample",
        )
    if size > population:
        raise DataError(
            f"train_sample={train_sample!r} asks for more examples than the training data "
            f"has ({population}); pass at most {population}, or leave train_sample out to "
            "evaluate the full set.",
            usage=True,
            argument="train_sample",
        )
    return size


def sample_indices(population: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct positions out of ``population``, sorted, from a seeded generator."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(population, size=size, replace=False)).astype(np.int64)


def sample_split(split: Split, train_sample: int | float, seed: int | None = None) -> SampledSplit:
    """A fixed, seeded random subset of a split (without replacement).

    Args:
        split: the full training split; only array data (``ArraySplit``) can be sampled.
        train_sample: a count (int >= 2) or a fraction in (0, 1) of the split's examples.
        seed: the generator's seed (default ``DEFAULT_SAMPLE_SEED``): the same seed and
            data give the same subset, on any machine.

    Returns:
        The subset, whose ``fingerprint`` and ``sample`` name it.

    Raises:
        DataError: a ``tf.data.Dataset`` or ``PyDataset`` split (a subset of a stream is
            not a fixed set of examples without a full pass), or a bad ``train_sample``.

    Example:
        >>> subset = sample_split(ArraySplit("train", x, y), 0.1, seed=3)
        >>> subset.sample["size"], subset.sample["population"]
        (4000, 40000)
    """
    seed = DEFAULT_SAMPLE_SEED if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DataError(
            f"sample_seed={seed!r} is not a non-negative int.", usage=True, argument="sample_seed"
        )
    if not isinstance(split, ArraySplit):
        raise DataError(
            f"train_sample= needs array training data (x, y[, sample_weight], .npz or .h5); "
            f"the {split.name} data is a {_kind(split)}, which is read as a stream. Pass the "
            "arrays as train=, or leave train_sample out.",
            usage=True,
            argument="train_sample",
        )
    size = sample_size(train_sample, split.count)
    return SampledSplit(split, sample_indices(split.count, size, int(seed)), int(seed))


def _kind(split: Split) -> str:
    kinds = {"DatasetSplit": "tf.data.Dataset", "PyDatasetSplit": "keras.utils.PyDataset"}
    return kinds.get(type(split).__name__, type(split).__name__)


def ratio_standard_error(
    numerators: np.ndarray, denominators: np.ndarray | None = None, population: int | None = None
) -> float:
    """The standard error of ``R = sum(a) / sum(b)`` on a simple random sample.

    ``SE = sqrt((1 - n/N) * sum((a - R*b)**2) / (n*(n-1))) / mean(b)``: the linearised
    ratio estimator with the finite-population correction (module docstring). With ``b``
    all ones it is ``std(a, ddof=1) / sqrt(n) * sqrt(1 - n/N)``.

    Args:
        numerators: ``a_i`` per sampled example (float64 is used).
        denominators: ``b_i`` per example (sample weights); None means all ones.
        population: ``N``, the size of the set sampled from; None means no correction.

    Returns:
        The standard error; NaN with fewer than 2 examples or zero total weight.

    Example:
        >>> ratio_standard_error(np.array([0.0, 1.0, 1.0, 0.0]))  # std 0.577 / sqrt(4)
        0.2886751345948129
    """
    a = np.asarray(numerators, dtype=np.float64).reshape(-1)
    n = a.size
    b = np.ones(n) if denominators is None else np.asarray(denominators, np.float64).reshape(-1)
    total = b.sum()
    if n < 2 or total == 0:
        return float("nan")
    ratio = a.sum() / total
    correction = 1.0 if population is None else max(0.0, 1.0 - n / population)
    variance = correction * np.sum((a - ratio * b) ** 2) / (n * (n - 1))
    return float(np.sqrt(variance) / (total / n))
