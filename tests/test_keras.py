"""Tests of the Keras 3 losses (fused_losses.keras, torch backend): value and gradient against the fused functions
and against Keras' own cross-entropies, sample weights, a Keras mask as the correlation kernels' padding mask,
probabilities at 0 and 1, model.fit, saving and loading, get_config, torch.compile, errors and the import guard.
Tensors go to the device Keras' torch backend uses (CUDA when present)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

keras = pytest.importorskip("keras")

import fused_losses  # noqa: E402
from fused_losses import keras as fk  # noqa: E402
from fused_losses._validation import can_check_values  # noqa: E402

# Keras' torch backend (not this code) converts variables through NumPy's pre-2.0 __array__ protocol.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.keras]

DEVICE = keras.ops.zeros(()).device  # where Keras' torch backend puts tensors
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _keras_seed():
    keras.utils.set_random_seed(0)


def on_device(*arrays, requires_grad=False):
    tensors = [torch.as_tensor(a, dtype=torch.float32).to(DEVICE) for a in arrays]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    return tensors if len(tensors) > 1 else tensors[0]


def value_and_grad(fn, leaf):
    """`fn(leaf)`'s value and its gradient with respect to a fresh copy of `leaf`."""
    leaf = leaf.detach().clone().requires_grad_()
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def cost_matrix(num_classes, seed=0):
    """Costs >= 1 off the diagonal, 1 on it."""
    cost = 1.0 + np.random.default_rng(seed).uniform(0, 2, (num_classes, num_classes))
    np.fill_diagonal(cost, 1.0)
    return cost


def assert_same(actual, expected, **tolerances):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tolerances)


# ----------------------------------------------------------------------------- against the fused functions

N, C, T, D, L = 8, 5, 12, 2, 6


def _cross_entropy_case(sparse, cost_mode, label_smoothing=0.0):
    logits = on_device(torch.randn(N, C) * 2)
    labels = torch.randint(0, C, (N,)).to(DEVICE)
    cost = cost_matrix(C)
    if sparse:
        loss = fk.CostSensitiveSparseCategoricalCrossentropy(cost, from_logits=True, cost_mode=cost_mode)
        y_true = labels
    else:
        loss = fk.CostSensitiveCategoricalCrossentropy(cost, from_logits=True, cost_mode=cost_mode,
                                                       label_smoothing=label_smoothing)
        y_true = torch.nn.functional.one_hot(labels, C).float()

    def fused(x, reduction):
        return fused_losses.cost_sensitive_cross_entropy(x, labels, torch.as_tensor(cost, dtype=torch.float32,
                                                                                     device=DEVICE),
                                                         reduction=reduction, label_smoothing=label_smoothing,
                                                         cost_mode=cost_mode)
    return loss, y_true, logits, fused


def _correlation_case(kind):
    y_pred = on_device(torch.randn(N, T, D))
    y_true = on_device(0.5 * y_pred + torch.randn(N, T, D))
    loss = {"pearson": fk.PearsonCorrelationLoss, "concordance": fk.ConcordanceCorrelationLoss}[kind](eps=1e-6)
    function = {"pearson": fused_losses.pearson_correlation_loss,
                "concordance": fused_losses.concordance_correlation_loss}[kind]

    def fused(x, reduction):
        losses = function(x, y_true, reduction=reduction, eps=1e-6)
        return losses.mean(dim=-1) if reduction == "none" else losses  # one loss per sequence
    return loss, y_true, y_pred, fused


def _bce_case():
    logits = on_device(torch.randn(N, L) * 3)
    y_true = on_device((torch.rand(N, L) > 0.7).float())
    pos_weight = [0.5, 1.0, 2.0, 3.0, 4.0, 5.0]
    loss = fk.WeightedBinaryCrossentropy(pos_weight, from_logits=True, gamma_pos=1.0, gamma_neg=3.0, clip=0.05)

    def fused(x, reduction):
        losses = fused_losses.weighted_bce_with_logits(x, y_true, pos_weight=on_device(pos_weight),
                                                       reduction=reduction, gamma_pos=1.0, gamma_neg=3.0, clip=0.05)
        return losses.mean(dim=-1) if reduction == "none" else losses  # one loss per sample
    return loss, y_true, logits, fused


