"""``torch.nn.Module`` wrappers of the fused losses (parameters such as cost matrices are buffers, so they
move with ``.to(device)`` and are saved in the ``state_dict``)."""

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import functional as F
from ._validation import REDUCTIONS, as_float_tensor, check_bool, check_choice, check_cost_matrix_values, \
    check_eps, check_focusing, check_integer, check_label_smoothing, warn_zero_diagonal

__all__ = ["CostSensitiveCrossEntropyLoss", "PearsonCorrelationLoss", "ConcordanceCorrelationLoss",
           "WeightedBCEWithLogitsLoss"]

TensorLike = Union[Tensor, Sequence]


def _as_float_buffer(name: str, value: Optional[TensorLike], ndim: Optional[int] = None) -> Optional[Tensor]:
    """`value` as a floating-point tensor of `ndim` dimensions (any number when None), for a buffer."""
    tensor = as_float_tensor(name, value, ndim)
    return None if tensor is None else tensor.detach().clone()


class _FusedLossModule(nn.Module):
    """Base of the modules. TorchScript cannot compile the Python argument checks in front of the operators:
    torch.jit.script (of the loss or of a model holding it) says so and names what works, rather than failing
    inside its compiler on an f-string."""

    def __prepare_scriptable__(self):
        raise TypeError(f"{type(self).__name__} cannot be compiled by torch.jit.script (its argument checks are "
                        "Python): use torch.export.export, torch.compile or torch.jit.trace, which record the fused "
                        "operator")


class CostSensitiveCrossEntropyLoss(_FusedLossModule):
    r"""Module form of :func:`fused_losses.cost_sensitive_cross_entropy`.

    Args:
        cost_matrix: ``(C, C)`` costs, rows = true class, columns = predicted class (tensor, nested list or
            NumPy array). Checked once here: square, finite, non-negative. In ``"argmax"`` mode keep the
            diagonal at 1 (the cost of a correct prediction scales its cross-entropy): a zero there gives
            correctly classified samples zero loss and zero gradient, and warns.
        weight, ignore_index, reduction, label_smoothing, cost_mode: as in the functional form.

    Shape:
        input ``(N, C)`` or ``(N, C, d1, ..., dk)``; target ``(N,)`` or ``(N, d1, ..., dk)``; output scalar,
        or the target's shape for ``reduction="none"``.

    Example:
        >>> # classes A, B, C: a true B predicted as C costs 1.2, every other outcome 1
        >>> criterion = CostSensitiveCrossEntropyLoss([[1, 1, 1], [1, 1, 1.2], [1, 1, 1]])
        >>> loss = criterion(logits, labels); loss.backward()
    """

    def __init__(self, cost_matrix: Optional[TensorLike] = None, weight: Optional[TensorLike] = None,
                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 cost_mode: str = "argmax") -> None:
        super().__init__()
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("cost_mode", cost_mode, F.COST_MODES)
        check_integer("ignore_index", ignore_index)
        check_label_smoothing(label_smoothing)
        cost = _as_float_buffer("cost_matrix", cost_matrix, 2)
        if cost is not None:
            if cost.shape[0] != cost.shape[1]:
                raise ValueError(f"cost_matrix must be square (C, C), got shape {tuple(cost.shape)}")
            check_cost_matrix_values(cost)
            warn_zero_diagonal(cost, cost_mode)
        self.register_buffer("cost_matrix", cost)
        self.register_buffer("weight", _as_float_buffer("weight", weight, 1))
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.cost_mode = cost_mode

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cost_sensitive_cross_entropy(input, target, self.cost_matrix, self.weight, self.ignore_index,
                                              self.reduction, self.label_smoothing, self.cost_mode)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, cost_mode={self.cost_mode!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}")


