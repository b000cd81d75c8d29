"""A Variational Auto-Encoder on MNIST with a bidirectional-LSTM encoder and a transposed-convolution decoder:
a faithful reproduction of a course report's experiment, with the bugs of its code fixed (README.md).

    python vae_lstm.py train | generate --n 100 | evaluate | explore | compare runs/* | classifier

In three parts: the report's experiment, in its order; what goes beyond it; running it safely.
"""
import argparse
import contextlib
import copy
import csv
import io
import json
import math
import os
import pickle
import platform
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write PNG files; never open a window
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image
from tqdm import tqdm

# ==============================================================================================================
# Part 1. The report's experiment: data and split, model, loss, training and validation, test, generation
# ==============================================================================================================

CONFIG = {  # every setting a run's numbers depend on: train's flags, stored in each checkpoint, the report's here
    "bidirectional": True,  # the rows read from the top and from the bottom (section 1.1; its code's bidirect)
    "encoder_fc": True,  # linear layers from the LSTM's final states to mu and log sigma^2 (section 1.1)
    "decoder_fc": True,  # Linear(latent_dim, 64) + ReLU before the transposed convolutions (section 1.3)
    "latent_dim": 64,  # size of z (section 1.2; its code's encoder_fc_out_size)
    "hidden_size": 64,  # LSTM units per direction ("64 is selected as hidden size", section 1.1; its code's zdim)
    "conv_encoder": False,  # the decoder's mirror as encoder, the report's "convolutional encoders" (section 4)
    "binarize": False,  # binary pixels, as in the VAE papers (beyond the report)
    "epochs": 50,  # at most (section 2)
    "patience": 10,  # early stopping: epochs without a better validation total
    "batch_size": 64,  # training images per Adam step
    "lr": 1e-3,  # Adam's learning rate
    "val_fraction": 0.1,  # of MNIST's 60,000 training images, held out for validation ...
    "split_seed": 3136,  # ... by NumPy's legacy shuffle from this seed
    "seed": 0,  # torch's: initial weights, batch order, noise (the report's code set none)
    "kl_weight": 1.0,  # weight of the KL term, the report code's 1 + gamma
}
EVAL_BATCH_SIZE = 1000  # evaluation holds no gradients, so it takes big batches
EVAL_SEED = 0  # evaluation draws its z from this seed: one checkpoint, one set of numbers
BINARIZE_SEED = 0  # a --binarize model's images are measured binarized once, from this seed (Part 2)

# ------------------------------------------------------------------------------------- Data and split (section 2)

def load_mnist(data_dir, test_set=False, labels=False):
    """MNIST's 60,000 training or 10,000 test images, (N, 28, 28) in [0, 1] in memory; with labels, their digits."""
    try:
        dataset = torchvision.datasets.MNIST(root=data_dir, train=not test_set, download=True)
    except Exception as error:  # missing files and no network, or truncated or corrupt files
        raw = Path(data_dir) / "MNIST" / "raw"
        missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
        reason = f"{len(missing)} of its files missing, and downloading them failed" if missing else gist(error)
        raise UserError(f"cannot read MNIST from {raw} ({reason}); it needs the four files "
                        f"{', '.join(MNIST_FILES)} there (pass --data-dir to point at them)") from None
    if dataset.data.shape[1:] != (28, 28) or len(dataset.data) != len(dataset.targets):
        raise UserError(f"{dataset.raw_folder} does not hold MNIST: images of shape {tuple(dataset.data.shape)}")
    images = dataset.data.float().div(255)
    return (images, dataset.targets) if labels else images


def split_indices(n=60000, val_fraction=0.1, seed=3136):
    """The report's split: NumPy's legacy shuffle of range(n) from `seed`, the first 10% for validation."""
    indices = list(range(n))
    np.random.RandomState(seed).shuffle(indices)
    n_val = int(np.floor(val_fraction * n))
    return indices[n_val:], indices[:n_val]


def load_splits(data_dir, config, device):
    """The training, validation and test images as a model of `config` is measured on, on `device`: grey levels,
    or (--binarize) binary pixels drawn once from BINARIZE_SEED on the CPU, so that one checkpoint always gives
    the same numbers; the grey images (on the CPU); the test labels."""
    images, (test_images, test_labels) = load_mnist(data_dir), load_mnist(data_dir, test_set=True, labels=True)
    train_idx, val_idx = split_indices(len(images), config["val_fraction"], config["split_seed"])
    if not train_idx or not val_idx:
        raise UserError(f"--val-fraction {config['val_fraction']} leaves an empty split of {len(images)} images")
    grey = {"train": images[train_idx], "val": images[val_idx], "test": test_images}
    measured = {split: torch.bernoulli(pixels, generator=torch.Generator().manual_seed(BINARIZE_SEED))
                if config["binarize"] else pixels for split, pixels in grey.items()}
    return {split: pixels.to(device) for split, pixels in measured.items()}, grey, test_labels


# ------------------------------------------------------------------------------------ Model (section 1, Figure 1)

class VAE(nn.Module):
    """The report's model, or the variant a run's config names, with the layer names of the report's code."""

    def __init__(self, config=CONFIG):
        super().__init__()
        if impossible := design_error(config):
            raise ValueError(impossible)
        latent_dim, hidden_size, self.encoder_fc = config["latent_dim"], config["hidden_size"], config["encoder_fc"]
        self.latent_dim = latent_dim
        if config["conv_encoder"]:  # 28x28 -> 14x14 -> 7x7 -> 4x4 -> 64x1x1: the decoder's layers, mirrored
            self.encoder_conv = nn.Sequential(*(module for conv in (
                nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.Conv2d(16, 32, 4, stride=2, padding=1),
                nn.Conv2d(32, 64, 4), nn.Conv2d(64, 64, 4)) for module in (conv, nn.ReLU())), nn.Flatten())
        else:  # the report's encoder: the 28 image rows are the LSTM's sequence of 28-pixel steps
            self.encoder_lstm = nn.LSTM(28, hidden_size, batch_first=True, bidirectional=config["bidirectional"])
        if self.encoder_fc:
            final_states = 64 if config["conv_encoder"] else hidden_size * (2 if config["bidirectional"] else 1)
            self.encoder_mu = nn.Linear(final_states, latent_dim)
            self.encoder_logvar = nn.Linear(final_states, latent_dim)
        # Decoder: z -> 64x1x1 (latent_dim x 1 x 1 without decoder_fc) -> 4x4 -> 7x7 -> 14x14 -> 28x28.
        self.decoder_fc = nn.Linear(latent_dim, 64) if config["decoder_fc"] else None
        self.decoder_list = nn.ModuleList([
            nn.ConvTranspose2d(64 if config["decoder_fc"] else latent_dim, 64, kernel_size=4, stride=1),
            nn.ConvTranspose2d(64, 32, kernel_size=4, stride=1),
            nn.ConvTranspose2d(32, 16, kernel_size=4, stride=2, padding=1),
            nn.ConvTranspose2d(16, 1, kernel_size=4, stride=2, padding=1),
        ])

    def encode(self, x):
        """(B, 28, 28) or (B, 1, 28, 28) images -> mu, logvar of q(z|x), each (B, latent_dim)."""
        if hasattr(self, "encoder_conv"):
            features = self.encoder_conv(x.reshape(-1, 1, 28, 28))
            return self.encoder_mu(features), self.encoder_logvar(features)
        _, (hidden, _) = self.encoder_lstm(x.reshape(-1, 28, 28))
        if not self.encoder_fc:  # the report's first encoder: the forward direction is mu, the backward one logvar
            return hidden[0], hidden[1]
        final_states = torch.cat(tuple(hidden), dim=1)  # the final state of each direction, side by side
        return self.encoder_mu(final_states), self.encoder_logvar(final_states)

    def reparametrize(self, mu, logvar, generator=None):
        """z = mu + sigma * eps, eps ~ N(0, I); a (CPU) generator makes eps the same on every device."""
        eps = torch.randn_like(mu) if generator is None else cpu_normal(mu.shape, generator, mu.device)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z):
        """(B, latent_dim) -> (B, 1, 28, 28) pixel probabilities."""
        h = (F.relu(self.decoder_fc(z)) if self.decoder_fc is not None else z).unflatten(1, (-1, 1, 1))
        for layer in self.decoder_list[:-1]:
            h = F.relu(layer(h))
        return torch.sigmoid(self.decoder_list[-1](h))

    def forward(self, x, generator=None):
        mu, logvar = self.encode(x)
        return self.decode(self.reparametrize(mu, logvar, generator)), mu, logvar


def design_error(config):
    """Why the model of a config cannot be built, or None."""
    lstm_flags = {"--unidirectional": not config["bidirectional"], "--no-encoder-fc": not config["encoder_fc"],
                  "--hidden-size": config["hidden_size"] != CONFIG["hidden_size"]}
    if config["conv_encoder"] and any(lstm_flags.values()):
        return (f"--conv-encoder replaces the LSTM, so it takes none of its flags "
                f"({', '.join(flag for flag, given in lstm_flags.items() if given)} given)")
    if not config["encoder_fc"] and not config["bidirectional"]:
        return ("--no-encoder-fc takes mu and log sigma^2 from the two directions: it needs the bidirectional "
                "LSTM, not --unidirectional")
    if not config["encoder_fc"] and config["latent_dim"] != config["hidden_size"]:
        return (f"--no-encoder-fc makes z the LSTM's final state, so --latent-dim must equal --hidden-size "
                f"({config['latent_dim']} and {config['hidden_size']} given)")
    return None


def cpu_normal(shape, generator, device):
    """N(0, 1) draws from a seeded CPU generator, moved to `device`: what a user reads, the same on every device."""
    return torch.randn(shape, generator=generator).to(device)


def load_model(path, device):
    """The model and config of a checkpoint of train's, or of a bare state_dict of the report's code."""
    if not Path(path).is_file():
        raise UserError(f"no checkpoint at {path}: train one (python vae_lstm.py train), or use a published "
                        f"model, --checkpoint {os.path.relpath(PUBLISHED_MODEL)}")
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}")
    config = {**CONFIG, **checkpoint.get("config", {})}
    model = VAE(config)
    try:
        model.load_state_dict(checkpoint.get("model", checkpoint))
    except (RuntimeError, TypeError) as error:
        raise UserError(f"{path} does not hold this model's weights: {gist(error)}") from None
    if not all(torch.isfinite(parameter).all() for parameter in model.parameters()):
        raise UserError(f"{path} holds weights that are NaN or inf")
    return model.to(device), config


