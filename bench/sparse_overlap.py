"""Do different facts write into different rows? Row overlap of the sparse adapter by position.

For N facts in the plain prompt format, each layer's adapter input is taken at three
positions of every fact: the prompt's last token (``Answer:``, which predicts the first
answer token), a question token, and the first answer token (which predicts the second).
Each position's rows are the ones the adapter selects there (its router and keys, as in
training). Per layer and position kind: the mean Jaccard overlap of two facts' row sets,
the mean cosine of their adapter inputs, and the distinct rows all N facts use there.
A fresh adapter by default, or a trained one (``--adapter``, an export of the launcher).

High overlap at a position means the facts' gradients land on the same rows there and
overwrite each other; a low one, that each fact has rows of its own.

    .venv/bin/python bench/sparse_overlap.py --facts 64
    .venv/bin/python bench/sparse_overlap.py --adapter runs/x/adapter --name sparse_overlap_trained
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("answer_prompt", "question", "answer_token")


Inputs = dict[str, dict[int, list[tuple[torch.Tensor, torch.Tensor]]]]


def adapter_inputs(model, tokenizer, facts: list[tuple[str, str]], seed: int = 0) -> Inputs:
    """``kind -> layer -> [(x, r) of fact i]`` (``[d]`` each): the adapters' inputs ``x``
    and their routers' inputs ``r`` (``x`` itself under token routing, the centred causal
    mean under ``--sparse_route context``) at each fact's three positions (see the module
    docstring). Facts whose answer is one token have no ``answer_token`` entry."""
    from meft_ds.data.prompts import format_prompt
    from meft_ds.sparse.adapter import SparseAdapter

    adapters = [m for m in model.modules() if isinstance(m, SparseAdapter)]
    seen: dict[int, torch.Tensor] = {}
    routed: dict[int, torch.Tensor] = {}
    hooks = [a.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__(mod.layer, args[0][0].detach())) for a in adapters]
    hooks += [a.router.register_forward_pre_hook(  # [T, d]: one sequence, no padding
        lambda mod, args, layer=a.layer: routed.__setitem__(layer, args[0].detach()))
        for a in adapters]
    rng = random.Random(seed)
    out: Inputs = {k: {} for k in KINDS}
    try:
        with torch.no_grad():
            for question, answer in facts:
                prompt = tokenizer(format_prompt(question))["input_ids"]
                full = tokenizer(format_prompt(question) + " " + answer)["input_ids"]
                seen.clear()
                model(input_ids=torch.tensor([full]))
                at = {"answer_prompt": len(prompt) - 1,
                      "question": rng.randrange(1, max(2, len(prompt) - 3))}
                if len(full) >= len(prompt) + 2:
                    at["answer_token"] = len(prompt)
                for kind, pos in at.items():
                    for layer, x in seen.items():
                        out[kind].setdefault(layer, []).append((x[pos], routed[layer][pos]))
    finally:
        for hook in hooks:
            hook.remove()
    return out


def overlap(model, xs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
            ) -> dict[int, dict[str, float]]:
    """Per layer: mean pairwise Jaccard of the selected row sets (experts from the router's
    inputs, keys matched against the adapter's), mean pairwise cosine of the router's
    inputs, and the number of distinct rows over all the inputs."""
    from meft_ds.sparse.adapter import SparseAdapter

    by_layer = {m.layer: m for m in model.modules() if isinstance(m, SparseAdapter)}
    figures: dict[int, dict[str, float]] = {}
    for layer, pairs_xr in sorted(xs.items()):
        adapter = by_layer[layer]
        x = torch.stack([p[0] for p in pairs_xr])
        r = torch.stack([p[1] for p in pairs_xr])
        with torch.no_grad():
            experts = adapter.route(r).topk(adapter.runtime.sizes.experts_per_token, -1).indices
        selection = adapter.runtime.select(layer, x, experts, count=False)
        chosen = [set(selection.rows[local].tolist()) for local in selection.local]
        pairs = list(itertools.combinations(range(len(chosen)), 2))
        unit = torch.nn.functional.normalize(r.float(), dim=1)
        cos = unit @ unit.t()
        figures[layer] = {
            "jaccard": sum(len(chosen[i] & chosen[j]) / len(chosen[i] | chosen[j])
                           for i, j in pairs) / max(1, len(pairs)),
            "cosine": float(cos[torch.triu(torch.ones_like(cos), 1).bool()].mean()),
            "distinct_rows": len(set().union(*chosen)),
        }
    return figures


def calibrate(model, tokenizer, facts: list[tuple[str, str]]) -> None:
    """Set a fresh context-routing adapter's centre as training's first micro-batch would:
    one training-mode forward over ``facts`` (right-padded, as the launcher batches)."""
    from meft_ds.data.prompts import format_prompt

    encoded = [tokenizer(format_prompt(q) + " " + a)["input_ids"] for q, a in facts]
    width = max(len(e) for e in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, : len(e)], mask[row, : len(e)] = torch.tensor(e), 1
    model.train()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=64, help="first N NQ-open dev facts")
    parser.add_argument("--adapter", default=None, help="a sparse adapter export (default: "
                        "a fresh adapter with --sparse_param_fraction)")
    parser.add_argument("--sparse_param_fraction", type=float, default=1.0)
    parser.add_argument("--sparse_top_k", type=int, default=64,
                        help="a fresh adapter's rows per token")
    parser.add_argument("--sparse_route", default="token", choices=("token", "context"),
                        help="a fresh adapter's routing (context: its centre from the first "
                        "4 facts, as the first training micro-batch would set it)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default="sparse_overlap")
    args = parser.parse_args(argv)

    import meft_ds
    from meft_ds.data import default_data_dir
    from meft_ds.models.loader import load_model

    torch.manual_seed(0)
    loaded = load_model(args.model)
    if args.adapter:
        model = meft_ds.MeftModel.from_pretrained(loaded.model, args.adapter)
    else:
        model = meft_ds.get_sparse_model(loaded.model, meft_ds.SparseConfig(
            sparse_param_fraction=args.sparse_param_fraction, sparse_route=args.sparse_route,
            sparse_top_k=args.sparse_top_k))
    dev = default_data_dir() / "nq_open" / "NQ-open.dev.jsonl"
    records = [json.loads(line) for line in dev.read_text().splitlines()[: args.facts]]
    facts = [(r["question"], r["answer"][0]) for r in records]
    if args.sparse_route == "context" and not args.adapter:
        calibrate(model, loaded.tokenizer, facts[:4])
    model.eval()
    xs = adapter_inputs(model, loaded.tokenizer, facts)
    result = {
        "model": args.model, "adapter": args.adapter or "fresh", "facts": len(facts),
        "route": model.method.options.sparse_route,
        "top_k": model.method.options.sparse_top_k,
        "layers": {kind: overlap(model, xs[kind]) for kind in KINDS},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    for kind in KINDS:
        layers = result["layers"][kind]
        mean = {k: sum(f[k] for f in layers.values()) / len(layers) for k in ("jaccard",
                                                                            "cosine")}
        print(f"{kind:14s} jaccard {mean['jaccard']:.3f}  cosine {mean['cosine']:.3f}  "
              f"(layer means over {len(layers)} layers)")
    _plot(result, out / f"{args.name}.png")
    print(f"wrote {out / args.name}.json and .png")
    return 0


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind in KINDS:
        layers = result["layers"][kind]
        xs = sorted(layers, key=int)
        axes[0].plot([int(x) for x in xs], [layers[x]["jaccard"] for x in xs], label=kind)
        axes[1].plot([int(x) for x in xs], [layers[x]["cosine"] for x in xs], label=kind)
    axes[0].set(xlabel="layer", ylabel="mean Jaccard of two facts' rows",
                title=f"row overlap ({result['adapter']}, {result.get('route', 'token')} routing, "
                f"top-K {result.get('top_k', 64)}, {result['facts']} facts)")
    axes[1].set(xlabel="layer", ylabel="mean cosine of two facts' router inputs",
                title="input similarity")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
