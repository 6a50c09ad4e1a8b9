"""CacheGen KV codec, reference implementation: quantize, build probability tables, range-code.

The chunk ``x`` is ``[L, 2, T, H, D]`` (layers, K/V plane, tokens, KV heads, head dim) or, for MLA, ``[L, 1, T, D]``
(treated as ``H = 1``). Write ``P`` for the planes (2 or 1) and ``C = H * D`` for the channels of one plane.

0. **Exact leading tokens.** The first ``E = min(exact_leading_tokens, T - 1)`` tokens are stored as they are, in
   the chunk's dtype, and steps 1-4 see only the other ``Q = T - E`` tokens. Token 0 of a sequence is the
   attention sink: every later token attends to it, so its quantization error costs far more than its share.

1. **Quantize** (CacheGen: per token vector). For every (layer l, plane p, token t) the scale is the absolute
   maximum over the ``C`` channels, rounded *up* to bfloat16 so that ``|x| <= scale`` still holds::

       scale[l, p, t] = round_up_bf16(max_c |x[l, p, t, c]|)          (per token: CacheGen)
       scale[l, p, c] = round_up_bf16(max_t |x[l, p, t, c]|)          (per channel, an lmkv option per plane)
       K = (bins(l, p) - 1) // 2                       levels on each side of zero
       q = clamp(round_half_even(x / scale * K), -K, K)    (q = 0 where scale = 0)
       symbol = q + K                                  in [0, 2K], an alphabet of n = 2K + 1 symbols

   ``bins(l, p)`` comes from :class:`lmkv.config.CodecConfig`: a layer counts as early for plane p when
   ``l < round(early_fraction_p * L)`` (CacheGen: keys 32 bins in layers 0-9, 16 after; values 32 bins in
   layers 0-1, 16 after, for 32 layers). Per-channel scales (``CodecConfig.key_scale_axis``) suit keys, whose
   outlier channels keep their magnitude over the tokens (KIVI's observation).
   Dequantization is ``x_hat = (symbol - K) * (scale / K)`` in float32,
   cast to the chunk's dtype, so ``|x - x_hat| <= scale / (2K)`` plus that cast's rounding.

2. **Streams.** Symbols are regrouped as ``S = L * P * C`` streams of ``T`` symbols, stream ``(l, p, c)`` holding
   channel c of plane (l, p) over the tokens: ``streams[S, T] = symbols.permute(l, p, c, t)``.

3. **Tables.** :func:`cdf` counts each stream's symbols and turns them into a 16-bit cumulative table
   (``reference.codec_rangecoder.normalize_counts``): CacheGen's per-stream table, which costs ~40 % of the
   payload at 256 tokens. lmkv instead shares ``G`` tables among the ``C`` streams of a plane
   (:func:`group_tables`: a few Lloyd iterations that assign each stream to the table that codes it in the
   fewest bits); a stream then costs one byte of table id and the tables amortise over ``C / G`` streams.

4. **Range coding.** :func:`ac_encode` codes every stream independently with its table
   (``reference.codec_rangecoder``: 32-bit range coder, 16-bit tables); :func:`ac_decode` inverts it.

5. **Blob.** ``reference.codec_format`` lays out header, bins, scales, tables, ids, lengths, payload, CRC.

Steps 0-3 and 5 have this one implementation (:func:`encode_with` / :func:`decode_with`, which take the coder as
an argument); only step 4 has a second, optimized backend (``lmkv.ops.codec.ac_encode`` dispatches it).

Invariants: ``ac_decode(ac_encode(s)) == s`` exactly; every coder backend produces the same bytes;
``decode(encode(x))`` has the shape and dtype of ``x`` and is within one half quantization step of it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lmkv.config import CodecConfig
from lmkv.errors import CodecError
from lmkv.reference import codec_format as fmt
from lmkv.reference.codec_rangecoder import decode_stream, encode_stream, freq_to_cdf, normalize_counts

Coder = Callable[[torch.Tensor, torch.Tensor], tuple[bytes, torch.Tensor]]
Decoder = Callable[[bytes, torch.Tensor, torch.Tensor, int], torch.Tensor]

LLOYD_ITERATIONS = 6


# ---------------------------------------------------------------------------------------------------- shapes
def as_planes(chunk: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``[L, P, T, H, D]`` (P = 2, or 1 for a single plane) as is, MLA ``[L, 1, T, D]`` as ``[L, 1, T, 1, D]``.

    Returns (view, is_mla).
    """
    if chunk.dim() == 5 and chunk.shape[1] in (1, 2):
        return chunk, False
    if chunk.dim() == 4 and chunk.shape[1] == 1:
        return chunk.unsqueeze(3), True
    raise ValueError(
        f"chunk: expected [L, 2, T, H, D] (or MLA [L, 1, T, D]), got shape {tuple(chunk.shape)}"
    )


