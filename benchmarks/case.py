"""What one benchmark row measures: an op at one shape and dtype, the fused implementation and the
alternatives a user would otherwise run, and the bytes the fused schedule must move."""

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional


@dataclass
class BenchCase:
    op: str                       # e.g. "cost_sensitive_cross_entropy"
    label: str                    # shape / variant shown in the table, e.g. "(262144, 1000) bf16 cost"
    make_inputs: Callable[[], Dict]  # fresh inputs (tensors on the device; the differentiated one requires grad)
    fused: Callable[..., object]      # fused_losses call: loss = fused(**inputs)
    reference: Callable[..., object]  # the pure-PyTorch formula from fused_losses.reference
    grad_input: str = "input"     # name of the input that is differentiated
    bytes_forward: int = 0        # bytes the fused forward must move (reads + writes)
    bytes_forward_backward: int = 0  # bytes the fused forward + backward must move
    # Further implementations to compare with, e.g. {"liger": fn}; skipped when None.
    extra: Dict[str, Optional[Callable[..., object]]] = field(default_factory=dict)
    smoke: bool = False           # part of the CI smoke run (one small case per op)
    # Speed-up over the compiled reference this case must reach (forward + backward); None: the device default
    # (1.5x on CPU, 2x on CUDA).
    target_vs_compiled: Optional[float] = None
    # One of the headline rows (`--headline`: the GPU check's benchmark stage runs only these).
    headline: bool = False
    # Speed-up over Liger this case must reach; None: LIGER_TARGET (benchmarks/__main__.py).
    target_vs_liger: Optional[float] = None
    # Most extra memory the fused forward + backward may allocate (e.g. one gradient); None: no bound.
    max_peak_extra_bytes: Optional[int] = None
