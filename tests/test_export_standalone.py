"""An exported folder is self-contained: plain transformers loads it with trust_remote_code=True in a process that
cannot import this package, computes the trained model's logits and decodes the same greedy tokens, while a plain
load without trust_remote_code refuses it. The shipped files are the package's sources, imports made relative."""

from __future__ import annotations

import ast
import json
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export import train_tiny

from tools.commands.export_hf import main
from trainer.checkpoint.trained_model import load_trained_model
from trainer.export.remote_code import MODELING_FILE, relative_source, shipped_modules
from trainer.inference import generate

REPO = Path(__file__).resolve().parents[1]
PROMPT, NEW_TOKENS = 50, 20  # chunk_size 32: the prompt ends inside chunk 1, decoding crosses into chunk 2


def export_trained_run(tmp_path_factory, tokenizer_dir) -> tuple[Path, Path, Path]:
    """A 2-step tiny TTT-NTP run (vocabulary 320, room for the test tokenizer) exported by `ttt-export` in fp64 with
    the test tokenizer: (checkpoint, run config, export folder)."""
    run_dir = tmp_path_factory.mktemp("run")
    checkpoint, config = train_tiny(run_dir, "ttt=ntp", "ttt.layers=[1,3]", "model.config.vocab_size=320")
    out = tmp_path_factory.mktemp("hf") / "tiny-ntp"
    main([str(checkpoint), str(out), "--dtype", "float64", "--tokenizer", str(tokenizer_dir)])
    return checkpoint, config, out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
    return export_trained_run(tmp_path_factory, tokenizer_dir)


def run_without_package(code: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -c code args` where this package cannot be imported: isolated mode (-I: no PYTHONPATH, no current
    directory on the path) without the site module (-S: the editable install's path hook is never installed), the
    installed packages' folders added by hand; cwd outside the repository. The child checks all of that first."""
    installed = site.getsitepackages() + [site.getusersitepackages()] * bool(site.ENABLE_USER_SITE)
    prelude = f"""
import importlib.util, sys
sys.path += {installed!r}
from pathlib import Path
repo = Path({str(REPO)!r})
assert not any(p and (repo == Path(p).resolve() or repo in Path(p).resolve().parents) for p in sys.path), sys.path
for name in ("trainer", "parallel", "tools"):
    assert importlib.util.find_spec(name) is None, name + " is importable"
try:
    import trainer
except ImportError:
    pass
else:
    raise SystemExit("import trainer worked")
"""
    assert REPO not in (cwd, *cwd.parents)
    offline = {"HF_HOME": str(cwd / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env = {**os.environ, **offline, "OMP_NUM_THREADS": "1"}  # a tiny model: one thread is fastest, never stalled
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + code, *args],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


STANDALONE = """
class NoTriton:  # torch and transformers suffice: triton, which the shipped CUDA kernels import, is hidden too
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, NoTriton())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, ids_file, out_file, prompt, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])
try:  # without trust_remote_code: refused, never the base model without its fast weights
    AutoModelForCausalLM.from_pretrained(folder)
    refused = ""
except ValueError as err:
    refused = str(err)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
ids = torch.load(ids_file)
with torch.no_grad():
    logits = model(ids).logits
tokens = model.generate(ids[:, :prompt], max_new_tokens=new_tokens, do_sample=False)
torch.save({
    "refused": refused, "logits": logits, "tokens": tokens, "class": type(model).__module__, "dtype": str(model.dtype),
    "vocab": len(AutoTokenizer.from_pretrained(folder)),
    "project_modules": [m for m in sys.modules if m.split(".")[0] in ("trainer", "parallel", "tools")],
}, out_file)
"""


def test_loads_and_decodes_without_this_package(exported, tmp_path):
    checkpoint, config, folder = exported
    trained = load_trained_model(checkpoint, config).to(torch.float64)
    assert trained.model.layers[1].mlp.ttt_proj.weight.abs().max() > 0  # trained away from its zero init
    ids = torch.randint(0, trained.config.vocab_size, (2, PROMPT + NEW_TOKENS))
    torch.save(ids, tmp_path / "ids.pt")

    child = run_without_package(STANDALONE, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"),
                                str(PROMPT), str(NEW_TOKENS), cwd=tmp_path)  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert "trust_remote_code=True" in out["refused"]
    assert out["class"].startswith("transformers_modules.") and out["project_modules"] == []
    assert out["dtype"] == "torch.float64" and out["vocab"] == 300
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], trained(ids).logits, rtol=0, atol=1e-12)
    assert torch.equal(out["tokens"], generate(trained, ids[:, :PROMPT], NEW_TOKENS))


def _project_sources() -> dict[str, tuple[str, Path]]:
    """Flat file stem -> (dotted name, source file), for every module of trainer/ and parallel/."""
    sources = {}
    for path in [*(REPO / "trainer").rglob("*.py"), *(REPO / "parallel").rglob("*.py")]:
        parts = path.relative_to(REPO).with_suffix("").parts
        dotted = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[dotted.replace(".", "_")] = dotted, path
    return sources


def test_shipped_files_are_the_sources_with_relative_imports(exported):
    """Turning each relative import back into the project import gives the source file byte for byte, so the
    shipped code is the code the trainer runs, and every import it makes is shipped or an installed package."""
    folder = exported[2]
    sources = _project_sources()
    shipped = {path.stem for path in folder.glob("*.py")} - {Path(MODELING_FILE).stem}
    assert shipped == {name.replace(".", "_") for name in shipped_modules()}
    assert {"trainer_ttt_mlp", "trainer_ops_fastweight", "trainer_inference_cache", "parallel_state_scan"} <= shipped

    def absolute(match: re.Match) -> str:
        return f"{match[1]}from {sources[match[2]][0]} import"

    for stem in shipped:
        text = re.sub(r"^(\s*)from \.(\w+) import", absolute, (folder / f"{stem}.py").read_text(), flags=re.M)
        assert text == sources[stem][1].read_text(), stem
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in shipped, f"{path.name}: from .{node.module}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.split(".")[0] in ("trainer", "parallel", "tools") for n in names), path.name


def test_config_names_the_remote_classes(exported):
    fields = json.loads((exported[2] / "config.json").read_text())
    assert fields["model_type"] == "ttt_qwen3" and fields["architectures"] == ["TTTQwen3ForCausalLM"]
    assert fields["auto_map"] == {
        "AutoConfig": "modeling_ttt.TTTQwen3Config", "AutoModelForCausalLM": "modeling_ttt.TTTQwen3ForCausalLM",
    }  # fmt: skip
    assert fields["ttt_method"] == "ntp" and fields["ttt_layers"] == [1, 3]


@pytest.mark.parametrize(
    "statement,message",
    [
        ("import trainer.ttt", "line 1: write `from ... import ...`"),
        ("from trainer import ttt", "line 1: imports the module trainer.ttt by name"),
        ("from .mlp import FastWeightMLP", "line 1: write the import absolute"),
    ],
)
def test_an_import_the_flat_files_cannot_express_fails_the_export(tmp_path, monkeypatch, statement, message):
    (tmp_path / "shipped_probe.py").write_text(statement + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"shipped_probe {message}")):
        relative_source("shipped_probe")
