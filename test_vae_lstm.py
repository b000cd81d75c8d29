"""Tests of vae_lstm.py: `pytest test_vae_lstm.py`, under a minute on 2 CPU cores, in the script's three parts.

Most tests run on tiny MNIST-format files written here; two use the real MNIST, found at $VAE_LSTM_MNIST, else
at ../shared/mnist or ./data beside this file: a brief training, and the published models' numbers.
"""
import argparse
import contextlib
import csv
import errno
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vae_lstm
from vae_lstm import CONFIG, VAE, evaluate, main, split_indices, train_epoch, vae_loss

HERE = Path(__file__).resolve().parent
TINY_TRAIN, TINY_TEST = 200, 50  # 180 training images: batches of 64, 64 and a short 52
TINY_EPOCHS = 6
vae_lstm.SCORED_DIGITS = 200  # train and evaluate score 200 digits here, not 10,000; the real-data tests all of them
PUBLISHED_RUNS = ["binarized-seed0", "design-report-seed0", "design-report-seed1", "design-report-seed2"]
VARIANT_MODELS = [  # shipped for the design study's score (docs/study.md)
    "design-hidden-size-128-seed0", "design-hidden-size-32-seed0", "design-no-decoder-fc-seed0",
    "design-no-decoder-fc-seed1", "design-no-decoder-fc-seed2", "design-no-encoder-fc-seed0",
    "design-no-encoder-fc-seed1", "design-no-encoder-fc-seed2",
    "design-kl-weight-0.5-seed0", "design-kl-weight-2-seed0", "design-kl-weight-4-seed0", "design-conv-encoder-seed0",
    "design-conv-encoder-seed1", "design-conv-encoder-seed2",
]
CONCLUSION_MODELS = VARIANT_MODELS[-6:-2]  # the report's remedies trained on an H200, measured here on a CPU

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


def idx_bytes(array):
    """An MNIST (IDX) file's bytes: magic 0x08 0x<ndim>, big-endian sizes, then the uint8 values."""
    return (struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
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
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(rng.integers(0, 10, n)))
    return root


def altered_copy(tiny_mnist, tmp_path, name, alter):
    """A copy of tiny MNIST whose file `name` holds alter(its bytes)."""
    root = tmp_path / "altered"
    shutil.copytree(tiny_mnist, root)
    target = root / "MNIST" / "raw" / name
    target.write_bytes(alter(target.read_bytes()))
    return root


def real_mnist():
    if "VAE_LSTM_MNIST" in os.environ:  # set by .ci/run: there the tests must run, never skip
        return Path(os.environ["VAE_LSTM_MNIST"])
    found = [path for path in (HERE.parent / "shared" / "mnist", HERE / "data") if (path / "MNIST" / "raw").is_dir()]
    if not found:
        pytest.skip("no real MNIST here: set VAE_LSTM_MNIST to the folder holding MNIST/raw")
    return found[0]


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("mnist"))


def train_args(data, out, *extra):
    return ["train", "--device", "cpu", "--data-dir", str(data), "--epochs", str(TINY_EPOCHS), "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def reference_run(tiny_mnist, tmp_path_factory):
    """The whole `train` command, for the tests below to read, never to write into: its folder and what it printed."""
    out, printed = tmp_path_factory.mktemp("reference"), io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.MonkeyPatch.context() as patch:
        without_plots_or_fsync(patch, drawing=PLOTS)  # its figures are read
        assert main(train_args(tiny_mnist, out)) == 0
    return out, printed.getvalue()


@pytest.fixture
def reference_copy(reference_run, tmp_path):
    """A copy of the reference run's folder, for a test that writes into a run, or tries to."""
    return Path(shutil.copytree(reference_run[0], tmp_path / "reference"))


VARIANTS = {"small": ["--unidirectional", "--hidden-size", "16", "--latent-dim", "8", "--no-decoder-fc"],
            "conv": ["--conv-encoder", "--latent-dim", "8", "--kl-weight", "2"],
            "first-encoder": ["--no-encoder-fc", "--hidden-size", "16"]}


@pytest.fixture(scope="module")
def variant_runs(tiny_mnist, tmp_path_factory):
    """A run of each of three variants of the report's model that its design flags build."""
    runs = {name: tmp_path_factory.mktemp(name) for name in VARIANTS}
    with contextlib.redirect_stdout(io.StringIO()), pytest.MonkeyPatch.context() as patch:
        without_plots_or_fsync(patch)  # no test reads their figures
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


def grid_cells(pixels, rows, columns):
    """The 28x28 cells of a grid of torchvision's, without its 2-pixel padding: (rows, columns, 28, 28)."""
    assert pixels.shape == (2 + 30 * rows, 2 + 30 * columns)
    return pixels[2:, 2:].reshape(rows, 30, columns, 30)[:, :28, :, :28].transpose(0, 2, 1, 3)


def digit_cells(path, rows, columns):
    """The cells of a grid that save_grid wrote, in grey levels 0 to 255."""
    return grid_cells(np.asarray(Image.open(path).convert("L"), dtype=float), rows, columns)


def assert_every_cell_is_drawn(cells):
    """Each digit cell of a grid holds a stroke: bright pixels on a dark ground, not one flat grey."""
    flat = cells.reshape(-1, 28 * 28)
    assert (flat.max(1) - flat.min(1) > 60).all() and (flat.std(1) > 5).all(), flat.std(1)


@pytest.fixture
def drawn(monkeypatch):
    """The figures that save_figure writes, by file name, kept for their lines and points to be read."""
    figures, save = {}, vae_lstm.save_figure

    def keep(figure, path):
        figures[Path(path).name] = figure
        save(figure, path)
    monkeypatch.setattr(vae_lstm, "save_figure", keep)
    return figures


PLOTS = ("plot_losses", "plot_latent_map", "plot_latent_usage", "plot_by_confidence", "plot_variant_samples",
         "plot_rate_distortion")


def draws(*plots):
    """A test that looks at these plots only, through `drawn` or `figures`: there the other plots draw nothing."""
    def looking_at(test):
        test.plots = plots
        return test
    return looking_at


def without_plots_or_fsync(patch, drawing=()):
    """Through `patch`: each plot function but those `drawing` draws and writes nothing, and no file written waits
    for the disk (fsync, about 4 ms a file), which no test could see but the one that spies on it."""
    for name in PLOTS:
        if name not in drawing:
            patch.setattr(vae_lstm, name, lambda *args, **kwargs: None)
    patch.setattr(vae_lstm.os, "fsync", lambda descriptor: None)


@pytest.fixture(autouse=True)
def figures_only_where_looked_at(request):
    """The plots are drawn (0.1 to 0.4 s each) only where a test looks at them, through `drawn` or `figures` (those
    it `draws`, if it names them), and in the reference run. Through a monkeypatch of its own, which a test's
    monkeypatch.undo() leaves in place."""
    looked_at = {"drawn", "figures"} & set(request.fixturenames)
    with pytest.MonkeyPatch.context() as patch:
        without_plots_or_fsync(patch, drawing=getattr(request.function, "plots", PLOTS) if looked_at else ())
        yield


@pytest.fixture
def figures():
    """The plots drawn and written, for a test that reads their files."""


def watched_calls(monkeypatch, name, position):
    """vae_lstm.`name`, watched: a copy of the tensor it is given at `position`, in each of its calls, in order."""
    seen, function = [], getattr(vae_lstm, name)

    def watched(*args):
        seen.append(args[position].clone())
        return function(*args)
    monkeypatch.setattr(vae_lstm, name, watched)
    return seen


def scripted_training(monkeypatch, val_totals):
    """train_epoch and evaluate replaced: each epoch leaves its number in a weight, and validation gives the next
    of `val_totals`. Returns the epochs whose weights were evaluated, in order."""
    scripted, evaluated, totals = {"bce": 1.0, "kl": 1.0, "total": 2.0}, [], iter(val_totals)

    def train_epoch(model, *args):
        with torch.no_grad():
            model.decoder_fc.bias[0] = args[4]
        return scripted

    def evaluate(model, *args):
        evaluated.append(int(model.decoder_fc.bias[0]))
        return {**scripted, "total": next(totals, 2.0)}
    monkeypatch.setattr(vae_lstm, "train_epoch", train_epoch)
    monkeypatch.setattr(vae_lstm, "evaluate", evaluate)
    return evaluated


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


# ==============================================================================================================
# Part 1. The report's experiment: data and split, model, loss, training and validation, test, generation
# ==============================================================================================================

# ------------------------------------------------------------------------------------- Data and split (section 2)

def test_split_is_the_report_legacy_numpy_shuffle():
    np.random.seed(3136)
    report_order = list(range(60000))
    np.random.shuffle(report_order)
    train_idx, val_idx = split_indices()
    assert val_idx == report_order[:6000] and train_idx == report_order[6000:]
    assert len(train_idx) == 54000 and len(val_idx) == 6000
    assert set(train_idx).isdisjoint(val_idx) and set(train_idx) | set(val_idx) == set(range(60000))


def test_the_split_seed_and_fraction_choose_the_validation_images(tiny_mnist, tmp_path, monkeypatch):
    validated, evaluate = [], vae_lstm.evaluate
    monkeypatch.setattr(vae_lstm, "evaluate", lambda model, images, *args: validated.append(images) or
                        evaluate(model, images, *args))
    raise_in_epoch(monkeypatch, 2, press_ctrl_c)  # one epoch and its validation are enough
    assert main(train_args(tiny_mnist, tmp_path, "--split-seed", "1", "--val-fraction", "0.2")) == 130
    _, val_indices = split_indices(TINY_TRAIN, 0.2, seed=1)
    assert torch.equal(validated[0], vae_lstm.load_mnist(tiny_mnist)[val_indices])


@pytest.fixture(scope="session")
def real_training_images():
    """MNIST's 60,000 training images, read once for the tests that need them."""
    return vae_lstm.load_mnist(real_mnist())


def test_real_mnist_loads_splits_and_trains_briefly(real_training_images):
    root, full = real_mnist(), real_training_images
    measured, grey, labels = vae_lstm.load_splits(root, CONFIG, "cpu")
    train_images, val_images = measured["train"], measured["val"]
    assert train_images.shape == (54000, 28, 28) and val_images.shape == (6000, 28, 28)
    torch.testing.assert_close(val_images, full[split_indices()[1]])
    assert full.min() == 0 and full.max() == 1 and full.dtype == torch.float32
    assert len(measured["test"]) == len(labels) == 10000 and all(grey[split] is measured[split] for split in grey)

    torch.manual_seed(0)
    model = VAE()
    before = evaluate(model, val_images[:2000])["total"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_epoch(model, optimizer, train_images[:3200], 64, 1.0, epoch=1)
    after = evaluate(model, val_images[:2000])
    assert before > 500 and after["total"] < 240, (before, after)  # 50 Adam steps learn the digits' shape
    assert 0 < after["kl"] < after["bce"]


@pytest.mark.parametrize("make_data_dir, words", [
    (lambda tiny, tmp: tmp / "missing", ["4 of its files missing"]),
    (lambda tiny, tmp: (tmp / "empty").mkdir() or tmp / "empty", ["4 of its files missing"]),
    (lambda tiny, tmp: altered_copy(tiny, tmp, "train-images-idx3-ubyte", lambda data: data[:5000]),
     ["invalid for input of size"]),  # truncated
    (lambda tiny, tmp: altered_copy(tiny, tmp, "train-images-idx3-ubyte", lambda data: b"\x00\x00\x07\x09" + data[4:]),
     ["AssertionError"]),  # a bad magic number
], ids=["missing", "empty", "truncated", "corrupt"])
def test_unreadable_data_is_one_clear_line(make_data_dir, words, tiny_mnist, tmp_path, capsys):
    data_dir = make_data_dir(tiny_mnist, tmp_path)
    assert main(["train", "--device", "cpu", "--data-dir", str(data_dir), "--out", str(tmp_path / "run")]) == 2
    one_error_line(capsys.readouterr(), f"cannot read MNIST from {data_dir / 'MNIST' / 'raw'}",
                   "train-images-idx3-ubyte", *words)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_train_downloads_mnist_to_data_when_it_is_absent(tiny_mnist, tmp_path, monkeypatch):
    fetched = []

    def download(dataset):  # torchvision's download, watched: "the internet" holds tiny MNIST
        fetched.append(Path(dataset.raw_folder))
        shutil.copytree(tiny_mnist / "MNIST" / "raw", dataset.raw_folder, dirs_exist_ok=True)
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", download)
    monkeypatch.chdir(tmp_path)
    assert vae_lstm.parse_args(["train"]).data_dir == "data"  # ./data unless told
    assert main(["train", "--device", "cpu", "--epochs", "1", "--out", "run"]) == 0
    assert fetched and set(fetched) == {Path("data", "MNIST", "raw")}
    assert sorted(path.name for path in (tmp_path / "data" / "MNIST" / "raw").iterdir()) == sorted(vae_lstm.MNIST_FILES)
    assert read_results(tmp_path / "run")["epochs_run"] == 1


def test_images_of_another_size_are_not_mnist(tiny_mnist, tmp_path, capsys):
    data_dir = altered_copy(tiny_mnist, tmp_path, "train-images-idx3-ubyte",
                            lambda data: idx_bytes(np.zeros((TINY_TRAIN, 20, 20))))
    assert main(train_args(data_dir, tmp_path / "run")) == 2
    one_error_line(capsys.readouterr(), "does not hold MNIST: images of shape (200, 20, 20)")


def test_a_validation_fraction_that_leaves_an_empty_split_is_one_line(tiny_mnist, tmp_path, capsys):
    assert main(train_args(tiny_mnist, tmp_path, "--val-fraction", "0.001")) == 2  # 0.2 of an image
    one_error_line(capsys.readouterr(), "--val-fraction 0.001 leaves an empty split of 200 images")


# ------------------------------------------------------------------------------------ Model (section 1, Figure 1)

@pytest.mark.parametrize("shape", [(5, 28, 28), (5, 1, 28, 28)])
def test_model_has_the_report_layers_and_parameter_count(shape):
    model = VAE()
    assert {name: tuple(p.shape) for name, p in model.state_dict().items()} == REPORT_PARAMETERS
    assert sum(p.numel() for p in model.parameters()) == 175_665
    layers = str(model)
    assert "LSTM(28, 64, batch_first=True, bidirectional=True)" in layers
    assert "ConvTranspose2d(32, 16, kernel_size=(4, 4), stride=(2, 2), padding=(1, 1))" in layers
    recon, mu, logvar = model(torch.rand(shape))
    assert recon.shape == (5, 1, 28, 28) and mu.shape == logvar.shape == (5, 64)
    assert 0 <= recon.min() and recon.max() <= 1


@pytest.mark.parametrize("kept, row", [(slice(0, 64), 0), (slice(0, 64), 27), (slice(64, 128), 0),
                                       (slice(64, 128), 27)], ids=["forward-first", "forward-last", "backward-first",
                                                                   "backward-last"])
def test_each_direction_of_the_encoder_reads_every_row_into_mu(kept, row):
    torch.manual_seed(0)
    model, x = VAE(), torch.rand(1, 28, 28)
    with torch.no_grad():  # mu from one direction's final state only
        weight = model.encoder_mu.weight.clone()
        model.encoder_mu.weight.zero_()
        model.encoder_mu.weight[:, kept] = weight[:, kept]
    changed = x.clone()  # the first row reaches the end of the backward pass, the last that of the forward
    changed[0, row] = 1 - changed[0, row]
    assert not torch.allclose(model.encode(changed)[0], model.encode(x)[0])


@pytest.mark.parametrize("direction, output", [("", "mu"), ("_reverse", "logvar")])
def test_without_the_encoder_fc_mu_is_the_forward_final_state_and_logvar_the_backward(direction, output):
    torch.manual_seed(0)  # the report's first encoder
    model, x = VAE(variant(encoder_fc=False, hidden_size=16, latent_dim=16)), torch.rand(3, 28, 28)
    codes = dict(zip(("mu", "logvar"), model.encode(x)))
    one_way = torch.nn.LSTM(28, 16, batch_first=True)
    one_way.load_state_dict({name: model.encoder_lstm.state_dict()[name + direction]
                             for name in one_way.state_dict()})
    _, (hidden, _) = one_way(x if direction == "" else x.flip(1))  # the backward direction reads the rows upwards
    torch.testing.assert_close(codes[output], hidden[0], rtol=0, atol=1e-6)


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
    (["--conv-encoder"], sum(i * o * 16 + o for i, o in ((1, 16), (16, 32), (32, 64), (64, 64)))
     + 2 * linear_parameters(64, 64) + linear_parameters(64, 64) + decoder_parameters(64)),
], ids=["report", "unidirectional", "no-encoder-fc", "no-decoder-fc", "latent-16", "hidden-32", "hidden-128",
        "report-first-model", "conv-encoder"])
def test_each_design_flag_builds_the_parameters_it_should(flags, expected):
    model = VAE(vae_lstm.config_of(vae_lstm.parse_args(["train", *flags])))
    assert sum(p.numel() for p in model.parameters()) == expected
    recon, mu, logvar = model(torch.rand(3, 28, 28))
    assert recon.shape == (3, 1, 28, 28) and mu.shape == logvar.shape == (3, model.latent_dim)
    if not flags:
        assert expected == 175_665
    if flags == ["--conv-encoder"]:
        assert expected == 226_273 and not hasattr(model, "encoder_lstm")
        assert [layer.stride for layer in model.encoder_conv if isinstance(layer, torch.nn.Conv2d)] == [
            (2, 2), (2, 2), (1, 1), (1, 1)]  # 28 -> 14 -> 7 -> 4 -> 1, the decoder's sizes backwards


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


@pytest.mark.parametrize("name, latent_dim", [("small", 8), ("first-encoder", 16), ("conv", 8)])
def test_a_variant_round_trips_through_its_checkpoint(name, latent_dim, variant_runs, tiny_mnist, tmp_path):
    run = variant_runs[name]
    results, checkpoint = read_results(run), run / "best_model.pt"
    assert torch.load(checkpoint, weights_only=True)["config"]["latent_dim"] == latent_dim
    assert main(["generate", "--device", "cpu", "--checkpoint", str(checkpoint), "--n", "4", "--out",
                 str(tmp_path / "four.png")]) == 0
    assert main(["evaluate", "--device", "cpu", "--checkpoint", str(checkpoint), "--data-dir", str(tiny_mnist),
                 "--json", str(tmp_path / "evaluation.json"), "--iw-samples", "3"]) == 0
    assert json.loads((tmp_path / "evaluation.json").read_text())["total"] == pytest.approx(results["test"]["total"],
                                                                                            rel=1e-6)
    assert main(["explore", "--device", "cpu", "--checkpoint", str(checkpoint), "--data-dir", str(tiny_mnist), "--out",
                 str(tmp_path / "explored")]) == 0
    assert len(json.loads((tmp_path / "explored" / "exploration.json").read_text())["activity"]) == latent_dim


