"""The ``lmkv`` command: ``lmkv demo``, ``lmkv info``, ``lmkv bench NAME [ARGS...]``."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lmkv.tools.demo import run_demo

    run_demo(doc_tokens=args.doc_tokens, questions=args.questions, max_new_tokens=args.max_new_tokens,
             redis_url=args.redis, config=args.config)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import lmkv
    from lmkv import config as lmkv_config
    from lmkv._dispatch import all_ops

    print(f"lmkv {lmkv.__version__}  torch {torch.__version__}  cuda={torch.cuda.is_available()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("\nops and backends (auto's choice marked *):")
    for name, op in sorted(all_ops().items()):
        for dev in devices:
            chosen, _ = op.resolve(None, dev)
            parts = []
            for b in op.backends():
                reason = op.unavailable_reason(b, dev)
                mark = "*" if b == chosen else ""
                parts.append(f"{b}{mark}" if reason is None else f"{b}(unavailable: {reason[:60]})")
            print(f"  {name:22s} [{dev}] " + ", ".join(parts))
    cfg = lmkv_config.load(args.config)
    print("\nconfig (defaults + LMKV_CONFIG + LMKV_* overrides):")
    flat = cfg.to_dict()
    for key, _default, doc in lmkv_config.describe():
        value = flat
        for part in key.split("."):
            value = value[part]
        print(f"  {key:28s} = {value!r:28s} # {doc}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[1]
    exp_dir = root / "experiments"
    available = sorted(p.stem for p in exp_dir.glob("*.py") if not p.stem.startswith("_"))
    if args.name not in available:
        print(f"unknown experiment {args.name!r}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    sys.argv = [f"experiments/{args.name}.py", *args.rest]
    runpy.run_module(f"experiments.{args.name}", run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmkv", description="lmkv: a KV-cache layer for LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="SmolLM2 answers questions about a long document, cold vs warm")
    demo.add_argument("--doc-tokens", type=int, default=4000, help="approximate document length in tokens")
    demo.add_argument("--questions", type=int, default=4)
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--redis", metavar="URL", default=None, help="add a Redis tier, e.g. redis://127.0.0.1:6379/0")
    demo.add_argument("--config", default=None, help="lmkv YAML config (default: LMKV_CONFIG or built-in)")
    demo.set_defaults(fn=_cmd_demo)
    info = sub.add_parser("info", help="backends, devices and configuration")
    info.add_argument("--config", default=None)
    info.set_defaults(fn=_cmd_info)
    bench = sub.add_parser("bench", help="run an experiment from experiments/ (lmkv bench bench_paged --small)")
    bench.add_argument("name")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(fn=_cmd_bench)
    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
