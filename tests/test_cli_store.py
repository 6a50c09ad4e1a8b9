"""``lmkv ls / inspect / check / clear / stats / warm`` (lmkv.cli, lmkv.tools.store_admin, lmkv.tools.warm).

Every command runs in-process through ``lmkv.cli.main`` against real tiers in temporary directories (node and
disk; Redis against a real server started here), filled through a real KVEngine with a tiny geometry and random
KV, so the expected keys, token counts and byte sizes are known exactly. ``warm`` runs a tiny random LLaMA saved
with a byte-level tokenizer to a temporary directory (nothing is downloaded).
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkv.cli import main
from lmkv.engine import KVEngine
from lmkv.storage.disk import object_path
from lmkv.storage.node import NodeTier
from lmkv.storage.objects import ObjectHeader, dtype_code
from lmkv.testing import LocalRedis, free_port, server_binary
from lmkv.tools.store_admin import parse_metrics
from lmkv.types import KVGeometry

GEOM = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)
CHUNK = 16
MODEL_A, MODEL_B = "org/model-a", "model-b"
# (model id, tokens, seed): A -> chunks of 16, 16, 8 tokens; B -> 16, 4
SPECS = [(MODEL_A, 40, 1), (MODEL_B, 20, 2)]


@dataclass
class Obj:
    key: str
    model: str
    tokens: int
    nbytes: int
    fingerprint: bytes


def write_config(root: Path, *, node: bool = True, disk: bool = True, redis_url: str | None = None,
                 chunk: int = CHUNK) -> Path:
    cfg = {"chunk_size": chunk, "memory": {"enabled": False},
           "node": {"enabled": node, "path": str(root / "node"), "capacity": "64MiB"},
           "disk": {"enabled": disk, "path": str(root / "disk"), "capacity": "64MiB", "io_threads": 1},
           "redis": {"enabled": redis_url is not None, "url": redis_url or "redis://127.0.0.1:1/0",
                     "key_prefix": "t:", "socket_timeout": 2.0}}
    path = root / "lmkv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def populate(cfg: Path, specs=SPECS) -> list[Obj]:
    """Store random KV for each spec through a KVEngine; the objects every enabled tier then holds."""
    out = []
    for model_id, n, seed in specs:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 1000, (n,), generator=g).tolist()
        kv = torch.randn(GEOM.chunk_shape(n), generator=g).to(GEOM.dtype)
        with KVEngine(str(cfg), GEOM, model_id=model_id) as eng:
            eng.store(tokens, kv)
            plan = eng.plan(tokens)
            for (s, e), key, fp in zip(plan.spans, plan.keys, plan.fingerprints):
                shape = GEOM.chunk_shape(e - s)
                total = ObjectHeader(key, fp, dtype_code(GEOM.dtype), shape, 1, 128 * (e - s)).total_len
                out.append(Obj(key, model_id, e - s, total, fp))
    return out


def run(*argv: str) -> tuple[int, str]:
    """``lmkv ARGV`` in-process: (exit status, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    return rc, buf.getvalue()


def ls_json(cfg: Path, *extra: str) -> list[dict]:
    rc, out = run("ls", "--config", str(cfg), "--json", *extra)
    assert rc == 0
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    root = tmp_path_factory.mktemp("filled")
    cfg = write_config(root)
    return cfg, populate(cfg)


# -- ls ------------------------------------------------------------------------------------------------------------
@given(tier=st.sampled_from([None, "node", "disk"]), model=st.sampled_from([None, MODEL_A, MODEL_B, "other"]))
@settings(max_examples=12)
def test_ls_lists_exactly_what_was_stored(filled, tier, model):
    cfg, objs = filled
    extra = (["--tier", tier] if tier else []) + (["--model", model] if model else [])
    got = {(r["tier"], r["key"], r["model"], r["tokens"], r["bytes"], r["codec"], r["dtype"], r["status"])
           for r in ls_json(cfg, *extra)}
    want = {(t, o.key, o.model, o.tokens, o.nbytes, "raw", "f16", "ok") for t in ([tier] if tier else ["node", "disk"])
            for o in objs if model in (None, o.model)}
    assert got == want


def test_ls_table_and_shape(filled):
    cfg, objs = filled
    rows = ls_json(cfg, "--tier", "disk", "--model", MODEL_A)
    assert sorted(r["shape"][2] for r in rows) == [8, 16, 16]
    assert all(r["shape"] == [2, 2, r["tokens"], 2, 8] and 0 <= r["age_s"] < 600 for r in rows)
    rc, out = run("ls", "--config", str(cfg))
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:6] == ["TIER", "MODEL", "TOKENS", "BYTES", "CODEC", "AGE"]
    total = 2 * sum(o.nbytes for o in objs)
    assert lines[-1].startswith(f"10 objects, {2 * 60} tokens, {total / 1024:.1f} KiB")