def test_a_bare_state_dict_of_the_report_code_loads_as_the_report_model(tmp_path):
    torch.manual_seed(0)
    report_weights = ReportCodeVAE().state_dict()
    torch.save(report_weights, tmp_path / "report.pt")  # what the report's code saved: weights, no config
    model, config = vae_lstm.load_model(tmp_path / "report.pt", "cpu")
    assert config == CONFIG
    assert model.state_dict().keys() == report_weights.keys()
    assert all(torch.equal(model.state_dict()[name], weights) for name, weights in report_weights.items())


def test_a_checkpoint_round_trips_with_its_config(tmp_path):
    model = VAE(variant(latent_dim=16))
    vae_lstm.save_checkpoint({"config": variant(latent_dim=16), "model": model.state_dict(), "epoch": 1,
                              "val_loss": 1.0}, tmp_path / "best_model.pt")
    loaded, config = vae_lstm.load_model(tmp_path / "best_model.pt", "cpu")
    assert config == variant(latent_dim=16)
    x = torch.rand(4, 28, 28)
    expected = model.eval()(x, torch.Generator().manual_seed(0))[0]
    assert torch.equal(loaded.eval()(x, torch.Generator().manual_seed(0))[0], expected)


def test_a_checkpoint_saved_on_a_gpu_loads_on_a_machine_without_one(reference_run, tmp_path, fake_devices, capsys):
    checkpoint = torch.load(reference_run[0] / "best_model.pt", weights_only=True)
    with pytest.MonkeyPatch.context() as saving_on_a_gpu:  # torch.save records each tensor's device: cuda:0 here
        saving_on_a_gpu.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(checkpoint, tmp_path / "best_model.pt")
    fake_devices(cuda=False, mps=False)
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load of it does here
        torch.load(tmp_path / "best_model.pt", weights_only=True)
    model, _ = vae_lstm.load_model(tmp_path / "best_model.pt", torch.device("cpu"))
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}
    assert main(["generate", "--checkpoint", str(tmp_path / "best_model.pt")]) == 0  # --device auto: the CPU
    original = Image.open(reference_run[0] / "generated.png").convert("L")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "generated.png").convert("L")), np.asarray(original))


class CodeCarrier:
    """A pickle that, when loaded without weights_only, runs code: it creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


BAD_CHECKPOINTS = {  # what each holds, and the words of its one line
    "missing": (None, ["no checkpoint at", "or use a published model, --checkpoint "
                                           "docs/runs/design-report-seed0/best_model.pt"]),
    "truncated": (lambda good, marker: good.read_bytes()[:20000], ["not a whole file written by torch.save"]),
    "not_a_checkpoint": (lambda good, marker: b"these are not the weights you are looking for",
                         ["not a whole file written by torch.save"]),
    "a_list": (lambda good, marker: torch_bytes([1, 2]), ["is not a checkpoint: it holds a list"]),
    "other_layer_sizes": (lambda good, marker: torch_bytes({"config": CONFIG,
                                                            "model": VAE(variant(latent_dim=32)).state_dict()}),
                          ["does not hold this model's weights", "size mismatch"]),
    "nan_weights": (lambda good, marker: torch_bytes({"config": CONFIG, "model": nan_weights()}), ["NaN or inf"]),
    "carries_code": (lambda good, marker: pickle.dumps({"config": CONFIG, "model": CodeCarrier(str(marker))}),
                     ["weights_only=True) refused it", "nothing in it was run"]),
}


def torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def nan_weights():
    weights = VAE().state_dict()
    weights["decoder_fc.bias"][3] = math.nan
    return weights


@pytest.mark.parametrize("command", ["generate", "evaluate", "explore"])
@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_bad_checkpoints_are_refused(kind, command, reference_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(HERE)  # where the README's commands run, so that the published model's path is as shown
    path, marker = tmp_path / "model.pt", tmp_path / "code_ran"
    make, words = BAD_CHECKPOINTS[kind]
    if make:
        path.write_bytes(make(reference_run[0] / "best_model.pt", marker))
    written = tmp_path / "written"
    options = {"generate": ["--out", str(written / "digits.png")],
               "evaluate": ["--data-dir", "unused", "--json", str(written / "e.json")],
               "explore": ["--data-dir", "unused", "--out", str(written)]}[command]
    assert main([command, "--device", "cpu", "--checkpoint", str(path), *options]) == 2
    one_error_line(capsys.readouterr(), str(path), *words)
    assert not marker.exists() and not written.exists()


# ------------------------------------- Loss (section 1.4; the report's KL formula has a typo, its code's is this)

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


@pytest.mark.parametrize("measure", [
    lambda model, images: train_epoch(model, torch.optim.Adam(model.parameters(), lr=0.0), images, 64, 1.0, epoch=1),
    lambda model, images: evaluate(model, images),
], ids=["train_epoch", "evaluate"])
def test_losses_are_averaged_over_the_images_seen_with_a_short_last_batch(measure):
    model, images = deterministic_vae(), torch.rand(100, 28, 28)  # batches of 64 and 36
    recon, mu, logvar = model(images)
    expected = [value.item() / 100 for value in vae_loss(recon, images, mu, logvar)]
    result = measure(model, images)  # an Adam step of lr 0 changes no weight
    assert [result["total"], result["bce"], result["kl"]] == pytest.approx(expected, rel=1e-5)
    assert result["total"] != pytest.approx(expected[0] * 100 / 128, rel=1e-3)  # the report's batches x 64


class OpRecorder(TorchDispatchMode):
    """Records every operation's float64 outputs, and every random draw's generator."""

    def __init__(self):
        super().__init__()
        self.float64, self.draws = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(word in str(func) for word in ("rand", "normal", "bernoulli", "multinomial")):
            self.draws.append((str(func), kwargs.get("generator")))
        self.float64 += [str(func) for tensor in tree_leaves(out)
                         if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64]
        return out


def test_training_and_evaluation_make_no_float64_tensor():  # MPS has none: the sums are made on the host
    torch.manual_seed(0)
    model, images = VAE(), torch.rand(100, 28, 28)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    with OpRecorder() as recorder:
        train_epoch(model, optimizer, images, 64, 1.0, epoch=1, binarize=True)
        evaluate(model, images)
        vae_lstm.importance_weighted_nll(model, images[:3], 10)
    assert recorder.float64 == []


# ------------------------------------------------------------ Training, validation and early stopping (section 2)

def test_early_stopping_counts_epochs_since_the_first_best_validation_total():
    totals = (5.0, 4.0, 4.0, 3.0, 3.5, 3.2)
    counts = [vae_lstm.epochs_since_best([{"val_total": total} for total in totals[:n]]) for n in range(7)]
    assert counts == [0, 0, 0, 1, 0, 1, 2]


@draws("plot_losses")
def test_training_stops_at_the_right_epoch_keeps_the_best_and_resumes_to_nothing(tiny_mnist, tmp_path, monkeypatch,
                                                                                capsys, drawn):
    evaluated = scripted_training(monkeypatch, [9.0, 8.0, 7.0, 7.5, 7.2, 7.0, 8.0])  # best at 3, then 3 not better
    assert main(train_args(tiny_mnist, tmp_path, "--epochs", "50", "--patience", "3")) == 0
    results = read_results(tmp_path)
    assert results["epochs_run"] == 6 and results["best_epoch"] == 3
    best_line = next(line for line in drawn["loss_plot.png"].axes[0].lines if line.get_label().startswith("best"))
    assert best_line.get_label() == "best epoch (3)" and list(best_line.get_xdata()) == [3, 3]
    assert results["stop_reason"].startswith("early stopping")
    assert torch.load(tmp_path / "best_model.pt", weights_only=True)["epoch"] == 3
    assert evaluated == [1, 2, 3, 4, 5, 6, 3, 3, 3]  # validation after each epoch, then the best model tested
    capsys.readouterr()

    monkeypatch.setattr(vae_lstm, "train_epoch", lambda *args: pytest.fail("trained again"))
    assert main(train_args(tiny_mnist, tmp_path, "--epochs", "80", "--patience", "3", "--resume")) == 0
    assert "early stopping ended this run at epoch 6" in capsys.readouterr().out
    results = read_results(tmp_path)
    assert results["epochs_run"] == 6 and results["stop_reason"].startswith("early stopping")


def test_the_seed_seeds_the_weights_the_batch_order_and_the_noise(reference_run, tiny_mnist, tmp_path, monkeypatch):
    started, fit = [], vae_lstm.fit

    def watched(config, model, *args):
        started.append(copy_of_weights(model))
        return fit(config, model, *args)
    monkeypatch.setattr(vae_lstm, "fit", watched)
    for name in ("a", "b"):  # seed 1 twice
        assert main(train_args(tiny_mnist, tmp_path / name, "--epochs", "1", "--seed", "1")) == 0
    torch.manual_seed(1)
    expected = VAE().state_dict()
    assert all(torch.equal(weights, expected[name]) for name, weights in started[0].items())
    first_epochs = [first_epoch(folder) for folder in (tmp_path / "a", tmp_path / "b", reference_run[0])]
    assert first_epochs[0] == first_epochs[1] and first_epochs[0] != first_epochs[2]  # seed 0 trained another run


def copy_of_weights(model):
    return {name: weights.clone() for name, weights in model.state_dict().items()}


def first_epoch(folder):
    """The first row of a run's history.csv, but for its seconds."""
    row = next(csv.DictReader(io.StringIO((folder / "history.csv").read_text())))
    return {name: value for name, value in row.items() if "seconds" not in name}


def test_the_best_model_is_tested_not_the_last(tiny_mnist, tmp_path, monkeypatch):
    train_epoch = vae_lstm.train_epoch

    def second_epoch_wrecks_the_decoder(model, *args):  # so that epoch 1 stays the best
        losses_of_the_epoch = train_epoch(model, *args)
        if args[4] == 2:
            with torch.no_grad():
                model.decoder_list[3].bias.fill_(5.0)
        return losses_of_the_epoch
    monkeypatch.setattr(vae_lstm, "train_epoch", second_epoch_wrecks_the_decoder)
    assert main(train_args(tiny_mnist, tmp_path, "--epochs", "2")) == 0
    results, test_images = read_results(tmp_path), vae_lstm.load_mnist(tiny_mnist, test_set=True)
    best, _ = vae_lstm.load_model(tmp_path / "best_model.pt", "cpu")
    last = VAE().eval()
    last.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["model"])
    assert results["best_epoch"] == 1 and losses(results)["test total"] == evaluate(best, test_images)["total"]
    assert results["test"]["total"] < evaluate(last, test_images)["total"] - 100


