"""How well a model's MLP activations pick one association out of a document: the fast weights' keys, measured.

    python -m tools.studies.key_similarity --documents 16 --layers 0 14 29 -- experiment=window_recall \\
        model.path=models/smollm2 data.tokenizer=models/smollm2

The fast-weight read of the normalized write is a gate-weighted mean over earlier positions s of
(K_t . K_s) V_s, with K = Z / ||Z|| the unit MLP activations (the input of `down_proj`). On passkey documents
(the job's `data`, which must be a passkey task) this tool takes K at the query's "is" (the token before the answer)
and at the write's "is" (the token before the pass key's first appearance), in each listed decoder layer of the
job's model, and prints per layer the mean over documents of:
- the cosine K_query . K_write, and the mean and 95th percentile of K_query . K_s over the other earlier positions;
- the write's rank among all earlier positions by cosine (1: the most similar);
- its share of the read at init (every gate equal: cos_write / the sum of the positive cosines), the fraction of
  the pass key's value the read returns before the gate has learned anything.
A share near 1 / (positions) means the keys do not tell the pass key apart from the filler: the gate alone
would have to learn which token to write.
"""

from __future__ import annotations

import statistics

import torch

from tools.cli import OneLineErrorParser, positive_int
from trainer.compose import compose_config
from trainer.config import job_config
from trainer.data import build_dataset
from trainer.model import build_model
from trainer.ttt.patch import decoder_of


def _occurrences(ids: list[int], pattern: list[int]) -> list[int]:
    return [i for i in range(len(ids) - len(pattern) + 1) if ids[i : i + len(pattern)] == pattern]


def _keys_of(model, input_ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Unit-norm MLP activations (down_proj's input) of each listed layer, [S, h]."""
    keys, hooks = {}, []
    for index in layers:
        down = decoder_of(model).layers[index].mlp.down_proj
        hooks.append(down.register_forward_pre_hook(lambda _m, args, i=index: keys.__setitem__(i, args[0][0])))
    try:
        with torch.no_grad():
            model(input_ids[None])
    finally:
        for hook in hooks:
            hook.remove()
    return {i: torch.nn.functional.normalize(z.double(), dim=-1) for i, z in keys.items()}


def measure(job, layers: list[int], documents: int) -> dict[int, dict[str, float]]:
    model = build_model(job.model, job.ttt, torch.device("cpu"), job.seed).eval()
    options = job.data.options
    dataset = build_dataset(job.data.name, job.data.seq_len, model.config.vocab_size, job.seed + 1, options)
    rows = {i: [] for i in layers}
    for n in range(documents):
        sample = dataset[n]
        ids, labels = sample["input_ids"][0].tolist(), sample["labels"][0].tolist()
        answer = [t for t in labels if t != -100]
        if not answer:
            raise SystemExit("key_similarity: error: the job's data has no answer labels: use a passkey task")
        query = next(i for i, t in enumerate(labels) if t != -100)  # labels[t] is ids[t + 1]: query's "is"
        found = [i for i in _occurrences(ids, answer) if i <= query]
        if not found:
            continue  # the pass key was cut off, or tokenized differently where it is written
        write = found[0] - 1  # the token before the pass key's first appearance: the write's "is"
        for index, keys in _keys_of(model, sample["input_ids"][0], layers).items():
            cos = keys[:query] @ keys[query]
            others = torch.cat([cos[:write], cos[write + 1 :]])
            positive = cos.clamp(min=0).sum()
            rows[index].append({
                "cos_write": float(cos[write]), "cos_others_mean": float(others.mean()),
                "cos_others_p95": float(others.quantile(0.95)), "rank": int((cos > cos[write]).sum()) + 1,
                "share": float(cos[write].clamp(min=0) / positive), "positions": query,
            })  # fmt: skip
    return {i: {k: statistics.mean(r[k] for r in rows[i]) for k in rows[i][0]} for i in layers if rows[i]}


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m tools.studies.key_similarity", description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=positive_int, default=16, help="passkey documents to average over")
    parser.add_argument("--layers", type=int, nargs="+", default=[0], help="decoder layers to measure")
    parser.add_argument("overrides", nargs="*", help="ttt-train overrides (after --)")
    args = parser.parse_args(argv)
    job = job_config(compose_config(["ttt=none", *args.overrides, "train.trainable=all"]))  # the base model alone
    result = measure(job, args.layers, args.documents)
    header = ["layer", "cos(query, write)", "cos(query, others) mean", "p95", "write's rank", "earlier positions",
              "share of the read at init"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for layer, r in result.items():
        print(
            f"| {layer} | {r['cos_write']:.3f} | {r['cos_others_mean']:.3f} | {r['cos_others_p95']:.3f} | "
            f"{r['rank']:.1f} | {r['positions']:.0f} | {r['share']:.4f} (1/{1 / r['share']:.0f}) |"
        )


if __name__ == "__main__":
    main()
