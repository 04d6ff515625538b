"""The job's configuration: typed sections built from the composed Hydra config, validated once.

`job_config(cfg)` turns the OmegaConf tree into frozen dataclasses; every bad value raises a
one-line `ConfigError` naming the key, before any process group or model exists. Code deeper down
trusts these values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from parallel.attention import KINDS as ATTENTION_KINDS
from parallel.engine import ENGINES
from parallel.pieces import LOAD_BALANCES, pieces_per_rank
from trainer.data.synthetic import GENERATORS
from trainer.ttt import TTTConfig

WANDB_MODES = ("online", "offline", "disabled")
TRAINABLE = ("all", "ttt", "ttt+norms")  # train.trainable
DTYPES = ("float32", "bfloat16", "float64")
AUTO_EVAL_EVERY = 100  # eval.every=auto on a generated task with answers
OBJECTIVES = {"loss": "loss", "accuracy": "eval/accuracy"}  # `objective` -> metric; ttt-train returns its last value


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str  # transformers model_type used for scratch init: qwen3, qwen2, llama, mistral
    path: str | None  # a local Hugging Face folder; None builds from `config`
    dtype: str
    config: dict[str, Any]


@dataclass(frozen=True)
class ParallelConfig:
    cp: int
    nproc_per_node: int  # processes this job launches itself when not started by torchrun
    engine: str
    attention: str
    load_balance: str  # headtail (rank r holds pieces r and 2P-1-r of 2P) | contiguous | work (8P pieces by work)
    zero_stage: int  # deepspeed only: 2 or 3
    offload: bool  # deepspeed only: optimizer states in CPU memory
    overlap_state_scan: bool  # the fast-weight state scan's messages fly while the local chunk scan runs
    timeout_minutes: float = 30.0  # a collective that waits longer fails (NCCL: with a flight-recorder dump)


@dataclass(frozen=True)
class DataConfig:
    name: str
    seq_len: int
    batch_size: int  # sequences per micro-step per data-parallel rank
    options: dict[str, Any]  # generator-specific settings


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    warmup_steps: int
    min_lr_ratio: float
    ttt_lr: float  # peak lr of the TTT parameters (ttt_conv, ttt_proj: new, zero-initialised, never decayed)


@dataclass(frozen=True)
class WandbConfig:
    mode: str
    project: str
    entity: str | None
    group: str | None
    tags: tuple[str, ...]


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    grad_accum: int
    grad_clip: float | None
    activation_checkpointing: bool | None  # None: auto, the cheapest that fits the GPU (`trainer.planning.memory`)
    checkpoint_every_n_layers: int  # selective activation checkpointing: recompute every n-th layer
    max_nonfinite_steps: int
    progress: bool
    compile: bool | None = None  # regional torch.compile of the decoder layers; None: auto (see `compiles`)
    trainable: str = "all"  # what the optimizer trains: all | ttt (the TTT parameters) | ttt+norms
    profile_steps: tuple[int, int] | None = None  # optimizer steps [a, b] the torch profiler records (1-based)

    def compiles(self, device_type: str) -> bool:
        """`train.compile` resolved on the device a job trains on: auto compiles on CUDA only (on CPU,
        inductor's C++ compilation costs more than a short run gains)."""
        return self.compile if self.compile is not None else device_type == "cuda"


@dataclass(frozen=True)
class CheckpointConfig:
    every: int
    keep: int
    resume: str | None  # None, "auto", or a checkpoint directory
    async_save: bool = False  # DCP's async save: the files are written while training goes on


@dataclass(frozen=True)
class EvalConfig:
    every: int | None  # optimizer steps between evaluations (and one at the end); 0: off; None: auto
    samples: int  # held-out sequences per evaluation
    seed: int  # of the held-out sequences: the same for every run, so runs are scored alike
    distance_edges: tuple[int, ...]  # key -> answer distance buckets of the accuracy
    data: tuple[Any, ...] = ()  # prepared held-out corpora (as data.sources): the validation loss

    def interval(self, has_answers: bool) -> int:
        """Steps between evaluations: `every`, or for auto AUTO_EVAL_EVERY where there is something to score (a
        generated task with answers, so the default job reports whether its fast weights recall, or held-out
        `eval.data`) and off otherwise."""
        if self.every is None:
            return AUTO_EVAL_EVERY if has_answers or self.data else 0
        return self.every


@dataclass(frozen=True)
class JobConfig:
    seed: int
    model: ModelConfig
    ttt: TTTConfig
    parallel: ParallelConfig
    data: DataConfig
    optim: OptimConfig
    wandb: WandbConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    eval: EvalConfig
    objective: str  # what the Hydra app returns to a sweeper: a key of OBJECTIVES
    raw: dict[str, Any] = field(repr=False, compare=False)  # the resolved tree, for logging
    search: dict[str, Any] | None = None  # the trial of a search this job runs (trainer/search.py); None outside one

    def logged(self) -> dict[str, Any]:
        """What W&B records of the job: the resolved tree, with the checkpoint it resumes from (the verified one,
        not "auto") and the search trial it runs."""
        tree = {**self.raw, "checkpoint": {**self.raw.get("checkpoint", {}), "resume": self.checkpoint.resume}}
        return tree if self.search is None else {**tree, "search": self.search}


def _require(condition: bool, key: str, expected: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


def _int(section: dict, key: str, prefix: str, minimum: int = 1) -> int:
    value = section.get(key)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{prefix}.{key}",
        f"an integer >= {minimum}",
        value,
    )
    return value


def _number(section: dict, key: str, prefix: str, positive: bool = False) -> float:
    value = section.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    _require(
        ok and (value > 0 if positive else value >= 0),
        f"{prefix}.{key}",
        "a positive number" if positive else "a number >= 0",
        value,
    )
    return float(value)


def _choice(section: dict, key: str, prefix: str, choices: tuple[str, ...]) -> str:
    value = section.get(key)
    _require(value in choices, f"{prefix}.{key}", f"one of {', '.join(choices)}", value)
    return value


def _auto_bool(section: dict, key: str, prefix: str) -> bool | None:
    """true, false, or auto (None: decided where the job runs); absent means auto."""
    value = section.get(key, "auto")
    _require(isinstance(value, bool) or value == "auto", f"{prefix}.{key}", "one of auto, true, false", value)
    return None if value == "auto" else value


def _section(tree: dict, key: str) -> dict:
    value = tree.get(key)
    _require(isinstance(value, dict), key, "a config group", value)
    return value


def _folder_model_type(path: str | None) -> str:
    """config.json's model_type of a local Hugging Face folder (`model=hf` names its family after it)."""
    from trainer.model_folder import read_model_config

    _require(path is not None, "model.path", "a local Hugging Face folder when model.family is null", path)
    try:
        return read_model_config(path).model_type
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _profile_steps(train: dict, steps: int) -> tuple[int, int] | None:
    """`train.profile.steps`: [] (off) or [a, b] with 1 <= a <= b <= train.steps."""
    profile = train.get("profile") or {}
    _require(isinstance(profile, dict), "train.profile", "a mapping with steps: [a, b]", profile)
    wanted = profile.get("steps") or []
    valid = (
        isinstance(wanted, list) and len(wanted) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in wanted) and 1 <= wanted[0] <= wanted[1] <= steps
    )  # fmt: skip
    _require(
        not wanted or valid, "train.profile.steps", f"[] or [a, b] with 1 <= a <= b <= train.steps={steps}", wanted
    )
    return tuple(wanted) if wanted else None


