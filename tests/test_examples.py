"""Smoke tests of the examples: a few steps each, on the CPU, checking they run end to end and report."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def one_thread():
    """The examples run their tiny models on one thread (as their scripts do): faster than two here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example(name):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cost_sensitive_digits(tmp_path):
    example = load_example("cost_sensitive_digits")
    cost = example.misclassification_costs()
    assert cost[1, 8] == 8 and cost[8, 1] == 1 and cost.diagonal().eq(0).all()  # the documented asymmetry
    out = tmp_path / "out"
    results = example.main(["--epochs", "1", "--seeds", "2", "--device", "cpu", "--out", str(out)])
    assert set(results) == set(example.REGIMES)
    for per_regime in results.values():
        assert set(per_regime) == {(loss, decision) for loss in example.LOSSES for decision in example.DECISIONS}
        for measured in per_regime.values():
            assert len(measured["cost"]) == len(measured["accuracy"]) == 2
            assert all(cost >= 0 for cost in measured["cost"])
            assert all(0 <= accuracy <= 1 for accuracy in measured["accuracy"])
    assert [path.name for path in out.iterdir()] == ["cost_sensitive_digits.png"]
    assert (out / "cost_sensitive_digits.png").stat().st_size > 0


def test_sequence_correlation_data():
    example = load_example("sequence_correlation")
    for regime in example.REGIMES:
        (x, y, mask), (held_x, held_y, held_mask) = example.make_data(regime, seed=0)
        assert x.shape == (example.TRAINING_SEQUENCES, example.MAX_LENGTH, example.CHANNELS)
        assert held_y.shape == held_mask.shape == (example.HELD_OUT_SEQUENCES, example.MAX_LENGTH)
        lengths = held_mask.sum(1)
        assert lengths.min() >= example.MAX_LENGTH // 2 and lengths.max() <= example.MAX_LENGTH
        assert (held_x[~held_mask] == 0).all() and (held_y[~held_mask] == 0).all()
        # Raters' offsets and scales: per-sequence levels and spreads vary a lot only with biased raters.
        valid = held_mask.float()
        means = (held_y * valid).sum(1) / valid.sum(1)
        spreads = (((held_y - means[:, None]) ** 2 * valid).sum(1) / valid.sum(1)).sqrt()
        biased = regime == "biased raters"
        assert (means.std() > 1.0) == biased
        assert (spreads.max() / spreads.min() > 4) == biased
    # Held-out sequences are drawn apart from the training ones: no sequence is shared.
    assert not (held_y[:, None, :16] == y[None, :, :16]).all(-1).any()


def test_sequence_correlation(tmp_path):
    example = load_example("sequence_correlation")
    out = tmp_path / "out"
    results = example.main(["--steps", "3", "--seeds", "2", "--device", "cpu", "--out", str(out)])
    assert set(results) == set(example.REGIMES)
    for per_regime in results.values():
        assert set(per_regime) == set(example.LOSSES)
        for measured in per_regime.values():
            assert len(measured["pearson"]) == len(measured["ccc"]) == len(measured["rmse"]) == 2
            assert all(-1 <= r <= 1 for r in measured["pearson"] + measured["ccc"])
            assert all(rmse >= 0 for rmse in measured["rmse"])
    assert [path.name for path in out.iterdir()] == ["sequence_correlation.png"]
    assert (out / "sequence_correlation.png").stat().st_size > 0


def test_best_f1_thresholds():
    example = load_example("sparse_multilabel")
    scores = np.array([[0.9, 0.9], [0.8, 0.8], [0.3, 0.3], [0.2, 0.2]])
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=bool)
    # Column 0: predicting the top 1, 2, 3, 4 gives F1 2/3, 1/2, 4/5, 2/3: the best cut is at 0.3.
    # Column 1 has no positive: never predicted.
    np.testing.assert_array_equal(example.best_f1_thresholds(scores, y), [0.3, np.inf])


def test_sparse_multilabel(tmp_path):
    example = load_example("sparse_multilabel")
    out = tmp_path / "out"
    results, sparse_vs_dense = example.main(["--epochs", "1", "--seeds", "2", "--device", "cpu", "--out", str(out)])
    # Dense bool and sparse-index targets must train to the same model.
    assert sparse_vs_dense <= 1e-4
    assert set(results) == {"plain BCE", "pos_weight", "focal (gamma 2)", "ASL, dense bool", "ASL, sparse indices"}
    for measured in results.values():
        assert set(measured) == set(example.METRICS)
        assert all(len(values) == 2 and all(0 <= v <= 1 for v in values) for values in measured.values())
    assert [path.name for path in out.iterdir()] == ["sparse_multilabel.png"]
    assert (out / "sparse_multilabel.png").stat().st_size > 0
