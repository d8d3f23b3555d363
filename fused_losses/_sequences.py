"""The layout convention of the correlation losses: the user's (B, T) / (B, T, D) tensors with the time axis
anywhere, viewed (never copied) as the (B, T) / (B, T, D) sequences with the time axis at 1 that the operators
take.
Pure PyTorch, shared by the functional API and the reference."""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._validation import can_check_values, check_integer, check_tensor

__all__ = ["SequenceBatch", "as_sequence_batch"]


class SequenceBatch(NamedTuple):
    """Inputs of a correlation loss seen as the operators take them: (B, T) or (B, T, D) views with the time
    axis at 1 and a (B, T) bool mask (or None), plus what is needed to give the per-step output the user's
    layout."""
    input: Tensor
    target: Tensor
    mask: Optional[Tensor]
    time_axis: int
    has_channels: bool

    def restore_layout(self, per_sequence_or_step: Tensor, per_step: bool) -> Tensor:
        """Per-sequence ((B, D), or (B,) for 2-D input) or per-step values (the operators' input layout) in the
        user's layout."""
        return per_sequence_or_step.movedim(1, self.time_axis) if per_step else per_sequence_or_step


def _lengths_to_mask(lengths: Tensor, batch: int, steps: int, input: Tensor) -> Tensor:
    check_tensor("lengths", lengths)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths must have shape ({batch},) (one length per sequence), got {tuple(lengths.shape)}")
    if lengths.device != input.device:
        raise ValueError(f"lengths must be on the input's device ({input.device}), got {lengths.device}")
    if torch._C._functorch.is_batchedtensor(lengths):
        # vmap cannot read the values that the check below reads (its error would not name lengths); a mask
        # needs no check.
        raise ValueError(f"lengths cannot be vmapped over (its values are checked before the kernels run): vmap "
                         f"over mask=torch.arange({steps}) < lengths.unsqueeze(-1) instead")
    if can_check_values(lengths):
        bad = (lengths < 0) | (lengths > steps)
        if bool(bad.any()):
            raise ValueError(f"lengths must be in [0, {steps}] (the number of time steps), got {int(lengths[bad][0])}")
    elif torch.compiler.is_compiling() and lengths.device.type == "cpu":
        # Inside a compiled graph: an assertion the graph keeps (RuntimeError), no graph break. Not on CUDA,
        # where it would be a device-side assert that leaves the context unusable.
        torch._assert_async(((lengths >= 0) & (lengths <= steps)).all(),
                            f"lengths must be in [0, {steps}] (the number of time steps)")
    return torch.arange(steps, device=lengths.device) < lengths.unsqueeze(1)


def as_sequence_batch(input: Tensor, target: Tensor, mask: Optional[Tensor], dim: int,
                      lengths: Optional[Tensor] = None) -> SequenceBatch:
    """Checks the layout arguments of a correlation loss and views them as the operators take them.

    ``input`` is (B, T) or (B, T, D) with the time axis ``dim`` anywhere; of the other axes the first is the
    batch and the second the channels. ``mask`` has the input's shape without the channel axis."""
    check_tensor("input", input)
    check_tensor("target", target)
    if input.dim() not in (2, 3):
        raise ValueError(f"input must have shape (B, T) or (B, T, D) (time axis `dim`), got {tuple(input.shape)}")
    if target.shape != input.shape:
        raise ValueError(f"target must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}")
    ndim = input.dim()
    check_integer("dim", dim)
    if not -ndim <= dim < ndim:
        raise IndexError(f"dim (the time axis) must be an int in [{-ndim}, {ndim - 1}] for a {ndim}-D input, "
                         f"got {dim!r}")
    time = int(dim) % ndim
    others = [axis for axis in range(ndim) if axis != time]
    mask_axes = [axis for axis in range(ndim) if axis != (others[1] if ndim == 3 else None)]
    if mask is not None and lengths is not None:
        raise ValueError("pass either mask or lengths, not both")
    if mask is not None:
        check_tensor("mask", mask)
        expected = tuple(input.shape[axis] for axis in mask_axes)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape {expected} (the input's shape without the channel axis), "
                             f"got {tuple(mask.shape)}")
        mask = mask.movedim(mask_axes.index(time), 1)
    elif lengths is not None:
        mask = _lengths_to_mask(lengths, input.shape[others[0]], input.shape[time], input)

    def sequences(tensor: Tensor) -> Tensor:
        # Each view op costs a few microseconds (more on a tensor that requires grad: an autograd node), a
        # measurable part of a small loss: none for the common (B, T) and (B, T, D) layouts.
        return tensor if time == 1 else tensor.movedim(time, 1)

    return SequenceBatch(sequences(input), sequences(target), mask, time, ndim == 3)