def resolve_bins(config: CodecConfig | None, num_layers: int, planes: int) -> torch.Tensor:
    """Bins per (layer, plane) ``[L, P]`` int64: early layers get the early bins (MLA uses the key bins)."""
    config = config or CodecConfig()
    out = torch.empty(num_layers, planes, dtype=torch.int64)
    rules = [(config.key_bins_early, config.key_bins_late, config.key_early_fraction),
             (config.value_bins_early, config.value_bins_late, config.value_early_fraction)]
    for p in range(planes):
        early, late, fraction = rules[p]
        boundary = int(fraction * num_layers + 0.5)
        out[:, p] = torch.where(torch.arange(num_layers) < boundary, early, late)
    # The blob stores bins as one byte per (layer, plane), and the alphabet must fit uint8 symbols.
    if int(out.min()) < 3 or int(out.max()) > 255:
        raise ValueError(f"config: every bins value must be in [3, 255], got {out.unique().tolist()}")
    return out


def round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= x (x >= 0, finite), so that |values| <= scale after rounding."""
    y = x.to(torch.bfloat16)
    below = y.float() < x
    bits = y.view(torch.int16)
    return torch.where(below, bits + 1, bits).view(torch.bfloat16)


# ---------------------------------------------------------------------------------------------------- quantize
def quantize(chunk: torch.Tensor, config: CodecConfig | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """chunk ``[L, 2, T, H, D]`` (or ``[L, 1, T, D]``) -> (symbols uint8 of the same shape, scales).

    ``scales[p]`` is bfloat16, ``[L, T, 1, 1]`` when plane p is scaled per token or ``[L, 1, H, D]`` per channel
    (broadcastable against the plane ``[L, T, H, D]``). See the module docstring, step 1. Raises ValueError on
    NaN/inf.
    """
    config = config or CodecConfig()
    x, _ = as_planes(chunk)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("chunk: contains NaN or inf; the codec quantizes finite values only")
    L, P = x.shape[:2]
    levels = ((resolve_bins(config, L, P) - 1) // 2).to(torch.float32)  # K per (l, p)
    symbols = torch.empty(x.shape, dtype=torch.uint8)
    scales = []
    for p in range(P):
        xp = x[:, p].to(torch.float32)
        per_channel = channel_scaled(config, p)
        scale = round_up_bf16(xp.abs().amax(dim=1 if per_channel else (2, 3), keepdim=True))
        k = levels[:, p, None, None, None]
        s = scale.float()
        q = torch.where(s > 0, torch.round(xp / torch.where(s > 0, s, 1.0) * k), 0.0)
        q = torch.minimum(torch.maximum(q, -k), k)
        symbols[:, p] = (q + k).to(torch.uint8)
        scales.append(scale)
    return symbols.reshape(chunk.shape), tuple(scales)


def channel_scaled(config: CodecConfig, plane: int) -> bool:
    """True when ``plane`` (0: keys or the MLA latent, 1: values) is scaled per channel rather than per token."""
    return (config.key_scale_axis if plane == 0 else config.value_scale_axis) == "channel"


def dequantize(symbols: torch.Tensor, scales: tuple[torch.Tensor, ...], bins: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``x_hat = (symbol - K) * (scale / K)`` in float32, cast to ``dtype``.

    symbols ``[L, 2, T, H, D]`` (or ``[L, 1, T, D]``) uint8, scales as :func:`quantize` returns, bins ``[L, P]``.
    """
    sym, _ = as_planes(symbols)
    levels = ((bins.to(torch.int64) - 1) // 2).to(torch.float32)
    out = torch.empty(sym.shape, dtype=dtype, device=sym.device)
    for p in range(sym.shape[1]):
        k = levels[:, p, None, None, None]
        out[:, p] = ((sym[:, p].to(torch.float32) - k) * (scales[p].float() / k)).to(dtype)
    return out.reshape(symbols.shape)


def to_streams(symbols: torch.Tensor) -> torch.Tensor:
    """Symbols ``[L, P, T, H, D]`` -> streams ``[L * P * H * D, T]`` (stream (l, p, c) over the tokens)."""
    sym, _ = as_planes(symbols)
    L, P, T, H, D = sym.shape
    return sym.reshape(L, P, T, H * D).permute(0, 1, 3, 2).reshape(L * P * H * D, T).contiguous()


def from_streams(streams: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_streams` for a chunk of ``shape``."""
    L, P, T = shape[0], shape[1], shape[2]
    C = int(np.prod(shape[3:]))
    return streams.reshape(L, P, C, T).permute(0, 1, 3, 2).reshape(shape).contiguous()


# ---------------------------------------------------------------------------------------------------- tables
def counts(streams: torch.Tensor, nbins: int) -> torch.Tensor:
    """Symbol histogram of each stream: ``[S, T]`` -> ``[S, nbins]`` int64."""
    S = streams.shape[0]
    idx = torch.arange(S, dtype=torch.int64)[:, None] * nbins + streams.to(torch.int64)
    return torch.bincount(idx.reshape(-1), minlength=S * nbins).reshape(S, nbins)


def cdf(symbols: torch.Tensor, nbins: int) -> torch.Tensor:
    """Per-stream 16-bit cumulative tables: symbols ``[S, T]`` (values < nbins) -> ``[S, nbins + 1]`` int32.

    ``cdf[s, 0] = 0``, ``cdf[s, nbins] = 2**16``, and every symbol that occurs in row s has a non-zero
    frequency ``cdf[s, k+1] - cdf[s, k]`` (see ``codec_rangecoder.normalize_counts``).
    """
    return freq_to_cdf(normalize_counts(counts(symbols, nbins)))


def group_tables(stream_counts: torch.Tensor, groups: int,
                 iterations: int = LLOYD_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Share ``groups`` tables among the ``C`` streams of each plane.

    stream_counts ``[N, C, n]`` (N planes) -> (summed counts ``[N, G, n]`` int64, table id ``[N, C]`` int64).
    Start from ``G`` quantiles of each stream's spread, then alternate: tables = summed counts of their
    streams; each stream moves to the table with the smallest cross-entropy ``-sum_k count_k log q_k``
    (``q`` smoothed so every table can take every stream). The final tables are exact sums, so every symbol of a
    stream has a non-zero count in its table. Deterministic: ties go to the lower id.
    """
    N, C, n = stream_counts.shape
    G = max(1, min(groups, C))
    cf = stream_counts.to(torch.float64)
    k = torch.arange(n, dtype=torch.float64)
    total = cf.sum(-1).clamp_min(1)
    mean = (cf * k).sum(-1) / total
    spread = ((cf * (k - mean[..., None]) ** 2).sum(-1) / total).sqrt() * n + mean  # spread first, then mean
    order = spread.argsort(dim=1, stable=True)
    ids = torch.empty(N, C, dtype=torch.int64)
    ids.scatter_(1, order, (torch.arange(C)[None, :] * G // C).expand(N, C))
    for _ in range(iterations):
        tab = torch.zeros(N, G, n, dtype=torch.float64).scatter_add_(1, ids[..., None].expand(N, C, n), cf)
        q = (tab + 0.01) / (tab + 0.01).sum(-1, keepdim=True)
        cost = -(cf @ q.log().transpose(1, 2))  # [N, C, G]
        new = cost.argmin(-1)
        if torch.equal(new, ids):
            break
        ids = new
    tab = torch.zeros(N, G, n, dtype=torch.int64).scatter_add_(
        1, ids[..., None].expand(N, C, n), stream_counts.to(torch.int64))
    return tab, ids


# ---------------------------------------------------------------------------------------------------- coder
def ac_encode(symbols: torch.Tensor, cdf: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """Range-code every row: symbols ``[S, T]`` uint8, cdf ``[S, n + 1]`` -> (concatenated streams, lengths [S]).

    Stream s is ``codec_rangecoder.encode_stream(symbols[s], cdf[s])``; ``lengths[s]`` is its byte length.
    """
    sym = symbols.tolist()
    tables = cdf.tolist()
    parts = [encode_stream(row, table) for row, table in zip(sym, tables, strict=True)]
    return b"".join(parts), torch.tensor([len(p) for p in parts], dtype=torch.int64)


def ac_decode(data: bytes, lengths: torch.Tensor, cdf: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Inverse of :func:`ac_encode`: -> symbols ``[S, num_tokens]`` uint8."""
    tables = cdf.tolist()
    offsets = [0, *torch.cumsum(lengths, 0).tolist()]
    rows = [decode_stream(data[offsets[s] : offsets[s + 1]], tables[s], num_tokens) for s in range(len(tables))]
    return torch.tensor(rows, dtype=torch.uint8).reshape(len(tables), num_tokens)


# ---------------------------------------------------------------------------------------------------- blob
def build_blob(chunk: torch.Tensor, config: CodecConfig | None, coder: Coder) -> fmt.Blob:
    """Quantize, tabulate and code ``chunk`` with ``coder`` (any backend's ac_encode); returns the parts."""
    config = config or CodecConfig()
    x, mla = as_planes(chunk)
    L, P, T, H, D = x.shape
    C = H * D
    bins = resolve_bins(config, L, P)
    # The first E tokens travel as they are (at least one token is always quantized, so every stream is
    # non-empty); the rest is quantized and coded as a chunk of Q = T - E tokens.
    E = min(int(config.exact_leading_tokens), T - 1)
    if not bool(torch.isfinite(x).all()):  # checked before the split: an exact token must be finite too
        raise ValueError("chunk: contains NaN or inf; the codec quantizes finite values only")
    exact = x[:, :, :E].contiguous().view(torch.uint8).numpy().tobytes() if E else b""
    symbols, scales = quantize(x[:, :, E:].reshape(L, P, T - E, H, D), config)
    streams = to_streams(symbols)
    nsym = fmt.alphabet(bins).reshape(-1)  # [L*P]
    nmax = int(nsym.max())
    plane_counts = counts(streams, nmax).reshape(L * P, C, nmax)
    groups = config.table_groups if config.table_groups < C else 0
    if groups:
        tab_counts, ids = group_tables(plane_counts, groups)
        n_tab = tab_counts.shape[1]
        if n_tab < groups:  # fewer streams than groups never happens here (groups < C), kept for clarity
            groups = n_tab
        freqs = [normalize_counts(tab_counts[i, :, : int(nsym[i])]) for i in range(L * P)]
        stream_freq = torch.stack([torch.nn.functional.pad(f, (0, nmax - f.shape[1])) for f in freqs])
        stream_freq = stream_freq.gather(1, ids[..., None].expand(L * P, C, nmax))
        ids_np = ids.reshape(L, P, C).numpy().astype(np.uint8)
    else:
        freqs = [normalize_counts(plane_counts[i, :, : int(nsym[i])]) for i in range(L * P)]
        stream_freq = torch.stack([torch.nn.functional.pad(f, (0, nmax - f.shape[1])) for f in freqs])
        ids_np = None
    stream_cdf = freq_to_cdf(stream_freq.reshape(L * P * C, nmax))
    payload, lengths = coder(streams, stream_cdf)
    return fmt.Blob(
        mla=mla, dtype=chunk.dtype, L=L, P=P, T=T, H=H, D=D, groups=groups,
        bins=bins.numpy().astype(np.uint8), channel_scaled=tuple(channel_scaled(config, p) for p in range(P)),
        scales=[s.reshape(L, -1).view(torch.int16).numpy().view(np.uint16) for s in scales],
        tables=[f.numpy().astype(np.uint16) for f in freqs], ids=ids_np,
        lengths=lengths.numpy().astype(np.int64), payload=payload, exact_tokens=E, exact=exact,
    )


def encode_with(chunk: torch.Tensor, config: CodecConfig | None, coder: Coder) -> bytes:
    """The blob pipeline: chunk ``[L, 2, T, H, D]`` or ``[L, 1, T, D]`` -> blob bytes, coding the streams with
    ``coder`` (the reference :func:`ac_encode` or any backend of ``lmkv.ops.codec.ac_encode``)."""
    return fmt.pack(build_blob(chunk, config, coder))


def stream_tables(blob: fmt.Blob) -> torch.Tensor:
    """The cumulative table of every stream ``[S, nmax + 1]`` int32, from a parsed blob."""
    nmax = max(t.shape[1] for t in blob.tables)
    padded = [np.pad(t.astype(np.int64), ((0, 0), (0, nmax - t.shape[1]))) for t in blob.tables]
    tab = torch.from_numpy(np.stack(padded))  # [L*P, G or C, nmax]
    if blob.groups:
        assert blob.ids is not None
        ids = torch.from_numpy(blob.ids.astype(np.int64)).reshape(blob.L * blob.P, blob.C)
        tab = tab.gather(1, ids[..., None].expand(-1, -1, nmax))
    return freq_to_cdf(tab.reshape(-1, nmax))


def decode_with(blob: bytes | bytearray | memoryview, decoder: Decoder,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse of :func:`encode_with`, decoding the streams with ``decoder`` (any backend's ac_decode): blob ->
    chunk of the encoded shape and dtype on ``device``. The blob is parsed and checked on the host (CodecError on
    any bad blob) before the decoder runs; the decoder gets the tables on ``device`` and everything after it
    (dequantization, the exact head) runs there."""
    parsed = fmt.unpack(blob)
    E, Q = parsed.exact_tokens, parsed.T - parsed.exact_tokens
    shape = (parsed.L, parsed.P, Q, parsed.H, parsed.D)
    tables = stream_tables(parsed).to(device)
    streams = decoder(parsed.payload, torch.from_numpy(parsed.lengths), tables, Q)
    symbols = from_streams(streams.to(device), shape)
    bins = torch.from_numpy(parsed.bins.astype(np.int64))
    nsym = fmt.alphabet(bins)[:, :, None, None, None].to(device)
    if bool((symbols.to(torch.int64) >= nsym).any()):  # only a forged blob with a valid CRC gets here
        raise CodecError("bad CacheGen blob: decoded symbol outside its alphabet")
    scales = tuple(
        torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).reshape(
            (parsed.L, 1, parsed.H, parsed.D) if per_channel else (parsed.L, Q, 1, 1)).to(device)
        for a, per_channel in zip(parsed.scales, parsed.channel_scaled, strict=True))
    x = dequantize(symbols, scales, bins.to(device), parsed.dtype)
    if E:
        head = torch.frombuffer(bytearray(parsed.exact), dtype=torch.uint8).view(parsed.dtype)
        head = head.reshape(parsed.L, parsed.P, E, parsed.H, parsed.D).to(device)
        if not bool(torch.isfinite(head).all()):  # only a forged blob with a valid CRC gets here
            raise CodecError("bad CacheGen blob: an exact token holds NaN or inf")
        x = torch.cat((head, x), dim=2)
    return x.reshape(parsed.L, 1, parsed.T, parsed.D) if parsed.mla else x


def encode(chunk: torch.Tensor, *, config: CodecConfig | None = None) -> bytes:
    """chunk ``[L, 2, T, H, D]`` or ``[L, 1, T, D]`` (fp32/fp16/bf16) -> blob bytes (reference coder)."""
    return encode_with(chunk, config, ac_encode)


def decode(blob: bytes | bytearray | memoryview) -> torch.Tensor:
    """blob -> chunk of the encoded shape and dtype; CodecError on any bad blob (reference coder)."""
    return decode_with(blob, ac_decode)