@pytest.fixture
def no_read_back(monkeypatch):
    """Any read of a tensor's value by the host fails: on a GPU each would wait for the queued work."""
    def read_back(*args, **kwargs):
        raise AssertionError("a value was read back from the device")

    for name in ("__bool__", "__float__", "__int__", "item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    return monkeypatch


def test_each_adam_step_takes_batch_size_images_and_the_last_the_rest(tiny_mnist, tmp_path, monkeypatch):
    sizes, train_step = [], vae_lstm.train_step
    monkeypatch.setattr(vae_lstm, "train_step", lambda model, optimizer, x, kl_weight: sizes.append(len(x)) or
                        train_step(model, optimizer, x, kl_weight))
    raise_in_epoch(monkeypatch, 3, press_ctrl_c)
    assert main(train_args(tiny_mnist, tmp_path, "--batch-size", "100")) == 130
    assert sizes == [100, 80, 100, 80]  # 180 training images an epoch, two epochs


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


def test_a_non_finite_loss_stops_the_run_and_keeps_the_best_model(tiny_mnist, tmp_path, monkeypatch, capsys):
    calls = {"training": 0}

    def loss_that_explodes(recon, x, mu, logvar, kl_weight=1.0):
        total, bce, kl = vae_loss(recon, x, mu, logvar, kl_weight)
        calls["training"] += torch.is_grad_enabled()
        return (total * math.nan if calls["training"] == 5 else total), bce, kl  # epoch 2, batch 2 of 3

    monkeypatch.setattr(vae_lstm, "vae_loss", loss_that_explodes)
    assert main(train_args(tiny_mnist, tmp_path)) == 2
    one_error_line(capsys.readouterr(), "training diverged in epoch 2, batch 2 of 3: the loss is nan", "--lr")
    assert torch.load(tmp_path / "best_model.pt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "results.json").exists()


def test_a_diverging_run_stops_with_one_line(tiny_mnist, tmp_path, capsys):
    assert main(train_args(tiny_mnist, tmp_path, "--lr", "1e6")) == 2  # the first step wrecks the weights
    one_error_line(capsys.readouterr(), "training diverged in epoch 1, batch 2 of 3: the reconstructions hold NaN",
                   "saved checkpoints are as they were", "--lr")
    assert not (tmp_path / "best_model.pt").exists() and not (tmp_path / "results.json").exists()


LOSS_PARTS = [f"{split} {part}" for split in ("train", "val") for part in ("total", "bce", "kl")]


@pytest.mark.parametrize("epochs, best", [(1, 1), (3, 2)])
def test_the_loss_plot_draws_each_curve_through_its_marked_values(epochs, best, drawn, tmp_path):
    history = [{"epoch": epoch, **{name.replace(" ", "_"): 100.0 * (1 + column) + epoch
                                   for column, name in enumerate(LOSS_PARTS)}} for epoch in range(1, epochs + 1)]
    vae_lstm.plot_losses(history, best, tmp_path / "loss_plot.png")
    axes = drawn["loss_plot.png"].axes[0]
    curves = {line.get_label(): line for line in axes.lines}
    assert set(curves) == {*LOSS_PARTS, f"best epoch ({best})"}
    for name in LOSS_PARTS:
        assert list(curves[name].get_xdata()) == list(range(1, epochs + 1))
        assert list(curves[name].get_ydata()) == [row[name.replace(" ", "_")] for row in history], name
        assert curves[name].get_marker() == "o", name  # one epoch draws no line, but its points
    assert list(curves[f"best epoch ({best})"].get_xdata()) == [best, best]
    assert axes.get_xlim() == (0.5, epochs + 0.5)  # the points clear of the frame
    ticks = [tick for tick in axes.get_xticks() if 0.5 <= tick <= epochs + 0.5]
    assert ticks and all(tick == int(tick) for tick in ticks), ticks  # whole epochs only


# ------------------------------------------ Test (section 3): the best model, under torch.no_grad(), never a step

def test_the_reconstructions_are_the_first_test_images_above_their_decodings(reference_run, tiny_mnist):
    cells = digit_cells(reference_run[0] / "test_reconstruction.png", 2, 10)
    images = vae_lstm.load_mnist(tiny_mnist, test_set=True)[:10]
    np.testing.assert_allclose(cells[0], images.numpy() * 255, atol=1)
    model, _ = vae_lstm.load_model(reference_run[0] / "best_model.pt", "cpu")
    with torch.no_grad():
        recon = model.eval()(images, torch.Generator().manual_seed(vae_lstm.EVAL_SEED))[0]
    np.testing.assert_allclose(cells[1], recon.squeeze(1).numpy() * 255, atol=1)


def test_validation_and_test_run_in_eval_mode_under_no_grad_and_change_no_weight(monkeypatch):
    model, seen = VAE().train(), []
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    monkeypatch.setattr(vae_lstm, "vae_loss", lambda *args: seen.append((torch.is_grad_enabled(), model.training))
                        or vae_loss(*args))
    evaluate(model, torch.rand(30, 28, 28))
    assert seen and set(seen) == {(False, False)}
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())


def test_evaluation_and_the_score_take_eval_batch_size_images_at_a_time(monkeypatch):
    monkeypatch.setattr(vae_lstm, "EVAL_BATCH_SIZE", 7)
    model, images, classifier = VAE().eval(), torch.rand(20, 28, 28), vae_lstm.digit_classifier().eval()
    sizes = {"encode": [], "decode": [], "classify": []}
    for name in ("encode", "decode"):
        monkeypatch.setattr(model, name, lambda x, run=getattr(model, name), name=name: sizes[name].append(len(x))
                            or run(x))
    classifier[1].register_forward_pre_hook(lambda layer, inputs: sizes["classify"].append(len(inputs[0])))
    evaluate(model, images)
    vae_lstm.classify(classifier, images)
    assert sizes == {"encode": [7, 7, 6], "decode": [7, 7, 6], "classify": [7, 7, 6]}


@pytest.mark.parametrize("split, run", [("train", "report"), ("val", "report"), ("test", "report"),
                                        ("val", "conv")])  # the latter trained at --kl-weight 2
def test_evaluate_measures_the_split_it_names_as_train_did(split, run, reference_run, variant_runs, tiny_mnist,
                                                           tmp_path, capsys):
    out = reference_run[0] if run == "report" else variant_runs[run]
    assert main(["evaluate", "--device", "cpu", "--checkpoint", str(out / "best_model.pt"), "--data-dir",
                 str(tiny_mnist), "--split", split, "--json", str(tmp_path / "evaluation.json")]) == 0
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["split"] == split and evaluation["images"] == {"train": 180, "val": 20, "test": TINY_TEST}[split]
    assert not {"gaps", "holes"} & set(evaluation) and set(evaluation["score"]) == {"samples", "mixture",
                                                                                    "reconstructions"}  # unasked
    for part in ("bce", "kl", "total"):  # the same z, so the numbers that train measured
        assert evaluation[part] == pytest.approx(read_results(out)[split][part], rel=1e-6), part
    model, config = vae_lstm.load_model(out / "best_model.pt", "cpu")  # the KL of this split's codes is split
    codes = vae_lstm.encode_split(model, vae_lstm.load_splits(tiny_mnist, config, "cpu")[0][split])
    assert {name: evaluation[name] for name in ("mutual_information", "marginal_kl")} == vae_lstm.elbo_surgery(
        *codes, evaluation["kl"])
    assert evaluation["total"] == pytest.approx(evaluation["bce"] + config["kl_weight"] * evaluation["kl"], rel=1e-6)
    assert evaluation["machine"] == vae_lstm.machine(torch.device("cpu"))  # where the numbers come from
    assert evaluation["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # AVX2 or AVX512
    assert f"{split}: {evaluation['images']} images, per image: BCE {evaluation['bce']:.2f}" in capsys.readouterr().out


def test_evaluate_refuses_a_model_whose_finite_weights_overflow(tmp_path, tiny_mnist, capsys):
    weights = VAE().state_dict()
    weights["decoder_fc.weight"].fill_(3e38)  # finite, but inf after the first layer, then inf - inf
    torch.save({"config": CONFIG, "model": weights}, tmp_path / "huge.pt")
    assert main(["evaluate", "--device", "cpu", "--checkpoint", str(tmp_path / "huge.pt"), "--data-dir",
                 str(tiny_mnist)]) == 2
    one_error_line(capsys.readouterr(), "the model's reconstructions hold NaN or inf: its weights are not finite")


@pytest.fixture(scope="module")
def real_test_images():
    return vae_lstm.load_mnist(real_mnist(), test_set=True)


@pytest.mark.parametrize("run", PUBLISHED_RUNS + CONCLUSION_MODELS)  # the latter measured on CUDA, here on a CPU
def test_each_published_model_gives_its_published_test_numbers(run, real_test_images):
    folder = vae_lstm.PUBLISHED / run
    model, config = vae_lstm.load_model(folder / "best_model.pt", "cpu")
    published = json.loads((folder / "results.json").read_text())
    assert config == {**CONFIG, **published["config"]} and (folder / "best_model.pt").stat().st_size < 2**20
    measured = evaluate(model, binarized(real_test_images) if config["binarize"] else real_test_images,
                        config["kl_weight"])
    assert measured == pytest.approx({part: published["test"][part] for part in measured}, abs=1e-3)  # per image


def test_the_published_models_are_those_of_the_readme():
    shipped = sorted(path.parent.name for path in vae_lstm.PUBLISHED.glob("*/best_model.pt"))
    assert shipped == sorted(PUBLISHED_RUNS + VARIANT_MODELS)
    assert vae_lstm.PUBLISHED_MODEL.is_file() and str(vae_lstm.PUBLISHED_MODEL.relative_to(HERE)) in (
        HERE / "README.md").read_text()


@pytest.mark.parametrize("run", VARIANT_MODELS)
def test_each_shipped_variant_is_the_model_of_its_results_and_has_a_score(run):
    folder = vae_lstm.PUBLISHED / run
    model, config = vae_lstm.load_model(folder / "best_model.pt", "cpu")
    results = json.loads((folder / "results.json").read_text())
    assert config == {**CONFIG, **results["config"]} and sum(p.numel() for p in model.parameters()) == results[
        "parameters"]
    assert (folder / "best_model.pt").stat().st_size <= 1.5 * 2**20 and set(results["score"]) == {
        "samples", "mixture", "reconstructions"}
    assert results["mixture_fit"]["components"] == vae_lstm.MIXTURE_COMPONENTS


# ------------------------------- Generation (the report's generator.py, which repeated the config, saved nothing)

@pytest.mark.parametrize("n, nrow, rows, columns", [(7, 10, 1, 7), (6, 3, 2, 3), (5, 2, 3, 2)])
def test_generate_draws_n_digits_nrow_to_a_row(n, nrow, rows, columns, reference_run, tmp_path, capsys):
    path = tmp_path / "digits.png"
    assert main(["generate", "--device", "cpu", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--n",
                 str(n), "--nrow", str(nrow), "--out", str(path)]) == 0
    assert capsys.readouterr().out == f"{n} generated digits written to {path}\n"
    cells = digit_cells(path, rows, columns).reshape(-1, 28, 28)
    assert_every_cell_is_drawn(cells[:n])
    assert (cells[n:] == 128).all()  # the rest of the last row is padding's grey, as torchvision leaves it


def test_what_the_user_reads_is_drawn_from_seeded_cpu_generators(tiny_mnist, tmp_path):
    model, images = VAE().eval(), vae_lstm.load_mnist(tiny_mnist, test_set=True)
    codes = torch.randn(20, 64)
    with OpRecorder() as recorder:
        digits = vae_lstm.sample_digits(model, 5, seed=3)
        evaluated = evaluate(model, images)
        vae_lstm.importance_weighted_nll(model, images[:3], 10)
        vae_lstm.save_reconstructions(model, images, tmp_path / "reconstructions.png")
        vae_lstm.load_splits(tiny_mnist, {**CONFIG, "binarize": True}, "cpu")
        prior = vae_lstm.fit_mixture(codes, 2)[0]  # its start, then its components and its codes
        vae_lstm.sample_digits(model, 5, seed=3, prior=prior)
    assert len(recorder.draws) == 10  # digits, evaluate's z, the estimate's eps, reconstructions, 3 binarizations
    for draw, generator in recorder.draws:
        assert generator is not None and generator.device.type == "cpu", draw  # never a device's, never the global
    with torch.no_grad():
        z = torch.randn((5, 64), generator=torch.Generator().manual_seed(3))
        assert torch.equal(digits, model.decode(z))
    assert evaluate(model, images) == evaluated


def test_a_published_model_generates_without_training_and_leaves_the_published_files_alone(tmp_path, monkeypatch,
                                                                                           capsys, tiny_mnist):
    monkeypatch.chdir(tmp_path)  # a user's folder, outside the repository
    published = sorted(path.stat().st_mtime_ns for path in vae_lstm.PUBLISHED.rglob("*"))
    assert main(["generate", "--device", "cpu", "--checkpoint", str(vae_lstm.PUBLISHED_MODEL)]) == 0
    written = Path("runs", "published", "design-report-seed0", "generated.png")
    assert capsys.readouterr().out == f"100 generated digits written to {written}\n"
    assert_every_cell_is_drawn(digit_cells(written, 10, 10))
    of_the_prior = written.read_bytes()
    assert main(["generate", "--device", "cpu", "--checkpoint", str(vae_lstm.PUBLISHED_MODEL), "--prior", "mixture",
                 "--data-dir", str(tiny_mnist)]) == 0  # beside the digits of N(0, I), not over them
    assert capsys.readouterr().out.endswith(f"written to {written.with_name('generated_mixture.png')}\n")
    assert written.read_bytes() == of_the_prior and written.with_name("generated_mixture.png").is_file()
    assert sorted(path.stat().st_mtime_ns for path in vae_lstm.PUBLISHED.rglob("*")) == published
    assert vae_lstm.output_path(None, tmp_path / "run" / "best_model.pt") == tmp_path / "run"  # others: beside it


# ----------------------------------------------- The train command: train and validate, test the best model, draw

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
    assert results["val"]["total"] == pytest.approx(checkpoint["val_loss"], rel=1e-6)  # of the model saved
    for split in ("train", "val", "test"):
        bce, kl, total = (results[split][name] for name in ("bce", "kl", "total"))
        assert 0 < kl and 0 < bce < 784 * math.log(2) * 2 and total == pytest.approx(bce + kl)
    assert results["seconds"] > 0 and results["train_images_per_second"] > 0
    assert "97.57" in stdout and f"{results['test']['total']:.2f}" in stdout  # beside the report's numbers

    assert Image.open(out / "loss_plot.png").size == (700, 450)
    for name in ("train_reconstruction.png", "test_reconstruction.png"):
        cells = digit_cells(out / name, 2, 10)  # ten originals above their reconstructions
        assert_every_cell_is_drawn(cells)
    assert_every_cell_is_drawn(digit_cells(out / "generated.png", 10, 10))
    written = ["best_model.pt", "last.pt", "history.csv", "results.json", "loss_plot.png", "train_reconstruction.png",
               "test_reconstruction.png", "generated.png", *vae_lstm.EXPLORATION_FILES]
    umask = os.umask(0o022)
    os.umask(umask)
    assert {name: stat.S_IMODE((out / name).stat().st_mode) for name in written} == dict.fromkeys(written,
                                                                                               0o666 & ~umask)


def test_results_time_the_epochs_as_history_does(reference_run):
    out, _ = reference_run
    history, results = list(csv.DictReader(io.StringIO((out / "history.csv").read_text()))), read_results(out)
    seconds, train_seconds = ([float(row[name]) for row in history] for name in ("seconds", "train_seconds"))
    assert all(0 < train < epoch for train, epoch in zip(train_seconds, seconds))  # training, then validation
    assert results["seconds_per_epoch"] == pytest.approx(sum(seconds) / TINY_EPOCHS, rel=1e-12)
    assert results["train_images_per_second"] == pytest.approx(180 * TINY_EPOCHS / sum(train_seconds), rel=1e-12)
    assert sum(seconds) < results["seconds"]  # the epochs, then the test of the best model


def test_the_summary_table_puts_the_report_on_the_left_and_the_run_on_the_right(reference_run):
    out, stdout = reference_run
    results = read_results(out)
    header, *rows = stdout.split("per-image losses of the best model (nats):\n")[1].splitlines()[:4]
    assert "report" in header.split("|")[0] and "this run" in header.split("|")[1]
    for row, split, name in zip(rows, ("train", "val", "test"), ("train", "valid", "test")):
        report, this_run = row.split("|")
        assert report.split()[0] == name
        assert [float(cell) for cell in report.split()[1:]] == list(vae_lstm.REPORT_RESULTS[split].values())
        assert [float(cell) for cell in this_run.split()] == pytest.approx(
            [results[split][part] for part in ("bce", "kl", "total")], abs=0.005)


# The nine losses of the tiny reference run by the code before --binarize and the design flags existed, on an
# AMD EPYC with torch 2.14.1. Another CPU or torch build rounds differently (about 1e-6 here); one more random
# draw per epoch moves them by 0.5 to 3 %.
LOSSES_BEFORE_THE_FLAGS = {
    "train bce": 265.4654730902778, "train kl": 0.9484239366319445, "train total": 266.4138888888889,
    "val bce": 229.3482421875, "val kl": 0.9450061798095704, "val total": 230.2932373046875,
    "test bce": 272.4857421875, "test kl": 0.9482423400878907, "test total": 273.433984375,
}


def test_without_the_new_flags_a_run_gives_the_numbers_of_the_code_before_them(reference_run):
    checkpoint = torch.load(reference_run[0] / "best_model.pt", weights_only=True)
    assert checkpoint["config"]["binarize"] is False and checkpoint["config"]["hidden_size"] == 64
    assert losses(read_results(reference_run[0])) == pytest.approx(LOSSES_BEFORE_THE_FLAGS, rel=1e-4)


def test_the_kl_weight_weighs_the_kl_in_training_validation_test_and_evaluate(tiny_mnist, tmp_path):
    assert main(train_args(tiny_mnist, tmp_path, "--epochs", "1", "--kl-weight", "0.25")) == 0
    epoch = next(csv.DictReader(io.StringIO((tmp_path / "history.csv").read_text())))
    for split in ("train", "val"):
        bce, kl, total = (float(epoch[f"{split}_{part}"]) for part in ("bce", "kl", "total"))
        assert total == pytest.approx(bce + 0.25 * kl, rel=1e-6) and kl > 1e-3, split
    results = read_results(tmp_path)
    assert results["test"]["total"] == pytest.approx(results["test"]["bce"] + 0.25 * results["test"]["kl"], rel=1e-6)
    assert main(["evaluate", "--device", "cpu", "--checkpoint", str(tmp_path / "best_model.pt"), "--data-dir",
                 str(tiny_mnist)]) == 0
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["total"] == pytest.approx(results["test"]["total"], rel=1e-6)


# ==============================================================================================================
# Part 2. Beyond the report: binarized MNIST, the likelihood, the latent space and its prior, the score, comparing runs
# ==============================================================================================================

# --------------------------------------------------------- Binarized MNIST (Burda et al., 2016; train --binarize)

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


def binarized(images):
    """Binary pixels as a --binarize model is measured on, drawn here from the seed that the README names."""
    return torch.bernoulli(images, generator=torch.Generator().manual_seed(0))


def test_measured_images_are_binarized_once_from_a_fixed_seed(grey_mnist):
    once, grey, _ = vae_lstm.load_splits(grey_mnist, variant(binarize=True), "cpu")
    for split, images in once.items():
        assert set(images.unique().tolist()) == {0.0, 1.0} and abs(images.mean() - grey[split].mean()) < 0.01
        assert torch.equal(images, binarized(grey[split])), split
    assert torch.equal(vae_lstm.load_splits(grey_mnist, variant(binarize=True), "cpu")[0]["val"], once["val"])
    measured, grey, _ = vae_lstm.load_splits(grey_mnist, CONFIG, "cpu")
    assert all(measured[split] is grey[split] for split in grey)  # grey levels as they are


@pytest.fixture(scope="module")
def grey_mnist(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("grey"), grey=True)


def test_a_binarized_model_is_measured_on_binarized_images(grey_mnist, tmp_path, monkeypatch, capsys):
    binarized_run, tiny_mnist = tmp_path, grey_mnist
    scored = watched_calls(monkeypatch, "classify", 1)
    assert main(train_args(tiny_mnist, binarized_run, "--binarize")) == 0
    monkeypatch.undo()
    checkpoint = binarized_run / "best_model.pt"
    assert torch.load(checkpoint, weights_only=True)["config"]["binarize"] is True
    evaluations, fitted = [], watched_calls(monkeypatch, "fit_mixture", 0)
    scored_by_evaluate = watched_calls(monkeypatch, "classify", 1)
    for _ in range(2):
        assert main(["evaluate", "--device", "cpu", "--checkpoint", str(checkpoint), "--data-dir", str(tiny_mnist),
                     "--iw-samples", "5"]) == 0
        evaluations.append(json.loads((binarized_run / "evaluation.json").read_text()))
        del evaluations[-1]["iw_seconds"], evaluations[-1]["machine"], evaluations[-1]["mixture_fit"]["seconds"]
    first, second = evaluations
    assert first == second  # one checkpoint, one set of numbers
    assert first["binarize"] is True and "iw_bound" not in first and first["iw_nll"] > 0
    assert "-log p(x) of the binarized images" in first["iw_meaning"]
    assert f"{first['iw_nll']:.2f} with K=5: -log p(x) of the binarized images in nats" in capsys.readouterr().out

    results = read_results(binarized_run)
    assert first["total"] == pytest.approx(results["test"]["total"], rel=1e-6)  # what train measured: binarized
    model, _ = vae_lstm.load_model(checkpoint, "cpu")
    grey = vae_lstm.load_mnist(tiny_mnist, test_set=True)
    assert evaluate(model, binarized(grey))["total"] == pytest.approx(first["total"], rel=1e-9)
    assert evaluate(model, grey)["total"] != pytest.approx(first["total"], rel=1e-4)  # not the grey levels
    reference, _, _, reconstructions = scored  # its score: its reconstructions of binary images, against grey ones
    assert torch.equal(reference, grey) and torch.equal(scored_by_evaluate[0], grey)  # by train, and by evaluate
    assert torch.equal(scored_by_evaluate[3], reconstructions)
    train_images = vae_lstm.load_splits(tiny_mnist, CONFIG, "cpu")[0]["train"]  # its mixture: binary images' codes
    assert torch.equal(fitted[0], vae_lstm.encode_split(model, binarized(train_images))[0])
    with torch.no_grad():
        expected = model(binarized(grey), torch.Generator().manual_seed(vae_lstm.EVAL_SEED))[0]
    assert torch.equal(reconstructions, expected)

    assert main(["explore", "--device", "cpu", "--checkpoint", str(checkpoint), "--data-dir", str(tiny_mnist)]) == 0
    assert json.loads((binarized_run / "exploration.json").read_text())["kl"] == pytest.approx(results["test"]["kl"],
                                                                                               rel=1e-6)


# ------------------------------------------------------- The importance-weighted estimate (evaluate --iw-samples)

def test_evaluate_adds_the_importance_weighted_bound_of_a_grey_level_model(reference_run, tiny_mnist, tmp_path,
                                                                           capsys):
    out = reference_run[0]
    assert main(["evaluate", "--device", "cpu", "--checkpoint", str(out / "best_model.pt"), "--data-dir",
                 str(tiny_mnist), "--iw-samples", "5", "--json", str(tmp_path / "evaluation.json")]) == 0
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["images"] == TINY_TEST and evaluation["iw_samples"] == 5
    assert evaluation["total"] == pytest.approx(read_results(out)["test"]["total"], rel=1e-6)  # same z, same numbers
    assert 0 < evaluation["iw_bound"] < evaluation["total"] + 5 and "iw_nll" not in evaluation  # grey levels
    assert "not a log-likelihood" in evaluation["iw_meaning"] and evaluation["iw_seconds"] > 0
    assert (f"{evaluation['iw_bound']:.2f} with K=5: an importance-weighted bound of the report's objective on "
            f"grey-level pixels, not a log-likelihood\n") in capsys.readouterr().out


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


@pytest.mark.parametrize("images, samples, chunk, decoded", [(6, 37, 50, [50, 50, 50, 50, 22]),
                                                              (20, 30, None, [500, 100])], ids=["given", "cpu"])
def test_the_codes_of_the_estimate_are_decoded_a_chunk_at_a_time(images, samples, chunk, decoded, monkeypatch):
    sizes, fast_decoder = [], vae_lstm.fast_decoder
    monkeypatch.setattr(vae_lstm, "fast_decoder", lambda model: (lambda z, decode=fast_decoder(model): sizes.append(
        len(z)) or decode(z)))
    vae_lstm.importance_weighted_nll(VAE().eval(), torch.rand(images, 28, 28), samples, chunk)
    assert sizes == decoded  # on a CPU, IW_CHUNK["cpu"] = 500 codes at a time
    assert vae_lstm.IW_CHUNK["cpu"] == 500


def test_the_estimate_over_several_batches_of_images_is_that_of_one_batch(monkeypatch):
    torch.manual_seed(0)
    model, x = VAE().eval(), torch.rand(12, 28, 28)
    one_batch = vae_lstm.importance_weighted_nll(model, x, 10)
    monkeypatch.setattr(vae_lstm, "IW_CODES", 50)  # batches of 5, 5 and 2 images, from one stream of draws
    batches = watched_calls(monkeypatch, "log_importance_weights", 1)
    torch.testing.assert_close(vae_lstm.importance_weighted_nll(model, x, 10), one_batch, rtol=1e-6, atol=1e-4)
    assert [len(images) for images in batches] == [5, 5, 2] and torch.equal(torch.cat(batches), x)  # in memory: 50


@pytest.mark.parametrize("config", [CONFIG, variant(latent_dim=16, decoder_fc=False),
                                    variant(hidden_size=32, latent_dim=32, encoder_fc=False)],
                         ids=["report", "no-decoder-fc", "no-encoder-fc"])
def test_the_fast_decoder_equals_decode_for_every_decoder(config):
    model = VAE(config).eval()
    z = torch.randn(300, model.latent_dim)
    with torch.no_grad():
        torch.testing.assert_close(vae_lstm.fast_decoder(model)(z), model.decode(z), rtol=1e-5, atol=1e-6)


# ------------------------------------------- The latent space: interpolation, a map by digit, the dimensions used

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


def test_the_interpolation_pairs_join_the_first_image_of_each_digit_and_hold_every_digit():
    labels = torch.from_numpy(np.random.default_rng(0).permutation(np.arange(50) % 10))
    first = [int(np.flatnonzero(labels.numpy() == digit)[0]) for digit in range(10)]
    pairs = vae_lstm.interpolation_pairs(labels)
    assert pairs == [(first[digit], first[(digit + 3) % 10]) for digit in range(8)]
    assert {int(labels[index]) for pair in pairs for index in pair} == set(range(10))


def test_principal_components_project_on_the_directions_of_most_variance():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 6))[0]  # orthonormal directions in a 6-dimensional code space
    scores = torch.randn(300, 3)
    scores = torch.linalg.qr(scores - scores.mean(0))[0]  # centred, orthonormal columns
    spread = torch.tensor([3.0, 2.0, 1.0])
    codes = (scores * spread) @ basis[:, :3].T + 7.0  # variance 9, 4 and 1 along the first three directions
    projection, explained = vae_lstm.principal_components(codes)
    signs = torch.sign((projection * scores[:, :2]).sum(0))  # a component's sign is arbitrary
    torch.testing.assert_close(projection * signs, scores[:, :2] * spread[:2], rtol=0, atol=1e-4)
    assert explained == pytest.approx(13 / 14, rel=1e-5)


