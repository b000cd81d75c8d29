"""Tests of vae_lstm.py: `pytest test_vae_lstm.py`, under a minute on 2 CPU cores.

Most tests run on tiny MNIST-format files written here; one trains briefly on the real
MNIST, found at $VAE_LSTM_MNIST, else at ../shared/mnist or ./data beside this file.
"""
import contextlib
import csv
import errno
import io
import json
import math
import os
import pickle
import re
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vae_lstm
from vae_lstm import CONFIG, VAE, EarlyStopping, evaluate, main, split_indices, train_epoch, vae_loss

HERE = Path(__file__).resolve().parent
TINY_TRAIN, TINY_TEST = 200, 50  # 180 training images: batches of 64, 64 and a short 52
TINY_EPOCHS = 6

# The report's Figure 1: every parameter's name and shape (175,665 in all).
REPORT_PARAMETERS = {
    "encoder_lstm.weight_ih_l0": (256, 28), "encoder_lstm.weight_hh_l0": (256, 64),
    "encoder_lstm.bias_ih_l0": (256,), "encoder_lstm.bias_hh_l0": (256,),
    "encoder_lstm.weight_ih_l0_reverse": (256, 28), "encoder_lstm.weight_hh_l0_reverse": (256, 64),
    "encoder_lstm.bias_ih_l0_reverse": (256,), "encoder_lstm.bias_hh_l0_reverse": (256,),
    "encoder_mu.weight": (64, 128), "encoder_mu.bias": (64,),
    "encoder_logvar.weight": (64, 128), "encoder_logvar.bias": (64,),
    "decoder_fc.weight": (64, 64), "decoder_fc.bias": (64,),
    "decoder_list.0.weight": (64, 64, 4, 4), "decoder_list.0.bias": (64,),
    "decoder_list.1.weight": (64, 32, 4, 4), "decoder_list.1.bias": (32,),
    "decoder_list.2.weight": (32, 16, 4, 4), "decoder_list.2.bias": (16,),
    "decoder_list.3.weight": (16, 1, 4, 4), "decoder_list.3.bias": (1,),
}


def write_idx(path, array):
    """An MNIST (IDX) file: magic 0x08 0x<ndim>, big-endian sizes, then the uint8 values."""
    path.write_bytes(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def write_tiny_mnist(root, grey=False):
    """Tiny MNIST in torchvision's layout, root/MNIST/raw: strokes of random length and slope, white, or
    with grey=True of random grey levels, as the edges of MNIST's strokes are."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", TINY_TRAIN), ("t10k", TINY_TEST)):
        images = np.zeros((n, 28, 28), np.uint8)
        for image in images:
            top, bottom = sorted(rng.integers(3, 25, size=2))
            column, slope = rng.integers(8, 20), rng.uniform(-0.4, 0.4)
            for row in range(top, bottom + 1):
                x = int(column + slope * (row - top))
                image[row, x - 1:x + 2] = 255
        if grey:
            images = (images * rng.uniform(0.2, 1.0, images.shape)).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return root


def real_mnist():
    if "VAE_LSTM_MNIST" in os.environ:  # set by .ci/run: there the test must run, never skip
        return Path(os.environ["VAE_LSTM_MNIST"])
    found = [path for path in (HERE.parent / "shared" / "mnist", HERE / "data") if (path / "MNIST" / "raw").is_dir()]
    if not found:
        pytest.skip("no real MNIST here: set VAE_LSTM_MNIST to the folder holding MNIST/raw")
    return found[0]


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("mnist"))


def train_args(data, out, *extra):
    return ["train", "--data-dir", str(data), "--epochs", str(TINY_EPOCHS), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference_run(tiny_mnist, tmp_path_factory):
    """The whole `train` command, for the tests below to inspect: its folder and what it printed."""
    out, printed = tmp_path_factory.mktemp("reference"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(train_args(tiny_mnist, out)) == 0
    return out, printed.getvalue()


VARIANTS = {"small": ["--unidirectional", "--hidden-size", "16", "--latent-dim", "8", "--no-decoder-fc"],
            "first-encoder": ["--no-encoder-fc", "--hidden-size", "16"]}


@pytest.fixture(scope="module")
def variant_runs(tiny_mnist, tmp_path_factory):
    """A run of each of two variants of the report's model that its design flags build."""
    runs = {name: tmp_path_factory.mktemp(name) for name in VARIANTS}
    with contextlib.redirect_stdout(io.StringIO()):
        for name, flags in VARIANTS.items():
            assert main(train_args(tiny_mnist, runs[name], *flags)) == 0
    return runs


def variant(**changes):
    """The config of a variant of the report's model."""
    return {**CONFIG, **changes}


def losses(results):
    """The nine per-image losses of a results.json, flat: {"train bce": ..., "test total": ...}."""
    return {f"{split} {name}": results[split][name]
            for split in ("train", "val", "test") for name in ("bce", "kl", "total")}


def read_results(out):
    return json.loads((out / "results.json").read_text())


def one_error_line(captured, *words):
    """The user sees exactly one line, with these words, and no traceback."""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    for word in words:
        assert word in lines[0]


# ----------------------------------------------------------------------------------------------
# Model and loss


def test_model_has_the_report_layers_and_parameter_count():
    model = VAE()
    assert {name: tuple(p.shape) for name, p in model.state_dict().items()} == REPORT_PARAMETERS
    assert sum(p.numel() for p in model.parameters()) == 175_665
    layers = str(model)
    assert "LSTM(28, 64, batch_first=True, bidirectional=True)" in layers
    assert "ConvTranspose2d(32, 16, kernel_size=(4, 4), stride=(2, 2), padding=(1, 1))" in layers
    for x in (torch.rand(5, 28, 28), torch.rand(5, 1, 28, 28)):
        recon, mu, logvar = model(x)
        assert recon.shape == (5, 1, 28, 28) and mu.shape == logvar.shape == (5, 64)
        assert 0 <= recon.min() and recon.max() <= 1


def test_each_direction_of_the_encoder_reads_every_row_into_mu():
    torch.manual_seed(0)
    model, x = VAE(), torch.rand(1, 28, 28)
    for kept in (slice(0, 64), slice(64, 128)):  # mu from the forward direction's final state, then the backward's
        with torch.no_grad():
            weight = model.encoder_mu.weight.clone()
            model.encoder_mu.weight.zero_()
            model.encoder_mu.weight[:, kept] = weight[:, kept]
        for row in (0, 27):  # the first row reaches the end of the backward pass, the last that of the forward
            changed = x.clone()
            changed[0, row] = 1 - changed[0, row]
            assert not torch.allclose(model.encode(changed)[0], model.encode(x)[0]), (kept, row)
        with torch.no_grad():
            model.encoder_mu.weight.copy_(weight)


def test_kl_equals_torch_distributions():
    mu, logvar = torch.randn(8, 64), torch.randn(8, 64)
    x = torch.rand(8, 1, 28, 28)
    recon = torch.rand(8, 1, 28, 28).clamp(0.01, 0.99)
    total, bce, kl = vae_loss(recon, x, mu, logvar, kl_weight=2.0)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(64), torch.ones(64))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, p).sum())
    torch.testing.assert_close(bce, -(x * recon.log() + (1 - x) * (1 - recon).log()).sum())
    torch.testing.assert_close(total, bce + 2.0 * kl)


def deterministic_vae():
    """A VAE whose sigma is ~exp(-50): z = mu, so its losses do not depend on the noise."""
    torch.manual_seed(1)
    model = VAE()
    with torch.no_grad():
        model.encoder_logvar.weight.zero_()
        model.encoder_logvar.bias.fill_(-100.0)
    return model