CASES = {
    "categorical argmax": lambda: _cross_entropy_case(False, "argmax"),
    "categorical expected smoothed": lambda: _cross_entropy_case(False, "expected", 0.1),
    "sparse argmax": lambda: _cross_entropy_case(True, "argmax"),
    "sparse expected": lambda: _cross_entropy_case(True, "expected"),
    "pearson": lambda: _correlation_case("pearson"),
    "concordance": lambda: _correlation_case("concordance"),
    "weighted bce": _bce_case,
}


@pytest.mark.parametrize("case", CASES)
def test_value_and_gradient_equal_the_fused_function(case):
    loss, y_true, y_pred, fused = CASES[case]()
    assert_same(value_and_grad(lambda x: loss(y_true, x), y_pred),
                value_and_grad(lambda x: fused(x, "mean"), y_pred))
    # Per-sample losses: Keras applies sample_weight and its reductions to exactly those.
    weights = on_device(torch.rand(N))
    assert_same(value_and_grad(lambda x: loss(y_true, x, sample_weight=weights), y_pred),
                value_and_grad(lambda x: (weights * fused(x, "none")).mean(), y_pred))
    for reduction, expected in [("sum", lambda x: (weights * fused(x, "none")).sum()),
                                ("mean_with_sample_weight", lambda x: (weights * fused(x, "none")).sum() / weights.sum())]:
        loss.reduction = reduction
        assert_same(value_and_grad(lambda x: loss(y_true, x, sample_weight=weights), y_pred),
                    value_and_grad(expected, y_pred))
    loss.reduction = None
    torch.testing.assert_close(loss(y_true, y_pred), fused(y_pred, "none"))


@pytest.mark.parametrize("case", ["sparse argmax", "pearson", "weighted bce"])
def test_float64_dtype(case):
    loss, y_true, y_pred, fused = CASES[case]()
    loss = type(loss).from_config({**loss.get_config(), "dtype": "float64", "reduction": None})
    y_pred, y_true = y_pred.double(), y_true.double() if y_true.dtype.is_floating_point else y_true
    losses = loss(y_true, y_pred)
    assert losses.dtype == torch.float64
    torch.testing.assert_close(losses, fused(y_pred, "none"), rtol=1e-12, atol=1e-12)
    # Keras' reductions return floatx (float32) whatever the loss dtype, for its own losses as for these.
    loss.reduction = "sum_over_batch_size"
    torch.testing.assert_close(loss(y_true, y_pred), fused(y_pred, "mean").float())


# ----------------------------------------------------------------------------- against Keras' own losses


def softmax(z):
    return torch.softmax(z, dim=-1)


def activated(activation, from_logits):
    """y_pred as the model gives it: the logits themselves, or probabilities from the output activation."""
    return (lambda z: z) if from_logits else activation


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_all_ones_cost_equals_keras_categorical_crossentropy(from_logits, label_smoothing):
    logits = on_device(torch.randn(N, C) * 2)
    y_true = torch.nn.functional.one_hot(torch.randint(0, C, (N,)), C).float().to(DEVICE)
    output = activated(softmax, from_logits)
    ours = fk.CostSensitiveCategoricalCrossentropy(np.ones((C, C)), from_logits=from_logits,
                                                   label_smoothing=label_smoothing)
    theirs = keras.losses.CategoricalCrossentropy(from_logits=from_logits, label_smoothing=label_smoothing)
    for sample_weight in (None, on_device(torch.rand(N))):
        assert_same(value_and_grad(lambda z: ours(y_true, output(z), sample_weight), logits),
                    value_and_grad(lambda z: theirs(y_true, output(z), sample_weight), logits))


