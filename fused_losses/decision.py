"""Decision rules: turning a classifier's logits into the prediction that costs least."""

import torch
from torch import Tensor

from ._validation import as_float_tensor, can_check_values, check_tensor

__all__ = ["bayes_decision"]


def bayes_decision(logits: Tensor, cost_matrix) -> Tensor:
    r"""The minimum-expected-cost class of each sample (the Bayes decision under a cost matrix).

    ``prediction = argmin_j sum_i softmax(logits)_i * cost_matrix[i, j]``: the class whose prediction costs
    least on average when the true class is drawn from the model's probabilities. The cost matrix has
    **rows = true class, columns = predicted class**, as everywhere in fused_losses. With
    ``cost_matrix = 1 - eye(C)`` (every mistake costs 1) this is ``argmax``. Ties go to the lowest index, as
    ``torch.argmin``. The rule is only as good as the probabilities: it needs a calibrated model.

    Infinite logits take the limit of softmax: a row with ``+inf`` entries puts all its probability on them,
    shared equally (a row of ``-inf`` only: uniform). A row holding a NaN gets ``torch.argmax``'s class for it
    (the first NaN), whatever the costs.

    Adding a constant to a row of the cost matrix does not change the decision, so costs may be negative
    (a gain for a correct prediction); they must be finite (checked on the CPU, and on CUDA with
    ``FUSED_LOSSES_CHECK=1``, which costs a host synchronisation).

    Args:
        logits: ``(N, C)`` or ``(N, C, d1, ..., dk)`` (class axis 1, as ``F.cross_entropy``), or ``(C,)`` for
            one sample; any floating-point dtype. Probabilities and expected costs are computed in float32
            (float64 for double logits).
        cost_matrix: ``(C, C)`` finite costs: a tensor on the logits' device or an array-like (nested lists,
            a NumPy array).

    Returns:
        int64 class indices of shape ``(N,)`` / ``(N, d1, ..., dk)`` (``()`` for one sample), on the logits'
        device.

    Example:
        >>> cost = torch.ones(3, 3) - torch.eye(3); cost[1, 2] = 10   # a true B predicted as C costs 10
        >>> predicted = bayes_decision(model(x), cost)                # C is predicted only when B is unlikely
    """
    check_tensor("logits", logits)
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError("logits must have shape (C,), (N, C) or (N, C, d1, ..., dk), got a scalar")
    class_dim = 0 if logits.dim() == 1 else 1
    num_classes = logits.shape[class_dim]
    if num_classes == 0:
        raise ValueError(f"logits must have at least one class (axis {class_dim} has size 0)")
    if cost_matrix is None:  # as_float_tensor passes None through (an absent optional argument elsewhere)
        raise TypeError("cost_matrix must be a (C, C) tensor or array-like of costs, got None")
    if isinstance(cost_matrix, Tensor) and cost_matrix.device != logits.device:
        raise ValueError(f"cost_matrix is on {cost_matrix.device} but logits are on {logits.device}")
    cost = as_float_tensor("cost_matrix", cost_matrix, 2, logits.device)
    if cost.shape != (num_classes, num_classes):
        raise ValueError(f"cost_matrix must have shape ({num_classes}, {num_classes}) for logits with "
                         f"{num_classes} classes on axis {class_dim}, got {tuple(cost.shape)}")
    if can_check_values(cost) and not bool(torch.isfinite(cost).all()):
        raise ValueError("cost_matrix must contain only finite values")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dtype).movedim(class_dim, -1)  # (..., C)
    top = logits.amax(dim=-1, keepdim=True)  # NaN where the row holds a NaN
    probabilities = torch.softmax(logits, dim=-1)
    # Softmax is NaN where the largest logit is infinite (+inf, or -inf throughout): its limit shares the mass
    # equally among the entries equal to that logit. Selected without reading values: no host synchronisation.
    at_top = (logits == top).to(dtype)
    probabilities = torch.where(top.isinf(), at_top / at_top.sum(dim=-1, keepdim=True), probabilities)
    expected_cost = probabilities @ cost.to(dtype)  # (..., C): entry j = sum_i p_i cost[i, j]
    # A NaN row has no probabilities: it gets argmax's answer (the first NaN), as documented.
    return torch.where(top.squeeze(-1).isnan(), logits.argmax(dim=-1), expected_cost.argmin(dim=-1))