def test_losses_are_averaged_over_the_images_seen_with_a_short_last_batch():
    model, images = deterministic_vae(), torch.rand(100, 28, 28)  # batches of 64 and 36
    recon, mu, logvar = model(images)
    expected = [value.item() / 100 for value in vae_loss(recon, images, mu, logvar)]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)  # a pass that changes no weight
    for result in (train_epoch(model, optimizer, images, 64, 1.0, epoch=1), evaluate(model, images)):
        assert [result["total"], result["bce"], result["kl"]] == pytest.approx(expected, rel=1e-5)
        assert result["total"] != pytest.approx(expected[0] * 100 / 128, rel=1e-3)  # the report's batches x 64


# ----------------------------------------------------------------------------------------------
# Data and split


def test_split_is_the_report_legacy_numpy_shuffle():
    np.random.seed(3136)
    report_order = list(range(60000))
    np.random.shuffle(report_order)
    train_idx, val_idx = split_indices()
    assert val_idx == report_order[:6000] and train_idx == report_order[6000:]
    assert len(train_idx) == 54000 and len(val_idx) == 6000
    assert set(train_idx).isdisjoint(val_idx) and set(train_idx) | set(val_idx) == set(range(60000))


def test_real_mnist_loads_splits_and_trains_briefly():
    root = real_mnist()
    train_images, val_images = vae_lstm.load_train_val(root, 0.1, 3136)
    full = vae_lstm.load_mnist(root, train=True)
    assert train_images.shape == (54000, 28, 28) and val_images.shape == (6000, 28, 28)
    torch.testing.assert_close(val_images, full[split_indices()[1]])
    assert full.min() == 0 and full.max() == 1 and full.dtype == torch.float32
    assert len(vae_lstm.load_mnist(root, train=False)) == 10000

    torch.manual_seed(0)
    model = VAE()
    before = evaluate(model, val_images[:2000])["total"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_epoch(model, optimizer, train_images[:3200], 64, 1.0, epoch=1)
    after = evaluate(model, val_images[:2000])
    assert before > 500 and after["total"] < 240, (before, after)  # 50 Adam steps learn the digits' shape
    assert 0 < after["kl"] < after["bce"]


# ----------------------------------------------------------------------------------------------
# Training: early stopping, checkpoints, the whole command line


def test_early_stopping_counts_epochs_without_improvement():
    stopper = EarlyStopping(patience=2)
    verdicts = [(stopper.step(loss), stopper.should_stop) for loss in (5.0, 4.0, 4.0, 3.0, 3.5, 3.2)]
    assert verdicts == [(True, False), (True, False), (False, False), (True, False), (False, False), (False, True)]


def test_training_stops_at_the_right_epoch_keeps_the_best_and_resumes_to_nothing(tiny_mnist, tmp_path, monkeypatch,
                                                                                capsys):
    val_totals = iter([9.0, 8.0, 7.0, 7.5, 7.2, 7.0, 8.0])  # best at 3, then 3 epochs without a better one
    scripted, evaluated = {"bce": 1.0, "kl": 1.0, "total": 2.0}, []

    def train_epoch(model, *args):  # each epoch leaves its number in a weight
        with torch.no_grad():
            model.decoder_fc.bias[0] = args[4]
        return scripted

    def evaluate(model, *args):
        evaluated.append(int(model.decoder_fc.bias[0]))
        return {**scripted, "total": next(val_totals, 2.0)}
    monkeypatch.setattr(vae_lstm, "train_epoch", train_epoch)
    monkeypatch.setattr(vae_lstm, "evaluate", evaluate)
    assert main(train_args(tiny_mnist, tmp_path, "--epochs", "50", "--patience", "3")) == 0
    results = read_results(tmp_path)
    assert results["epochs_run"] == 6 and results["best_epoch"] == 3
    assert results["stop_reason"].startswith("early stopping")
    assert torch.load(tmp_path / "best_model.pt", weights_only=True)["epoch"] == 3
    assert evaluated == [1, 2, 3, 4, 5, 6, 3, 3, 3]  # validation after each epoch, then the best model tested
    capsys.readouterr()

    def no_training(*args):
        raise AssertionError("trained again")
    monkeypatch.setattr(vae_lstm, "train_epoch", no_training)
    assert main(train_args(tiny_mnist, tmp_path, "--epochs", "80", "--patience", "3", "--resume")) == 0
    assert "early stopping ended this run at epoch 6" in capsys.readouterr().out
    results = read_results(tmp_path)
    assert results["epochs_run"] == 6 and results["stop_reason"].startswith("early stopping")


def test_checkpoint_round_trip_and_a_bare_report_state_dict(tmp_path):
    model = VAE()
    vae_lstm.save_checkpoint({"config": CONFIG, "model": model.state_dict(), "epoch": 1,
                              "val_loss": 1.0}, tmp_path / "best_model.pt")
    torch.save(model.state_dict(), tmp_path / "report.pt")  # what the report's code saved
    x = torch.rand(4, 28, 28)
    expected = model.eval()(x, torch.Generator().manual_seed(0))[0]
    for name in ("best_model.pt", "report.pt"):
        loaded, config = vae_lstm.load_model(tmp_path / name, "cpu")
        assert config["latent_dim"] == 64
        assert torch.equal(loaded.eval()(x, torch.Generator().manual_seed(0))[0], expected)
    VAE().load_state_dict(torch.load(tmp_path / "report.pt", weights_only=True), strict=True)


def test_train_command_writes_every_artifact(reference_run):
    out, stdout = reference_run
    checkpoint = torch.load(out / "best_model.pt", weights_only=True)
    assert set(checkpoint) == {"config", "model", "epoch", "val_loss"}
    assert checkpoint["config"]["latent_dim"] == 64 and checkpoint["config"]["lr"] == 1e-3
    rows = (out / "history.csv").read_text().splitlines()
    assert rows[0].split(",")[:7] == ["epoch", "train_bce", "train_kl", "train_total", "val_bce", "val_kl", "val_total"]
    assert "seconds" in rows[0] and len(rows) == 1 + TINY_EPOCHS
    val_totals = [float(row.split(",")[6]) for row in rows[1:]]
    assert checkpoint["epoch"] == 1 + val_totals.index(min(val_totals))
    assert checkpoint["val_loss"] == pytest.approx(min(val_totals))

    results = read_results(out)
    assert results["best_epoch"] == checkpoint["epoch"] and results["epochs_run"] == TINY_EPOCHS
    assert results["stop_reason"] == f"reached --epochs {TINY_EPOCHS}"
    assert results["val"]["total"] == pytest.approx(checkpoint["val_loss"], rel=1e-6)  # the best model was tested
    for split in ("train", "val", "test"):
        bce, kl, total = (results[split][name] for name in ("bce", "kl", "total"))
        assert 0 < kl and 0 < bce < 784 * math.log(2) * 2 and total == pytest.approx(bce + kl)
    assert results["seconds"] > 0 and results["train_images_per_second"] > 0
    assert "97.57" in stdout and f"{results['test']['total']:.2f}" in stdout  # beside the report's numbers

    assert Image.open(out / "loss_plot.png").size == (700, 450)
    for name, size in (("train_reconstruction.png", (302, 62)), ("test_reconstruction.png", (302, 62)),
                       ("generated.png", (302, 302))):
        pixels = np.asarray(Image.open(out / name).convert("L"), dtype=float)
        assert pixels.shape[::-1] == size and pixels.std() > 10, name  # a grid of 28x28 images, not blank
    written = ["best_model.pt", "last.pt", "history.csv", "results.json", "loss_plot.png", "train_reconstruction.png",
               "test_reconstruction.png", "generated.png", *vae_lstm.EXPLORATION_FILES]
    umask = os.umask(0o022)
    os.umask(umask)
    assert {name: stat.S_IMODE((out / name).stat().st_mode) for name in written} == dict.fromkeys(written,
                                                                                               0o666 & ~umask)


def test_generate_and_evaluate_commands(reference_run, tiny_mnist, capsys):
    out = reference_run[0]
    checkpoint = out / "best_model.pt"
    assert main(["generate", "--checkpoint", str(checkpoint), "--n", "7", "--out", str(out / "seven.png")]) == 0
    assert Image.open(out / "seven.png").size == (2 + 7 * 30, 32)  # one row of 7, torchvision's 2-pixel padding

    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data-dir", str(tiny_mnist), "--iw-samples", "5"]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    results = read_results(out)
    assert evaluation["images"] == TINY_TEST and evaluation["iw_samples"] == 5
    assert evaluation["total"] == pytest.approx(results["test"]["total"], rel=1e-6)  # same z: same numbers
    assert 0 < evaluation["iw_bound"] < evaluation["total"] + 5 and "iw_nll" not in evaluation  # grey levels
    assert "not a log-likelihood" in evaluation["iw_meaning"] and evaluation["iw_seconds"] > 0
    assert "bound of the report's objective" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# The importance-weighted estimate (of -log p(x) where the pixels are binary)


def test_importance_weighted_estimate_with_one_sample_is_the_negative_elbo_of_that_z():
    model, x = VAE().eval(), torch.rand(6, 28, 28)
    estimate = vae_lstm.importance_weighted_nll(model, x, n_samples=1)
    mu, logvar = model.encode(x)
    generator = torch.Generator().manual_seed(vae_lstm.EVAL_SEED)
    z = model.reparametrize(mu, logvar, generator)
    bce = torch.nn.functional.binary_cross_entropy(model.decode(z), x.unsqueeze(1), reduction="none").sum((1, 2, 3))
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    log_p_z = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(estimate, (bce - log_p_z + q.log_prob(z).sum(1)).detach(), rtol=1e-5, atol=1e-3)


def test_the_importance_weighted_estimate_tightens_as_k_grows():
    torch.manual_seed(0)
    model, x = VAE().eval(), torch.rand(10, 28, 28)
    with torch.no_grad():  # a posterior of sigma = e^0.5 around mu = 1: far from the prior, so K matters
        model.encoder_mu.bias.fill_(1.0)
        model.encoder_logvar.bias.fill_(1.0)
    estimates = [vae_lstm.importance_weighted_nll(model, x, k).mean().item() for k in (1, 10, 300)]
    assert estimates[0] > estimates[1] + 10 > estimates[2] + 20 > 20  # the negative ELBO, then ever tighter bounds


def test_fast_importance_weighted_estimate_equals_the_straightforward_computation_for_the_same_draws():
    model, x, n_samples = VAE().eval(), torch.rand(6, 28, 28), 37
    fast = vae_lstm.importance_weighted_nll(model, x, n_samples, chunk=50)  # chunks that straddle images

    mu, logvar = model.encode(x)  # as the code did before: one draw, one decoder call, torch.distributions
    eps = torch.randn((6, n_samples, 64), generator=torch.Generator().manual_seed(vae_lstm.EVAL_SEED))
    z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
    recon = model.decode(z.reshape(-1, 64)).reshape(6, n_samples, 784)
    target = x.reshape(6, 1, 784).expand_as(recon)
    log_likelihood = -torch.nn.functional.binary_cross_entropy(recon, target, reduction="none").sum(-1)
    posterior = torch.distributions.Normal(mu.unsqueeze(1), torch.exp(0.5 * logvar).unsqueeze(1))
    prior = torch.distributions.Normal(0.0, 1.0)
    log_weights = log_likelihood + prior.log_prob(z).sum(-1) - posterior.log_prob(z).sum(-1)
    expected = math.log(n_samples) - torch.logsumexp(log_weights, dim=1)
    torch.testing.assert_close(fast, expected.detach(), rtol=1e-5, atol=1e-3)
    assert model.decoder_list[1].weight.is_contiguous()  # the caller's model keeps its layout


def test_the_fast_decoder_equals_decode_for_every_decoder(monkeypatch):
    for model in (VAE(), VAE(variant(latent_dim=16, decoder_fc=False)),
                  VAE(variant(hidden_size=32, latent_dim=32, encoder_fc=False))):
        z = torch.randn(300, model.latent_dim)
        with torch.no_grad():
            torch.testing.assert_close(vae_lstm.fast_decoder(model.eval())(z), model.decode(z), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Binarized MNIST (Burda et al., 2016): dynamic binarization for training, a fixed one for measuring

# The nine losses of the tiny reference run by the code before --binarize and the design flags existed, on an
# AMD EPYC with torch 2.14.1. Another CPU or torch build rounds differently (about 1e-6 here); one more random
# draw per epoch moves them by 0.5 to 3 %.
LOSSES_BEFORE_THE_FLAGS = {
    "train bce": 265.4654730902778, "train kl": 0.9484239366319445, "train total": 266.4138888888889,
    "val bce": 229.3482421875, "val kl": 0.9450061798095704, "val total": 230.2932373046875,
    "test bce": 272.4857421875, "test kl": 0.9482423400878907, "test total": 273.433984375,
}


def test_without_the_new_flags_a_run_gives_the_numbers_of_the_code_before_them(reference_run):
    if vae_lstm.resolve_device("auto").type != "cpu":
        pytest.skip("these numbers were measured on the CPU, and `train` here ran on a GPU")
    checkpoint = torch.load(reference_run[0] / "best_model.pt", weights_only=True)
    assert checkpoint["config"]["binarize"] is False and checkpoint["config"]["hidden_size"] == 64
    assert losses(read_results(reference_run[0])) == pytest.approx(LOSSES_BEFORE_THE_FLAGS, rel=1e-4)


class RecordingVAE(VAE):
    """A VAE that keeps a copy of every batch it is trained on."""

    def forward(self, x, generator=None):
        self.seen.append(x.clone())
        return super().forward(x, generator)


def test_training_draws_binary_pixels_afresh_each_epoch_with_the_grey_value_as_mean():
    torch.manual_seed(0)
    grey = torch.linspace(0, 1, 784).view(1, 28, 28)  # every grey level
    model = RecordingVAE()
    model.seen = []
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
    for epoch in range(1, 11):  # ten epochs of one batch: 64 copies of the image
        train_epoch(model, optimizer, grey.expand(64, 28, 28), 64, 1.0, epoch, binarize=True)
    seen = torch.stack(model.seen).view(10, 64, 784)
    assert set(seen.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(seen[0, 0], seen[1, 0])  # two epochs, two binarizations of one image
    assert not torch.equal(seen[0, 0], seen[0, 1])  # and a fresh one for each copy
    assert (seen.mean((0, 1)) - grey.flatten()).abs().max() < 0.1  # 640 draws: a standard error of 0.02 at most
    assert seen[..., 0].eq(0).all() and seen[..., -1].eq(1).all()  # grey 0 and 1 stay as they are


def test_measured_images_are_binarized_once_from_a_fixed_seed():
    grey = torch.rand(500, 28, 28)
    config = variant(binarize=True)
    once = vae_lstm.as_measured(grey, config)
    assert set(once.unique().tolist()) == {0.0, 1.0} and abs(once.mean() - grey.mean()) < 0.01
    assert torch.equal(vae_lstm.as_measured(grey, config), once)  # the same every time
    assert vae_lstm.as_measured(grey, CONFIG) is grey


@pytest.fixture(scope="module")
def grey_mnist(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("grey"), grey=True)


def test_a_binarized_model_is_measured_on_binarized_images(grey_mnist, tmp_path, capsys):
    binarized_run, tiny_mnist = tmp_path, grey_mnist
    assert main(train_args(tiny_mnist, binarized_run, "--binarize")) == 0
    checkpoint = binarized_run / "best_model.pt"
    assert torch.load(checkpoint, weights_only=True)["config"]["binarize"] is True
    evaluations = []
    for _ in range(2):
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--data-dir", str(tiny_mnist),
                     "--iw-samples", "5"]) == 0
        evaluations.append(json.loads((binarized_run / "evaluation.json").read_text()))
    first, second = ({key: value for key, value in evaluation.items() if key not in ("iw_seconds", "machine")}
                     for evaluation in evaluations)
    assert first == second  # one checkpoint, one set of numbers
    assert first["binarize"] is True and "iw_bound" not in first and first["iw_nll"] > 0
    assert "-log p(x) of the binarized images" in first["iw_meaning"]
    assert "-log p(x) ~" in capsys.readouterr().out

    results = read_results(binarized_run)
    assert first["total"] == pytest.approx(results["test"]["total"], rel=1e-6)  # what train measured: binarized
    model, _ = vae_lstm.load_model(checkpoint, "cpu")
    grey = vae_lstm.load_mnist(tiny_mnist, train=False)
    assert evaluate(model, vae_lstm.binarize_once(grey))["total"] == pytest.approx(first["total"], rel=1e-9)
    assert evaluate(model, grey)["total"] != pytest.approx(first["total"], rel=1e-4)  # not the grey levels

    assert main(["explore", "--checkpoint", str(checkpoint), "--data-dir", str(tiny_mnist)]) == 0
    assert json.loads((binarized_run / "exploration.json").read_text())["kl"] == pytest.approx(results["test"]["kl"],
                                                                                               rel=1e-6)


# ----------------------------------------------------------------------------------------------
# The report's design choices (sections 1.1 and 1.3) as variants of its model


def lstm_parameters(hidden, directions):
    return directions * 4 * hidden * (28 + hidden + 2)  # input and recurrent weights, two biases, four gates


def linear_parameters(inputs, outputs):
    return inputs * outputs + outputs


def decoder_parameters(first_channels):  # the transposed convolutions: 4x4 kernels, a bias per output channel
    return sum(i * o * 16 + o for i, o in ((first_channels, 64), (64, 32), (32, 16), (16, 1)))


@pytest.mark.parametrize("flags, expected", [
    ([], lstm_parameters(64, 2) + 2 * linear_parameters(128, 64) + linear_parameters(64, 64) + decoder_parameters(64)),
    (["--unidirectional"],
     lstm_parameters(64, 1) + 2 * linear_parameters(64, 64) + linear_parameters(64, 64) + decoder_parameters(64)),
    (["--no-encoder-fc"], lstm_parameters(64, 2) + linear_parameters(64, 64) + decoder_parameters(64)),
    (["--no-decoder-fc"], lstm_parameters(64, 2) + 2 * linear_parameters(128, 64) + decoder_parameters(64)),
    (["--latent-dim", "16"],
     lstm_parameters(64, 2) + 2 * linear_parameters(128, 16) + linear_parameters(16, 64) + decoder_parameters(64)),
    (["--hidden-size", "32"],
     lstm_parameters(32, 2) + 2 * linear_parameters(64, 64) + linear_parameters(64, 64) + decoder_parameters(64)),
    (["--hidden-size", "128"],
     lstm_parameters(128, 2) + 2 * linear_parameters(256, 64) + linear_parameters(64, 64) + decoder_parameters(64)),
    (["--no-encoder-fc", "--hidden-size", "16", "--no-decoder-fc"], lstm_parameters(16, 2) + decoder_parameters(16)),
], ids=["report", "unidirectional", "no-encoder-fc", "no-decoder-fc", "latent-16", "hidden-32", "hidden-128",
        "report-first-model"])
def test_each_design_flag_builds_the_parameters_it_should(flags, expected):
    model = VAE(vae_lstm.config_of(vae_lstm.parse_args(["train", *flags])))
    assert sum(p.numel() for p in model.parameters()) == expected
    recon, mu, logvar = model(torch.rand(3, 28, 28))
    assert recon.shape == (3, 1, 28, 28) and mu.shape == logvar.shape == (3, model.latent_dim)
    if not flags:
        assert expected == 175_665


class ReportCodeVAE(torch.nn.Module):
    """The report code's model class, with its arguments bidirect, zdim and encoder_fc_out_size."""

    def __init__(self, bidirect=True, zdim=64, encoder_fc_out_size=64):
        super().__init__()
        self.encoder_lstm = torch.nn.LSTM(28, zdim, batch_first=True, bidirectional=bidirect)
        self.encoder_mu = torch.nn.Linear(zdim * (2 if bidirect else 1), encoder_fc_out_size)
        self.encoder_logvar = torch.nn.Linear(zdim * (2 if bidirect else 1), encoder_fc_out_size)
        self.decoder_fc = torch.nn.Linear(encoder_fc_out_size, 64)
        self.decoder_list = torch.nn.ModuleList([
            torch.nn.ConvTranspose2d(64, 64, 4, 1), torch.nn.ConvTranspose2d(64, 32, 4, 1),
            torch.nn.ConvTranspose2d(32, 16, 4, 2, 1), torch.nn.ConvTranspose2d(16, 1, 4, 2, 1)])


@pytest.mark.parametrize("flags, report_arguments", [
    (["--unidirectional"], {"bidirect": False}),
    (["--hidden-size", "32"], {"zdim": 32}),
    (["--hidden-size", "128"], {"zdim": 128}),
    (["--latent-dim", "16"], {"encoder_fc_out_size": 16}),
])
def test_variants_the_report_code_can_build_load_strictly_into_it(flags, report_arguments):
    model = VAE(vae_lstm.config_of(vae_lstm.parse_args(["train", *flags])))
    ReportCodeVAE(**report_arguments).load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("flags, words", [
    (["--no-encoder-fc", "--unidirectional"], ["--no-encoder-fc", "--unidirectional"]),
    (["--no-encoder-fc", "--latent-dim", "16"], ["--latent-dim must equal --hidden-size", "16 and 64"]),
    (["--no-encoder-fc", "--hidden-size", "32", "--latent-dim", "64"], ["64 and 32"]),
])
def test_impossible_design_combinations_are_usage_errors(flags, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--out", str(tmp_path / "run"), *flags])
    assert stopped.value.code == 2 and not (tmp_path / "run").exists()
    one_error_line(capsys.readouterr(), "error", *words)


@pytest.mark.parametrize("name, latent_dim", [("small", 8), ("first-encoder", 16)])
def test_a_variant_round_trips_through_its_checkpoint(name, latent_dim, variant_runs, tiny_mnist, tmp_path):
    run = variant_runs[name]
    results, checkpoint = read_results(run), run / "best_model.pt"
    assert torch.load(checkpoint, weights_only=True)["config"]["latent_dim"] == latent_dim
    assert main(["generate", "--checkpoint", str(checkpoint), "--n", "4", "--out", str(tmp_path / "four.png")]) == 0
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data-dir", str(tiny_mnist), "--json",
                 str(tmp_path / "evaluation.json"), "--iw-samples", "3"]) == 0
    assert json.loads((tmp_path / "evaluation.json").read_text())["total"] == pytest.approx(results["test"]["total"],
                                                                                            rel=1e-6)
    assert main(["explore", "--checkpoint", str(checkpoint), "--data-dir", str(tiny_mnist), "--out",
                 str(tmp_path / "explored")]) == 0
    assert len(json.loads((tmp_path / "explored" / "exploration.json").read_text())["activity"]) == latent_dim