class _CorrelationLoss(_FusedLossModule):
    """Module form of a correlation loss; ``kind`` is set by the subclasses."""

    kind: str

    def __init__(self, dim: int = 1, reduction: str = "mean", per_timestep: bool = False, eps: float = 1e-8) -> None:
        super().__init__()
        check_integer("dim", dim)  # its range needs the input: checked at each call
        check_choice("reduction", reduction, REDUCTIONS)
        check_bool("per_timestep", per_timestep)
        check_eps(eps)
        self.dim = dim
        self.reduction = reduction
        self.per_timestep = per_timestep
        self.eps = eps

    def forward(self, input: Tensor, target: Tensor, mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        return F._correlation_loss(self.kind, input, target, mask, self.dim, self.reduction, self.per_timestep,
                                   self.eps, lengths)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, reduction={self.reduction!r}, per_timestep={self.per_timestep}, eps={self.eps}"


class PearsonCorrelationLoss(_CorrelationLoss):
    r"""Module form of :func:`fused_losses.pearson_correlation_loss`: ``1 - r`` per sequence.

    Args:
        dim, reduction, per_timestep, eps: as in the functional form.

    Shape:
        input, target ``(B, T)`` or ``(B, T, D)`` (time axis ``dim``); ``forward(input, target, mask=None,
        lengths=None)`` with mask the input's shape without the channel axis, lengths ``(B,)``. Output: scalar;
        ``(B,)`` / ``(B, D)`` for ``reduction="none"``; the input's shape with ``per_timestep=True`` too.

    Example:
        >>> criterion = PearsonCorrelationLoss()
        >>> loss = criterion(pred, true, lengths=lengths); loss.backward()
    """

    kind = "pearson"


class ConcordanceCorrelationLoss(_CorrelationLoss):
    r"""Module form of :func:`fused_losses.concordance_correlation_loss`: ``1 - CCC`` per sequence.

    Args:
        dim, reduction, per_timestep, eps: as in the functional form.

    Shape:
        as :class:`PearsonCorrelationLoss`.

    Example:
        >>> criterion = ConcordanceCorrelationLoss(dim=0)            # time-major (T, B, D) input
        >>> loss = criterion(pred, true, mask); loss.backward()
    """

    kind = "concordance"


class WeightedBCEWithLogitsLoss(_FusedLossModule):
    r"""Module form of :func:`fused_losses.weighted_bce_with_logits` (weighted, focal or asymmetric BCE).

    Args:
        weight: rescaling weight broadcastable to the input's shape (tensor or nested list), a buffer.
        pos_weight: weight of the positive term, usually ``(L,)`` (one per label), a buffer.
        reduction, gamma_pos, gamma_neg, clip: as in the functional form (checked here).

    Shape:
        input any shape with ``target`` of the same shape (float, bool or uint8), or ``(N, L)`` with
        ``positive_indices`` ``(N, K)`` int64 padded with -1; output scalar, or the input's shape for
        ``reduction="none"``.

    Example:
        >>> criterion = WeightedBCEWithLogitsLoss(pos_weight=torch.full((1000,), 3.0), gamma_neg=4.0, clip=0.05)
        >>> loss = criterion(logits, positive_indices=labels); loss.backward()
    """

    def __init__(self, weight: Optional[TensorLike] = None, pos_weight: Optional[TensorLike] = None,
                 reduction: str = "mean", gamma_pos: float = 0.0, gamma_neg: float = 0.0, clip: float = 0.0) -> None:
        super().__init__()
        check_choice("reduction", reduction, REDUCTIONS)
        check_focusing(gamma_pos, gamma_neg, clip)
        self.register_buffer("weight", _as_float_buffer("weight", weight))
        self.register_buffer("pos_weight", _as_float_buffer("pos_weight", pos_weight))
        self.reduction = reduction
        self.gamma_pos = gamma_pos
        self.gamma_neg = gamma_neg
        self.clip = clip

    def forward(self, input: Tensor, target: Optional[Tensor] = None,
                positive_indices: Optional[Tensor] = None) -> Tensor:
        return F.weighted_bce_with_logits(input, target, self.weight, self.pos_weight, self.reduction,
                                          positive_indices=positive_indices, gamma_pos=self.gamma_pos,
                                          gamma_neg=self.gamma_neg, clip=self.clip)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, "
                f"clip={self.clip}")
