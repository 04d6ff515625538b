"""Context parallelism: activation memory, step time and bytes sent per rank, and a projection to Qwen3.

Part one measures one training step (forward + backward, no optimizer; loss = summed CE / global
token count) of a tiny Qwen3-style model, fp32: d=256, h=1024, 4 layers, 8 query / 4 key-value heads
of 32, vocab 1024, NTP fast-weight MLPs on layers 1 and 3 (`every:2`), chunk C=64; one document of S
tokens, batch 1. For each P it spawns P fresh processes (gloo, one thread each) and applies
`parallel.apply_cp` (all-gather attention) for every P, P=1 included, so all run the same code.
Per rank, reported as the max over ranks:
- activation memory: unique storages packed by saved_tensors_hooks during the step, parameters
  excluded (deterministic);
- peak memory: the most bytes CPU tensors held above the step's start (`tools.measure.peak_bytes`,
  the allocator's record as on CUDA); the parameter gradients and gloo's tensors count too;
- step ms: median of --repeats further steps, each started on all ranks by a barrier; with more
  ranks than cores the ranks share cores, so it is no scaling result;
- bytes sent during the step, from `parallel.comm.LEDGER` by purpose.

Bytes sent by rank r of P per step (forward + backward), batch 1, S global tokens, L layers of which T
are TTT layers, activations of `a` bytes, fast-weight states fp32:

    all-gather attention  L (P-1) (S/P) kv_heads head_dim 2 a  x 2        K and V to P-1 peers; backward
                                                                          reduce-scatter (a ring, as the
                                                                          ledger models it)
    Ulysses attention     L (P-1)/P (S/P) head_dim (2 heads + 2 kv_heads) a  x 2   q, k, v out, output back
    fast-weight scan      T m(r, P) (1 + 2 d h + 3) 4                     one message: a reset flag and
                                                                          the committed and pending d x h;
                                                                          the normalized write's gate mass
                                                                          the same with d = h = 1 (+3)
    NTP halo              [r > 0] (8 + T d a) + [r < P-1] T d a           one row per TTT layer, forward to
                                                                          r-1, its gradient back to r+1;
                                                                          8: the int64 position row

with m(r, P) = #{k < ceil(log2 P) : r + 2^k < P} (forward scan) + #{k : r - 2^k >= 0} (backward scan):
in each direction some rank sends in all ceil(log2 P) rounds, but no rank in all rounds of both, so
max_r m = 2 ceil(log2 P) - 1 for P a power of two. Not counted: the int64 positions that every
attention layer all-gathers ((P-1) S/P x 8 bytes, under 0.5% of K/V). The table prints "model vs
measured" per P: the formulas above against the ledger, rank by rank.

Part two evaluates the same formulas (no processes) for Qwen3 0.6B-14B at S = 128k and 256k on
P = 8..64 GPUs of one CP group, bf16 activations, TTT MLPs on every 4th layer.

The acceptance point is the default S=4096: activation memory per rank at P=4 at most 0.4 of P=1.

    python -m tools.bench.cp                  # S=4096, P in 1 2 4, about two minutes
    python -m tools.bench.cp --quick          # S=1024, about a minute
    python -m tools.bench.cp --seq-len 8192 --ranks 1 2 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from transformers import Qwen3Config, Qwen3ForCausalLM

from parallel.comm import LEDGER
from parallel.context_parallel import apply_cp
from parallel.mesh import check_cp
from parallel.pieces import LOAD_BALANCES, batch_layout, pieces_per_rank
from parallel.segments import layout_plans
from parallel.sharding import IGNORE_INDEX, next_token_labels, shard_batch
from parallel.state_scan import scan_rounds
from tools.cli import OneLineErrorParser, positive_int
from tools.measure import MIB, peak_bytes
from trainer.planning.memory import kept_key_tokens
from trainer.ttt import TTTConfig, patch_model

DEFAULT_SEQ_LEN = 4096
QUICK_SEQ_LEN = 1024
DEFAULT_RANKS = (1, 2, 4)
DEFAULT_CHUNK = 64
DEFAULT_REPEATS = 3
QUICK_REPEATS = 2
ACCEPTANCE_RANKS = 4
ACTIVATION_RATIO_LIMIT = 0.4
PURPOSES = ("attention", "fastweight_scan", "halo")
STATE_BYTES = 4  # the scan's states accumulate in fp32
POSITION_BYTES = 8  # int64 position ids
LR = 0.1  # the NTP projection starts at zero; memory, time and bytes do not depend on it
GB = 1e9


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int


TINY = Arch(hidden=256, intermediate=1024, layers=4, heads=8, kv_heads=4, head_dim=32)
TINY_VOCAB = 1024
TINY_TTT_LAYERS = "every:2"
TINY_WRITE = "normalized"  # its gate mass has a scan of its own: one more (flag, committed, pending) of 1 x 1
TINY_ACTIVATION_BYTES = 4  # fp32

QWEN3 = {  # published configs: hidden, intermediate, layers, heads, kv heads, head_dim
    "0.6B": Arch(1024, 3072, 28, 16, 8, 128),
    "1.7B": Arch(2048, 6144, 28, 16, 8, 128),
    "4B": Arch(2560, 9728, 36, 32, 8, 128),
    "8B": Arch(4096, 12288, 36, 32, 8, 128),
    "14B": Arch(5120, 17408, 40, 40, 8, 128),
}
PROJECTION_SEQ_LENS = (131072, 262144)
PROJECTION_RANKS = (8, 16, 32, 64)
PROJECTION_TTT_LAYERS = "every:4"
PROJECTION_ACTIVATION_BYTES = 2  # bf16


def ttt_layer_count(arch: Arch, layers: str) -> int:
    return len(TTTConfig(method="ntp", layers=layers).layer_indices(arch.layers))


# --- the formulas (see the module docstring) -------------------------------------------------------


def allgather_bytes(arch: Arch, seq_len: int, ranks: int, act_bytes: int) -> int:
    return arch.layers * (ranks - 1) * (seq_len // ranks) * arch.kv_heads * arch.head_dim * 2 * act_bytes * 2


def ulysses_bytes(arch: Arch, seq_len: int, ranks: int, act_bytes: int) -> int:
    local = (seq_len // ranks) * arch.head_dim * (2 * arch.heads + 2 * arch.kv_heads) * act_bytes
    return arch.layers * local * (ranks - 1) // ranks * 2


def scan_messages(rank: int, ranks: int) -> int:
    distances = [2**k for k in range(scan_rounds(ranks))]
    return sum(rank + s < ranks for s in distances) + sum(rank - s >= 0 for s in distances)


def scan_bytes(arch: Arch, ttt_layers: int, rank: int, ranks: int) -> int:
    mass = 3 if TINY_WRITE == "normalized" else 0
    return ttt_layers * scan_messages(rank, ranks) * (1 + 2 * arch.hidden * arch.intermediate + mass) * STATE_BYTES


def halo_bytes(arch: Arch, ttt_layers: int, rank: int, ranks: int, act_bytes: int) -> int:
    row = ttt_layers * arch.hidden * act_bytes
    return (rank > 0) * (POSITION_BYTES + row) + (rank < ranks - 1) * row


def modelled_bytes(arch: Arch, ttt_layers: int, seq_len: int, rank: int, ranks: int, act_bytes: int) -> dict:
    return {
        "attention": allgather_bytes(arch, seq_len, ranks, act_bytes),
        "fastweight_scan": scan_bytes(arch, ttt_layers, rank, ranks),
        "halo": halo_bytes(arch, ttt_layers, rank, ranks, act_bytes),
    }


# --- child: one rank of a P-process CP group -------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    seq_len: int
    chunk_size: int
    repeats: int


@dataclass(frozen=True)
class RankResult:
    activation_bytes: int
    peak_bytes: int
    step_ms: float
    bytes_sent: dict[str, int]


def _build_model(chunk_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY.hidden,
        intermediate_size=TINY.intermediate,
        num_hidden_layers=TINY.layers,
        num_attention_heads=TINY.heads,
        num_key_value_heads=TINY.kv_heads,
        head_dim=TINY.head_dim,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config)
    patch_model(model, TTTConfig(method="ntp", layers=TINY_TTT_LAYERS, chunk_size=chunk_size, lr=LR, write=TINY_WRITE))
    return apply_cp(model, dist.group.WORLD).train()


def _make_step(model: torch.nn.Module, seq_len: int, rank: int, ranks: int) -> Callable[[], None]:
    """One fwd+bwd on this rank's shard of one random document of `seq_len` tokens."""
    input_ids = torch.randint(0, TINY_VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(seq_len).unsqueeze(0)
    labels = next_token_labels(input_ids, position_ids)
    total = int((labels != IGNORE_INDEX).sum())
    batch = shard_batch({"input_ids": input_ids, "position_ids": position_ids, "labels": labels}, rank, ranks)

    def step() -> None:
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        labels = batch["labels"].flatten()
        ce = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        (ce / total).backward()
        for param in model.parameters():
            param.grad = None  # every step allocates its gradients afresh, like the first one

    return step


def _storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages holding a tensor's data; a wrapper subclass (the functional collectives' async
    result) has none of its own, so look through to the tensors it wraps."""
    if not is_traceable_wrapper_subclass(tensor):
        return [tensor.untyped_storage()]
    names, _ = tensor.__tensor_flatten__()
    return [storage for name in names for storage in _storages(getattr(tensor, name))]


def _activation_and_peak_bytes(step: Callable[[], None], model: torch.nn.Module) -> tuple[int, int]:
    """Saved-for-backward bytes (unique storages, parameters excluded) and the peak tensor memory of one step."""
    storage_bytes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        for storage in _storages(tensor):
            storage_bytes[storage.data_ptr()] = storage.nbytes()
        return tensor

    def hooked_step() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            step()

    peak = peak_bytes(hooked_step, torch.device("cpu"))
    for param in model.parameters():
        storage_bytes.pop(param.untyped_storage().data_ptr(), None)
    return sum(storage_bytes.values()), peak


def _median_step_ms(step: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()  # ranks start together, so a rank's time does not include waiting for the others
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_rank(rank: int, ranks: int, settings: Settings) -> RankResult:
    """Warm-up on two chunks per rank, then the measured step (the process's largest), then timing."""
    model = _build_model(settings.chunk_size)
    _make_step(model, 2 * settings.chunk_size * ranks, rank, ranks)()
    step = _make_step(model, settings.seq_len, rank, ranks)
    LEDGER.reset()
    activation, peak = _activation_and_peak_bytes(step, model)
    bytes_sent = {purpose: LEDGER.bytes_sent[purpose] for purpose in PURPOSES}
    return RankResult(activation, peak, _median_step_ms(step, settings.repeats), bytes_sent)


def _rank_entry(rank: int, ranks: int, settings: Settings, workdir: str) -> None:
    torch.set_num_threads(1)  # P processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{workdir}/process_group", rank=rank, world_size=ranks)
    try:
        result = measure_rank(rank, ranks, settings)
        Path(workdir, f"rank{rank}.json").write_text(json.dumps(asdict(result)))
    finally:
        dist.destroy_process_group()


# --- parent: one fresh process group per P, then the tables ----------------------------------------


@dataclass(frozen=True)
class Row:
    ranks: int
    shard_tokens: int
    results: list[RankResult]

    @property
    def activation_mib(self) -> float:
        return max(r.activation_bytes for r in self.results) / MIB

    @property
    def peak_mib(self) -> float:
        return max(r.peak_bytes for r in self.results) / MIB

    @property
    def step_ms(self) -> float:
        return max(r.step_ms for r in self.results)

    def bytes_sent(self, purpose: str) -> int:
        return max(r.bytes_sent[purpose] for r in self.results)


def _measure_row(ranks: int, settings: Settings) -> Row:
    print(f"P={ranks}: spawning {ranks} rank(s), S={settings.seq_len}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        mp.spawn(_rank_entry, args=(ranks, settings, workdir), nprocs=ranks, join=True)
        results = [RankResult(**json.loads(Path(workdir, f"rank{r}.json").read_text())) for r in range(ranks)]
    row = Row(ranks, settings.seq_len // ranks, results)
    print(
        f"P={ranks}: activation {row.activation_mib:.1f} MiB, peak {row.peak_mib:.1f} MiB, "
        f"{row.step_ms:.0f} ms/step ({time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return row


def _markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(map(str, cells)) + " |" for cells in rows]
    return "\n".join(lines)


def _activation_ratio(row: Row, baseline: Row) -> float:
    return row.activation_mib / baseline.activation_mib


def _measured_table(rows: list[Row]) -> str:
    header = [
        "P",
        "shard tokens",
        "activation MiB/rank",
        "activation ratio vs P=1",
        "peak MiB/rank",
        "step ms",
        "attention bytes/rank",
        "fast-weight scan bytes/rank",
        "halo bytes/rank",
    ]
    cells = [
        [
            r.ranks,
            r.shard_tokens,
            f"{r.activation_mib:.1f}",
            f"{_activation_ratio(r, rows[0]):.3f}",
            f"{r.peak_mib:.1f}",
            f"{r.step_ms:.0f}",
            *(r.bytes_sent(purpose) for purpose in PURPOSES),
        ]
        for r in rows
    ]
    return _markdown(header, cells)


def _measured_caption(settings: Settings) -> str:
    ttt = TTTConfig(method="ntp", layers=TINY_TTT_LAYERS).layer_indices(TINY.layers)
    return (
        f"One training step (fwd+bwd) of a tiny Qwen3: d={TINY.hidden}, h={TINY.intermediate}, {TINY.layers} layers, "
        f"{TINY.heads}/{TINY.kv_heads} heads x {TINY.head_dim}, vocab {TINY_VOCAB}, fp32; NTP TTT on layers {ttt}, "
        f"C={settings.chunk_size}; S={settings.seq_len}, one document, batch 1; all-gather attention; "
        f"cpu, P processes x 1 thread on {os.cpu_count()} cores; step: median of {settings.repeats}; "
        "per-rank values are the max over ranks."
    )


def _model_check(row: Row, seq_len: int) -> tuple[bool, str]:
    """The docstring's formulas against the ledger, rank by rank."""
    ttt_layers = ttt_layer_count(TINY, TINY_TTT_LAYERS)
    modelled = [
        modelled_bytes(TINY, ttt_layers, seq_len, rank, row.ranks, TINY_ACTIVATION_BYTES) for rank in range(row.ranks)
    ]
    mismatches = [
        f"rank {rank} {purpose} model {model[purpose]} measured {result.bytes_sent[purpose]}"
        for rank, (model, result) in enumerate(zip(modelled, row.results))
        for purpose in PURPOSES
        if model[purpose] != result.bytes_sent[purpose]
    ]
    maxima = ", ".join(
        f"{purpose} {max(m[purpose] for m in modelled)} vs {row.bytes_sent(purpose)}" for purpose in PURPOSES
    )
    verdict = "exact on every rank" if not mismatches else "MISMATCH: " + "; ".join(mismatches)
    return not mismatches, f"model vs measured P={row.ranks} (max over ranks): {maxima}: {verdict}"


def _acceptance(rows: list[Row]) -> tuple[float | None, str]:
    at = next((r for r in rows if r.ranks == ACCEPTANCE_RANKS), None)
    if at is None:
        return None, f"acceptance: skipped (needs P={ACCEPTANCE_RANKS} in --ranks)"
    ratio = _activation_ratio(at, rows[0])
    verdict = "ok" if ratio <= ACTIVATION_RATIO_LIMIT else "FAIL"
    return ratio, (
        f"acceptance: activation memory per rank at P={ACCEPTANCE_RANKS} is {ratio:.3f} of P=1 "
        f"(<= {ACTIVATION_RATIO_LIMIT} required): {verdict}"
    )


# --- part two: the projection ----------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    model: str
    seq_len: int
    ranks: int
    ttt_layers: int
    allgather_bytes: int
    ulysses_bytes: int
    ulysses_runs: bool  # parallel.attention's Ulysses needs both head counts divisible by P
    scan_bytes: int
    halo_bytes: int

    @property
    def scan_share(self) -> float:
        return self.scan_bytes / (self.allgather_bytes + self.scan_bytes + self.halo_bytes)


def project(name: str, arch: Arch, seq_len: int, ranks: int) -> Projection:
    act, ttt_layers = PROJECTION_ACTIVATION_BYTES, ttt_layer_count(arch, PROJECTION_TTT_LAYERS)
    return Projection(
        model=name,
        seq_len=seq_len,
        ranks=ranks,
        ttt_layers=ttt_layers,
        allgather_bytes=allgather_bytes(arch, seq_len, ranks, act),
        ulysses_bytes=ulysses_bytes(arch, seq_len, ranks, act),
        ulysses_runs=arch.heads % ranks == 0 and arch.kv_heads % ranks == 0,
        scan_bytes=max(scan_bytes(arch, ttt_layers, rank, ranks) for rank in range(ranks)),
        halo_bytes=max(halo_bytes(arch, ttt_layers, rank, ranks, act) for rank in range(ranks)),
    )


def projections() -> list[Projection]:
    return [
        project(name, arch, seq_len, ranks)
        for name, arch in QWEN3.items()
        for seq_len in PROJECTION_SEQ_LENS
        for ranks in PROJECTION_RANKS
    ]


def _projection_table(rows: list[Projection]) -> str:
    header = [
        "model",
        "S",
        "P",
        "TTT layers",
        "attention all-gather GB/GPU",
        "Ulysses GB/GPU",
        "fast-weight scan GB/GPU",
        "halo KB/GPU",
        "scan share of all-gather total",
    ]
    cells = [
        [
            p.model,
            f"{p.seq_len // 1024}k",
            p.ranks,
            p.ttt_layers,
            f"{p.allgather_bytes / GB:.2f}",
            f"{p.ulysses_bytes / GB:.2f}" + ("" if p.ulysses_runs else " †"),
            f"{p.scan_bytes / GB:.2f}",
            f"{p.halo_bytes / 1e3:.1f}",
            f"{p.scan_share:.1%}",
        ]
        for p in rows
    ]
    return _markdown(header, cells)


PROJECTION_CAPTION = (
    "Projection (formulas of the docstring): bytes sent per GPU per training step (fwd+bwd), max over the ranks "
    "of one CP group of P GPUs; Qwen3, batch 1, bf16 activations, fp32 fast-weight states, NTP TTT MLP on every "
    "4th layer (layers 3, 7, ...); GB = 1e9 bytes. Scan share = scan / (all-gather attention + scan + halo). "
    "† head counts not divisible by P: parallel.attention's Ulysses does not run (bytes as if it did)."
)


# --- part three: attention balance (segment plans, no processes) -----------------------------------

BALANCE_SEQ_LEN = 131072
BALANCE_RANKS = (2, 4, 8)
BALANCE_MODEL = "8B"  # K/V bytes per token of the memory column
BALANCE_LIMIT = 1.05  # acceptance: max / mean attention work per rank with headtail at P = 4 and 8


def packed_document_lengths(seq_len: int, seed: int = 0) -> list[int]:
    """A packed batch row: document lengths from a log-normal mix (median 2k tokens, heavy tail capped at
    32k), the last one cut to fill the row exactly."""
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < seq_len:
        length = int(torch.empty(1).log_normal_(mean=7.6, std=1.2, generator=generator).clamp(64, 32768))
        lengths.append(min(length, seq_len - sum(lengths)))
    return lengths


@dataclass(frozen=True)
class Balance:
    load_balance: str
    ranks: int
    pairs: list[int]  # attended query-key pairs per rank
    kv_bytes: list[int]  # K/V the varlen kernel keeps per rank and layer (bf16)

    @property
    def imbalance(self) -> float:
        return max(self.pairs) / statistics.mean(self.pairs)


def attention_balance(lengths: list[int], load_balance: str, ranks: int) -> Balance:
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    plans = layout_plans(positions, batch_layout(load_balance, ranks, positions))
    arch = QWEN3[BALANCE_MODEL]
    per_token = 2 * arch.kv_heads * arch.head_dim * PROJECTION_ACTIVATION_BYTES
    kept = [kept_key_tokens(plan, len(positions[0]), cuda=True) for plan in plans]
    return Balance(load_balance, ranks, [p.attended_pairs for p in plans], [per_token * n for n in kept])


def balances(lengths: list[int]) -> list[Balance]:
    return [attention_balance(lengths, lb, p) for p in BALANCE_RANKS for lb in LOAD_BALANCES]


def _balance_table(rows: list[Balance]) -> str:
    header = ["P", "load balance", "attended pairs/rank max (1e9)", "mean (1e9)", "max / mean",
              f"kept K/V MiB/rank/layer ({BALANCE_MODEL}) max", "min", "state scan: rounds x states/rank"]  # fmt: skip
    cells = [
        [b.ranks, b.load_balance, f"{max(b.pairs) / 1e9:.2f}", f"{statistics.mean(b.pairs) / 1e9:.2f}",
         f"{b.imbalance:.3f}", f"{max(b.kv_bytes) / MIB:.0f}", f"{min(b.kv_bytes) / MIB:.0f}",
         f"{scan_rounds(b.ranks * pieces_per_rank(b.load_balance))} x {pieces_per_rank(b.load_balance)}"]
        for b in rows
    ]  # fmt: skip
    return _markdown(header, cells)


def _balance_caption(lengths: list[int]) -> str:
    return (
        f"Attention work per rank of the all-gather attention's segment plans (no processes): one packed row of "
        f"S={sum(lengths)} tokens, {len(lengths)} documents (log-normal lengths, median "
        f"{int(statistics.median(lengths))}, longest {max(lengths)}); attended pairs = causal query-key pairs "
        f"inside documents; kept K/V = the keys and values the varlen kernel reads for the rank's pieces, "
        f"Qwen3-{BALANCE_MODEL} bf16, per layer."
    )


def _balance_acceptance(seq_len: int) -> str:
    """Worst max/mean at P = 4 and 8 over five packed rows (seeds 0-4), per load balance."""
    rows = [packed_document_lengths(seq_len, seed) for seed in range(5)]
    lines = []
    for load_balance in LOAD_BALANCES:
        worst = max(attention_balance(lengths, load_balance, p).imbalance for lengths in rows for p in (4, 8))
        verdict = "ok" if worst <= BALANCE_LIMIT else "over"
        lines.append(f"{load_balance}: worst max/mean at P=4 and 8 over 5 packed rows {worst:.3f} ({verdict})")
    return f"attention balance (limit {BALANCE_LIMIT}): " + "; ".join(lines)


# --- command line ----------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m tools.bench.cp", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seq-len", type=positive_int, help=f"global tokens S (default {DEFAULT_SEQ_LEN})")
    parser.add_argument(
        "--ranks", type=positive_int, nargs="+", default=DEFAULT_RANKS, help="CP degrees, 1 included (default 1 2 4)"
    )
    parser.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK, help=f"C (default {DEFAULT_CHUNK})")
    parser.add_argument("--repeats", type=positive_int, help=f"timed steps (default {DEFAULT_REPEATS})")
    parser.add_argument("--quick", action="store_true", help=f"S={QUICK_SEQ_LEN}, fewer repeats")
    parser.add_argument("--json", action="store_true", help="rows as JSON instead of tables")
    parser.add_argument("--balance", action="store_true", help="only the attention-balance table (seconds)")
    args = parser.parse_args(argv)
    if args.quick and args.seq_len:
        parser.error("--quick picks its own sequence length; drop --seq-len")
    args.seq_len = args.seq_len or (QUICK_SEQ_LEN if args.quick else DEFAULT_SEQ_LEN)
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    args.ranks = sorted(set(args.ranks))
    if args.ranks[0] != 1:
        parser.error("--ranks must include 1, the baseline of the activation ratio")
    for ranks in args.ranks:
        try:
            check_cp(ranks, ranks, args.seq_len, args.chunk_size)
        except ValueError as err:
            parser.error(f"--seq-len {args.seq_len}: {err}")
    return args


def _json_report(rows: list[Row], checks: list[tuple[bool, str]], ratio: float | None, settings: Settings) -> str:
    return json.dumps(
        {
            "settings": asdict(settings),
            "measured": [
                {
                    "ranks": r.ranks,
                    "shard_tokens": r.shard_tokens,
                    "activation_ratio": _activation_ratio(r, rows[0]),
                    "model_matches": ok,
                    "per_rank": r.results,
                }
                for r, (ok, _) in zip(rows, checks)
            ],
            "activation_ratio_at_acceptance": ratio,
            "projection": [{**asdict(p), "scan_share": p.scan_share} for p in projections()],
        },
        indent=2,
        default=asdict,
    )


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    lengths = packed_document_lengths(BALANCE_SEQ_LEN)
    if args.balance:
        print(_balance_caption(lengths))
        print()
        print(_balance_table(balances(lengths)))
        print(_balance_acceptance(BALANCE_SEQ_LEN))
        return
    settings = Settings(args.seq_len, args.chunk_size, args.repeats)
    rows = [_measure_row(ranks, settings) for ranks in args.ranks]
    checks = [_model_check(row, settings.seq_len) for row in rows]
    ratio, acceptance = _acceptance(rows)
    if args.json:
        print(_json_report(rows, checks, ratio, settings))
        print(acceptance, file=sys.stderr)  # keep stdout parseable
        return
    print(_measured_caption(settings))
    print()
    print(_measured_table(rows))
    print()
    for _, line in checks:
        print(line)
    print(acceptance)
    print()
    print(PROJECTION_CAPTION)
    print()
    print(_projection_table(projections()))
    print()
    rows_balance = balances(lengths)
    print(_balance_caption(lengths))
    print()
    print(_balance_table(rows_balance))
    print(_balance_acceptance(BALANCE_SEQ_LEN))


if __name__ == "__main__":
    main()