# ------------------------------------- Loss (section 1.4; the report's KL formula has a typo, its code's is this)

def kl_per_dimension(mu, logvar):
    """KL(q(z|x) || N(0, I)) per image and latent dimension: -1/2 (1 + log sigma^2 - mu^2 - sigma^2)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def vae_loss(recon, x, mu, logvar, kl_weight=1.0):
    """(total, bce, kl), each summed over the batch: BCE over pixels, plus the closed-form KL."""
    bce = F.binary_cross_entropy(recon, x.reshape(recon.shape), reduction="sum")
    kl = kl_per_dimension(mu, logvar).sum()
    return bce + kl_weight * kl, bce, kl


def per_image(batch_losses, n_images):
    """(batches, 3) sums of (total, bce, kl) -> per-image losses, summed on the host, over the images seen."""
    total, bce, kl = (sum(column) / n_images for column in batch_losses.cpu().T.tolist())
    return {"bce": bce, "kl": kl, "total": total}


# ------------------------------------------------------------ Training, validation and early stopping (section 2)

def epochs_since_best(history):
    """Epochs since the first best validation total, what early stopping counts (the report's code never stopped)."""
    totals = [row["val_total"] for row in history]
    return len(totals) - 1 - totals.index(min(totals)) if totals else 0


def train_step(model, optimizer, x, kl_weight):
    """One Adam step on a batch. Its (total, bce, kl) and whether its reconstructions were finite stay on the
    device, read once an epoch: reading them here would make a GPU wait at every step."""
    recon, mu, logvar = model(x)
    finite = torch.isfinite(recon).all()
    recon = torch.where(finite, recon, 0.5)  # CUDA's BCE kills the process on NaN; the epoch reports it instead
    total, bce, kl = vae_loss(recon, x, mu, logvar, kl_weight)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return torch.stack((total, bce, kl)).detach(), finite


def train_epoch(model, optimizer, images, batch_size, kl_weight, epoch, binarize=False, step=train_step):
    """One pass of `step` (train_step, or its CUDA graph) over the images in a fresh order, binarized afresh with
    `binarize`; per-image losses. A non-finite step stops the run at the epoch's end."""
    model.train()
    batches = torch.randperm(len(images)).to(images.device).split(batch_size)
    steps = [step(model, optimizer, torch.bernoulli(images[index]) if binarize else images[index], kl_weight)
             for index in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=None)]
    batch_losses = torch.stack([losses for losses, _ in steps]).cpu()
    finite = torch.stack([finite for _, finite in steps]).cpu()
    bad = (~finite | ~torch.isfinite(batch_losses[:, 0])).nonzero().flatten().tolist()
    if bad:
        symptom = (f"the loss is {batch_losses[bad[0], 0].item()}" if finite[bad[0]] else
                   "the reconstructions hold NaN or inf")
        raise UserError(f"training diverged in epoch {epoch}, batch {bad[0] + 1} of {len(batches)}: {symptom}; "
                        f"stopped, the saved checkpoints are as they were (a smaller --lr may help)")
    return per_image(batch_losses, len(images))


@torch.no_grad()
def encode_split(model, images):
    """mu and logvar of q(z|x) for every image of a split, in eval mode: two (N, latent_dim) tensors."""
    model.eval()
    codes = [model.encode(x) for x in images.split(EVAL_BATCH_SIZE)]
    return torch.cat([mu for mu, _ in codes]), torch.cat([logvar for _, logvar in codes])


@torch.no_grad()
def evaluate(model, images, kl_weight=1.0):
    """Per-image losses of a whole split, in eval mode, with z drawn from a fixed seed."""
    mus, logvars = encode_split(model, images)
    generator, batch_losses = torch.Generator().manual_seed(EVAL_SEED), []
    for x, mu, logvar in zip(images.split(EVAL_BATCH_SIZE), mus.split(EVAL_BATCH_SIZE), logvars.split(EVAL_BATCH_SIZE)):
        recon = model.decode(model.reparametrize(mu, logvar, generator))
        if not torch.isfinite(recon).all():  # a damaged checkpoint; BCE would refuse these
            raise UserError("the model's reconstructions hold NaN or inf: its weights are not finite")
        batch_losses.append(torch.stack(vae_loss(recon, x, mu, logvar, kl_weight)))
    return per_image(torch.stack(batch_losses), len(images))


def fit(config, model, train_images, val_images, out, state=None, graph=False):
    """Train with early stopping, from scratch or from last.pt's state; best_model.pt keeps the best epoch, last.pt
    what a resume needs. The history, why it stopped, which step trained (a CUDA graph if `graph`)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], fused=True)
    history, step = [], None
    if state:  # the history is the record: a last.pt from before keeps best_val and bad_epochs too, unread
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_states(state["rng"], train_images.device)
        history = state["history"]
    for epoch in range(len(history) + 1, config["epochs"] + 1):
        if epochs_since_best(history) >= config["patience"]:
            break
        start = time.perf_counter()
        step = step or (graphed_step(model, optimizer, train_images[:config["batch_size"]].clone(),
                                     config["kl_weight"]) if graph else train_step)
        trained = train_epoch(model, optimizer, train_images, config["batch_size"], config["kl_weight"], epoch,
                              config["binarize"], step)
        train_seconds = time.perf_counter() - start
        val = evaluate(model, val_images, config["kl_weight"])
        history.append({"epoch": epoch, **{f"train_{k}": v for k, v in trained.items()},
                        **{f"val_{k}": v for k, v in val.items()},
                        "train_seconds": train_seconds, "seconds": time.perf_counter() - start})
        improved = epochs_since_best(history) == 0
        if improved:
            save_checkpoint({"config": config, "model": model.state_dict(), "epoch": epoch, "val_loss": val["total"]},
                            out / "best_model.pt")
        save_checkpoint({"config": config, "epoch": epoch, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "history": history,
                         "rng": rng_states(train_images.device)}, out / "last.pt")
        write_csv(history, out / "history.csv")
        print(f"epoch {epoch:2d}/{config['epochs']}  train bce {trained['bce']:6.2f} kl {trained['kl']:5.2f} "
              f"total {trained['total']:6.2f}  |  val bce {val['bce']:6.2f} kl {val['kl']:5.2f} "
              f"total {val['total']:6.2f}  {history[-1]['seconds']:5.1f}s{'  best' if improved else ''}", flush=True)
    kind = None if step is None else "eager" if step is train_step else "CUDA graph"
    if epochs_since_best(history) >= config["patience"]:
        return history, f"early stopping: no better validation total in {config['patience']} epochs", kind
    return history, f"reached --epochs {config['epochs']}", kind


def plot_losses(history, best_epoch, path):
    """The report's Figure 2: train and validation BCE, KL and total per epoch."""
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for part, color in (("total", "C0"), ("bce", "C1"), ("kl", "C2")):
        axes.plot(epochs, [row[f"train_{part}"] for row in history], color=color, marker="o", markersize=3,
                  label=f"train {part}")
        axes.plot(epochs, [row[f"val_{part}"] for row in history], color=color, marker="o", markersize=3,
                  linestyle="--", label=f"val {part}")
    axes.axvline(best_epoch, color="grey", linewidth=0.8, label=f"best epoch ({best_epoch})")
    axes.set(xlabel="epoch", ylabel="loss per image (nats)", title="LSTM-VAE on MNIST: training curves")
    axes.set_xlim(0.5, epochs[-1] + 0.5)  # a short run's points clear of the frame, on whole epochs
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))
    axes.legend(ncol=2, fontsize=8)
    save_figure(figure, path)


# ------------------------------------------ Test (section 3): the best model, under torch.no_grad(), never a step

REPORT_RESULTS = {  # the report's table (section 3), per image
    "train": {"bce": 76.97, "kl": 19.74, "total": 96.71},
    "val": {"bce": 77.73, "kl": 19.62, "total": 97.35},
    "test": {"bce": 78.04, "kl": 19.53, "total": 97.57},
}


@torch.no_grad()
def save_reconstructions(model, images, path, n=10):
    """The report's Figures 3 and 4: n originals above their reconstructions."""
    model.eval()
    recon, _, _ = model(images[:n], torch.Generator().manual_seed(EVAL_SEED))
    save_grid(torch.cat([images[:n].reshape(-1, 1, 28, 28), recon]).cpu(), path, nrow=n)


def summary_table(results):
    lines = [f"{'':6}{'report: BCE':>12}{'KL':>7}{'total':>8}  |{'this run: BCE':>14}{'KL':>7}{'total':>8}"]
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        report, ours = REPORT_RESULTS[split], results[split]
        lines.append(f"{name:6}{report['bce']:12.2f}{report['kl']:7.2f}{report['total']:8.2f}  |"
                     f"{ours['bce']:14.2f}{ours['kl']:7.2f}{ours['total']:8.2f}")
    return "\n".join(lines)


# ------------------------------- Generation (the report's generator.py, which repeated the config, saved nothing)

@torch.no_grad()
def sample_digits(model, n, seed, prior=None, temperature=1.0):
    """Decode n draws of z ~ N(0, temperature^2 I), or of a fitted prior (Part 2), from `seed` on the CPU."""
    model.eval()
    generator, device = torch.Generator().manual_seed(seed), next(model.parameters()).device
    z = cpu_normal((n, model.latent_dim), generator, device) * temperature if prior is None else draw_codes(
        prior, n, generator)
    return model.decode(z.to(device)).cpu()


def generate(args):
    model, config = load_model(args.checkpoint, resolve_device(args.device))
    out = output_path(args.out, args.checkpoint, f"generated{'' if args.prior == 'normal' else '_mixture'}.png")
    picture_format(out)
    check_out_dir(out.parent)
    prior = None if args.prior == "normal" else mixture_prior(model, config, args.data_dir, args.components)
    save_grid(sample_digits(model, args.n, args.seed, prior), out, args.nrow)
    print(f"{args.n} generated digits written to {out}")


# ----------------------------------------------- The train command: train and validate, test the best model, draw