class FixedCodes(VAE):
    """A VAE whose encoder gives fixed mean codes, one row per test image."""

    def encode(self, x):
        return self.codes[:len(x)], torch.zeros_like(self.codes[:len(x)])


@draws("plot_latent_usage")
def test_a_dimension_is_active_just_above_burda_s_threshold_and_not_just_below(tiny_mnist, tmp_path, drawn):
    images, labels = vae_lstm.load_mnist(tiny_mnist, test_set=True, labels=True)
    unit = torch.randn(TINY_TEST, 1, generator=torch.Generator().manual_seed(0))
    unit = (unit - unit.mean()) / unit.std()  # variance 1 over the test images
    activity = torch.tensor([0.0101] * 20 + [0.0099] * 44)  # 1 % above Burda et al.'s 0.01, and 1 % below
    model = FixedCodes()
    model.codes = unit * activity.sqrt()
    exploration = vae_lstm.explore(model, images, labels, tmp_path, "fixed")
    assert exploration["active_units"] == 20 and exploration["activity_threshold"] == 0.01
    np.testing.assert_allclose(exploration["activity"], activity, rtol=1e-4)
    axes = drawn["latent_usage.png"].axes[0]
    active, inactive = (collection.get_offsets()[:, 1] for collection in axes.collections)
    assert len(active) == 20 and len(inactive) == 44 and axes.get_title() == "20 of 64 latent dimensions active"
    assert [line.get_ydata()[0] for line in axes.lines] == [0.01]  # the threshold drawn


def test_a_dimension_whose_encoder_mu_row_is_zero_is_inactive(tiny_mnist, tmp_path):
    torch.manual_seed(0)
    model, dead = VAE(), [3, 17, 40]
    with torch.no_grad():
        model.encoder_mu.weight.mul_(1000)  # activity x 1e6: every other dimension far above the threshold
        model.encoder_mu.weight[dead] = 0
    images, labels = vae_lstm.load_mnist(tiny_mnist, test_set=True, labels=True)
    exploration = vae_lstm.explore(model, images, labels, tmp_path, "scaled.pt")
    activity = torch.tensor(exploration["activity"])
    assert (activity <= vae_lstm.ACTIVITY_THRESHOLD).nonzero().flatten().tolist() == dead
    assert exploration["active_units"] == 64 - len(dead) and activity.min() == 0


def test_explore_command_writes_its_four_files(reference_run, tiny_mnist, tmp_path, capsys, drawn):
    out = reference_run[0]
    assert main(["explore", "--device", "cpu", "--checkpoint", str(out / "best_model.pt"), "--data-dir",
                 str(tiny_mnist), "--out", str(tmp_path)]) == 0
    exploration = json.loads((tmp_path / "exploration.json").read_text())
    assert exploration["latent_dim"] == 64 and len(exploration["activity"]) == len(exploration["kl_per_dim"]) == 64
    assert exploration["active_units"] == sum(a > 0.01 for a in exploration["activity"])
    assert f"{exploration['active_units']} of 64 latent dimensions active" in capsys.readouterr().out
    assert sum(exploration["kl_per_dim"]) == pytest.approx(read_results(out)["test"]["kl"], rel=1e-5)
    images, labels = vae_lstm.load_mnist(tiny_mnist, test_set=True, labels=True)
    model, _ = vae_lstm.load_model(out / "best_model.pt", "cpu")
    with torch.no_grad():
        mu, logvar = model.eval().encode(images)
    q, prior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    expected = torch.distributions.kl_divergence(q, prior).mean(0)  # each dimension's, averaged over the images
    np.testing.assert_allclose(exploration["kl_per_dim"], expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(exploration["activity"], mu.var(0), rtol=1e-5, atol=1e-9)
    for left, right in exploration["interpolation_pairs"]:
        assert labels[left] != labels[right]
    assert {int(labels[left]) for left, _ in exploration["interpolation_pairs"]} == set(range(8))

    cells = digit_cells(tmp_path / "interpolation.png", 8, 12)  # 8 rows: image, 10 steps, image
    assert_every_cell_is_drawn(cells)
    for row, (left, right) in enumerate(exploration["interpolation_pairs"]):  # the pair's own images frame each row
        np.testing.assert_allclose(cells[row, 0], images[left].numpy() * 255, atol=1)
        np.testing.assert_allclose(cells[row, -1], images[right].numpy() * 255, atol=1)
    assert [Image.open(tmp_path / name).size[0] for name in ("latent_map.png", "latent_usage.png")] == [700, 700]
    points = drawn["latent_map.png"].axes[0].collections[0]
    projection, explained = vae_lstm.principal_components(mu)
    assert exploration["principal_components_variance"] == pytest.approx(explained)
    np.testing.assert_allclose(np.sort(points.get_offsets(), axis=0), np.sort(projection, axis=0), atol=1e-5)
    assert sorted(points.get_array()) == sorted(labels.tolist())  # each image's point, coloured by its digit
    assert f"{explained:.0%} of their variance" in drawn["latent_map.png"].axes[0].get_title()
    # `train` wrote the same exploration of its best model into its run folder
    assert json.loads((out / "exploration.json").read_text())["activity"] == exploration["activity"]
    assert all((out / name).stat().st_size > 0 for name in vae_lstm.EXPLORATION_FILES)


@draws("plot_latent_map")
def test_the_latent_map_draws_the_digits_shuffled_so_that_none_hides_another(reference_run, tiny_mnist, tmp_path,
                                                                            drawn):
    labels = np.arange(TINY_TEST) * 10 // TINY_TEST  # sorted: the 0s first, the 9s last
    data = altered_copy(tiny_mnist, tmp_path, "t10k-labels-idx1-ubyte", lambda _: idx_bytes(labels))
    assert main(["explore", "--device", "cpu", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--data-dir",
                 str(data), "--out", str(tmp_path / "explored")]) == 0
    colours = list(drawn["latent_map.png"].axes[0].collections[0].get_array())
    assert sorted(colours) == list(labels) and colours != sorted(colours)


def test_a_test_set_that_lacks_a_digit_is_not_mnist(reference_run, tiny_mnist, tmp_path, capsys):
    data_dir = altered_copy(tiny_mnist, tmp_path, "t10k-labels-idx1-ubyte",
                            lambda data: idx_bytes(np.arange(TINY_TEST) % 9))  # no 9
    assert main(["explore", "--device", "cpu", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--data-dir",
                 str(data_dir), "--out", str(tmp_path / "explored")]) == 2
    one_error_line(capsys.readouterr(), "the test set lacks the digits [9]: not MNIST")


# ------------------------------- The KL term, split: what the codes carry and what the prior misses (ELBO surgery)

def test_posteriors_all_alike_carry_no_information_and_the_kl_is_all_the_prior_s():
    mus, logvars = torch.full((500, 8), 0.7), torch.full((500, 8), -1.5)
    split = vae_lstm.elbo_surgery(mus, logvars, kl=4.0)
    assert split["mutual_information"] == pytest.approx(0, abs=1e-9) and split["marginal_kl"] == pytest.approx(4.0)


@pytest.mark.parametrize("n", [10, 300, 2500])
def test_posteriors_far_apart_carry_log_n_nats_the_most_that_n_images_can(n):
    mus, logvars = torch.randn(n, 16, generator=torch.Generator().manual_seed(n)) * 1000, torch.full((n, 16), -6.0)
    split = vae_lstm.elbo_surgery(mus, logvars, kl=30.0)
    assert split["mutual_information"] == pytest.approx(math.log(n), abs=1e-6)
    assert split["mutual_information"] + split["marginal_kl"] == pytest.approx(30.0)


def standard_normal_mixture(d):
    """N(0, I) as a mixture of one Gaussian, as fit_mixture returns them."""
    return vae_lstm.MixtureSameFamily(vae_lstm.Categorical(probs=torch.ones(1, dtype=torch.float64)),
                                      vae_lstm.MultivariateNormal(torch.zeros(1, d, dtype=torch.float64),
                                                                  torch.eye(d, dtype=torch.float64).unsqueeze(0)))


def test_a_prior_equal_to_the_codes_aggregate_has_no_holes():
    holes = vae_lstm.prior_holes(torch.zeros(50, 6), torch.zeros(50, 6), standard_normal_mixture(6))  # q(z) = N(0, I)
    for name in ("prior_holes", "mixture_holes"):
        assert holes[name]["kl"] == pytest.approx(0, abs=1e-9), name
        assert holes[name]["standard_error"] == pytest.approx(0, abs=1e-9), name


def test_the_holes_of_a_prior_wider_than_the_codes_are_its_kl_within_its_standard_error():
    d, s = 4, 0.5  # every posterior N(0, s^2 I): KL(N(0, I) || N(0, s^2 I)) = d/2 (1/s^2 - 1 + 2 log s) = 3.23
    holes = vae_lstm.prior_holes(torch.zeros(30, d), torch.full((30, d), 2 * math.log(s)), standard_normal_mixture(d))
    closed_form = d / 2 * (1 / s**2 - 1 + 2 * math.log(s))
    for name in ("prior_holes", "mixture_holes"):
        kl, error = holes[name]["kl"], holes[name]["standard_error"]
        assert abs(kl - closed_form) < 4 * error and error == pytest.approx(1.5 * math.sqrt(2 * d / 200), rel=0.3)
    assert vae_lstm.prior_holes(torch.zeros(30, d), torch.full((30, d), 2 * math.log(s)),
                                standard_normal_mixture(d)) == holes  # drawn from a seed: the same each time


def test_the_surgery_of_a_model_is_at_most_log_n_and_the_same_each_time(reference_run, tiny_mnist):
    model, _ = vae_lstm.load_model(reference_run[0] / "best_model.pt", "cpu")
    images = vae_lstm.load_mnist(tiny_mnist, test_set=True)
    kl = evaluate(model, images)["kl"]
    split = vae_lstm.elbo_surgery(*vae_lstm.encode_split(model, images), kl)
    assert split["mutual_information"] <= math.log(len(images))  # each log q(z_i) >= log q(z_i | x_i) - log N
    assert split == vae_lstm.elbo_surgery(*vae_lstm.encode_split(model, images), kl)  # from EVAL_SEED


def test_the_surgery_takes_seconds_and_bounded_memory_for_ten_thousand_images(monkeypatch):
    blocks, addmm = [], torch.addmm

    def counted_addmm(*args):
        product = addmm(*args)
        blocks.append(product.numel())
        return product
    monkeypatch.setattr(torch, "addmm", counted_addmm)
    start = time.perf_counter()
    vae_lstm.elbo_surgery(torch.randn(10_000, 64), torch.randn(10_000, 64) - 2, kl=20.0)
    assert time.perf_counter() - start < 20 and max(blocks) <= vae_lstm.SURGERY_PAIRS and len(blocks) == 10


def test_evaluate_and_train_split_the_kl_as_they_print_it(reference_run, tiny_mnist, tmp_path, capsys):
    results = read_results(reference_run[0])["test"]
    assert results["mutual_information"] + results["marginal_kl"] == pytest.approx(results["kl"])
    assert f"test KL {results['kl']:.2f} = I(x; z) {results['mutual_information']:.2f}" in reference_run[1]
    assert main(["evaluate", "--device", "cpu", "--checkpoint", str(reference_run[0] / "best_model.pt"),
                 "--data-dir", str(tiny_mnist), "--json", str(tmp_path / "e.json")]) == 0
    evaluation = json.loads((tmp_path / "e.json").read_text())
    assert {k: evaluation[k] for k in results} == pytest.approx(results)  # the same split of the same test set
    assert f"KL(q(z) || N(0, I)) {results['marginal_kl']:.2f}" in capsys.readouterr().out


def test_the_mixture_is_fitted_to_codes_encoded_on_the_cpu_whatever_the_model_s_device(monkeypatch):
    """Another device's codes differ by rounding, and EM follows them: so the fit encodes a CPU copy of the model."""
    seen, encode_split = [], vae_lstm.encode_split
    monkeypatch.setattr(vae_lstm, "encode_split", lambda model, images: seen.append(
        (model, next(model.parameters()).device, images.device)) or encode_split(model, images))
    model, images = VAE(), torch.rand(60, 28, 28)
    vae_lstm.fit_prior(model, images[:50], images[50:], 2)
    assert [(device.type, where.type) for _, device, where in seen] == [("cpu", "cpu")] * 2
    assert all(copy is not model for copy, _, _ in seen)  # a copy: the caller's model stays on its device
    codes = encode_split(model, images[:50])[0]
    nudged = vae_lstm.fit_mixture(codes * (1 + 1e-6), 2)[0].component_distribution.loc  # what a GPU's rounding does
    assert not torch.equal(nudged, vae_lstm.fit_mixture(codes, 2)[0].component_distribution.loc)


def test_a_run_of_a_version_before_a_setting_resumes_with_its_default(reference_copy, tiny_mnist):
    last = torch.load(reference_copy / "last.pt", weights_only=True)
    del last["config"]["conv_encoder"]  # as the runs trained before --conv-encoder hold it
    torch.save(last, reference_copy / "last.pt")
    assert main(train_args(tiny_mnist, reference_copy, "--epochs", str(TINY_EPOCHS + 1), "--resume")) == 0


# ------------------------------------------------ The amortization gap (Cremer et al., 2018; evaluate --gaps N)

def optimally_encoding_vae():
    """A VAE whose decoder ignores z and whose encoder outputs N(0, I): the best q there is for that decoder."""
    torch.manual_seed(0)
    model = VAE()
    with torch.no_grad():
        for layer in (model.decoder_list[-1], model.encoder_mu, model.encoder_logvar):
            layer.weight.zero_()
        model.encoder_mu.bias.zero_()
        model.encoder_logvar.bias.zero_()
    return model


def test_an_encoder_that_already_outputs_the_optimum_has_no_amortization_gap(monkeypatch):
    monkeypatch.setattr(vae_lstm, "GAP_SETTINGS", {**vae_lstm.GAP_SETTINGS, "samples": 10, "iw_samples": 20})
    gaps = vae_lstm.amortization_gaps(optimally_encoding_vae(), torch.rand(30, 28, 28), 20)
    assert gaps["amortization_gap"] == 0 and gaps["steps"] == 100  # Adam did not move it: one check, and it stopped
    assert gaps["approximation_gap"] == pytest.approx(0, abs=1e-3)  # nor does importance weighting gain anything
    assert gaps["images"] == 20 and gaps["settings"]["iw_samples"] == 20


def test_optimising_q_closes_the_gap_that_an_encoder_leaves(reference_run, tiny_mnist, monkeypatch):
    monkeypatch.setattr(vae_lstm, "GAP_SETTINGS", {**vae_lstm.GAP_SETTINGS, "lr": 0.05, "samples": 20,
                                                   "iw_samples": 20})
    model, _ = vae_lstm.load_model(reference_run[0] / "best_model.pt", "cpu")
    images = vae_lstm.load_mnist(tiny_mnist, test_set=True)
    gaps = vae_lstm.amortization_gaps(model, images, 10)
    chosen = images[torch.randperm(50, generator=torch.Generator().manual_seed(0))[:10]]  # 10 of 50, from EVAL_SEED
    with torch.no_grad():  # their -ELBO another way: 400 draws each, the KL of torch.distributions
        mu, logvar = model.encode(chosen)
        q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
        bce = torch.stack([torch.nn.functional.binary_cross_entropy(model.decode(z), chosen.unsqueeze(1),
                                                                    reduction="none").sum((1, 2, 3))
                           for z in q.sample((400,))]).mean(0)
        kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert gaps["amortized"] == pytest.approx((bce + kl).mean().item(), abs=1.5)
    with torch.no_grad():
        model.encoder_mu.bias += 0.5  # every code moved off its place: the KL alone grows by 64 / 8 nats
    far = vae_lstm.amortization_gaps(model, images, 10)
    assert far["amortized"] > gaps["amortized"] + 6 and far["amortization_gap"] > gaps["amortization_gap"] + 5
    assert far["steps"] % 100 == 0 and far["optimised"] == pytest.approx(gaps["optimised"], abs=0.5)  # one q*
    for measured in (gaps, far):
        assert measured["amortization_gap"] == pytest.approx(measured["amortized"] - measured["optimised"])
        assert measured["approximation_gap"] == pytest.approx(measured["optimised"] - measured["iw_bound"])
        assert measured["iw_bound"] <= measured["optimised"] + 0.5 and measured["amortization_gap"] > 0


def test_evaluate_measures_the_gaps_holes_and_temperatures_it_is_asked_for_and_compare_shows_them(
        reference_copy, tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vae_lstm, "GAP_SETTINGS", {**vae_lstm.GAP_SETTINGS, "check_every": 10, "samples": 5,
                                                   "iw_samples": 5})
    argv = ["evaluate", "--device", "cpu", "--checkpoint", str(reference_copy / "best_model.pt"), "--data-dir",
            str(tiny_mnist)]
    assert main([*argv, "--json", str(reference_copy / "evaluation_gaps.json"), "--gaps", "5", "--holes",
                 "--temperatures", "1", "0.5"]) == 0  # compare reads every evaluation*.json of a run
    evaluation = json.loads((reference_copy / "evaluation_gaps.json").read_text())
    model, config = vae_lstm.load_model(reference_copy / "best_model.pt", "cpu")
    measured = vae_lstm.load_splits(tiny_mnist, config, "cpu")[0]
    assert evaluation["gaps"] == vae_lstm.amortization_gaps(model, measured["test"], 5)  # seeded: the same again
    prior = vae_lstm.fit_prior(model, measured["train"], measured["val"], vae_lstm.MIXTURE_COMPONENTS)[0]
    assert evaluation["holes"] == vae_lstm.prior_holes(*vae_lstm.encode_split(model, measured["train"]), prior)
    assert evaluation["score"]["temperature 1"] == evaluation["score"]["samples"]  # tau = 1 draws N(0, I)'s digits
    assert evaluation["score"]["temperature 0.5"] != evaluation["score"]["samples"]
    assert main(["compare", str(reference_copy), "--csv", str(tmp_path / "runs.csv")]) == 0
    row = next(csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text())))
    assert [float(row[name]) for name in ("amortization_gap", "approximation_gap", "prior_holes", "mixture_holes")] == [
        evaluation["gaps"]["amortization_gap"], evaluation["gaps"]["approximation_gap"],
        evaluation["holes"]["prior_holes"]["kl"], evaluation["holes"]["mixture_holes"]["kl"]]


