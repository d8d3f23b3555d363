"""bayes_decision: the minimum-expected-cost class, against a brute-force computation, argmax for 0-1 costs,
a hand-worked example, ties, layouts and errors."""

import math

import numpy as np
import pytest
import torch

import fused_losses
from conftest import FLOAT_DTYPES

bayes_decision = fused_losses.bayes_decision


def brute_force_expected_costs(logits: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """(N, C) logits -> (N, C) expected cost of predicting each class, one Python sum at a time in float64."""
    rows = logits.double().cpu().tolist()
    cost = cost.double().cpu().tolist()
    table = []
    for row in rows:
        top = max(row)
        exps = [math.exp(z - top) for z in row]
        probabilities = [e / sum(exps) for e in exps]
        table.append([sum(p * cost[i][j] for i, p in enumerate(probabilities)) for j in range(len(row))])
    return torch.tensor(table, dtype=torch.float64)


def assert_minimises_expected_cost(predicted, logits, cost, tolerance):
    """Each prediction's expected cost is the minimum (to `tolerance`: the op rounds in float32), and it is
    the brute-force argmin wherever the runner-up is more than `tolerance` away."""
    expected_costs = brute_force_expected_costs(logits, cost)
    predicted = predicted.cpu()
    best, best_index = expected_costs.min(dim=1)
    chosen = expected_costs.gather(1, predicted[:, None]).squeeze(1)
    assert (chosen - best).max() <= tolerance
    runner_up = expected_costs.scatter(1, best_index[:, None], math.inf).min(dim=1).values
    clear = runner_up - best > tolerance
    assert clear.float().mean() > 0.9  # the comparison below is not vacuous
    assert torch.equal(predicted[clear], best_index[clear])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_brute_force(device, dtype):
    logits = (torch.randn(300, 7, dtype=torch.float64) * 2).to(device=device, dtype=dtype)
    cost = torch.rand(7, 7, dtype=torch.float64) * 10
    cost.fill_diagonal_(0)
    predicted = bayes_decision(logits, cost.to(device))
    assert predicted.dtype == torch.int64 and predicted.shape == (300,) and predicted.device == logits.device
    assert_minimises_expected_cost(predicted, logits, cost, 1e-12 if dtype == torch.float64 else 1e-5)
    # Asymmetric costs must change some decisions, or the test above would also pass for argmax.
    assert not torch.equal(predicted, logits.argmax(1))


def test_zero_one_costs_give_argmax(device):
    logits = torch.randn(500, 10, device=device) * 3
    zero_one = 1 - torch.eye(10, device=device)
    assert torch.equal(bayes_decision(logits, zero_one), logits.argmax(1))
    # Scaling all costs, or adding a constant to a row (the cost of the true class), changes nothing.
    row_shift = torch.arange(10.0, device=device)[:, None]
    assert torch.equal(bayes_decision(logits, 5 * zero_one + row_shift), logits.argmax(1))


def test_hand_worked_asymmetric_example(device):
    # Probabilities (0.5, 0.3, 0.2) for classes A, B, C; a true B predicted as A costs 10, A as B costs 2,
    # the other mistakes 1. Expected cost of predicting A: 0.3 * 10 + 0.2 * 1 = 3.2; B: 0.5 * 2 + 0.2 * 1 = 1.2;
    # C: 0.5 * 1 + 0.3 * 1 = 0.8. The least likely class is the cheapest prediction.
    logits = torch.tensor([0.5, 0.3, 0.2], device=device).log()
    cost = [[0, 2, 1], [10, 0, 1], [1, 1, 0]]
    assert bayes_decision(logits, cost).item() == 2
    assert logits.argmax().item() == 0
    # Rows are the true class: a true B predicted as A costing 10 (A: 3.2, B: 0.5 + 0.2 = 0.7, C: 0.8) makes
    # B the decision; the transposed matrix, a true A predicted as B costing 10 (A: 0.3 + 0.2 = 0.5,
    # B: 5.2, C: 0.8), leaves A.
    b_as_a = [[0, 1, 1], [10, 0, 1], [1, 1, 0]]
    assert bayes_decision(logits, b_as_a).item() == 1
    assert bayes_decision(logits, torch.tensor(b_as_a, device=device).T).item() == 0


def test_ties_go_to_the_lowest_index(device):
    uniform = torch.zeros(3, 4, device=device)  # probabilities exactly 0.25: expected costs are exact
    assert torch.equal(bayes_decision(uniform, 1 - torch.eye(4, device=device)), torch.zeros(3, dtype=torch.long,
                                                                                           device=device))
    # Column means 5, 1, 1, 1: predicting class 1, 2 or 3 costs the same.
    cost = torch.tensor([[5, 0, 1, 0], [5, 1, 0, 1], [5, 1, 1, 1], [5, 2, 2, 2]], device=device)
    assert torch.equal(bayes_decision(uniform, cost), torch.ones(3, dtype=torch.long, device=device))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_infinite_and_nan_logits(device, dtype):
    """Softmax of a row with +inf logits is NaN; its limit puts the mass on the +inf entries, shared equally (an
    all -inf row: on every entry). A NaN row gives torch.argmax's answer (it takes NaN as the maximum). With
    0-1 costs every row is argmax, as for finite logits."""
    inf, nan = math.inf, math.nan
    logits = torch.tensor([[0.0, inf, 0.0], [inf, 0.0, inf], [-inf, inf, -inf], [-inf, -inf, -inf],
                           [0.0, nan, 0.0], [nan, inf, nan], [5.0, -inf, 0.0]], dtype=dtype, device=device)
    assert torch.equal(bayes_decision(logits, 1 - torch.eye(3, device=device)), logits.argmax(1))
    # The mass of row 1 is split between classes 0 and 2: predicting 1 costs 1 (the cheapest), 0 and 2 cost 5.
    cost = torch.tensor([[0.0, 1.0, 10.0], [1.0, 0.0, 1.0], [10.0, 1.0, 0.0]], device=device)
    expected = torch.tensor([1, 1, 1, 1, 1, 0, 0], device=device)
    assert torch.equal(bayes_decision(logits, cost), expected)


def test_half_precision_logits_that_overflow_to_inf(device):
    logits = torch.tensor([[0.0, 7e4, 0.0]], device=device).half()  # 7e4 is above float16's largest, 65504
    assert torch.equal(bayes_decision(logits, 1 - torch.eye(3, device=device)), torch.tensor([1], device=device))


def test_class_axis_is_one_for_extra_dimensions(device):
    logits = torch.randn(4, 5, 3, 2, device=device)
    cost = torch.rand(5, 5, device=device)
    predicted = bayes_decision(logits, cost)
    assert predicted.shape == (4, 3, 2)
    flat = logits.movedim(1, -1).reshape(-1, 5)
    assert torch.equal(predicted.reshape(-1), bayes_decision(flat, cost))
    assert_minimises_expected_cost(predicted.reshape(-1), flat, cost, 1e-5)


def test_one_sample_and_empty_batch(device):
    logits = torch.randn(6, 5, device=device)
    cost = torch.rand(5, 5, device=device)
    batched = bayes_decision(logits, cost)
    for i in range(6):
        single = bayes_decision(logits[i], cost)
        assert single.shape == () and single.item() == batched[i].item()
    assert bayes_decision(torch.empty(0, 5, device=device), cost).shape == (0,)


def test_cost_matrix_as_array_like_or_integer_tensor(device):
    logits = torch.randn(50, 3, device=device)
    cost = [[0, 1, 4], [1, 0, 1], [9, 1, 0]]
    expected = bayes_decision(logits, torch.tensor(cost, dtype=torch.float32, device=device))
    assert torch.equal(bayes_decision(logits, cost), expected)
    assert torch.equal(bayes_decision(logits, np.array(cost)), expected)
    assert torch.equal(bayes_decision(logits, torch.tensor(cost, device=device)), expected)


def test_errors_name_the_argument():
    cost = torch.ones(3, 3)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        bayes_decision([[0.0, 1.0, 2.0]], cost)
    with pytest.raises(TypeError, match="logits must be a floating-point tensor, got torch.int64"):
        bayes_decision(torch.zeros(2, 3, dtype=torch.long), cost)
    with pytest.raises(ValueError, match="logits must have shape"):
        bayes_decision(torch.tensor(1.0), cost)
    with pytest.raises(ValueError, match=r"cost_matrix must have shape \(4, 4\) .* got \(3, 3\)"):
        bayes_decision(torch.zeros(2, 4), cost)
    with pytest.raises(ValueError, match=r"cost_matrix must have shape \(3, 3\) .* got \(3, 4\)"):
        bayes_decision(torch.zeros(2, 3), torch.ones(3, 4))
    with pytest.raises(ValueError, match="cost_matrix must have 2 dimension"):
        bayes_decision(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(TypeError, match="cost_matrix must be a tensor or an array-like"):
        bayes_decision(torch.zeros(2, 3), "costs")
    with pytest.raises(ValueError, match="cost_matrix must contain only finite values"):
        bayes_decision(torch.zeros(2, 3), [[0, 1, 1], [1, 0, math.inf], [1, 1, 0]])
    with pytest.raises(ValueError, match="cost_matrix is on meta but logits are on cpu"):
        bayes_decision(torch.zeros(2, 3), torch.ones(3, 3, device="meta"))
    with pytest.raises(TypeError, match=r"logits must be a dense tensor \(torch.strided layout\), got layout "
                                        r"torch.sparse_coo"):
        bayes_decision(torch.zeros(2, 3).to_sparse(), cost)
    with pytest.raises(TypeError, match=r"cost_matrix must be a dense tensor \(torch.strided layout\), got layout "
                                        r"torch.sparse_coo"):
        bayes_decision(torch.zeros(2, 3), cost.to_sparse())
    with pytest.raises(TypeError, match="cost_matrix must hold real numbers, got torch.complex64"):
        bayes_decision(torch.zeros(2, 2), [[1, 1 + 5j], [1, 1]])
    with pytest.raises(TypeError, match="cost_matrix must hold real numbers, got torch.complex128"):
        bayes_decision(torch.zeros(2, 2), torch.tensor([[1, 1 + 5j], [1, 1]], dtype=torch.complex128))
    with pytest.raises(TypeError, match=r"cost_matrix must be a \(C, C\) tensor or array-like of costs, got None"):
        bayes_decision(torch.zeros(2, 3), None)
    with pytest.raises(ValueError, match=r"logits must have at least one class \(axis 1 has size 0\)"):
        bayes_decision(torch.zeros(2, 0), torch.zeros(0, 0))
    with pytest.raises(ValueError, match=r"logits must have at least one class \(axis 0 has size 0\)"):
        bayes_decision(torch.zeros(0), [])
