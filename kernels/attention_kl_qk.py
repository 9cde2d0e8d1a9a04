"""Triton kernels for the attention-matching KL loss with student logits s = (q k^T) * student_scale
computed tile by tile (never materialized), against a dense target or an implicit teacher whose
logits u = (q_t k_t^T) * target_scale are computed the same way.

Heads: query head h reads kv head h // GROUP; teacher head ht = h * T_HSTEP (T_HSTEP = 0 when one
teacher head broadcasts over the student's heads, else 1) reads teacher kv head ht // TGROUP.
The per-row math (online forward, p - t in the backward) is shared with lfi.kernels.attention_kl.

Backward: dS = grad_kl * (p - t), dq = student_scale * dS k (one program per row block and query
head), dk = student_scale * sum over the GROUP query heads of dS^T q (one program per key block and
kv head, looping over the group's heads and row blocks: no atomics). Extra memory: none beyond the
(B, H, M) row statistics. Each tensor's strides are one tuple argument, (b, h, row, column) (sg:
(b, h, row) of GRAD), as broadcast to the call's shape. M_BUCKET and N_BUCKET (power-of-two buckets
of M and N) are the launchers' autotuning key and are not used by the kernels.
"""
import triton
import triton.language as tl

from .attention_kl import _kl_dscores, _kl_init, _kl_step, _kl_store, _load_row_stats, _masked_scores
from .interaction_attention import _dot, _key_block, _row_block