def test_gaps_over_more_images_than_the_split_holds_are_one_line_before_any_work(reference_run, tiny_mnist, tmp_path,
                                                                                  monkeypatch, capsys):
    monkeypatch.setattr(vae_lstm, "fit_prior", lambda *args: pytest.fail("worked before the check"))
    assert main(["evaluate", "--device", "cpu", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--data-dir",
                 str(tiny_mnist), "--json", str(tmp_path / "e.json"), "--gaps", "51"]) == 2
    one_error_line(capsys.readouterr(), "--gaps 51 is more than the 50 images of the split")
    assert not (tmp_path / "e.json").exists()
    monkeypatch.setattr(vae_lstm, "GAP_SETTINGS", {**vae_lstm.GAP_SETTINGS, "check_every": 1, "samples": 2,
                                                   "iw_samples": 2})
    images = vae_lstm.load_mnist(tiny_mnist, test_set=True)
    assert vae_lstm.amortization_gaps(VAE().eval(), images, 50)["images"] == 50  # all of them


def test_a_temperature_scales_the_codes_and_1_draws_the_digits_of_n_0_i():
    model = VAE().eval()
    assert torch.equal(vae_lstm.sample_digits(model, 6, 3, temperature=1.0), vae_lstm.sample_digits(model, 6, 3))
    z = torch.randn((6, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(vae_lstm.sample_digits(model, 6, 3, temperature=0.5), model.decode(z * 0.5))


# ---------------------- A prior fitted to the codes (generate --prior mixture; Ghosh et al., 2020, "ex-post density")

KNOWN_MIXTURE = {  # three Gaussians in three dimensions, of unequal weights, means apart and shapes unlike
    "weights": torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
    "means": torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 2.0], [0.0, 7.0, -3.0]], dtype=torch.float64),
    "covariances": torch.tensor([[[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.5]],
                                 [[2.0, 0.0, 0.0], [0.0, 0.5, 0.2], [0.0, 0.2, 1.0]],
                                 [[0.3, 0.0, 0.1], [0.0, 1.5, 0.0], [0.1, 0.0, 0.8]]], dtype=torch.float64),
}


def codes_of(mixture, n, seed=0):
    """n draws of a mixture of torch.distributions, from the global generator seeded here."""
    torch.manual_seed(seed)
    return mixture.sample((n,))


def known_mixture():
    return torch.distributions.MixtureSameFamily(torch.distributions.Categorical(KNOWN_MIXTURE["weights"]),
                                                 torch.distributions.MultivariateNormal(KNOWN_MIXTURE["means"],
                                                                                        KNOWN_MIXTURE["covariances"]))


def test_em_recovers_the_weights_means_and_covariances_of_a_known_mixture():
    fitted, log_likelihoods = vae_lstm.fit_mixture(codes_of(known_mixture(), 6000).float(), 3)
    gaussians = fitted.component_distribution
    order = torch.cdist(KNOWN_MIXTURE["means"], gaussians.loc).argmin(1)  # the fitted component of each known one
    assert sorted(order.tolist()) == [0, 1, 2] and gaussians.loc.dtype == torch.float64
    torch.testing.assert_close(fitted.mixture_distribution.probs[order], KNOWN_MIXTURE["weights"], atol=0.02, rtol=0)
    torch.testing.assert_close(gaussians.loc[order], KNOWN_MIXTURE["means"], atol=0.1, rtol=0)
    torch.testing.assert_close(gaussians.covariance_matrix[order], KNOWN_MIXTURE["covariances"], atol=0.12, rtol=0)
    assert log_likelihoods[-1] == pytest.approx(known_mixture().log_prob(codes_of(known_mixture(), 6000)).mean().item(),
                                                abs=0.01)  # as likely as the truth, within a sample's noise


def test_em_stops_once_an_iteration_adds_too_little_and_its_log_likelihood_never_falls(monkeypatch):
    overlapping = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 3.0])
    _, log_likelihoods = vae_lstm.fit_mixture(overlapping, 4)
    gains = torch.tensor(log_likelihoods).diff()
    assert (gains[:-1] >= vae_lstm.MIXTURE_TOLERANCE).all() and gains[-1] < vae_lstm.MIXTURE_TOLERANCE
    monkeypatch.setattr(vae_lstm, "MIXTURE_TOLERANCE", -math.inf)  # run to the cap
    _, log_likelihoods = vae_lstm.fit_mixture(overlapping, 4)
    assert len(log_likelihoods) == vae_lstm.MIXTURE_ITERATIONS
    assert (torch.tensor(log_likelihoods).diff() >= -1e-9).all(), log_likelihoods


def test_a_collapsed_component_stays_invertible():
    codes = torch.cat([torch.zeros(50, 3), torch.randn(200, 3, generator=torch.Generator().manual_seed(0)) + 5])
    fitted, log_likelihoods = vae_lstm.fit_mixture(codes, 2)  # one component: 50 equal codes, no spread at all
    variances = fitted.component_distribution.covariance_matrix.diagonal(dim1=1, dim2=2)
    assert math.isfinite(log_likelihoods[-1]) and variances.min() == pytest.approx(vae_lstm.MIXTURE_RIDGE)