# ----------------------------------------------------------------------------------------------
# The latent space


def test_interpolation_runs_from_the_decoded_mean_code_of_one_image_to_the_other():
    model, mu = VAE().eval(), torch.randn(8, 64) * 3
    with torch.no_grad():
        path = vae_lstm.interpolate(model, mu[:4], mu[4:])
        assert path.shape == (4, vae_lstm.INTERPOLATION_STEPS, 1, 28, 28)
        torch.testing.assert_close(path[:, 0], model.decode(mu[:4]), rtol=0, atol=1e-6)
        torch.testing.assert_close(path[:, -1], model.decode(mu[4:]), rtol=0, atol=1e-6)
        midway = model.decode((mu[:4] + mu[4:]) / 2)
    torch.testing.assert_close(path[:, 4:6].mean(1), midway, rtol=0, atol=0.1)  # a path, not two end points
    assert (path[:, 0] - path[:, -1]).abs().max() > 0.01


def test_a_dimension_whose_encoder_mu_row_is_zero_is_inactive(tiny_mnist, tmp_path):
    torch.manual_seed(0)
    model, dead = VAE(), [3, 17, 40]
    with torch.no_grad():
        model.encoder_mu.weight.mul_(1000)  # activity x 1e6: every other dimension far above the threshold
        model.encoder_mu.weight[dead] = 0
    images, labels = vae_lstm.load_mnist(tiny_mnist, train=False, labels=True)
    exploration = vae_lstm.explore(model, images, labels, tmp_path, "scaled.pt")
    activity = torch.tensor(exploration["activity"])
    assert (activity <= vae_lstm.ACTIVITY_THRESHOLD).nonzero().flatten().tolist() == dead
    assert exploration["active_units"] == 64 - len(dead) and activity.min() == 0


