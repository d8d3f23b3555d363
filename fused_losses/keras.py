"""Keras 3 losses over the fused kernels, for models trained with ``KERAS_BACKEND=torch``.

``keras.losses.Loss`` subclasses that follow Keras' own conventions (``from_logits``, ``reduction``, ``name``,
``dtype``, ``sample_weight``, ``get_config``):

- :class:`CostSensitiveCategoricalCrossentropy` (one-hot ``y_true``) and
  :class:`CostSensitiveSparseCategoricalCrossentropy` (integer ``y_true``) over
  :func:`fused_losses.cost_sensitive_cross_entropy`;
- :class:`PearsonCorrelationLoss` and :class:`ConcordanceCorrelationLoss`, one loss per sequence, over
  :func:`fused_losses.pearson_correlation_loss` / :func:`fused_losses.concordance_correlation_loss`; a Keras
  mask on ``y_pred`` (a ``Masking`` layer upstream) is the kernels' padding mask;
- :class:`WeightedBinaryCrossentropy` over :func:`fused_losses.weighted_bce_with_logits`.

Each ``call`` returns per-sample losses (the fused op with ``reduction="none"``); Keras applies ``sample_weight``
and its own ``reduction`` to them, as for its built-in losses. The classes are registered as serialisable
(package ``"fused_losses"``): after ``import fused_losses.keras`` a saved model compiled with one of them loads
with ``keras.models.load_model`` without ``custom_objects``.

Importing this module needs Keras >= 3 running on the torch backend: set the environment variable
``KERAS_BACKEND=torch`` before Keras is first imported. ``import fused_losses`` alone never imports Keras.

**Probabilities** (``from_logits=False``, Keras' default: a softmax / sigmoid output layer) are turned into
logits for the kernels as Keras' own cross-entropies treat them: clipped to ``[eps, 1 - eps]`` with
``eps = keras.config.epsilon()`` (1e-7 by default), then ``log(p)`` (softmax; ``p`` is first divided by its sum
over the class axis, as Keras does) or ``log(p) - log1p(-p)`` (sigmoid). The loss is finite for probabilities
of exactly 0 and 1, but this costs what it costs Keras: a probability held in float32 is only known to about
6e-8 near 1, so per-sample losses below ~1e-6 are off by several percent or more, and the clip caps a loss at
``-log(eps)`` (16.1) with **no gradient** once the model is more confident than ``1 - eps`` in a wrong answer
(the clipped probability is a constant). For probabilities inside ``[eps, 1 - eps]`` the loss equals the
``from_logits=True`` loss on the logits that produced them to float32 rounding (the tests check 1e-5).
The recommended form, as in Keras, is ``from_logits=True`` with a linear output layer: the kernels then read
the logits directly, with no clip, and stay exact and finite for logits up to ``|1e4|``.
"""

import os
from typing import Optional

import torch
from torch import Tensor

from ._validation import as_float_tensor, can_check_values, check_choice, check_cost_matrix_values, check_eps, \
    check_focusing, check_label_smoothing, warn_zero_diagonal
from .functional import COST_MODES, concordance_correlation_loss, cost_sensitive_cross_entropy, \
    pearson_correlation_loss, weighted_bce_with_logits

try:
    import keras
except ImportError as error:
    raise ImportError(
        "fused_losses.keras needs Keras 3 running on the torch backend, and `import keras` failed "
        f"(KERAS_BACKEND={os.environ.get('KERAS_BACKEND', '<unset>')}): {error}. Install Keras "
        "(pip install 'fused_losses[keras]') and set the environment variable KERAS_BACKEND=torch before Keras "
        "is first imported") from error

if int(keras.__version__.split(".")[0]) < 3:
    raise ImportError(f"fused_losses.keras needs Keras 3 (its torch backend); found keras {keras.__version__}: "
                      "pip install 'fused_losses[keras]'")
if keras.config.backend() != "torch":
    raise RuntimeError(f"fused_losses.keras needs Keras' torch backend, but Keras runs on "
                       f"{keras.config.backend()!r}: set the environment variable KERAS_BACKEND=torch before Keras "
                       "is first imported (in a fresh process)")