def test_tier_scan_methods_flush_and_list_their_objects(tmp_path):
    from lmkv.storage.disk import DiskTier
    from lmkv.storage.serde import RawSerde

    kv = torch.ones(GEOM.chunk_shape(4), dtype=GEOM.dtype)
    total = RawSerde().header("k1", tuple(kv.shape), kv.dtype, b"fp").total_len
    for tier in (DiskTier(tmp_path / "d", 1 << 20), NodeTier(tmp_path / "n", 1 << 20)):
        with contextlib.closing(tier):
            tier.put("k1", RawSerde().encode("k1", kv, b"fp"))  # pending: scan flushes first
            got = [(e.key, e.status, e.nbytes, e.header.shape) for e in tier.scan(verify=True)]
            assert got == [("k1", "ok", total, tuple(kv.shape))]


# -- inspect -------------------------------------------------------------------------------------------------------
def _flip(path: str, offset_from_end: int = 1) -> None:
    with open(path, "r+b") as fh:
        fh.seek(-offset_from_end, 2)
        b = fh.read(1)
        fh.seek(-offset_from_end, 2)
        fh.write(bytes([b[0] ^ 0xFF]))


def _field(out: str, name: str) -> str:
    return next(line.split(None, 1)[1] for line in out.splitlines() if line.split(None, 1)[0] == name)


def test_inspect_verifies_then_reports_a_flipped_payload_byte(tmp_path):
    cfg = write_config(tmp_path)
    obj = populate(cfg, [(MODEL_A, 40, 3)])[0]
    path = object_path(tmp_path / "disk", obj.key)
    rc, out = run("inspect", path)
    assert rc == 0
    assert _field(out, "key") == obj.key and _field(out, "model") == MODEL_A
    assert _field(out, "fingerprint") == obj.fingerprint.hex()
    assert _field(out, "checksum_ok") == "verifies"
    assert _field(out, "tokens") == "16" and _field(out, "values") == str(2 * 2 * 16 * 2 * 8)
    assert float(_field(out, "bits_per_value")) == 16.0 and _field(out, "codec") == "raw"
    rc, out = run("inspect", obj.key, "--config", str(cfg))  # by key: the first tier that holds it (node)
    assert rc == 0 and _field(out, "object").startswith("node ")
    _flip(path)
    rc, out = run("inspect", path)
    assert rc == 1 and _field(out, "checksum_ok").startswith("MISMATCH")


# -- check ---------------------------------------------------------------------------------------------------------
def _bad_lines(out: str) -> set[tuple[str, str, str]]:
    return {tuple(line.split()[:3]) for line in out.splitlines() if line.split()[1:2] in (["corrupt"], ["foreign"])}