def test_explore_command_writes_its_four_files(reference_run, tiny_mnist, tmp_path, capsys):
    out = reference_run[0]
    assert main(["explore", "--checkpoint", str(out / "best_model.pt"), "--data-dir", str(tiny_mnist),
                 "--out", str(tmp_path)]) == 0
    exploration = json.loads((tmp_path / "exploration.json").read_text())
    assert exploration["latent_dim"] == 64 and len(exploration["activity"]) == len(exploration["kl_per_dim"]) == 64
    assert exploration["active_units"] == sum(a > 0.01 for a in exploration["activity"])
    assert f"{exploration['active_units']} of 64 latent dimensions active" in capsys.readouterr().out
    assert sum(exploration["kl_per_dim"]) == pytest.approx(read_results(out)["test"]["kl"], rel=1e-5)
    assert 0 < exploration["principal_components_variance"] < 1
    images, labels = vae_lstm.load_mnist(tiny_mnist, train=False, labels=True)
    model, _ = vae_lstm.load_model(out / "best_model.pt", "cpu")
    with torch.no_grad():
        mu, logvar = model.eval().encode(images)
    q, prior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    expected = torch.distributions.kl_divergence(q, prior).mean(0)  # each dimension's, averaged over the images
    np.testing.assert_allclose(exploration["kl_per_dim"], expected, rtol=1e-4, atol=1e-7)
    for left, right in exploration["interpolation_pairs"]:
        assert labels[left] != labels[right]
    assert {int(labels[left]) for left, _ in exploration["interpolation_pairs"]} == set(range(8))

    grid = np.asarray(Image.open(tmp_path / "interpolation.png").convert("L"), dtype=float)
    assert grid.shape == (2 + 8 * 30, 2 + 12 * 30) and grid.std() > 10  # 8 rows: image, 10 steps, image
    left = images[exploration["interpolation_pairs"][0][0]].numpy() * 255
    np.testing.assert_allclose(grid[2:30, 2:30], left, atol=1)  # the pair's own images frame each row
    for name in ("latent_map.png", "latent_usage.png"):
        pixels = np.asarray(Image.open(tmp_path / name).convert("L"), dtype=float)
        assert pixels.shape[1] == 700 and pixels.std() > 10, name
    # `train` wrote the same exploration of its best model into its run folder
    assert json.loads((out / "exploration.json").read_text())["activity"] == exploration["activity"]
    assert all((out / name).stat().st_size > 0 for name in vae_lstm.EXPLORATION_FILES)


