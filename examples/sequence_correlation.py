"""Correlation losses for sequence labelling when each sequence's targets carry their own offset and scale.

The situation (continuous annotation, e.g. the arousal of a video clip rated over time): every sequence is
rated by one of several raters, and each rater uses the scale in their own way, some higher, some lower, some
compressed, some stretched. The rater is not known to the model, so no model can predict a sequence's level
or range; what it can predict is how the rating moves over time, and that is what such tasks are scored on
(per-sequence Pearson r or CCC). A masked MSE spends its effort on the unpredictable levels and scales; the
correlation losses ignore them by construction (Pearson) or in part (CCC).

Data: a documented generator (no bundled data set has enough independent sequences; a single long series cut
into windows gives overlapping or very few held-out windows), fixed by the seed:
  signal   s_t, per sequence an AR(2) process s_t = 2 r cos(2 pi / P) s_{t-1} - r^2 s_{t-2} + e_t with r = 0.95
           and a period P drawn in [8, 24] steps (a quasi-periodic curve), scaled to unit variance;
  inputs   6 sensor channels, x_t = M [s_t, s_{t-1}, s_{t-2}] + 0.5 noise, with one random 6x3 mixing matrix
           M per seed (the model must undo the mixing and the delays);
  targets  y_t = a_k + b_k s_t + 0.3 noise, where sequence i is rated by rater k drawn from 8 raters with
           offsets a_k ~ N(0, 2^2) and scales b_k = exp(U(-ln 4, ln 4)) ("biased raters"), or a_k = 0,
           b_k = 1 for every sequence ("unbiased raters", the control where MSE should do as well);
  lengths  32 to 64 steps, batches padded to 64 with a bool mask of the valid steps.
Training uses 64 sequences, evaluation 256 other sequences drawn independently (nothing overlaps).

The same small temporal CNN (two 5-step convolutions) is trained with the same seed and schedule with a masked
MSE, `PearsonCorrelationLoss` and `ConcordanceCorrelationLoss`. Reported on the held-out sequences, mean ±
sample standard deviation over --seeds seeds (each seed draws new data, raters, initialisation and batches):
the mean per-sequence Pearson r and CCC, and the RMSE over all valid steps. The results table is printed;
one plot, `sequence_correlation.png`, is saved in --out.

    python examples/sequence_correlation.py [--seeds 5] [--steps 300] [--out examples/output]
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fused_losses

CHANNELS = 6
MAX_LENGTH = 64
RATERS = 8
TRAINING_SEQUENCES = 64
HELD_OUT_SEQUENCES = 256
# regime -> (standard deviation of the raters' offsets, largest factor by which a rater stretches or shrinks)
REGIMES = {
    "biased raters": (2.0, 4.0),
    "unbiased raters": (0.0, 1.0),
}
LOSSES = ("MSE", "Pearson", "CCC")
METRICS = ("pearson", "ccc", "rmse")
DEFAULT_OUT = Path(__file__).resolve().parent / "output"


def ar2_signals(rng, count, steps):
    """(count, steps) quasi-periodic AR(2) signals with unit variance; 32 warm-up steps are discarded."""
    warm_up = 32
    period = rng.uniform(8, 24, size=count)
    radius = 0.95
    a1, a2 = 2 * radius * np.cos(2 * np.pi / period), -radius ** 2
    s = np.zeros((count, warm_up + steps))
    shocks = rng.normal(size=s.shape)
    for t in range(2, s.shape[1]):
        s[:, t] = a1 * s[:, t - 1] + a2 * s[:, t - 2] + shocks[:, t]
    s = s[:, warm_up:]
    return s / s.std(axis=1, keepdims=True)


def make_sequences(rng, count, mixing, offsets, scales):
    """Inputs (count, T, CHANNELS), targets (count, T) and mask (count, T), padding zeroed."""
    s = ar2_signals(rng, count, MAX_LENGTH + 2)
    delayed = np.stack([s[:, 2:], s[:, 1:-1], s[:, :-2]], axis=-1)  # s_t, s_{t-1}, s_{t-2}
    signal = s[:, 2:]
    x = delayed @ mixing.T + 0.5 * rng.normal(size=(count, MAX_LENGTH, CHANNELS))
    rater = rng.integers(RATERS, size=count)
    y = offsets[rater, None] + scales[rater, None] * signal + 0.3 * rng.normal(size=signal.shape)
    lengths = rng.integers(MAX_LENGTH // 2, MAX_LENGTH + 1, size=count)
    mask = np.arange(MAX_LENGTH)[None, :] < lengths[:, None]
    return (torch.tensor(x * mask[..., None], dtype=torch.float32), torch.tensor(y * mask, dtype=torch.float32),
            torch.from_numpy(mask))


def make_data(regime, seed):
    """Training and held-out (inputs, targets, mask), drawn independently from one seed's generator."""
    offset_sd, largest_scale = REGIMES[regime]
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(CHANNELS, 3))
    offsets = rng.normal(scale=offset_sd, size=RATERS)
    scales = np.exp(rng.uniform(-np.log(largest_scale), np.log(largest_scale), size=RATERS))
    return (make_sequences(rng, TRAINING_SEQUENCES, mixing, offsets, scales),
            make_sequences(rng, HELD_OUT_SEQUENCES, mixing, offsets, scales))


