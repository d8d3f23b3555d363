"""Smoke tests of the examples: a few steps each, on the CPU, checking they run end to end and report."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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


def test_sequence_correlation(tmp_path):
    pytest.importorskip("statsmodels")
    example = load_example("sequence_correlation")
    out = tmp_path / "sequences.png"
    results = example.main(["--steps", "3", "--device", "cpu", "--out", str(out)])
    assert set(results) == {"MSE", "Pearson", "CCC"}
    for res in results.values():
        assert -1 <= res["pearson"] <= 1 and res["mse"] >= 0
    assert out.stat().st_size > 0


def test_sparse_multilabel(tmp_path):
    example = load_example("sparse_multilabel")
    out = tmp_path / "multilabel.png"
    results = example.main(["--epochs", "1", "--device", "cpu", "--out", str(out)])
    assert "ASL, sparse indices" in results
    # Dense bool and sparse-index targets must train to the same model.
    import numpy as np

    np.testing.assert_allclose(results["ASL, dense bool"]["scores"], results["ASL, sparse indices"]["scores"],
                               atol=1e-4)
    assert out.stat().st_size > 0