# ----------------------------------------------------------------------------------------------
# Interruption and resumption


def raise_in_epoch(monkeypatch, epoch, stop):
    """train_epoch, but `stop()` at the start of `epoch`."""
    train_epoch = vae_lstm.train_epoch

    def stopped(*args):
        if args[5] == epoch:
            stop()
        return train_epoch(*args)
    monkeypatch.setattr(vae_lstm, "train_epoch", stopped)


def press_ctrl_c():
    raise KeyboardInterrupt


def send_sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # the handler raises Terminated here, at once


@pytest.fixture
def sigterm_handler():
    previous = signal.signal(signal.SIGTERM, vae_lstm.raise_terminated)  # what running the script installs
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm", "full disk", "fewer --epochs", "a variant"])
def test_a_stopped_run_resumes_to_the_numbers_of_an_uninterrupted_one(stop, reference_run, variant_runs, tiny_mnist,
                                                                      tmp_path, monkeypatch, capsys, sigterm_handler):
    flags = VARIANTS["first-encoder"] if stop == "a variant" else []
    uninterrupted = variant_runs["first-encoder"] if stop == "a variant" else reference_run[0]
    if stop == "fewer --epochs":
        assert main(train_args(tiny_mnist, tmp_path, "--epochs", "4")) == 0
    elif stop == "full disk":
        writes_of_last = []

        def open_on_a_disk_that_fills(path, mode="r", *args, **kwargs):  # the disk fills while epoch 2 is saved
            if Path(path).name.startswith(".last.pt."):
                writes_of_last.append(path)
                if len(writes_of_last) == 2:
                    return FullDisk(path, "w")
            return open(path, mode, *args, **kwargs)

        monkeypatch.setattr(vae_lstm, "open", open_on_a_disk_that_fills, raising=False)
        assert main(train_args(tiny_mnist, tmp_path)) == 1
        one_error_line(capsys.readouterr(), f"cannot write {tmp_path / 'last.pt'}: No space left on device",
                       "last.pt holds epoch 1", "both intact", "once that is fixed, resume with", "--resume")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pt", "history.csv", "last.pt"]  # no .tmp
        assert len((tmp_path / "history.csv").read_text().splitlines()) == 2
    else:
        signal_name, status = ("interrupted", 130) if stop != "sigterm" else ("terminated (SIGTERM)", 143)
        raise_in_epoch(monkeypatch, 3, send_sigterm if stop == "sigterm" else press_ctrl_c)
        assert main(train_args(tiny_mnist, tmp_path, *flags)) == status
        one_error_line(capsys.readouterr(), f"{signal_name}; {tmp_path / 'last.pt'} holds epoch 2", "--resume")
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written file
    monkeypatch.undo()  # the run goes on, with room on the disk
    assert main(train_args(tiny_mnist, tmp_path, *flags, "--resume")) == 0
    resumed, reference = read_results(tmp_path), read_results(uninterrupted)
    assert losses(resumed) == losses(reference)
    assert resumed["best_epoch"] == reference["best_epoch"] and resumed["epochs_run"] == TINY_EPOCHS
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == len(last["history"]) == last["config"]["epochs"] == TINY_EPOCHS


def test_a_live_run_folder_is_refused_and_sigkill_leaves_a_run_to_resume(reference_run, tiny_mnist, tmp_path, capsys):
    child = subprocess.Popen([sys.executable, str(HERE / "vae_lstm.py"), *train_args(tiny_mnist, tmp_path)], cwd=HERE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "images; device" in child.stdout.readline()  # it holds the folder and has loaded its data
    for extra in ([], ["--resume"]):
        assert main(["train", "--data-dir", str(tmp_path / "no data"), "--out", str(tmp_path), *extra]) == 2
        one_error_line(capsys.readouterr(), str(tmp_path), "in use by another train")  # refused before the data
    for line in child.stdout:
        if line.startswith("epoch  1/"):
            child.kill()
            break
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL and not (tmp_path / "results.json").exists()
    assert torch.load(tmp_path / "best_model.pt", weights_only=True)["epoch"] >= 1
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"epoch", "model", "optimizer", "best_val", "bad_epochs", "history", "rng"} <= set(last)

    assert main(train_args(tiny_mnist, tmp_path, "--resume")) == 0  # the lock went with the process
    assert losses(read_results(tmp_path)) == losses(read_results(reference_run[0]))