def test_check_finds_corrupt_and_foreign_and_repair_removes_exactly_those(tmp_path):
    cfg = write_config(tmp_path)
    k0, k1, k2 = populate(cfg, [(MODEL_A, 40, 4)])
    disk = {o.key: object_path(tmp_path / "disk", o.key) for o in (k0, k1, k2)}
    node = {o.key: str(tmp_path / "node" / "objects" / (NodeTier.fname_for(o.key) + ".obj")) for o in (k0, k1, k2)}
    _flip(disk[k0.key])
    _flip(node[k0.key], 7)
    shutil.copyfile(disk[k1.key], disk[k2.key])  # another key's object under k2's name
    shutil.copyfile(node[k1.key], node[k2.key])  # in place: the index entry still names this inode
    rc, out = run("check", "--config", str(cfg))
    want = {("node", "corrupt", node[k0.key]), ("node", "foreign", node[k2.key]),
            ("disk", "corrupt", disk[k0.key]), ("disk", "foreign", disk[k2.key])}
    assert rc == 1 and _bad_lines(out) == want
    assert out.splitlines()[-1] == "checked 6 objects in node, disk: 4 bad"
    rc, out = run("check", "--repair", "--config", str(cfg))
    removed = {tuple(line.split()[:3:2]) for line in out.splitlines() if line.split()[1:2] == ["removed"]}
    assert rc == 1 and removed == {(t, p) for t, _, p in want}
    rc, out = run("check", "--config", str(cfg))
    assert rc == 0 and out.splitlines()[-1] == "checked 2 objects in node, disk: all sound"
    assert {(r["tier"], r["key"]) for r in ls_json(cfg)} == {("node", k1.key), ("disk", k1.key)}


# -- clear ---------------------------------------------------------------------------------------------------------
def test_clear_asks_and_a_no_removes_nothing(tmp_path, monkeypatch):
    cfg = write_config(tmp_path)
    objs = populate(cfg)
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    rc, out = run("clear", "--config", str(cfg), "--model", MODEL_B)
    size = 2 * sum(o.nbytes for o in objs if o.model == MODEL_B) / (1 << 20)
    assert rc == 1 and f"remove 4 objects ({size:.1f} MiB) from node, disk (model {MODEL_B})? [y/N]" in out
    assert "nothing removed" in out and len(ls_json(cfg)) == 2 * len(objs)


@given(tier=st.sampled_from([None, "node", "disk"]), model=st.sampled_from([MODEL_A, MODEL_B]))
@settings(max_examples=6)
def test_clear_yes_removes_exactly_the_models_objects(tier, model):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_config(Path(tmp))
        objs = populate(cfg)
        rc, out = run("clear", "--config", str(cfg), "--model", model, "--yes", *(["--tier", tier] if tier else []))
        tiers = [tier] if tier else ["node", "disk"]
        gone = {(t, o.key) for t in tiers for o in objs if o.model == model}
        printed = {tuple(line.split()[1:3]) for line in out.splitlines() if line.startswith("removed ")
                   and " of " not in line}
        assert rc == 0 and printed == gone
        left = {(r["tier"], r["key"]) for r in ls_json(cfg)}
        assert left == {(t, o.key) for t in ("node", "disk") for o in objs} - gone


