"""Tests for genblocks.metrics.DigitsFeatures: a Frechet distance on a small digits classifier's features."""

import pytest

pytest.importorskip("sklearn", reason="the 8x8 digits ship with scikit-learn (pip install genblocks[data])")

from genblocks.backends import Rng, to_numpy  # noqa: E402
from genblocks.data import load_digits  # noqa: E402
from genblocks.metrics import DigitsFeatures, frechet_distance  # noqa: E402


@pytest.fixture(scope="module")
def feats():
    return DigitsFeatures.train(Rng(0), steps=300)


@pytest.fixture(scope="module")
def splits():
    return {s: load_digits(split=s, backend="numpy")[0] for s in ("train", "valid", "test")}


def test_classifier_learns_the_digits(feats):
    assert feats.accuracy > 0.9, feats
    assert "valid accuracy" in repr(feats)


def test_features_are_the_penultimate_layer(feats, splits):
    x = splits["test"]
    f = feats.features(x)
    assert f.shape == (x.shape[0], 64) and str(f.dtype) == "float64"
    assert (f >= 0).all()  # relu features
    # images as (n, 8, 8) or (n, 8, 8, 1) give the same features
    assert (feats.features(x.reshape(-1, 8, 8, 1)) == f).all()
    with pytest.raises(ValueError, match=r"x: expected 8x8 digit images .* got shape \(3, 10\)"):
        feats.features(x[:3, :10])


def test_frechet_distance_small_between_real_splits_large_against_noise(feats, splits):
    real = feats.frechet_distance(splits["test"], splits["valid"])
    assert real == pytest.approx(frechet_distance(feats.features(splits["test"]), feats.features(splits["valid"])))
    noise = 16.0 * to_numpy(Rng(1, "numpy").uniform((447, 64)))
    fake = feats.frechet_distance(splits["test"], noise)
    # the mean digit for every image: right first moment, no diversity
    mean_digit = splits["train"].mean(axis=0, keepdims=True).repeat(447, axis=0)
    blurry = feats.frechet_distance(splits["test"], mean_digit)
    assert real < 5.0 and fake > 20 * real and blurry > 5 * real, (real, fake, blurry)


def test_training_is_deterministic_given_the_rng(feats, splits):
    again = DigitsFeatures.train(Rng(0), steps=300)
    x = splits["valid"][:50]
    assert (again.features(x) == feats.features(x)).all()
    with pytest.raises(TypeError, match="rng: expected a genblocks Rng"):
        DigitsFeatures.train(0)