def test_sigterm_outside_training_says_nothing_was_written(reference_run, tiny_mnist, tmp_path, monkeypatch, capsys):
    def terminate(*args):
        raise vae_lstm.Terminated

    monkeypatch.setattr(vae_lstm, "importance_weighted_nll", terminate)
    assert main(["evaluate", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--data-dir", str(tiny_mnist),
                 "--iw-samples", "10", "--json", str(tmp_path / "evaluation.json")]) == 143
    assert capsys.readouterr().err == "terminated (SIGTERM); nothing was written\n"
    assert list(tmp_path.iterdir()) == []


class FullDisk(io.FileIO):
    """A file on a disk that fills up after its first 1,000 bytes."""

    def write(self, data):
        super().write(bytes(data)[:1000])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_evaluating_is_one_line(reference_run, tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vae_lstm, "open", lambda path, mode="r": FullDisk(path, "w"), raising=False)
    assert main(["evaluate", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--data-dir", str(tiny_mnist),
                 "--json", str(tmp_path / "evaluation.json")]) == 1
    one_error_line(capsys.readouterr(), "evaluation.json: No space left on device; nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_a_disk_full_before_the_first_epoch_is_saved_says_how_to_start_again(tiny_mnist, tmp_path, monkeypatch,
                                                                             capsys):
    def open_on_a_full_disk(path, mode="r", *args, **kwargs):  # best_model.pt fits, last.pt does not
        if Path(path).name.startswith(".last.pt."):
            return FullDisk(path, "w")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(vae_lstm, "open", open_on_a_full_disk, raising=False)
    assert main(train_args(tiny_mnist, tmp_path)) == 1
    best = tmp_path / "best_model.pt"
    one_error_line(capsys.readouterr(), f"cannot write {tmp_path / 'last.pt'}: No space left on device",
                   "nothing to resume", f"start again once {best}, left from that epoch, is removed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pt"]

    monkeypatch.undo()
    for extra, words in (([], [f"{tmp_path} holds a best_model.pt but no last.pt", "move it away"]),
                         (["--resume"], [f"no checkpoint at {tmp_path / 'last.pt'}", "without --resume"])):
        assert main(["train", "--data-dir", str(tmp_path / "no data"), "--out", str(tmp_path), *extra]) == 2
        one_error_line(capsys.readouterr(), *words)  # told before any data is read
    best.unlink()
    assert main(train_args(tiny_mnist, tmp_path, "--epochs", "1")) == 0


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_writer_gives_the_mode_open_gives_under_the_umask(umask, tmp_path):
    previous = os.umask(umask)
    try:
        (tmp_path / "plain").write_text("written by open()")
        vae_lstm.write_json({"a": 1}, tmp_path / "a.json")
        vae_lstm.write_csv([{"a": 1}], tmp_path / "a.csv")
        vae_lstm.save_checkpoint({"a": 1}, tmp_path / "a.pt")
        vae_lstm.save_grid(torch.rand(4, 1, 28, 28), tmp_path / "a.png", nrow=2)
        vae_lstm.save_figure(vae_lstm.plt.figure(figsize=(1, 1)), tmp_path / "a.pdf")
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert len(modes) == 6 and set(modes.values()) == {0o666 & ~umask}, modes


