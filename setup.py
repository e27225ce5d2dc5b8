"""Thin driver: CMakeLists.txt is the one build description; this only runs it.

Environment: FUSED_MOE_CUDA=0/1 forces the CUDA build off/on (default: on when
nvcc is found), TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), MAX_JOBS,
FUSED_MOE_CUTLASS_DIR (a CUTLASS checkout instead of the nvidia-cutlass wheel),
FUSED_MOE_BUILD_TYPE (default Release), FUSED_MOE_BUILD_DIR (a CMake build
folder to reuse across builds, e.g. for incremental wheels).
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build_dir = Path(os.environ.get("FUSED_MOE_BUILD_DIR") or Path(self.build_temp) / "cmake").resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        config = os.environ.get("FUSED_MOE_BUILD_TYPE", "Release")
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DFUSED_MOE_OUTPUT={out_file}",
        ]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(configure, cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "-j", jobs], cwd=build_dir)


setup(
    ext_modules=[Extension("fused_moe._C", sources=[], py_limited_api=True)],
    cmdclass={"build_ext": CMakeBuild},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
