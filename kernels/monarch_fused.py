"""Launcher of the fused Monarch forward (``monarch_fused.cu``): α, Y and c stay on the multiprocessor.

The kernel computes the same function as the two-stage Triton kernel of ``monarch.py`` (T = 1; math in the
``.cu`` file's header and in ``docs/monarch.md``) without the α/Y/c intermediates in device memory, so its extra
memory is the output alone. It is CUDA C++ (``mma.sync``, ``ldmatrix``, ``cp.async``): Triton cannot express the
re-layout between the R-step and the L-step (``kernels/NOTES.md``, "Why not one fused kernel"). There is no CPU
path; the two-stage kernel is the CPU-testable reference it is compared against on the GPU.

Build: ``nvcc -cubin`` once per (head dim, l tiles, i tiles, dtype, GPU architecture), under a second, cached
next to the launch-config cache (``TOOLKIT_KERNEL_CACHE``, default ``~/.cache/toolkit``) by a hash of the source
and the options; loaded and launched through the CUDA driver API (``ctypes``, no compiled Python extension), on
PyTorch's current stream.

Coverage: b1 ≤ 32 rows and b2 ≤ 64 columns per tile (tiling (1,1,1) and (1,2,1) at 480p, the bundled model's
(1,1,1) and (1,2,1)), head dim 64 or 128, bf16 or fp16, every mode (bidirectional, block-causal, KV cache).
:func:`fused_unsupported` says why a call is outside that; the caller then uses the two-stage kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import torch
from toolkit.kernels._common import LOG2E, TileGeometry, cache_path, key_tiles_allowed_on, token_strides

from toolkit.errors import ToolkitError

SOURCE = Path(__file__).with_name("monarch_fused.cu")
BJ, CHUNK, WARPS = 8, 8, 8  # columns per block, key rows per L-step pass, warps (as in the .cu file)
MAX_B1, MAX_B2 = 32, 64


def _tiles(b2: int, b1: int) -> tuple[int, int]:
    """(16-column l tiles, 16-row i tiles per warp) of the compiled variant for a b1 × b2 tile."""
    return -(-b2 // 16), -(-b1 // 16)


def smem_bytes(b2: int, d: int, n_l: int, m_i: int) -> int:
    """Dynamic shared memory of one block (mirrors ``Layout`` in the .cu file)."""
    row = d + 8
    prow = 32 * ((n_l + 1) // 2) + 8
    elems = BJ * (16 * m_i * row + 8) + 8 * b2 * row + 2 * BJ * CHUNK * row + row + 2 * BJ * prow
    elems = (elems + 1) & ~1
    elems += 2 * BJ * CHUNK + 2 * 3 * 4 * BJ * 2
    return 2 * elems


def fused_unsupported(q: torch.Tensor, gq: TileGeometry) -> str | None:
    """Why the fused kernel cannot run queries ``q`` tiled as ``gq`` (None if it can; keys share the tiling)."""
    return _outside_coverage(q, gq) or _missing_nvcc()


def _missing_nvcc() -> str | None:
    """Why no cubin can be built here (None: nvcc is there). Asked before a build, not on every launch (a PATH
    search, about 40 µs)."""
    if shutil.which(_nvcc()) is None:
        return f"the fused kernel is built at run time and needs nvcc ({_nvcc()}; set TOOLKIT_NVCC or CUDA_HOME)"
    return None


def _outside_coverage(q: torch.Tensor, gq: TileGeometry) -> str | None:
    """:func:`fused_unsupported` without the compiler: the dtype, head dim, tile, device and shared memory."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"the fused kernel takes bf16 or fp16, not {q.dtype}"
    if q.shape[-1] not in (64, 128):
        return f"the fused kernel takes head dim 64 or 128, not {q.shape[-1]}"
    if gq.b1 > MAX_B1 or gq.b2 > MAX_B2:
        return f"tile {gq.b1} × {gq.b2} is over the fused kernel's {MAX_B1} × {MAX_B2}"
    if not q.is_cuda:
        return "the fused kernel is CUDA only"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "the fused kernel needs sm_80 or newer (mma.sync bf16, cp.async)"
    n_l, m_i = _tiles(gq.b2, gq.b1)
    need = smem_bytes(gq.b2, q.shape[-1], n_l, m_i)
    have = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
    if need > have:
        return f"the fused kernel needs {need} B of shared memory per block, the GPU gives {have}"
    return None


def _nvcc() -> str:
    if os.environ.get("TOOLKIT_NVCC"):
        return os.environ["TOOLKIT_NVCC"]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return str(Path(home) / "bin" / "nvcc") if home else "nvcc"