class TemporalCNN(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(CHANNELS, hidden, 5, padding=2), nn.ReLU(),
                                 nn.Conv1d(hidden, hidden, 5, padding=2), nn.ReLU(), nn.Conv1d(hidden, 1, 1))

    def forward(self, x):  # (B, T, CHANNELS) -> (B, T)
        return self.net(x.transpose(1, 2)).squeeze(1)


def masked_mse(pred, true, mask):
    return ((pred - true) ** 2 * mask).sum() / mask.sum()


def make_criterion(loss):
    """loss(pred, true, mask) for each training loss."""
    if loss == "MSE":
        return masked_mse
    module = fused_losses.PearsonCorrelationLoss() if loss == "Pearson" else fused_losses.ConcordanceCorrelationLoss()
    return lambda pred, true, mask: module(pred, true, mask=mask)


def train(loss, data, steps, seed, device):
    torch.manual_seed(seed)
    model = TemporalCNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    criterion = make_criterion(loss)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(TRAINING_SEQUENCES, (32,), generator=generator)
        x, y, mask = (t[batch].to(device) for t in data)
        value = criterion(model(x), y, mask)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    return model


def evaluate(model, data, device):
    x, y, mask = (t.to(device) for t in data)
    with torch.no_grad():
        pred = model(x)
    # eps = 0: the plain Pearson r and CCC of each sequence (no held-out sequence is flat).
    r = 1 - fused_losses.pearson_correlation_loss(pred, y, mask=mask, reduction="none", eps=0.0)
    ccc = 1 - fused_losses.concordance_correlation_loss(pred, y, mask=mask, reduction="none", eps=0.0)
    return {"pearson": r.mean().item(), "ccc": ccc.mean().item(), "rmse": masked_mse(pred, y, mask).sqrt().item(),
            "pred": pred.cpu()}


def run_regime(regime, seeds, steps, device):
    """loss -> metric -> [value per seed], and the first seed's held-out data and predictions (to plot)."""
    results = {loss: {metric: [] for metric in METRICS} for loss in LOSSES}
    first_seed = {}
    for seed in range(seeds):
        training, held_out = make_data(regime, seed)
        for loss in LOSSES:
            measured = evaluate(train(loss, training, steps, seed, device), held_out, device)
            for metric in METRICS:
                results[loss][metric].append(measured[metric])
            if seed == 0:
                first_seed[loss] = measured["pred"]
        if seed == 0:
            first_seed["data"] = held_out
        print(f"  [{regime}] seed {seed} done", flush=True)
    return results, first_seed


def mean_and_spread(values):
    """Mean and sample standard deviation (0 for a single value)."""
    spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), spread