# Keras internals that its own losses use (pinned and tested: keras==3.15.1): the mask attribute of a tensor and
# the reduction of keras.losses.Loss.__call__.
from keras.src.backend import get_keras_mask, set_keras_mask  # noqa: E402
from keras.src.losses.loss import reduce_weighted_values  # noqa: E402

__all__ = ["CostSensitiveCategoricalCrossentropy", "CostSensitiveSparseCategoricalCrossentropy",
           "PearsonCorrelationLoss", "ConcordanceCorrelationLoss", "WeightedBinaryCrossentropy"]

_serializable = keras.saving.register_keras_serializable(package="fused_losses")


class _PerDevice:
    """A constant tensor (a cost matrix, pos_weight) copied once to each device it is used on: a copy per
    training step would synchronise the host with the GPU every step."""

    def __init__(self, tensor: Tensor) -> None:
        self._copies = {tensor.device: tensor}
        self.value = tensor

    def on(self, device: torch.device) -> Tensor:
        copy = self._copies.get(device)
        if copy is None:
            copy = self._copies[device] = self.value.to(device)
        return copy


def _computation_dtype(x: Tensor) -> torch.dtype:
    """At least float32 for the probability-to-logit conversion: in float16, 1 - 1e-7 rounds to 1."""
    return torch.promote_types(x.dtype, torch.float32)


def _softmax_probabilities_to_logits(probabilities: Tensor) -> Tensor:
    """Logits whose softmax is ``p / sum(p)`` clipped to ``[eps, 1 - eps]`` (Keras' categorical cross-entropy
    on probabilities: ``-log`` of the same clipped values, up to ``log`` of their sum, ``|.| <= C eps``)."""
    eps = keras.config.epsilon()
    p = probabilities.to(_computation_dtype(probabilities))
    p = p / p.sum(dim=-1, keepdim=True)
    return torch.log(p.clamp(eps, 1.0 - eps)).to(probabilities.dtype)


def _sigmoid_probabilities_to_logits(probabilities: Tensor) -> Tensor:
    """The logit ``log(p) - log1p(-p)`` of ``p`` clipped to ``[eps, 1 - eps]``, whose sigmoid is that ``p``
    (Keras' binary cross-entropy on probabilities clips the same way)."""
    eps = keras.config.epsilon()
    p = probabilities.to(_computation_dtype(probabilities)).clamp(eps, 1.0 - eps)
    return (torch.log(p) - torch.log1p(-p)).to(probabilities.dtype)


def _match_label_rank(y_true: Tensor, y_pred: Tensor) -> Tensor:
    """``y_true`` with a trailing axis of size 1 added or dropped to match ``y_pred`` (``(B,)`` labels for a
    ``(B, 1)`` output and the reverse), as Keras' losses do."""
    if y_true.dim() + 1 == y_pred.dim() and y_pred.shape[-1] == 1:
        return y_true.unsqueeze(-1)
    if y_true.dim() == y_pred.dim() + 1 and y_true.shape[-1] == 1:
        return y_true.squeeze(-1)
    return y_true


def _one_hot_to_class_indices(y_true: Tensor, ignored: int) -> Tensor:
    """Class indices of one-hot rows (last axis); an all-zero row (padding) gets `ignored`: zero loss, as in
    Keras' categorical cross-entropy. A soft or multi-hot row raises where values may be read (always on the
    CPU, on CUDA with FUSED_LOSSES_CHECK=1): its argmax would silently stand for a hard label."""
    if can_check_values(y_true):
        is_one = y_true == 1
        if not bool(((y_true == 0) | is_one).all()) or bool((is_one.sum(dim=-1) > 1).any()):
            raise ValueError("y_true must be one-hot (one 1 per sample, zeros elsewhere; an all-zero row is "
                             "padding): soft, smoothed or mixed-up labels are not supported, the cost is looked up "
                             "by the true class (for smoothing pass label_smoothing=)")
    return torch.where(y_true.any(dim=-1), y_true.argmax(dim=-1), ignored)


def _check_class_axis(y_pred: Tensor) -> None:
    if y_pred.dim() < 2:
        raise ValueError(f"y_pred must have a class axis last, shape (batch, ..., classes), got shape "
                         f"{tuple(y_pred.shape)}")