def train(args):
    out, config = Path(args.out), config_of(args)
    with claim_run_folder(out, args.resume):
        device = resolve_device(args.device)
        classifier = load_classifier(args.classifier)  # refused before the first epoch, not after the last
        torch.manual_seed(config["seed"])
        state = resumable_state(config, out) if args.resume else None
        if state and epochs_since_best(state["history"]) >= config["patience"]:
            print(f"early stopping ended this run at epoch {state['epoch']} (no better validation total in "
                  f"{config['patience']} epochs): nothing more to train; its best model is tested again", flush=True)
        measured, grey, test_labels = load_splits(args.data_dir, config, device)
        train_images = grey["train"].to(device) if config["binarize"] else measured["train"]  # drawn afresh
        where = machine(device)
        print(f"{len(train_images)} training, {len(measured['val'])} validation, {len(measured['test'])} test images"
              f"{' (binarized)' if config['binarize'] else ''}; device {device} ({where['device']}); "
              f"writing to {out}", flush=True)

        history, stop_reason, where["training_step"] = fit(config, VAE(config).to(device), train_images,
                                                           measured["val"], out, state,
                                                           device.type == "cuda" and args.cuda_graph)

        start = time.perf_counter()
        model, _ = load_model(out / "best_model.pt", device)  # the best model, not the last (a report bug)
        results = {split: evaluate(model, images, config["kl_weight"]) for split, images in measured.items()}
        best = len(history) - epochs_since_best(history)
        plot_losses(history, best, out / "loss_plot.png")
        save_reconstructions(model, measured["train"], out / "train_reconstruction.png")
        save_reconstructions(model, measured["test"], out / "test_reconstruction.png")
        save_grid(sample_digits(model, 100, config["seed"]), out / "generated.png", nrow=10)

        beyond = beyond_the_report(model, measured, grey["test"], "test", results["test"]["kl"], classifier,
                                   MIXTURE_COMPONENTS, explore_to=(test_labels, out, out / "best_model.pt"))
        results["test"].update(beyond.pop("surgery"))
        exploration = beyond.pop("exploration")
        results.update(best_epoch=best, epochs_run=len(history), stop_reason=stop_reason,
                       **timings(history, time.perf_counter() - start, len(train_images)),
                       parameters=sum(parameter.numel() for parameter in model.parameters()), machine=where,
                       config=config, **beyond)
        write_json(results, out / "results.json")
    print(f"\n{stop_reason}; best epoch {best} of {len(history)}; {results['seconds']:.0f}s, "
          f"{results['train_images_per_second']:.0f} training images/s")
    print(f"per-image losses of the best model (nats):\n{summary_table(results)}\ntest {surgery_line(results['test'])}"
          f"\n{score_line(results['score'])}\n{active_units_line(exploration)}")
    print(f"written to {out}: {', '.join(sorted(path.name for path in out.iterdir()))}")


def timings(history, seconds_after, n_train):
    """The run's seconds (its epochs, then `seconds_after` them), per epoch, and training images per second."""
    seconds = sum(row["seconds"] for row in history)
    return {"seconds": seconds + seconds_after, "seconds_per_epoch": seconds / len(history),
            "train_images_per_second": n_train * len(history) / sum(row["train_seconds"] for row in history)}


# ==============================================================================================================
# Part 2. Beyond the report: the likelihood, the latent space, the KL split, the gaps, a fitted prior, the score
# ==============================================================================================================

# ------------------------------------------------------- The importance-weighted estimate (evaluate --iw-samples)

IW_MEANING = {  # what evaluate's importance-weighted figure is, printed and written beside it in evaluation.json
    "iw_nll": "-log p(x) of the binarized images in nats, the figure VAE papers report: the importance-weighted "
              "estimate of Burda et al. (2016), an upper bound that tightens as K grows",
    "iw_bound": "an importance-weighted bound of the report's objective on grey-level pixels, not a log-likelihood: "
                "the Bernoulli likelihood behind the BCE is a distribution over binary images only (Loaiza-Ganem "
                "& Cunningham, 2019); train --binarize for a -log p(x) comparable with published figures",
}
IW_CODES = 100_000  # K codes per image are drawn for this many codes at a time (26 MB), then decoded
IW_CHUNK = {"cpu": 500, "gpu": 20_000}  # this many at a time: on a CPU 10,000 run slower per code (docs/study.md)


def fast_decoder(model):
    """model.decode in eval, equal within float rounding, twice as fast on a CPU (docs/study.md, Speed): the first
    convolution (of a 1x1 input) as a matrix product, the middle ones channels-last, the last without oneDNN."""
    first, *middle, last = copy.deepcopy(model.decoder_list).eval()
    weight, bias = first.weight.flatten(1), first.bias.repeat_interleave(first.weight[0, 0].numel())
    middle = [layer.to(memory_format=torch.channels_last) for layer in middle]

    def decode(z):
        h = F.relu(model.decoder_fc(z)) if model.decoder_fc is not None else z
        h = F.relu(torch.addmm(bias, h, weight)).unflatten(1, first.weight.shape[1:])
        h = h.contiguous(memory_format=torch.channels_last)
        for layer in middle:
            h = F.relu(layer(h))
        with warnings.catch_warnings():  # flags() warns that oneDNN's TF32 is for Intel GPUs, which is moot here
            warnings.simplefilter("ignore")
            with torch.backends.mkldnn.flags(enabled=False):
                return torch.sigmoid(last(h.contiguous()))
    return decode


@torch.no_grad()
def log_importance_weights(model, x, n_samples, generator, chunk, decode=None, posterior=None):
    """log p(x|z) + log p(z) - log q(z|x) for n_samples z ~ q(z|x) per image, (B, n_samples), from one draw of eps
    on the CPU generator, q the encoder's or `posterior` (mu, logvar); `chunk` codes at a time by `decode`."""
    decode = decode or model.decode
    mu, logvar = posterior or model.encode(x)
    eps = cpu_normal((len(x), n_samples, mu.shape[1]), generator, x.device)
    z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
    # log N(z; 0, I) - log N(z; mu, sigma^2): the log(2 pi) terms cancel, and (z - mu) / sigma is eps
    log_prior_over_posterior = 0.5 * (eps.pow(2) - z.pow(2) + logvar.unsqueeze(1)).sum(-1)
    codes, pixels = z.flatten(0, 1), x.reshape(len(x), -1)
    image_of_code = torch.arange(len(codes), device=x.device) // n_samples
    log_likelihood = torch.cat([
        -F.binary_cross_entropy(decode(some).flatten(1), pixels[images], reduction="none").sum(1)
        for some, images in zip(codes.split(chunk), image_of_code.split(chunk))])
    return log_likelihood.view(len(x), n_samples) + log_prior_over_posterior


