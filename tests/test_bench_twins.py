"""The PyTorch twins in benchmarks/ compute the same function as the genblocks model they are timed against
(skipped, with the reason printed, where torch is not installed: it is never a genblocks dependency)."""

import pathlib
import sys

import numpy as np
import pytest
from conftest import assert_same_tree

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

from genblocks.backends import Rng  # noqa: E402
from genblocks.models.autoregressive import PixelCNN  # noqa: E402


def test_pixelcnn_twin_gives_genblocks_log_prob_and_keeps_its_masks_through_training():
    torch = pytest.importorskip("torch", reason="torch is not installed (the benchmarks' optional yardstick)")
    from bench_autoregressive import torch_pixelcnn_net

    model = PixelCNN(4, 4, 1, 5, features=4, num_blocks=2)
    params = model.init(Rng(0), "float32")
    x = np.random.default_rng(1).integers(0, 5, size=(6, 4, 4, 1)).astype(np.float32)
    logits, leaves = torch_pixelcnn_net(model, params, "cpu", trainable=True)
    tx = torch.tensor(x).reshape(-1, 1, 4, 4)
    lp = -torch.nn.functional.cross_entropy(logits(tx), tx[:, 0].long(), reduction="none").sum(dim=(1, 2))
    np.testing.assert_allclose(lp.detach().numpy(), model.log_prob(params, x), rtol=1e-5, atol=1e-4)
    # a few optimizer steps move the weights; the type-A centre tap still never sees its own pixel
    opt = torch.optim.Adam(leaves, lr=0.1)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(logits(tx), tx[:, 0].long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe = tx.clone().requires_grad_()
    out = logits(probe)[0, :, 2, 1].sum()
    (grad,) = torch.autograd.grad(out, probe)
    g = grad[0, 0].abs().numpy()
    assert np.all(g.reshape(-1)[2 * 4 + 1:] == 0.0)  # pixel (2, 1) and everything after it in raster order
    assert g.reshape(-1)[:2 * 4 + 1].sum() > 0.0


def test_the_diffusion_twins_categorical_decoder_gives_genblocks_nll_and_round_trips_its_params():
    torch = pytest.importorskip("torch", reason="torch is not installed (the benchmarks' optional yardstick)")
    from bench_diffusion_likelihood import torch_categorical_decoder

    from genblocks.train.recipes import digits_diffusion

    model = digits_diffusion(hidden=(8,), time_embed_dim=8, num_timesteps=20, sigma_min=0.1, decoder="categorical",
                             decoder_channels=4)
    params = model.init(Rng(0), "float32")
    gen = np.random.default_rng(0)
    for leaf in ("bias",):
        params["decoder"][leaf] = gen.normal(size=params["decoder"][leaf].shape).astype(np.float32)
    params["decoder"]["out"]["W"] = gen.normal(size=params["decoder"]["out"]["W"].shape).astype(np.float32)
    x0 = (gen.integers(0, 17, size=(5, 64)) / 8.0 - 1.0).astype(np.float32)
    x1 = (x0 + 0.1 * gen.normal(size=x0.shape)).astype(np.float32)
    leaves, nll, tree = torch_categorical_decoder(model, params["decoder"])
    got = nll(torch.tensor(x0), torch.tensor(x1)).detach().numpy()
    np.testing.assert_allclose(got, model.decoder_nll(params, x0, x1), rtol=1e-4, atol=1e-4)
    assert_same_tree(tree(lambda p: p.detach().numpy()), params["decoder"])  # the same tree, bit for bit
