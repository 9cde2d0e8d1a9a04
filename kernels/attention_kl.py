"""Triton kernels for the attention-matching KL loss on dense student logits.

Per row (b, h, m), over the keys j kept by the key mask: student scores s = logits * student_scale,
target t = target / Z (probabilities, Z = sum target) or softmax(u), u = target * target_scale
(logits); KL = sum_j t_j (log t_j - s_j + lse(s)), with 0 log 0 = 0, and KL = 0 on rows with no kept
key or no target mass. The forward is a single online pass over key blocks (one read of the logits
and the target); it also stores the row statistics as pairs (see _kl_finish), from which the
backward recomputes p and t tile by tile: dKL/ds = p - t.

Scores stay in natural units (exp(x) is computed as exp2(x * log2(e)) after the row max is
subtracted, so finfo.min-masked logits do not overflow to -inf and a row of them stays uniform);
sums of target-weighted scores are kept relative to the current row maxima, which keeps them
accurate for scores of magnitude ~1e4.

The @triton.jit helpers are shared with lfi.kernels.attention_kl_qk.
Strided loads (broadcast dims with stride 0; each tensor's strides are one tuple argument, (b, h,
row, column), which Triton specializes element by element as it does separate arguments), int64
batch/head/row offsets, 1-D grid with the row blocks of one (b, h) adjacent. M_BUCKET and N_BUCKET
(power-of-two buckets of M and N) are the launchers' autotuning key and are not used by the kernels.
"""
import triton
import triton.language as tl

from .interaction_attention import _log2, _row_block

# Module-level constants must be tl.constexpr instances to be readable from compiled kernels
# (an annotation `X: tl.constexpr = v` only works under the interpreter).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Compiled kernels take log2 from the MUFU unit (the interpreter cannot run inline assembly).


@triton.jit
def _mask_keep(keep, m_base, rows, offs_n, N, stride_mm, stride_mn, KEY_MASK: tl.constexpr):
    """keep & (mask != 0) for one (rows, keys) tile; m_base: the mask at this (b, h), rows (int64,
    (BLOCK_M, 1)). KEY_MASK (the mask does not vary along the rows, e.g. (B, 1, 1, N) key padding):
    read as one vector of the block's keys, not as a tile of byte loads with one pointer each."""
    if KEY_MASK:
        kept = tl.load(m_base + offs_n * stride_mn, mask=offs_n < N, other=0) != 0
        return keep & kept[None, :]
    else:
        return keep & (tl.load(m_base + rows * stride_mm + offs_n[None, :] * stride_mn, mask=keep, other=0) != 0)


@triton.jit
def _kl_init(BLOCK_M: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr):
    """Per-row state (m, l, x, y, c): m, l the student's running max and sum of exp(s - m).
    Probabilities: x = Z, y = sum t log2 t, c = sum t (s - m). Logits: x = sum exp(u - mu),
    y = mu (running max of u), c = sum exp(u - mu) ((u - mu) - (s - m)).
    Shifts use 0 in place of a -inf max."""
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    x = tl.zeros([BLOCK_M], dtype=tl.float32)
    if TARGET_IS_LOGITS:
        y = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    else:
        y = tl.zeros([BLOCK_M], dtype=tl.float32)
    c = tl.zeros([BLOCK_M], dtype=tl.float32)
    return m, l, x, y, c


@triton.jit
def _kl_step(s, tg, keep, m, l, x, y, c, t_scale, TARGET_IS_LOGITS: tl.constexpr):
    """Folds one (BLOCK_M, BLOCK_N) tile into the row state. s: student scores (natural units),
    -inf where not kept; tg: raw target values (float32; anything where not kept)."""
    m_new = tl.maximum(m, tl.max(s, 1))
    sh_old = tl.where(m == float("-inf"), 0.0, m)
    sh = tl.where(m_new == float("-inf"), 0.0, m_new)
    ds = s - sh[:, None]
    l = l * tl.exp2((m - sh) * LOG2E) + tl.sum(tl.exp2(ds * LOG2E), 1)
    if TARGET_IS_LOGITS:
        u = tl.where(keep, tg * t_scale, float("-inf"))
        mu_new = tl.maximum(y, tl.max(u, 1))
        shu_old = tl.where(y == float("-inf"), 0.0, y)
        shu = tl.where(mu_new == float("-inf"), 0.0, mu_new)
        du = u - shu[:, None]
        e = tl.exp2(du * LOG2E)
        terms = tl.where(e > 0.0, e * (du - ds), 0.0)
        beta = tl.exp2((y - shu) * LOG2E)
        c = beta * (c + x * ((shu_old - shu) - (sh_old - sh))) + tl.sum(terms, 1)
        x = x * beta + tl.sum(e, 1)
        y = mu_new
    else:
        t = tl.where(keep, tg, 0.0)
        pos = t != 0.0  # a negative probability gives NaN through its log (see interaction_attention's)
        y += tl.sum(tl.where(pos, t * _log2(tl.where(pos, t, 1.0)), 0.0), 1)
        c += x * (sh_old - sh) + tl.sum(tl.where(pos, t * ds, 0.0), 1)
        x += tl.sum(t, 1)
    return m_new, l, x, y, c