@torch.no_grad()
def importance_weighted_nll(model, images, n_samples, chunk=None, posteriors=None):
    """Per-image IWAE estimate of -log p(x) (IW_MEANING), with the encoder's q or `posteriors` (mus, logvars) as
    proposal; IW_CODES / K images at a time, so that any K fits in memory."""
    model.eval()
    decode, generator = fast_decoder(model), torch.Generator().manual_seed(EVAL_SEED)
    chunk, batch = chunk or IW_CHUNK["cpu" if images.device.type == "cpu" else "gpu"], max(1, IW_CODES // n_samples)
    proposals = zip(*(tensor.split(batch) for tensor in posteriors)) if posteriors else [None] * len(images)
    estimates = []
    for x, posterior in zip(tqdm(images.split(batch), desc=f"K={n_samples}", leave=False, disable=None), proposals):
        log_weights = log_importance_weights(model, x, n_samples, generator, chunk, decode, posterior)
        estimates.append(math.log(n_samples) - torch.logsumexp(log_weights, dim=1))
    return torch.cat(estimates)


# ------------------------------------------- The latent space: interpolation, a map by digit, the dimensions used

ACTIVITY_THRESHOLD = 0.01  # Burda et al. (2016): dimension d is active when Var_x(E_q(z|x)[z_d]) > 0.01
INTERPOLATION_STEPS = 10  # decodings between (and including) the codes of two images
EXPLORATION_FILES = ("interpolation.png", "latent_map.png", "latent_usage.png", "exploration.json")


def interpolation_pairs(labels):
    """Eight pairs of indices, the first image of digit d and of (d + 3) mod 10 for d = 0..7: every digit is in."""
    present = set(labels.tolist())
    if present != set(range(10)):
        raise UserError(f"the test set lacks the digits {sorted(set(range(10)) - present)}: not MNIST")
    first = [int((labels == digit).nonzero()[0]) for digit in range(10)]
    return [(first[digit], first[(digit + 3) % 10]) for digit in range(8)]


@torch.no_grad()
def interpolate(model, mu_start, mu_end, steps=INTERPOLATION_STEPS):
    """Decodings of z moving linearly from each mu_start to its mu_end, both included: (pairs, steps, 1, 28, 28)."""
    weights = torch.linspace(0, 1, steps, device=mu_start.device).view(1, steps, 1)
    z = torch.lerp(mu_start.unsqueeze(1), mu_end.unsqueeze(1), weights)
    return model.decode(z.flatten(0, 1)).unflatten(0, (len(mu_start), steps))


def principal_components(codes, n=2):
    """The codes projected on their first n principal components, and the share of the variance they explain."""
    centred = codes - codes.mean(dim=0)
    _, singular_values, components = torch.linalg.svd(centred, full_matrices=False)
    variance = singular_values.pow(2)
    return centred @ components[:n].T, (variance[:n].sum() / variance.sum()).item()


def plot_latent_map(projection, labels, explained, path):
    """Each image's mean code on two principal components, by digit, shuffled so that no digit hides another."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    figure, axes = plt.subplots(figsize=(7, 6))
    points = axes.scatter(projection[order, 0], projection[order, 1], c=labels[order], cmap="tab10", vmin=-0.5,
                          vmax=9.5, s=3, alpha=0.6, linewidths=0)
    axes.legend(*points.legend_elements(), title="digit", loc="best", fontsize=8, markerscale=1.5)
    axes.set(xlabel="first principal component", ylabel="second principal component",
             title=f"Mean codes of {len(labels):,} test images: the first two principal\n"
                   f"components, {explained:.0%} of their variance")
    save_figure(figure, path)


def plot_latent_usage(activity, path):
    """Burda et al.'s activity of each latent dimension, sorted, against the 0.01 threshold."""
    activity = activity.sort(descending=True).values
    active = activity > ACTIVITY_THRESHOLD
    figure, axes = plt.subplots(figsize=(7, 4))
    ranks = torch.arange(1, len(activity) + 1)
    axes.scatter(ranks[active], activity[active], color="C0", s=14, label="active")
    axes.scatter(ranks[~active], activity[~active], color="C7", s=14, label="inactive")
    axes.axhline(ACTIVITY_THRESHOLD, color="C3", linestyle="--", linewidth=1,
                 label=f"threshold {ACTIVITY_THRESHOLD} (Burda et al., 2016)")
    axes.set(yscale="log", xlabel="latent dimension, from most to least active", ylabel="activity Var_x(mu_d)",
             title=f"{int(active.sum())} of {len(activity)} latent dimensions active")
    axes.legend(fontsize=8)
    save_figure(figure, path)


@torch.no_grad()
def explore(model, images, labels, out, checkpoint):
    """Write EXPLORATION_FILES into `out` for a split (the test set); what exploration.json holds."""
    mus, logvars = encode_split(model, images)
    pairs = interpolation_pairs(labels)
    starts, ends = (list(indices) for indices in zip(*pairs))
    rows = torch.cat([images[starts].view(-1, 1, 1, 28, 28), interpolate(model, mus[starts], mus[ends]),
                      images[ends].view(-1, 1, 1, 28, 28)], dim=1)
    save_grid(rows.flatten(0, 1).cpu(), out / "interpolation.png", nrow=INTERPOLATION_STEPS + 2)

    mus, logvars = mus.cpu(), logvars.cpu()
    projection, explained = principal_components(mus)
    plot_latent_map(projection, labels.cpu(), explained, out / "latent_map.png")
    activity = mus.var(dim=0)
    plot_latent_usage(activity, out / "latent_usage.png")
    kl_per_dim = kl_per_dimension(mus, logvars).double().mean(dim=0)
    exploration = {"checkpoint": str(checkpoint), "images": len(images), "latent_dim": mus.shape[1],
                   "active_units": int((activity > ACTIVITY_THRESHOLD).sum()), "activity_threshold": ACTIVITY_THRESHOLD,
                   "activity": activity.tolist(), "kl_per_dim": kl_per_dim.tolist(), "kl": kl_per_dim.sum().item(),
                   "principal_components_variance": explained, "interpolation_pairs": pairs}
    write_json(exploration, out / "exploration.json")
    return exploration


def active_units_line(exploration):
    return (f"{exploration['active_units']} of {exploration['latent_dim']} latent dimensions active "
            f"(variance of their mean code over the test set above {ACTIVITY_THRESHOLD})")


def explore_command(args):
    device = resolve_device(args.device)
    model, config = load_model(args.checkpoint, device)
    out = output_path(args.out, args.checkpoint)
    check_out_dir(out)
    measured, _, labels = load_splits(args.data_dir, config, device)
    exploration = explore(model, measured["test"], labels, out, args.checkpoint)
    print(f"{active_units_line(exploration)}; KL {exploration['kl']:.2f} nats per image")
    print(f"written to {out}: {', '.join(EXPLORATION_FILES)}")


# ------------------------------- The KL term, split: what the codes carry and what the prior misses (ELBO surgery)

SURGERY_PAIRS = 10_000_000  # log q(z_i | x_j) for this many pairs (i, j) at a time: 80 MB of float64


def log_aggregate_posterior(z, mus, logvars):
    """log q(z) + d/2 log 2 pi of each row of z, q(z) the mean of the N posteriors N(mus, exp(logvars)), all in
    float64 on the CPU, SURGERY_PAIRS pairs at a time."""
    precisions = (-logvars).exp()
    # -2 log q(z | x_j) - d log 2 pi = [z^2, z] . [1 / sigma_j^2, -2 mu_j / sigma_j^2] + constants_j
    weights, constants = torch.cat((precisions, -2 * mus * precisions), 1), (mus.pow(2) * precisions + logvars).sum(1)
    return torch.cat([torch.addmm(constants, torch.cat((block.pow(2), block), 1), weights.T).mul_(-0.5).logsumexp(1)
                      for block in z.split(max(1, SURGERY_PAIRS // len(mus)))]) - math.log(len(mus))


@torch.no_grad()
def elbo_surgery(mus, logvars, kl):
    """Hoffman & Johnson's (2016) split of a split's mean KL term `kl`: I(x; z), mean log q(z_i|x_i) - log q(z_i)
    with one z_i ~ q(z|x_i) per image from EVAL_SEED (a bound: I <= log N), and the rest, KL(q(z) || N(0, I))."""
    mus, logvars = mus.cpu().double(), logvars.cpu().double()
    noise = torch.randn(mus.shape, generator=torch.Generator().manual_seed(EVAL_SEED), dtype=torch.float64)
    z = mus + (0.5 * logvars).exp() * noise
    information = (-0.5 * (noise.pow(2) + logvars).sum(1) - log_aggregate_posterior(z, mus, logvars)).mean().item()
    return {"mutual_information": information, "marginal_kl": kl - information}


@torch.no_grad()
def prior_holes(mus, logvars, mixture):
    """Where a prior p puts mass and no training code lives: KL(p || q(z)), q(z) the mean of the posteriors (mus,
    logvars), by SCORED_DIGITS draws of p from EVAL_SEED, with its standard error; p is N(0, I), then `mixture`."""
    mus, logvars, generator = mus.cpu().double(), logvars.cpu().double(), torch.Generator().manual_seed(EVAL_SEED)
    normal = torch.randn((SCORED_DIGITS, mus.shape[1]), generator=generator, dtype=torch.float64)
    mixed = draw_codes(mixture, SCORED_DIGITS, generator).double()
    log_ratios = {"prior_holes": -0.5 * normal.pow(2).sum(1) - log_aggregate_posterior(normal, mus, logvars),
                  "mixture_holes": mixture.log_prob(mixed) + 0.5 * mus.shape[1] * math.log(2 * math.pi)
                  - log_aggregate_posterior(mixed, mus, logvars)}
    return {name: {"kl": ratio.mean().item(), "standard_error": ratio.std().item() / math.sqrt(len(ratio))}
            for name, ratio in log_ratios.items()}


def surgery_line(losses):
    return (f"KL {losses['kl']:.2f} = I(x; z) {losses['mutual_information']:.2f} (what the codes carry, at most "
            f"log N) + KL(q(z) || N(0, I)) {losses['marginal_kl']:.2f}")


# ------------------------------------------------ The amortization gap (Cremer et al., 2018; evaluate --gaps N)

# Adam's rate on each mu and log sigma^2; steps between checks; the gain (nats) under which it stops; draws of a
# check; K of the importance-weighted bound
GAP_SETTINGS = {"lr": 0.01, "check_every": 100, "tolerance": 0.01, "samples": 100, "iw_samples": 1000}


def mean_loss(model, x, posterior, eps):
    """The report's loss of an image of x, on average, under q = N(mu, sigma^2) with each of the draws eps (S, B, d)."""
    mu, logvar = posterior
    losses = [vae_loss(model.decode(mu + (0.5 * logvar).exp() * draw), x, mu, logvar)[0] for draw in eps]
    return sum(losses) / eps[..., 0].numel()


def amortization_gaps(model, images, n):
    """Cremer et al.'s gaps on n images of a split drawn from EVAL_SEED, as losses (-ELBO in nats per image; on grey
    levels, of the report's objective): of the encoder's q; of q*, Adam on each image's mu and log sigma^2 from the
    encoder's until check_every steps gain less than the tolerance; the importance-weighted bound of q*."""
    if n > len(images):
        raise UserError(f"--gaps {n} is more than the {len(images)} images of the split")
    model, generator = copy.deepcopy(model).eval().requires_grad_(False), torch.Generator().manual_seed(EVAL_SEED)
    x = images[torch.randperm(len(images), generator=generator)[:n]]
    posterior = [parameter.requires_grad_() for parameter in model.encode(x)]
    fixed = cpu_normal((GAP_SETTINGS["samples"], n, model.latent_dim), generator, x.device)  # the same each check
    optimizer, losses = torch.optim.Adam(posterior, lr=GAP_SETTINGS["lr"]), []
    while len(losses) < 2 or losses[-2] - losses[-1] >= GAP_SETTINGS["tolerance"]:
        for _ in range(GAP_SETTINGS["check_every"] if losses else 0):  # no step before the first check: L[q]
            optimizer.zero_grad(set_to_none=True)
            mean_loss(model, x, posterior, cpu_normal((1, n, model.latent_dim), generator, x.device)).backward()
            optimizer.step()
        with torch.no_grad():
            losses.append(mean_loss(model, x, posterior, fixed).item())
    bound = importance_weighted_nll(model, x, GAP_SETTINGS["iw_samples"], posteriors=posterior).mean().item()
    return {"images": n, "steps": GAP_SETTINGS["check_every"] * (len(losses) - 1), "amortized": losses[0],
            "optimised": losses[-1], "iw_bound": bound, "amortization_gap": losses[0] - losses[-1],
            "approximation_gap": losses[-1] - bound, "settings": GAP_SETTINGS}


# ---------------------- A prior fitted to the codes (generate --prior mixture; Ghosh et al., 2020, "ex-post density")

MIXTURE_COMPONENTS = 10  # K Gaussians of full covariance, as pythae's GaussianMixtureSampler
KMEANS_STEPS = 20  # Lloyd's steps before EM, which sklearn's GaussianMixture (pythae's) starts from too
MIXTURE_TOLERANCE = 0.01  # EM stops when an iteration adds less to the mean log-likelihood of a code (nats) ...
MIXTURE_ITERATIONS = 100  # ... or after this many, sklearn's cap
MIXTURE_RIDGE = 1e-6  # added to each covariance's diagonal, sklearn's reg_covar: a collapsed component stays invertible


def mixture_of(codes, responsibilities):
    """EM's M step: the mixture of full-covariance Gaussians into which `responsibilities` (N, K) weigh `codes`."""
    counts = responsibilities.sum(0) + 1e-12  # a component that lost every code keeps weight 0 and finite numbers
    means = responsibilities.T @ codes / counts.unsqueeze(1)
    second_moments = torch.stack([(codes * weights.unsqueeze(1)).T @ codes for weights in responsibilities.T])
    covariances = second_moments / counts.view(-1, 1, 1) - means.unsqueeze(2) * means.unsqueeze(1)
    covariances += MIXTURE_RIDGE * torch.eye(codes.shape[1], dtype=codes.dtype)
    return MixtureSameFamily(Categorical(probs=counts / len(codes)), MultivariateNormal(means, covariances))


def fit_mixture(codes, components, seed=EVAL_SEED):
    """A Gaussian mixture fitted by EM to `codes` (N, d) in float64 on the CPU, from k-means of `components` codes
    drawn from `seed` (one checkpoint, one mixture); and the mean log-likelihood of a code at each iteration."""
    codes = codes.cpu().double()
    if components > len(codes):
        raise UserError(f"--components {components} is more than the {len(codes)} codes of the training split")
    centres = codes[torch.randperm(len(codes), generator=torch.Generator().manual_seed(seed))[:components]]
    for _ in range(KMEANS_STEPS):
        nearest = F.one_hot(torch.cdist(codes, centres).argmin(1), components).double()
        centres = nearest.T @ codes / nearest.sum(0).clamp(min=1).unsqueeze(1)
    mixture, log_likelihoods = mixture_of(codes, nearest), []
    while True:  # E step: each component's log-density of each code, weighted, from torch.distributions
        joint = mixture.component_distribution.log_prob(codes.unsqueeze(1)) + mixture.mixture_distribution.logits
        log_likelihoods.append(joint.logsumexp(1).mean().item())
        if len(log_likelihoods) == MIXTURE_ITERATIONS or (
                len(log_likelihoods) > 1 and log_likelihoods[-1] - log_likelihoods[-2] < MIXTURE_TOLERANCE):
            return mixture, log_likelihoods
        mixture = mixture_of(codes, joint.softmax(1))


def draw_codes(mixture, n, generator):
    """n codes of a fitted mixture from a seeded CPU generator (MixtureSameFamily.sample takes none): (n, d)."""
    chosen = torch.multinomial(mixture.mixture_distribution.probs, n, replacement=True, generator=generator)
    gaussians = mixture.component_distribution
    eps, codes = cpu_normal((n, gaussians.event_shape[0]), generator, "cpu").double(), gaussians.loc[chosen]
    for component, scale in enumerate(gaussians.scale_tril):  # a component at a time: n codes in memory, not n scales
        codes[chosen == component] += eps[chosen == component] @ scale.T
    return codes.float()


def fit_prior(model, train_images, val_images, components):
    """The mixture fitted to the training images' mean codes, encoded on the CPU (one checkpoint, one mixture); its
    record: a training and a validation code's mean log-likelihood, iterations, seconds; the codes (mus, logvars)."""
    start, model = time.perf_counter(), copy.deepcopy(model).cpu()
    train_codes = encode_split(model, train_images.cpu())
    mixture, log_likelihoods = fit_mixture(train_codes[0], components)
    held_out = mixture.log_prob(encode_split(model, val_images.cpu())[0].double()).mean().item()
    return mixture, {"components": components, "train_log_likelihood": log_likelihoods[-1], "val_log_likelihood":
                     held_out, "iterations": len(log_likelihoods), "seconds": time.perf_counter() - start}, train_codes


def mixture_prior(model, config, data_dir, components):
    """The mixture fitted to the training codes of a checkpoint (generate --prior mixture, compare --figure)."""
    measured, _, _ = load_splits(data_dir, config, next(model.parameters()).device)
    mixture, fit, _ = fit_prior(model, measured["train"], measured["val"], components)
    print(f"z from a {components}-component mixture of the training codes, fitted in {fit['seconds']:.1f} s")
    return mixture


# ------------------------------------ What the eye sees, measured: a digit classifier's score of the digits drawn

CLASSIFIER = Path(__file__).resolve().parent / "docs" / "classifier.pt"  # the shipped one, made by `classifier`
CLASSIFIER_SETTINGS = {"epochs": 10, "batch_size": 64, "lr": 1e-3, "lr_decay": 0.7}  # Adam on the training images
SCORED_DIGITS = 10_000  # decoded from z ~ N(0, I) of EVAL_SEED, as many as the test images they are scored against
RECOGNISED = 0.9  # a digit is recognised when the classifier gives its top class at least this probability
RECOGNISED_AT = (0.5, 0.7, 0.9)  # the share recognised is also given at these top probabilities


def digit_classifier(architecture="cnn"):
    """A LeNet-style CNN, or an MLP for a second opinion; the 128 features before the dropout (classifier[:-2]) are
    what the Fréchet distance sees."""
    if architecture == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                             nn.Dropout(0.5), nn.Linear(128, 10))
    return nn.Sequential(nn.Unflatten(1, (1, 28)), nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 128), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(128, 10))


def train_classifier(images, labels, seed, architecture="cnn"):
    """CLASSIFIER_SETTINGS' epochs of Adam on the training images and labels, from `seed`, on the CPU."""
    torch.manual_seed(seed)
    classifier = digit_classifier(architecture)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=CLASSIFIER_SETTINGS["lr"])
    decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, CLASSIFIER_SETTINGS["lr_decay"])
    for epoch in range(1, CLASSIFIER_SETTINGS["epochs"] + 1):
        for index in tqdm(torch.randperm(len(images)).split(CLASSIFIER_SETTINGS["batch_size"]), desc=f"epoch {epoch}",
                          leave=False, disable=None):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(classifier(images[index]), labels[index]).backward()
            optimizer.step()
        decay.step()
    return classifier.eval()


def load_classifier(path):
    """The classifier that `classifier` wrote to `path` (an MLP's has a layer 3), read with weights_only=True; a bad
    file is one line."""
    try:
        state = read_checkpoint(path) if Path(path).is_file() else {}
        classifier = digit_classifier("mlp" if "3.weight" in state else "cnn")
        classifier.load_state_dict(state)
    except (UserError, RuntimeError, TypeError, AttributeError) as error:
        reason = gist(error) if Path(path).is_file() else "no such file"
        raise UserError(f"no digit classifier at {path} ({reason}); make one with python vae_lstm.py classifier "
                        f"--out {path}") from None
    return classifier.eval()


@torch.no_grad()
def classify(classifier, images):
    """The classifier's 128 features and 10 class probabilities of each image, computed on the CPU."""
    features = torch.cat([classifier[:-2](x.cpu().reshape(-1, 28, 28)) for x in images.split(EVAL_BATCH_SIZE)])
    return features, classifier[-1](features).softmax(dim=1)


def frechet_distance(a, b):
    """The Fréchet distance of Gaussians fitted to two sets of features (N, d), in float64 on the host (Heusel et
    al., 2017): |mean_a - mean_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)."""
    a, b = a.cpu().double(), b.cpu().double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors * values.clamp(min=0).sqrt() @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def image_score(features, probabilities, reference_features):
    """A set of images' Fréchet distance to the reference, share recognised, and how many of each digit it holds."""
    confidence, digit = probabilities.max(dim=1)
    return {"frechet": frechet_distance(features, reference_features),
            "recognised": (confidence >= RECOGNISED).double().mean().item(),
            "recognised_at": {f"{p:g}": (confidence >= p).double().mean().item() for p in RECOGNISED_AT},
            "digits": torch.bincount(digit, minlength=10).tolist()}


@torch.no_grad()
def score(model, images, test_images, classifier, prior, figure=None, temperatures=()):
    """The score of SCORED_DIGITS digits of N(0, I), `prior` and N(0, tau^2 I) for each temperature, and of the
    reconstructions of `images`, against the grey test images; with a path, the digits of N(0, I) by confidence."""
    digits, generator = sample_digits(model, SCORED_DIGITS, EVAL_SEED), torch.Generator().manual_seed(EVAL_SEED)
    reconstructions = torch.cat([model(x, generator)[0] for x in images.split(EVAL_BATCH_SIZE)])
    (reference, _), (features, probabilities) = classify(classifier, test_images), classify(classifier, digits)
    if figure:
        plot_by_confidence(digits, probabilities, figure)
    return {"samples": image_score(features, probabilities, reference),
            "mixture": image_score(*classify(classifier, sample_digits(model, SCORED_DIGITS, EVAL_SEED, prior)),
                                   reference),
            "reconstructions": image_score(*classify(classifier, reconstructions), reference),
            **{f"temperature {tau:g}": image_score(*classify(classifier, sample_digits(
                model, SCORED_DIGITS, EVAL_SEED, temperature=tau)), reference) for tau in temperatures}}


def score_line(scores):
    """The score in one line, with the digit drawn least often: a model that neglects one shows it."""
    return "digit classifier's score: " + "; ".join(
        f"{what} Fréchet distance {s['frechet']:.2f}, {s['recognised']:.1%} recognised, fewest "
        f"{min(range(10), key=s['digits'].__getitem__)}s ({min(s['digits'])})"
        for what, s in (("digits of N(0, I)", scores["samples"]), ("of the mixture", scores["mixture"]),
                        ("reconstructions", scores["reconstructions"])))


def plot_by_confidence(digits, probabilities, path, n=50):
    """The n digits the classifier is least sure of beside the n it is surest of, with top class and probability."""
    confidence, digit = probabilities.max(dim=1)
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.3))
    order = confidence.argsort()
    for axis, chosen, which in zip(axes, (order[:n], order.flip(0)[:n]), ("least", "most")):
        show_grid(axis, digits[chosen], 10, f"the {n} {which} recognisable of {len(digits):,} generated digits", 10)
        for i, index in enumerate(chosen.tolist()):
            axis.text(30 * (i % 10) + 3, 30 * (i // 10) + 8, f"{digit[index]} {confidence[index]:.2f}", fontsize=6,
                      color="yellow")
    save_figure(figure, path)


def classifier_command(args):
    out = Path(args.out)
    check_out_dir(out.parent)
    (train_images, train_labels), (test_images, test_labels) = (load_mnist(args.data_dir, test_set, labels=True)
                                                                 for test_set in (False, True))
    start = time.perf_counter()
    classifier = train_classifier(train_images, train_labels, args.seed, args.architecture)
    reference, probabilities = classify(classifier, test_images)
    accuracy = (probabilities.argmax(dim=1) == test_labels).double().mean().item()
    scale = {name: image_score(*classify(classifier, images), reference) for name, images in (
        ("training images", train_images[:SCORED_DIGITS]),  # the floor: as many as the digits scored
        ("test images", test_images),  # the share recognised of the images themselves
        ("test images blurred, sigma 1", torchvision.transforms.functional.gaussian_blur(test_images, 7, 1.0)))}
    save_checkpoint(classifier.state_dict(), out)
    write_json({"test_accuracy": accuracy, "settings": {**CLASSIFIER_SETTINGS, "seed": args.seed,
                                                              "architecture": args.architecture},
                "reference_scores": scale, "seconds": time.perf_counter() - start,
                "machine": machine(torch.device("cpu"))}, out.with_suffix(".json"))
    print(f"test accuracy {accuracy:.2%}; written to {out} and {out.with_suffix('.json')}")


# ----------------------------------------- Everything beyond the report, for train and for the evaluate command

def beyond_the_report(model, measured, grey_test, split, kl, classifier, components, figure=None, explore_to=None,
                      temperatures=(), holes=False):
    """Part 2 on a split: the surgery of its KL `kl`, the mixture prior, the score (its figure to a path), with
    (labels, folder, checkpoint) the test images' latent space explored, with `holes` the priors' holes."""
    beyond = {"surgery": elbo_surgery(*encode_split(model, measured[split]), kl)}
    prior, beyond["mixture_fit"], train_codes = fit_prior(model, measured["train"], measured["val"], components)
    beyond["score"] = score(model, measured[split], grey_test, classifier, prior, figure, temperatures)
    if explore_to:
        beyond["exploration"] = explore(model, measured["test"], *explore_to)
    if holes:
        beyond["holes"] = prior_holes(*train_codes, prior)
    return beyond


def evaluate_command(args):
    device = resolve_device(args.device)
    model, config = load_model(args.checkpoint, device)
    classifier = load_classifier(args.classifier)
    json_path = output_path(args.json, args.checkpoint, "evaluation.json")
    check_out_dir(json_path.parent)
    measured, grey, _ = load_splits(args.data_dir, config, device)
    images = measured[args.split]
    losses = evaluate(model, images, config["kl_weight"])
    gaps = amortization_gaps(model, images, args.gaps) if args.gaps else None  # a bad --gaps refused before the rest
    beyond = beyond_the_report(model, measured, grey["test"], args.split, losses["kl"], classifier, args.components,
                               figure=json_path.with_name("digits_by_confidence.png"),
                               temperatures=args.temperatures, holes=args.holes)
    evaluation = {"checkpoint": str(args.checkpoint), "split": args.split, "images": len(images),
                  "binarize": config["binarize"], **losses, **beyond.pop("surgery"), "machine": machine(device)}
    line = (f"{args.split}: {len(images)}{' binarized' if config['binarize'] else ''} images, per image: "
            f"BCE {evaluation['bce']:.2f}, KL {evaluation['kl']:.2f}, total {evaluation['total']:.2f}")
    if args.iw_samples > 1:
        start, key = time.perf_counter(), "iw_nll" if config["binarize"] else "iw_bound"
        estimate = importance_weighted_nll(model, images, args.iw_samples).mean().item()
        evaluation.update({"iw_samples": args.iw_samples, key: estimate, "iw_meaning": IW_MEANING[key],
                           "iw_seconds": time.perf_counter() - start})
        line += f"; {estimate:.2f} with K={args.iw_samples}: {IW_MEANING[key].split(':')[0]}"
    if gaps:
        evaluation["gaps"] = gaps
    evaluation.update(beyond)
    write_json(evaluation, json_path)
    print(f"{line}\n{surgery_line(evaluation)}\n{score_line(evaluation['score'])}\nwritten to {json_path} and "
          f"digits_by_confidence.png beside it")


# ---------------------------------------- Comparing runs: one row per run, the mean of each variant, their digits

COMPARED = ("test_elbo", "test_bce", "test_kl", "test_mutual_information", "test_marginal_kl", "iw", "samples_frechet",
            "samples_recognised", "mixture_frechet", "mixture_recognised", "reconstructions_frechet", "active_units",
            "amortization_gap", "approximation_gap", "prior_holes", "mixture_holes", "best_epoch", "seconds_per_epoch")


def variant_name(config):
    """The train flags that built a run's model and data, or "report" for the report's own."""
    latent_dim, hidden_size = config["latent_dim"], config["hidden_size"]
    flags = {"--binarize": config["binarize"], f"--kl-weight {config['kl_weight']:g}": config["kl_weight"] != 1,
             "--conv-encoder": config["conv_encoder"], "--unidirectional": not config["bidirectional"],
             f"--hidden-size {hidden_size}": hidden_size != CONFIG["hidden_size"],
             f"--latent-dim {latent_dim}": config["encoder_fc"] and latent_dim != CONFIG["latent_dim"],
             "--no-encoder-fc": not config["encoder_fc"], "--no-decoder-fc": not config["decoder_fc"]}
    return " ".join(flag for flag, used in flags.items() if used) or "report"


def run_row(folder):
    """A run folder of train's as one flat row, with what evaluate wrote there (evaluation*.json, in name order)."""
    results, evaluation = read_json(folder / "results.json"), {}
    for path in sorted(folder.glob("evaluation*.json")):
        evaluation.update(read_json(path))
    return {"run": folder.name, "variant": variant_name({**CONFIG, **results["config"]}),
            "seed": results["config"]["seed"], "parameters": results["parameters"], "best_epoch": results["best_epoch"],
            "epochs_run": results["epochs_run"],
            **{f"{split}_{part}": results[split][part] for split in ("train", "val", "test")
               for part in ("bce", "kl", "total")},
            "test_elbo": results["test"]["bce"] + results["test"]["kl"],  # -ELBO at KL weight 1, whatever it trained at
            **{f"test_{part}": results["test"].get(part) for part in ("mutual_information", "marginal_kl")},
            "iw_samples": evaluation.get("iw_samples"), "iw": evaluation.get("iw_nll", evaluation.get("iw_bound")),
            "iw_is": "-log p(x)" if "iw_nll" in evaluation else "bound" if "iw_bound" in evaluation else None,
            "iw_seconds": evaluation.get("iw_seconds"),
            **{gap: evaluation.get("gaps", {}).get(gap) for gap in ("amortization_gap", "approximation_gap")},
            **{name: evaluation.get("holes", {}).get(name, {}).get("kl") for name in ("prior_holes", "mixture_holes")},
            **{f"{kind}_{name}": results.get("score", {}).get(kind, {}).get(name)
               for kind in ("samples", "mixture", "reconstructions") for name in ("frechet", "recognised")},
            "active_units": read_json(folder / "exploration.json")["active_units"],
            "seconds_per_epoch": results["seconds_per_epoch"],
            **{name: results["machine"].get(name) for name in ("device", "cpu", "threads", "torch", "cuda", "cudnn",
                                                                "precision")}}


def variant_table(rows):
    """Markdown: each variant's mean and standard deviation over its runs, and the devices they ran on."""
    variants = {}
    for row in rows:
        variants.setdefault(row["variant"], []).append(row)
    lines = [f"| variant | runs | {' | '.join(COMPARED)} | device |", "|---" * (len(COMPARED) + 3) + "|"]
    for variant, runs in variants.items():
        cells = []
        for name in COMPARED:
            if name == "iw" and len({run["iw_samples"] for run in runs if run["iw"] is not None}) > 1:
                cells.append("K differs")  # bounds of different K are not draws of one quantity
                continue
            values = torch.tensor([run[name] for run in runs if run[name] is not None], dtype=torch.float64)
            cells.append("" if not len(values) else f"{values.mean():.2f}" if len(values) == 1 else
                         f"{values.mean():.2f} ± {values.std():.2f}")
        devices = dict.fromkeys(f"{run['device']}, torch {run['torch']}" for run in runs)
        lines.append(f"| {variant} | {len(runs)} | {' | '.join(cells)} | {'; '.join(devices)} |")
    return "\n".join(lines)


def plot_variant_samples(folders, rows, path, data_dir=None, n=100):
    """What `generate --n n` draws from each variant's first run; with the data, `--prior mixture`'s below."""
    firsts = {}
    for folder, row in zip(folders, rows):
        firsts.setdefault(row["variant"], folder)
    priors = ("normal", "mixture") if data_dir else ("normal",)
    figure, axes = plt.subplots(len(priors), len(firsts), figsize=(3.2 * len(firsts), 3.5 * len(priors)),
                                squeeze=False)
    for column, (variant, folder) in zip(axes.T, firsts.items()):
        model, config = load_model(folder / "best_model.pt", "cpu")
        for axis, prior in zip(column, priors):
            mixture = mixture_prior(model, config, data_dir, MIXTURE_COMPONENTS) if prior == "mixture" else None
            show_grid(axis, sample_digits(model, n, 0, mixture), math.isqrt(n),
                      variant.replace(" --", "\n--") + ("\nmixture prior" if prior == "mixture" else ""), 9)
    save_figure(figure, path)


def plot_rate_distortion(rows, path):
    """Alemi et al.'s (2018) plane: each run's test BCE (distortion) against its KL (rate), lines of equal ELBO."""
    figure, axes = plt.subplots(figsize=(7, 5))
    for index, variant in enumerate(dict.fromkeys(row["variant"] for row in rows)):
        runs = [row for row in rows if row["variant"] == variant]
        axes.scatter([row["test_kl"] for row in runs], [row["test_bce"] for row in runs], s=60 if variant == "report"
                     else 25, marker="*" if variant == "report" else "o", color="k" if variant == "report" else
                     f"C{index}", label=f"{variant} ({len(runs)} run{'s' if len(runs) > 1 else ''})", zorder=3)
    rates = torch.tensor(axes.get_xlim())
    for elbo in range(80, 160, 10):
        axes.plot(rates, elbo - rates, color="grey", linewidth=0.5, linestyle=":")
    axes.set(xlim=rates.tolist(), ylim=axes.get_ylim(), xlabel="KL, the rate (nats per test image)",
             ylabel="BCE, the distortion (nats per test image)",
             title="Rate against distortion; dotted: equal ELBO, every 10 nats")
    axes.legend(fontsize=8)
    save_figure(figure, path)


def compare_command(args):
    for path in filter(None, (args.figure, args.rate_distortion)):
        figure_format(path)
    for path in filter(None, (args.csv, args.figure, args.rate_distortion)):
        check_out_dir(Path(path).parent)
    if missing := [folder for folder in args.runs if not Path(folder).is_dir()]:
        raise UserError(f"no run folder at {missing[0]}")
    folders = [Path(folder) for folder in args.runs if Path(folder, "results.json").exists()]
    if not folders:
        raise UserError("none of the folders holds a finished run (a results.json)")
    for skipped in sorted(set(map(Path, args.runs)) - set(folders)):
        print(f"note: {skipped} holds no finished run (no results.json): skipped", file=sys.stderr)
    rows = [run_row(folder) for folder in folders]
    if args.csv:
        write_csv(rows, args.csv)
    if args.figure:
        plot_variant_samples(folders, rows, args.figure, args.data_dir)
    if args.rate_distortion:
        plot_rate_distortion(rows, args.rate_distortion)
    print(variant_table(rows))


# ==============================================================================================================
# Part 3. Running safely, and the command line: files, errors, signals, devices. Nothing here changes a number.
# ==============================================================================================================

MNIST_FILES = [f"{kind}-{part}-ubyte" for kind in ("train", "t10k") for part in ("images-idx3", "labels-idx1")]
CUDA_PRECISION = "float32, TF32 off, deterministic algorithms"  # how --device cuda computes (resolve_device)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode; read when CUDA starts
try:
    import fcntl  # POSIX: one train per run folder at a time
except ImportError:  # Windows has no flock: there two runs into one folder are not prevented (README)
    fcntl = None


class UserError(Exception):
    """A problem the user can fix (a path, a number, a file): one line on stderr, exit status 2."""


class WriteError(UserError):
    """The system refused to store a file (a full disk, a read-only file system): exit status 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, how schedulers stop a job, raised where the program is, as Ctrl-C raises KeyboardInterrupt."""


def raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM cannot cut the way out short
    raise Terminated


def gist(error):
    """The first sentence of a library's message that says something (not a heading that ends in ':')."""
    lines = [line for line in map(str.strip, str(error).splitlines()) if line and not line.endswith(":")]
    return (lines or [type(error).__name__])[0].split(". ")[0]


# ------------------------------------------------------------------------ Files: each written whole or not at all

PUBLISHED = Path(__file__).resolve().parent / "docs" / "runs"  # the runs behind the published tables, with models
PUBLISHED_MODEL = PUBLISHED / "design-report-seed0" / "best_model.pt"  # the README's first check


BESIDE = "beside the checkpoint, or in runs/published/NAME for a published model"  # where output_path writes


def output_path(given, checkpoint, name=""):
    """--out or --json as given, else `name` BESIDE: generate, evaluate and explore leave the published files as
    they were measured."""
    if given:
        return Path(given)
    folder = Path(checkpoint).parent
    return (Path("runs", "published", folder.name) if folder.resolve().parent == PUBLISHED else folder) / name


def write_atomically(path, write):
    """write(file) into memory, then into a temporary file beside `path`, renamed over it: a kill at any moment
    leaves the old file or the new, with open()'s mode under the umask; a full disk leaves no temporary file."""
    buffer = io.BytesIO()
    write(buffer)  # in memory first, so that a full disk fails in plain file I/O, not inside torch.save
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(buffer.getbuffer())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise WriteError(f"cannot write {path}: {error.strerror or error}") from None
        raise


def write_json(data, path):
    write_atomically(path, lambda file: file.write((json.dumps(data, indent=2) + "\n").encode()))


def write_csv(rows, path):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, lambda file: file.write(text.getvalue().encode()))