def test_categorical_padding_rows_and_soft_labels():
    """An all-zero y_true row (padding) has zero loss, as in Keras' categorical cross-entropy; a soft or
    multi-hot row raises where values are read (the CPU here) instead of standing for its argmax."""
    logits = on_device(torch.randn(N, C) * 2)
    y_true = torch.nn.functional.one_hot(torch.randint(0, C, (N,)), C).float().to(DEVICE)
    y_true[::3] = 0
    ours = fk.CostSensitiveCategoricalCrossentropy(np.ones((C, C)), from_logits=True)
    theirs = keras.losses.CategoricalCrossentropy(from_logits=True)
    assert_same(value_and_grad(lambda z: ours(y_true, z), logits), value_and_grad(lambda z: theirs(y_true, z), logits))
    if not can_check_values(y_true):
        pytest.skip("values of CUDA tensors are read only with FUSED_LOSSES_CHECK=1")
    soft = torch.full((N, C), 1.0 / C, device=DEVICE)
    multi_hot = y_true.clone()
    multi_hot[1, :2] = 1
    for labels in (soft, multi_hot):
        with pytest.raises(ValueError, match="y_true must be one-hot .* soft, smoothed or mixed-up labels"):
            ours(labels, logits)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("ignore_class", [None, -1])
@pytest.mark.parametrize("shape", ["(N,)", "(N, 1)", "(N, T)"])
def test_all_ones_cost_equals_keras_sparse_categorical_crossentropy(from_logits, ignore_class, shape):
    sequences = shape == "(N, T)"
    logits = on_device(torch.randn((N, T, C) if sequences else (N, C)) * 2)
    labels = torch.randint(0, C, logits.shape[:-1])
    if ignore_class is not None:
        labels[::3] = ignore_class
    y_true = labels.to(DEVICE).unsqueeze(-1) if shape == "(N, 1)" else labels.to(DEVICE)
    output = activated(softmax, from_logits)
    mask = torch.rand(N, T, device=DEVICE) > 0.3 if sequences else None

    def with_mask(y_pred):  # a Keras mask on (N, T, C) outputs: Keras' own reduction applies it to the losses
        if mask is not None:
            y_pred._keras_mask = mask
        return y_pred

    ours = fk.CostSensitiveSparseCategoricalCrossentropy(np.ones((C, C)), from_logits=from_logits,
                                                         ignore_class=ignore_class)
    theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, ignore_class=ignore_class)
    for sample_weight in (None, on_device(torch.rand(N, T) if sequences else torch.rand(N))):
        given = None if sample_weight is None else sample_weight.clone()
        assert_same(value_and_grad(lambda z: ours(y_true, with_mask(output(z)), sample_weight), logits),
                    value_and_grad(lambda z: theirs(y_true, with_mask(output(z)), given), logits))
        if sample_weight is not None:  # Keras multiplied its mask into `given`; ours worked on a copy
            assert torch.equal(sample_weight, given) == (ignore_class is None and mask is None)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("shape", ["(N, L)", "(N, 1) with (N,) labels"])
def test_unweighted_equals_keras_binary_crossentropy(from_logits, shape):
    single = shape != "(N, L)"
    logits = on_device(torch.randn(N, 1 if single else L) * 3)
    y_true = on_device((torch.rand(N) if single else torch.rand(N, L)) > 0.6)
    output = activated(torch.sigmoid, from_logits)
    ours = fk.WeightedBinaryCrossentropy(from_logits=from_logits)
    theirs = keras.losses.BinaryCrossentropy(from_logits=from_logits)
    for sample_weight in (None, on_device(torch.rand(N))):
        assert_same(value_and_grad(lambda z: ours(y_true, output(z), sample_weight), logits),
                    value_and_grad(lambda z: theirs(y_true, output(z), sample_weight), logits))


# ----------------------------------------------------------------------------- probabilities (from_logits=False)


