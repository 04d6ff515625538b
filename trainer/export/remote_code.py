"""The code an exported folder ships: it loads with `trust_remote_code=True` where this package is not installed.

transformers' remote-code loader imports the module that config.json's `auto_map` names and copies the files it
imports relatively (`from .name import ...`) from the same folder: flat modules, no packages. So the folder gets
the project's own sources of every module the fast-weight model needs (the closure of the project imports of
`trainer.export.causal_lm`: the patching, the chunk scan, the state passing of parallel/, the decoding cache),
each as one flat file named after its dotted path (trainer.ttt.mlp -> trainer_ttt_mlp.py) with only its project
imports rewritten to relative ones, and a generated modeling_ttt.py that subclasses the base architecture:

    class TTTQwen3Config(Qwen3Config): model_type = "ttt_qwen3"
    class TTTQwen3ForCausalLM(TTTCausalLM, Qwen3ForCausalLM): config_class = TTTQwen3Config

config.json names them (`model_type`, `architectures`, `auto_map`). A model type transformers does not know is
what makes a plain `from_pretrained` without `trust_remote_code` refuse the folder instead of silently loading
the base model without its fast weights; this package reads such a folder as its base architecture
(`read_config`), and the release's folders as they are.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import transformers
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from trainer.export import causal_lm

MODELING_FILE = "modeling_ttt.py"
MODEL_TYPE_PREFIX = "ttt_"  # an export of a qwen3 model has model_type "ttt_qwen3"
CLASS_PREFIX = "TTT"  # ... and the classes TTTQwen3Config, TTTQwen3ForCausalLM
_PROJECT = ("trainer", "parallel")

_MODELING = '''"""{base_model} with the fast-weight (TTT) MLPs of ttt-longctx, as `ttt-export` wrote it: load with
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True). The trainer_*.py and parallel_*.py files beside
it are the package's own sources, with their imports of each other made relative."""

from transformers import {base_config}, {base_model}

from .{mixin_module} import {mixin}


class {config}({base_config}):
    model_type = "{model_type}"


class {model}({mixin}, {base_model}):
    config_class = {config}
'''


def flat_name(module: str) -> str:
    """The file stem a project module is shipped as: trainer.ops.fastweight.layout -> trainer_ops_fastweight_layout."""
    return module.replace(".", "_")


def _project_imports(module: str) -> tuple[str, list[ast.ImportFrom]]:
    """The module's source and its `from <project module> import ...` statements, lazy ones included. Anything
    a flat relative import cannot express (`import trainer.x`, a submodule imported by name, a relative import) is
    a ValueError."""
    source = Path(importlib.util.find_spec(module).origin).read_text()
    statements = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] in _PROJECT for alias in node.names):
            raise ValueError(f"{module} line {node.lineno}: write `from ... import ...` to ship it in an export")
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            raise ValueError(f"{module} line {node.lineno}: write the import absolute to ship it in an export")
        if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in _PROJECT:
            package = importlib.util.find_spec(node.module).submodule_search_locations is not None
            for alias in node.names:
                if package and importlib.util.find_spec(f"{node.module}.{alias.name}") is not None:
                    raise ValueError(f"{module} line {node.lineno}: imports the module {node.module}.{alias.name} "
                                     "by name, which a flat export cannot ship")  # fmt: skip
            statements.append(node)
    return source, statements


def shipped_modules() -> list[str]:
    """Every project module the exported model needs: the closure of `trainer.export.causal_lm`'s imports."""
    done, todo = set(), [causal_lm.__name__]
    while todo:
        module = todo.pop()
        if module not in done:
            done.add(module)
            todo += [node.module for node in _project_imports(module)[1]]
    return sorted(done)


def relative_source(module: str) -> str:
    """The module's source with each project import made relative to the flat files: `from trainer.ttt.config
    import X` -> `from .trainer_ttt_config import X`; nothing else changes."""
    source, statements = _project_imports(module)
    lines = source.splitlines(keepends=True)
    for node in statements:
        old, new = f"from {node.module} import", f"from .{flat_name(node.module)} import"
        line = lines[node.lineno - 1]
        if old not in line:
            raise ValueError(f"{module} line {node.lineno}: write the import as one `{old} ...` to ship it")
        lines[node.lineno - 1] = line.replace(old, new, 1)
    return "".join(lines)


def _base_classes(model) -> tuple[type, type]:
    """The model's transformers classes, which modeling_ttt.py imports from `transformers` by name."""
    classes = type(model), type(model.config)
    for cls in classes:
        if getattr(transformers, cls.__name__, None) is not cls:
            raise ValueError(f"cannot export {cls.__name__}: it is not a class of the transformers package")
    return classes


def write_remote_code(folder: Path, model) -> None:
    """Add the shipped sources and modeling_ttt.py to a folder `model.save_pretrained` wrote, and name its classes in
    config.json (see the module doc)."""
    base_model, base_config = _base_classes(model)
    for module in shipped_modules():
        (folder / f"{flat_name(module)}.py").write_text(relative_source(module))
    names = {
        "config": CLASS_PREFIX + base_config.__name__,
        "model": CLASS_PREFIX + base_model.__name__,
        "model_type": MODEL_TYPE_PREFIX + base_config.model_type,
    }
    (folder / MODELING_FILE).write_text(
        _MODELING.format(
            base_config=base_config.__name__,
            base_model=base_model.__name__,
            mixin_module=flat_name(causal_lm.__name__),
            mixin=causal_lm.TTTCausalLM.__name__,
            **names,
        )
    )
    config_file = folder / "config.json"
    fields = json.loads(config_file.read_text())
    stem = Path(MODELING_FILE).stem
    fields.update(
        model_type=names["model_type"],
        architectures=[names["model"]],
        auto_map={"AutoConfig": f"{stem}.{names['config']}", "AutoModelForCausalLM": f"{stem}.{names['model']}"},
    )
    config_file.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def base_config_fields(fields: dict) -> dict:
    """config.json fields as the base architecture reads them: an export's with the base model type and architecture
    and without `auto_map`; any other folder's (a base model's, the release's) as they are."""
    model_type = fields.get("model_type")
    if not isinstance(model_type, str) or not model_type.startswith(MODEL_TYPE_PREFIX) or "auto_map" not in fields:
        return fields
    base = {key: value for key, value in fields.items() if key != "auto_map"}
    base["model_type"] = model_type.removeprefix(MODEL_TYPE_PREFIX)
    base["architectures"] = [name.removeprefix(CLASS_PREFIX) for name in fields.get("architectures") or []]
    return base


def read_config(folder: str | Path) -> PretrainedConfig:
    """The transformers config of a local folder, an export's read as its base architecture's (no remote code runs)."""
    fields = json.loads((Path(folder) / "config.json").read_bytes())
    base = base_config_fields(fields)
    if base is fields:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    if base["model_type"] not in CONFIG_MAPPING:
        raise ValueError(f"{folder}: model_type {fields['model_type']!r} names no model type transformers knows")
    return CONFIG_MAPPING[base["model_type"]].from_dict(base)