def test_a_fit_from_one_seed_is_reproducible_and_its_draws_have_its_mean_and_covariance():
    codes = codes_of(known_mixture(), 3000)
    fitted = vae_lstm.fit_mixture(codes, 5)[0]
    again, other = vae_lstm.fit_mixture(codes, 5)[0], vae_lstm.fit_mixture(codes, 5, seed=1)[0]
    assert torch.equal(again.component_distribution.loc, fitted.component_distribution.loc)
    assert torch.equal(again.component_distribution.covariance_matrix, fitted.component_distribution.covariance_matrix)
    assert not torch.equal(other.component_distribution.loc, fitted.component_distribution.loc)  # another start
    draws = vae_lstm.draw_codes(fitted, 40_000, torch.Generator().manual_seed(0))
    assert draws.dtype == torch.float32 and torch.equal(draws, vae_lstm.draw_codes(fitted, 40_000, torch.Generator()
                                                                                   .manual_seed(0)))
    weights, gaussians = fitted.mixture_distribution.probs, fitted.component_distribution
    second_moment = (weights.view(-1, 1, 1) * (gaussians.covariance_matrix + gaussians.loc.unsqueeze(2)
                                               * gaussians.loc.unsqueeze(1))).sum(0)
    torch.testing.assert_close(draws.double().mean(0), fitted.mean, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(draws.double().T), second_moment - fitted.mean.outer(fitted.mean), atol=0.12,
                               rtol=0.02)
    one = vae_lstm.fit_mixture(codes, 1)[0]  # one Gaussian: the draws' spread is its own, each correlation its sign
    draws = vae_lstm.draw_codes(one, 40_000, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(torch.cov(draws.T), one.component_distribution.covariance_matrix[0], atol=0.1, rtol=0.03)


def test_generate_draws_from_the_mixture_fitted_to_the_checkpoint_s_training_split(reference_run, tiny_mnist,
                                                                                   tmp_path, monkeypatch, capsys):
    checkpoint, path = reference_run[0] / "best_model.pt", tmp_path / "mixture.png"
    fitted = watched_calls(monkeypatch, "fit_mixture", 0)
    argv = ["generate", "--device", "cpu", "--checkpoint", str(checkpoint), "--prior", "mixture", "--components", "3",
            "--data-dir", str(tiny_mnist), "--n", "20", "--seed", "4", "--out", str(path)]
    assert main(argv) == 0
    assert re.fullmatch(r"z from a 3-component mixture of the training codes, fitted in \d+\.\d s\n"
                        rf"20 generated digits written to {re.escape(str(path))}\n", capsys.readouterr().out)
    model, _ = vae_lstm.load_model(checkpoint, "cpu")
    train_images = vae_lstm.load_splits(tiny_mnist, CONFIG, "cpu")[0]["train"]  # the checkpoint config's split
    assert torch.equal(fitted[0], vae_lstm.encode_split(model, train_images)[0])
    expected = vae_lstm.sample_digits(model, 20, 4, vae_lstm.fit_mixture(fitted[0], 3)[0])
    np.testing.assert_array_equal(digit_cells(path, 2, 10).reshape(20, 28, 28),
                                  digit_cells_of(expected, tmp_path / "expected.png", 2, 10).reshape(20, 28, 28))
    first = path.read_bytes()
    assert main(argv) == 0 and path.read_bytes() == first  # the same command, the same bytes


def digit_cells_of(digits, path, rows, columns):
    vae_lstm.save_grid(digits, path, nrow=columns)
    return digit_cells(path, rows, columns)


def test_the_default_prior_draws_the_report_s_digits_unchanged(tmp_path):
    for extra in ([], ["--prior", "normal"]):
        assert main(["generate", "--device", "cpu", "--checkpoint", str(vae_lstm.PUBLISHED_MODEL), "--out",
                     str(tmp_path / "g.png"), *extra]) == 0  # no MNIST needed: nothing is fitted
        drawn_now = digit_cells(tmp_path / "g.png", 10, 10)
        assert np.abs(drawn_now - digit_cells(HERE / "docs" / "generated.png", 10, 10)).max() <= 1  # float rounding


@pytest.mark.parametrize("extra, words", [
    (["--components", "181"], ["--components 181 is more than the 180 codes of the training split"]),
    (["--data-dir", "{tmp_path}/no MNIST here"], ["cannot read MNIST from {tmp_path}/no MNIST here"]),
], ids=["more components than codes", "no MNIST"])  # --components 0: with the numbers out of range, Part 3
def test_a_mixture_that_cannot_be_fitted_is_one_line(extra, words, reference_run, tiny_mnist, tmp_path, capsys):
    extra, words = ([text.format(tmp_path=tmp_path) for text in texts] for texts in (extra, words))
    argv = ["generate", "--device", "cpu", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--prior",
            "mixture", "--data-dir", str(tiny_mnist), "--out", str(tmp_path / "g.png"), *extra]
    assert main(argv) == 2
    one_error_line(capsys.readouterr(), *words)
    assert not (tmp_path / "g.png").exists()


def test_evaluate_scores_the_mixture_of_components_it_is_given_beside_n_0_i(reference_run, tiny_mnist, tmp_path,
                                                                              capsys):
    assert main(["evaluate", "--device", "cpu", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--data-dir",
                 str(tiny_mnist), "--components", "3", "--json", str(tmp_path / "evaluation.json")]) == 0
    evaluation, printed = json.loads((tmp_path / "evaluation.json").read_text()), capsys.readouterr().out
    fit, mixture = evaluation["mixture_fit"], evaluation["score"]["mixture"]
    assert fit["components"] == 3 and 1 <= fit["iterations"] <= vae_lstm.MIXTURE_ITERATIONS and fit["seconds"] > 0
    model, _ = vae_lstm.load_model(reference_run[0] / "best_model.pt", "cpu")
    train_images, val_images = (vae_lstm.load_splits(tiny_mnist, CONFIG, "cpu")[0][split] for split in ("train", "val"))
    prior, log_likelihoods = vae_lstm.fit_mixture(vae_lstm.encode_split(model, train_images)[0], 3)
    assert fit["train_log_likelihood"] == log_likelihoods[-1]
    held_out = prior.log_prob(vae_lstm.encode_split(model, val_images)[0].double()).mean().item()
    assert fit["val_log_likelihood"] == pytest.approx(held_out, rel=1e-12)  # the validation codes, held out
    assert f"of the mixture Fréchet distance {mixture['frechet']:.2f}, {mixture['recognised']:.1%}" in printed
    assert mixture != evaluation["score"]["samples"] and sum(mixture["digits"]) == vae_lstm.SCORED_DIGITS


# ------------------------------------ What the eye sees, measured: a digit classifier's score of the digits drawn

def test_the_frechet_distance_of_two_gaussian_samples_is_its_closed_form():
    generator = torch.Generator().manual_seed(0)
    mixing_a, mixing_b = torch.randn(5, 5, generator=generator), torch.randn(5, 5, generator=generator)
    mean_a, mean_b = torch.randn(5, generator=generator), torch.randn(5, generator=generator)
    cov_a, cov_b = (mixing @ mixing.T + 0.1 * torch.eye(5) for mixing in (mixing_a, mixing_b))
    a = mean_a + torch.randn(400_000, 5, generator=generator) @ torch.linalg.cholesky(cov_a).T
    b = mean_b + torch.randn(400_000, 5, generator=generator) @ torch.linalg.cholesky(cov_b).T
    # tr((C_a C_b)^1/2) from the eigenvalues of C_a C_b, not the symmetric product the code takes
    closed_form = ((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace()
                   - 2 * torch.linalg.eigvals(cov_a.double() @ cov_b.double()).real.sqrt().sum())
    assert vae_lstm.frechet_distance(a, b) == pytest.approx(float(closed_form), rel=0.01)
    assert vae_lstm.frechet_distance(a[:1000], a[:1000]) == pytest.approx(0, abs=1e-9)
    assert vae_lstm.frechet_distance(a, b) == pytest.approx(vae_lstm.frechet_distance(b, a), rel=1e-9)
    few = torch.randn(20, 128, generator=generator)  # fewer images than features: singular covariances
    assert 0 < vae_lstm.frechet_distance(few, few + 1) == pytest.approx(128, rel=1e-6)


def test_a_digit_is_recognised_from_a_top_probability_of_0_9_and_each_digit_is_counted():
    probabilities = torch.zeros(5, 10)
    for row, (digit, top) in enumerate([(0, 0.9), (1, 0.89), (7, 0.95), (0, 0.5), (0, 1.0)]):  # no 8 or 9
        probabilities[row, digit], probabilities[row, (digit + 1) % 10] = top, 1 - top
    features = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    scores = vae_lstm.image_score(features, probabilities, features + 2)
    assert scores["recognised"] == 3 / 5 and scores["digits"] == [3, 1, 0, 0, 0, 0, 0, 1, 0, 0]
    assert scores["recognised_at"] == {"0.5": 1.0, "0.7": 4 / 5, "0.9": 3 / 5}
    assert scores["frechet"] == pytest.approx(3 * 2**2)  # shifted by 2 in each of 3 features, the same spread


def test_the_score_is_of_digits_from_the_prior_and_of_evaluate_s_reconstructions(reference_run, tiny_mnist,
                                                                                 tmp_path, monkeypatch):
    model, _ = vae_lstm.load_model(reference_run[0] / "best_model.pt", "cpu")
    images = vae_lstm.load_mnist(tiny_mnist, test_set=True)
    seen, prior = watched_calls(monkeypatch, "classify", 1), vae_lstm.fit_mixture(torch.randn(100, 64), 3)[0]
    scores = vae_lstm.score(model, images, images, vae_lstm.load_classifier(vae_lstm.CLASSIFIER), prior,
                            tmp_path / "f.png")
    reference, digits, mixture_digits, reconstructions = seen
    assert torch.equal(reference, images)
    assert torch.equal(digits, vae_lstm.sample_digits(model, vae_lstm.SCORED_DIGITS, vae_lstm.EVAL_SEED))
    assert torch.equal(mixture_digits, vae_lstm.sample_digits(model, vae_lstm.SCORED_DIGITS, vae_lstm.EVAL_SEED, prior))
    with torch.no_grad():  # the z of evaluate, which drew them from EVAL_SEED
        expected = model(images, torch.Generator().manual_seed(vae_lstm.EVAL_SEED))[0]
    assert torch.equal(reconstructions, expected)
    assert sum(scores["samples"]["digits"]) == sum(scores["mixture"]["digits"]) == vae_lstm.SCORED_DIGITS
    assert sum(scores["reconstructions"]["digits"]) == TINY_TEST


def test_train_and_evaluate_give_one_score_of_one_model(reference_run, tiny_mnist, tmp_path, capsys, figures):
    out, stdout = reference_run
    results = read_results(out)
    assert main(["evaluate", "--device", "cpu", "--checkpoint", str(out / "best_model.pt"), "--data-dir",
                 str(tiny_mnist), "--json", str(tmp_path / "evaluation.json")]) == 0
    printed, evaluation = capsys.readouterr().out, json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["score"] == results["score"]
    assert {**evaluation["mixture_fit"], "seconds": 0} == {**results["mixture_fit"], "seconds": 0}
    assert results["mixture_fit"]["components"] == vae_lstm.MIXTURE_COMPONENTS  # train's: the default
    for kind in ("samples", "mixture", "reconstructions"):
        frechet, recognised = (results["score"][kind][name] for name in ("frechet", "recognised"))
        assert frechet > 0 and 0 <= recognised <= 1
        assert f"Fréchet distance {frechet:.2f}, {recognised:.1%} recognised" in printed
        assert f"Fréchet distance {frechet:.2f}, {recognised:.1%} recognised" in stdout  # beside the summary table
    digits = results["score"]["samples"]["digits"]
    assert f"fewest {digits.index(min(digits))}s ({min(digits)})" in printed
    assert (tmp_path / "digits_by_confidence.png").is_file()


def test_the_figure_sets_the_least_recognisable_digits_beside_the_most(drawn, tmp_path):
    digits = torch.rand(120, 1, 28, 28)
    probabilities = torch.full((120, 10), 0.0)
    confidence = torch.linspace(0.1, 1.0, 120)[torch.randperm(120, generator=torch.Generator().manual_seed(0))]
    probabilities[torch.arange(120), torch.arange(120) % 10] = confidence
    vae_lstm.plot_by_confidence(digits, probabilities, tmp_path / "digits.png", n=50)
    least, most = drawn["digits.png"].axes
    order = confidence.argsort()
    for axes, chosen, which in ((least, order[:50], "least"), (most, order.flip(0)[:50], "most")):
        assert which in axes.get_title()
        expected = torchvision.utils.make_grid(digits[chosen], nrow=10, padding=2, pad_value=0.5)
        np.testing.assert_allclose(axes.images[0].get_array(), expected.permute(1, 2, 0).numpy())
        assert [text.get_text() for text in axes.texts] == [f"{int(i) % 10} {confidence[i]:.2f}" for i in chosen]


@pytest.mark.parametrize("damage, words", [
    ("missing", "no such file"), ("truncated", "not a whole file"), ("a VAE", "Missing key"),
    ("a list", "no digit classifier"), ("code", "refused it"),
])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_damaged_classifier_is_one_line_that_names_the_command_that_makes_one(damage, words, command, reference_run,
                                                                                tiny_mnist, tmp_path, capsys):
    path = tmp_path / "classifier.pt"
    contents = {"missing": None, "truncated": vae_lstm.CLASSIFIER.read_bytes()[:1000],
                "a VAE": (reference_run[0] / "best_model.pt").read_bytes(), "a list": torch_bytes([1, 2]),
                "code": pickle.dumps({"1.weight": CodeCarrier(str(tmp_path / "ran"))})}[damage]
    if contents is not None:
        path.write_bytes(contents)
    argv = (train_args(tiny_mnist, tmp_path / "run") if command == "train" else
            ["evaluate", "--device", "cpu", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--data-dir",
             str(tiny_mnist), "--json", str(tmp_path / "evaluation.json")])
    assert main([*argv, "--classifier", str(path)]) == 2
    one_error_line(capsys.readouterr(), f"no digit classifier at {path}", words,
                   f"make one with python vae_lstm.py classifier --out {path}")
    assert not (tmp_path / "run" / "last.pt").exists()  # train refuses before its first epoch, not after its last
    assert not (tmp_path / "evaluation.json").exists() and not (tmp_path / "ran").exists()


def test_the_classifier_trains_reproducibly_from_a_seed_on_the_training_images_only(tiny_mnist, tmp_path, capsys):
    def trained(data, name, *flags):
        assert main(["classifier", "--data-dir", str(data), "--out", str(tmp_path / name / "c.pt"), *flags]) == 0
        record = json.loads((tmp_path / name / "c.json").read_text())
        return torch.load(tmp_path / name / "c.pt", weights_only=True), record

    first, record = trained(tiny_mnist, "first")
    other_test_images = altered_copy(tiny_mnist, tmp_path, "t10k-images-idx3-ubyte", lambda data: data[:16] + bytes(
        reversed(data[16:])))
    again = trained(other_test_images, "again, other test images")[0]  # reproducible, and blind to the test images
    assert all(torch.equal(again[name], first[name]) for name in first)
    assert not torch.equal(trained(tiny_mnist, "seed 1", "--seed", "1")[0]["1.weight"], first["1.weight"])
    assert record["settings"] == {**vae_lstm.CLASSIFIER_SETTINGS, "seed": 0, "architecture": "cnn"}
    assert f"test accuracy {record['test_accuracy']:.2%}" in capsys.readouterr().out
    classifier = vae_lstm.load_classifier(tmp_path / "first" / "c.pt")
    (train_images, _), (test_images, labels) = (vae_lstm.load_mnist(tiny_mnist, test_set, labels=True)
                                                for test_set in (False, True))
    reference, probabilities = vae_lstm.classify(classifier, test_images)
    assert record["test_accuracy"] == (probabilities.argmax(1) == labels).double().mean().item()
    blurred = torchvision.transforms.functional.gaussian_blur(test_images, 7, 1.0)  # sigma 1: 3 sigma each side
    assert record["reference_scores"] == {  # the README's rows, the floor from as many training images
        "training images": vae_lstm.image_score(*vae_lstm.classify(classifier, train_images[:vae_lstm.SCORED_DIGITS]),
                                                reference),
        "test images": vae_lstm.image_score(reference, probabilities, reference),
        "test images blurred, sigma 1": vae_lstm.image_score(*vae_lstm.classify(classifier, blurred), reference)}


def test_a_second_classifier_of_another_architecture_is_one_command(tiny_mnist, tmp_path, capsys):
    assert main(["classifier", "--architecture", "mlp", "--data-dir", str(tiny_mnist), "--out",
                 str(tmp_path / "mlp.pt")]) == 0
    classifier = vae_lstm.load_classifier(tmp_path / "mlp.pt")
    assert isinstance(classifier[0], torch.nn.Flatten) and classifier[1].in_features == 28 * 28
    assert json.loads((tmp_path / "mlp.json").read_text())["settings"]["architecture"] == "mlp"
    features, probabilities = vae_lstm.classify(classifier, vae_lstm.load_mnist(tiny_mnist, test_set=True))
    assert features.shape == (TINY_TEST, 128) and probabilities.sum(1).allclose(torch.ones(TINY_TEST))


def test_the_classifier_decays_its_learning_rate_once_an_epoch(tiny_mnist, monkeypatch):
    rates, step = [], torch.optim.Adam.step

    def watched(optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return step(optimizer, *args, **kwargs)
    monkeypatch.setattr(torch.optim.Adam, "step", watched)
    images, labels = vae_lstm.load_mnist(tiny_mnist, labels=True)  # 200 images: 4 batches an epoch
    vae_lstm.train_classifier(images, labels, seed=0)
    settings = vae_lstm.CLASSIFIER_SETTINGS
    assert rates == pytest.approx([settings["lr"] * settings["lr_decay"] ** epoch for epoch in range(settings["epochs"])
                                   for _ in range(4)], rel=1e-12)


@pytest.fixture(scope="module")
def shipped_classifier():
    return vae_lstm.load_classifier(vae_lstm.CLASSIFIER)


@pytest.fixture(scope="module")
def shipped_test_features(shipped_classifier, real_test_images):
    """The shipped classifier's features and class probabilities of MNIST's 10,000 test images."""
    return vae_lstm.classify(shipped_classifier, real_test_images)


def test_the_shipped_classifier_recognises_99_percent_of_the_test_images(shipped_test_features):
    labels = vae_lstm.load_mnist(real_mnist(), test_set=True, labels=True)[1]
    accuracy = (shipped_test_features[1].argmax(1) == labels).double().mean().item()
    record = json.loads(vae_lstm.CLASSIFIER.with_suffix(".json").read_text())
    assert accuracy >= 0.99 and accuracy == pytest.approx(record["test_accuracy"], abs=2e-4)  # an image or two
    assert vae_lstm.CLASSIFIER.stat().st_size <= 2**20


def test_the_shipped_mlp_classifier_gives_its_recorded_test_accuracy():
    classifier = vae_lstm.load_classifier(HERE / "docs" / "classifier_mlp.pt")
    images, labels = vae_lstm.load_mnist(real_mnist(), test_set=True, labels=True)
    accuracy = (vae_lstm.classify(classifier, images)[1].argmax(1) == labels).double().mean().item()
    record = json.loads((HERE / "docs" / "classifier_mlp.json").read_text())
    assert isinstance(classifier[0], torch.nn.Flatten) and accuracy == record["test_accuracy"] > 0.97


def test_the_score_grows_with_blur_and_noise_and_the_training_images_score_lowest(
        shipped_classifier, shipped_test_features, real_test_images, real_training_images):
    test_images, train_images, reference = real_test_images, real_training_images, shipped_test_features[0]
    few, noise = test_images[:2000], torch.randn(2000, 28, 28, generator=torch.Generator().manual_seed(0))

    def frechet(images):  # 2,000 images each, as the number of images biases the distance
        return vae_lstm.frechet_distance(vae_lstm.classify(shipped_classifier, images)[0], reference)
    blurred = [frechet(torchvision.transforms.functional.gaussian_blur(few, 2 * math.ceil(3 * s) + 1, s))
               for s in (0.5, 1.0, 2.0)]
    noisy = [frechet((few + level * noise).clamp(0, 1)) for level in (0.1, 0.2, 0.4)]
    floor = frechet(train_images[:2000])
    assert floor < blurred[0] < blurred[1] < blurred[2] and floor < noisy[0] < noisy[1] < noisy[2], (blurred, noisy)
    record = json.loads(vae_lstm.CLASSIFIER.with_suffix(".json").read_text())["reference_scores"]
    assert record["training images"]["frechet"] < record["test images blurred, sigma 1"]["frechet"]
    readme = " ".join((HERE / "README.md").read_text().split())
    assert (f"(training images: {record['training images']['frechet']:.2f}; test images blurred by sigma 1: "
            f"{record['test images blurred, sigma 1']['frechet']:.2f})") in readme  # the rows the README quotes


def test_a_shipped_model_scores_as_on_record_and_draws_better_digits_from_the_mixture(
        shipped_classifier, shipped_test_features, real_test_images, real_training_images, monkeypatch):
    monkeypatch.setattr(vae_lstm, "SCORED_DIGITS", 10_000)
    classify = vae_lstm.classify  # the test images' features and probabilities as the fixture classified them
    monkeypatch.setattr(vae_lstm, "classify", lambda classifier, images: shipped_test_features
                        if images is real_test_images else classify(classifier, images))
    model, _ = vae_lstm.load_model(vae_lstm.PUBLISHED_MODEL, "cpu")
    recorded = read_results(vae_lstm.PUBLISHED_MODEL.parent)["score"]
    train_images = real_training_images[split_indices()[0][::20]]  # 2,700 of the split: a fit in 1 s, not 25
    prior = vae_lstm.fit_mixture(vae_lstm.encode_split(model, train_images)[0], vae_lstm.MIXTURE_COMPONENTS)[0]
    measured = vae_lstm.score(model, real_test_images, real_test_images, shipped_classifier, prior)
    for kind in ("samples", "reconstructions"):
        assert measured[kind]["frechet"] == pytest.approx(recorded[kind]["frechet"], rel=1e-3), kind
        assert measured[kind]["recognised"] == pytest.approx(recorded[kind]["recognised"], abs=3e-4), kind
    assert measured["mixture"]["frechet"] <= measured["samples"]["frechet"] / 2  # the issue's bar, of its full fit
    assert measured["mixture"]["recognised"] >= 0.85
    assert recorded["mixture"]["frechet"] <= recorded["samples"]["frechet"] / 2  # and of the fit on record, in full
    assert recorded["mixture"]["recognised"] >= 0.85


# ---------------------------------------- Comparing runs: one row per run, the mean of each variant, their digits

@pytest.mark.parametrize("flags", [
    [], ["--binarize"], ["--unidirectional"], ["--hidden-size", "32"], ["--latent-dim", "16"],
    ["--hidden-size", "16", "--no-encoder-fc"], ["--no-decoder-fc"],
    ["--binarize", "--unidirectional", "--hidden-size", "16", "--latent-dim", "8", "--no-decoder-fc"],
    ["--kl-weight", "0.5"], ["--kl-weight", "4"], ["--kl-weight", "0"], ["--conv-encoder"],
    ["--kl-weight", "2", "--conv-encoder", "--latent-dim", "16"],
], ids=lambda flags: " ".join(flags) or "report")
def test_a_variant_is_named_by_the_train_flags_that_build_it(flags):
    config = vae_lstm.config_of(vae_lstm.parse_args(["train", *flags]))
    assert vae_lstm.variant_name(config) == (" ".join(flags) or "report")


def copy_of_run(run, folder, seed, test_total, iw_samples=None, iw_bound=None):
    """A run folder whose JSON files are `run`'s, but for its seed, its test total (its BCE the rest), and its
    evaluation.json."""
    folder.mkdir()
    results = read_results(run)
    results["config"]["seed"], results["test"]["total"] = seed, test_total
    results["test"]["bce"] = test_total - results["test"]["kl"]
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "exploration.json").write_bytes((run / "exploration.json").read_bytes())
    if iw_samples:
        (folder / "evaluation.json").write_text(json.dumps({"iw_samples": iw_samples, "iw_bound": iw_bound}))
    return folder


def test_compare_writes_one_row_per_run_and_the_mean_of_each_variant(reference_run, variant_runs, tmp_path, capsys,
                                                                     figures):
    seed_1 = copy_of_run(reference_run[0], tmp_path / "seed1", seed=1, test_total=250.0, iw_samples=5, iw_bound=240.0)
    small = variant_runs["small"]
    runs = [reference_run[0], seed_1, small]
    assert main(["compare", *map(str, runs), "--csv", str(tmp_path / "study" / "runs.csv"), "--figure",
                 str(tmp_path / "study" / "digits.pdf")]) == 0
    table = capsys.readouterr().out.splitlines()

    rows = list(csv.DictReader(io.StringIO((tmp_path / "study" / "runs.csv").read_text())))
    small_name = "--unidirectional --hidden-size 16 --latent-dim 8 --no-decoder-fc"
    assert [row["variant"] for row in rows] == ["report", "report", small_name]
    assert [row["seed"] for row in rows] == ["0", "1", "0"]
    for row, run in zip(rows, runs):
        results = read_results(run)
        assert float(row["test_total"]) == results["test"]["total"] and int(row["parameters"]) == results["parameters"]
        assert row["device"] == results["machine"]["device"] and row["torch"] == torch.__version__
        assert float(row["samples_frechet"]) == results["score"]["samples"]["frechet"]
        assert float(row["mixture_recognised"]) == results["score"]["mixture"]["recognised"]
        assert float(row["reconstructions_recognised"]) == results["score"]["reconstructions"]["recognised"]
    assert rows[2]["parameters"] == str(lstm_parameters(16, 1) + 2 * linear_parameters(16, 8) + decoder_parameters(8))

    def cell(runs_of_variant, value):
        values = torch.tensor([value(run) for run in runs_of_variant], dtype=torch.float64)
        return f"{values.mean():.2f}" if len(values) == 1 else f"{values.mean():.2f} ± {values.std():.2f}"

    def table_row(name, runs_of_variant, iw):
        results = [read_results(run) for run in runs_of_variant]
        explorations = [json.loads((run / "exploration.json").read_text()) for run in runs_of_variant]
        cells = [cell(results, lambda r: r["test"]["bce"] + r["test"]["kl"])]  # the ELBO, at KL weight 1
        cells += [cell(results, lambda r: r["test"][part]) for part in ("bce", "kl", "mutual_information",
                                                                         "marginal_kl")]
        cells += [iw, *(cell(results, lambda r: r["score"][kind][name]) for kind, name in (
            ("samples", "frechet"), ("samples", "recognised"), ("mixture", "frechet"), ("mixture", "recognised"),
            ("reconstructions", "frechet")))]
        cells += [cell(explorations, lambda e: e["active_units"]), "", "", "", "",  # no gaps, no holes measured
                  cell(results, lambda r: r["best_epoch"]), cell(results, lambda r: r["seconds_per_epoch"])]
        where = f"{results[0]['machine']['device']}, torch {torch.__version__}"
        return f"| {name} | {len(runs_of_variant)} | {' | '.join(cells)} | {where} |"

    assert table == [
        "| variant | runs | test_elbo | test_bce | test_kl | test_mutual_information | test_marginal_kl | iw "
        "| samples_frechet | samples_recognised | mixture_frechet | mixture_recognised | reconstructions_frechet "
        "| active_units | amortization_gap | approximation_gap | prior_holes | mixture_holes | best_epoch "
        "| seconds_per_epoch | device |", "|---" * 21 + "|",
        table_row("report", runs[:2], "240.00"),  # the bound of the one run that has one
        table_row(small_name, runs[2:], "")]
    assert (tmp_path / "study" / "digits.pdf").read_bytes().startswith(b"%PDF")


def test_compare_s_csv_says_whether_the_iw_figure_is_a_likelihood_or_a_bound(reference_run, tmp_path):
    runs = [copy_of_run(reference_run[0], tmp_path / "grey", 0, 270.0, 5, 260.0),  # iw_bound: grey levels
            copy_of_run(reference_run[0], tmp_path / "binary", 1, 270.0),
            copy_of_run(reference_run[0], tmp_path / "none", 2, 270.0)]
    (runs[1] / "evaluation.json").write_text(json.dumps({"iw_samples": 5, "iw_nll": 250.0}))  # a binarized model's
    assert main(["compare", *map(str, runs), "--csv", str(tmp_path / "runs.csv")]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text())))
    assert [(row["iw"], row["iw_is"]) for row in rows] == [("260.0", "bound"), ("250.0", "-log p(x)"), ("", "")]


def test_compare_draws_the_rate_distortion_plane_and_the_mixture_s_digits(reference_run, variant_runs, tiny_mnist,
                                                                         tmp_path, figures, monkeypatch):
    drawn, plot_rate_distortion = [], vae_lstm.plot_rate_distortion
    monkeypatch.setattr(vae_lstm, "plot_rate_distortion", lambda rows, path: drawn.append(
        [(row["test_kl"], row["test_bce"]) for row in rows]) or plot_rate_distortion(rows, path))
    fitted = watched_calls(monkeypatch, "fit_mixture", 0)
    runs = [reference_run[0], variant_runs["conv"]]
    assert main(["compare", *map(str, runs), "--rate-distortion", str(tmp_path / "plane.png"), "--figure",
                 str(tmp_path / "digits.png"), "--data-dir", str(tiny_mnist)]) == 0
    assert drawn == [[(read_results(run)["test"]["kl"], read_results(run)["test"]["bce"]) for run in runs]]
    assert len(fitted) == 2  # one mixture for each variant's digits, below those of N(0, I)
    assert Image.open(tmp_path / "plane.png").format == "PNG" and Image.open(tmp_path / "digits.png").format == "PNG"


def test_the_rate_distortion_plane_puts_the_kl_across_and_the_bce_up(reference_run, variant_runs, tmp_path, drawn):
    runs = [reference_run[0], variant_runs["conv"]]
    assert main(["compare", *map(str, runs), "--rate-distortion", str(tmp_path / "plane.png")]) == 0
    axes = drawn["plane.png"].axes[0]
    points = [point for points in axes.collections for point in points.get_offsets().tolist()]
    expected = [[read_results(run)["test"][part] for part in ("kl", "bce")] for run in runs]
    assert np.allclose(points, expected, rtol=1e-12, atol=0)
    assert axes.get_xlabel().startswith("KL, the rate") and axes.get_ylabel().startswith("BCE, the distortion")


@pytest.mark.parametrize("flag, name", [("--csv", "runs.csv"), ("--figure", "digits.png"),
                                        ("--rate-distortion", "plane.png")])
