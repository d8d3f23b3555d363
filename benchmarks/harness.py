"""Measurement: copy bandwidth, forward / forward+backward times, peak extra memory, for one BenchCase and
each implementation (fused, eager reference, compiled reference, extras such as Liger)."""

import math
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from .case import BenchCase


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU ({torch.get_num_threads()} threads)"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


MIN_SAMPLE_SECONDS = 0.2  # a case of 0.1 ms gets this many seconds of samples, not just `reps` of them
MAX_REPS = 2000


def time_ms(fn: Callable[[int], None], device: str, warmup: int, reps: int) -> float:
    """Median time of fn(i) over at least `reps` runs, more (up to MAX_REPS) until the runs add up to
    MIN_SAMPLE_SECONDS, after `warmup` runs. On the GPU, CUDA events around each run while the host runs ahead,
    as in a training loop (one synchronisation per `reps` runs): a run's time is the device's, plus its wait for
    the host where the host is the slower. Wall time on the CPU."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    samples: List[float] = []
    while len(samples) < reps or (sum(samples) < MIN_SAMPLE_SECONDS * 1e3 and len(samples) < MAX_REPS):
        if device == "cuda":
            samples += _cuda_runs_ms(fn, first=len(samples), count=max(1, reps))
        else:
            t0 = time.perf_counter()
            fn(len(samples))
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _cuda_runs_ms(fn: Callable[[int], None], first: int, count: int) -> List[float]:
    """fn(first), ..., fn(first + count - 1) enqueued back to back, each between two CUDA events; their times."""
    events = []
    for i in range(first, first + count):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def copy_bandwidth_gbps(device: str, quick: bool) -> float:
    """Device-to-device copy bandwidth, counting bytes read + written (the ceiling of memory-bound kernels)."""
    numel = (256 if device == "cuda" else 64) * 2**20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda i: dst.copy_(src), device, warmup=3, reps=5 if quick else 20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


class PeakMemory:
    """Peak memory allocated above the level at entry: the CUDA caching allocator's statistics on the GPU,
    the resident set's high-water mark (reset through /proc/self/clear_refs) on the CPU."""

    def __init__(self, device: str):
        self.device = device
        self.peak_bytes: Optional[int] = None

    @staticmethod
    def _status_kb(field: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1])
        raise KeyError(field)

    def __enter__(self):
        _sync(self.device)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as clear_refs:
                    clear_refs.write("5")
                self._base = self._status_kb("VmRSS:") * 1024
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        if self.device == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        elif self._base is not None:
            self.peak_bytes = max(0, self._status_kb("VmHWM:") * 1024 - self._base)
        return False


def _rotation(case_inputs: Dict, device: str) -> int:
    """Number of input sets to cycle through so that caches do not hold the next call's inputs."""
    size = sum(t.numel() * t.element_size() for t in case_inputs.values() if torch.is_tensor(t))
    cache_bytes = 150 * 2**20 if device == "cuda" else 64 * 2**20
    return max(1, min(4, math.ceil(cache_bytes / max(1, size))))


def measure_implementation(fn: Callable, case: BenchCase, input_sets: List[Dict], device: str, quick: bool) -> Dict:
    warmup, reps = (3, 10) if quick else (5, 30) if device == "cuda" else (2, 7)

    def forward_backward(i):
        inputs = input_sets[i % len(input_sets)]
        loss = fn(**inputs)
        torch.autograd.grad(loss, inputs[case.grad_input])

    def forward(i):
        with torch.no_grad():
            fn(**input_sets[i % len(input_sets)])

    fwd_bwd_ms = time_ms(forward_backward, device, warmup, reps)
    fwd_ms = time_ms(forward, device, warmup, reps)
    with PeakMemory(device) as memory:
        forward_backward(0)
    return {"fwd_bwd_ms": fwd_bwd_ms, "fwd_ms": fwd_ms, "peak_extra_bytes": memory.peak_bytes}


def graph_replay_ms(fn: Callable, case: BenchCase, inputs: Dict, quick: bool) -> float:
    """Forward + backward captured once in a CUDA graph and replayed: the device's time alone, without the
    Python and launch overhead of an eager call (the gap between the two says how host-bound a row is). One
    input set: a replay reads the tensors captured."""
    target = inputs[case.grad_input]

    def forward_backward():
        return torch.autograd.grad(fn(**inputs), target)

    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):  # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(2):
            forward_backward()
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward_backward()
    warmup, reps = (3, 10) if quick else (5, 30)
    return time_ms(lambda i: graph.replay(), "cuda", warmup, reps)


# On the CPU the implementations are measured in turn this many times and each keeps its best round. This
# virtual machine hands memory it has not touched for a while back to its host (kdamond): the first calls that
# touch it again fault it in slowly, and whichever implementation ran first paid for it (Pearson (4096, 1000)
# fp32 with 2 MB pages: fused 16.6 ms in a first round, 3.3-3.6 ms after; compiled 18.3, then 5.3-5.5).
CPU_ROUNDS = 3


def measure_case(case: BenchCase, device: str, quick: bool, compile_reference: bool = True) -> Dict:
    first = case.make_inputs()
    input_sets = [first] + [case.make_inputs() for _ in range(_rotation(first, device) - 1)]
    implementations: Dict[str, Optional[Callable]] = {"fused": case.fused, "eager": case.reference}
    if compile_reference:
        implementations["compiled"] = torch.compile(case.reference, dynamic=False)
    implementations.update(case.extra)
    results: Dict[str, Dict] = {}
    for _ in range(CPU_ROUNDS if device == "cpu" and not quick else 1):
        for name, fn in implementations.items():
            if fn is None or "error" in results.get(name, {}):
                continue
            try:
                result = measure_implementation(fn, case, input_sets, device, quick)
            except Exception as error:  # a failing alternative is reported, not fatal
                result = {"error": f"{type(error).__name__}: {error}"[:300]}
            if name in results and "error" not in result:  # the best of each time, over the rounds
                result["fwd_ms"] = min(result["fwd_ms"], results[name]["fwd_ms"])
                if results[name]["fwd_bwd_ms"] < result["fwd_bwd_ms"]:
                    result["fwd_bwd_ms"], result["peak_extra_bytes"] = (results[name]["fwd_bwd_ms"],
                                                                        results[name]["peak_extra_bytes"])
            results[name] = result
            if device == "cuda":
                torch.cuda.empty_cache()
    fused = results["fused"]
    if device == "cuda" and "fwd_bwd_ms" in fused:
        try:
            fused["graph_fwd_bwd_ms"] = graph_replay_ms(case.fused, case, first, quick)
        except Exception as error:  # reported in the row, not fatal
            fused["graph_error"] = f"{type(error).__name__}: {error}"[:300]
        torch.cuda.empty_cache()
    return results