@triton.jit
def _kl_finish(m, l, x, y, c, TARGET_IS_LOGITS: tl.constexpr):
    """(kl, shift, log_l, t_shift, t_log_z). The row statistics are kept as pairs (why:
    lfi._numerics): p = exp((s - shift) - log_l)
    with log_l = +inf without a kept key; logits: t = exp((u - t_shift) - t_log_z), t_log_z = +inf
    without a kept key; probabilities: t_shift = 0, t = target * exp(-t_log_z), t_log_z = log Z
    (-inf without target mass). A row whose kept keys carry target mass but whose student scores
    are all -inf gets KL = +inf. The tests are `!= 0`, not `> 0`: a NaN l or x (NaN / +inf among the
    student's scores or the target's values) gives KL NaN and NaN statistics, as F.kl_div."""
    sh = tl.where(m == float("-inf"), 0.0, m)
    has_s = l != 0.0
    log_l = tl.log2(tl.where(has_s, l, 1.0)) * LN2
    has_t = x != 0.0
    x_safe = tl.where(has_t, x, 1.0)
    log_x = tl.log2(x_safe) * LN2
    if TARGET_IS_LOGITS:
        t_shift = tl.where(y == float("-inf"), 0.0, y)
        t_log_z = tl.where(has_t, log_x, float("inf"))
        kl = c / x_safe - log_x + log_l
    else:
        t_shift = tl.zeros_like(x)
        # Z = +inf (a +inf weight): log Z NaN, so that every kept key's gradient is NaN too.
        t_log_z = tl.where(has_t, tl.where(x == float("inf"), float("nan"), log_x), float("-inf"))
        kl = (y * LN2 - c) / x_safe - log_x + log_l
    kl = tl.where(has_t, tl.where(has_s, kl, float("inf")), 0.0)
    return kl, sh, tl.where(has_s, log_l, float("inf")), t_shift, t_log_z


@triton.jit
def _kl_store(KL, STATS, TSTATS, rows, row_ok, m, l, x, y, c, TARGET_IS_LOGITS: tl.constexpr):
    """Finishes the row state (_kl_finish) and stores KL (B, H, M) and the row statistics STATS,
    TSTATS (B, H, M, 2), all float32 and contiguous; rows = flat (b, h, m) row indices (int64)."""
    kl, sh, log_l, t_shift, t_log_z = _kl_finish(m, l, x, y, c, TARGET_IS_LOGITS)
    tl.store(KL + rows, kl, mask=row_ok)
    tl.store(STATS + 2 * rows, sh, mask=row_ok)
    tl.store(STATS + 2 * rows + 1, log_l, mask=row_ok)
    tl.store(TSTATS + 2 * rows, t_shift, mask=row_ok)
    tl.store(TSTATS + 2 * rows + 1, t_log_z, mask=row_ok)


@triton.jit
def _load_row_stats(STATS, TSTATS, rows, row_ok):
    """(shift, log_l, t_shift, t_log_z) as stored by _kl_store; rows past M read as rows
    without a kept key (they get p = t = 0)."""
    sh = tl.load(STATS + 2 * rows, mask=row_ok, other=0.0)
    log_l = tl.load(STATS + 2 * rows + 1, mask=row_ok, other=float("inf"))
    t_shift = tl.load(TSTATS + 2 * rows, mask=row_ok, other=0.0)
    t_log_z = tl.load(TSTATS + 2 * rows + 1, mask=row_ok, other=float("inf"))
    return sh, log_l, t_shift, t_log_z


@triton.jit
def _kl_dscores(s, tg, keep, sh, log_l, t_shift, t_log_z, g, t_scale, TARGET_IS_LOGITS: tl.constexpr):
    """g * (p - t) for one tile (float32, 0 where not kept); s natural-unit scores (-inf where not
    kept), the row statistics as stored by the forward, g the incoming gradient per row."""
    p = tl.exp2(((s - sh[:, None]) - log_l[:, None]) * LOG2E)
    if TARGET_IS_LOGITS:
        u = tl.where(keep, tg * t_scale, float("-inf"))
        t = tl.exp2(((u - t_shift[:, None]) - t_log_z[:, None]) * LOG2E)
    else:
        # Rows without target mass (t_log_z = -inf) have KL = 0 and no gradient.
        no_mass = t_log_z == float("-inf")
        inv_z = tl.where(no_mass, 0.0, tl.exp2(-t_log_z * LOG2E))
        g = tl.where(no_mass, 0.0, g)
        t = tl.where(keep, tg, 0.0) * inv_z[:, None]
    return tl.where(keep, g[:, None] * (p - t), 0.0)


@triton.jit
def _masked_scores(s, keep, m_base, rows, offs_n, N, sm, s_scale, HAS_MASK: tl.constexpr, KEY_MASK: tl.constexpr):
    """(scores, keep) of one tile: keep narrowed by the mask at this (b, h) (m_base; sm its stride
    tuple), s times s_scale (natural units), -inf where not kept."""
    if HAS_MASK:
        keep = _mask_keep(keep, m_base, rows, offs_n, N, sm[2], sm[3], KEY_MASK)
    return tl.where(keep, s * s_scale, float("-inf")), keep


