"""Build script for the fused_losses C++/CUDA extension.

A CUDA extension is built when torch was built with CUDA and nvcc is found (CUDA_HOME, else
/usr/local/cuda); `FUSED_LOSSES_CPU_ONLY=1` forces a C++-only build. TORCH_CUDA_ARCH_LIST and MAX_JOBS
are honoured by torch.utils.cpp_extension (without a visible GPU and TORCH_CUDA_ARCH_LIST the CUDA
sources are compiled for sm_90). Install with `pip install --no-build-isolation -e .`.
"""

import glob
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile

# torch.utils.cpp_extension reads CUDA_HOME when it is imported: point it at the toolkit first.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpu_supports_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


def _libstdcxx_link_args() -> list:
    """Link arguments that keep the C++ runtime shared with torch's. Some toolchains link libstdc++ statically
    by default (seen on a GPU machine whose CXX was a g++ with -static-libstdc++): the extension then carries
    a private copy whose functions, bound inside the extension, use the process's libstdc++ data (locale
    facets), and every C++ error message that formats a number broke: the numbers vanished (here) or the
    process crashed (there). A probe library built with the same compiler tells; if it embeds libstdc++, the
    shared one is named explicitly ahead of the driver's static archive, which then adds nothing."""
    compiler = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    probe = "#include <sstream>\nstd::string probe(double v) { std::ostringstream s; s << v; return s.str(); }\n"

    def link(extra):
        with tempfile.TemporaryDirectory() as folder:
            source, library = os.path.join(folder, "probe.cpp"), os.path.join(folder, "probe.so")
            with open(source, "w") as file:
                file.write(probe)
            try:
                subprocess.run(compiler + ["-shared", "-fPIC", source, "-o", library, *extra], check=True,
                               capture_output=True, timeout=120)
                with open(library, "rb") as file:
                    return file.read()
            except (OSError, subprocess.SubprocessError):
                return None

    plain = link([])
    # A static copy defines std::locale itself and names no shared libstdc++.
    if plain is None or b"libstdc++.so" in plain or b"_ZNSt6locale5_ImplC" not in plain:
        return []
    shared = ["-l:libstdc++.so.6"]
    fixed = link(shared)
    if fixed is None or b"libstdc++.so.6" not in fixed:
        print(f"warning: {' '.join(compiler)} links libstdc++ statically and the shared libstdc++.so.6 was not "
              "found: the extension's error messages may lose their numbers or crash", file=sys.stderr)
        return []
    print(f"{' '.join(compiler)} links libstdc++ statically: linking the shared libstdc++.so.6 instead",
          file=sys.stderr)
    return shared


def _want_cuda() -> bool:
    if os.environ.get("FUSED_LOSSES_CPU_ONLY", "0") == "1":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _default_cuda_arch_list() -> None:
    """Without a visible GPU, torch.utils.cpp_extension finds no architecture to compile for and fails: build
    for sm_90 (H100 / H200) unless TORCH_CUDA_ARCH_LIST says otherwise."""
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"


def _extension():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # No implicit fused multiply-adds: the compiler fuses a multiply into an add only where the product has
    # no other use, so the same formula could round differently in the forward that also writes the gradient
    # and in the backward. Without contraction both schedules give the same bits (explicit fmadd remains).
    # C++20 named (concepts, std::bit_cast): torch.utils.cpp_extension adds its own standard only when none is
    # given, and that is C++17 up to torch 2.11.
    cxx_flags = ["-std=c++20", "-O3", "-Wno-unknown-pragmas", "-ffp-contract=off"]
    if _cpu_supports_avx2():
        # at::vec::Vectorized picks its 256-bit implementation from CPU_CAPABILITY_AVX2.
        cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    link_args = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP loop: without -fopenmp it silently runs on one thread. The
        # extension then needs libgomp.so.1, which resolves to the copy torch has already loaded
        # (torch/lib/libgomp.so.1): one thread pool, sized by torch.set_num_threads.
        cxx_flags.append("-fopenmp")
        link_args.append("-fopenmp")
        link_args += _libstdcxx_link_args()
    include_dirs = [os.path.join(HERE, "csrc")]
    if _want_cuda():
        _default_cuda_arch_list()
        nvcc_flags = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DFUSED_LOSSES_WITH_CUDA",
                      "--fmad=false"]
        return CUDAExtension(
            "fused_losses._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DFUSED_LOSSES_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=link_args,
            py_limited_api=True,
        )
    return CppExtension(
        "fused_losses._C",
        cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_args,
        py_limited_api=True,
    )


setup(
    name="fused_losses",
    version="0.1.0",
    description="Fused cost-sensitive cross-entropy, correlation and weighted BCE losses for PyTorch",
    packages=find_packages(include=["fused_losses", "fused_losses.*"]),
    package_data={"fused_losses": ["py.typed"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    # fused_losses.keras: Keras 3 losses on the torch backend (uses Keras internals; tested with 3.15.1).
    extras_require={"keras": ["keras>=3.15"]},
)