# -- bad arguments and help ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, names", [
    (["ls", "--tier", "memory"], "--tier memory"),
    (["ls", "--tier", "bogus"], "--tier"),
    (["ls", "--tier", "redis"], "--tier redis"),
    (["check", "--config", "/nonexistent/lmkv.yaml"], "--config"),
    (["inspect", "not-a-key"], "KEY|FILE"),
    (["stats", "--url", "ftp://example/metrics"], "--url"),
    (["warm", "--model", "/nonexistent", "x.txt"], "FILE|DIR"),
    (["warm", "--max-tokens", "0", "--model", "/x", "x.txt"], "--max-tokens"),
    (["clear", "--frobnicate"], "--frobnicate"),
])
def test_bad_arguments_exit_2_with_one_line_naming_the_argument(filled, capsys, argv, names):
    cfg, _ = filled
    if "--config" not in argv and argv[0] not in ("warm", "stats", "clear"):
        argv = [*argv, "--config", str(cfg)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and names in err
    if argv[:3] == ["ls", "--tier", "memory"]:
        assert "serving process" in err


@pytest.mark.parametrize("cmd", ["ls", "inspect", "check", "clear", "warm", "stats", "demo", "info", "bench"])
def test_every_command_has_help_with_an_example(capsys, cmd):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "example:" in out and f"\n  lmkv {cmd} " in out


# -- stats ---------------------------------------------------------------------------------------------------------
EXPOSITION = """\
# HELP lmkv_lookup_tokens_total Tokens looked up.
# TYPE lmkv_lookup_tokens_total counter
lmkv_lookup_tokens_total{model="m1"} 400.0
# HELP lmkv_hit_tokens_total Tokens found stored.
# TYPE lmkv_hit_tokens_total counter
lmkv_hit_tokens_total{model="m1"} 300.0
# HELP lmkv_tier_usage_bytes Bytes held.
# TYPE lmkv_tier_usage_bytes gauge
lmkv_tier_usage_bytes{model="m1",tier="memory"} 1048576.0
lmkv_tier_usage_bytes{model="m1",tier="disk"} 2097152.0
# HELP lmkv_tier_capacity_bytes Capacity.
# TYPE lmkv_tier_capacity_bytes gauge
lmkv_tier_capacity_bytes{model="m1",tier="memory"} 4194304.0
lmkv_tier_capacity_bytes{model="m1",tier="disk"} 8388608.0
# HELP lmkv_lookup_seconds Lookup latency.
# TYPE lmkv_lookup_seconds histogram
lmkv_lookup_seconds_bucket{model="m1",le="0.001"} 2.0
lmkv_lookup_seconds_bucket{model="m1",le="0.01"} 4.0
lmkv_lookup_seconds_bucket{model="m1",le="+Inf"} 4.0
lmkv_lookup_seconds_sum{model="m1"} 0.008
lmkv_lookup_seconds_count{model="m1"} 4.0
# HELP lmkv_store_seconds Store latency.
# TYPE lmkv_store_seconds histogram
lmkv_store_seconds_bucket{model="m1",le="0.1"} 1.0
lmkv_store_seconds_bucket{model="m1",le="+Inf"} 2.0
lmkv_store_seconds_sum{model="m1"} 0.5
lmkv_store_seconds_count{model="m1"} 2.0
"""


@pytest.fixture()
def metrics_url():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = EXPOSITION.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_parse_metrics_exact():
    parsed = parse_metrics(EXPOSITION)
    m = parsed["models"]["m1"]
    assert (m["hit"], m["lookup"]) == (300.0, 400.0)
    assert parsed["tiers"][("m1", "disk")] == {"usage": 2097152.0, "capacity": 8388608.0}
    lookup = m["latency"]["lmkv_lookup_seconds"]
    assert lookup.mean() == pytest.approx(0.002) and lookup.quantile(0.5) == 0.001 and lookup.quantile(0.99) == 0.01
    assert m["latency"]["lmkv_store_seconds"].quantile(0.99) == float("inf")


def test_stats_from_an_endpoint(metrics_url):
    rc, out = run("stats", "--url", metrics_url)
    lines = [line.split() for line in out.splitlines()]
    assert rc == 0
    assert ["m1", "400", "300", "75.0%"] in lines
    assert ["m1", "disk", "2.0", "MiB", "8.0", "MiB"] in lines
    assert ["m1", "lookup", "4", "2.00", "10.00"] in lines
    assert ["m1", "store", "2", "250.00", "inf"] in lines


def test_stats_unreachable_endpoint_is_one_line_and_exit_1(capsys):
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    rc = main(["stats", "--url", f"http://127.0.0.1:{port}/metrics"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "cannot read metrics" in err
    assert time.monotonic() - t0 < 6


def test_stats_from_the_store(filled):
    cfg, objs = filled
    rc, out = run("stats", "--config", str(cfg))
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rc == 0 and rows["node"][1:3] == [str(len(objs)), "60"] and rows["disk"][1:3] == [str(len(objs)), "60"]
    assert rows["disk"][3:7] == [f"{sum(o.nbytes for o in objs) / 1024:.1f}", "KiB", "64.0", "MiB"]
    assert rows["node"][3:5] == [f"{4096 * len(objs) / 1024:.1f}", "KiB"]  # tmpfs pages charged


# -- Redis ---------------------------------------------------------------------------------------------------------
@pytest.fixture()
def redis_server():
    kind = "redis" if server_binary("redis") else "valkey"
    if server_binary(kind) is None:
        pytest.skip("no redis-server or valkey-server binary")
    srv = LocalRedis(server=kind).start()
    yield srv
    srv.cleanup()


@pytest.mark.redis
def test_redis_ls_check_repair_clear(tmp_path, redis_server):
    import redis

    cfg = write_config(tmp_path, node=False, disk=False, redis_url=redis_server.url)
    objs = populate(cfg)
    rows = ls_json(cfg, "--tier", "redis")
    assert {(r["key"], r["model"], r["tokens"], r["bytes"]) for r in rows} == \
        {(o.key, o.model, o.tokens, o.nbytes) for o in objs}
    client = redis.Redis.from_url(redis_server.url)
    k0, k1, k2 = objs[0].key, objs[1].key, objs[2].key
    last = client.getrange("t:" + k0, -1, -1)
    client.setrange("t:" + k0, objs[0].nbytes - 1, bytes([last[0] ^ 0xFF]))  # a flipped payload byte
    client.set("t:" + k2, client.get("t:" + k1))
    client.set("other:" + k1, b"not ours")  # outside the key prefix: never touched
    rc, out = run("check", "--config", str(cfg))
    assert rc == 1 and _bad_lines(out) == {("redis", "corrupt", "t:" + k0), ("redis", "foreign", "t:" + k2)}
    rc, out = run("check", "--repair", "--config", str(cfg))
    assert rc == 1 and sum(" removed " in line for line in out.splitlines()) == 2
    rc, out = run("check", "--config", str(cfg))
    assert rc == 0 and out.splitlines()[-1] == f"checked {len(objs) - 2} objects in redis: all sound"
    rc, out = run("clear", "--config", str(cfg), "--model", MODEL_B, "--yes")
    assert rc == 0 and {r["key"] for r in ls_json(cfg)} == {k1}
    assert client.get("other:" + k1) == b"not ours"
    client.close()


# -- warm ----------------------------------------------------------------------------------------------------------
SEP = " # # "


def _byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per UTF-8 byte (ids 0-255), eos 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from lmkv.tools.models import tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0, vocab_size=320, eos_token_id=256).save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path


def _docs(root: Path) -> Path:
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("The harbour town keeps a blue flag." + SEP + "Its mayor breeds goats." + SEP + "End.")
    (docs / "b.md").write_text("# Notes\n\nRiver Vale grows pears and sells them on Fridays at the old market. " * 2)
    (docs / "sub" / "c.txt").write_text("A third document, about owls" + SEP + "and the moon.")
    (docs / "skip.json").write_text("{}")  # not a document
    return docs


def test_warm_stores_what_lookup_then_hits_and_resumes(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmkv.adapters.hf.blend import chunk_spans, separator_ids
    from lmkv.hf import generate

    cfg = write_config(tmp_path, node=False, chunk=32)
    docs = _docs(tmp_path)
    rc, out = run("warm", "--model", str(tiny_dir), str(docs), "--config", str(cfg), "--blend", "--no-progress")
    table = dict(line.rsplit(None, 1) for line in out.splitlines())
    tok = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, local_files_only=True).eval()
    texts = [(docs / n).read_text() for n in ("a.txt", "b.md", "sub/c.txt")]
    ids = [tok(t)["input_ids"] for t in texts]
    with KVEngine.for_model(model, str(cfg)) as eng:
        segs = [chunk_spans(t, separator_ids(eng, tok), eng) for t in ids]
        n_chunks = sum(-(-len(t) // 32) for t in ids)
        assert rc == 0 and table["documents"] == "3" and table["skipped"] == "0"
        assert table["tokens"] == str(sum(map(len, ids))) and table["chunks stored"] == str(n_chunks)
        assert table["segments stored"] == str(sum(map(len, segs))) == "3"
        assert [eng.lookup(t) for t in ids] == [len(t) for t in ids]
        assert all(eng.storage.contains_many([s.key for seg in segs for s in seg]))
        assert len(ls_json(cfg)) == n_chunks + 3
        hit = generate(model, torch.tensor([ids[1]]), engine=eng, max_new_tokens=1, pad_token_id=256)
        assert hit.stats.hit_tokens == len(ids[1]) - 1
    rc, out = run("warm", "--model", str(tiny_dir), str(docs), "--config", str(cfg), "--blend", "--no-progress")
    table = dict(line.rsplit(None, 1) for line in out.splitlines())
    assert rc == 0 and table["skipped"] == "3" and table["chunks stored"] == "0" and table["tokens"] == "0"
