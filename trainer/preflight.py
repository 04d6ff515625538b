"""Start-up checks: every input a job reads from disk is checked once, before any training process
builds a model, and a bad one is a one-line `ConfigError` (trainer/train.py prints it, exit code 2).

- `model.path`: the folder, its config.json and model type, its safetensors files (headers and
  sizes) and that their tensors fit the model with the job's TTT layers.
- `data`: the dataset opens (generators, tokenizer folders, corpus options and shard sizes), and so does the
  held-out corpus of `eval.data`; corpus shards are hashed here, each rank of a torchrun job hashing its slice,
  with one shared verdict.
- `checkpoint.resume`: the checkpoint verifies against its meta.json (a damaged newest one under
  "auto" is reported and skipped), was written by this job's engine format, on this job's data stream,
  and holds every tensor of this model in its shape.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from torch import nn

from trainer.checkpoint import deepspeed_foreign_objects, read_meta, verified_resume
from trainer.checkpoint.dcp_reader import read_index
from trainer.config import ConfigError, JobConfig
from trainer.data import build_dataset, sizes_only, stream_identity
from trainer.data.shards import verify_prepared
from trainer.evaluation.validation import validation_set
from trainer.model import build_meta_model
from trainer.model_folder import stored_shapes, weights_mismatch


def check_inputs(job: JobConfig, run_dir: Path, report) -> Path | None:
    """Check the job's inputs; returns the checkpoint to resume from (None: start fresh). `report`
    gets one-line notes, e.g. a damaged checkpoint skipped."""
    try:
        model = _check_model(job)
        _check_data(job, model.config.vocab_size)
        checkpoint = verified_resume(run_dir / "checkpoints", job.checkpoint.resume, report)
    except (ValueError, FileNotFoundError) as err:  # ConfigError, DataError and the checks' one-liners
        raise ConfigError(str(err)) from None
    if checkpoint is not None:
        _check_checkpoint_fits(job, checkpoint, model)
    return checkpoint


def _check_model(job: JobConfig) -> nn.Module:
    """The job's model on the meta device (its config.json is checked as it is read, `model_config`), after
    which the `model.path` weights are checked against it."""
    try:
        model = build_meta_model(job.model, job.ttt)
    except StrictDataclassError as err:  # transformers validates config fields through huggingface_hub
        reason = str(err.__cause__ or err).strip().splitlines()[0]
        raise ValueError(f"model: not a valid {job.model.family} config ({reason})") from None
    if job.model.path is not None:
        problem = weights_mismatch(model, stored_shapes(job.model.path), with_ttt=False)
        if problem is not None:
            raise ValueError(f"model.path={job.model.path}: {problem}")
    return model


def _check_data(job: JobConfig, vocab_size: int) -> None:
    dataset = build_dataset(
        job.data.name, job.data.seq_len, vocab_size, job.seed, sizes_only(job.data.name, job.data.options)
    )
    folders = list(getattr(dataset, "folders", []))
    if job.eval.data:  # the held-out corpus of the validation loss opens as the training corpus does
        held_out = validation_set(job.eval.data, job.data.seq_len, vocab_size, job.eval.seed)
        folders += held_out.folders
    if job.data.name == "corpus" and job.data.options.get("verify_checksums", True):
        for folder in folders:
            verify_prepared(folder)
    if job.eval.every and not hasattr(dataset, "sample") and not job.eval.data:
        raise ValueError(
            f"eval.every needs a generated task with answers (data=synthetic_*) or held-out eval.data, "
            f"not {job.data.name} alone"
        )


def _world_size(job: JobConfig) -> int:
    return int(os.environ.get("WORLD_SIZE", job.parallel.nproc_per_node))


def _check_checkpoint_fits(job: JobConfig, checkpoint: Path, model: nn.Module) -> None:
    """The checkpoint continues this job: its engine's format, its data stream, its model's tensors."""
    meta = read_meta(checkpoint)
    saved_format = meta.get("format", "dcp")
    engine_format = "deepspeed" if job.parallel.engine == "deepspeed" and _world_size(job) > 1 else "dcp"
    if saved_format != engine_format:
        raise ConfigError(f"{checkpoint} is a {saved_format} checkpoint; this job's engine reads {engine_format}")
    saved = meta.get("data_stream")
    current = json.loads(json.dumps(stream_identity(job.data.name, job.data.seq_len, job.seed, job.data.options)))
    if saved is not None and saved != current:
        changed = sorted(k for k in {**saved, **current} if saved.get(k) != current.get(k))
        raise ConfigError(
            f"checkpoint.resume: {checkpoint} read another data stream ({', '.join(changed)} changed); "
            "resuming would not continue it"
        )
    if saved_format != "dcp":  # DeepSpeed's own files: their shapes are checked by DeepSpeed on load
        foreign = deepspeed_foreign_objects(checkpoint)
        if foreign is not None:
            raise ConfigError(f"checkpoint.resume: {foreign}")
        return
    try:
        index = read_index(checkpoint).state_dict_metadata
    except (pickle.UnpicklingError, OSError, EOFError) as err:  # verified bytes, yet not a DCP index
        raise ConfigError(f"checkpoint.resume: {checkpoint}/.metadata: unreadable ({err})") from None
    stored = {
        key.removeprefix("model."): tuple(value.size)
        for key, value in index.items()
        if key.startswith("model.") and hasattr(value, "size")
    }
    problem = weights_mismatch(model, stored, with_ttt=True)
    if problem is not None:
        raise ConfigError(f"checkpoint.resume: {checkpoint} does not fit this model and ttt config: {problem}")
