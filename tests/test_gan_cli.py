"""The GAN family in ``genblocks train / sample / eval``: two players through fit's groups, EMA sampling, resume."""

import numpy as np

from genblocks import cli
from genblocks.families import FAMILIES, build_model
from genblocks.train.checkpoint import load

SMALL = ["--option", "hidden=[8,8]", "--data", "eight_gaussians", "--n", "256", "--batch-size", "64"]


def _leaves(tree):
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in _leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in _leaves(v)]
    return [tree]


def test_gan_trains_samples_and_evaluates_without_a_likelihood(tmp_path, capsys):
    ckpt, out = str(tmp_path / "g.npz"), str(tmp_path / "s.npy")
    assert cli.main(["train", "gan", *SMALL, "--steps", "6", "--out", ckpt]) == 0
    saved = load(ckpt)
    assert saved["step"] == 6 and set(saved["params"]) == {"disc", "gen"}
    assert int(saved["opt_state"]["optimizer"]["disc"]["step"]) == 6  # n_critic = 1: one D update per step
    assert saved["opt_state"]["ema"] is not None
    assert cli.main(["sample", ckpt, "--n", "50", "--out", out]) == 0
    s = np.load(out)
    assert s.shape == (50, 2) and np.isfinite(s).all()
    # samples come from the EMA generator, in the data's units
    family, model, params, _, config = cli._load_checkpoint(ckpt)
    for a, b in zip(_leaves(params), _leaves(saved["opt_state"]["ema"])):
        np.testing.assert_array_equal(a, b)
    capsys.readouterr()
    report = cli.run_eval(ckpt, "eight_gaussians", n=64)
    text = capsys.readouterr().out
    assert report["nll_nats"] is None and report["bits_per_dim"] is None and np.isfinite(report["mmd_standardised"])
    assert "no test NLL (none: a GAN has no likelihood)" in text and "MMD^2" in text
    assert FAMILIES["gan"].log_prob is None


def test_gan_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    whole, part = str(tmp_path / "whole.npz"), str(tmp_path / "part.npz")
    options = [*SMALL, "--option", "pack=2", "--option", "d_lr_scale=2.0"]
    assert cli.main(["train", "gan", *options, "--steps", "8", "--out", whole]) == 0
    assert cli.main(["train", "gan", *options, "--steps", "3", "--out", part]) == 0
    assert cli.main(["train", "gan", *options, "--steps", "8", "--out", part, "--resume"]) == 0
    a, b = load(whole), load(part)
    assert a["step"] == b["step"] == 8
    for x, y in zip(_leaves(a["params"]) + _leaves(a["opt_state"]), _leaves(b["params"]) + _leaves(b["opt_state"])):
        np.testing.assert_array_equal(x, y)
    model = build_model("gan", a["config"]["model"])
    assert model.pack == 2 and model.discriminator.d_in == 4


def test_gan_options_are_checked(tmp_path, capsys):
    bad = str(tmp_path / "b.npz")
    assert cli.main(["train", "gan", *SMALL, "--steps", "2", "--out", bad, "--option", "loss=wgan"]) == 2
    assert "loss: expected one of" in capsys.readouterr().err