def save_checkpoint(checkpoint, path):
    write_atomically(path, lambda file: torch.save(checkpoint, file))


def save_grid(images, path, nrow):
    name = picture_format(path)
    write_atomically(path, lambda file: torchvision.utils.save_image(images, file, nrow=nrow, format=name, padding=2,
                                                                      pad_value=0.5))


def show_grid(axis, images, nrow, title, fontsize):
    """Digits drawn on a matplotlib axis as torchvision's grid, as save_grid writes them."""
    axis.imshow(torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=0.5).permute(1, 2, 0).numpy())
    axis.set_title(title, fontsize=fontsize)
    axis.axis("off")


def save_figure(figure, path):
    figure.tight_layout()
    write_atomically(path, lambda file: figure.savefig(file, format=figure_format(path), dpi=100))
    plt.close(figure)


def picture_format(path):
    """The PIL format a picture's suffix names; one that PIL cannot write the digits in is the user's error."""
    name = Image.registered_extensions().get(Path(path).suffix.lower())
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=name)  # some formats take only other modes
    except (KeyError, ValueError, OSError):
        raise UserError(f"cannot write a picture named {path}: its suffix names no format that PIL can write "
                        f"the digits in (use .png, .jpg, .webp, .tiff, .bmp, .gif or .pdf)") from None
    return name


