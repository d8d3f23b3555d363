"""The three Keras questions behind fused_losses, answered with `model.fit` on the fused kernels (Keras 3, torch
backend).

1. "Apply different weights to different misclassifications in a Keras loss": a 10x10 weight table for a
   digit classifier with a softmax output layer. scikit-learn's bundled 8x8 handwritten digits stand in for
   MNIST. The table is the one in the question's form: ones everywhere (the diagonal included: in "argmax" mode
   a 0 there would give every correct sample zero loss) and a larger weight on a few confusions, here the
   expensive misreadings of examples/cost_sensitive_digits.py (8 read as 1, 1 as 8, 9 as 8, 8 as 9, 3 as 8, 4
   as 7) at 10. The same MLP is trained with Keras' CategoricalCrossentropy and with
   CostSensitiveCategoricalCrossentropy in its "argmax" mode (each sample's cross-entropy times
   table[true, predicted], what the question asked for) and "expected" mode (times the expected weight under
   the softmax, differentiated), on several held-out splits. Printed: the number of expensive mistakes, of
   all mistakes, and their cost (the table's weight for a mistake, 0 for a correct digit).
2. "A correlation-based loss for sequence labelling": input (20, 100, 5), output (20, 100, 1), batches of 20
   sequences padded to 100 steps with zeros, a Masking layer in front of a GRU. Data from a documented
   generator (`make_sequences`): the target is a leaky running sum of a linear combination of the inputs, then
   scaled and shifted by a random amount per sequence, plus noise, so only its shape over time can be
   predicted. PearsonCorrelationLoss gets one loss per sequence, shape (20,), with the mask as the kernel's
   padding mask. Printed: that shape, its gradient against the fused function with and without `mask=`, and
   the held-out Pearson r (valid steps only) before and after training.
3. Sparse multi-label targets: scikit-learn's generator `make_multilabel_classification`, 200 labels and
   about 3 positives per sample (1.6% of the targets). The same MLP (logits out) is trained with Keras'
   BinaryCrossentropy, with WeightedBinaryCrossentropy(pos_weight = negatives / positives per label, capped at
   50) and with its asymmetric focusing (ASL: gamma_neg 4, clip 0.05). Printed, on held-out samples: the
   fraction of samples with no label predicted at 0.5 (plain BCE's all-zeros collapse) and micro F1.

Every run is seeded (`keras.utils.set_random_seed`), so the output is the same from run to run on one machine.
PyTorch runs on one thread (`--threads`): these models are too small to gain from more, and on a busy machine
two threads made a GRU step 50x slower.

    KERAS_BACKEND=torch python examples/keras_losses.py [--quick] [--out PATH.json]
"""

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits, make_multilabel_classification  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import fused_losses  # noqa: E402
from fused_losses.keras import CostSensitiveCategoricalCrossentropy, PearsonCorrelationLoss, \
    WeightedBinaryCrossentropy  # noqa: E402

# 1. Digits: (true, predicted) confusions that cost 10, as in examples/cost_sensitive_digits.py.
EXPENSIVE = [(8, 1), (1, 8), (9, 8), (8, 9), (3, 8), (4, 7)]
EXPENSIVE_WEIGHT = 10.0
# 2. Sequences: the question's shapes.
BATCH, STEPS, FEATURES = 20, 100, 5
# 3. Multi-label.
NUM_LABELS = 200


def weight_table() -> np.ndarray:
    """The question's 10x10 misclassification weights, rows = true digit, columns = predicted digit."""
    weights = np.ones((10, 10), np.float32)
    for true, predicted in EXPENSIVE:
        weights[true, predicted] = EXPENSIVE_WEIGHT
    return weights


def digits_classifier() -> keras.Model:
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                             keras.layers.Dense(10, activation="softmax")])


def expensive_mistakes(true: np.ndarray, predicted: np.ndarray) -> int:
    return int(sum(np.sum((true == t) & (predicted == p)) for t, p in EXPENSIVE))