def test_ctrl_c_outside_training_says_nothing_was_written(reference_run, monkeypatch, capsys):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(vae_lstm, "sample_digits", interrupt)
    assert main(["generate", "--checkpoint", str(reference_run[0] / "best_model.pt")]) == 130
    assert capsys.readouterr().err == "interrupted; nothing was written\n"


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "best_model.pt"
    vae_lstm.save_checkpoint({"epoch": 1}, path)

    def torch_save_then_die(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torch_save_then_die)
    with pytest.raises(KeyboardInterrupt):
        vae_lstm.save_checkpoint({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pt"]  # no temporary file left behind


def test_a_non_finite_loss_stops_the_run_and_keeps_the_best_model(tiny_mnist, tmp_path, monkeypatch, capsys):
    calls = {"training": 0}

    def loss_that_explodes(recon, x, mu, logvar, kl_weight=1.0):
        total, bce, kl = vae_loss(recon, x, mu, logvar, kl_weight)
        calls["training"] += torch.is_grad_enabled()
        return (total * math.nan if calls["training"] == 5 else total), bce, kl  # epoch 2, batch 2 of 3

    monkeypatch.setattr(vae_lstm, "vae_loss", loss_that_explodes)
    assert main(train_args(tiny_mnist, tmp_path)) == 2
    one_error_line(capsys.readouterr(), "the loss is nan", "epoch 2, batch 2 of 3")
    assert torch.load(tmp_path / "best_model.pt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "results.json").exists()


def test_a_diverging_run_stops_with_one_line(tiny_mnist, tmp_path, capsys):
    assert main(train_args(tiny_mnist, tmp_path, "--lr", "1e6")) == 2  # the first step wrecks the weights
    one_error_line(capsys.readouterr(), "training diverged in epoch 1, batch 2 of 3", "--lr")
    assert not (tmp_path / "best_model.pt").exists() and not (tmp_path / "results.json").exists()


def test_resume_needs_a_run_with_the_same_settings(reference_run, tiny_mnist, tmp_path, capsys):
    assert main(train_args(tiny_mnist, tmp_path / "nothing", "--resume")) == 2
    one_error_line(capsys.readouterr(), "no checkpoint", "last.pt")
    out = reference_run[0]
    before = (out / "last.pt").read_bytes()
    assert main(train_args(tiny_mnist, out, "--resume", "--lr", "0.01")) == 2
    one_error_line(capsys.readouterr(), "other settings", "lr 0.001 there, 0.01 here")
    assert (out / "last.pt").read_bytes() == before


def test_every_refusal_of_resume_comes_before_the_data_is_read(reference_run, tiny_mnist, tmp_path, monkeypatch,
                                                               capsys):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was read")
    monkeypatch.setattr(vae_lstm, "load_mnist", no_data)
    out = reference_run[0]
    for extra, words in ((["--epochs", "2"], ["trained 6 epochs already", "more than --epochs 2"]),
                         (["--seed", "1"], ["other settings", "seed 0 there, 1 here"]),
                         (["--binarize"], ["other settings", "binarize False there, True here"]),
                         (["--latent-dim", "16"], ["other settings", "latent_dim 64 there, 16 here"])):
        assert main([*train_args(tiny_mnist, out, "--resume"), *extra]) == 2
        one_error_line(capsys.readouterr(), *words)
    assert main(train_args(tiny_mnist, tmp_path, "--resume")) == 2
    one_error_line(capsys.readouterr(), "no checkpoint")


# ----------------------------------------------------------------------------------------------
# Pictures in the format their suffix names; runs compared


@pytest.mark.parametrize("suffix, pil_format", [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"), (".bmp", "BMP"),
                                                (".tiff", "TIFF"), (".webp", "WEBP")])
def test_generate_writes_the_format_its_suffix_names(suffix, pil_format, reference_run, tmp_path):
    path = tmp_path / f"digits{suffix}"
    assert main(["generate", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--n", "4", "--out",
                 str(path)]) == 0
    with Image.open(path) as picture:
        assert picture.format == pil_format and picture.size == (2 + 4 * 30, 32)


@pytest.mark.parametrize("name", ["digits.txt", "digits", "digits.xbm"])
def test_a_picture_suffix_that_cannot_be_written_is_a_usage_error(name, reference_run, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--out",
                 str(tmp_path / name)]) == 2
    one_error_line(capsys.readouterr(), "cannot write a picture", name, ".png")
    assert not list(tmp_path.iterdir())
    assert main(["compare", str(reference_run[0]), "--figure", str(tmp_path / "runs.txt")]) == 2
    one_error_line(capsys.readouterr(), "cannot write a figure", "runs.txt")


def copy_of_run(run, folder, seed, test_total, iw_samples=None, iw_bound=None):
    """A run folder whose JSON files are `run`'s, but for its seed, its test total and its evaluation.json."""
    folder.mkdir()
    results = read_results(run)
    results["config"]["seed"], results["test"]["total"] = seed, test_total
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "exploration.json").write_bytes((run / "exploration.json").read_bytes())
    if iw_samples:
        (folder / "evaluation.json").write_text(json.dumps({"iw_samples": iw_samples, "iw_bound": iw_bound}))
    return folder


def test_compare_writes_one_row_per_run_and_the_mean_of_each_variant(reference_run, variant_runs, tmp_path, capsys):
    seed_1 = copy_of_run(reference_run[0], tmp_path / "seed1", seed=1, test_total=250.0)
    small = variant_runs["small"]
    runs = [reference_run[0], seed_1, small]
    assert main(["compare", *map(str, runs), "--csv", str(tmp_path / "study" / "runs.csv"), "--figure",
                 str(tmp_path / "study" / "digits.pdf")]) == 0
    table = capsys.readouterr().out

    rows = list(csv.DictReader(io.StringIO((tmp_path / "study" / "runs.csv").read_text())))
    assert [row["variant"] for row in rows] == ["report", "report",
                                               "--unidirectional --hidden-size 16 --latent-dim 8 --no-decoder-fc"]
    assert [row["seed"] for row in rows] == ["0", "1", "0"]
    for row, run in zip(rows, runs):
        results = read_results(run)
        assert float(row["test_total"]) == results["test"]["total"] and int(row["parameters"]) == results["parameters"]
        assert row["device"] == results["machine"]["device"] and row["torch"] == torch.__version__
    assert rows[2]["parameters"] == str(lstm_parameters(16, 1) + 2 * linear_parameters(16, 8) + decoder_parameters(8))

    totals = torch.tensor([read_results(run)["test"]["total"] for run in runs[:2]], dtype=torch.float64)
    assert f"| report | 2 | {totals.mean():.2f} ± {totals.std():.2f} |" in table
    assert f"| {rows[0]['device']}, torch {torch.__version__} |" in table  # where the numbers come from
    assert (tmp_path / "study" / "digits.pdf").read_bytes().startswith(b"%PDF")


def test_compare_averages_no_importance_weighted_figures_of_different_k(reference_run, tmp_path, capsys):
    def iw_cell(*ks):
        runs = [copy_of_run(reference_run[0], tmp_path / f"{ks}-{seed}", seed, 270.0, k, 260.0 + seed)
                for seed, k in enumerate(ks)]
        assert main(["compare", *map(str, runs)]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| report |"))
        return [cell.strip() for cell in row.strip("|").split("|")][5]  # variant, runs, 3 losses, then iw

    assert iw_cell(3, 4) == "K differs"
    assert iw_cell(3, 3) == f"260.50 ± {math.sqrt(0.5):.2f}"


def github_anchors(markdown):
    """The anchors GitHub gives the headings of a Markdown text: lower case, punctuation dropped,
    spaces as hyphens, a repeated one numbered."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        numbered = (f"{slug}-{n}" if n else slug for n in range(100))
        anchors.add(next(anchor for anchor in numbered if anchor not in anchors))
    return anchors


def test_every_relative_link_and_picture_of_the_documentation_resolves():
    pages = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)  # no code blocks
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: {target} does not exist"
            if anchor:
                assert anchor in github_anchors(linked.read_text()), f"{page.name}: {target} names no heading"
            checked += 1
    assert checked >= 20  # the README's pictures and links to the study page, and the study page's own


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, a non-zero status, no traceback, nothing overwritten


def corrupt_copy(tiny_mnist, tmp_path, damage):
    root = tmp_path / "broken"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for file in (tiny_mnist / "MNIST" / "raw").iterdir():
        (raw / file.name).write_bytes(file.read_bytes())
    target = raw / "train-images-idx3-ubyte"
    target.write_bytes(damage(target.read_bytes()))
    return root


@pytest.mark.parametrize("make_data_dir", [
    lambda tiny, tmp: tmp / "missing",
    lambda tiny, tmp: (tmp / "empty").mkdir() or tmp / "empty",
    lambda tiny, tmp: corrupt_copy(tiny, tmp, lambda data: data[:5000]),  # truncated
    lambda tiny, tmp: corrupt_copy(tiny, tmp, lambda data: b"\x00\x00\x07\x09" + data[4:]),  # bad magic number
], ids=["missing", "empty", "truncated", "corrupt"])
def test_unreadable_data_is_one_clear_line(make_data_dir, tiny_mnist, tmp_path, capsys):
    data_dir = make_data_dir(tiny_mnist, tmp_path)
    assert main(["train", "--data-dir", str(data_dir), "--out", str(tmp_path / "run")]) == 2
    missing = not (data_dir / "MNIST" / "raw").is_dir()
    one_error_line(capsys.readouterr(), "MNIST", "train-images-idx3-ubyte", str(data_dir),
                   "4 of its files missing" if missing else "")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_unusable_out_folders_are_refused_before_training(reference_run, tiny_mnist, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out, words in ((a_file, ["is a file"]), (a_file / "run", ["cannot write"])):
        assert main(train_args(tiny_mnist, out)) == 2
        one_error_line(capsys.readouterr(), *words)
    out = reference_run[0]
    before = (out / "best_model.pt").read_bytes()
    assert main(train_args(tiny_mnist, out)) == 2  # a second run into the same folder
    one_error_line(capsys.readouterr(), "already holds a run", "--resume")
    assert (out / "best_model.pt").read_bytes() == before


class CodeCarrier:
    """A pickle that, when loaded without weights_only, runs code: it creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["missing", "truncated", "not_a_checkpoint", "other_layer_sizes", "nan_weights",
                                  "carries_code"])
def test_bad_checkpoints_are_refused(kind, reference_run, tmp_path, capsys):
    path, good = tmp_path / "model.pt", reference_run[0] / "best_model.pt"
    marker = tmp_path / "code_ran"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:20000])
    elif kind == "not_a_checkpoint":
        path.write_text("these are not the weights you are looking for")
    elif kind == "other_layer_sizes":
        torch.save({"config": CONFIG, "model": VAE(variant(latent_dim=32)).state_dict()}, path)
    elif kind == "nan_weights":
        weights = VAE().state_dict()
        weights["decoder_fc.bias"][3] = math.nan
        torch.save({"config": {"latent_dim": 64}, "model": weights}, path)
    elif kind == "carries_code":
        path.write_bytes(pickle.dumps({"config": {"latent_dim": 64}, "model": CodeCarrier(str(marker))}))
    for command in (["generate"], ["evaluate", "--data-dir", "unused"]):
        assert main([*command, "--checkpoint", str(path), "--out" if command == ["generate"] else "--json",
                     str(tmp_path / "written")]) == 2
        reason = {"missing": "no checkpoint", "truncated": "not a whole file written by torch.save",
                  "not_a_checkpoint": "not a whole file written by torch.save",
                  "other_layer_sizes": "size mismatch", "nan_weights": "NaN or inf",
                  "carries_code": "weights_only=True) refused it"}[kind]
        one_error_line(capsys.readouterr(), str(path), reason)
    assert not marker.exists() and not (tmp_path / "written").exists()


