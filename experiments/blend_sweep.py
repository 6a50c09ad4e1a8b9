"""Which CacheBlend selection works on SmolLM2? Check layer(s) and deviation (key vs value) at one ratio.

For each configuration the same documents and questions go through :func:`experiments.blend_quality.run_methods`
(full prefill, full reuse, CacheBlend at ``--ratio``), and the table reports the fidelity to full prefill
(KL of the answer distributions, teacher-forced; ROUGE-L of the greedy answer) and the KL relative to full reuse,
whose target in issue [7/7] is <= 25 % at 15 %.

    .venv/bin/python -m experiments.blend_sweep            # 4 docs, 3 questions, 7 configurations (~10 min)
    .venv/bin/python -m experiments.blend_sweep --small

Writes experiments/results/blend_sweep.jsonl and .png.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from tqdm.auto import tqdm

from experiments._common import print_table, save_plot, small, write_rows
from experiments.blend_quality import run_methods, setup
from lmkv.config import BlendConfig

# (check layers, deviation, oracle): the oracle selects by every layer's deviation from the full prefill
# (experiments.blend_quality.oracle_scores), an upper bound for any rule that predicts it from one check layer.
CONFIGS: list[tuple[tuple[int, ...], str, bool]] = [
    ((1,), "value", False), ((1,), "key", False), ((2,), "value", False), ((4,), "value", False),
    ((8,), "value", False), ((15,), "value", False), ((1, 4, 8), "value", False), ((1,), "value", True),
]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--filler", type=int, default=10)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--max-new", type=int, default=10)
    args = p.parse_args(argv)
    configs = CONFIGS
    if args.small or small():
        args.docs, args.questions, args.filler, args.max_new = 3, 1, 2, 4
        configs = [CONFIGS[0], CONFIGS[-1]]
    torch.set_grad_enabled(False)
    s = setup(args.docs, args.questions, args.filler)
    summary: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    for layers, dev, oracle in tqdm(configs, desc="configurations"):
        cfg = BlendConfig(ratio=args.ratio, check_layers=layers, deviation=dev)
        rows = run_methods(s, (args.ratio,), args.max_new, seed=0, progress=False, blend=cfg, oracle=oracle)
        blend_rows = [r for r in rows if r["method"].startswith("blend")]
        reuse_rows = [r for r in rows if r["method"] == "reuse"]
        kl_b = statistics.mean(r["kl"] for r in blend_rows)
        kl_r = statistics.mean(r["kl"] for r in reuse_rows)
        summary.append({
            "check_layers": ",".join(map(str, layers)), "deviation": "oracle" if oracle else dev,
            "ratio": args.ratio,
            "kl_blend": kl_b, "kl_reuse": kl_r, "kl_vs_reuse": kl_b / kl_r if kl_r else float("nan"),
            "rouge_blend": statistics.mean(r["rouge_l"] for r in blend_rows),
            "rouge_reuse": statistics.mean(r["rouge_l"] for r in reuse_rows),
            "recompute": statistics.mean(r["recompute"] for r in blend_rows),
            "tokens": rows[0]["tokens"], "questions": args.questions,
        })
        raw.extend({**r, "check_layers": list(layers), "deviation": "oracle" if oracle else dev} for r in rows)
    print_table(summary, ["check_layers", "deviation", "kl_blend", "kl_reuse", "kl_vs_reuse", "rouge_blend",
                          "rouge_reuse", "recompute"],
                title=f"CacheBlend selection on SmolLM2 at ratio {args.ratio:.0%} ({args.docs} docs, "
                      f"{args.questions} questions, ~{summary[0]['tokens']} tokens)")
    write_rows("blend_sweep", [{"kind": "summary", "backend": "auto", **r} for r in summary]
               + [{"kind": "question", "backend": "auto", **r} for r in raw])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"L{r['check_layers']}\n{r['deviation']}" for r in summary]
    ax.bar(labels, [r["kl_vs_reuse"] for r in summary], color="tab:blue")
    ax.axhline(0.25, color="red", linestyle="--", label="target: 25 % of full reuse")
    ax.set_ylabel("mean KL(blend) / mean KL(full reuse)")
    ax.set_title(f"CacheBlend token selection on SmolLM2 at {args.ratio:.0%} recompute")
    ax.legend()
    save_plot(fig, "blend_sweep")
    return summary


if __name__ == "__main__":
    main()