def digits(splits: int, epochs: int) -> dict:
    """Expensive mistakes, all mistakes and their cost (the weight table's, 0 for a correct digit), summed over
    `splits` held-out splits, per loss."""
    data = load_digits()
    losses = {
        "CategoricalCrossentropy": keras.losses.CategoricalCrossentropy,
        "cost-sensitive, argmax": lambda: CostSensitiveCategoricalCrossentropy(weight_table()),
        "cost-sensitive, expected": lambda: CostSensitiveCategoricalCrossentropy(weight_table(),
                                                                                  cost_mode="expected"),
    }
    results = {name: {"expensive mistakes": 0, "mistakes": 0} for name in losses}
    for split in range(splits):
        x_train, x_test, y_train, y_test = train_test_split(data.data / 16.0, data.target, test_size=0.4,
                                                            stratify=data.target, random_state=split)
        for name, make_loss in losses.items():
            keras.utils.set_random_seed(split)
            model = digits_classifier()
            model.compile(keras.optimizers.Adam(3e-3), loss=make_loss())
            model.fit(x_train, keras.utils.to_categorical(y_train, 10), batch_size=64, epochs=epochs, verbose=0)
            predicted = model.predict(x_test, verbose=0).argmax(axis=1)
            results[name]["expensive mistakes"] += expensive_mistakes(y_test, predicted)
            results[name]["mistakes"] += int(np.sum(predicted != y_test))
    for result in results.values():
        result["cost"] = result["mistakes"] + (EXPENSIVE_WEIGHT - 1.0) * result["expensive mistakes"]
    print(f"\n1. Digits, softmax output layer, {splits} held-out splits of {len(y_test)} digits, the weight table "
          f"with {len(EXPENSIVE)} confusions at {EXPENSIVE_WEIGHT:g}:")
    for name, result in results.items():
        print(f"   {name:26s} expensive mistakes {result['expensive mistakes']:3d}   "
              f"all mistakes {result['mistakes']:3d}   cost {result['cost']:4.0f}")
    return results


def make_sequences(count: int, rng: np.random.Generator):
    """`count` sequences of up to STEPS steps, zero-padded: inputs (count, STEPS, FEATURES), targets
    (count, STEPS, 1) and the bool mask of valid steps (count, STEPS).

    Inputs are standard normal. The target is s_t = 0.8 s_{t-1} + x_t . (1, -0.5, 0.25, 0, 0), times a random
    scale in [0.5, 2] and plus a random offset ~ N(0, 3^2) per sequence, plus noise ~ N(0, 0.3^2). Lengths are
    uniform in [40, STEPS]; inputs and targets are 0 past the end."""
    x = rng.normal(size=(count, STEPS, FEATURES)).astype(np.float32)
    drive = x @ np.array([1.0, -0.5, 0.25, 0.0, 0.0], np.float32)
    running_sum = np.zeros((count, STEPS), np.float32)
    state = np.zeros(count, np.float32)
    for t in range(STEPS):
        state = 0.8 * state + drive[:, t]
        running_sum[:, t] = state
    scale = rng.uniform(0.5, 2.0, (count, 1))
    offset = rng.normal(0.0, 3.0, (count, 1))
    y = scale * running_sum + offset + rng.normal(0.0, 0.3, (count, STEPS))
    valid = np.arange(STEPS) < rng.integers(40, STEPS + 1, (count, 1))
    x[~valid] = 0.0
    y[~valid] = 0.0
    return x, y[..., None].astype(np.float32), valid


def sequence_labeller() -> keras.Model:
    inputs = keras.Input((STEPS, FEATURES))
    hidden = keras.layers.GRU(16, return_sequences=True)(keras.layers.Masking(0.0)(inputs))
    return keras.Model(inputs, keras.layers.Dense(1)(hidden))


def held_out_pearson(model: keras.Model, x: np.ndarray, y: np.ndarray, valid: np.ndarray) -> float:
    """Mean over sequences of Pearson r between prediction and target on the valid steps (NumPy)."""
    predicted = model.predict(x, batch_size=BATCH, verbose=0)[..., 0]
    return float(np.mean([np.corrcoef(p[v], t[v, 0])[0, 1] for p, t, v in zip(predicted, y, valid)]))