def _validation_data(sources: list, data_name: str) -> tuple:
    """`eval.data`: prepared held-out folders, as `data.sources` lists them (checked when they are opened)."""
    _require(isinstance(sources, list), "eval.data", "a list of prepared folders", sources)
    _require(
        not sources or data_name == "corpus", "eval.data", "empty unless data=corpus (a generated task scores its "
        "own held-out answers)", sources,
    )  # fmt: skip
    return tuple(sources)


def job_config(cfg: DictConfig | dict) -> JobConfig:
    try:
        tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True) if isinstance(cfg, DictConfig) else cfg
    except MissingMandatoryValue as err:  # e.g. model=hf leaves model.path to the command line
        raise ConfigError(f"{err.full_key} must be set (the config leaves it to the command line)") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{err.full_key}: {str(err).splitlines()[0]}") from None
    model, par, data = _section(tree, "model"), _section(tree, "parallel"), _section(tree, "data")
    optim, train, ckpt = _section(tree, "optim"), _section(tree, "train"), _section(tree, "checkpoint")
    wandb = _section(_section(tree, "logging"), "wandb")

    _require(
        model.get("path") is not None or isinstance(model.get("config"), dict),
        "model.config",
        "a mapping of transformers config fields (or set model.path)",
        model.get("config"),
    )
    path = model.get("path")
    model_cfg = ModelConfig(
        family=str(model.get("family") or _folder_model_type(path)),
        name=str(model.get("name") or Path(path).name),  # model=hf: named after its folder
        path=path,
        dtype=_choice(model, "dtype", "model", DTYPES),
        config=dict(model.get("config") or {}),
    )
    try:
        ttt_cfg = TTTConfig(**_section(tree, "ttt"))
    except TypeError as err:  # an unknown key in the ttt group
        raise ConfigError(f"ttt: {err}") from None
    except ValueError as err:
        raise ConfigError(str(err)) from None

    zero_stage = par.get("zero_stage", 2)
    _require(zero_stage in (2, 3), "parallel.zero_stage", "2 or 3", zero_stage)
    cp = _int(par, "cp", "parallel")
    if par.get("load_balance") is None:  # head-tail evens out causal attention work across CP ranks
        par = {**par, "load_balance": "headtail" if cp > 1 else "contiguous"}
    parallel_cfg = ParallelConfig(
        cp=cp,
        nproc_per_node=_int(par, "nproc_per_node", "parallel"),
        engine=_choice(par, "engine", "parallel", ENGINES),
        attention=_choice(par, "attention", "parallel", ATTENTION_KINDS),
        load_balance=_choice(par, "load_balance", "parallel", LOAD_BALANCES),
        zero_stage=zero_stage,
        offload=bool(par.get("offload", False)),
        overlap_state_scan=bool(par.get("overlap_state_scan", False)),
        timeout_minutes=_number(par, "timeout_minutes", "parallel", positive=True)
        if "timeout_minutes" in par
        else 30.0,
    )
    seq_len = _int(data, "seq_len", "data")
    multiple = parallel_cfg.cp * ttt_cfg.chunk_size if ttt_cfg.method != "none" else parallel_cfg.cp
    _require(
        seq_len % multiple == 0, "data.seq_len", f"a multiple of parallel.cp x ttt.chunk_size = {multiple}", seq_len
    )
    per_rank = pieces_per_rank(parallel_cfg.load_balance)
    if cp > 1:
        _require(
            seq_len % (per_rank * multiple) == 0,
            "parallel.load_balance",
            f"contiguous, or {parallel_cfg.load_balance} with data.seq_len a multiple of {per_rank} x parallel.cp x "
            f"ttt.chunk_size = {per_rank * multiple} (data.seq_len={seq_len})",
            parallel_cfg.load_balance,
        )
    data_cfg = DataConfig(
        name=str(data.get("name")),
        seq_len=seq_len,
        batch_size=_int(data, "batch_size", "data"),
        options={k: v for k, v in data.items() if k not in ("name", "seq_len", "batch_size")},
    )
    betas = optim.get("betas")
    _require(
        isinstance(betas, list) and len(betas) == 2 and all(0 <= b < 1 for b in betas),
        "optim.betas",
        "two numbers in [0, 1)",
        betas,
    )
    min_lr_ratio = _number(optim, "min_lr_ratio", "optim")
    _require(min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]", min_lr_ratio)
    optim_cfg = OptimConfig(
        lr=_number(optim, "lr", "optim", positive=True),
        weight_decay=_number(optim, "weight_decay", "optim"),
        betas=tuple(betas),
        eps=_number(optim, "eps", "optim", positive=True),
        warmup_steps=_int(optim, "warmup_steps", "optim", minimum=0),
        min_lr_ratio=min_lr_ratio,
        ttt_lr=_number(optim, "ttt_lr", "optim", positive=True),
    )
    tags = wandb.get("tags") or []
    _require(isinstance(tags, list), "logging.wandb.tags", "a list", tags)
    wandb_cfg = WandbConfig(
        mode=_choice(wandb, "mode", "logging.wandb", WANDB_MODES),
        project=str(wandb.get("project")),
        entity=wandb.get("entity"),
        group=wandb.get("group"),
        tags=tuple(str(t) for t in tags),
    )
    clip = train.get("grad_clip")
    compile_layers = _auto_bool(train, "compile", "train")
    if parallel_cfg.engine == "deepspeed" and parallel_cfg.zero_stage == 3:  # auto: off
        # ZeRO-3 hands a compiled layer empty parameter shards (it gathers them behind dynamo's back)
        expected = "auto or false with parallel.engine=deepspeed and parallel.zero_stage=3"
        _require(compile_layers is not True, "train.compile", expected, compile_layers)
        compile_layers = False
    train_cfg = TrainConfig(
        steps=_int(train, "steps", "train"),
        grad_accum=_int(train, "grad_accum", "train"),
        grad_clip=None if clip is None else _number(train, "grad_clip", "train", positive=True),
        activation_checkpointing=_auto_bool(train, "activation_checkpointing", "train"),
        checkpoint_every_n_layers=_int(train, "checkpoint_every_n_layers", "train"),
        max_nonfinite_steps=_int(train, "max_nonfinite_steps", "train"),
        progress=bool(train.get("progress", True)),
        trainable=_choice({"trainable": train.get("trainable", "all")}, "trainable", "train", TRAINABLE),
        compile=compile_layers,
        profile_steps=_profile_steps(train, _int(train, "steps", "train")),
    )
    _require(
        train_cfg.trainable == "all" or ttt_cfg.method != "none",
        "train.trainable", "all with ttt.method=none (there are no TTT parameters to train)", train_cfg.trainable,
    )  # fmt: skip
    resume = ckpt.get("resume")
    _require(resume is None or isinstance(resume, str), "checkpoint.resume", "null, 'auto' or a path", resume)
    async_save = ckpt.get("async_save", False)
    _require(isinstance(async_save, bool), "checkpoint.async_save", "true or false", async_save)
    _require(
        not async_save or parallel_cfg.engine != "deepspeed", "checkpoint.async_save",
        "false with parallel.engine=deepspeed (DeepSpeed writes its own checkpoints)", async_save,
    )  # fmt: skip
    ckpt_cfg = CheckpointConfig(
        every=_int(ckpt, "every", "checkpoint"),
        keep=_int(ckpt, "keep", "checkpoint"),
        resume=resume,
        async_save=async_save,
    )
    evaluation = _section(tree, "eval")
    edges = evaluation.get("distance_edges") or []
    _require(
        isinstance(edges, list) and all(isinstance(e, int) and e > 0 for e in edges) and edges == sorted(set(edges)),
        "eval.distance_edges", "an increasing list of positive integers", edges,
    )  # fmt: skip
    eval_cfg = EvalConfig(
        every=None if evaluation.get("every") == "auto" else _int(evaluation, "every", "eval", minimum=0),
        samples=_int(evaluation, "samples", "eval"),
        seed=_int(evaluation, "seed", "eval", minimum=0),
        distance_edges=tuple(edges),
        data=_validation_data(evaluation.get("data") or [], data_cfg.name),
    )
    objective = tree.get("objective", "loss")  # configs of runs made before the key existed: loss
    _require(objective in OBJECTIVES, "objective", f"one of {', '.join(OBJECTIVES)}", objective)
    if objective == "accuracy":
        evaluates = eval_cfg.interval(has_answers=data_cfg.name in GENERATORS) > 0
        _require(evaluates, "objective", "loss when the run does not evaluate (eval.every=0 or data=corpus)", objective)
    seed = tree.get("seed")
    _require(isinstance(seed, int) and not isinstance(seed, bool), "seed", "an integer", seed)
    return JobConfig(
        seed, model_cfg, ttt_cfg, parallel_cfg, data_cfg, optim_cfg, wandb_cfg, train_cfg, ckpt_cfg, eval_cfg,
        objective, tree,
    )  # fmt: skip
