"""The Gaussian-mixture baseline: exact log-density, gradients, backends, sampling, errors."""

import numpy as np
import pytest
from autograd.test_util import check_grads
from scipy import stats

from genblocks.backends import Rng, to_device, to_numpy
from genblocks.models.mixture import GaussianMixture


def _params(dtype="float64"):
    return {
        "logits": np.array([0.2, -0.5, 1.0], dtype=dtype),
        "loc": np.array([[0.0, 1.0], [2.0, -1.0], [-1.5, 0.5]], dtype=dtype),
        "log_scale": np.array([[0.1, -0.3], [0.0, 0.2], [-0.5, 0.4]], dtype=dtype),
    }


def _scipy_log_prob(p, x):
    w = np.exp(p["logits"]) / np.exp(p["logits"]).sum()
    dens = sum(w[k] * stats.multivariate_normal(p["loc"][k], np.diag(np.exp(2 * p["log_scale"][k]))).pdf(x)
               for k in range(3))
    return np.log(dens)


def test_log_prob_matches_scipy():
    model, p = GaussianMixture(2, 3), _params()
    x = np.random.default_rng(0).normal(size=(7, 2))
    np.testing.assert_allclose(model.log_prob(p, x), _scipy_log_prob(p, x), rtol=1e-10)


def test_normalised_on_a_grid():
    model, p = GaussianMixture(2, 3), _params()
    g = np.linspace(-8, 8, 401)
    xx, yy = np.meshgrid(g, g)
    dens = np.exp(model.log_prob(p, np.stack([xx.ravel(), yy.ravel()], -1)))
    assert abs(np.trapezoid(np.trapezoid(dens.reshape(xx.shape), g, axis=1), g) - 1.0) < 1e-4


def test_gradients():
    model = GaussianMixture(2, 3)
    x = np.random.default_rng(1).normal(size=(5, 2))
    p = _params()
    check_grads(lambda loc: model.loss({**p, "loc": loc}, x), modes=["rev"], order=1)(p["loc"])
    check_grads(lambda ls: model.loss({**p, "log_scale": ls}, x), modes=["rev"], order=1)(p["log_scale"])
    check_grads(lambda lg: model.loss({**p, "logits": lg}, x), modes=["rev"], order=1)(p["logits"])


def test_backends_agree_and_dtype_follows(backend):
    model = GaussianMixture(2, 3)
    x = np.random.default_rng(2).normal(size=(6, 2)).astype(np.float32)
    ref = model.log_prob(_params("float32"), x)
    got = model.log_prob(to_device(_params("float32"), backend), to_device(x, backend))
    assert to_numpy(got).dtype == np.float32
    np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-5)
    s_ref = model.sample(_params("float32"), Rng(3, "numpy"), 5)
    s = model.sample(to_device(_params("float32"), backend), Rng(3, backend, host_draws=True), 5)
    np.testing.assert_allclose(to_numpy(s), s_ref, rtol=1e-6)


def test_init_dtype_and_shapes(backend):
    p = GaussianMixture(3, 4).init(Rng(0, backend), dtype="float64")
    assert {k: to_numpy(v).shape for k, v in p.items()} == {"logits": (4,), "loc": (4, 3), "log_scale": (4, 3)}
    assert all(to_numpy(v).dtype == np.float64 for v in p.values())


def test_sample_moments():
    model, p = GaussianMixture(2, 3), _params()
    s = model.sample(p, Rng(0), 100_000)
    w = np.exp(p["logits"]) / np.exp(p["logits"]).sum()
    mean = w @ p["loc"]
    second = w @ (np.exp(2 * p["log_scale"]) + p["loc"] ** 2)
    sd = np.sqrt(second - mean**2)
    assert np.all(np.abs(s.mean(0) - mean) < 5 * sd / np.sqrt(len(s)))


def test_loss_terms_responsibilities_sum_to_one():
    model, p = GaussianMixture(2, 3), _params()
    terms = model.loss_terms(p, np.random.default_rng(4).normal(size=(9, 2)))
    assert abs(terms["responsibilities"].sum() - 1.0) < 1e-12 and abs(terms["weights"].sum() - 1.0) < 1e-12


@pytest.mark.parametrize("call, match", [
    (lambda: GaussianMixture(0), "dim"),
    (lambda: GaussianMixture(2, -1), "num_components"),
    (lambda: GaussianMixture(2, 3, init_scale=0.0), "init_scale"),
    (lambda: GaussianMixture(2, 3).log_prob(_params(), np.zeros((4, 3))), "x"),
    (lambda: GaussianMixture(2, 3).init(Rng(0), dtype="int32"), "dtype"),
    (lambda: GaussianMixture(2, 3).sample(_params(), Rng(0), 0), "n"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