def figure_format(path):
    """The matplotlib format a plot's suffix names; one it cannot write is the user's error."""
    name = Path(path).suffix[1:].lower()
    if name not in FigureCanvasAgg.get_supported_filetypes():
        raise UserError(f"cannot write a figure named {path}: matplotlib writes no format of that suffix "
                        f"(use .png, .pdf, .svg or .jpg)")
    return name


def read_checkpoint(path):
    """torch.load with weights_only=True: a pickle that carries code is refused, never run."""
    try:
        with warnings.catch_warnings():  # a refused file is reported below, in one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # not a pickle, or one that carries code
        raise UserError(f"cannot read the checkpoint {path}: torch.load(weights_only=True) refused it, as it holds "
                        f"more than tensors and plain data (nothing in it was run)") from None
    except Exception as error:  # truncated, or not a torch file at all
        raise UserError(f"cannot read the checkpoint {path}: it is not a whole file written by torch.save "
                        f"({gist(error)})") from None


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {getattr(error, 'strerror', None) or gist(error)}") from None


def check_out_dir(folder):
    """Fail before any work, not after 50 epochs: the folder must be writable."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UserError(f"cannot write to {folder}: {error.strerror}") from None


# --------------------------------------------------------------------------------------- Run folders and resuming

@contextlib.contextmanager
def claim_run_folder(folder, resume):
    """Hold `folder` for one train at a time (a flock, dropped when the process ends, even by SIGKILL); a new run
    never overwrites a run, nor a best_model.pt from elsewhere; --resume needs a last.pt."""
    check_out_dir(folder)
    lock = os.open(folder, os.O_RDONLY) if fcntl else None
    try:
        if fcntl:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{folder} is in use by another train that is still running; wait for it to end, "
                                f"or choose another --out") from None
        last, best = folder / "last.pt", folder / "best_model.pt"
        if resume and not last.is_file():
            raise UserError(f"--resume: no checkpoint at {last}, so no run to continue in {folder}; "
                            f"start one without --resume")
        if not resume and last.exists():
            raise UserError(f"{folder} already holds a run; continue it with --resume, or choose another --out")
        if not resume and best.exists():
            raise UserError(f"{folder} holds a best_model.pt but no last.pt to resume from (a run stopped before its "
                            f"first epoch was saved whole, or another program's model); move it away, or choose "
                            f"another --out")
        yield
    finally:
        if lock is not None:
            os.close(lock)


def resumable_state(config, out):
    """last.pt of the run that --resume continues, read before any data; refused if it was trained with other
    settings, or for more epochs than --epochs (a larger --epochs trains the extra epochs)."""
    state = read_checkpoint(out / "last.pt")
    if not isinstance(state, dict) or "config" not in state:
        raise UserError(f"{out / 'last.pt'} is not a run's last.pt")
    there = {**CONFIG, **state["config"]}  # a setting added since that run was trained has its default there
    changed = [f"{name} {there[name]} there, {value} here"
               for name, value in config.items() if name != "epochs" and there[name] != value]
    if changed:
        raise UserError(f"--resume: {out} was trained with other settings ({'; '.join(changed)})")
    if state["epoch"] > config["epochs"]:
        raise UserError(f"--resume: {out} has trained {state['epoch']} epochs already, more than --epochs "
                        f"{config['epochs']}")
    return state


def left_behind(args, argv, go_on="resume with"):
    """What a stopped command leaves on disk, and how to go on."""
    if args.command != "train":
        return "nothing was written" if args.command in ("generate", "classifier") else "no file is half-written"
    last = Path(args.out) / "last.pt"
    if not last.is_file():  # without --resume, a best_model.pt here is this run's (claim_run_folder)
        best = last.parent / "best_model.pt"
        leftover = f" once {best}, left from that epoch, is removed" if best.is_file() and not args.resume else ""
        return f"no epoch was saved whole, so there is nothing to resume; start again{leftover}"
    resume = " ".join(["python vae_lstm.py", *argv, *([] if args.resume else ["--resume"])])
    return (f"{last} holds epoch {read_checkpoint(last)['epoch']} and {last.parent / 'best_model.pt'} the best so "
            f"far, both intact; {go_on}: {resume}")


# ------------------------------------------------------------------------------------------- Devices and machines

def resolve_device(name):
    """The device of --device; CUDA set to compute in float32 (cuDNN would use TF32) and deterministically."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(device for device, ok in available.items() if ok)
    if not available[name]:
        raise UserError(f"--device {name}: no {name.upper()} device is available here (try --device cpu)")
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True)
    return torch.device(name)


