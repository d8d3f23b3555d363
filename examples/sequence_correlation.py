"""Correlation losses for sequence labelling on a real time series (statsmodels' bundled US macro data).

Task: for each quarter of a window of quarters, predict the growth of real personal consumption from the same
quarter's other indicators (growth of real GDP, investment, government spending and disposable income,
inflation, interest rate, change in unemployment). Windows of 12 to 40 quarters are cut at random places;
batches are padded to the longest window and carry a bool mask of the valid quarters. The first 70% of the
quarters give the training windows, the last 30% the held-out windows (no overlap).

A small GRU is trained three times with the same seed: with a masked MSE, with `PearsonCorrelationLoss` and with
`ConcordanceCorrelationLoss`. The script reports, on held-out windows, the mean per-window Pearson r and CCC
between prediction and truth (the metrics a correlation-judged task is scored with) and the MSE, and plots
predictions against the truth for a few held-out windows.

Note what the losses optimise: Pearson is blind to offset and scale (its predictions can sit far from the
truth while moving with it: compare their MSE); CCC asks for agreement in level and scale too.

    python examples/sequence_correlation.py [--steps 150] [--out sequence_correlation.png]
"""

import argparse

import numpy as np
import statsmodels.api as sm
import torch
from torch import nn

import fused_losses

FEATURES = ["realgdp", "realinv", "realgovt", "realdpi", "cpi"]  # taken as quarterly growth rates
LEVELS = ["infl", "tbilrate"]  # used as they are
TARGET = "realcons"


def load_series():
    data = sm.datasets.macrodata.load_pandas().data
    growth = lambda column: np.diff(np.log(data[column].to_numpy())) * 100  # noqa: E731  percent per quarter
    inputs = [growth(c) for c in FEATURES] + [data[c].to_numpy()[1:] for c in LEVELS]
    inputs.append(np.diff(data["unemp"].to_numpy()))
    x = np.stack(inputs, axis=1).astype(np.float32)
    y = growth(TARGET).astype(np.float32)
    split = int(0.7 * len(y))
    mean, std = x[:split].mean(0), x[:split].std(0)  # normalise with training statistics only
    return (x - mean) / std, y, split


def sample_windows(x, y, start, stop, count, rng):
    """`count` windows of 12-40 quarters inside [start, stop), padded, with their masks."""
    lengths = rng.integers(12, 41, size=count).clip(max=stop - start)
    firsts = [rng.integers(start, stop - n + 1) for n in lengths]
    T = int(lengths.max())
    xb = np.zeros((count, T, x.shape[1]), np.float32)
    yb = np.zeros((count, T), np.float32)
    mask = np.zeros((count, T), bool)
    for i, (first, n) in enumerate(zip(firsts, lengths)):
        xb[i, :n], yb[i, :n], mask[i, :n] = x[first:first + n], y[first:first + n], True
    return torch.from_numpy(xb), torch.from_numpy(yb), torch.from_numpy(mask)


class Labeller(nn.Module):
    def __init__(self, features, hidden=32):
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 1)

    def forward(self, x):
        return self.head(self.gru(x)[0]).squeeze(-1)  # (B, T)


def masked_mse(pred, true, mask):
    return ((pred - true) ** 2 * mask).sum() / mask.sum()


def train(loss_name, x, y, split, steps, seed, device):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Labeller(x.shape[1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = {
        "MSE": masked_mse,
        "Pearson": fused_losses.PearsonCorrelationLoss(),
        "CCC": fused_losses.ConcordanceCorrelationLoss(),
    }
    criterion = losses[loss_name]
    for step in range(1, steps + 1):
        xb, yb, mask = (t.to(device) for t in sample_windows(x, y, 0, split, 32, rng))
        pred = model(xb)
        loss = criterion(pred, yb, mask) if loss_name == "MSE" else criterion(pred, yb, mask=mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 4) == 0 or step == steps:
            print(f"  [{loss_name}] step {step:4d}/{steps}: loss {loss.item():.4f}", flush=True)
    return model


def evaluate(model, windows, device):
    xb, yb, mask = (t.to(device) for t in windows)
    with torch.no_grad():
        pred = model(xb)
    r = 1 - fused_losses.pearson_correlation_loss(pred, yb, mask=mask, reduction="none", eps=0.0)
    ccc = 1 - fused_losses.concordance_correlation_loss(pred, yb, mask=mask, reduction="none", eps=0.0)
    return dict(pearson=r.mean().item(), ccc=ccc.mean().item(), mse=masked_mse(pred, yb, mask).item(),
                pred=pred.cpu())


def plot(windows, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, yb, mask = windows
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), sharey=True)
    for ax, i in zip(axes, range(3)):
        n = int(mask[i].sum())
        ax.plot(yb[i, :n], "k-", lw=2, label="truth")
        for name, res in results.items():
            ax.plot(res["pred"][i, :n], lw=1.2, label=f"{name}")
        ax.set_title(f"held-out window {i} ({n} quarters)")
        ax.set_xlabel("quarter in window")
    axes[0].set_ylabel("real consumption growth, % per quarter")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="sequence_correlation.png", help="PNG path ('' to skip)")
    args = parser.parse_args(argv)

    x, y, split = load_series()
    held_out = sample_windows(x, y, split, len(y), 64, np.random.default_rng(1234))
    print(f"{len(y)} quarters: training windows from the first {split}, held-out windows from the last "
          f"{len(y) - split}; device {args.device}")
    results = {}
    for name in ("MSE", "Pearson", "CCC"):
        model = train(name, x, y, split, args.steps, args.seed, args.device)
        results[name] = evaluate(model, held_out, args.device)
    print("\nheld-out windows (64): mean per-window Pearson r, mean CCC, masked MSE")
    for name, res in results.items():
        print(f"  trained with {name:8s} r = {res['pearson']:.3f}   CCC = {res['ccc']:.3f}   MSE = {res['mse']:.3f}")
    if args.out:
        plot(held_out, results, args.out)
    return results


if __name__ == "__main__":
    main()