def test_probabilities_zero_and_one_give_finite_losses_and_gradients():
    eps = keras.config.epsilon()
    probabilities = on_device([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 2, 2], device=DEVICE)  # right and sure, wrong and sure, wrong with p = 0
    loss = fk.CostSensitiveSparseCategoricalCrossentropy(np.ones((3, 3)))
    value = loss(labels, probabilities)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(probabilities.grad).all()
    torch.testing.assert_close(value, keras.losses.SparseCategoricalCrossentropy()(labels, probabilities.detach()))
    # The clip caps each loss at -log(eps): the cost of probabilities against logits (see the module docstring).
    per_sample = fk.CostSensitiveSparseCategoricalCrossentropy(np.ones((3, 3)), reduction=None)(labels, probabilities)
    torch.testing.assert_close(per_sample[1:], on_device([-np.log(eps)] * 2), rtol=1e-5, atol=1e-5)

    sigmoid_outputs = on_device([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    targets = on_device([[0.0, 1.0], [0.0, 1.0]])
    value = fk.WeightedBinaryCrossentropy(pos_weight=[2.0, 3.0])(targets, sigmoid_outputs)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(sigmoid_outputs.grad).all()
    unweighted = fk.WeightedBinaryCrossentropy()(targets, sigmoid_outputs.detach())
    torch.testing.assert_close(unweighted, keras.losses.BinaryCrossentropy()(targets, sigmoid_outputs.detach()))


def test_probabilities_agree_with_logits_inside_the_clip_and_lose_the_gradient_beyond_it():
    logits = on_device(torch.randn(N, C) * 3)
    labels = torch.randint(0, C, (N,)).to(DEVICE)
    cost = cost_matrix(C)
    on_probabilities = fk.CostSensitiveSparseCategoricalCrossentropy(cost)
    on_logits = fk.CostSensitiveSparseCategoricalCrossentropy(cost, from_logits=True)
    assert_same(value_and_grad(lambda z: on_probabilities(labels, softmax(z)), logits),
                value_and_grad(lambda z: on_logits(labels, z), logits), rtol=1e-5, atol=1e-5)

    # A model surer than 1 - eps of a wrong class: the logits give the true loss (about 40) and its gradient,
    # probabilities a loss capped at -log(eps) and no gradient.
    wrong = on_device([[0.0, 40.0, 0.0]])
    label = torch.tensor([0], device=DEVICE)
    ones = np.ones((3, 3))
    value, grad = value_and_grad(lambda z: fk.CostSensitiveSparseCategoricalCrossentropy(ones)(label, softmax(z)),
                                 wrong)
    torch.testing.assert_close(value, on_device(-np.log(keras.config.epsilon())), rtol=1e-5, atol=1e-5)
    assert grad.abs().max() < 1e-6
    value, grad = value_and_grad(lambda z: fk.CostSensitiveSparseCategoricalCrossentropy(ones, from_logits=True)(
        label, z), wrong)
    assert value > 39 and grad[0, 0] < -0.99

    targets = on_device((torch.rand(N, L) > 0.5).float())
    bce_logits = on_device(torch.randn(N, L) * 3)
    assert_same(value_and_grad(lambda z: fk.WeightedBinaryCrossentropy([2.0] * L)(targets, torch.sigmoid(z)),
                               bce_logits),
                value_and_grad(lambda z: fk.WeightedBinaryCrossentropy([2.0] * L, from_logits=True)(targets, z),
                               bce_logits), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- Keras masks (correlation losses)

CORRELATIONS = {"pearson": (fk.PearsonCorrelationLoss, fused_losses.pearson_correlation_loss),
                "concordance": (fk.ConcordanceCorrelationLoss, fused_losses.concordance_correlation_loss)}


def masked_sequence_model(features=2):
    inputs = keras.Input((T, features))
    hidden = keras.layers.Masking(0.0)(inputs)
    return keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(4, activation="tanh")(hidden)))


def padded_sequences(lengths, features=2):
    x = np.random.default_rng(1).normal(size=(len(lengths), T, features)).astype("float32")
    for row, length in enumerate(lengths):
        x[row, length:] = 0.0
    y = (x.sum(-1, keepdims=True) + np.random.default_rng(2).normal(size=(len(lengths), T, 1))).astype("float32")
    return x, y


@pytest.mark.parametrize("kind", CORRELATIONS)
def test_keras_mask_reaches_the_kernel_as_padding(kind):
    keras_loss, function = CORRELATIONS[kind]
    model = masked_sequence_model()
    lengths = [T, 9, 5, 3]
    x, y = padded_sequences(lengths)
    y = on_device(y)
    mask = torch.arange(T, device=DEVICE) < torch.tensor(lengths, device=DEVICE)[:, None]
    kernel = model.layers[-1].kernel.value

    def through_model(loss_fn):
        value = loss_fn(model(x))
        (grad,) = torch.autograd.grad(value, kernel)
        return value.detach(), grad

    ours = through_model(lambda y_pred: keras_loss()(y, y_pred))
    assert_same(ours, through_model(lambda y_pred: function(y_pred, y, mask=mask)))
    unmasked = through_model(lambda y_pred: function(y_pred, y))
    assert not torch.allclose(ours[0], unmasked[0])  # the padding changes the loss: the mask was not dropped

    # Per-sequence sample weights, and a (batch, time) y_true for the (batch, time, 1) output.
    weights = on_device([0.5, 2.0, 1.0, 0.0])
    torch.testing.assert_close(keras_loss()(y[..., 0], model(x), sample_weight=weights),
                               (weights * function(model(x), y, mask=mask, reduction="none")[:, 0]).mean())


@pytest.mark.parametrize("kind", CORRELATIONS)
def test_a_fully_padded_sequence_drops_out_of_the_mean(kind):
    keras_loss, function = CORRELATIONS[kind]
    model = masked_sequence_model()
    x, y = padded_sequences([T, 7, 0])
    y_pred = model(x)
    losses = function(y_pred, on_device(y), mask=y_pred._keras_mask, reduction="none")[:2, 0]
    torch.testing.assert_close(keras_loss()(y, y_pred), losses.mean())
    torch.testing.assert_close(keras_loss(reduction="sum")(y, y_pred), losses.sum())


def test_per_step_sample_weights_are_refused():
    y_pred, y_true = on_device(torch.randn(N, T), torch.randn(N, T))
    with pytest.raises(ValueError, match=r"sample_weight weighs whole sequences.*\(8,\)"):
        fk.PearsonCorrelationLoss()(y_true, y_pred, sample_weight=on_device(torch.rand(N, T)))


# ----------------------------------------------------------------------------- training, saving, configs

SAMPLES = 16


def _classifier(units, activation):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, activation=activation)])


