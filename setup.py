"""Builds the native extensions from csrc/ (metadata lives in pyproject.toml):

  ftlm._C     csrc/*.cpp (+ csrc/*.cu): the model's kernels (fused cross-entropy), against torch
  ftlm._text  csrc/text/: the data preparation's quality rules and MinHash, a plain CPython module (no torch)

The C++ CPU kernels are always built. The CUDA kernels are added when FTLM_CUDA says so:
  FTLM_CUDA=1   build them, and fail if that is impossible (no nvcc, or a CPU-only torch)
  FTLM_CUDA=0   never build them
  unset         build them when nvcc and a CUDA build of torch are present AND a GPU is visible
                (nvidia-smi runs, or torch sees a device). A machine without a GPU gets a fast C++-only
                build; set FTLM_CUDA=1 there to cross-compile the CUDA kernels anyway.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default when no GPU is visible: 8.0;9.0+PTX).
MAX_JOBS caps parallel compile jobs (default: every core).

If torch is not importable (for example under build isolation without torch), ftlm._C is not built and ftlm falls
back to its PyTorch implementations with a warning at run time; ftlm._text is built either way (without it the data
preparation uses its numpy versions, same results, slower).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def say(message):
    print(f"ftlm setup.py: {message}", file=sys.stderr)


def find_cuda_home():
    """CUDA_HOME, else the toolkit behind the nvcc on PATH (which may be a wrapper script), else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            return home
    return None


def nvcc_version(cuda_home):
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def gpu_visible(torch):
    if shutil.which("nvidia-smi"):
        try:
            return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            pass
    return torch.cuda.is_available()


def want_cuda(torch):
    flag = os.environ.get("FTLM_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"ftlm setup.py: FTLM_CUDA must be 0, 1 or unset, got '{flag}'")
    if flag == "0":
        say("FTLM_CUDA=0: building the C++ (CPU) kernels only")
        return False
    cuda_home = find_cuda_home()
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if cuda_home is None:
        problems.append("no CUDA toolkit found (nvcc / CUDA_HOME)")
    elif torch.version.cuda is not None:
        nvcc = nvcc_version(cuda_home)
        # torch.utils.cpp_extension refuses a different major version (a minor difference only warns).
        if nvcc is None:
            problems.append(f"could not run {cuda_home}/bin/nvcc --version")
        elif nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
            problems.append(f"nvcc {nvcc} does not match torch's CUDA {torch.version.cuda}")
    if flag == "1":
        if problems:
            raise SystemExit("ftlm setup.py: FTLM_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
        os.environ["CUDA_HOME"] = cuda_home
        return True
    if problems:
        say("building the C++ (CPU) kernels only: " + "; ".join(problems))
        return False
    if not gpu_visible(torch):
        say("no GPU visible: building the C++ (CPU) kernels only (set FTLM_CUDA=1 to compile the CUDA kernels too)")
        return False
    os.environ["CUDA_HOME"] = cuda_home
    return True


def text_extension(flags):
    from setuptools import Extension

    return Extension("ftlm._text", sorted(glob.glob(os.path.join("csrc", "text", "*.cpp"))), extra_compile_args=flags)


def extensions():
    try:
        import torch
    except ImportError:
        say(
            "torch is not importable: ftlm._C is not built; ftlm will use its PyTorch fallbacks. "
            "Install torch first and build with: pip install --no-build-isolation -e ."
        )
        return [text_extension(["-O3", "-g0", "-std=c++17"])], {}
    with_cuda = want_cuda(torch)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    # Imported after CUDA_HOME is settled: torch.utils.cpp_extension reads it at import time.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-g0"]  # no debug info: a smaller library, a faster build
    if not with_cuda:
        ext = CppExtension("ftlm._C", sources, extra_compile_args={"cxx": cxx_flags})
    else:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        say(
            f"building the C++ and CUDA kernels (CUDA_HOME={os.environ['CUDA_HOME']}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'detected from the GPU')})"
        )
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        ext = CUDAExtension(
            "ftlm._C",
            sources,
            define_macros=[("FTLM_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )
    build = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext, text_extension({"cxx": cxx_flags})], {"build_ext": build}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