def test_compare_refuses_an_output_it_cannot_write_before_it_reads_a_run(flag, name, reference_run, tmp_path,
                                                                         monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(vae_lstm, "run_row", lambda folder: pytest.fail("read a run first"))
    outputs = {other: str(tmp_path / ("a_file" if other == flag else "written") / file) for other, file in (
        ("--csv", "runs.csv"), ("--figure", "digits.png"), ("--rate-distortion", "plane.png"))}
    assert main(["compare", str(reference_run[0]), *(item for pair in outputs.items() for item in pair)]) == 2
    one_error_line(capsys.readouterr(), f"{tmp_path / 'a_file'} is a file, not a folder")
    assert not [path for path in tmp_path.rglob("*") if path.is_file() and path.name != "a_file"]


@draws("plot_variant_samples")
def test_compare_fits_each_run_s_mixture_under_that_run_s_own_settings(grey_mnist, tmp_path, monkeypatch, figures):
    run = tmp_path / "run"  # binarized, and another split than the report's
    assert main(train_args(grey_mnist, run, "--epochs", "1", "--binarize", "--val-fraction", "0.2", "--split-seed",
                           "7")) == 0
    fitted = watched_calls(monkeypatch, "fit_mixture", 0)
    assert main(["compare", str(run), "--figure", str(tmp_path / "digits.png"), "--data-dir", str(grey_mnist)]) == 0
    model, _ = vae_lstm.load_model(run / "best_model.pt", "cpu")
    train_images = vae_lstm.load_mnist(grey_mnist)[split_indices(200, 0.2, 7)[0]]
    assert torch.equal(fitted[0], vae_lstm.encode_split(model, binarized(train_images))[0])


def test_compare_judges_a_run_trained_at_another_kl_weight_by_its_elbo(variant_runs, tmp_path):
    conv = read_results(variant_runs["conv"])["test"]  # trained with --kl-weight 2: its total weighs the KL twice
    assert main(["compare", str(variant_runs["conv"]), "--csv", str(tmp_path / "runs.csv")]) == 0
    (row,) = csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text()))
    assert float(row["test_elbo"]) == conv["bce"] + conv["kl"] < conv["total"]


def test_compare_averages_no_importance_weighted_figures_of_different_k(reference_run, tmp_path, capsys):
    def iw_cell(*ks):
        runs = [copy_of_run(reference_run[0], tmp_path / f"{ks}-{seed}", seed, 270.0, k, 260.0 + seed)
                for seed, k in enumerate(ks)]
        assert main(["compare", *map(str, runs)]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| report |"))
        return [cell.strip() for cell in row.strip("|").split("|")][7]  # variant, runs, 5 losses, then iw

    assert iw_cell(3, 4) == "K differs"
    assert iw_cell(3, 3) == f"260.50 ± {math.sqrt(0.5):.2f}"


def test_compare_draws_the_published_models_without_training(tmp_path, capsys, drawn):
    runs = [vae_lstm.PUBLISHED / run for run in PUBLISHED_RUNS]
    assert main(["compare", *map(str, runs), "--figure", str(tmp_path / "digits.png")]) == 0
    table = capsys.readouterr().out
    assert "| report | 3 |" in table and "| --binarize | 1 |" in table
    panels = [axes for axes in drawn["digits.png"].axes if axes.images]
    assert [axes.get_title() for axes in panels] == ["--binarize", "report"]
    model, _ = vae_lstm.load_model(vae_lstm.PUBLISHED_MODEL, "cpu")  # the report's first run, as generate draws it
    expected = torchvision.utils.make_grid(vae_lstm.sample_digits(model, 100, seed=0), nrow=10, padding=2,
                                           pad_value=0.5)
    np.testing.assert_allclose(panels[1].images[0].get_array(), expected.permute(1, 2, 0).numpy())
    for axes in panels:  # 100 digits, 10 to a row, each one drawn
        assert_every_cell_is_drawn(grid_cells(axes.images[0].get_array()[..., 0] * 255, 10, 10))


def test_compare_names_a_run_folder_it_cannot_read(reference_run, tmp_path, capsys):
    (tmp_path / "results.json").write_text("{")
    assert main(["compare", str(reference_run[0]), str(tmp_path)]) == 2
    one_error_line(capsys.readouterr(), f"cannot read {tmp_path / 'results.json'}")
    assert main(["compare", str(reference_run[0]), str(tmp_path / "absent")]) == 2
    one_error_line(capsys.readouterr(), f"no run folder at {tmp_path / 'absent'}")


def test_compare_skips_a_folder_that_holds_no_finished_run_in_one_line(reference_run, tmp_path, capsys):
    stopped = tmp_path / "stopped"  # as a run stopped by a device's time limit leaves it: a log, no results.json
    stopped.mkdir()
    (stopped / "history.csv").write_text("epoch\n1\n")
    assert main(["compare", str(stopped), str(reference_run[0]), "--csv", str(tmp_path / "runs.csv")]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"note: {stopped} holds no finished run (no results.json): skipped\n"
    assert [row["run"] for row in csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text()))] == ["reference0"]
    assert main(["compare", str(stopped)]) == 2
    one_error_line(capsys.readouterr(), "none of the folders holds a finished run")


# ==============================================================================================================
# Part 3. Running safely, and the command line: files, errors, signals, devices. Nothing here changes a number.
# ==============================================================================================================

# ------------------------------------------------------------------------ Files: each written whole or not at all

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


def test_a_file_is_on_the_disk_before_it_takes_its_name(tmp_path, monkeypatch):
    steps, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(vae_lstm.os, "fsync", lambda descriptor: steps.append("fsync") or fsync(descriptor))
    monkeypatch.setattr(vae_lstm.os, "replace", lambda *paths: steps.append("rename") or replace(*paths))
    vae_lstm.write_json({"epoch": 1}, tmp_path / "results.json")
    assert steps == ["fsync", "rename"] and json.loads((tmp_path / "results.json").read_text()) == {"epoch": 1}


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


class FullDisk(io.FileIO):
    """A file on a disk that fills up after its first 1,000 bytes."""

    def write(self, data):
        super().write(bytes(data)[:1000])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_evaluating_is_one_line(reference_run, tiny_mnist, tmp_path, monkeypatch, capsys, figures):
    monkeypatch.setattr(vae_lstm, "open", lambda path, mode="r": FullDisk(path, "w"), raising=False)
    assert main(["evaluate", "--device", "cpu", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--data-dir",
                 str(tiny_mnist), "--json", str(tmp_path / "evaluation.json")]) == 1
    one_error_line(capsys.readouterr(), "digits_by_confidence.png: No space left on device; no file is half-written")
    assert list(tmp_path.iterdir()) == []  # the figure, the first file it writes, was not


@pytest.mark.parametrize("suffix, pil_format", [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"), (".bmp", "BMP"),
                                                (".tiff", "TIFF"), (".webp", "WEBP")])
def test_generate_writes_the_format_its_suffix_names(suffix, pil_format, reference_run, tmp_path):
    path = tmp_path / f"digits{suffix}"
    assert main(["generate", "--device", "cpu", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--n", "4",
                 "--out", str(path)]) == 0
    with Image.open(path) as picture:
        assert picture.format == pil_format and picture.size == (2 + 4 * 30, 32)


@pytest.mark.parametrize("name", ["digits.txt", "digits", "digits.xbm"])
def test_a_picture_suffix_that_cannot_be_written_is_a_usage_error(name, reference_run, tmp_path, capsys):
    assert main(["generate", "--device", "cpu", "--checkpoint", str(reference_run[0] / "best_model.pt"), "--out",
                 str(tmp_path / name)]) == 2
    one_error_line(capsys.readouterr(), "cannot write a picture", name, ".png")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name, magic", [("runs.PNG", b"\x89PNG"), ("runs.Pdf", b"%PDF"), ("runs.SVG", b"<?xml")])
def test_compare_writes_the_figure_format_its_suffix_names_in_any_case(name, magic, reference_run, tmp_path, figures):
    assert main(["compare", str(reference_run[0]), "--figure", str(tmp_path / name)]) == 0
    assert (tmp_path / name).read_bytes().startswith(magic)


@pytest.mark.parametrize("name", ["runs.txt", "runs"])
def test_a_figure_suffix_that_cannot_be_written_is_a_usage_error(name, reference_run, tmp_path, capsys):
    assert main(["compare", str(reference_run[0]), "--figure", str(tmp_path / name)]) == 2
    one_error_line(capsys.readouterr(), "cannot write a figure", name, ".png")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("out, words", [("a_file", ["is a file, not a folder"]),
                                        ("a_file/run", ["cannot write to", "Not a directory"])])
