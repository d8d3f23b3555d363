"""Builds the CUDA kernel sources (csrc/cuda/*.cu) as C++ for the CPU with the host shim (host_shim.h), as
operator libraries whose CPU kernels are the emulated CUDA kernels:

- ``torch.ops.fused_losses_emulated``: the kernels as they are built for the GPU;
- ``torch.ops.fused_losses_emulated_small``: with tiny work-split limits (FUSED_LOSSES_SMALL_LIMITS: at most 3
  blocks, short correlation chunks, 64-label sparse BCE chunks), so that small shapes take the grid-stride,
  multi-chunk and chunk-merge paths.

Each library has the operators of ``torch.ops.fused_losses`` with the same schemas (call them with CPU tensors),
and the shim's self-test operators (shim_selftest.cpp, fast_math_accuracy.cpp).
The build goes to ``build/cuda_emulation/<namespace>`` (ninja: later runs rebuild only what changed).
"""

import glob
import os
from typing import Dict

import torch
import torch.utils.cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS: Dict[str, list] = {
    "fused_losses_emulated": [],
    "fused_losses_emulated_small": ["-DFUSED_LOSSES_SMALL_LIMITS"],
}


def _wrapper_sources(build_dir: str) -> list:
    """One C++ file per kernel source (a .cu file would go to nvcc), rewritten only when it changes."""
    sources = []
    for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        path = os.path.join(build_dir, f"emulated_{os.path.splitext(os.path.basename(cu))[0]}.cpp")
        text = f'#include "{cu}"\n'
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as wrapper:
                wrapper.write(text)
        sources.append(path)
    return sources


def load(namespace: str, verbose: bool = False) -> None:
    """Builds (if needed) and loads one variant; its operators are then in torch.ops.<namespace>."""
    build_dir = os.path.join(ROOT, "build", "cuda_emulation", namespace)
    os.makedirs(build_dir, exist_ok=True)
    flags = [
        # The GPU build's arithmetic: no contraction into FMAs (nvcc --fmad=false), IEEE semantics.
        "-O1",
        "-ffp-contract=off",
        "-fno-fast-math",
        "-Wno-unknown-pragmas",
        "-DFUSED_LOSSES_HOST_EMULATION",
        f"-DFUSED_LOSSES_EMULATED_NAMESPACE={namespace}",
        "-include",
        os.path.join(HERE, "host_shim.h"),
    ] + VARIANTS[namespace]
    torch.utils.cpp_extension.load(
        name=namespace,
        sources=[os.path.join(HERE, name)
                 for name in ("host_emulation.cpp", "shim_selftest.cpp", "fast_math_accuracy.cpp")]
        + _wrapper_sources(build_dir),
        extra_cflags=flags,
        # The shim's c10/cuda headers come before torch's, and csrc holds the kernel headers.
        extra_include_paths=[os.path.join(HERE, "include"), os.path.join(ROOT, "csrc"), HERE],
        build_directory=build_dir,
        is_python_module=False,
        verbose=verbose,
    )


def ops(namespace: str):
    load(namespace)
    return getattr(torch.ops, namespace)