def machine(device):
    """Where the numbers come from: the same seed gives other numbers on another device or torch build."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    cpu = names[0] if names else platform.processor() or platform.machine()
    where = {"device": cpu, "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512
             "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        where.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                     cudnn=torch.backends.cudnn.version(), precision=CUDA_PRECISION)
    elif device.type == "mps":
        where.update(device=f"Apple MPS ({platform.machine()})", precision="float32")
    return where


def graphed_step(model, optimizer, x, kl_weight):
    """train_step as one CUDA graph, replayed for each batch of x's shape (a short last batch eagerly), captured
    after warm-up steps whose changes are then undone; where capture fails, train_step."""
    weights = [parameter.detach().clone() for parameter in model.parameters()]
    moments = {key: {name: value.clone() for name, value in state.items()} for key, state in optimizer.state.items()}
    random_state = torch.cuda.get_rng_state()
    try:
        torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()):  # the warm-up off the default stream, as capture needs
            for _ in range(3):
                train_step(model, optimizer, x, kl_weight)
        torch.cuda.synchronize()
        graph, optimizer.param_groups[0]["capturable"] = torch.cuda.CUDAGraph(), True  # fused Adam ignores it
        with torch.cuda.graph(graph):
            outputs = train_step(model, optimizer, x, kl_weight)
    except Exception as error:  # an old driver, a library that cannot be captured: slower, the same numbers
        print(f"note: no CUDA graph of the training step ({gist(error)}); it runs eagerly", flush=True)
        return train_step
    finally:
        optimizer.param_groups[0]["capturable"] = False  # as last.pt stores it: a resumed run may go on on a CPU
        with torch.no_grad():
            for parameter, weight in zip(model.parameters(), weights):
                parameter.copy_(weight)
            for key, state in optimizer.state.items():  # a fresh run's Adam state was zeros
                for name, value in state.items():
                    value.copy_(moments[key][name]) if key in moments else value.zero_()
        torch.cuda.set_rng_state(random_state)

    def replay(model, optimizer, batch, kl_weight):
        if batch.shape != x.shape:
            return train_step(model, optimizer, batch, kl_weight)
        x.copy_(batch)
        graph.replay()
        return tuple(output.clone() for output in outputs)  # the next replay overwrites them
    return replay


def rng_states(device):
    """The random states that a resumed run needs: the CPU's (batch order) and the training device's (noise)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type != "cpu":
        states[device.type] = getattr(torch, device.type).get_rng_state()  # torch.cuda's or torch.mps's
    return states


