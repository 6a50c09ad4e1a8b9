"""The ``lmkv`` command (argparse only; the work lives in ``lmkv.tools``): ``demo``, ``info``, ``bench NAME``, and
the store commands ``ls``, ``inspect``, ``check``, ``clear``, ``warm``, ``stats`` (docs/cli.md).

Exit status: 0 done, 1 the command ran and found a problem (corrupt objects, an unreachable endpoint, a declined
``clear``), 2 a bad argument (one line on stderr naming it).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn


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
    import lmkv.optimized.cuda as cuda_ext
    from lmkv import config as lmkv_config
    from lmkv._dispatch import all_ops

    print(f"lmkv {lmkv.__version__}  torch {torch.__version__}  cuda={torch.cuda.is_available()}")
    print(f"cuda backends: {cuda_ext.describe()}")
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


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``lmkv ls: error: --tier: ...`` and exit status 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _store_command(fn: Callable[..., int]) -> Callable[[argparse.Namespace], int]:
    """Run a store command: a bad argument is a one-line error with exit status 2, a failure one with 1."""

    def run(args: argparse.Namespace) -> int:
        from lmkv.tools import store_admin  # lazily: `lmkv --help` must not wait for torch

        try:
            return fn(args)
        except store_admin.UsageError as exc:
            args.parser.error(str(exc))
        except (store_admin.AdminError, OSError) as exc:
            print(f"{args.parser.prog}: {exc}", file=sys.stderr)
            return 1

    return run


def _with_sources(args: argparse.Namespace, fn: Callable[[list[Any]], int]) -> int:
    from lmkv.tools import store_admin

    sources = store_admin.open_sources(store_admin.load_config(args.config), getattr(args, "tier", None))
    try:
        return fn(sources)
    finally:
        store_admin.close_all(sources)


@_store_command
def _cmd_ls(args: argparse.Namespace) -> int:
    from lmkv.tools import store_admin

    return _with_sources(args, lambda src: store_admin.ls(src, args.model, args.json, sys.stdout))


@_store_command
def _cmd_inspect(args: argparse.Namespace) -> int:
    from lmkv.tools import store_admin

    if os.path.isfile(args.target):  # a file needs no configuration
        return store_admin.inspect([], args.target, sys.stdout)
    return _with_sources(args, lambda src: store_admin.inspect(src, args.target, sys.stdout))


@_store_command
def _cmd_check(args: argparse.Namespace) -> int:
    from lmkv.tools import store_admin

    return _with_sources(args, lambda src: store_admin.check(src, args.repair, sys.stdout))


@_store_command
def _cmd_clear(args: argparse.Namespace) -> int:
    from lmkv.tools import store_admin

    return _with_sources(args, lambda src: store_admin.clear(src, args.model, args.yes, sys.stdout))


@_store_command
def _cmd_stats(args: argparse.Namespace) -> int:
    from lmkv.tools import store_admin

    if args.url is not None:
        return store_admin.endpoint_stats(args.url, sys.stdout)
    return _with_sources(args, lambda src: store_admin.store_stats(src, sys.stdout))


@_store_command
def _cmd_warm(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lmkv.tools.warm import run

    run(args.model, args.paths, config=args.config, blend=args.blend, dtype=args.dtype, max_tokens=args.max_tokens,
        progress=not args.no_progress, out=sys.stdout)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


_CONFIG_HELP = "lmkv YAML config (default: $LMKV_CONFIG, else built-in defaults; LMKV_* overrides apply)"
_TIER_CHOICES = ("memory", "node", "disk", "redis")


def _add(sub: Any, name: str, help: str, example: str, fn: Callable[[argparse.Namespace], int]) -> Any:
    p = sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(fn=fn, parser=p)
    return p


def _add_filters(p: argparse.ArgumentParser, *, model_help: str) -> None:
    """``--tier``, ``--model`` and ``--config``: which objects a listing or a removal covers."""
    p.add_argument("--tier", choices=_TIER_CHOICES, help="only this tier (default: every persistent one)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--config", help=_CONFIG_HELP)


def _add_store_commands(sub: Any) -> None:
    ls = _add(sub, "ls", "list stored objects: model, tokens, bytes, codec, age",
              "lmkv ls --tier disk --model SmolLM2-135M-Instruct-1a2b3c4d5e6f7a8b --json", _cmd_ls)
    _add_filters(ls, model_help="only objects of this model id (as in `lmkv ls` output)")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ins = _add(sub, "inspect", "header fields, fingerprint, checksum status and bits per value of one object",
               "lmkv inspect /var/cache/lmkv/disk/3f/3f9a...e1.obj", _cmd_inspect)
    ins.add_argument("target", metavar="KEY|FILE", help="an object file (disk or node) or a storage key")
    ins.add_argument("--config", help=_CONFIG_HELP)
    chk = _add(sub, "check", "verify every object in node, disk and redis; exit 0 when all are sound",
               "lmkv check --repair", _cmd_check)
    chk.add_argument("--repair", action="store_true", help="remove the corrupt and foreign objects found")
    chk.add_argument("--tier", choices=_TIER_CHOICES, help="only this tier")
    chk.add_argument("--config", help=_CONFIG_HELP)
    clr = _add(sub, "clear", "remove stored objects (asks first unless --yes)",
               "lmkv clear --tier redis --model SmolLM2-135M-Instruct-1a2b3c4d5e6f7a8b --yes", _cmd_clear)
    _add_filters(clr, model_help="only objects of this model id")
    clr.add_argument("--yes", action="store_true", help="do not ask")
    warm = _add(sub, "warm", "store the KV of documents ahead of requests (resumable; progress bar; summary)",
                "lmkv warm --model ~/.cache/lmkv/models/SmolLM2-135M-Instruct docs/ --blend", _cmd_warm)
    warm.add_argument("--model", required=True, metavar="DIR", help="local transformers model directory (offline)")
    warm.add_argument("paths", nargs="+", metavar="FILE|DIR", help="documents, or directories of .txt/.md files")
    warm.add_argument("--blend", action="store_true", help="also store the blend segments (CacheBlend)")
    warm.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                      help="model and KV dtype; must match the serving process (default float32)")
    warm.add_argument("--max-tokens", type=_positive_int, default=None,
                      help="cut each document at this many tokens (default: the model's context length)")
    warm.add_argument("--no-progress", action="store_true", help="no progress bar")
    warm.add_argument("--config", help=_CONFIG_HELP)
    st = _add(sub, "stats", "hit rate, usage per tier and latencies, from a running endpoint or the store",
              "lmkv stats --url http://127.0.0.1:8000/metrics", _cmd_stats)
    st.add_argument("--url", help="Prometheus endpoint of a serving process (default: read the tiers)")
    st.add_argument("--config", help=_CONFIG_HELP)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="lmkv", description="lmkv: a KV-cache layer for LLM inference",
                     epilog="example:\n  lmkv ls --tier disk", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = _add(sub, "demo", "SmolLM2 answers questions about a long document, cold vs warm",
                "lmkv demo --doc-tokens 2000 --questions 2", _cmd_demo)
    demo.add_argument("--doc-tokens", type=int, default=4000, help="approximate document length in tokens")
    demo.add_argument("--questions", type=int, default=4)
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--redis", metavar="URL", default=None, help="add a Redis tier, e.g. redis://127.0.0.1:6379/0")
    demo.add_argument("--config", default=None, help=_CONFIG_HELP)
    info = _add(sub, "info", "backends, devices and configuration", "lmkv info --config lmkv.yaml", _cmd_info)
    info.add_argument("--config", default=None)
    bench = _add(sub, "bench", "run an experiment from experiments/", "lmkv bench bench_paged --small", _cmd_bench)
    bench.add_argument("name")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    _add_store_commands(sub)
    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