def _flags(d: int, n_l: int, m_i: int, fp16: bool, arch: str, defines: tuple[str, ...] = ()) -> list[str]:
    return ["-cubin", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-DMF_D={d}",
            f"-DMF_NL={n_l}", f"-DMF_MI={m_i}", f"-DMF_FP16={int(fp16)}", *(f"-D{x}" for x in defines)]


def _arch(device: torch.device) -> str:
    """The nvcc target of ``device``: sm_90a on Hopper (its own instructions), plain sm_XY elsewhere."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}" + ("a" if major >= 9 else "")


_BUILT: dict[tuple, Path] = {}  # (cache folder, flags) -> cubin: a launch after the first costs a dict lookup


def build(d: int, n_l: int, m_i: int, fp16: bool, arch: str, defines: tuple[str, ...] = ()) -> Path:
    """The cubin of one variant (compiled on first use, then read from the disk cache; in-process after the first
    call). ``defines``: extra ``-D`` macros (the timing ablations of ``benchmarks/profile_fused.py``)."""
    flags = _flags(d, n_l, m_i, fp16, arch, defines)
    memo = (str(cache_path()), *flags)
    if memo in _BUILT:
        return _BUILT[memo]
    why = _missing_nvcc()
    if why:
        raise ToolkitError(why)
    version = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + version.encode()).hexdigest()[:20]
    out = cache_path().parent / "monarch_fused" / f"{key}.cubin"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        _compile(flags, str(tmp))
        tmp.replace(out)
    _BUILT[memo] = out
    return out


def _compile(flags: list[str], out: str) -> subprocess.CompletedProcess:
    """nvcc on the kernel source with ``flags``, writing ``out``; its stderr holds ptxas's report."""
    done = subprocess.run([_nvcc(), *flags, "-o", out, str(SOURCE)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ToolkitError(f"nvcc failed on {SOURCE.name} ({' '.join(flags)}):\n{done.stderr[-2000:]}")
    return done


def compile_report(d: int, n_l: int, m_i: int, fp16: bool = False, arch: str = "90a") -> dict:
    """ptxas's resource report of one variant, compiled here without a GPU: registers, stack and spill bytes."""
    done = _compile([*_flags(d, n_l, m_i, fp16, arch), "-Xptxas", "-v"], os.devnull)
    # the report lists each kernel: "Function properties for <name>" then its frame/spill and register lines
    text = done.stderr.split("Compiling entry function 'monarch_fused_fwd'")[-1].split("Compiling entry function")[0]
    report = {"registers": int(re.search(r"Used (\d+) registers", text).group(1))}
    for key, pattern in (("stack_bytes", r"(\d+) bytes stack frame"),
                         ("spill_store_bytes", r"(\d+) bytes spill stores"),
                         ("spill_load_bytes", r"(\d+) bytes spill loads")):
        report[key] = int(re.search(pattern, text).group(1))
    return report


class _Params(ctypes.Structure):  # the kernel's `Params`, field for field
    _fields_ = [(name, ctypes.c_void_p) for name in ("q", "k", "v", "out", "allowed", "timing")] + [
        (name, ctypes.c_longlong) for name in
        ("sq_b", "sq_t", "sq_h", "sk_b", "sk_t", "sk_h", "sv_b", "sv_t", "sv_h", "so_b", "so_t", "so_h")] + [
        (name, ctypes.c_int) for name in
        ("heads", "b1", "b2", "height", "width", "h_in", "w_in", "f_tied", "h_reduce", "w_reduce")] + [
        ("scale_log2", ctypes.c_float)]


class _Driver:
    """The few CUDA driver calls the launcher needs, on PyTorch's context of each device."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.functions: dict[tuple[int, str], ctypes.c_void_p] = {}
        self.lock = threading.Lock()

    def check(self, status: int, what: str) -> None:
        if status != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorString(status, ctypes.byref(name))
            raise ToolkitError(f"{what}: CUDA driver error {status} ({(name.value or b'?').decode()})")

    def function(self, device: int, cubin: Path, smem: int = 0, name: str = "monarch_fused_fwd") -> ctypes.c_void_p:
        key = (device, str(cubin), name)
        with self.lock:
            if key not in self.functions:
                torch.cuda.init()
                with torch.cuda.device(device):
                    torch.empty(1, device=f"cuda:{device}")  # makes PyTorch's (primary) context current here
                    module, fn = ctypes.c_void_p(), ctypes.c_void_p()
                    image = cubin.read_bytes()
                    self.check(self.lib.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(image)),
                               f"loading {cubin.name}")
                    self.check(self.lib.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()),
                               f"cuModuleGetFunction({name})")
                self.functions[key] = fn
            fn = self.functions[key]
        # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8 (idempotent; the size may differ per b2)
        self.check(self.lib.cuFuncSetAttribute(fn, 8, ctypes.c_int(smem)), "cuFuncSetAttribute")
        return fn

    def launch(self, fn, grid: tuple[int, int, int], threads: int, smem: int, stream: int, *args) -> None:
        """``args``: ctypes objects, one per kernel parameter (passed by address, as cuLaunchKernel wants)."""
        pointers = (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))
        self.check(self.lib.cuLaunchKernel(fn, *(ctypes.c_uint(x) for x in grid), ctypes.c_uint(threads),
                                           ctypes.c_uint(1), ctypes.c_uint(1), ctypes.c_uint(smem),
                                           ctypes.c_void_p(stream), pointers, None), "cuLaunchKernel")


_DRIVER: list[_Driver] = []


def _driver() -> _Driver:
    if not _DRIVER:
        _DRIVER.append(_Driver())
    return _DRIVER[0]


def monarch_fused_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    tiling: tuple[int, int, int],
    *,
    query_frames: tuple[int, int],
    key_frames: tuple[int, int],
    block_causal_frames: int | None,
    scale: float,
    out: torch.Tensor | None = None,
    _defines: tuple[str, ...] = (),
    _timing: torch.Tensor | None = None,
) -> torch.Tensor:
    """Monarch attention (T = 1) of raster-order ``q`` (``b i h d``) against ``k, v`` (``b j h d``) in one kernel;
    same arguments and result as ``monarch._forward`` (frames and scale resolved by the caller). ``out``: a
    buffer to write (``b i h d``, contiguous head dim), e.g. NaN-filled by a test. ``_defines`` and ``_timing``
    (int64, 2 × 8 × 7) serve ``benchmarks/profile_fused.py``: ablation macros and the per-phase cycle counts of a
    ``MF_TIMING`` build."""
    gq = TileGeometry(tuple(grid), tuple(tiling), tuple(query_frames))
    gk = TileGeometry(tuple(grid), tuple(tiling), tuple(key_frames))
    why = _outside_coverage(q, gq)  # nvcc: asked by build() only when it has no cubin for this variant
    if why:
        raise ToolkitError(why)
    # 16-byte vector loads: contiguous head dim, token and head strides multiples of 8 elements, aligned bases
    q, k, v = (x if x.stride(-1) == 1 and all(s % 8 == 0 for s in x.stride()[:-1]) and x.data_ptr() % 16 == 0
               else x.contiguous() for x in (q, k, v))
    B, n_q, H, D = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ToolkitError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with a contiguous head dim")
    if B * H > 65535:
        raise ToolkitError(f"batch × heads = {B * H} is over the grid's 65535")
    allowed = key_tiles_allowed_on(q.device, gq, gk, block_causal_frames)
    n_l, m_i = _tiles(gq.b2, gq.b1)
    smem = smem_bytes(gq.b2, D, n_l, m_i)
    cubin = build(D, n_l, m_i, q.dtype == torch.float16, _arch(q.device), _defines)
    drv = _driver()
    fn = drv.function(q.device.index, cubin, smem)
    params = _Params(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), allowed.data_ptr(),
        None if _timing is None else _timing.data_ptr(),
        *token_strides(q), *token_strides(k), *token_strides(v), *token_strides(out),
        H, gq.b1, gq.b2, *gq.args(), float(scale) * LOG2E,
    )
    launch_grid = (-(-gq.b2 // BJ), gq.num_tiles, B * H)
    drv.launch(fn, launch_grid, WARPS * 32, smem, torch.cuda.current_stream(q.device).cuda_stream, params)
    return out


def device_smem_bytes(b2: int, d: int, device: torch.device | str = "cuda") -> int:
    """The kernel's own shared-memory count (``monarch_fused_smem_bytes``), to check :func:`smem_bytes` against."""
    device = torch.device(device)
    n_l, m_i = _tiles(b2, MAX_B1)
    cubin = build(d, n_l, m_i, False, _arch(device))
    drv = _driver()
    fn = drv.function(device.index or 0, cubin, 0, "monarch_fused_smem_bytes")
    result = torch.zeros(1, dtype=torch.int32, device=device)
    drv.launch(fn, (1, 1, 1), 1, 0, torch.cuda.current_stream(device).cuda_stream, ctypes.c_int(b2),
               ctypes.c_void_p(result.data_ptr()))
    return int(result.item())