class _Loss(keras.losses.Loss):
    """``keras.losses.Loss`` that leaves the caller's ``sample_weight`` alone: with a mask (a Keras mask on
    ``y_pred``, ``ignore_class``) Keras 3's reduction multiplies it into ``sample_weight`` in place, which changes
    a torch tensor passed by the caller. It gets a copy (``model.fit`` passes its own per-batch tensors)."""

    def __call__(self, y_true, y_pred, sample_weight=None):
        if isinstance(sample_weight, Tensor):
            sample_weight = sample_weight.clone()
        return super().__call__(y_true, y_pred, sample_weight)


class _CostSensitiveCrossentropy(_Loss):
    """Shared part of the two cost-sensitive cross-entropies: the subclasses turn ``y_true`` into class indices."""

    def __init__(self, cost_matrix, from_logits, label_smoothing, ignore_class, cost_mode, reduction, name,
                 dtype) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        check_choice("cost_mode", cost_mode, COST_MODES)
        check_label_smoothing(label_smoothing)
        if cost_matrix is None:
            raise ValueError("cost_matrix is required: a (C, C) array, rows = true class, columns = predicted "
                             "class (all ones gives Keras' plain cross-entropy)")
        cost = as_float_tensor("cost_matrix", cost_matrix, 2).detach().to(torch.float32, copy=True)
        if cost.shape[0] != cost.shape[1]:
            raise ValueError(f"cost_matrix must be square (C, C), got shape {tuple(cost.shape)}")
        check_cost_matrix_values(cost)
        warn_zero_diagonal(cost, cost_mode)
        self._cost_matrix = _PerDevice(cost)
        self.from_logits = bool(from_logits)
        self.label_smoothing = float(label_smoothing)
        self.ignore_class = ignore_class
        self.cost_mode = cost_mode

    @property
    def cost_matrix(self) -> Tensor:
        """The ``(C, C)`` float32 cost matrix (rows = true class, columns = predicted class)."""
        return self._cost_matrix.value

    @property
    def _ignore_index(self) -> int:
        return -100 if self.ignore_class is None else int(self.ignore_class)

    def _per_sample_losses(self, labels: Tensor, y_pred: Tensor) -> Tensor:
        """Per-sample losses for int64 class indices ``labels`` (``y_pred``'s shape without its last axis)."""
        logits = y_pred if self.from_logits else _softmax_probabilities_to_logits(y_pred)
        if logits.dim() > 2:
            logits = logits.movedim(-1, 1)  # the fused op takes the class axis second, as F.cross_entropy
        return cost_sensitive_cross_entropy(logits, labels, self._cost_matrix.on(logits.device),
                                            ignore_index=self._ignore_index, reduction="none",
                                            label_smoothing=self.label_smoothing, cost_mode=self.cost_mode)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(cost_matrix=self.cost_matrix.tolist(), from_logits=self.from_logits,
                      cost_mode=self.cost_mode)
        return config


