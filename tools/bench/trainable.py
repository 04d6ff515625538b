"""Step time of continued training with the whole model trainable against only what TTT adds (`train.trainable`).

    python -m tools.bench.trainable --seq-lens 256 512 --layers every:4 '[0]' upper -- model=hf \\
        model.path=models/smollm2 data=synthetic_passkey_text data.tokenizer=models/smollm2

Arguments after `--` are `ttt-train` overrides shared by every row. For each sequence length, TTT placement
(`ttt.layers`; `upper` is the upper half of the layers) and `train.trainable` in (all, ttt) it builds the job the
trainer builds in this process and times `trainer.loop.train_step` on the job's own data: the median of
--steps steps after one warm-up step, with the parameters that train and the decoder layers the backward
reaches (the layers from the lowest one holding a trainable parameter up). One process, one thread pool: run it
on an otherwise idle machine; the ratio column divides by the `all` row of the same length and placement.
"""

from __future__ import annotations

import statistics

import torch

from tools.cli import OneLineErrorParser, positive_int
from tools.measure import train_step_seconds
from trainer.compose import compose_config
from trainer.config import job_config
from trainer.ttt.patch import decoder_of

TRAINABLE = ("all", "ttt")


def _layers_override(layers: str, total: int) -> str:
    if layers == "upper":
        return f"ttt.layers=[{','.join(str(i) for i in range(total // 2, total))}]"
    return f"ttt.layers={layers}"


def _lowest_trained_layer(model: torch.nn.Module) -> int | None:
    for i, layer in enumerate(decoder_of(model).layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return None


def time_steps(overrides: list[str], steps: int) -> dict:
    training, seconds = train_step_seconds(job_config(compose_config(overrides)), steps, warmup=1)
    model = training.model
    layers = len(decoder_of(model).layers)
    lowest = _lowest_trained_layer(model)
    return {
        "step_s": statistics.median(seconds),
        "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "backward_layers": 0 if lowest is None else layers - lowest,
        "layers": layers,
        "ttt_layers": list(getattr(model, "ttt_layers", ())),
    }


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m tools.bench.trainable", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seq-lens", type=positive_int, nargs="+", default=[256, 512])
    parser.add_argument("--layers", nargs="+", default=["every:4"], help="ttt.layers values; upper: the upper half")
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("overrides", nargs="*", help="ttt-train overrides, after --")
    args = parser.parse_args(argv)
    base = ["parallel=single", "ttt=ntp", "eval.every=0", *args.overrides]
    total = len(decoder_of(_meta(base)).layers)
    print("| S | ttt.layers | trainable | trained parameters | layers the backward runs | step s | / all |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for seq_len in args.seq_lens:
        for layers in args.layers:
            reference = None
            for trainable in TRAINABLE:
                overrides = [*base, f"data.seq_len={seq_len}", _layers_override(layers, total),
                             f"train.trainable={trainable}"]  # fmt: skip
                row = time_steps(overrides, args.steps)
                reference = reference or row["step_s"]
                print(f"| {seq_len} | {layers} ({row['ttt_layers']}) | {trainable} | {row['trained_params']:,} | "
                      f"{row['backward_layers']} of {row['layers']} | {row['step_s']:.2f} | "
                      f"{row['step_s'] / reference:.2f} |", flush=True)  # fmt: skip


def _meta(overrides: list[str]) -> torch.nn.Module:
    from trainer.model import build_meta_model

    job = job_config(compose_config(overrides))
    return build_meta_model(job.model, job.ttt)


if __name__ == "__main__":
    main()
