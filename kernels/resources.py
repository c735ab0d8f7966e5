"""Resource report of the kernels compiled for a GPU target *without a GPU*: registers, spills, shared memory and
whether the matrix products became Hopper wgmma (SASS ``HGMMA``) or mma.sync (``HMMA``).

    TRITON_INTERPRET=0 python -m toolkit.kernels.resources [--arch 90] [--dim 128]

Uses Triton's ahead-of-time path (``triton.compile`` on an ``ASTSource``) and the ``cuobjdump`` shipped with the
Triton wheel. Integer arguments that the JIT would specialise as multiples of 16 (strides, pointers) get the same
``tt.divisibility`` hint, otherwise loads are not vectorised and the report is needlessly pessimistic. The JSON
printed last is what ``kernels/NOTES.md`` quotes. Relies on Triton internals (tested with 3.9); on failure it says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from triton.runtime import JITFunction

os.environ.setdefault("TRITON_INTERPRET", "0")

STRIDES = ("sq_b", "sq_n", "sq_h", "sk_b", "sk_n", "sk_h", "sv_b", "sv_n", "sv_h", "so_b", "so_n", "so_h",
           "sr_b", "sr_n", "sr_h", "sd_b", "sd_n", "sd_h", "sg_b", "sg_n", "sg_h")


def compile_report(
    fn: JITFunction, pointers: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int
) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        elif name in ("scale", "scale_log2"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in pointers or n in STRIDES}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as fh:
        fh.write(kernel.asm["cubin"])
    try:
        usage = subprocess.run([cuobjdump, "-res-usage", fh.name], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", fh.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(fh.name)
    fields = {}
    for line in usage.splitlines():
        for part in line.replace(",", " ").split():
            if ":" in part and part.split(":")[0] in ("REG", "STACK"):
                key, value = part.split(":", 1)
                fields[key.lower()] = int(value)
    return {
        "kernel": fn.__name__, **{k: v for k, v in constexprs.items() if k.isupper()}, "num_warps": num_warps,
        "num_stages": num_stages, "registers": fields.get("reg"), "stack_bytes": fields.get("stack"),
        "spill_loads": sass.count("LDL"), "spill_stores": sass.count("STL"), "shared_bytes": kernel.metadata.shared,
        "HGMMA": sass.count("HGMMA"), "HMMA": sass.count("HMMA"),
        "async_copies": sass.count("LDGSTS") + sass.count("UTMALDG"),  # pipelined (cp.async / TMA) loads
    }


def split_meta(meta: dict) -> tuple[dict, int, int]:
    """Launch keywords -> (constexprs, num_warps, num_stages), as the JIT launcher splits them."""
    consts = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
    return consts, meta["num_warps"], meta["num_stages"]


# The paper's shapes (Wan2.1-1.3B, grid 21 × 30 × 52, fh,w tilings): tile widths b2 of the v1 R-step (52: the
# 480p clip, 80: 720p), and (b2, key tiles F, query tiles per launch) of the v2 R-step: the full clip (1,1,1) and
# the last AR chunk (3 query tiles).
V1_WIDTHS = (52, 80)
V2_SHAPES = ((52, 21, 21), (52, 21, 3))
COLS_HEIGHTS = (15, 30, 90)
# Backward kernels at the paper's shapes: column heights b1 of the L-step backward ((1,2,1), (1,1,1), (3,1,1)) and
# row widths b2 of the R-step backward and dq₂ (52: 480p; 26: (1,1,2); 80: 720p).
BWD_HEIGHTS = (15, 30, 90)
BWD_WIDTHS = (52, 26, 80)


def default_kernels(dim: int) -> list[tuple]:
    """(kernel, pointer types, constexprs, warps, stages) for the configs the launchers use at the paper's shapes:
    the keywords come from the launcher's own ``*_meta`` helpers (kernels/monarch.py), so the report compiles
    what runs (UPCAST is False on a GPU)."""
    from toolkit.kernels import compare, explicit, monarch

    bf, f32, i32 = "*bf16", "*fp32", "*i32"
    rows_ptrs = dict(Q=bf, K=bf, V=bf, ALPHA=bf, Y=bf, C=f32, ALLOWED=i32)
    cols_ptrs = dict(Q=bf, ALPHA=bf, Y=bf, C=f32, ALLOWED=i32, OUT=bf)
    out = []
    for b2 in V1_WIDTHS:
        out.append((monarch._monarch_rows_fwd, rows_ptrs,
                    *split_meta(monarch.rows_meta(monarch._rows_default(b2, dim), b2, dim, False))))
    for b2, n_key_tiles, n_query_tiles in V2_SHAPES:
        meta = monarch.rows_v2_meta(monarch._rows_v2_default(b2, dim, n_query_tiles), b2, n_key_tiles, dim, False)[0]
        out.append((monarch._monarch_rows_fwd_v2, rows_ptrs, *split_meta(meta)))
    for b1 in COLS_HEIGHTS:
        out.append((monarch._monarch_cols_fwd, cols_ptrs,
                    *split_meta(monarch.cols_meta(monarch._cols_default(b1, dim), dim, False))))
    # the streamed kernel's two compiles at the 480p clip (its other config entries are launch arguments)
    for bm, warps in ((64, 4), (128, 8)):
        cfg = {**monarch._streamed_default(30, 52), "BLOCK_M": bm, "num_warps": warps}
        out.append((monarch._monarch_streamed_fwd, {**rows_ptrs, "OUT": bf, "SYNC": i32},
                    *split_meta(monarch.streamed_meta(cfg, 52, dim, False))))
    out += backward_kernels(dim)
    out.append((explicit._factor_rows_fwd, dict(R=f32, V=bf, Y=f32, S=f32),
                dict(D=dim, BLOCK_J=64, BLOCK_L=64, PRECISION="tf32x3"), 8, 2))
    out.append((explicit._factor_cols_fwd, dict(L=f32, Y=f32, S=f32, OUT=f32, ROWS=f32),
                dict(D=dim, BLOCK_I=32, BLOCK_K=32, PRECISION="tf32x3"), 4, 2))
    for explicit_factors in (False, True):
        out.append((compare._monarch_compare_fwd, dict(Q=bf, K=bf, V=bf, LF=f32, RF=f32, ALLOWED=i32, ERR=f32),
                    dict(D=dim, BLOCK_I=16, BLOCK_L=64, EXPLICIT=explicit_factors, PRECISION="tf32x3"), 8, 2))
    return out


def backward_kernels(dim: int) -> list[tuple]:
    """The three backward kernels (kernels/monarch_backward.py) with the launcher's default configs
    (``backward_configs``) at the paper's shapes; the R-step backward also at 4 warps, the config the H200 tuner
    picked at b2 = 52. Pointer dtypes as the launcher allocates them: α, Y, dα, dY, s·dx in bf16; c, dc, dq₁, dk,
    dv in fp32."""
    from toolkit.kernels import monarch_backward as mb

    bf, f32, i32 = "*bf16", "*fp32", "*i32"
    cols_ptrs = dict(Q=bf, OUT=bf, DO=bf, DQ1=f32, ALPHA=bf, Y=bf, C=f32, DALPHA=bf, DY=bf, DC=f32, ALLOWED=i32)
    rows_ptrs = dict(Q=bf, K=bf, V=bf, DALPHA=bf, DY=bf, DC=f32, DX=bf, DK=f32, DV=f32, FIRST_A=i32)
    dq_ptrs = dict(K=bf, DX=bf, DQ1=f32, DQ=bf, ALLOWED=i32)
    consts = dict(D=dim, UPCAST=False)
    out = []
    for b1 in BWD_HEIGHTS:
        out.append((mb._monarch_cols_bwd, cols_ptrs, *split_meta({**consts, **mb.backward_configs(b1, 52, dim)[0]})))
    for b2 in BWD_WIDTHS:
        out.append((mb._monarch_rows_bwd, rows_ptrs, *split_meta({**consts, **mb.backward_configs(30, b2, dim)[1]})))
    out.append((mb._monarch_rows_bwd, rows_ptrs,
                *split_meta({**consts, **mb.backward_configs(30, 52, dim)[1], "num_warps": 4, "num_stages": 3})))
    for b2 in BWD_WIDTHS:
        out.append((mb._monarch_dq_rows, dq_ptrs, *split_meta({**consts, **mb.backward_configs(30, b2, dim)[2]})))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toolkit.kernels.resources", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper)")
    p.add_argument("--dim", type=int, default=128, help="head dim")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET (kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    reports = []
    for fn, ptrs, consts, warps, stages in default_kernels(args.dim):
        try:
            r = compile_report(fn, ptrs, consts, warps, stages, args.arch)
        except Exception as err:  # noqa: BLE001 - report and continue
            r = {"kernel": fn.__name__, **consts, "error": f"{type(err).__name__}: {err}".splitlines()[0][:200]}
        reports.append(r)
        print(r, flush=True)
    print(json.dumps(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
