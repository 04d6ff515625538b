"""The training loop of one process: batch -> forward -> loss -> backward -> step -> log -> checkpoint."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from parallel.context_parallel import apply_cp
from parallel.engine import apply_fsdp, init_deepspeed, sync_gradients
from parallel.mesh import build_mesh
from parallel.pieces import CPGroup
from parallel.sharding import IGNORE_INDEX, shard_batch
from trainer.checkpoint import Checkpointer, load_checkpoint, resolve_resume
from trainer.compile import apply_compile
from trainer.config import JobConfig
from trainer.data import SequenceLoader, build_dataset, sizes_only, stream_identity
from trainer.evaluation.answers import answer_accuracy
from trainer.evaluation.validation import validation_loss, validation_record, validation_set
from trainer.faults import PreemptionFlag
from trainer.materialize import Materializer, load_pretrained
from trainer.model import CausalLMLoss, build_meta_model, enable_activation_checkpointing, freeze_base, master_dtype
from trainer.optim import build_optimizer, set_lr
from trainer.planning.memory import ModelFacts, auto_checkpoint_every, model_facts
from trainer.search import SearchTrial
from trainer.telemetry import (
    StepClock,
    StepOutOfMemory,
    StepProfiler,
    Throughput,
    memory_record,
    out_of_memory_line,
)
from trainer.tracking import MetricsFile, WandbRun, write_json_atomically
from trainer.ttt.mlp import FastWeightMLP


class NonFiniteLossError(RuntimeError):
    pass


@dataclass(frozen=True)
class Ranks:
    """Where this process sits: global rank, data-parallel and context-parallel coordinates."""

    rank: int
    world: int
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    dp_group: object
    device: torch.device
    cp: CPGroup | None = None  # the CP group and which pieces of each sequence its ranks hold (cp > 1)

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's shard of a batch of whole sequences, laid out for this batch (`CPGroup.arrange`)."""
        layout = "contiguous" if self.cp is None else self.cp.arrange(batch["position_ids"])
        return shard_batch(batch, self.cp_rank, self.cp_size, layout)


def setup_ranks(cp: int, load_balance: str = "contiguous", overlap_state_scan: bool = False) -> Ranks:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Ranks(0, 1, 0, 1, 0, 1, None, device)
    mesh = build_mesh(cp, device.type)
    cp_group = CPGroup(mesh["cp"].get_group(), load_balance, overlap_state_scan) if cp > 1 else None
    return Ranks(
        dist.get_rank(), dist.get_world_size(), mesh["dp"].get_local_rank(), mesh["dp"].size(),
        mesh["cp"].get_local_rank(), mesh["cp"].size(), mesh["dp"].get_group(), device, cp_group,
    )  # fmt: skip


def _all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def train_step(step_model, optimizer, loader: SequenceLoader, job: JobConfig, ranks: Ranks, clock=None) -> dict:
    """One optimizer step over `grad_accum` micro-batches; the loss is the mean over every real token
    of the step across all data- and context-parallel ranks. `clock` (a `trainer.telemetry.StepClock`) times its
    phases: reading the batches, forward + backward, the optimizer."""
    clock = clock or StepClock(ranks.device)
    with clock.phase("data"):
        batches = [loader.next_batch() for _ in range(job.train.grad_accum)]
    with clock.phase("forward_backward"):
        loss = _forward_backward(step_model, batches, job, ranks)
    with clock.phase("optimizer"):
        return _optimizer_step(step_model, optimizer, loss, job, ranks)


def _engine(job: JobConfig, ranks: Ranks) -> str:
    return job.parallel.engine if ranks.world > 1 else "single"


def _forward_backward(step_model, batches, job: JobConfig, ranks: Ranks) -> torch.Tensor:
    """The step's mean loss over all ranks; the gradients accumulated."""
    real = torch.tensor(float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)), device=ranks.device)
    total = _all_reduce(real, ranks.dp_group)  # every CP rank holds the same full sequences
    loss_sum = torch.zeros((), device=ranks.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=ranks.device.type == "cuda")
    engine = _engine(job, ranks)
    # FSDP2 and DeepSpeed average gradients over ranks, DeepSpeed also over micro-batches; the job's
    # losses are pre-divided by the global token count, so it needs plain sums.
    scale = {"fsdp2": ranks.world, "deepspeed": ranks.world * job.train.grad_accum}.get(engine, 1)
    for micro, batch in enumerate(batches):
        last = micro == len(batches) - 1
        if engine == "fsdp2":  # reduce-scatter gradients once, after the last micro-batch
            step_model.set_requires_gradient_sync(last)
        local = {k: v.to(ranks.device) for k, v in ranks.shard(batch).items()}
        with autocast:
            ce = step_model(local["input_ids"], local["position_ids"], local["labels"])
        loss_sum += ce.detach()
        if engine == "deepspeed":
            step_model.backward(ce * scale / total)
            if not last:
                step_model.step()  # DeepSpeed counts micro-steps; it only steps at the boundary
        else:
            (ce * scale / total).backward()
    return _all_reduce(loss_sum) / total