def gain_over_mse(results, loss):
    """Per seed: the held-out Pearson r of the `loss`-trained model minus the MSE-trained one's (same data)."""
    return np.subtract(results[loss]["pearson"], results["MSE"]["pearson"])


def results_table(all_results, seeds) -> str:
    lines = [f"held-out sequences, mean ± std over {seeds} seeds; the last column pairs each seed with the "
             "MSE-trained model of the same seed:", "",
             "| targets | trained with | Pearson r | CCC | RMSE | r minus MSE-trained r (seeds where higher) |",
             "|---|---|---|---|---|---|"]
    for regime, results in all_results.items():
        for loss, measured in results.items():
            cells = [f"{mean:.3f} ± {spread:.3f}" for mean, spread in map(mean_and_spread, measured.values())]
            gain = gain_over_mse(results, loss)
            cells.append("" if loss == "MSE" else f"{gain.mean():+.3f} ({(gain > 0).sum()}/{seeds})")
            lines.append(f"| {regime} | {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(all_results, example, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    regimes = list(all_results)
    # Pearson r paired with the MSE-trained model of the same seed (the seeds differ more than the losses do).
    gain_losses = [loss for loss in LOSSES if loss != "MSE"]
    width = 0.8 / len(gain_losses)
    for k, loss in enumerate(gain_losses):
        positions = np.arange(len(regimes)) + (k - (len(gain_losses) - 1) / 2) * width
        gains = [gain_over_mse(all_results[regime], loss) for regime in regimes]
        axes[0].bar(positions, [g.mean() for g in gains], width, yerr=[mean_and_spread(g)[1] for g in gains],
                    capsize=3, color=f"C{LOSSES.index(loss)}", alpha=0.75, label=f"trained with {loss}")
        for position, values in zip(positions, gains):
            axes[0].plot([position] * len(values), values, "k.", markersize=3)
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set_title("Pearson r minus the MSE-trained model's (same seed)")
    titles = {"ccc": "CCC (higher is better)", "rmse": "RMSE (lower is better)"}
    width = 0.8 / len(LOSSES)
    for ax, metric in zip(axes[1:], titles):
        for k, loss in enumerate(LOSSES):
            positions = np.arange(len(regimes)) + (k - (len(LOSSES) - 1) / 2) * width
            per_seed = [all_results[regime][loss][metric] for regime in regimes]
            ax.bar(positions, [np.mean(v) for v in per_seed], width, label=f"trained with {loss}",
                   yerr=[mean_and_spread(v)[1] for v in per_seed], capsize=3, color=f"C{k}", alpha=0.75)
            for position, values in zip(positions, per_seed):
                ax.plot([position] * len(values), values, "k.", markersize=3)
        ax.set_title(titles[metric])
    for ax in axes[:3]:
        ax.set_xticks(range(len(regimes)))
        ax.set_xticklabels(regimes)
    axes[1].legend(fontsize=8)
    _, y, mask = example["data"]
    length = int(mask[0].sum())
    axes[3].plot(y[0, :length], "k-", lw=2, label="rating (biased rater)")
    for k, loss in enumerate(LOSSES):
        axes[3].plot(example[loss][0, :length], color=f"C{k}", lw=1.2, label=f"trained with {loss}")
    axes[3].set_title("one held-out sequence, biased raters, seed 0")
    axes[3].set_xlabel("step")
    axes[3].legend(fontsize=7)
    fig.suptitle("Held-out sequences: bars = mean over seeds, error bars = std, dots = seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300, help="training steps (batches of 32 sequences)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (created if missing)")
    args = parser.parse_args(argv)

    all_results, first_seeds = {}, {}
    for regime in REGIMES:
        all_results[regime], first_seeds[regime] = run_regime(regime, args.seeds, args.steps, args.device)
    print(f"\n{results_table(all_results, args.seeds)}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(all_results, first_seeds["biased raters"], args.out / "sequence_correlation.png")
    return all_results


if __name__ == "__main__":
    torch.set_num_threads(1)  # the model is tiny: splitting its ops over threads costs more than it saves
    main()
