"""Argument checks done in Python: the ones that need Python objects (strings, requires_grad) or, on CUDA, a
host synchronisation that is only paid when FUSED_LOSSES_CHECK=1 asks for it."""

import math
import numbers
import os
import warnings
from typing import Optional

import torch

# FUSED_LOSSES_CHECK=1 makes the CUDA ops validate data-dependent arguments (class indices, cost values)
# before launching, at the price of a host synchronisation. The CPU kernels always validate.
CHECK_DATA_ON_CUDA = os.environ.get("FUSED_LOSSES_CHECK", "0") == "1"

REDUCTIONS = ("none", "mean", "sum")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def check_no_grad(name: str, tensor) -> None:
    if tensor is not None and tensor.requires_grad:
        raise ValueError(f"{name} must not require grad: fused_losses differentiates with respect to input only "
                         f"(pass {name}.detach())")


def check_tensor(name: str, value, sparse_alternative: str = "") -> None:
    """A dense tensor: the operators have kernels for the strided layout only (a sparse or nested tensor would
    get PyTorch's "Could not run ... backend" error). `sparse_alternative` says what to pass instead."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided or value.is_nested:
        got = "a nested tensor" if value.is_nested else f"layout {value.layout}"
        raise TypeError(f"{name} must be a dense tensor (torch.strided layout), got {got}"
                        + (f"; {sparse_alternative}" if sparse_alternative else ""))


def check_cost_matrix_values(cost_matrix: torch.Tensor) -> None:
    """Cost entries must be finite and non-negative (a negative cost would reward a mistake)."""
    if not bool(torch.isfinite(cost_matrix).all()):
        raise ValueError("cost_matrix must contain only finite values")
    if bool((cost_matrix < 0).any()):
        raise ValueError("cost_matrix must be non-negative: a negative cost would reward a misclassification")


def _is_finite(value) -> bool:
    """Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument is a symbolic float,
    which math.isfinite cannot take (a graph break, an error with fullgraph=True). NaN fails both."""
    return -math.inf < value < math.inf


def check_real(name: str, value) -> None:
    """A Python or NumPy real number (a symbolic one while torch.compile traces with dynamic=True); bool is not."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def check_bool(name: str, value) -> None:
    """A flag: True or False (a string such as "False" is truthy and would be read as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_integer(name: str, value) -> None:
    """A Python or NumPy integer (what torch's int arguments take): a float would be truncated silently. It must
    fit the operators' int64 (a larger one garbles the schema parser's error); a symbolic int does already."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if isinstance(value, numbers.Integral) and not -2**63 <= value < 2**63:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**63 - 1] (int64), got {value}")


def check_focusing(gamma_pos: float, gamma_neg: float, clip: float) -> None:
    """Focusing exponents of the focal / asymmetric losses and the ASL probability margin."""
    for name, value in (("gamma_pos", gamma_pos), ("gamma_neg", gamma_neg)):
        check_real(name, value)
        if not (_is_finite(value) and value >= 0):  # an infinite exponent: inf * 0 = NaN in the gradient
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    check_real("clip", clip)
    if not 0 <= clip < 1:
        raise ValueError(f"clip must be in [0, 1), got {clip}")


def needs_data_checks(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "cpu" and CHECK_DATA_ON_CUDA and not torch.compiler.is_compiling()


def can_check_values(tensor: torch.Tensor) -> bool:
    """Whether a Python check may read a tensor's values (a host synchronisation on CUDA): always on the CPU,
    on CUDA with FUSED_LOSSES_CHECK=1; never while torch.compile traces (it would break the graph)."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or CHECK_DATA_ON_CUDA


def check_label_smoothing(label_smoothing) -> None:
    """For the module forms, which take it at construction (the op checks it again at every call)."""
    check_real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def check_eps(eps) -> None:
    check_real("eps", eps)
    if not (_is_finite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _check_real_tensor(name: str, tensor: torch.Tensor) -> None:
    """A dense tensor argument of real numbers: converting complex values to a floating dtype would drop their
    imaginary part (with a mere warning)."""
    check_tensor(name, tensor)
    if tensor.dtype.is_complex:
        raise TypeError(f"{name} must hold real numbers, got {tensor.dtype}")


def as_float_tensor(name: str, value, ndim: Optional[int] = None, device=None) -> Optional[torch.Tensor]:
    """`value` (a tensor or an array-like: nested lists, a NumPy array) as a floating-point tensor of `ndim`
    dimensions (any number when None); integer values become the default float dtype."""
    if value is None:
        return None
    try:
        tensor = torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a tensor or an array-like of numbers, got {type(value).__name__}") from error
    _check_real_tensor(name, tensor)
    if not tensor.dtype.is_floating_point:
        tensor = tensor.to(torch.get_default_dtype())
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    return tensor


def as_tensor_argument(name: str, value, ndim: Optional[int], device) -> Optional[torch.Tensor]:
    """A tensor argument as it is, once dense and real (the operator checks its floating dtype and device); an
    array-like (nested lists, a NumPy array) as a floating-point tensor on `device` (as_float_tensor)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        _check_real_tensor(name, value)
        return value
    return as_float_tensor(name, value, ndim, device)


def warn_zero_diagonal(cost_matrix: torch.Tensor, cost_mode: str) -> None:
    """In argmax mode a zero cost[y, y] gives every correctly classified sample zero loss and zero gradient:
    nothing then pushes its margin up. Worth a warning (once per call site), not an error."""
    if cost_mode == "argmax" and bool((cost_matrix.diagonal() == 0).any()):
        warnings.warn("cost_matrix has zeros on its diagonal: with cost_mode='argmax' a correctly classified sample "
                      "then has zero loss and zero gradient (its margin is never pushed up). Use costs >= 1 on "
                      "the diagonal (e.g. ones plus the extra cost of each mistake), or cost_mode='expected'",
                      UserWarning, stacklevel=3)