def _training_case(name):
    """(loss, model, x, y, sample_weight) for a few steps of model.fit: each loss as its users would set it up."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 4)).astype("float32")
    labels = (x[:, :3].argmax(-1) + (x[:, 3] > 1.0)) % 3
    if name == "categorical":  # a softmax output layer, probabilities, one-hot labels
        return (fk.CostSensitiveCategoricalCrossentropy(cost_matrix(3), label_smoothing=0.1),
                _classifier(3, "softmax"), x, np.eye(3, dtype="float32")[labels], None)
    if name == "sparse":  # logits, integer labels with an ignored class, per-sample weights
        labels[::5] = -1
        return (fk.CostSensitiveSparseCategoricalCrossentropy(cost_matrix(3), from_logits=True, ignore_class=-1,
                                                              cost_mode="expected"),
                _classifier(3, None), x, labels, rng.uniform(0.5, 1.5, SAMPLES).astype("float32"))
    if name == "weighted bce":  # a sigmoid output layer, multi-label targets
        return (fk.WeightedBinaryCrossentropy(pos_weight=[1.0, 2.0, 4.0], gamma_neg=2.0, clip=0.05),
                _classifier(3, "sigmoid"), x, (x[:, :3] > 0.5).astype("float32"), None)
    # correlation losses: a padded batch of sequences through a Masking layer
    x, y = padded_sequences([T, T, 9, 7] * (SAMPLES // 4))
    loss = {"pearson": fk.PearsonCorrelationLoss(), "concordance": fk.ConcordanceCorrelationLoss()}[name]
    return loss, masked_sequence_model(), x, y, rng.uniform(0.5, 1.5, SAMPLES).astype("float32")


TRAINING = ["categorical", "sparse", "weighted bce", "pearson", "concordance"]


@pytest.mark.parametrize("name", TRAINING)
def test_model_fit_lowers_the_loss(name):
    loss, model, x, y, sample_weight = _training_case(name)
    model.compile(keras.optimizers.Adam(0.05), loss=loss)
    before = model.evaluate(x, y, sample_weight=sample_weight, batch_size=8, verbose=0)
    history = model.fit(x, y, sample_weight=sample_weight, batch_size=8, epochs=4, verbose=0).history["loss"]
    after = model.evaluate(x, y, sample_weight=sample_weight, batch_size=8, verbose=0)
    assert np.isfinite(history).all() and np.isfinite(after)
    assert after < before


@pytest.mark.parametrize("name", TRAINING)
def test_saved_model_loads_without_custom_objects(name, tmp_path):
    loss, model, x, y, sample_weight = _training_case(name)
    model.compile("adam", loss=loss)
    model.fit(x, y, sample_weight=sample_weight, batch_size=8, verbose=0)  # saved with its optimizer state
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.loss) is type(loss) and loaded.loss.get_config() == loss.get_config()
    assert loaded.evaluate(x, y, sample_weight=sample_weight, verbose=0) == pytest.approx(
        model.evaluate(x, y, sample_weight=sample_weight, verbose=0), rel=1e-6)


CONFIGURED = {
    "categorical": lambda: fk.CostSensitiveCategoricalCrossentropy([[1, 2], [3, 1]], from_logits=True,
                                                                   label_smoothing=0.1, cost_mode="expected",
                                                                   reduction="sum", name="cs"),
    "sparse": lambda: fk.CostSensitiveSparseCategoricalCrossentropy(np.array([[1.0, 1.5], [2.5, 1.0]]),
                                                                    ignore_class=255, reduction=None),
    "pearson": lambda: fk.PearsonCorrelationLoss(eps=1e-4, reduction="mean_with_sample_weight"),
    "concordance": lambda: fk.ConcordanceCorrelationLoss(eps=0.0, name="ccc"),
    "weighted bce": lambda: fk.WeightedBinaryCrossentropy(torch.tensor([1.0, 3.0]), from_logits=True,
                                                          gamma_pos=1.0, gamma_neg=4.0, clip=0.05),
}


@pytest.mark.parametrize("name", CONFIGURED)
def test_get_config_round_trip(name):
    loss = CONFIGURED[name]()
    config = loss.get_config()
    assert json.loads(json.dumps(config)) == config  # plain JSON: the cost matrix / pos_weight as nested lists
    assert type(loss).from_config(config).get_config() == config
    restored = keras.losses.deserialize(json.loads(json.dumps(keras.losses.serialize(loss))))
    assert type(restored) is type(loss) and restored.get_config() == config
    assert keras.saving.get_registered_name(type(loss)) == f"fused_losses>{type(loss).__name__}"
    expected = {"categorical": {"cost_matrix": [[1.0, 2.0], [3.0, 1.0]], "from_logits": True, "label_smoothing": 0.1,
                                "cost_mode": "expected", "reduction": "sum", "name": "cs"},
                "sparse": {"cost_matrix": [[1.0, 1.5], [2.5, 1.0]], "from_logits": False, "ignore_class": 255,
                           "cost_mode": "argmax", "reduction": None},
                "pearson": {"eps": 1e-4, "reduction": "mean_with_sample_weight"},
                "concordance": {"eps": 0.0, "name": "ccc"},
                "weighted bce": {"pos_weight": [1.0, 3.0], "from_logits": True, "gamma_pos": 1.0, "gamma_neg": 4.0,
                                 "clip": 0.05}}[name]
    assert {key: config[key] for key in expected} == expected


# ----------------------------------------------------------------------------- torch.compile (jit_compile)


def _with_keras_mask(y_pred, mask):
    y_pred = y_pred * 1.0  # as a layer output inside the graph: the Masking layer sets the mask there
    y_pred._keras_mask = mask
    return y_pred


@pytest.mark.parametrize("case", ["categorical argmax", "sparse expected", "pearson", "weighted bce",
                                  "sparse ignore_class", "pearson masked"])
def test_traced_by_torch_compile_without_graph_breaks(case):
    if case == "sparse ignore_class":
        logits = on_device(torch.randn(N, C))
        y_true = torch.tensor([0, -1, 2, 3, -1, 4, 1, 0], device=DEVICE)
        loss = fk.CostSensitiveSparseCategoricalCrossentropy(cost_matrix(C), ignore_class=-1)
        y_pred = logits.softmax(-1)
    elif case == "pearson masked":
        loss, y_true, y_pred, _ = CASES["pearson"]()
        mask = torch.arange(T, device=DEVICE) < torch.arange(3, 3 + N, device=DEVICE)[:, None]
    else:
        loss, y_true, y_pred, _ = CASES[case]()
    weights = on_device(torch.rand(N))

    def step(y_pred, sample_weight):
        if case == "pearson masked":
            y_pred = _with_keras_mask(y_pred, mask)
        return loss(y_true, y_pred, sample_weight)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_same(value_and_grad(lambda x: compiled(x, weights), y_pred),
                value_and_grad(lambda x: step(x, weights), y_pred))
    if case == "pearson masked":  # the mask set inside the graph reached the kernel
        expected = fused_losses.pearson_correlation_loss(y_pred, y_true, mask=mask, reduction="none", eps=1e-6)
        torch.testing.assert_close(compiled(y_pred, weights), (weights * expected.mean(-1)).mean())


def test_model_compiled_with_jit_compile_trains_as_in_eager_mode(monkeypatch):
    """Keras' jit_compile=True wraps the train step in torch.compile: the same losses as eager mode. The step is
    compiled with the aot_eager backend here (Dynamo's tracing and AOT autograd, as with inductor, without
    inductor's code generation, which takes about a minute on 2 cores; the op tests compile the fused ops
    with inductor)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, **{**kwargs, "backend": "aot_eager"}))
    losses = {}
    for jit_compile in (False, True):
        keras.utils.set_random_seed(0)
        loss, model, x, y, sample_weight = _training_case("pearson")
        model.compile(keras.optimizers.SGD(0.1), loss=loss, jit_compile=jit_compile)
        assert model.jit_compile == jit_compile
        losses[jit_compile] = model.fit(x, y, sample_weight=sample_weight, batch_size=8, epochs=2,
                                        shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


# ----------------------------------------------------------------------------- errors and the import guard


def test_argument_errors():
    with pytest.raises(ValueError, match="cost_matrix is required"):
        fk.CostSensitiveCategoricalCrossentropy(None)
    with pytest.raises(ValueError, match=r"cost_matrix must be square \(C, C\), got shape \(2, 3\)"):
        fk.CostSensitiveCategoricalCrossentropy(np.ones((2, 3)))
    with pytest.raises(ValueError, match="cost_matrix must be non-negative"):
        fk.CostSensitiveSparseCategoricalCrossentropy([[1.0, -1.0], [1.0, 1.0]])
    with pytest.raises(TypeError, match="cost_matrix must be a tensor or an array-like"):
        fk.CostSensitiveSparseCategoricalCrossentropy("ones")
    with pytest.raises(ValueError, match="cost_mode must be one of"):
        fk.CostSensitiveSparseCategoricalCrossentropy(np.ones((2, 2)), cost_mode="mean")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        fk.CostSensitiveCategoricalCrossentropy(np.ones((2, 2)), label_smoothing=1.5)
    with pytest.raises(ValueError, match="ignore_class must be an integer label value or None, got 0.5"):
        fk.CostSensitiveSparseCategoricalCrossentropy(np.ones((2, 2)), ignore_class=0.5)
    with pytest.warns(UserWarning, match="zeros on its diagonal"):
        fk.CostSensitiveCategoricalCrossentropy(1 - np.eye(3))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        fk.PearsonCorrelationLoss(eps=-1.0)
    with pytest.raises(ValueError, match="gamma_neg must be a finite number >= 0"):
        fk.WeightedBinaryCrossentropy(gamma_neg=-2.0)
    with pytest.raises(ValueError, match=r"clip must be in \[0, 1\)"):
        fk.WeightedBinaryCrossentropy(clip=1.0)
    with pytest.raises(TypeError, match="pos_weight must be a tensor or an array-like"):
        fk.WeightedBinaryCrossentropy(pos_weight="balanced")
    with pytest.raises(ValueError, match="reduction"):
        fk.WeightedBinaryCrossentropy(reduction="median")

    logits = on_device(torch.randn(N, C))
    with pytest.raises(ValueError, match=r"y_true must be one-hot with y_pred's shape \(8, 5\), got shape \(8,\)"):
        fk.CostSensitiveCategoricalCrossentropy(np.ones((C, C)))(torch.zeros(N, device=DEVICE), logits)
    with pytest.raises(ValueError, match=r"y_true must hold one class index per sample, shape \(8,\)"):
        fk.CostSensitiveSparseCategoricalCrossentropy(np.ones((C, C)))(torch.zeros(N, C, device=DEVICE), logits)
    with pytest.raises(ValueError, match="y_pred must have a class axis last"):
        fk.CostSensitiveSparseCategoricalCrossentropy(np.ones((C, C)))(torch.zeros((), device=DEVICE),
                                                                       logits[0, 0])
    with pytest.raises(ValueError, match=r"y_pred must have shape \(batch, time\) or \(batch, time, channels\)"):
        fk.ConcordanceCorrelationLoss()(torch.zeros(N, T, 1, 1), torch.zeros(N, T, 1, 1))


def _import_a_copy_of_the_module():
    """Runs fused_losses/keras.py afresh (as a first import would), without touching the imported module."""
    spec = importlib.util.spec_from_file_location("fused_losses._keras_import_check", fk.__file__)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_import_needs_keras_on_the_torch_backend(monkeypatch):
    monkeypatch.setattr(keras.config, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="Keras runs on 'jax': set the environment variable KERAS_BACKEND=torch"):
        _import_a_copy_of_the_module()
    monkeypatch.setitem(sys.modules, "keras", None)  # as if Keras were not installed
    with pytest.raises(ImportError, match=r"pip install 'fused_losses\[keras\]'\) and set the environment variable "
                                          "KERAS_BACKEND=torch"):
        _import_a_copy_of_the_module()


def test_fused_losses_does_not_import_keras_and_a_fresh_process_loads_a_saved_model(tmp_path):
    loss, model, x, y, _ = _training_case("pearson")
    model.compile("adam", loss=loss)
    model.fit(x, y, verbose=0)
    model.save(tmp_path / "m.keras")
    expected = model.evaluate(x, y, verbose=0)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    script = f"""
import sys
import fused_losses
assert "keras" not in sys.modules, "import fused_losses imported keras"
import fused_losses.keras  # registers the losses; load_model needs nothing else
import keras, numpy as np
model = keras.models.load_model({str(tmp_path / "m.keras")!r})
print(type(model.loss).__module__, type(model.loss).__name__)
print(model.evaluate(np.load({str(tmp_path / "x.npy")!r}), np.load({str(tmp_path / "y.npy")!r}), verbose=0))
"""
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    name, value = result.stdout.split("\n")[-3:-1]
    assert name == "fused_losses.keras PearsonCorrelationLoss"
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_keras_example_quick_mode(tmp_path):
    """examples/keras_losses.py --quick: the three parts run end to end and report what the README quotes."""
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("keras_losses_example", ROOT / "examples" / "keras_losses.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "results.json"
    threads = torch.get_num_threads()
    try:
        results = example.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the example runs PyTorch on one thread
    assert json.loads(out.read_text()) == results
    assert set(results["digits"]) == {"CategoricalCrossentropy", "cost-sensitive, argmax", "cost-sensitive, expected"}
    sequences = results["sequences"]
    assert sequences["loss shape"] == [example.BATCH]
    assert sequences["gradient difference, masked"] < 1e-6 < sequences["gradient difference, unmasked"]
    assert -1 <= sequences["r untrained"] <= 1 and -1 <= sequences["r trained"] <= 1
    assert set(results["multilabel"]) == {"BinaryCrossentropy", "pos_weight", "ASL (gamma_neg 4, clip 0.05)"}
    assert all(0 <= r["no label predicted"] <= 1 and 0 <= r["micro F1"] <= 1 for r in results["multilabel"].values())