def _optimizer_step(step_model, optimizer, loss: torch.Tensor, job: JobConfig, ranks: Ranks) -> dict:
    """Clip and step (a non-finite loss or gradient skips the step), zero the gradients."""
    engine = _engine(job, ranks)
    if engine == "deepspeed":
        if not torch.isfinite(loss):  # DeepSpeed skips steps only for fp16 overflow
            raise NonFiniteLossError("non-finite loss under parallel.engine=deepspeed, which cannot skip a step")
        step_model.step()  # clips, steps and zeroes the gradients
        return {"loss": float(loss), "grad_norm": float(step_model.get_global_grad_norm()), "finite": True}
    if engine == "ddp":
        sync_gradients(step_model)
    clip = job.train.grad_clip if job.train.grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(step_model.parameters(), clip)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss), "grad_norm": float(grad_norm), "finite": finite}


def _ttt_update_norms(model, ranks: Ranks) -> dict[str, float]:
    """Frobenius norm of each TTT layer's fast-weight update over the last micro-batch (rank mean)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, FastWeightMLP)]
    if not layers:
        return {}
    norms = _all_reduce(torch.stack([m.update_norm.to(ranks.device) for _, m in layers])) / ranks.world
    return {f"ttt_update_norm/{name.split('.mlp')[0].split('.')[-1]}": float(n) for (name, _), n in zip(layers, norms)}


def _accuracy_line(evaluation: dict, dataset) -> str:
    """The held-out answer accuracy beside what guessing would score (when the task knows it)."""
    step, accuracy, answers = evaluation["step"], evaluation["accuracy"], evaluation["answers"]
    line = f"held-out answer accuracy at step {step}: {accuracy:.3f} ({answers} answers)"
    chance = dataset.chance_accuracy()
    return line if chance is None else f"{line}; chance: {chance:.3g}"


class Training(NamedTuple):
    """What a job trains: the model, the module a step calls (loss attached, maybe wrapped by the engine),
    its optimizer, and the DeepSpeed engine when there is one."""

    model: torch.nn.Module
    step_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    deepspeed_engine: object | None
    checkpoint_every: int | None  # activation checkpointing recomputes every n-th decoder layer (None: off)
    facts: ModelFacts  # the planner's view of the model (parameter counts, shapes): MFU and the OOM line use it


def checkpointing_of(job: JobConfig, model: torch.nn.Module, ranks: Ranks) -> int | None:
    """Every how many decoder layers activation checkpointing recomputes one (None: off). auto asks the memory
    planner on CUDA for the fewest that fit the GPU, and is off on CPU (no device memory to plan for)."""
    if job.train.activation_checkpointing is None:
        if ranks.device.type != "cuda":
            return None
        return auto_checkpoint_every(job, model, ranks.world)
    return job.train.checkpoint_every_n_layers if job.train.activation_checkpointing else None


def build_training(job: JobConfig, ranks: Ranks) -> Training:
    """The model of `job` on this rank: built on the meta device, context-parallel, checkpointed and compiled
    as configured, materialised (sharded by FSDP2 when that is the engine), pretrained weights loaded."""
    engine = job.parallel.engine if ranks.world > 1 else "single"
    model = build_meta_model(job.model, job.ttt, master_dtype(job.model.dtype, ranks.device, engine))
    facts = model_facts(model)
    if ranks.cp is not None:
        apply_cp(model, ranks.cp, job.parallel.attention)
    checkpoint_every = checkpointing_of(job, model, ranks)
    if checkpoint_every is not None:
        enable_activation_checkpointing(model, checkpoint_every)
    if job.train.compiles(ranks.device.type):  # before FSDP2 wraps the layers, as torchtitan does
        apply_compile(model)
    step_model = CausalLMLoss(model)
    materialize = Materializer(model, ranks.device, job.seed)
    if engine == "fsdp2":
        apply_fsdp(step_model, model._no_split_modules, ranks.device, materialize)
    else:
        materialize(model)
    if job.model.path is not None:
        load_pretrained(model, job.model.path)
    step_model.train()
    freeze_base(model, job.train.trainable)
    optimizer = build_optimizer(model, job.optim)
    if engine != "deepspeed":
        return Training(model, step_model, optimizer, None, checkpoint_every, facts)
    engine_model, optimizer = init_deepspeed(
        step_model, optimizer, job.data.batch_size, job.train.grad_accum, job.train.grad_clip,
        job.parallel.zero_stage, job.parallel.offload,
    )  # fmt: skip
    return Training(model, engine_model, optimizer, engine_model, checkpoint_every, facts)


class Evaluation:
    """What `eval.every` scores: the answers of a generated task (exact match, `eval.json`) and, for `data=corpus`,
    the validation loss of the held-out `eval.data` by position (`validation.json`). Every rank takes part."""

    def __init__(self, job: JobConfig, dataset, vocab_size: int, ranks: Ranks):
        self.job, self.ranks = job, ranks
        self.every = job.eval.interval(has_answers=hasattr(dataset, "sample"))
        options = sizes_only(job.data.name, job.data.options)
        answers = self.every and hasattr(dataset, "sample")
        self.answers = (
            build_dataset(job.data.name, job.data.seq_len, vocab_size, job.eval.seed, options) if answers else None
        )
        validates = self.every and job.eval.data
        self.validation = (
            validation_set(job.eval.data, job.data.seq_len, vocab_size, job.eval.seed) if validates else None
        )
        self.last_answers: dict | None = None  # the last answer evaluation: the run's closing line

    def due(self, done: int) -> bool:
        return bool(self.every) and (done % self.every == 0 or done == self.job.train.steps)

    def __call__(self, step_model, done: int, run_dir: Path | None) -> dict:
        """Score now; the metrics record's keys. `run_dir` (rank 0's) gets the details as JSON."""
        record = {}
        if self.answers is not None:
            scores = answer_accuracy(step_model, self.answers, self.job.eval.samples, self.ranks,
                                     self.job.eval.distance_edges)  # fmt: skip
            self.last_answers = {"step": done, **scores}
            record["eval/accuracy"] = scores["accuracy"]
            if run_dir is not None:
                write_json_atomically(run_dir / "eval.json", self.last_answers)
        if self.validation is not None:
            scores = validation_loss(step_model, self.validation, self.job.eval.samples, self.ranks)
            record.update(validation_record(scores))
            if run_dir is not None:
                write_json_atomically(run_dir / "validation.json", {"step": done, **scores})
        return record


def run(
    job: JobConfig, run_dir: Path, wandb_group: str | None = None, preemption: PreemptionFlag | None = None
) -> Path | None:
    """Train `job` in `run_dir`; returns the last checkpoint written. A signal that `preemption` (by default one
    for SIGTERM and SIGUSR1) catches saves a checkpoint after the current step and ends training there."""
    ranks = setup_ranks(job.parallel.cp, job.parallel.load_balance, job.parallel.overlap_state_scan)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, step_model, optimizer, deepspeed_engine, checkpoint_every, facts = build_training(job, ranks)
    if ranks.rank == 0 and job.train.activation_checkpointing is None and ranks.device.type == "cuda":
        chosen = "off" if checkpoint_every is None else f"every {checkpoint_every} layer(s)"
        print(f"activation checkpointing (auto, the memory planner's choice): {chosen}", file=sys.stderr)
    vocab_size = model.config.vocab_size
    options = sizes_only(job.data.name, job.data.options)  # start-up (trainer/preflight.py) hashed the shards
    dataset = build_dataset(job.data.name, job.data.seq_len, vocab_size, job.seed, options)
    evaluation = Evaluation(job, dataset, vocab_size, ranks)
    loader = SequenceLoader(dataset, job.data.batch_size, ranks.dp_rank, ranks.dp_size)

    ckpt_root = run_dir / "checkpoints"
    checkpointer = Checkpointer(ckpt_root, job.checkpoint.keep, job.checkpoint.async_save, deepspeed_engine)
    resume_from = resolve_resume(ckpt_root, job.checkpoint.resume)
    start, wandb_id, last_ckpt = 0, None, None
    if resume_from is not None:
        meta = load_checkpoint(resume_from, model, optimizer, deepspeed_engine)
        start, wandb_id, last_ckpt = meta["step"], meta.get("wandb_run_id"), resume_from
        loader.load_state_dict(meta["data"])
        if ranks.rank == 0:
            print(f"resumed from {resume_from} at step {start}", file=sys.stderr)

    lead = ranks.rank == 0
    trial = SearchTrial.of(job, lead)  # the trial of a search this job runs (trainer/search.py); inert otherwise
    metrics = MetricsFile(run_dir / "metrics.jsonl", start) if lead else None
    wandb_cfg = replace(job.wandb, group=wandb_group or job.wandb.group)
    wandb = WandbRun(wandb_cfg, run_dir, job.logged(), wandb_id, run_dir.name) if lead else None
    if preemption is None:
        preemption = PreemptionFlag()
    tokens_per_step = job.data.seq_len * job.data.batch_size * ranks.dp_size * job.train.grad_accum
    throughput = Throughput(job, facts, ranks.world, ranks.device)
    profiler = StepProfiler(job.train.profile_steps, run_dir, ranks.rank, ranks.device)
    progress = tqdm(
        total=job.train.steps, initial=start, disable=not (lead and job.train.progress), unit="step", mininterval=2
    )
    bad_in_a_row = 0

    def checkpoint(step: int) -> Path | None:
        stream = stream_identity(job.data.name, job.data.seq_len, job.seed, job.data.options)
        meta = {"data": loader.state_dict(), "data_stream": stream, "wandb_run_id": wandb.run_id if wandb else None}
        return checkpointer.save(step, model, optimizer, meta)

    try:
        for step in range(start, job.train.steps):
            done = step + 1
            lr = set_lr(optimizer, step, job.train.steps, job.optim)
            clock = StepClock(ranks.device)
            profiler.before(done)
            began = time.perf_counter()
            try:
                stats = train_step(step_model, optimizer, loader, job, ranks, clock)
            except torch.cuda.OutOfMemoryError:
                raise StepOutOfMemory(out_of_memory_line(job, facts, ranks.world, done, checkpoint_every)) from None
            train_s = time.perf_counter() - began
            bad_in_a_row = 0 if stats["finite"] else bad_in_a_row + 1
            abort = bad_in_a_row >= job.train.max_nonfinite_steps
            record = {
                "step": done, "loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
                "tokens": done * tokens_per_step, "tokens_per_s": tokens_per_step / train_s,
                "peak_memory_bytes": _peak_memory_bytes(ranks.device), "skipped": not stats["finite"],
                **_ttt_update_norms(model, ranks),  # a collective: every rank takes part
            }  # fmt: skip
            if evaluation.due(done):
                with clock.phase("eval"):
                    record.update(evaluation(step_model, done, run_dir if lead else None))
            with clock.phase("checkpoint"):
                if not abort and (done % job.checkpoint.every == 0 or done == job.train.steps):
                    last_ckpt = checkpoint(done) or last_ckpt
                last_ckpt = checkpointer.poll(ranks.device) or last_ckpt  # an async save every rank has written
            record.update(profiler.after(done))
            if lead:
                record.update(throughput.record(tokens_per_step, train_s), step_s=time.perf_counter() - began)
                record.update(clock.record(), **memory_record(ranks.device))
                metrics.write(record)
                wandb.log(record, step=done)
                progress.set_postfix(_progress(record))
                progress.update(1)
            if abort:
                raise NonFiniteLossError(
                    f"{bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient (skipped); "
                    f"stopping at step {done}, last good checkpoint: {last_ckpt}"
                )
            pruned = trial.prunes(done, record if lead else None, ranks.device)  # the search stops a bad trial early
            if preemption.any_rank(ranks.device) or pruned:
                last_ckpt = checkpointer.wait() or last_ckpt
                if last_ckpt is None or last_ckpt.name != f"step-{done}":
                    last_ckpt = checkpoint(done) or checkpointer.wait()
                if lead:
                    print(f"{'pruned' if pruned else 'preempted'}: saved {last_ckpt}, exiting", file=sys.stderr)
                break
        last_ckpt = checkpointer.wait() or last_ckpt  # the end: an async save still writing is finished first
    finally:
        progress.close()
        if wandb is not None:
            wandb.finish()
    if lead:
        if evaluation.last_answers is not None:
            print(_accuracy_line(evaluation.last_answers, dataset))
        print(f"run directory: {run_dir}\nmetrics: {run_dir / 'metrics.jsonl'}\ncheckpoint: {last_ckpt}")
        if wandb is not None and wandb.offline_dir:
            print(f"wandb: {Path(wandb.offline_dir).parent}")
    return last_ckpt


def _progress(record: dict) -> dict[str, str]:
    """The progress bar's figures: loss, tokens/s per GPU and, where known, MFU."""
    shown = {"loss": f"{record['loss']:.4f}", "tok_s_gpu": f"{record['tokens_per_s_per_gpu']:.0f}"}
    if "mfu" in record:
        shown["mfu"] = f"{100 * record['mfu']:.1f}%"
    return shown