def sequences(train_count: int, epochs: int) -> dict:
    rng = np.random.default_rng(0)
    x_train, y_train, _ = make_sequences(train_count, rng)
    x_test, y_test, valid_test = make_sequences(100, rng)
    keras.utils.set_random_seed(0)
    model = sequence_labeller()
    loss = PearsonCorrelationLoss()
    model.compile(keras.optimizers.Adam(1e-2), loss=loss)

    # One padded batch through the untrained model: the Masking layer's mask travels on the output to the loss,
    # which returns one loss per sequence; its gradient is the fused function's with the same mask.
    x_batch, y_batch = (torch.as_tensor(a[:BATCH]) for a in (x_test, y_test))
    y_pred = model(x_batch)
    y_batch = y_batch.to(y_pred.device)
    mask = torch.as_tensor(valid_test[:BATCH]).to(y_pred.device)
    per_sequence = loss.call(y_batch, y_pred, mask)
    (keras_gradient,) = torch.autograd.grad(loss(y_batch, y_pred), y_pred, retain_graph=True)

    def difference_from_fused_gradient(fused_mask):
        fused_loss = fused_losses.pearson_correlation_loss(y_pred, y_batch, mask=fused_mask)
        (fused_gradient,) = torch.autograd.grad(fused_loss, y_pred, retain_graph=True)
        return float((keras_gradient - fused_gradient).abs().max())

    masked_difference = difference_from_fused_gradient(mask)
    unmasked_difference = difference_from_fused_gradient(None)

    r_before = held_out_pearson(model, x_test, y_test, valid_test)
    model.fit(x_train, y_train, batch_size=BATCH, epochs=epochs, verbose=0)
    r_after = held_out_pearson(model, x_test, y_test, valid_test)
    print(f"\n2. Sequences {tuple(x_batch.shape)} -> {tuple(y_pred.shape)}, padded, Masking + GRU, "
          f"{train_count} training / {len(x_test)} held-out sequences:")
    print(f"   per-sequence loss shape Keras reduces: {tuple(per_sequence.shape)}")
    print(f"   its gradient vs fused_losses.pearson_correlation_loss's: max |difference| {masked_difference:.1e} "
          f"with mask=, {unmasked_difference:.1e} without")
    print(f"   held-out Pearson r (valid steps): {r_before:.3f} untrained, {r_after:.3f} after fit "
          f"with PearsonCorrelationLoss")
    return {"loss shape": list(per_sequence.shape), "gradient difference, masked": masked_difference,
            "gradient difference, unmasked": unmasked_difference,
            "r untrained": r_before, "r trained": r_after}


def multilabel(samples: int, epochs: int) -> dict:
    x, y = make_multilabel_classification(n_samples=samples, n_features=300, n_classes=NUM_LABELS, n_labels=3,
                                          length=200, allow_unlabeled=False, random_state=0)
    x_train, x_test, y_train, y_test = train_test_split(np.log1p(x).astype(np.float32), y.astype(np.float32),
                                                        test_size=0.3, random_state=0)
    positives = y_train.mean(axis=0)
    pos_weight = np.minimum((1.0 - positives) / np.maximum(positives, 1e-3), 50.0)
    losses = {
        "BinaryCrossentropy": lambda: keras.losses.BinaryCrossentropy(from_logits=True),
        "pos_weight": lambda: WeightedBinaryCrossentropy(pos_weight, from_logits=True),
        "ASL (gamma_neg 4, clip 0.05)": lambda: WeightedBinaryCrossentropy(from_logits=True, gamma_neg=4.0,
                                                                          clip=0.05),
    }
    results = {}
    for name, make_loss in losses.items():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(256, activation="relu"),
                                  keras.layers.Dense(NUM_LABELS)])
        model.compile(keras.optimizers.Adam(3e-3), loss=make_loss())
        model.fit(x_train, y_train, batch_size=128, epochs=epochs, verbose=0)
        predicted = model.predict(x_test, verbose=0) >= 0.0  # logit 0 = probability 0.5
        results[name] = {"no label predicted": float(np.mean(~predicted.any(axis=1))),
                         "micro F1": float(f1_score(y_test, predicted, average="micro", zero_division=0))}
    print(f"\n3. Multi-label, {NUM_LABELS} labels, {y_train.mean():.1%} positive targets, {len(x_train)} training / "
          f"{len(x_test)} held-out samples:")
    for name, result in results.items():
        print(f"   {name:30s} no label predicted {result['no label predicted']:6.1%}   "
              f"micro F1 {result['micro F1']:.3f}")
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps of each part (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads")
    parser.add_argument("--out", default="examples/output/keras_losses.json",
                        help="JSON path for the printed numbers ('' to skip; the default folder is ignored by git)")
    args = parser.parse_args(argv)
    if keras.config.backend() != "torch":
        parser.error(f"Keras runs on {keras.config.backend()!r}: set KERAS_BACKEND=torch")
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    results = {
        "digits": digits(splits=1, epochs=1) if args.quick else digits(splits=3, epochs=30),
        "sequences": sequences(train_count=BATCH, epochs=1) if args.quick else sequences(train_count=200, epochs=3),
        "multilabel": multilabel(samples=500, epochs=1) if args.quick else multilabel(samples=6000, epochs=8),
    }
    print(f"\ntrained in {time.perf_counter() - start:.0f} s")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as file:
            json.dump(results, file, indent=2)
        print(f"saved {args.out}")
    return results


if __name__ == "__main__":
    main()
