"""Does the fast-weight state passing hide behind the local chunk scan? Step time with and without overlap.

One TTT-NTP MLP (`FastWeightMLP`, the normalized write) under context parallelism over P local gloo
processes: forward + backward of its output on this rank's shard of one document of S tokens. Timed per
rank, median of --repeats steps, the two modes alternating step by step so that both see the same load:
- serial: the local chunk scan, then the cross-rank state scan (`CPGroup(overlap=False)`);
- overlapped: the pieces' states first (`state_transfer`), the scan's messages on a side thread while the
  local scan runs, and in the backward the adjoint scan while the local scan's backward runs (the default).
Also timed alone: the state scan (fwd + bwd of `exclusive_state_scan` on d x h states) and the step with
its scan skipped (P = 1 pieces: no messages). `hidden` = (serial - overlapped) / scan alone: the share of
the scan's time taken off the step (1 = all of it; the overlapped mode pays `state_transfer` on top).

    python -m tools.bench.state_overlap                     # d=1024, h=4096, S=8192, P=2
    python -m tools.bench.state_overlap --hidden 512 --seq-len 4096 --repeats 5
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from parallel.pieces import CPGroup, fold, unfold
from parallel.sharding import shard
from parallel.state_scan import exclusive_state_scan
from tools.cli import OneLineErrorParser, positive_int
from trainer.ttt import TTTConfig
from trainer.ttt.context import TTTContext
from trainer.ttt.mlp import FastWeightMLP


class _MLP(nn.Module):
    """The gated MLP the TTT layer wraps (the fields `FastWeightMLP` reads)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()


class _Layer(nn.Module):
    """One TTT MLP under CP with its own context, as a patched decoder runs it: layouts from the
    positions, the shard's pieces folded into rows."""

    def __init__(self, hidden: int, intermediate: int, chunk: int, cp: CPGroup) -> None:
        super().__init__()
        self.context = TTTContext(TTTConfig(method="ntp", chunk_size=chunk, lr=1.0))
        self.mlp = FastWeightMLP(_MLP(hidden, intermediate), self.context.cfg, self.context)
        self.mlp.set_context_parallel(cp)
        nn.init.normal_(self.mlp.ttt_proj.weight, std=0.02)  # a non-zero value target
        self.cp = cp

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        self.context.begin(self, (), {"inputs_embeds": x, "position_ids": position_ids})
        return unfold(self.mlp(fold(x, self.cp)), self.cp)


def _median_ms(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def _rank(rank: int, world: int, init: str, args: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        d, h, seq = args["hidden"], 4 * args["hidden"], args["seq_len"]
        layers = {}
        for mode, overlap in (("serial", False), ("overlapped", True)):
            torch.manual_seed(0)
            layers[mode] = _Layer(d, h, args["chunk"], CPGroup(dist.group.WORLD, "headtail", overlap))
        x = shard(torch.randn(1, seq, d, generator=torch.Generator().manual_seed(1)), rank, world, 1, "headtail")
        x.requires_grad_(True)
        positions = shard(torch.arange(seq).unsqueeze(0), rank, world, 1, "headtail")

        def step(mode: str):
            return lambda: layers[mode](x, positions).sum().backward()

        states = [torch.randn(2, d, h, requires_grad=True) for _ in range(2)]  # head and tail pieces
        resets = torch.tensor([rank == 0, False])

        def scan_alone():
            committed, pending = exclusive_state_scan(*states, resets, CPGroup(dist.group.WORLD, "headtail"))
            (committed.sum() + pending.sum()).backward()

        for warm in (step("serial"), step("overlapped"), scan_alone):
            warm()
        times = {"serial": [], "overlapped": []}
        for _ in range(args["repeats"]):
            for mode in times:
                times[mode].append(_median_ms(step(mode), 1))
        result = {mode: statistics.median(values) for mode, values in times.items()}
        result["scan"] = _median_ms(scan_alone, args["repeats"])
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m tools.bench.state_overlap", description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=positive_int, default=1024, help="d (the MLP's h is 4d)")
    parser.add_argument("--seq-len", type=positive_int, default=8192, help="S, global tokens")
    parser.add_argument("--chunk", type=positive_int, default=256, help="ttt.chunk_size")
    parser.add_argument("--ranks", type=positive_int, default=2, help="P, local gloo processes")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed steps per mode")
    args = parser.parse_args(argv)
    if args.seq_len % (2 * args.ranks * args.chunk):
        parser.error(f"--seq-len must be a multiple of 2 x ranks x chunk = {2 * args.ranks * args.chunk}")
    with tempfile.TemporaryDirectory() as scratch:
        init = f"file://{scratch}/pg"
        mp.spawn(_rank, args=(args.ranks, init, vars(args), scratch), nprocs=args.ranks, join=True)
        results = [json.loads(Path(scratch, f"rank{r}.json").read_text()) for r in range(args.ranks)]
    slowest = {key: max(r[key] for r in results) for key in results[0]}
    hidden = (slowest["serial"] - slowest["overlapped"]) / slowest["scan"]
    state_mib = 2 * 2 * args.hidden * 4 * args.hidden * 4 / 2**20
    print(
        f"One TTT-NTP MLP, d={args.hidden}, h={4 * args.hidden}, S={args.seq_len}, chunk {args.chunk}, "
        f"P={args.ranks} (headtail; {state_mib:.0f} MiB of fp32 states per rank and message), slowest rank, ms:"
    )
    print()
    print("| serial step | overlapped step | overlapped / serial | state scan alone | hidden |")
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {slowest['serial']:.1f} | {slowest['overlapped']:.1f} | {slowest['overlapped'] / slowest['serial']:.3f} "
        f"| {slowest['scan']:.1f} | {hidden:.2f} |"
    )


if __name__ == "__main__":
    main()