def restore_rng_states(states, device):
    torch.set_rng_state(states["cpu"])
    trained_on = next((kind for kind in states if kind != "cpu"), "cpu")
    if trained_on == device.type != "cpu":
        getattr(torch, device.type).set_rng_state(states[device.type])
    elif trained_on != device.type:
        print(f"note: this run was trained on {trained_on.upper()} and goes on on {device.type.upper()}, which draws "
              f"other random numbers: its results will differ from an uninterrupted run's", flush=True)


# ----------------------------------------------------------------------------------------------- The command line

def number(kind, is_valid, requirement):
    """An argparse type: `kind` parsed from the text, then checked."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and is_valid(value)):
            raise argparse.ArgumentTypeError(f"{text} is not {requirement}")
        return value
    return parse


POSITIVE_INT = number(int, lambda v: v >= 1, "a positive integer")
NATURAL = number(int, lambda v: v >= 0, "a non-negative integer")
SEED = number(int, lambda v: 0 <= v < 2**32, "a seed in [0, 2**32)")
POSITIVE = number(float, lambda v: v > 0, "a positive number")
NON_NEGATIVE = number(float, lambda v: v >= 0, "a non-negative number")
FRACTION = number(float, lambda v: 0 < v < 1, "a fraction strictly between 0 and 1")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error told in one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, but for switches and flags whose help says it."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.nargs == 0 else super()._get_help_string(action)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name, help):
        return commands.add_parser(name, help=help, formatter_class=HelpWithDefaults)

    train_parser = add("train", "train on MNIST, keep the best model, test it")
    for flag, kind, help in (
            ("--epochs", POSITIVE_INT, "at most this many epochs"),
            ("--patience", POSITIVE_INT, "stop after this many epochs without a better validation total"),
            ("--batch-size", POSITIVE_INT, "training images per Adam step"),
            ("--lr", POSITIVE, "Adam's learning rate"),
            ("--val-fraction", FRACTION, "share of the 60,000 held out for validation"),
            ("--split-seed", SEED, "NumPy seed of the train/validation split"),
            ("--seed", SEED, "torch seed: initial weights, batch order, noise"),
            ("--kl-weight", NON_NEGATIVE, "weight of the KL term (the report's 1 + gamma)")):
        train_parser.add_argument(flag, type=kind, default=CONFIG[flag[2:].replace("-", "_")], help=help)
    train_parser.add_argument("--binarize", action="store_true", help="binary pixels as in the VAE papers: drawn "
                              "afresh each time a training image is used, once (fixed seed) for validation and test")
    design = train_parser.add_argument_group("the report's design choices (section 1), to test them")
    design.add_argument("--unidirectional", dest="bidirectional", action="store_false",
                        help="a forward-only LSTM (its code's bidirect=False)")
    design.add_argument("--hidden-size", type=POSITIVE_INT, default=CONFIG["hidden_size"],
                        help="the LSTM's units per direction (its code's zdim)")
    design.add_argument("--latent-dim", type=POSITIVE_INT,
                        help=f"size of z (its code's encoder_fc_out_size; default {CONFIG['latent_dim']}, or the "
                             f"hidden size with --no-encoder-fc)")
    design.add_argument("--no-encoder-fc", dest="encoder_fc", action="store_false",
                        help="the report's first encoder: mu and log sigma^2 are the two directions' final states")
    design.add_argument("--no-decoder-fc", dest="decoder_fc", action="store_false",
                        help="the report's first decoder: z enters the first transposed convolution directly")
    design.add_argument("--conv-encoder", action="store_true", help="the decoder's four convolutions mirrored as "
                        "encoder, in place of the LSTM (the report's proposed remedy, section 4)")
    train_parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                              help="on CUDA, launch the training step's kernels one by one, not as one CUDA graph: "
                                   "the same numbers, several times slower")
    train_parser.add_argument("--resume", action="store_true",
                              help="continue the run in --out, with the same settings; a larger --epochs trains more")
    train_parser.add_argument("--out", default="runs/lstm_vae", help="folder for the checkpoints, logs and figures")

    generate_parser = add("generate", "decode z ~ N(0, I), or a mixture fitted to the codes, into a grid of digits")
    generate_parser.add_argument("--n", type=POSITIVE_INT, default=100, help="number of digits")
    generate_parser.add_argument("--nrow", type=POSITIVE_INT, default=10, help="digits per row of the grid")
    generate_parser.add_argument("--seed", type=SEED, default=0, help="seed of the z draws")
    generate_parser.add_argument("--prior", choices=["normal", "mixture"], default="normal", help="z from the "
                                 "report's N(0, I), or from a Gaussian mixture fitted to the training split's codes")
    generate_parser.add_argument("--out", help=f"picture to write, in the format its suffix names (.png, .jpg, ...; "
                                               f"default: generated.png, or generated_mixture.png, {BESIDE})")

    evaluate_parser = add("evaluate", "per-image losses of a split, and an importance-weighted bound")
    evaluate_parser.add_argument("--split", choices=["train", "val", "test"], default="test", help="which images")
    evaluate_parser.add_argument("--iw-samples", type=NATURAL, default=0, help="K > 1 adds the importance-weighted "
                                 "estimate, K samples an image: -log p(x) with --binarize, else a bound (README)")
    evaluate_parser.add_argument("--gaps", type=POSITIVE_INT, help="the amortization and approximation gaps on this "
                                 "many images of the split (Cremer et al., 2018)")
    evaluate_parser.add_argument("--holes", action="store_true", help="KL(N(0, I) || q(z)) and KL(mixture || q(z)): "
                                 "where each prior puts mass and no training code lives")
    evaluate_parser.add_argument("--temperatures", type=POSITIVE, nargs="+", default=(), metavar="TAU",
                                 help="also score the digits of z ~ N(0, TAU^2 I)")
    evaluate_parser.add_argument("--json", help=f"JSON to write (default: evaluation.json {BESIDE})")

    explore_parser = add("explore", "the latent space on the test set: interpolation, map by digit, active units")
    explore_parser.add_argument("--out", help=f"folder for its four files (default: {BESIDE})")

    classifier_parser = add("classifier", "train the digit classifier that scores a model's digits (shipped: "
                                          "docs/classifier.pt)")
    classifier_parser.add_argument("--seed", type=SEED, default=0, help="torch seed: initial weights, batch order")
    classifier_parser.add_argument("--architecture", choices=["cnn", "mlp"], default="cnn", help="the shipped "
                                   "LeNet-style CNN, or an MLP (shipped: docs/classifier_mlp.pt) for a second opinion")
    classifier_parser.add_argument("--out", default="runs/classifier/classifier.pt", help="the classifier to write, "
                                   "and beside it its JSON: test accuracy, settings, reference scores")

    compare_parser = add("compare", "runs side by side: a CSV row each, each variant's mean, their digits")
    compare_parser.add_argument("runs", nargs="+", help="run folders written by train (and evaluate)")
    compare_parser.add_argument("--csv", help="CSV to write, one row per run")
    compare_parser.add_argument("--figure", help="figure to write: 100 digits of each variant's first run (.png, ...), "
                                "and with --data-dir those of the mixture fitted to its training codes below them")
    compare_parser.add_argument("--rate-distortion", help="figure to write: each run's test BCE against its KL")
    compare_parser.add_argument("--data-dir", help="folder holding MNIST/raw/, for --figure's mixture digits")

    for command in (generate_parser, evaluate_parser, explore_parser):
        command.add_argument("--checkpoint", default="runs/lstm_vae/best_model.pt",
                             help="model to load (the published ones: docs/runs/NAME/best_model.pt)")
    for command in (train_parser, evaluate_parser):
        command.add_argument("--classifier", default=os.path.relpath(CLASSIFIER), help="the digit classifier that "
                             "scores the model's digits (made by the classifier command)")
    for command in (generate_parser, evaluate_parser):
        command.add_argument("--components", type=POSITIVE_INT, default=MIXTURE_COMPONENTS,
                             help="Gaussians of the mixture fitted to the codes (generate --prior mixture)")
    for command in (train_parser, generate_parser, evaluate_parser, explore_parser, classifier_parser):
        command.add_argument("--data-dir", default="data", help="folder holding MNIST/raw/ (downloaded if absent)")
    for command in (train_parser, generate_parser, evaluate_parser, explore_parser):
        command.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                             help="auto takes CUDA or MPS when there is one")
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.latent_dim is None:
            args.latent_dim = CONFIG["latent_dim"] if args.encoder_fc else args.hidden_size
        if impossible := design_error(config_of(args)):
            train_parser.error(impossible)
    return args


def config_of(args):
    """A train command's config: its flags under CONFIG's names."""
    return {name: getattr(args, name) for name in CONFIG}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    commands = {"train": train, "generate": generate, "evaluate": evaluate_command, "explore": explore_command,
                "classifier": classifier_command, "compare": compare_command}
    try:
        commands[args.command](args)
    except WriteError as error:
        print(f"error: {error}; {left_behind(args, argv, 'once that is fixed, resume with')}", file=sys.stderr)
        return 1
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM raised as Terminated
        terminated = isinstance(stop, Terminated)
        print(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}; {left_behind(args, argv)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, raise_terminated)
    sys.exit(main())