@triton.jit
def _dot_t(a, b_t_ptrs, load_mask, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """a (BLOCK_M, BLOCK_D) times the (BLOCK_D, BLOCK_N) tile at b_t_ptrs, in float32."""
    b_t = tl.load(b_t_ptrs, mask=load_mask, other=0.0).to(a.dtype)
    return _dot(a, b_t, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)


@triton.jit
def _load_head_rows(PTR, strides, b, h, rows, row_ok, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """(BLOCK_M, BLOCK) tile of the rows `rows` (int64, (BLOCK_M, 1)) of head (b, h) of a (B, H, M,
    WIDTH) tensor with these strides, zero past M and WIDTH."""
    offs = tl.arange(0, BLOCK)
    return tl.load(PTR + b * strides[0] + h * strides[1] + rows * strides[2] + offs[None, :] * strides[3],
                   mask=row_ok[:, None] & (offs < WIDTH)[None, :], other=0.0)


@triton.jit
def _qk_rows(Q, K, TARGET, QT, KT, MASK, sq, sk, st, sqt, skt, sm, H, GROUP, T_HSTEP, TGROUP, M,
             HEAD_DIM: tl.constexpr, HEAD_DIM_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
             IMPLICIT: tl.constexpr, BLOCK_M: tl.constexpr):
    """The row block of a program of the row-block kernels (forward, dq): (pid_bh, b, h, offs_m,
    row_ok, rows (int64, (BLOCK_M, 1)), the q tile, K's pointer at kv head h // GROUP, the teacher's
    qt tile and KT's (BLOCK_DT, 1) column pointers (IMPLICIT; else q and KT, unused), TARGET's
    pointer at these rows (dense; else TARGET, unused), MASK's pointer at (b, h))."""
    pid_m, pid_bh, b, h, offs_m, row_ok = _row_block(M, H, BLOCK_M)
    rows = offs_m.to(tl.int64)[:, None]
    q = _load_head_rows(Q, sq, b, h, rows, row_ok, HEAD_DIM, BLOCK_D)
    k_base = K + b * sk[0] + (h // GROUP) * sk[1]
    if IMPLICIT:
        ht = h * T_HSTEP
        qt = _load_head_rows(QT, sqt, b, ht, rows, row_ok, HEAD_DIM_T, BLOCK_DT)
        kt_base = KT + b * skt[0] + (ht // TGROUP) * skt[1] + tl.arange(0, BLOCK_DT)[:, None] * skt[3]
        t_base = TARGET
    else:
        qt, kt_base = q, KT
        t_base = TARGET + b * st[0] + h * st[1] + rows * st[2]
    return pid_bh, b, h, offs_m, row_ok, rows, q, k_base, qt, kt_base, t_base, MASK + b * sm[0] + h * sm[1]


@triton.jit
def _qk_tile(q, k_base, qt, kt_base, t_base, m_base, rows, row_ok, offs_n, N, sk, skt, st, sm, s_scale,
             HEAD_DIM: tl.constexpr, HEAD_DIM_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
             HAS_MASK: tl.constexpr, KEY_MASK: tl.constexpr, IMPLICIT: tl.constexpr,
             DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(s, tg, keep, key_ok) of the keys offs_n for the row block of _qk_rows: student scores
    (natural units, -inf where not kept), target values (float32: teacher logits before
    target_scale, or the dense target), the kept entries and the keys below N."""
    key_ok = offs_n < N
    keep = row_ok[:, None] & key_ok[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    s = _dot_t(q, k_base + offs_d[:, None] * sk[3] + offs_n[None, :] * sk[2],
               (offs_d < HEAD_DIM)[:, None] & key_ok[None, :], DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
    if IMPLICIT:
        kt_ok = (tl.arange(0, BLOCK_DT) < HEAD_DIM_T)[:, None] & key_ok[None, :]
        tg = _dot_t(qt, kt_base + offs_n[None, :] * skt[2], kt_ok, DOT_FP32, T_PRECISION, BLOCK_M, BLOCK_N)
    else:
        tg = tl.load(t_base + offs_n[None, :] * st[3], mask=keep, other=0.0).to(tl.float32)
    s, keep = _masked_scores(s, keep, m_base, rows, offs_n, N, sm, s_scale, HAS_MASK, KEY_MASK)
    return s, tg, keep, key_ok


@triton.jit
def kl_qk_fwd_kernel(
    Q, K, TARGET, QT, KT, MASK, KL, STATS, TSTATS, sq, sk, st, sqt, skt, sm,
    H, GROUP, T_HSTEP, TGROUP, M, N, s_scale, t_scale, M_BUCKET, N_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    HAS_MASK: tl.constexpr, KEY_MASK: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr, IMPLICIT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (row block, b, h): KL (B, H, M), STATS, TSTATS (B, H, M, 2) float32, contiguous.
    IMPLICIT: the target is u = (QT KT^T) * target_scale (logits); else TARGET is read densely."""
    pid_bh, b, h, offs_m, row_ok, rows, q, k_base, qt, kt_base, t_base, m_base = _qk_rows(
        Q, K, TARGET, QT, KT, MASK, sq, sk, st, sqt, skt, sm, H, GROUP, T_HSTEP, TGROUP, M,
        HEAD_DIM, HEAD_DIM_T, BLOCK_D, BLOCK_DT, IMPLICIT, BLOCK_M)
    m, l, x, y, c = _kl_init(BLOCK_M, TARGET_IS_LOGITS)
    for start_n in range(0, N, BLOCK_N):
        s, tg, keep, _ = _qk_tile(
            q, k_base, qt, kt_base, t_base, m_base, rows, row_ok, start_n + tl.arange(0, BLOCK_N), N, sk, skt, st, sm,
            s_scale, HEAD_DIM, HEAD_DIM_T, BLOCK_D, BLOCK_DT, HAS_MASK, KEY_MASK, IMPLICIT,
            DOT_FP32, PRECISION, T_PRECISION, BLOCK_M, BLOCK_N)
        m, l, x, y, c = _kl_step(s, tg, keep, m, l, x, y, c, t_scale, TARGET_IS_LOGITS)
    _kl_store(KL, STATS, TSTATS, pid_bh.to(tl.int64) * M + offs_m, row_ok, m, l, x, y, c, TARGET_IS_LOGITS)


@triton.jit
def kl_qk_bwd_dq_kernel(
    GRAD, Q, K, TARGET, QT, KT, MASK, STATS, TSTATS, DQ, sg, sq, sk, st, sqt, skt, sm, sdq,
    H, GROUP, T_HSTEP, TGROUP, M, N, s_scale, t_scale, M_BUCKET, N_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    HAS_MASK: tl.constexpr, KEY_MASK: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr, IMPLICIT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (row block, b, h): DQ = student_scale * dS K."""
    pid_bh, b, h, offs_m, row_ok, rows, q, k_base, qt, kt_base, t_base, m_base = _qk_rows(
        Q, K, TARGET, QT, KT, MASK, sq, sk, st, sqt, skt, sm, H, GROUP, T_HSTEP, TGROUP, M,
        HEAD_DIM, HEAD_DIM_T, BLOCK_D, BLOCK_DT, IMPLICIT, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    sh, log_l, t_shift, t_log_z = _load_row_stats(STATS, TSTATS, pid_bh.to(tl.int64) * M + offs_m, row_ok)
    g = tl.load(GRAD + b * sg[0] + h * sg[1] + offs_m.to(tl.int64) * sg[2], mask=row_ok, other=0.0).to(tl.float32)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s, tg, keep, key_ok = _qk_tile(
            q, k_base, qt, kt_base, t_base, m_base, rows, row_ok, offs_n, N, sk, skt, st, sm,
            s_scale, HEAD_DIM, HEAD_DIM_T, BLOCK_D, BLOCK_DT, HAS_MASK, KEY_MASK, IMPLICIT,
            DOT_FP32, PRECISION, T_PRECISION, BLOCK_M, BLOCK_N)
        ds = _kl_dscores(s, tg, keep, sh, log_l, t_shift, t_log_z, g, t_scale, TARGET_IS_LOGITS)
        k = tl.load(k_base + offs_n[:, None] * sk[2] + offs_d[None, :] * sk[3],
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0).to(Q.dtype.element_ty)
        dq = _dot(ds.to(Q.dtype.element_ty), k, dq, DOT_FP32, PRECISION)
    tl.store(DQ + b * sdq[0] + h * sdq[1] + rows * sdq[2] + offs_d[None, :] * sdq[3],
             (dq * s_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def kl_qk_bwd_dk_kernel(
    GRAD, Q, K, TARGET, QT, KT, MASK, STATS, TSTATS, DK, sg, sq, sk, st, sqt, skt, sm, sdk,
    H, HKV, GROUP, T_HSTEP, TGROUP, M, N, s_scale, t_scale, M_BUCKET, N_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    HAS_MASK: tl.constexpr, KEY_MASK: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr, IMPLICIT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key block, b, kv head): DK = student_scale * sum over the GROUP query heads
    of dS^T Q. Its loop runs over row blocks with the key block fixed (the transpose of _qk_tile's),
    so it loads its own tiles: K and KT once per program, the mask once per query head when it is a
    key mask."""
    pid_n, b, hk = _key_block(N, HKV, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < N
    d_ok = offs_d < HEAD_DIM

    k_t = tl.load(K + b * sk[0] + hk * sk[1] + offs_d[:, None] * sk[3] + offs_n[None, :] * sk[2],
                  mask=d_ok[:, None] & key_ok[None, :], other=0.0).to(Q.dtype.element_ty)
    if IMPLICIT:
        offs_dt = tl.arange(0, BLOCK_DT)
        kt_mask = (offs_dt < HEAD_DIM_T)[:, None] & key_ok[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for gi in range(0, GROUP):
        h = hk * GROUP + gi
        q_base = Q + b * sq[0] + h * sq[1] + offs_d[None, :] * sq[3]
        m_base = MASK + b * sm[0] + h * sm[1] + offs_n[None, :] * sm[3]
        if HAS_MASK:
            if KEY_MASK:  # the same keys for every row block: one vector per query head
                key_kept = tl.load(MASK + b * sm[0] + h * sm[1] + offs_n * sm[3], mask=key_ok, other=0) != 0
        g_base = GRAD + b * sg[0] + h * sg[1]
        row0 = (b * H + h) * M
        if IMPLICIT:
            ht = h * T_HSTEP
            htk = ht // TGROUP
            qt_base = QT + b * sqt[0] + ht * sqt[1] + offs_dt[None, :] * sqt[3]
            kt_t = tl.load(KT + b * skt[0] + htk * skt[1] + offs_dt[:, None] * skt[3] + offs_n[None, :] * skt[2],
                           mask=kt_mask, other=0.0).to(QT.dtype.element_ty)
        else:
            t_base = TARGET + b * st[0] + h * st[1] + offs_n[None, :] * st[3]
        for start_m in range(0, M, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < M
            rows = offs_m.to(tl.int64)[:, None]
            keep = row_ok[:, None] & key_ok[None, :]
            q = tl.load(q_base + rows * sq[2], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            s = _dot(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)
            if IMPLICIT:
                qt = tl.load(qt_base + rows * sqt[2], mask=row_ok[:, None] & (offs_dt < HEAD_DIM_T)[None, :],
                             other=0.0)
                tg = _dot(qt, kt_t, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, T_PRECISION)
            else:
                tg = tl.load(t_base + rows * st[2], mask=keep, other=0.0).to(tl.float32)
            if HAS_MASK:
                if KEY_MASK:
                    keep = keep & key_kept[None, :]
                else:
                    keep = keep & (tl.load(m_base + rows * sm[2], mask=keep, other=0) != 0)
            s = tl.where(keep, s * s_scale, float("-inf"))
            sh, log_l, t_shift, t_log_z = _load_row_stats(STATS, TSTATS, row0 + offs_m, row_ok)
            g = tl.load(g_base + offs_m.to(tl.int64) * sg[2], mask=row_ok, other=0.0).to(tl.float32)
            ds = _kl_dscores(s, tg, keep, sh, log_l, t_shift, t_log_z, g, t_scale, TARGET_IS_LOGITS)
            dk = _dot(tl.trans(ds.to(Q.dtype.element_ty)), q, dk, DOT_FP32, PRECISION)
    tl.store(DK + b * sdk[0] + hk * sdk[1] + offs_n[:, None] * sdk[2] + offs_d[None, :] * sdk[3],
             (dk * s_scale).to(DK.dtype.element_ty), mask=key_ok[:, None] & d_ok[None, :])