@_serializable
class CostSensitiveCategoricalCrossentropy(_CostSensitiveCrossentropy):
    r"""Cross-entropy scaled per sample by a misclassification cost, for one-hot labels: the Keras form of
    :func:`fused_losses.cost_sensitive_cross_entropy`, used like ``keras.losses.CategoricalCrossentropy``.

    ``loss_i = cost_matrix[true_i, argmax(y_pred_i)] * ce_i`` (``cost_mode="argmax"``; the factor is a constant
    of the step) or ``sum_j softmax_j * cost_matrix[true_i, j] * ce_i`` (``cost_mode="expected"``,
    differentiated). ``y_true`` is one-hot, ``y_pred``'s shape; an all-zero row (padding) has zero loss, as in
    Keras. Soft, smoothed or mixed-up labels are not supported (the cost is looked up by the true class): they
    raise ``ValueError`` on the CPU and, on CUDA, with ``FUSED_LOSSES_CHECK=1`` (without it their argmax is taken,
    unchecked). With an all-ones cost matrix it equals ``keras.losses.CategoricalCrossentropy`` with the same
    ``from_logits`` and ``label_smoothing``.

    Args:
        cost_matrix: ``(C, C)`` costs, **rows = true class, columns = predicted class** (nested lists, a NumPy
            array or a tensor); finite and non-negative. In ``"argmax"`` mode keep the diagonal at 1: it scales
            the loss of correct predictions (a zero there gives them zero loss and zero gradient, and warns).
        from_logits: whether ``y_pred`` holds logits (recommended: a linear output layer) or probabilities (a
            softmax output layer, Keras' default; converted as the module docstring describes).
        label_smoothing: in ``[0, 1]``; as Keras, the target becomes ``(1 - s) one_hot + s / C``.
        cost_mode: ``"argmax"`` or ``"expected"``.
        reduction, name, dtype: as for any ``keras.losses.Loss`` (``"sum_over_batch_size"`` by default).

    Shapes: ``y_true`` and ``y_pred`` ``(batch, C)`` or ``(batch, d1, ..., C)``; ``call`` returns ``(batch,)``
    (``(batch, d1, ...)``), to which Keras applies ``sample_weight``, a mask and the reduction.

    Example:
        >>> cost = np.ones((10, 10)); cost[4, 9] = cost[9, 4] = 5.0   # confusing 4 and 9 costs 5x
        >>> model.compile("adam", loss=CostSensitiveCategoricalCrossentropy(cost))   # softmax output layer
    """

    def __init__(self, cost_matrix, from_logits: bool = False, label_smoothing: float = 0.0,
                 cost_mode: str = "argmax", reduction: Optional[str] = "sum_over_batch_size",
                 name: str = "cost_sensitive_categorical_crossentropy", dtype=None) -> None:
        super().__init__(cost_matrix, from_logits, label_smoothing, None, cost_mode, reduction, name, dtype)

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        _check_class_axis(y_pred)
        if tuple(y_true.shape) != tuple(y_pred.shape):
            raise ValueError(f"y_true must be one-hot with y_pred's shape {tuple(y_pred.shape)}, got shape "
                             f"{tuple(y_true.shape)} (integer labels: use CostSensitiveSparseCategoricalCrossentropy)")
        return self._per_sample_losses(_one_hot_to_class_indices(y_true, self._ignore_index), y_pred)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(label_smoothing=self.label_smoothing)
        return config


@_serializable
class CostSensitiveSparseCategoricalCrossentropy(_CostSensitiveCrossentropy):
    r"""Cross-entropy scaled per sample by a misclassification cost, for integer labels: the Keras form of
    :func:`fused_losses.cost_sensitive_cross_entropy`, used like ``keras.losses.SparseCategoricalCrossentropy``.
    With an all-ones cost matrix it equals that loss (with the same ``from_logits`` and ``ignore_class``).

    Args:
        cost_matrix: ``(C, C)`` costs, rows = true class, columns = predicted class (see
            :class:`CostSensitiveCategoricalCrossentropy`).
        from_logits: whether ``y_pred`` holds logits (recommended) or probabilities (a softmax output layer).
        ignore_class: a label value (e.g. -1 or 255) whose samples get zero loss and zero gradient and, as in
            Keras, do not count in the ``"sum_over_batch_size"`` mean; ``None``: every label is a class index.
        cost_mode: ``"argmax"`` or ``"expected"``.
        reduction, name, dtype: as for any ``keras.losses.Loss``.

    Shapes: ``y_true`` ``(batch,)`` or ``(batch, 1)`` (``(batch, d1, ...)`` for ``y_pred`` ``(batch, d1, ...,
    C)``), integer values in ``[0, C)`` (Keras hands them over as floats; they are rounded to int64);
    ``call`` returns ``y_true``'s shape without a trailing 1.
    """

    def __init__(self, cost_matrix, from_logits: bool = False, ignore_class: Optional[int] = None,
                 cost_mode: str = "argmax", reduction: Optional[str] = "sum_over_batch_size",
                 name: str = "cost_sensitive_sparse_categorical_crossentropy", dtype=None) -> None:
        if ignore_class is not None and (isinstance(ignore_class, bool) or int(ignore_class) != ignore_class):
            raise ValueError(f"ignore_class must be an integer label value or None, got {ignore_class!r}")
        super().__init__(cost_matrix, from_logits, 0.0, None if ignore_class is None else int(ignore_class),
                         cost_mode, reduction, name, dtype)

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        _check_class_axis(y_pred)
        if y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1:
            y_true = y_true.squeeze(-1)
        if tuple(y_true.shape) != tuple(y_pred.shape[:-1]):
            raise ValueError(f"y_true must hold one class index per sample, shape {tuple(y_pred.shape[:-1])} (or "
                             f"with a trailing 1) for y_pred of shape {tuple(y_pred.shape)}, got shape "
                             f"{tuple(y_true.shape)} (one-hot labels: use CostSensitiveCategoricalCrossentropy)")
        labels = y_true.round().long() if y_true.dtype.is_floating_point else y_true.long()
        losses = self._per_sample_losses(labels, y_pred)
        if self.ignore_class is not None:
            # As Keras' SparseCategoricalCrossentropy: ignored samples drop out of the mean through a mask on the
            # losses. It goes on a new tensor (their values are already 0): torch.compile cannot trace setting an
            # attribute on the fused op's output, and would break the graph there.
            valid = labels != self.ignore_class
            losses = torch.where(valid, losses, 0.0)
            set_keras_mask(losses, valid)
        return losses

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(ignore_class=self.ignore_class)
        return config