@pytest.mark.parametrize("argv", [
    ["train", "--epochs", "0"], ["train", "--batch-size", "0"], ["train", "--lr", "-1"], ["train", "--lr", "nan"],
    ["train", "--val-fraction", "1.5"], ["train", "--patience", "two"], ["generate", "--n", "0"],
    ["generate", "--nrow", "-2"], ["evaluate", "--iw-samples", "-3"], ["evaluate", "--split", "dev"],
])
def test_out_of_range_numbers_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    one_error_line(capsys.readouterr(), "error", argv[1])


def test_cuda_where_there_is_none(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(train_args(tiny_mnist, tmp_path, "--device", "cuda")) == 2
    one_error_line(capsys.readouterr(), "--device cuda", "no CUDA device")


# ----------------------------------------------------------------------------------------------
# Devices: the CPU's rules that keep CUDA and MPS right, then tests that run where such a device is


class OpRecorder(TorchDispatchMode):
    """Records every operation's float64 outputs, and every random draw's generator."""

    def __init__(self):
        super().__init__()
        self.float64, self.draws = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(word in str(func) for word in ("rand", "normal", "bernoulli")):
            self.draws.append((str(func), kwargs.get("generator")))
        self.float64 += [str(func) for tensor in tree_leaves(out)
                         if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64]
        return out


def test_training_and_evaluation_make_no_float64_tensor():  # MPS has no float64
    torch.manual_seed(0)
    model, images = VAE(), torch.rand(100, 28, 28)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    with OpRecorder() as recorder:
        train_epoch(model, optimizer, images, 64, 1.0, epoch=1, binarize=True)
        evaluate(model, images)
        vae_lstm.importance_weighted_nll(model, images[:3], 10)
    assert recorder.float64 == []


def test_what_the_user_reads_is_drawn_from_seeded_cpu_generators(tiny_mnist, tmp_path):
    model, images = VAE().eval(), vae_lstm.load_mnist(tiny_mnist, train=False)
    with OpRecorder() as recorder:
        digits = vae_lstm.sample_digits(model, 5, seed=3)
        evaluated = evaluate(model, images)
        vae_lstm.importance_weighted_nll(model, images[:3], 10)
        vae_lstm.save_reconstructions(model, images, tmp_path / "reconstructions.png")
        vae_lstm.binarize_once(images)
    assert len(recorder.draws) == 5  # digits, evaluate's z, the eps of the estimate, reconstructions, binarization
    for draw, generator in recorder.draws:
        assert generator is not None and generator.device.type == "cpu", draw  # never a device's, never the global
    with torch.no_grad():
        z = torch.randn((5, 64), generator=torch.Generator().manual_seed(3))
        assert torch.equal(digits, model.decode(z))
    assert evaluate(model, images) == evaluated


@pytest.fixture
def no_read_back(monkeypatch):
    """Any read of a tensor's value by the host fails: on a GPU each would wait for the queued work."""
    def read_back(*args, **kwargs):
        raise AssertionError("a value was read back from the device")

    for name in ("__bool__", "__float__", "__int__", "item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    return monkeypatch


def test_the_training_step_reads_nothing_back_from_the_device(no_read_back):
    torch.manual_seed(0)
    model, x = VAE(), torch.rand(64, 28, 28)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    steps = [vae_lstm.train_step(model, optimizer, x, 1.0) for _ in range(2)]
    no_read_back.undo()
    assert all(finite.item() for _, finite in steps) and steps[1][0][0] < steps[0][0][0]


def test_a_nan_reconstruction_never_reaches_the_bce(monkeypatch):  # CUDA's BCE kernel would kill the process
    model, x = VAE(), torch.rand(8, 28, 28)
    with torch.no_grad():
        model.decoder_list[3].bias.fill_(math.nan)
    seen = []
    monkeypatch.setattr(vae_lstm, "vae_loss", lambda recon, *args: seen.append(bool(recon.isfinite().all()))
                        or vae_loss(recon, *args))
    losses, finite = vae_lstm.train_step(model, torch.optim.Adam(model.parameters()), x, 1.0)
    assert seen == [True] and not finite


@pytest.mark.parametrize("kind", ["cpu", "cuda", "mps"])
def test_the_training_device_random_state_round_trips_through_last_pt(kind, tmp_path):
    if kind != "cpu" and not (torch.cuda.is_available() if kind == "cuda" else torch.backends.mps.is_available()):
        pytest.skip(f"no {kind.upper()} device here")
    device = torch.device(kind)
    vae_lstm.save_checkpoint({"rng": vae_lstm.rng_states(device)}, tmp_path / "last.pt")
    expected = torch.rand(5), torch.rand(5, device=device)
    torch.rand(5), torch.rand(5, device=device)  # draws of the epochs after the one saved
    vae_lstm.restore_rng_states(vae_lstm.read_checkpoint(tmp_path / "last.pt")["rng"], device)
    assert all(map(torch.equal, (torch.rand(5), torch.rand(5, device=device)), expected))


@pytest.fixture
def accelerator():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    pytest.skip("no CUDA or MPS device here: the device tests run where there is one")


def test_on_the_accelerator_a_seed_twice_and_a_resumed_run_give_identical_numbers(accelerator, tiny_mnist, tmp_path,
                                                                                  monkeypatch):
    runs = [tmp_path / name for name in ("first", "second", "stopped")]
    for run in runs[:2]:
        assert main(train_args(tiny_mnist, run, "--device", accelerator)) == 0
    raise_in_epoch(monkeypatch, 3, press_ctrl_c)
    assert main(train_args(tiny_mnist, runs[2], "--device", accelerator)) == 130
    monkeypatch.undo()
    assert main(train_args(tiny_mnist, runs[2], "--device", accelerator, "--resume")) == 0
    first, *others = (read_results(run) for run in runs)
    assert all(losses(other) == losses(first) for other in others)
    assert first["machine"]["device"] != first["machine"]["cpu"]  # the GPU is named
    if accelerator == "cuda":
        assert first["machine"]["precision"] == vae_lstm.CUDA_PRECISION and first["machine"]["cudnn"]


def test_cpu_and_accelerator_agree_on_one_checkpoint(accelerator, reference_run, tiny_mnist):
    images = vae_lstm.load_mnist(tiny_mnist, train=False)
    measured = {}
    for device in ("cpu", accelerator):
        model, _ = vae_lstm.load_model(reference_run[0] / "best_model.pt", vae_lstm.resolve_device(device))
        x = images.to(device)
        measured[device] = (evaluate(model, x), vae_lstm.sample_digits(model, 20, seed=0),
                            vae_lstm.importance_weighted_nll(model, x, 20).cpu())
    z = torch.randn(300, 64, device=accelerator)
    with torch.no_grad():  # float32 there too: no TF32 in the convolutions that the matrix product stands for
        torch.testing.assert_close(vae_lstm.fast_decoder(model)(z), model.decode(z), rtol=1e-5, atol=1e-6)
    (cpu_losses, cpu_digits, cpu_iw), (losses_there, digits_there, iw_there) = measured.values()
    assert losses_there == pytest.approx(cpu_losses, abs=1e-3)  # per image
    torch.testing.assert_close(digits_there, cpu_digits, rtol=0, atol=1e-4)  # the same digits
    torch.testing.assert_close(iw_there, cpu_iw, rtol=0, atol=1e-3)


def test_the_training_step_never_waits_for_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    torch.manual_seed(0)
    model, x = VAE().cuda(), torch.rand(64, 28, 28, device="cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    vae_lstm.train_step(model, optimizer, x, 1.0)  # the first step sets things up (cuDNN, Adam's state)
    torch.cuda.set_sync_debug_mode("error")
    try:
        vae_lstm.train_step(model, optimizer, x, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
