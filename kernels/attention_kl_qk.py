"""Triton kernels for the attention-matching KL loss with student logits s = (q k^T) * student_scale
computed tile by tile (never materialized), against a dense target or an implicit teacher whose
logits u = (q_t k_t^T) * target_scale are computed the same way.

Heads: query head h reads kv head h // GROUP; teacher head ht = h * T_HSTEP (T_HSTEP = 0 when one
teacher head broadcasts over the student's heads, else 1) reads teacher kv head ht // TGROUP.
The per-row math (online forward, p - t in the backward) is shared with lfi.kernels.attention_kl.

Backward: dS = grad_kl * (p - t), dq = student_scale * dS k (one program per row block and query
head), dk = student_scale * sum over the GROUP query heads of dS^T q (one program per key block and
kv head, looping over the group's heads and row blocks: no atomics). Extra memory: none beyond the
(B, H, M) row statistics. M_BUCKET and N_BUCKET (power-of-two buckets of M and N) are the
launchers' autotuning key and are not used by the kernels.
"""
import triton
import triton.language as tl

from .attention_kl import _kl_dscores, _kl_init, _kl_step, _kl_store, _load_row_stats, _mask_keep
from .interaction_attention import _dot, _row_block


@triton.jit
def _dot_t(a, b_t_ptrs, load_mask, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """a (BLOCK_M, BLOCK_D) times the (BLOCK_D, BLOCK_N) tile at b_t_ptrs, in float32."""
    b_t = tl.load(b_t_ptrs, mask=load_mask, other=0.0).to(a.dtype)
    return _dot(a, b_t, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)


@triton.jit
def kl_qk_fwd_kernel(
    Q, K, TARGET, QT, KT, MASK, KL, STATS, TSTATS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_qtb, stride_qth, stride_qtm, stride_qtd,
    stride_ktb, stride_kth, stride_ktn, stride_ktd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, GROUP, T_HSTEP, TGROUP, M, N, s_scale, t_scale, M_BUCKET, N_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    HAS_MASK: tl.constexpr, KEY_MASK: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr, IMPLICIT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (row block, b, h): KL (B, H, M), STATS, TSTATS (B, H, M, 2) float32, contiguous.
    IMPLICIT: the target is u = (QT KT^T) * target_scale (logits); else TARGET is read densely."""
    pid_m, pid_bh, b, h, offs_m, row_ok = _row_block(M, H, BLOCK_M)
    hk = h // GROUP
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)[:, None]

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh + offs_d[:, None] * stride_kd
    m_base = MASK + b * stride_mb + h * stride_mh
    if IMPLICIT:
        ht = h * T_HSTEP
        htk = ht // TGROUP
        offs_dt = tl.arange(0, BLOCK_DT)
        qt = tl.load(QT + b * stride_qtb + ht * stride_qth + rows * stride_qtm + offs_dt[None, :] * stride_qtd,
                     mask=row_ok[:, None] & (offs_dt < HEAD_DIM_T)[None, :], other=0.0)
        kt_base = KT + b * stride_ktb + htk * stride_kth + offs_dt[:, None] * stride_ktd
    else:
        t_base = TARGET + b * stride_tb + h * stride_th + rows * stride_tm

    m, l, x, y, c = _kl_init(BLOCK_M, TARGET_IS_LOGITS)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        key_ok = offs_n < N
        keep = row_ok[:, None] & key_ok[None, :]
        s = _dot_t(q, k_base + offs_n[None, :] * stride_kn, (offs_d < HEAD_DIM)[:, None] & key_ok[None, :],
                   DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
        if IMPLICIT:
            tg = _dot_t(qt, kt_base + offs_n[None, :] * stride_ktn, (offs_dt < HEAD_DIM_T)[:, None] & key_ok[None, :],
                        DOT_FP32, T_PRECISION, BLOCK_M, BLOCK_N)
        else:
            tg = tl.load(t_base + offs_n[None, :] * stride_tn, mask=keep, other=0.0).to(tl.float32)
        if HAS_MASK:
            keep = _mask_keep(keep, m_base, rows, offs_n, N, stride_mm, stride_mn, KEY_MASK)
        s = tl.where(keep, s * s_scale, float("-inf"))
        m, l, x, y, c = _kl_step(s, tg, keep, m, l, x, y, c, t_scale, TARGET_IS_LOGITS)
    _kl_store(KL, STATS, TSTATS, pid_bh.to(tl.int64) * M + offs_m, row_ok, m, l, x, y, c, TARGET_IS_LOGITS)


@triton.jit
def kl_qk_bwd_dq_kernel(
    GRAD, Q, K, TARGET, QT, KT, MASK, STATS, TSTATS, DQ,
    stride_gb, stride_gh, stride_gm,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_qtb, stride_qth, stride_qtm, stride_qtd,
    stride_ktb, stride_kth, stride_ktn, stride_ktd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP, T_HSTEP, TGROUP, M, N, s_scale, t_scale, M_BUCKET, N_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    HAS_MASK: tl.constexpr, KEY_MASK: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr, IMPLICIT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (row block, b, h): DQ = student_scale * dS K."""
    pid_m, pid_bh, b, h, offs_m, row_ok = _row_block(M, H, BLOCK_M)
    hk = h // GROUP
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)[:, None]
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    m_base = MASK + b * stride_mb + h * stride_mh
    if IMPLICIT:
        ht = h * T_HSTEP
        htk = ht // TGROUP
        offs_dt = tl.arange(0, BLOCK_DT)
        qt = tl.load(QT + b * stride_qtb + ht * stride_qth + rows * stride_qtm + offs_dt[None, :] * stride_qtd,
                     mask=row_ok[:, None] & (offs_dt < HEAD_DIM_T)[None, :], other=0.0)
        kt_base = KT + b * stride_ktb + htk * stride_kth + offs_dt[:, None] * stride_ktd
    else:
        t_base = TARGET + b * stride_tb + h * stride_th + rows * stride_tm
    sh, log_l, t_shift, t_log_z = _load_row_stats(STATS, TSTATS, pid_bh.to(tl.int64) * M + offs_m, row_ok)
    g = tl.load(GRAD + b * stride_gb + h * stride_gh + offs_m.to(tl.int64) * stride_gm, mask=row_ok,
                other=0.0).to(tl.float32)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        key_ok = offs_n < N
        keep = row_ok[:, None] & key_ok[None, :]
        s = _dot_t(q, k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                   d_ok[:, None] & key_ok[None, :], DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
        if IMPLICIT:
            tg = _dot_t(qt, kt_base + offs_n[None, :] * stride_ktn, (offs_dt < HEAD_DIM_T)[:, None] & key_ok[None, :],
                        DOT_FP32, T_PRECISION, BLOCK_M, BLOCK_N)
        else:
            tg = tl.load(t_base + offs_n[None, :] * stride_tn, mask=keep, other=0.0).to(tl.float32)
        if HAS_MASK:
            keep = _mask_keep(keep, m_base, rows, offs_n, N, stride_mm, stride_mn, KEY_MASK)
        s = tl.where(keep, s * s_scale, float("-inf"))
        ds = _kl_dscores(s, tg, keep, sh, log_l, t_shift, t_log_z, g, t_scale, TARGET_IS_LOGITS)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0).to(Q.dtype.element_ty)
        dq = _dot(ds.to(Q.dtype.element_ty), k, dq, DOT_FP32, PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * s_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def kl_qk_bwd_dk_kernel(
    GRAD, Q, K, TARGET, QT, KT, MASK, STATS, TSTATS, DK,
    stride_gb, stride_gh, stride_gm,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_qtb, stride_qth, stride_qtm, stride_qtd,
    stride_ktb, stride_kth, stride_ktn, stride_ktd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    H, HKV, GROUP, T_HSTEP, TGROUP, M, N, s_scale, t_scale, M_BUCKET, N_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    HAS_MASK: tl.constexpr, KEY_MASK: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr, IMPLICIT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key block, b, kv head): DK = student_scale * sum over the GROUP query heads
    of dS^T Q."""
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    pid_bhk = pid // num_n_blocks
    b = (pid_bhk // HKV).to(tl.int64)
    hk = (pid_bhk % HKV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < N
    d_ok = offs_d < HEAD_DIM

    k_t = tl.load(K + b * stride_kb + hk * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                  mask=d_ok[:, None] & key_ok[None, :], other=0.0).to(Q.dtype.element_ty)
    if IMPLICIT:
        offs_dt = tl.arange(0, BLOCK_DT)
        kt_mask = (offs_dt < HEAD_DIM_T)[:, None] & key_ok[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for gi in range(0, GROUP):
        h = hk * GROUP + gi
        q_base = Q + b * stride_qb + h * stride_qh + offs_d[None, :] * stride_qd
        m_base = MASK + b * stride_mb + h * stride_mh + offs_n[None, :] * stride_mn
        if HAS_MASK:
            if KEY_MASK:  # the same keys for every row block: one vector per query head
                key_kept = tl.load(MASK + b * stride_mb + h * stride_mh + offs_n * stride_mn, mask=key_ok,
                                   other=0) != 0
        g_base = GRAD + b * stride_gb + h * stride_gh
        row0 = (b * H + h) * M
        if IMPLICIT:
            ht = h * T_HSTEP
            htk = ht // TGROUP
            qt_base = QT + b * stride_qtb + ht * stride_qth + offs_dt[None, :] * stride_qtd
            kt_t = tl.load(KT + b * stride_ktb + htk * stride_kth + offs_dt[:, None] * stride_ktd
                           + offs_n[None, :] * stride_ktn, mask=kt_mask, other=0.0).to(QT.dtype.element_ty)
        else:
            t_base = TARGET + b * stride_tb + h * stride_th + offs_n[None, :] * stride_tn
        for start_m in range(0, M, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < M
            rows = offs_m.to(tl.int64)[:, None]
            keep = row_ok[:, None] & key_ok[None, :]
            q = tl.load(q_base + rows * stride_qm, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            s = _dot(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)
            if IMPLICIT:
                qt = tl.load(qt_base + rows * stride_qtm, mask=row_ok[:, None] & (offs_dt < HEAD_DIM_T)[None, :],
                             other=0.0)
                tg = _dot(qt, kt_t, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, T_PRECISION)
            else:
                tg = tl.load(t_base + rows * stride_tm, mask=keep, other=0.0).to(tl.float32)
            if HAS_MASK:
                if KEY_MASK:
                    keep = keep & key_kept[None, :]
                else:
                    keep = keep & (tl.load(m_base + rows * stride_mm, mask=keep, other=0) != 0)
            s = tl.where(keep, s * s_scale, float("-inf"))
            sh, log_l, t_shift, t_log_z = _load_row_stats(STATS, TSTATS, row0 + offs_m, row_ok)
            g = tl.load(g_base + offs_m.to(tl.int64) * stride_gm, mask=row_ok, other=0.0).to(tl.float32)
            ds = _kl_dscores(s, tg, keep, sh, log_l, t_shift, t_log_z, g, t_scale, TARGET_IS_LOGITS)
            dk = _dot(tl.trans(ds.to(Q.dtype.element_ty)), q, dk, DOT_FP32, PRECISION)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * s_scale).to(DK.dtype.element_ty), mask=key_ok[:, None] & d_ok[None, :])
