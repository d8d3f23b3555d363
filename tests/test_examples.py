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
    out = tmp_path / "digits.png"
    totals = example.main(["--epochs", "1", "--seeds", "1", "--device", "cpu", "--out", str(out)])
    assert set(totals) == {"plain cross-entropy", "cost-sensitive, argmax", "cost-sensitive, expected"}
    assert all(total >= 0 for total in totals.values())
    assert out.stat().st_size > 0


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
