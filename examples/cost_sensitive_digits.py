"""Cost-sensitive cross-entropy on scikit-learn's bundled handwritten digits.

The story: the digits are amounts read from cheques. Most misreadings cost a manual correction (cost 1), but
a few silently change an amount by a lot and cost ten times more:
    8 read as 1, 1 read as 8, 9 read as 8, 8 read as 9, 3 read as 8, 4 read as 7.
A small MLP is trained with the same seed, data and schedule three times: with plain cross-entropy, and with
`CostSensitiveCrossEntropyLoss` (cost matrix rows = true digit, columns = predicted digit) in its two modes:
"argmax" (each sample's cross-entropy times cost[true, predicted]) and "expected" (times the expected cost
under the softmax, differentiated). On held-out splits it prints the confusion matrices and the total
misclassification cost, over several seeds (a held-out split has only a handful of expensive errors, so one
seed alone is noise), and saves the confusion matrices of the first seed side by side as a PNG.

What to expect: the MLP fits the training digits almost perfectly, so in "argmax" mode the cost factor is
rarely more than 1 during training and the result is close to plain cross-entropy; "expected" mode keeps
pushing probability away from the expensive classes and gives the lowest total cost.

    python examples/cost_sensitive_digits.py [--epochs 30] [--seeds 3] [--out cost_sensitive_digits.png]
"""

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import train_test_split
from torch import nn

import fused_losses

# (true, predicted): among the digits' most frequent confusions, so that held-out errors show them.
EXPENSIVE = [(8, 1), (1, 8), (9, 8), (8, 9), (3, 8), (4, 7)]
EXPENSIVE_COST = 10.0


def evaluation_costs() -> torch.Tensor:
    """What a mistake costs: 0 when right, 1 for an ordinary misreading, 10 for the expensive ones."""
    cost = 1 - torch.eye(10)
    for true, predicted in EXPENSIVE:
        cost[true, predicted] = EXPENSIVE_COST
    return cost


def training_costs() -> torch.Tensor:
    """The loss multiplies each sample's cross-entropy by cost[true, argmax]: keep 1 on the diagonal so that
    correct samples still learn, and the expensive confusions at 10."""
    cost = torch.ones(10, 10)
    for true, predicted in EXPENSIVE:
        cost[true, predicted] = EXPENSIVE_COST
    return cost


def train(criterion, x_train, y_train, epochs, seed, device, log_every):
    """A 64-32-10 MLP trained with Adam; the seed fixes the initialisation and the batch order."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            loss = criterion(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if log_every and (epoch % log_every == 0 or epoch == epochs):
            print(f"  epoch {epoch:3d}/{epochs}: last batch loss {loss.item():.4f}", flush=True)
    return model


def report(name, model, x_test, y_test, cost):
    with torch.no_grad():
        predicted = model(x_test).argmax(1).cpu()
    matrix = confusion_matrix(y_test.cpu(), predicted, labels=range(10))
    total_cost = float((torch.as_tensor(matrix, dtype=torch.float32) * cost).sum())
    errors = int(matrix.sum() - matrix.trace())
    expensive = int(sum(matrix[t, p] for t, p in EXPENSIVE))
    print(f"\n{name}: accuracy {1 - errors / matrix.sum():.4f}, errors {errors}, expensive errors {expensive}, "
          f"total misclassification cost {total_cost:.0f}")
    print(matrix)
    return matrix, total_cost


def save_plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.8))
    for ax, (name, (matrix, total_cost)) in zip(axes, results.items()):
        ax.imshow(matrix, cmap="Blues")
        for t in range(10):
            for p in range(10):
                if matrix[t, p]:
                    expensive = (t, p) in EXPENSIVE
                    ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=8,
                            color="red" if expensive else ("white" if t == p else "black"),
                            fontweight="bold" if expensive else "normal")
        ax.set_title(f"{name}\ntotal cost {total_cost:.0f}", fontsize=10)
        ax.set_xlabel("predicted digit")
        ax.set_ylabel("true digit")
        ax.set_xticks(range(10))
        ax.set_yticks(range(10))
    fig.suptitle("Held-out digits (red: the expensive confusions)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nsaved {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3, help="number of splits / initialisations")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="cost_sensitive_digits.png", help="PNG path ('' to skip)")
    args = parser.parse_args(argv)

    digits = load_digits()
    cost = evaluation_costs()
    criteria = {
        "plain cross-entropy": nn.CrossEntropyLoss(),
        "cost-sensitive, argmax": fused_losses.CostSensitiveCrossEntropyLoss(training_costs()).to(args.device),
        "cost-sensitive, expected": fused_losses.CostSensitiveCrossEntropyLoss(
            training_costs(), cost_mode="expected").to(args.device),
    }
    totals = dict.fromkeys(criteria, 0.0)
    first_seed_results = {}
    for seed in range(args.seeds):
        x_train, x_test, y_train, y_test = train_test_split(digits.data / 16.0, digits.target, test_size=0.4,
                                                            stratify=digits.target, random_state=seed)
        to = dict(device=args.device)
        x_train, x_test = (torch.tensor(a, dtype=torch.float32, **to) for a in (x_train, x_test))
        y_train, y_test = (torch.tensor(a, dtype=torch.long, **to) for a in (y_train, y_test))
        for name, criterion in criteria.items():
            print(f"\n[seed {seed}] training with {name} on {args.device} ({len(x_train)} digits, "
                  f"{args.epochs} epochs)", flush=True)
            model = train(criterion, x_train, y_train, args.epochs, seed, args.device, max(1, args.epochs // 2))
            matrix, total_cost = report(name, model, x_test, y_test, cost)
            totals[name] += total_cost
            if seed == 0:
                first_seed_results[name] = (matrix, total_cost)

    print(f"\ntotal misclassification cost over {args.seeds} held-out splits:")
    for name, total in totals.items():
        print(f"  {name:28s} {total:8.0f}")
    best = min(totals, key=totals.get)
    plain = totals["plain cross-entropy"]
    for name in list(criteria)[1:]:
        verdict = "lower" if totals[name] < plain else "NOT lower"
        print(f"{name}: {verdict} than plain cross-entropy ({totals[name]:.0f} vs {plain:.0f})")
    print(f"lowest total cost: {best}")
    if args.out:
        save_plot(first_seed_results, args.out)
    return totals


if __name__ == "__main__":
    main()
