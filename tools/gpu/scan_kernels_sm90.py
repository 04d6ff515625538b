"""Compile the chunk scan's Triton kernels for Hopper (sm_90) without a GPU and read their machine code.

    python -m tools.gpu.scan_kernels_sm90 [--dtype bf16|fp32] [--tiles T,D,H,WARPS ...]

Triton lowers a kernel to a cubin for a named target in Python and with the ptxas it ships, so this runs on any
Linux machine with triton installed. For each kernel of trainer/ops/fastweight/chunk_triton.py (forward walk, its
read-gradient variant, reverse walk) at its default tiles (or `--tiles`, applied to all three) it prints a row:
registers per thread, the stack frame and local-memory stores (register spills), shared memory, and the
instruction counts that say where the arithmetic runs: HGMMA (Hopper's warpgroup tensor-core MMA), HMMA (the
older warp-level tensor-core MMA), RED (the atomic reductions of the partial reads).

This is the GPU-free evidence that the kernels compile for the chip they target, take tensor-core instructions for
their products and spill little; the speed itself needs `python -m tools.bench.scan` on a GPU.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import trainer.ops.fastweight.chunk_triton as kernels
from tools.cli import OneLineErrorParser

TARGET = GPUTarget("cuda", 90, 32)
DOT_DTYPES = {"bf16": (torch.bfloat16, tl.bfloat16), "fp32": (torch.float32, tl.float32)}
_POINTER_DTYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_OPERANDS = ("z_ptr", "v_ptr", "grad_out_ptr")  # the activations: bf16 under autocast
_TABLES = ("table_ptr", "counts_ptr")


@dataclass(frozen=True)
class KernelReport:
    name: str
    tiles: tuple[int, int, int, int]  # (BLOCK_T, BLOCK_D, BLOCK_H, num_warps)
    registers: int
    stack_bytes: int
    spill_stores: int  # STL instructions
    shared_bytes: int
    hgmma: int
    hmma: int
    atomics: int  # RED instructions


def _kernels() -> dict[str, tuple]:
    """name -> (jit function, its variant's constexprs, default tiles)."""
    return {
        "forward walk": (kernels._walk_kernel, {"HAS_STATE": False, "READ_GRAD": False}, kernels.FORWARD_BLOCKS),
        "read-gradient walk": (kernels._walk_kernel, {"HAS_STATE": False, "READ_GRAD": True}, kernels.READ_GRAD_BLOCKS),
        "reverse walk": (kernels._reverse_kernel, {}, kernels.REVERSE_BLOCKS),
    }


def _signature(fn, constexprs: dict, operand: torch.dtype) -> dict[str, str]:
    def kind(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in _OPERANDS:
            return _POINTER_DTYPES[operand]
        if name in _TABLES:
            return "*i32"
        if name.endswith("_ptr"):
            return "*fp32"  # outputs and states
        return "fp32" if name == "lr" else "i32"

    return {name: kind(name) for name in fn.arg_names}


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_report(name: str, dtype: str = "bf16", tiles: tuple[int, int, int, int] | None = None) -> KernelReport:
    fn, variant, default_tiles = _kernels()[name]
    block_t, block_d, block_h, warps = tiles or default_tiles
    operand, dot_dtype = DOT_DTYPES[dtype]
    constexprs = {"DOT_DTYPE": dot_dtype, "PRECISION": "ieee", "BLOCK_T": block_t, "BLOCK_D": block_d,
                  "BLOCK_H": block_h, **variant}  # fmt: skip
    source = ASTSource(
        fn=fn,
        signature=_signature(fn, constexprs, operand),
        constexprs={(fn.arg_names.index(key),): value for key, value in constexprs.items()},
    )
    compiled = triton.compile(source, target=TARGET, options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder, "kernel.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    fields = dict(item.split(":", 1) for item in next(line for line in usage.splitlines() if "REG:" in line).split())
    return KernelReport(
        name=name, tiles=(block_t, block_d, block_h, warps), registers=int(fields["REG"]),
        stack_bytes=int(fields["STACK"]), spill_stores=sass.count("STL"), shared_bytes=compiled.metadata.shared,
        hgmma=sass.count("HGMMA"), hmma=sass.count("HMMA"), atomics=sass.count("RED"),
    )  # fmt: skip


def markdown(reports: list[KernelReport]) -> str:
    lines = [
        "| kernel | tiles (T, D, H, warps) | registers | stack B | spill stores | shared KiB | HGMMA | HMMA | RED |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.name} | {', '.join(map(str, r.tiles))} | {r.registers} | {r.stack_bytes} | {r.spill_stores} | "
        f"{r.shared_bytes / 1024:.0f} | {r.hgmma} | {r.hmma} | {r.atomics} |"
        for r in reports
    ]
    return "\n".join(lines)


def _tiles(text: str) -> tuple[int, int, int, int]:
    values = tuple(int(x) for x in text.split(","))
    if len(values) != 4 or min(values) <= 0:
        raise ValueError(f"--tiles takes BLOCK_T,BLOCK_D,BLOCK_H,WARPS, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m tools.gpu.scan_kernels_sm90", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dtype", choices=DOT_DTYPES, default="bf16", help="operand dtype (default bf16)")
    parser.add_argument("--tiles", type=_tiles, nargs="*", default=[None], help="T,D,H,WARPS (default: each kernel's)")
    args = parser.parse_args(argv)
    reports = [compile_report(name, args.dtype, tiles) for tiles in args.tiles for name in _kernels()]
    print(f"chunk scan kernels for sm_90, {args.dtype} operands (triton {triton.__version__})")
    print(markdown(reports))


if __name__ == "__main__":
    main()
