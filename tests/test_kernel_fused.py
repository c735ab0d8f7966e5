"""The fused CUDA forward (``kernels/monarch_fused.cu``) where no GPU is needed: every variant compiles for sm_90
without spills, the launcher's shared-memory count equals the kernel's own layout (a host build of the same
struct), the cubin cache, and the launcher's refusals. Its results are checked on the GPU (``tests/test_gpu.py -k
fused``: against the float64 reference and the two-stage kernel)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from toolkit.kernels import monarch_fused
from toolkit.kernels._common import TileGeometry
from toolkit.kernels.monarch import _forward

from toolkit.errors import ToolkitError

needs_nvcc = pytest.mark.skipif(shutil.which(monarch_fused._nvcc()) is None, reason="needs nvcc")

# (head dim, 16-column l tiles, 16-row i tiles, fp16): the variants the covered shapes select
VARIANTS = [(128, 4, 2, False), (128, 2, 1, False), (64, 2, 2, False), (128, 3, 2, True), (64, 4, 1, True),
            (128, 1, 2, False)]


@needs_nvcc
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"d{v[0]}-nl{v[1]}-mi{v[2]}-{'fp16' if v[3] else 'bf16'}")
def test_every_variant_compiles_for_sm90_without_spills(variant):
    report = monarch_fused.compile_report(*variant)
    # one block of 256 threads per SM may use 255 registers; a spill would put the accumulator in local memory
    assert report["registers"] <= 255
    assert report["spill_store_bytes"] == report["spill_load_bytes"] == report["stack_bytes"] == 0, report


HOST_LAYOUT = """
#include <cstdio>
#include <cstdlib>
#include "monarch_fused.cu"
int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) std::printf("%d\\n", Layout(std::atoi(argv[i])).bytes);
}
"""


@needs_nvcc
@pytest.mark.parametrize("d, n_l, m_i, b2s", [(128, 4, 2, (49, 52, 64)), (64, 2, 2, (17, 32)),
                                              (128, 1, 1, (7, 13, 16)), (128, 3, 1, (40, 41))])
def test_launcher_shared_memory_count_equals_the_kernel_layout(tmp_path, d, n_l, m_i, b2s):
    """``smem_bytes`` mirrors the kernel's ``Layout``; too small a count would let the kernel write past its
    shared memory, so the struct itself is built for the host and asked."""
    (tmp_path / "layout.cu").write_text(HOST_LAYOUT)
    exe = tmp_path / "layout"
    subprocess.run([monarch_fused._nvcc(), "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a",
                    f"-DMF_D={d}", f"-DMF_NL={n_l}", f"-DMF_MI={m_i}", f"-I{monarch_fused.SOURCE.parent}",
                    "-o", str(exe), str(tmp_path / "layout.cu")], check=True, capture_output=True)
    got = subprocess.run([str(exe), *map(str, b2s)], check=True, capture_output=True, text=True).stdout.split()
    assert [int(x) for x in got] == [monarch_fused.smem_bytes(b2, d, n_l, m_i) for b2 in b2s]


@needs_nvcc
def test_cubins_are_cached_by_source_and_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_KERNEL_CACHE", str(tmp_path))
    first = monarch_fused.build(64, 2, 1, False, "90a")
    stamp = first.stat().st_mtime_ns
    again = monarch_fused.build(64, 2, 1, False, "90a")
    assert again == first and again.stat().st_mtime_ns == stamp  # remembered in this process
    monkeypatch.setattr(monarch_fused, "_BUILT", {})  # as a new process: the disk cache, not nvcc
    again = monarch_fused.build(64, 2, 1, False, "90a")
    assert again == first and again.stat().st_mtime_ns == stamp  # read, not rebuilt
    other = monarch_fused.build(64, 2, 1, False, "90a", ("MF_SKIP_LSTEP=1",))
    assert other != first and other.read_bytes() != first.read_bytes()


@pytest.mark.parametrize("grid, tiling, dtype, dim, reason", [
    ((6, 30, 52), (3, 1, 1), torch.bfloat16, 128, "over the fused kernel's 32 × 64"),  # b1 = 90
    ((4, 16, 80), (1, 1, 1), torch.bfloat16, 128, "over the fused kernel's 32 × 64"),  # b2 = 80 (720p's width)
    ((4, 16, 64), (1, 1, 1), torch.float32, 128, "bf16 or fp16"),
    ((4, 16, 64), (1, 1, 1), torch.bfloat16, 40, "head dim 64 or 128"),
    ((4, 16, 64), (1, 1, 1), torch.bfloat16, 128, "CUDA only"),  # covered, but on the CPU
])
def test_fused_unsupported_names_the_reason(grid, tiling, dtype, dim, reason):
    q = torch.zeros(1, grid[0] * grid[1] * grid[2], 1, dim, dtype=dtype)
    geometry = TileGeometry(grid, tiling, (0, grid[0]))
    assert reason in monarch_fused.fused_unsupported(q, geometry)


def test_fused_version_refuses_cpu_tensors_and_stage_switches():
    q = torch.zeros(1, 2 * 16 * 64, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ToolkitError, match="CUDA only"):
        _forward(q, q, q, (2, 16, 64), (1, 1, 1), version="fused")
    with pytest.raises(ToolkitError, match="no separate stages"):
        _forward(q, q, q, (2, 16, 64), (1, 1, 1), version="fused", stages="rows")