@triton.jit
def _dense_rows(LOGITS, TARGET, MASK, sl, st, sm, H, M, BLOCK_M: tl.constexpr):
    """The row block of a program of the dense kernels: (pid_bh, b, h, offs_m, row_ok, rows (int64,
    (BLOCK_M, 1)), and the logits', target's and mask's pointers at its rows / head)."""
    pid_m, pid_bh, b, h, offs_m, row_ok = _row_block(M, H, BLOCK_M)
    rows = offs_m.to(tl.int64)[:, None]
    l_base = LOGITS + b * sl[0] + h * sl[1] + rows * sl[2]
    t_base = TARGET + b * st[0] + h * st[1] + rows * st[2]
    return pid_bh, b, h, offs_m, row_ok, rows, l_base, t_base, MASK + b * sm[0] + h * sm[1]


@triton.jit
def _dense_tile(l_base, t_base, m_base, rows, row_ok, offs_n, N, sl, st, sm, s_scale,
                HAS_MASK: tl.constexpr, KEY_MASK: tl.constexpr):
    """(s, tg, keep, in_bounds) of the keys offs_n: student scores (natural units, -inf where not
    kept), raw target values (float32), the kept and the in-bounds entries."""
    in_bounds = row_ok[:, None] & (offs_n < N)[None, :]
    s = tl.load(l_base + offs_n[None, :] * sl[3], mask=in_bounds, other=0.0).to(tl.float32)
    tg = tl.load(t_base + offs_n[None, :] * st[3], mask=in_bounds, other=0.0).to(tl.float32)
    s, keep = _masked_scores(s, in_bounds, m_base, rows, offs_n, N, sm, s_scale, HAS_MASK, KEY_MASK)
    return s, tg, keep, in_bounds


@triton.jit
def kl_fwd_kernel(
    LOGITS, TARGET, MASK, KL, STATS, TSTATS, sl, st, sm,
    H, M, N, s_scale, t_scale, M_BUCKET, N_BUCKET,
    HAS_MASK: tl.constexpr, KEY_MASK: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (row block, b, h): KL (B, H, M), STATS, TSTATS (B, H, M, 2) float32, contiguous.
    sl, st, sm: the (b, h, m, n) strides of the logits, the target and the mask as broadcast to
    (B, H, M, N); s_scale = student_scale, t_scale = target_scale."""
    pid_bh, b, h, offs_m, row_ok, rows, l_base, t_base, m_base = _dense_rows(LOGITS, TARGET, MASK, sl, st, sm, H, M,
                                                                              BLOCK_M)
    m, l, x, y, c = _kl_init(BLOCK_M, TARGET_IS_LOGITS)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s, tg, keep, _ = _dense_tile(l_base, t_base, m_base, rows, row_ok, offs_n, N, sl, st, sm, s_scale,
                                     HAS_MASK, KEY_MASK)
        m, l, x, y, c = _kl_step(s, tg, keep, m, l, x, y, c, t_scale, TARGET_IS_LOGITS)
    _kl_store(KL, STATS, TSTATS, pid_bh.to(tl.int64) * M + offs_m, row_ok, m, l, x, y, c, TARGET_IS_LOGITS)


@triton.jit
def kl_bwd_kernel(
    GRAD, LOGITS, TARGET, MASK, STATS, TSTATS, DLOGITS, sg, sl, st, sm,
    H, M, N, s_scale, t_scale, M_BUCKET, N_BUCKET,
    HAS_MASK: tl.constexpr, KEY_MASK: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (row block, b, h): DLOGITS (B, H, M, N) contiguous, in its own dtype,
    = grad * (p - t) * student_scale, with p and t recomputed from STATS and TSTATS; sg: GRAD's
    (b, h, m) strides as broadcast to (B, H, M), the others as in kl_fwd_kernel."""
    pid_bh, b, h, offs_m, row_ok, rows, l_base, t_base, m_base = _dense_rows(LOGITS, TARGET, MASK, sl, st, sm, H, M,
                                                                              BLOCK_M)
    d_base = DLOGITS + pid_bh.to(tl.int64) * M * N + rows * N
    sh, log_l, t_shift, t_log_z = _load_row_stats(STATS, TSTATS, pid_bh.to(tl.int64) * M + offs_m, row_ok)
    g = tl.load(GRAD + b * sg[0] + h * sg[1] + offs_m.to(tl.int64) * sg[2], mask=row_ok,
                other=0.0).to(tl.float32) * s_scale
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s, tg, keep, in_bounds = _dense_tile(l_base, t_base, m_base, rows, row_ok, offs_n, N, sl, st, sm, s_scale,
                                             HAS_MASK, KEY_MASK)
        ds = _kl_dscores(s, tg, keep, sh, log_l, t_shift, t_log_z, g, t_scale, TARGET_IS_LOGITS)
        tl.store(d_base + offs_n[None, :], ds.to(DLOGITS.dtype.element_ty), mask=in_bounds)