class _CorrelationLoss(_Loss):
    """One correlation loss per sequence; ``_function`` is the fused functional form."""

    _function = None

    def __init__(self, eps: float, reduction: Optional[str], name: str, dtype) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        check_eps(eps)
        self.eps = float(eps)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # keras.losses.Loss.__call__ would multiply y_pred's (batch, time) mask into the (batch,) losses; here it
        # is the kernels' padding mask instead, and a sequence without a valid step drops out of the mean.
        mask = get_keras_mask(y_pred)
        with keras.name_scope(self.name):
            y_pred = keras.ops.convert_to_tensor(y_pred, dtype=self.dtype)
            y_true = keras.ops.convert_to_tensor(y_true, dtype=self.dtype)
            losses = self.call(y_true, y_pred, mask)
            if sample_weight is not None:
                # A copy (see _Loss): reduce_weighted_values multiplies the mask into it in place.
                sample_weight = keras.ops.convert_to_tensor(sample_weight, dtype=self.dtype).clone()
                if sample_weight.dim() > 0 and tuple(sample_weight.shape) not in ((len(losses),), (len(losses), 1)):
                    raise ValueError(f"sample_weight weighs whole sequences for {type(self).__name__}: shape "
                                     f"({len(losses)},), got {tuple(sample_weight.shape)} (to leave out time "
                                     "steps, mask them: a Masking layer, or call(..., mask))")
            return reduce_weighted_values(losses, sample_weight=sample_weight,
                                          mask=None if mask is None else mask.any(dim=1),
                                          reduction=self.reduction, dtype=self.dtype)

    def call(self, y_true: Tensor, y_pred: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Per-sequence losses ``(batch,)``; ``mask`` bool ``(batch, time)``, True = valid step."""
        if y_pred.dim() not in (2, 3):
            raise ValueError(f"y_pred must have shape (batch, time) or (batch, time, channels), got shape "
                             f"{tuple(y_pred.shape)}")
        y_true = _match_label_rank(y_true, y_pred)
        losses = type(self)._function(y_pred, y_true, mask=mask, reduction="none", eps=self.eps)
        return losses.mean(dim=1) if losses.dim() == 2 else losses  # channels: their mean per sequence

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(eps=self.eps)
        return config


_CORRELATION_DOC = r"""

    ``y_true`` and ``y_pred`` have shape ``(batch, time)`` or ``(batch, time, channels)`` (a ``(batch, time)``
    ``y_true`` for a ``(batch, time, 1)`` output is accepted). ``call`` returns **one loss per sequence**,
    ``(batch,)`` (with channels: their mean per sequence), so Keras' reduction averages sequences and a
    ``sample_weight`` of shape ``(batch,)`` weighs whole sequences; the gradient is that of the fused op (the
    tests compare both). A Keras mask on ``y_pred`` (``(batch, time)``, from a ``Masking`` layer or
    ``mask_zero=True`` upstream) is the kernels' padding mask: padded steps are left out of each sequence's
    moments (not multiplied into its loss), and a sequence with no valid step drops out of the mean.

    Args:
        eps: ``>= 0``, as in the fused op (default 1e-8: bounded gradients at flat predictions).
        reduction, name, dtype: as for any ``keras.losses.Loss``.
"""


@_serializable
class PearsonCorrelationLoss(_CorrelationLoss):
    __doc__ = r"""``1 - r`` (Pearson) per sequence over time: the Keras form of
    :func:`fused_losses.pearson_correlation_loss`.""" + _CORRELATION_DOC

    _function = staticmethod(pearson_correlation_loss)

    def __init__(self, eps: float = 1e-8, reduction: Optional[str] = "sum_over_batch_size",
                 name: str = "pearson_correlation_loss", dtype=None) -> None:
        super().__init__(eps, reduction, name, dtype)


@_serializable
class ConcordanceCorrelationLoss(_CorrelationLoss):
    __doc__ = r"""``1 - CCC`` (Lin's concordance correlation) per sequence over time: the Keras form of
    :func:`fused_losses.concordance_correlation_loss`.""" + _CORRELATION_DOC

    _function = staticmethod(concordance_correlation_loss)

    def __init__(self, eps: float = 1e-8, reduction: Optional[str] = "sum_over_batch_size",
                 name: str = "concordance_correlation_loss", dtype=None) -> None:
        super().__init__(eps, reduction, name, dtype)


@_serializable
class WeightedBinaryCrossentropy(_Loss):
    r"""Binary cross-entropy with ``pos_weight`` and focal / asymmetric (ASL) focusing for multi-label
    targets: the Keras form of :func:`fused_losses.weighted_bce_with_logits`, used like
    ``keras.losses.BinaryCrossentropy``. Without ``pos_weight`` and focusing it equals that loss.

    Per element ``w (q y l_pos + (1 - y) l_neg)`` with ``l_pos = -(1 - p)^gamma_pos log p``,
    ``l_neg = -p_m^gamma_neg log(1 - p_m)``, ``p_m = max(p - clip, 0)``, ``q = pos_weight``.

    Args:
        pos_weight: weight of the positive term, ``(labels,)`` (one per label, the last axis) or any shape that
            broadcasts to ``y_pred``; nested lists, a NumPy array or a tensor. ``None``: 1.
        from_logits: whether ``y_pred`` holds logits (recommended) or probabilities (a sigmoid output layer).
        gamma_pos, gamma_neg: finite focusing exponents ``>= 0``; ``clip`` in ``[0, 1)``: the ASL probability margin.
        reduction, name, dtype: as for any ``keras.losses.Loss``.

    Shapes: ``y_true`` (0/1 or soft labels in ``[0, 1]``) and ``y_pred`` ``(batch, ..., labels)``; ``call``
    returns the mean over the last axis, ``(batch, ...)``, as Keras' ``BinaryCrossentropy`` does. A 1-D
    ``y_pred`` ``(batch,)`` is one label per sample and gives ``(batch,)``.
    """

    def __init__(self, pos_weight=None, from_logits: bool = False, gamma_pos: float = 0.0,
                 gamma_neg: float = 0.0, clip: float = 0.0, reduction: Optional[str] = "sum_over_batch_size",
                 name: str = "weighted_binary_crossentropy", dtype=None) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        check_focusing(gamma_pos, gamma_neg, clip)
        weights = as_float_tensor("pos_weight", pos_weight)
        self._pos_weight = None if weights is None else _PerDevice(weights.detach().to(torch.float32, copy=True))
        self.from_logits = bool(from_logits)
        self.gamma_pos = float(gamma_pos)
        self.gamma_neg = float(gamma_neg)
        self.clip = float(clip)

    @property
    def pos_weight(self) -> Optional[Tensor]:
        """The float32 ``pos_weight`` tensor, or None."""
        return None if self._pos_weight is None else self._pos_weight.value

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        y_true = _match_label_rank(y_true, y_pred)
        logits = y_pred if self.from_logits else _sigmoid_probabilities_to_logits(y_pred)
        pos_weight = None if self._pos_weight is None else self._pos_weight.on(logits.device)
        losses = weighted_bce_with_logits(logits, y_true, pos_weight=pos_weight, reduction="none",
                                          gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg, clip=self.clip)
        return losses.mean(dim=-1) if losses.dim() > 1 else losses

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(pos_weight=None if self.pos_weight is None else self.pos_weight.tolist(),
                      from_logits=self.from_logits, gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg,
                      clip=self.clip)
        return config