def test_unusable_out_folders_are_refused_before_training(out, words, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    assert main(train_args(tmp_path / "no data", tmp_path / out)) == 2  # told before any data is read
    one_error_line(capsys.readouterr(), *words)


@pytest.mark.parametrize("command", ["train", "generate", "evaluate", "explore", "classifier", "compare"])
def test_a_folder_that_refuses_writing_is_refused_before_any_work(command, reference_run, tiny_mnist, tmp_path,
                                                                  monkeypatch, capsys):
    refusing, temporary_file = tmp_path / "refusing", tempfile.TemporaryFile
    refusing.mkdir()  # there, but not writable: as a read-only mount or another user's folder, even to root

    def refuse(*args, dir=None, **kwargs):
        if Path(dir) == refusing:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return temporary_file(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    for work in ("load_mnist", "run_row", "sample_digits"):
        monkeypatch.setattr(vae_lstm, work, lambda *args, **kwargs: pytest.fail("work began before the check"))
    model = ["--device", "cpu", "--checkpoint", str(reference_run[0] / "best_model.pt")]
    argv = {"train": train_args(tiny_mnist, refusing),
            "generate": ["generate", *model, "--out", str(refusing / "g.png")],
            "evaluate": ["evaluate", *model, "--json", str(refusing / "e.json")],
            "explore": ["explore", *model, "--out", str(refusing)],
            "classifier": ["classifier", "--out", str(refusing / "c.pt")],
            "compare": ["compare", str(reference_run[0]), "--csv", str(refusing / "runs.csv")]}[command]
    assert main(argv) == 2
    one_error_line(capsys.readouterr(), f"cannot write to {refusing}: {os.strerror(errno.EACCES)}")


def test_a_second_run_into_a_run_folder_is_refused(reference_copy, tiny_mnist, capsys):
    before = (reference_copy / "best_model.pt").read_bytes()
    assert main(train_args(tiny_mnist, reference_copy)) == 2
    one_error_line(capsys.readouterr(), "already holds a run", "--resume")
    assert (reference_copy / "best_model.pt").read_bytes() == before


# --------------------------------------------------------------------------------------- Run folders and resuming

@pytest.mark.parametrize("stop", ["ctrl-c", "full disk", "fewer --epochs", "a variant"])
def test_a_stopped_run_resumes_to_the_numbers_of_an_uninterrupted_one(stop, reference_run, variant_runs, tiny_mnist,
                                                                      tmp_path, monkeypatch, capsys):
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
        raise_in_epoch(monkeypatch, 3, press_ctrl_c)
        assert main(train_args(tiny_mnist, tmp_path, *flags)) == 130
        one_error_line(capsys.readouterr(), f"interrupted; {tmp_path / 'last.pt'} holds epoch 2", "--resume")
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written file
    monkeypatch.undo()  # the run goes on, with room on the disk
    assert main(train_args(tiny_mnist, tmp_path, *flags, "--resume")) == 0
    resumed, reference = read_results(tmp_path), read_results(uninterrupted)
    assert losses(resumed) == losses(reference)
    assert resumed["best_epoch"] == reference["best_epoch"] and resumed["epochs_run"] == TINY_EPOCHS
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == len(last["history"]) == last["config"]["epochs"] == TINY_EPOCHS


@pytest.mark.parametrize("written_by", ["this version", "a version that stored early stopping's count"])
def test_a_resumed_run_keeps_the_best_total_and_the_epochs_without_a_better_one(written_by, tiny_mnist, tmp_path,
                                                                               monkeypatch, capsys):
    scripted_training(monkeypatch, [9.0, 7.0, 8.0, 8.5])  # the best at epoch 2, then two not better
    raise_in_epoch(monkeypatch, 5, press_ctrl_c)
    assert main(train_args(tiny_mnist, tmp_path, "--patience", "3")) == 130
    monkeypatch.undo()
    if written_by != "this version":  # its last.pt kept the best total and the count beside the history
        last = torch.load(tmp_path / "last.pt", weights_only=True)
        torch.save({**last, "best_val": 7.0, "bad_epochs": 2}, tmp_path / "last.pt")
    evaluated = scripted_training(monkeypatch, [7.5, 7.2])  # not better than 7.0: the third such epoch
    assert main(train_args(tiny_mnist, tmp_path, "--patience", "3", "--resume")) == 0
    results = read_results(tmp_path)
    assert results["best_epoch"] == 2 and results["epochs_run"] == 5
    assert results["stop_reason"] == "early stopping: no better validation total in 3 epochs"
    assert torch.load(tmp_path / "best_model.pt", weights_only=True)["epoch"] == 2
    assert evaluated == [5, 2, 2, 2]  # epoch 5 validated, then the best model of epoch 2 tested
    assert "interrupted" in capsys.readouterr().err


def test_sigterm_stops_the_command_in_one_line_and_sigkill_leaves_no_lock(reference_run, reference_copy, tiny_mnist,
                                                                          tmp_path, capsys):
    run = tmp_path / "run"  # trained by the script itself, as a user or a scheduler runs it, and stopped by SIGTERM
    child = subprocess.Popen([sys.executable, str(HERE / "vae_lstm.py"), *train_args(tiny_mnist, run), "--epochs",
                              "50"], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    held, holding = os.pipe()  # while it starts: a process holds another run as train does, and SIGKILL ends it
    holder = os.fork()
    if holder == 0:
        try:
            with vae_lstm.claim_run_folder(reference_copy, resume=True):
                os.write(holding, b"held")
                time.sleep(60)
        finally:
            os._exit(0)
    assert os.read(held, 4) == b"held"
    assert main(train_args(tiny_mnist, reference_copy, "--resume")) == 2
    one_error_line(capsys.readouterr(), "in use by another train")
    os.kill(holder, signal.SIGKILL)
    assert os.waitpid(holder, 0)[1] == signal.SIGKILL
    assert main(train_args(tiny_mnist, reference_copy, "--resume")) == 0  # the lock went with the process
    capsys.readouterr()

    assert "images; device" in child.stdout.readline()
    next(line for line in child.stdout if line.startswith("epoch "))
    for extra in ([], ["--resume"]):
        assert main(["train", "--device", "cpu", "--data-dir", str(tmp_path / "no data"), "--out", str(run),
                     *extra]) == 2
        one_error_line(capsys.readouterr(), str(run), "in use by another train")  # refused before the data
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM and not (run / "results.json").exists()
    last = torch.load(run / "last.pt", weights_only=True)
    assert set(last) == {"config", "epoch", "model", "optimizer", "history", "rng"}  # early stopping: the history
    assert stderr == (f"terminated (SIGTERM); {run / 'last.pt'} holds epoch {last['epoch']} and "
                      f"{run / 'best_model.pt'} the best so far, both intact; resume with: python vae_lstm.py "
                      f"{' '.join(train_args(tiny_mnist, run))} --epochs 50 --resume\n")
    assert main(train_args(tiny_mnist, run, "--resume")) == 0
    assert losses(read_results(run)) == losses(read_results(reference_run[0]))


def test_a_second_sigterm_cannot_cut_the_way_out_short():
    handler = signal.signal(signal.SIGTERM, vae_lstm.raise_terminated)  # as the script installs it
    try:
        with pytest.raises(vae_lstm.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next bytecode
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # while the first one's way out runs
            time.sleep(0.2)
        except vae_lstm.Terminated:  # a KeyboardInterrupt, which would stop pytest itself
            pytest.fail("a second SIGTERM raised Terminated again")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, handler)


@pytest.mark.parametrize("command, stopped_in, said, status", [
    ("generate", "sample_digits", "interrupted; nothing was written", 130),
    ("evaluate", "importance_weighted_nll", "terminated (SIGTERM); no file is half-written", 143),
    ("explore", "principal_components", "interrupted; no file is half-written", 130),
], ids=["ctrl-c generate", "sigterm evaluate", "ctrl-c explore"])
def test_a_stop_outside_training_says_what_was_written(command, stopped_in, said, status, reference_run, tiny_mnist,
                                                       tmp_path, monkeypatch, capsys):
    def stop(*args, **kwargs):
        raise vae_lstm.Terminated if status == 143 else KeyboardInterrupt

    monkeypatch.setattr(vae_lstm, stopped_in, stop)
    options = {"generate": ["--out", str(tmp_path / "digits.png")],
               "evaluate": ["--data-dir", str(tiny_mnist), "--iw-samples", "10", "--json", str(tmp_path / "e.json")],
               "explore": ["--data-dir", str(tiny_mnist), "--out", str(tmp_path)]}[command]
    assert main([command, "--device", "cpu", "--checkpoint", str(reference_run[0] / "best_model.pt"),
                 *options]) == status
    assert capsys.readouterr().err == said + "\n"
    assert [path.name for path in tmp_path.iterdir()] == (["interpolation.png"] if command == "explore" else [])


@pytest.mark.parametrize("extra, words", [
    ([], ["holds a best_model.pt but no last.pt", "move it away"]),
    (["--resume"], ["no checkpoint at", "last.pt", "without --resume"]),
], ids=["new run", "resume"])
def test_a_disk_full_before_the_first_epoch_is_saved_says_how_to_start_again(extra, words, tiny_mnist, tmp_path,
                                                                             monkeypatch, capsys):
    def open_on_a_full_disk(path, mode="r", *args, **kwargs):  # best_model.pt fits, last.pt does not
        if Path(path).name.startswith(".last.pt."):
            return FullDisk(path, "w")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(vae_lstm, "open", open_on_a_full_disk, raising=False)
    assert main(train_args(tiny_mnist, tmp_path, "--epochs", "1")) == 1
    best = tmp_path / "best_model.pt"
    one_error_line(capsys.readouterr(), f"cannot write {tmp_path / 'last.pt'}: No space left on device",
                   "nothing to resume", f"start again once {best}, left from that epoch, is removed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pt"]

    monkeypatch.undo()
    assert main(["train", "--device", "cpu", "--data-dir", str(tmp_path / "no data"), "--out", str(tmp_path),
                 *extra]) == 2
    one_error_line(capsys.readouterr(), str(tmp_path), *words)  # told before any data is read
    best.unlink()
    assert main(train_args(tiny_mnist, tmp_path, "--epochs", "1")) == 0


@pytest.mark.parametrize("extra, words", [
    (["--epochs", "2"], ["trained 6 epochs already", "more than --epochs 2"]),
    (["--seed", "1"], ["other settings", "seed 0 there, 1 here"]),
    (["--lr", "0.01"], ["other settings", "lr 0.001 there, 0.01 here"]),
    (["--binarize"], ["other settings", "binarize False there, True here"]),
    (["--latent-dim", "16"], ["other settings", "latent_dim 64 there, 16 here"]),
], ids=["fewer epochs", "seed", "lr", "binarize", "latent-dim"])
def test_every_refusal_of_resume_comes_before_the_data_is_read(extra, words, reference_copy, tiny_mnist, monkeypatch,
                                                               capsys):
    monkeypatch.setattr(vae_lstm, "load_mnist", lambda *args, **kwargs: pytest.fail("the data was read"))
    before = (reference_copy / "last.pt").read_bytes()
    assert main([*train_args(tiny_mnist, reference_copy, "--resume"), *extra]) == 2
    one_error_line(capsys.readouterr(), *words)
    assert (reference_copy / "last.pt").read_bytes() == before


@pytest.mark.parametrize("last", [None, {"epoch": 3}, [1, 2]], ids=["none", "no config", "a list"])
def test_resume_needs_a_run_s_last_pt(last, tiny_mnist, tmp_path, capsys):
    if last is not None:
        torch.save(last, tmp_path / "last.pt")
    assert main(train_args(tiny_mnist, tmp_path, "--resume")) == 2
    one_error_line(capsys.readouterr(), *(["--resume: no checkpoint at", "start one without --resume"] if last is None
                                          else [f"{tmp_path / 'last.pt'} is not a run's last.pt"]))


# ------------------------------------------------------------------------------------------- Devices and machines

@pytest.fixture
def fake_devices(monkeypatch):
    """fake_devices(cuda=..., mps=...): CUDA and MPS available or not, as far as vae_lstm and torch.load see;
    the CUDA settings that resolve_device makes are undone afterwards, so this process computes as it did."""
    settings = {(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
                (torch.backends.cudnn, "deterministic"), (torch.backends.cudnn, "benchmark")}
    before = {setting: getattr(*setting) for setting in settings}
    deterministic = torch.are_deterministic_algorithms_enabled()

    def fake(cuda, mps):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    yield fake
    for (module, flag), value in before.items():
        setattr(module, flag, value)
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("cuda, mps, chosen", [(True, False, "cuda"), (False, True, "mps"), (True, True, "cuda"),
                                               (False, False, "cpu")])
def test_auto_takes_cuda_or_mps_when_there_is_one(cuda, mps, chosen, fake_devices):
    fake_devices(cuda=cuda, mps=mps)
    assert vae_lstm.resolve_device("auto") == torch.device(chosen)


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_a_device_where_there_is_none(kind, tiny_mnist, tmp_path, fake_devices, capsys):
    fake_devices(cuda=False, mps=False)
    assert main(train_args(tiny_mnist, tmp_path, "--device", kind)) == 2
    one_error_line(capsys.readouterr(), f"--device {kind}: no {kind.upper()} device is available here",
                   "--device cpu")
    assert vae_lstm.resolve_device("auto") == torch.device("cpu")


def test_cuda_computes_in_float32_and_deterministically(fake_devices):
    fake_devices(cuda=True, mps=False)  # a CUDA machine, as far as resolve_device sees
    opposite = {(torch.backends.cuda.matmul, "allow_tf32"): True, (torch.backends.cudnn, "allow_tf32"): True,
                (torch.backends.cudnn, "deterministic"): False, (torch.backends.cudnn, "benchmark"): True}
    for (module, flag), value in opposite.items():
        setattr(module, flag, value)
    torch.use_deterministic_algorithms(False)
    assert vae_lstm.resolve_device("cuda") == torch.device("cuda")
    assert {setting: getattr(*setting) for setting in opposite} == {
        setting: not value for setting, value in opposite.items()}
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's deterministic mode, set before CUDA starts


class FakeDeviceGenerator:
    """The default generator of torch.cuda or torch.mps, as get_rng_state and set_rng_state see it, on the CPU."""

    def __init__(self, kind, monkeypatch):
        self.generator = torch.Generator().manual_seed(7)
        monkeypatch.setattr(getattr(torch, kind), "get_rng_state", self.generator.get_state)
        monkeypatch.setattr(getattr(torch, kind), "set_rng_state", self.generator.set_state)

    def draw(self):
        return torch.rand(5, generator=self.generator)


@pytest.mark.parametrize("kind", ["cpu", "cuda", "mps"])
def test_the_training_device_random_state_round_trips_through_last_pt(kind, tmp_path, monkeypatch):
    device = torch.device(kind)
    draw_on_device = FakeDeviceGenerator(kind, monkeypatch).draw if kind != "cpu" else lambda: torch.rand(5)
    vae_lstm.save_checkpoint({"rng": vae_lstm.rng_states(device)}, tmp_path / "last.pt")
    expected = torch.rand(5), draw_on_device()
    torch.rand(5), draw_on_device()  # draws of the epochs after the one saved
    saved = vae_lstm.read_checkpoint(tmp_path / "last.pt")["rng"]
    assert set(saved) == {"cpu", kind}  # the CPU's (batch order) and the training device's (noise)
    vae_lstm.restore_rng_states(saved, device)
    assert all(map(torch.equal, (torch.rand(5), draw_on_device()), expected))


def test_a_run_resumed_on_another_device_type_says_its_numbers_will_differ(reference_copy, tiny_mnist, capsys):
    last = torch.load(reference_copy / "last.pt", weights_only=True)
    last["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)  # as if its epochs so far ran on CUDA
    torch.save(last, reference_copy / "last.pt")
    assert main(train_args(tiny_mnist, reference_copy, "--epochs", str(TINY_EPOCHS + 1), "--resume")) == 0
    assert ("note: this run was trained on CUDA and goes on on CPU, which draws other random numbers: its results "
            "will differ from an uninterrupted run's") in capsys.readouterr().out
    vae_lstm.restore_rng_states({"cpu": torch.get_rng_state()}, torch.device("cuda"))  # and the other way round
    assert "trained on CPU and goes on on CUDA" in capsys.readouterr().out
    cpu = vae_lstm.machine(torch.device("cpu"))
    assert read_results(reference_copy)["machine"] == {**cpu, "training_step": "eager"}


@pytest.fixture
def accelerator():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    pytest.skip("no CUDA or MPS device here: the device tests run where there is one")


def test_on_the_accelerator_a_seed_twice_and_a_run_stopped_by_sigterm_give_identical_numbers(
        accelerator, tiny_mnist, tmp_path, monkeypatch):
    runs = [tmp_path / name for name in ("first", "second", "stopped")]
    for run in runs[:2]:
        assert main(train_args(tiny_mnist, run, "--device", accelerator)) == 0
    raise_in_epoch(monkeypatch, 3, lambda: (_ for _ in ()).throw(vae_lstm.Terminated))  # as SIGTERM raises it
    assert main(train_args(tiny_mnist, runs[2], "--device", accelerator)) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert main(train_args(tiny_mnist, runs[2], "--device", accelerator, "--resume")) == 0
    first, *others = (read_results(run) for run in runs)
    assert all(losses(other) == losses(first) for other in others)
    assert first["machine"]["device"] != first["machine"]["cpu"]  # the GPU is named
    if accelerator == "cuda":
        assert first["machine"]["precision"] == vae_lstm.CUDA_PRECISION and first["machine"]["cudnn"]
        assert [run["machine"]["training_step"] for run in (first, *others)] == ["CUDA graph"] * 3


def test_on_cuda_the_graphed_step_gives_the_eager_step_s_bits(tiny_mnist, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the CUDA graph is tested where there is one")
    runs = {step: tmp_path / step for step in ("graph", "eager")}
    for step, run in runs.items():  # two epochs of batches of 64, 64 and a short 52
        assert main(train_args(tiny_mnist, run, "--device", "cuda", "--epochs", "2",
                               *(["--no-cuda-graph"] if step == "eager" else []))) == 0
    (graph, eager) = (torch.load(run / "last.pt", weights_only=True) for run in runs.values())
    assert graph["history"] == eager["history"] or all(
        {k: v for k, v in a.items() if "seconds" not in k} == {k: v for k, v in b.items() if "seconds" not in k}
        for a, b in zip(graph["history"], eager["history"]))
    for name in graph["model"]:
        assert torch.equal(graph["model"][name], eager["model"][name]), name
    for graph_state, eager_state in zip(graph["optimizer"]["state"].values(), eager["optimizer"]["state"].values()):
        assert all(torch.equal(graph_state[name], eager_state[name]) for name in graph_state)
    assert [read_results(run)["machine"]["training_step"] for run in runs.values()] == ["CUDA graph", "eager"]


def test_cpu_and_accelerator_agree_on_one_checkpoint(accelerator, reference_run, tiny_mnist):
    images = vae_lstm.load_mnist(tiny_mnist, test_set=True)
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


@pytest.fixture
def cuda_graphs_on_the_cpu(monkeypatch):
    """torch.cuda's streams, random state and graphs as graphed_step sees them, played on the CPU: the warm-up
    steps run for real, and capture (`torch.cuda.graph`) raises or only notes the steps taken inside it."""
    captured = []

    @contextlib.contextmanager
    def graph(_, fails):
        if fails:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        captured.append([])
        yield
        captured.append(None)
    for name, fake in {"get_rng_state": torch.get_rng_state, "set_rng_state": torch.set_rng_state,
                       "synchronize": lambda: None, "Stream": object, "stream": lambda _: contextlib.nullcontext(),
                       "CUDAGraph": object}.items():
        monkeypatch.setattr(torch.cuda, name, fake)

    def fake(fails):
        monkeypatch.setattr(torch.cuda, "graph", lambda g: graph(g, fails))
        return captured
    return fake


def steps_from(model, optimizer, step, n, seed=5):
    """n steps of `step` on seeded batches of 64 tiny images: the losses of each, on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    return [step(model, optimizer, torch.rand(64, 28, 28, generator=generator), 1.0)[0] for _ in range(n)]


@pytest.mark.parametrize("adam_state", ["fresh", "resumed"])
def test_where_capture_fails_training_goes_on_eagerly_from_the_same_state(adam_state, cuda_graphs_on_the_cpu,
                                                                            capsys):
    cuda_graphs_on_the_cpu(fails=True)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = VAE()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        if adam_state == "resumed":  # Adam's moments and step count exist before the capture
            steps_from(model, optimizer, vae_lstm.train_step, 1)
        models.append((model, optimizer))
    x = torch.rand(64, 28, 28)
    torch.manual_seed(1)  # the noise of the steps below, which the warm-up steps draw from too
    step = vae_lstm.graphed_step(*models[0], x, 1.0)  # three warm-up steps, then capture raises
    assert step is vae_lstm.train_step
    one_line = capsys.readouterr().out.strip().splitlines()
    assert one_line == ["note: no CUDA graph of the training step (operation not permitted when stream is "
                        "capturing); it runs eagerly"]
    (model, optimizer), (untouched, its_optimizer) = models
    assert optimizer.param_groups[0]["capturable"] is False
    after_fallback = steps_from(model, optimizer, step, 3)
    torch.manual_seed(1)
    assert all(map(torch.equal, after_fallback, steps_from(untouched, its_optimizer, vae_lstm.train_step, 3)))
    assert all(map(torch.equal, model.state_dict().values(), untouched.state_dict().values()))
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b
               for a, b in zip(tree_leaves(optimizer.state_dict()), tree_leaves(its_optimizer.state_dict())))


def test_the_graph_captures_train_step_itself(cuda_graphs_on_the_cpu, monkeypatch):
    captured = cuda_graphs_on_the_cpu(fails=False)
    calls, train_step = [], vae_lstm.train_step
    monkeypatch.setattr(vae_lstm, "train_step", lambda *args: calls.append(len(captured)) or train_step(*args))
    model = VAE()
    vae_lstm.graphed_step(model, torch.optim.Adam(model.parameters(), fused=True), torch.rand(64, 28, 28), 1.0)
    assert calls == [0, 0, 0, 1] and captured == [[], None]  # three warm-up steps, then one inside the capture


def test_the_cpu_step_is_never_graphed(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.setattr(vae_lstm, "graphed_step", lambda *args: pytest.fail("a CUDA graph on the CPU"))
    assert main(train_args(tiny_mnist, tmp_path, "--epochs", "1")) == 0
    assert read_results(tmp_path)["machine"]["training_step"] == "eager"


def test_no_cuda_graph_is_a_train_flag_named_in_help(capsys):
    assert vae_lstm.parse_args(["train"]).cuda_graph
    assert not vae_lstm.parse_args(["train", "--no-cuda-graph"]).cuda_graph
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--no-cuda-graph" in capsys.readouterr().out


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


# ----------------------------------------------------------------------------------------------- The command line

@pytest.mark.parametrize("argv", [
    ["train", "--epochs", "0"], ["train", "--batch-size", "0"], ["train", "--lr", "-1"], ["train", "--lr", "nan"],
    ["train", "--lr", "inf"], ["train", "--kl-weight", "inf"], ["train", "--val-fraction", "nan"],
    ["train", "--val-fraction", "1.5"], ["train", "--patience", "two"], ["train", "--seed", "-1"],
    ["train", "--seed", str(2**32)], ["train", "--split-seed", "1.5"], ["train", "--kl-weight", "-0.5"],
    ["generate", "--n", "0"], ["generate", "--nrow", "-2"], ["generate", "--seed", "-1"],
    ["generate", "--components", "0"], ["evaluate", "--components", "-1"], ["generate", "--prior", "uniform"],
    ["evaluate", "--iw-samples", "-3"], ["evaluate", "--split", "dev"], ["explore", "--device", "tpu"],
    ["evaluate", "--gaps", "0"], ["evaluate", "--temperatures", "0"], ["evaluate", "--temperatures", "-0.7"],
    ["classifier", "--architecture", "resnet"],
])
def test_out_of_range_numbers_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    one_error_line(capsys.readouterr(), "error", argv[1], argv[2], "--help")


def test_help_shows_each_default_but_for_switches(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--help"])
    assert stopped.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "at most this many epochs (default: 50)" in text and "(default: runs/lstm_vae)" in text
    assert not re.search(r"\(default: (True|False|None)\)", text)


def test_the_defaults_are_those_of_the_readme():
    train, generate, evaluate_args, explore = (vae_lstm.parse_args([command]) for command in
                                               ("train", "generate", "evaluate", "explore"))
    assert (train.out, train.data_dir, train.device, train.classifier) == ("runs/lstm_vae", "data", "auto",
                                                                           "docs/classifier.pt")
    assert {args.checkpoint for args in (generate, evaluate_args, explore)} == {"runs/lstm_vae/best_model.pt"}
    assert (generate.n, generate.nrow, generate.seed, evaluate_args.split, evaluate_args.iw_samples) == (100, 10, 0,
                                                                                                       "test", 0)
    assert (generate.prior, generate.components, evaluate_args.components, generate.data_dir) == ("normal", 10, 10,
                                                                                                    "data")
    assert vae_lstm.config_of(train) == CONFIG


@pytest.mark.parametrize("flags, words", [
    (["--no-encoder-fc", "--unidirectional"], ["--no-encoder-fc", "--unidirectional"]),
    (["--no-encoder-fc", "--latent-dim", "16"], ["--latent-dim must equal --hidden-size", "16 and 64"]),
    (["--no-encoder-fc", "--hidden-size", "32", "--latent-dim", "64"], ["64 and 32"]),
    (["--conv-encoder", "--unidirectional"], ["--conv-encoder replaces the LSTM", "--unidirectional given"]),
    (["--conv-encoder", "--hidden-size", "32"], ["--conv-encoder", "--hidden-size given"]),
    (["--conv-encoder", "--no-encoder-fc"], ["--conv-encoder", "--no-encoder-fc given"]),
])
def test_impossible_design_combinations_are_usage_errors(flags, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--device", "cpu", "--out", str(tmp_path / "run"), *flags])
    assert stopped.value.code == 2 and not (tmp_path / "run").exists()
    one_error_line(capsys.readouterr(), "error", *words)


@pytest.mark.parametrize("validator, accepted, refused", [
    ("POSITIVE_INT", ["1"], ["0", "-1", "1.5"]), ("NATURAL", ["0", "1"], ["-1"]),
    ("SEED", ["0", str(2**32 - 1)], ["-1", str(2**32)]), ("POSITIVE", ["1e-300", "2"], ["0", "-0.0", "inf", "nan"]),
    ("NON_NEGATIVE", ["0", "0.0", "1e300"], ["-1e-300", "inf"]), ("FRACTION", ["1e-9", "0.999"], ["0", "1", "nan"]),
])
def test_each_number_type_takes_its_edge_and_refuses_just_past_it(validator, accepted, refused):
    parse = getattr(vae_lstm, validator)
    assert [parse(text) for text in accepted] == [float(text) if "." in text or "e" in text else int(text)
                                                 for text in accepted]
    for text in refused:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_kl_weight_0_trains_a_plain_auto_encoder(tiny_mnist, tmp_path):
    assert vae_lstm.parse_args(["train", "--kl-weight", "0"]).kl_weight == 0  # "a non-negative number" (README)
    assert main(train_args(tiny_mnist, tmp_path, "--epochs", "1", "--kl-weight", "0")) == 0
    results = read_results(tmp_path)
    assert results["config"]["kl_weight"] == 0 and results["test"]["total"] == results["test"]["bce"]


def test_no_default_output_points_into_docs_where_the_published_files_are():
    docs, parsed = HERE / "docs", {command: vae_lstm.parse_args([command, *extra]) for command, extra in (
        ("train", []), ("generate", []), ("evaluate", []), ("explore", []), ("classifier", []), ("compare", ["r"]))}
    assert parsed["classifier"].out == "runs/classifier/classifier.pt"  # never over the shipped docs/classifier.pt
    assert parsed["train"].out == "runs/lstm_vae" and parsed["compare"].csv is parsed["compare"].figure is None
    assert parsed["generate"].out is parsed["evaluate"].json is parsed["explore"].out is None  # output_path's
    for path in (parsed["train"].out, parsed["classifier"].out, vae_lstm.output_path(None, vae_lstm.PUBLISHED_MODEL),
                 *(vae_lstm.output_path(None, model) for model in vae_lstm.PUBLISHED.glob("*/best_model.pt"))):
        assert not Path(path).resolve().is_relative_to(docs.resolve()), path


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
