"""Every bad start-up input ends `ttt-train` with one `error:` line on stderr and exit code 2, before any
model is trained, and leaves the run directory as it was but for what Hydra writes at every start
(`.hydra/` with the composed config, and an empty `train.log`). The cases run `trainer.train.main`
in-process (a start-up costs well under a second then); one runs as a real process to show its whole
stderr is that line."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import Qwen3Config, Qwen3ForCausalLM

import trainer.train
from tests.test_train import FAST, compose_job
from trainer.data.shards import FORMAT, MANIFEST, ShardWriter, write_manifest
from trainer.loop import run

QUIET = [*FAST, "logging.wandb.mode=disabled"]
HF_FOLDER = ["model=hf", "model.path={input}"]  # any local Hugging Face folder, read as its config.json says
ZOO_FOLDER = ["model=tiny", "model.path={input}"]  # a named model's weights (the config is checked here too)
HYDRA_LEAVES = {".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log"}


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 (or "dir") of everything under `folder`."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A smoke run's directory: checkpoints step-3 and step-6 (ttt=ntp, the tiny model)."""
    run_dir = tmp_path_factory.mktemp("trained")
    run(compose_job(*QUIET), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A small Qwen3 checkpoint folder (vocab 256, like the synthetic data) in Hugging Face format."""
    folder = tmp_path_factory.mktemp("hf")
    config = Qwen3Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    Qwen3ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A prepared corpus of two shards, written with the shard writer `tools.commands.prepare_data` uses."""
    folder = tmp_path_factory.mktemp("corpus")
    rng, entries = np.random.default_rng(0), []
    for index in range(2):
        writer = ShardWriter(folder, index)
        for _ in range(20):
            writer.add(rng.integers(1, 200, size=50))
        entries.append(writer.commit())
    manifest = {"format": FORMAT, "complete": True, "shards": entries, "tokenizer": {"vocab_size": 200},
                "max_token_id": max(e["max_token_id"] for e in entries)}  # fmt: skip
    write_manifest(folder, manifest)
    return folder


def _model_folder(hf_folder: Path, where: Path, damage: str) -> str:
    """A copy of `hf_folder` damaged as `damage` says; returns model.path."""
    folder = where / "model"
    if damage == "missing":
        return str(where / "nonexistent")
    if damage == "file":
        (where / "weights.bin").write_bytes(b"x")
        return str(where / "weights.bin")
    if damage == "empty":
        folder.mkdir()
        return str(folder)
    shutil.copytree(hf_folder, folder)
    config, weights = folder / "config.json", folder / "model.safetensors"
    fields = json.loads(config.read_text())
    if damage == "bad-json":
        config.write_text(config.read_text()[:40])
    elif damage == "no-model-type":
        config.write_text(json.dumps({k: v for k, v in fields.items() if k != "model_type"}))
    elif damage == "unknown-model-type":
        config.write_text(json.dumps({**fields, "model_type": "qwen99"}))
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "garbage-weights":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "index-lists-missing":
        weights.rename(folder / "model-00001-of-00002.safetensors")
        weight_map = {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif damage == "other-shape":  # the config says wider MLPs than the weights hold
        config.write_text(json.dumps({**fields, "intermediate_size": 48}))
    return str(folder)


def _tokenizer_folder(where: Path, damage: str) -> str:
    folder = where / "tokenizer"
    if damage == "missing":
        return str(folder)
    folder.mkdir()
    if damage == "bad-json":
        (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {')
        (folder / "tokenizer_config.json").write_text("{}")
    return str(folder)


def _corpus(corpus: Path, where: Path, damage: str) -> str:
    folder = where / "corpus"
    if damage == "missing":
        return str(folder)
    shutil.copytree(corpus, folder)
    tokens = folder / "shard-00001.tokens"
    if damage == "garbled-manifest":
        (folder / MANIFEST).write_text('{"format": "ttt-longctx-shards/1", "sha')
    elif damage == "truncated-shard":
        tokens.write_bytes(tokens.read_bytes()[:-8])
    elif damage == "flipped-shard":
        tokens.write_bytes(b"\x07" + tokens.read_bytes()[1:])
    return str(folder)


def _checkpoint(trained: Path, where: Path, damage: str) -> Path:
    """A copy of the trained run directory with its step-6 checkpoint (or all) damaged; returns it."""
    copy = shutil.copytree(trained, where / "source")
    for step in (6, 3) if damage == "all-truncated" else (6,):
        folder = copy / "checkpoints" / f"step-{step}"
        shard, meta = folder / "__0_0.distcp", folder / "meta.json"
        if damage == "meta-bad-json":
            meta.write_text(meta.read_text()[:50])
        elif damage == "meta-no-files":
            meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "files"}))
        elif damage == "shard-missing":
            shard.unlink()
        elif damage in ("shard-truncated", "all-truncated"):
            shard.write_bytes(shard.read_bytes()[:1000])
        elif damage == "shard-flipped":
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 1
            shard.write_bytes(bytes(data))
    return copy


# (id, how to make the input, overrides with {input} for it, the error line or, where it quotes a parser, its
# start; {input}, {dir}, {ckpt}... stand for the damaged input)
CASES = [
    ("hf-model-path-missing", ("model", "missing"), HF_FOLDER, "model.path={input}: no such folder"),
    ("hf-model-path-unset", ("model", "missing"), ["model=hf"], "model.path must be set"),
    ("model-path-missing", ("model", "missing"), ZOO_FOLDER, "model.path={input}: no such folder"),
    ("model-path-a-file", ("model", "file"), ZOO_FOLDER, "model.path={input}: not a folder"),
    (
        "model-path-empty",
        ("model", "empty"),
        ZOO_FOLDER,
        "model.path={input}: no config.json (not a Hugging Face model folder)",
    ),
    (
        "config-bad-json",
        ("model", "bad-json"),
        ZOO_FOLDER,
        "{input}/config.json: not valid JSON (",
    ),
    ("config-no-model-type", ("model", "no-model-type"), ZOO_FOLDER, "{input}/config.json: no model_type"),
    (
        "config-unknown-model-type",
        ("model", "unknown-model-type"),
        HF_FOLDER,
        "{input}/config.json: model_type 'qwen99' is not a model type transformers knows",
    ),
    ("no-safetensors", ("model", "no-weights"), HF_FOLDER, "model.path={input}: no *.safetensors weights"),
    (
        "safetensors-garbage",
        ("model", "garbage-weights"),
        HF_FOLDER,
        "{input}/model.safetensors: not a safetensors file (header of 18446744073709551615 bytes in a file of 64)",
    ),
    (
        "safetensors-truncated",
        ("model", "truncated-weights"),
        HF_FOLDER,
        "{input}/model.safetensors: truncated or damaged ({size} bytes, its header describes {full})",
    ),
    (
        "safetensors-index-lists-missing",
        ("model", "index-lists-missing"),
        HF_FOLDER,
        "{input}/model.safetensors.index.json: lists model-00002-of-00002.safetensors, which is missing",
    ),
    (
        "weights-of-another-shape",
        ("model", "other-shape"),
        HF_FOLDER,
        "model.path={input}: model.layers.0.mlp.gate_proj.weight is (64, 32) in the checkpoint, (48, 32) in the model",
    ),
    (
        "tokenizer-missing",
        ("tokenizer", "missing"),
        ["data=synthetic_recall_text", "data.seq_len=128", "data.tokenizer={input}"],
        "data.tokenizer must be a local tokenizer folder, got '{input}'",
    ),
    (
        "tokenizer-empty",
        ("tokenizer", "empty"),
        ["data=synthetic_recall_text", "data.seq_len=128", "data.tokenizer={input}"],
        "data.tokenizer={input}: not a usable tokenizer folder (Couldn't instantiate the backend tokenizer",
    ),
    (
        "tokenizer-bad-json",
        ("tokenizer", "bad-json"),
        ["data=synthetic_recall_text", "data.seq_len=128", "data.tokenizer={input}"],
        "data.tokenizer={input}: not a usable tokenizer folder (Expecting property name",
    ),
    (
        "corpus-missing",
        ("corpus", "missing"),
        ["data=corpus", "data.seq_len=128", "data.sources=[{input}]"],
        "{input}: not a prepared corpus (no manifest.json); make one with ttt-prepare-data",
    ),
    (
        "corpus-garbled-manifest",
        ("corpus", "garbled-manifest"),
        ["data=corpus", "data.seq_len=128", "data.sources=[{input}]"],
        "{input}/manifest.json: unreadable manifest (",
    ),
    (
        "corpus-shard-truncated",
        ("corpus", "truncated-shard"),
        ["data=corpus", "data.seq_len=128", "data.sources=[{input}]"],
        "{input}/shard-00001.tokens: truncated or overwritten shard (3992 bytes, manifest: 4000)",
    ),
    (
        "corpus-shard-corrupted",
        ("corpus", "flipped-shard"),
        ["data=corpus", "data.seq_len=128", "data.sources=[{input}]"],
        "{input}/shard-00001.tokens: corrupted shard (sha256 differs from the manifest)",
    ),
    (
        "resume-not-a-checkpoint",
        ("checkpoint", "none"),
        ["checkpoint.resume={input}/checkpoints"],
        "checkpoint.resume={input}/checkpoints: not a complete checkpoint (no meta.json)",
    ),
    (
        "resume-meta-bad-json",
        ("checkpoint", "meta-bad-json"),
        ["checkpoint.resume={ckpt}"],
        "checkpoint.resume={ckpt}: damaged checkpoint: {ckpt}/meta.json: unreadable (",
    ),
    (
        "resume-meta-lists-no-files",
        ("checkpoint", "meta-no-files"),
        ["checkpoint.resume={ckpt}"],
        "checkpoint.resume={ckpt}: damaged checkpoint: {ckpt}/meta.json: not a checkpoint's meta.json (needs step, "
        "world_size, data, files)",
    ),
    (
        "resume-shard-missing",
        ("checkpoint", "shard-missing"),
        ["checkpoint.resume={ckpt}"],
        "checkpoint.resume={ckpt}: damaged checkpoint: {ckpt}/__0_0.distcp: checkpoint file missing",
    ),
    (
        "resume-shard-truncated",
        ("checkpoint", "shard-truncated"),
        ["checkpoint.resume={ckpt}"],
        "checkpoint.resume={ckpt}: damaged checkpoint: {ckpt}/__0_0.distcp: truncated or overwritten checkpoint "
        "(1000 bytes, meta.json: {shard_size})",
    ),
    (
        "resume-shard-corrupted",
        ("checkpoint", "shard-flipped"),
        ["checkpoint.resume={ckpt}"],
        "checkpoint.resume={ckpt}: damaged checkpoint: {ckpt}/__0_0.distcp: corrupted checkpoint (sha256 differs "
        "from the meta.json)",
    ),
    (
        "resume-auto-every-checkpoint-damaged",
        ("checkpoint", "all-truncated"),
        ["checkpoint.resume=auto"],
        "checkpoint.resume=auto: every checkpoint under {dir}/checkpoints is damaged (newest: {dir}/checkpoints/step-6/"
        "__0_0.distcp: truncated or overwritten checkpoint (1000 bytes, meta.json: {shard_size}))",
    ),
    (
        "resume-another-model-shape",
        ("checkpoint", "intact"),
        ["checkpoint.resume={ckpt}", "model.config.hidden_size=64"],
        "checkpoint.resume: {ckpt} does not fit this model and ttt config: model.embed_tokens.weight is (256, 96) "
        "in the checkpoint, (256, 64) in the model",
    ),
    (
        "resume-another-ttt-method",
        ("checkpoint", "intact"),
        ["checkpoint.resume={ckpt}", "ttt=inplace", "ttt.chunk_size=32"],
        "checkpoint.resume: {ckpt} does not fit this model and ttt config: the checkpoint does not "
        "match the model (missing ['model.layers.0.mlp.ttt_conv.weight', 'model.layers.1.mlp.ttt_conv.weight', "
        "'model.layers.2.mlp.ttt_conv.weight'])",
    ),
    (
        "resume-other-ttt-layers",
        ("checkpoint", "intact"),
        ["checkpoint.resume={ckpt}", "ttt.layers=[0]"],
        "checkpoint.resume: {ckpt} does not fit this model and ttt config: the checkpoint does not match the model "
        "(unexpected ['model.layers.1.mlp.ttt_gate.bias', 'model.layers.1.mlp.ttt_gate.weight', "
        "'model.layers.1.mlp.ttt_proj.weight'])",
    ),
    (
        "resume-another-data-stream",
        ("checkpoint", "intact"),
        ["checkpoint.resume={ckpt}", "data.num_pairs=4"],
        "checkpoint.resume: {ckpt} read another data stream (data.num_pairs changed); resuming would not continue it",
    ),
]


def _start(monkeypatch, capsys, overrides: list[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["ttt-train", *QUIET, *overrides])
    with pytest.raises(SystemExit) as stopped:
        trainer.train.main()
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, tmp_path, monkeypatch, capsys, trained, hf_folder, corpus):
    _, (kind, damage), overrides, expected = case
    values = {"dir": "", "ckpt": ""}
    if kind == "model":
        values["input"] = _model_folder(hf_folder, tmp_path, damage)
        if damage == "truncated-weights":
            full = (hf_folder / "model.safetensors").stat().st_size
            values.update(size=full - 100, full=full)
    elif kind == "tokenizer":
        values["input"] = _tokenizer_folder(tmp_path, damage)
    elif kind == "corpus":
        values["input"] = _corpus(corpus, tmp_path, damage)
    else:
        values["input"] = values["dir"] = str(_checkpoint(trained, tmp_path, damage))
        values["ckpt"] = f"{values['dir']}/checkpoints/step-6"
        values["shard_size"] = (trained / "checkpoints" / "step-6" / "__0_0.distcp").stat().st_size
    run_dir = Path(values["dir"]) if "checkpoint.resume=auto" in overrides else tmp_path / "run"
    before = tree(tmp_path)
    code, stderr = _start(monkeypatch, capsys, [o.format(**values) for o in overrides] + [f"hydra.run.dir={run_dir}"])
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected.format(**values)}"), stderr
    print(lines[0])  # the line, for `pytest -rP`
    changed = {Path(k) for k, v in tree(tmp_path).items() if before.get(k) != v}
    inside = run_dir.relative_to(tmp_path)  # the inputs are untouched; the run directory gets Hydra's files only
    assert all(p.is_relative_to(inside) for p in changed)
    assert {str(p.relative_to(inside)) for p in changed if p != inside} <= HYDRA_LEAVES


def test_a_bad_input_is_the_whole_stderr_of_a_real_process(tmp_path):
    args = [*QUIET, f"model.path={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "trainer.train", *args], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (2, f"error: model.path={tmp_path / 'nope'}: no such folder\n")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".hydra", "train.log"]
