"""The most a fast-weight read gives a frozen model's answers: a perfect write gate and a scaled identity target.

    python -m tools.studies.read_ceiling --layers 0 7 22 29 --scales 8 32 128 512 --documents 32 -- \\
        experiment=window_recall model.path=models/smollm2 data.tokenizer=models/smollm2 'eval.distance_edges=[64,128]'

For each listed layer: the job's model with ntp fast weights in that layer alone, values taken from the token
embeddings (`ttt.target_source=embed`: the value written at position s is token s+1 itself, which a tied head reads
directly), the target projection P = scale x I, and a write gate that opens exactly on the positions whose next
token belongs to the pass key (g = sigmoid(+30) there, sigmoid(-30) elsewhere): the gate a trained one could at best
become, so that the read at an answer position is the key-weighted mean of the pass key's own tokens. Nothing is
trained. Per layer and scale the tool prints the held-out answers' NLL and exact-match accuracy per key -> answer
distance bucket (the job's `eval.distance_edges`, documents `eval.seed`), beside the base model (P = 0, V = 0).
If no scale makes the model answer beyond attention's window, what stands between the fast weights and recall
is not the gate or the write's scale but what the rest of the model makes of the read.
"""

from __future__ import annotations

import bisect

import torch

from tools.cli import OneLineErrorParser, positive_int
from trainer.compose import compose_config
from trainer.config import job_config
from trainer.data import build_dataset
from trainer.evaluation.answers import distance_buckets, distance_span
from trainer.model import build_model
from trainer.ttt.patch import decoder_of

OPEN = 30.0  # gate logit on the pass key's writes (and minus it elsewhere): sigmoid(30) = 1 - 1e-13


def pass_key_writes(answer) -> slice:
    """The positions whose next token is the pass key where it is written (ntp writes T_{s+1} at s): from the
    token before the value's first appearance up to its last token but one."""
    first = answer.start - answer.distance
    return slice(first - 1, first - 1 + answer.end - answer.start)


def _score(model, dataset, documents: int, edges: tuple[int, ...], gate: dict) -> list[dict]:
    """Answer NLL (mean over its tokens) and exact match per distance bucket, over sequences 0 .. documents-1."""
    nll, hits, counts = [0.0] * (len(edges) + 1), [0.0] * (len(edges) + 1), [0] * (len(edges) + 1)
    for index in range(documents):
        sample = dataset.sample(index)
        for answer in sample.answers:
            logits = torch.full((1, sample.input_ids.shape[1], 1), -OPEN)
            logits[0, pass_key_writes(answer)] = OPEN
            gate["logits"] = logits
            with torch.no_grad():
                out = model(sample.input_ids, position_ids=sample.position_ids).logits[0]
            expected = sample.input_ids[0, answer.start : answer.end]
            log_probs = torch.log_softmax(out[answer.start - 1 : answer.end - 1].double(), dim=-1)
            bucket = bisect.bisect_right(edges, answer.distance)
            nll[bucket] += float(-log_probs.gather(1, expected[:, None]).mean())
            hits[bucket] += float(torch.equal(log_probs.argmax(-1), expected))
            counts[bucket] += 1
    return distance_buckets(edges, counts, nll=nll, accuracy=hits)


def measure(overrides: list[str], layers: list[int], scales: list[float], documents: int) -> dict:
    """{(layer, scale): buckets}, with (None, 0.0) the base model."""
    results = {}
    for layer in layers:
        job = job_config(compose_config(["ttt=ntp", f"ttt.layers=[{layer}]", "ttt.target_source=embed",
                                         *overrides]))  # fmt: skip
        model = build_model(job.model, job.ttt, torch.device("cpu"), job.seed).eval()
        dataset = build_dataset(job.data.name, job.data.seq_len, model.config.vocab_size, job.eval.seed,
                                job.data.options)  # fmt: skip
        if not hasattr(dataset, "sample"):
            raise SystemExit(f"read_ceiling: error: data {job.data.name} has no answers: use a passkey task")
        mlp = decoder_of(model).layers[layer].mlp
        gate = {}
        hook = mlp.ttt_gate.register_forward_hook(
            lambda _m, _args, out, gate=gate: gate["logits"].to(out.dtype).expand_as(out)
        )
        try:
            edges = job.eval.distance_edges
            if not results:
                results[(None, 0.0)] = _score(model, dataset, documents, edges, gate)  # P = 0: the base model
            for scale in scales:
                with torch.no_grad():
                    mlp.ttt_proj.weight.copy_(scale * torch.eye(mlp.ttt_proj.weight.shape[0]))
                results[(layer, scale)] = _score(model, dataset, documents, edges, gate)
                print(f"read_ceiling: layer {layer}, scale {scale:g} done", flush=True)
        finally:
            hook.remove()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m tools.studies.read_ceiling", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[0], help="decoder layers (one at a time)")
    parser.add_argument("--scales", type=float, nargs="+", default=[8.0, 32.0, 128.0], help="P = scale x I")
    parser.add_argument("--documents", type=positive_int, default=32, help="held-out passkey sequences")
    parser.add_argument("overrides", nargs="*", help="ttt-train overrides (after --)")
    args = parser.parse_args(argv)
    results = measure(args.overrides, args.layers, args.scales, args.documents)
    buckets = next(iter(results.values()))
    spans = [distance_span(b) for b in buckets]
    print("| layer | scale | " + " | ".join(f"NLL, distance {s} ({b['answers']})" for s, b in zip(spans, buckets))
          + " | " + " | ".join(f"exact match, {s}" for s in spans) + " |")  # fmt: skip
    print("|---:|---:|" + "---:|" * (2 * len(buckets)))
    for (layer, scale), rows in results.items():
        cells = [f"{r['nll']:.3f}" if r["answers"] else "-" for r in rows]
        cells += [f"{r['accuracy']:.3f}" if r["answers"] else "-" for r in rows]
        print(f"| {'base' if layer is None else layer} | {scale:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
