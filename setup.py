"""Build of fastllm and its native module fastllm._C.

fastllm._C is a pybind11 module that includes no PyTorch headers: kernels take
device pointers, sizes, strides and the CUDA stream as plain integers. One build
therefore works with every PyTorch version.

- nvcc found (FASTLLM_NVCC, CUDA_HOME/bin/nvcc or PATH): the .cu files under csrc/
  are compiled for FASTLLM_CUDA_ARCHS (default "80;90a") and the CUDA runtime is
  linked statically.
- no nvcc, or FASTLLM_NO_CUDA=1: _C is built from the C++ sources alone and says
  so (fastllm doctor); the triton and torch backends still work.
- always: the C++ CPU kernels (csrc/<family>/*_cpu.cpp, the "cpu" backend), split over
  OpenMP threads when the compiler has OpenMP, and compiled per ISA (AVX-512, AVX2,
  baseline x86-64) with GCC on x86-64 Linux.
- no C++ compiler at all: _C is skipped with a warning; fastllm still imports.

A failing CUDA compile is an error, never a silent fallback.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;90a"


def cuda_archs() -> list[str]:
    """FASTLLM_CUDA_ARCHS as a list: "80;90a", "8.0 9.0a" and "sm_80,sm_90a" all work."""
    raw = os.environ.get("FASTLLM_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = []
    for item in raw.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().lower().removeprefix("sm_").replace(".", "")
        if item:
            if not (item.rstrip("a").isdigit()):
                raise ValueError(
                    f"FASTLLM_CUDA_ARCHS has {item!r}; expected entries like 80 or 90a"
                )
            archs.append(item)
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # PTX of the lowest portable arch lets newer GPUs JIT-compile the kernels.
    portable = sorted((a for a in archs if not a.endswith("a")), key=int)
    if portable:
        flags.append(f"-gencode=arch=compute_{portable[0]},code=compute_{portable[0]}")
    return flags


def find_nvcc() -> str | None:
    if os.environ.get("FASTLLM_NO_CUDA", "0") not in ("", "0"):
        return None
    if os.environ.get("FASTLLM_NVCC"):
        return os.environ["FASTLLM_NVCC"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def compiles(cxx: str, tmp: Path, name: str, source: str, flags: list[str]) -> bool:
    """Whether `cxx` compiles and links the program `source` with `flags`."""
    src = tmp / f"{name}.cpp"
    src.write_text(source)
    probe = subprocess.run([cxx, *flags, str(src), "-o", str(tmp / name)], capture_output=True)
    return probe.returncode == 0


# -fopenmp works: otherwise the C++ CPU kernels run on one thread
OPENMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
# per-ISA clones (csrc/cpu_utils.h: GCC >= 11 on x86-64 Linux); otherwise the CPU kernels
# are compiled once, for the baseline ISA
CLONES_PROBE = (
    '__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))\n'
    "int f(int x) { return x + 1; }\nint main() { return f(-1); }\n"
)


def run(cmd: list[str]) -> None:
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


class BuildNative(build_ext):
    """Compiles fastllm._C by calling the compilers directly (in parallel)."""

    def build_extension(self, ext: Extension) -> None:
        # CompileError on an optional extension: setuptools warns and goes on without it
        try:
            import pybind11
        except ImportError:
            raise CompileError("pybind11 is not installed: skipping fastllm._C") from None
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            raise CompileError("no C++ compiler found: skipping fastllm._C")
        nvcc = find_nvcc()
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        tmp = Path(self.build_temp).resolve() / "fastllm_C"
        tmp.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)

        includes = [
            f"-I{CSRC}",
            f"-I{sysconfig.get_paths()['include']}",
            f"-I{pybind11.get_include()}",
        ]
        defines = ["-DFASTLLM_WITH_CUDA"] if nvcc else []
        archs = cuda_archs() if nvcc else []
        defines.append(f'-DFASTLLM_CUDA_ARCHS="{";".join(archs)}"')

        # the C++ CPU kernels split rows over OpenMP threads: PyTorch's own runtime, which
        # is loaded first under the same soname (libgomp.so.1)
        omp = ["-fopenmp"] if compiles(cxx, tmp, "openmp_probe", OPENMP_PROBE, ["-fopenmp"]) else []
        if not omp:
            print("warning: no OpenMP in the C++ compiler: fastllm's CPU kernels run on one thread")
        if sys.platform.startswith("linux") and not compiles(
            cxx, tmp, "clones_probe", CLONES_PROBE, []
        ):
            print(
                "warning: the C++ compiler builds no per-ISA clones: CPU kernels for baseline x86-64"
            )
            defines.append("-DFASTLLM_CPU_NO_CLONES")

        # FASTLLM_SANITIZE=address (make asan): the C++ kernels under AddressSanitizer, for
        # the robustness tests; a build of its own (FASTLLM_NATIVE_LIB loads it)
        sanitize = os.environ.get("FASTLLM_SANITIZE", "")
        san = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"] if sanitize else []

        jobs = []
        for src in sorted(CSRC.rglob("*.cpp")):
            obj = tmp / (src.relative_to(CSRC).as_posix().replace("/", "_") + ".o")
            jobs.append(
                [
                    cxx,
                    "-O3",
                    "-std=c++17",
                    "-fPIC",
                    "-fvisibility=hidden",
                    # no fused multiply-add contraction: every ISA clone of a CPU kernel
                    # rounds like the scalar code (and like PyTorch's elementwise ops);
                    # floating-point compares may become vector selects (no trap handlers)
                    "-ffp-contract=off",
                    "-fno-trapping-math",
                    *san,
                    *omp,
                    *includes,
                    *defines,
                    "-c",
                    str(src),
                    "-o",
                    str(obj),
                ]
            )
        if nvcc:
            for src in sorted(CSRC.rglob("*.cu")):
                obj = tmp / (src.relative_to(CSRC).as_posix().replace("/", "_") + ".o")
                jobs.append(
                    [
                        nvcc,
                        "-O3",
                        "-std=c++17",
                        "-Xcompiler",
                        "-fPIC",
                        f"-I{CSRC}",
                        "--expt-relaxed-constexpr",
                        *gencode_flags(archs),
                        "-c",
                        str(src),
                        "-o",
                        str(obj),
                    ]
                )
        workers = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, jobs))  # re-raises the first failed compile

        objs = [job[-1] for job in jobs]
        if nvcc:
            host = ",".join(["-fPIC", *omp])
            link = [nvcc, "-shared", "-cudart=static", "-Xcompiler", host, *objs, "-o", str(out)]
        else:
            link = [cxx, "-shared", *san, *omp, *objs, "-o", str(out)]
        if sys.platform == "darwin":
            link += ["-undefined", "dynamic_lookup"]
        run(link)


setup(
    # fastllm/triton_kernels and fastllm/bench are links to the top-level folders.
    packages=find_packages(include=["fastllm", "fastllm.*"]),
    # optional: skipped (with a warning) without pybind11 or a C++ compiler; a failing
    # compile is still an error
    ext_modules=[Extension("fastllm._C", sources=[], optional=True)],
    cmdclass={"build_ext": BuildNative},
)
