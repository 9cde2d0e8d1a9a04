"""Triton kernels for attention that can also write its exact softmax maps.

Notation (per batch b, query head h, kv head h // GROUP): S = scale * Q K^T + mask, P = softmax(S),
O = P V. Each row's softmax statistics are stored as STATS (B, H, M, 2) float32: the row max m and
log l, l = sum exp(S - m), kept apart (not folded into lse = m + log l) so that P = exp((S - m) -
log l) stays exact when the scores are huge (a float mask of -1e30 or finfo.min on a whole row gives
the uniform row, as in SDPA). Rows with no attended key store (0, +inf), so P is exactly 0 there.
Scores stay in natural units: base-2 scaling would overflow for finfo.min masks.

All tensors are read through their strides (masks broadcast with stride 0); batch and head
offsets are computed in int64 because maps of (B, H, N, N) overflow int32 offsets. Programs are
laid out on a 1-D grid with the row blocks of one (b, h) adjacent, so they share K/V in L2.

Kernels know nothing of autograd or modules: lfi.backends.triton launches them.
"""
import triton
import triton.language as tl



@triton.jit
def _row_block(M, H, BLOCK_M: tl.constexpr):
    """This program's rows in the 1-D grid of (row block, b, h), the row blocks of one (b, h)
    adjacent: (pid_m, pid_bh, b, h, offs_m, row_ok), b and h as int64 so that the offsets of large
    tensors do not overflow int32."""
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_m, pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64), offs_m, offs_m < M


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # The CPU interpreter multiplies raw bf16 bits in tl.dot, so it gets float32 operands.
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _scores(q, k_ptrs, mask_ptrs, offs_m, offs_n, M, N, scale, k_load_mask,
            IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
            DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """Masked scores (BLOCK_M, BLOCK_N) for q (BLOCK_M, BLOCK_D) and the key block at k_ptrs
    (laid out (BLOCK_D, BLOCK_N)); keys past N and masked keys are -inf."""
    k_t = tl.load(k_ptrs, mask=k_load_mask, other=0.0)
    s = _dot(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION) * scale
    valid = (offs_n < N)[None, :]
    if IS_CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if HAS_MASK:
        in_bounds = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        if MASK_BOOL:
            valid = valid & (tl.load(mask_ptrs, mask=in_bounds, other=0) != 0)
        else:
            s += tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _load_stats(STATS, row_offset, offs_m, row_ok):
    """(row max m, log l) of rows offs_m; rows past M read as empty rows (0, +inf)."""
    ptrs = STATS + (row_offset + offs_m) * 2
    return (tl.load(ptrs, mask=row_ok, other=0.0),
            tl.load(ptrs + 1, mask=row_ok, other=float("inf")))


@triton.jit
def _kl_accumulate(t_ptrs, load_mask, s, m_prev, m_safe, kl_a, kl_b, kl_z):
    """Online pieces of KL(t || softmax(s)) for one key block: kl_a = sum t ln t, kl_b = sum t (s - m)
    kept centred on the running max m (so large logits do not cancel), kl_z = sum t. Keys the
    student does not attend (s = -inf) are dropped from the target."""
    t = tl.load(t_ptrs, mask=load_mask, other=0.0).to(tl.float32)
    t = tl.where(s > float("-inf"), t, 0.0)
    pos = t > 0.0
    m_prev_safe = tl.where(m_prev == float("-inf"), 0.0, m_prev)
    kl_b = kl_b + (m_prev_safe - m_safe) * kl_z + tl.sum(t * tl.where(pos, s - m_safe[:, None], 0.0), 1)
    kl_a = kl_a + tl.sum(t * tl.log(tl.where(pos, t, 1.0)), 1)
    return kl_a, kl_b, kl_z + tl.sum(t, 1)


@triton.jit
def _kl_finish(kl_a, kl_b, kl_z, log_l):
    """(KL per row, tnorm = ln of the target mass): KL = A/Z - ln Z + log l - B/Z.
    Rows without target mass give KL 0 and tnorm -inf."""
    has_mass = kl_z > 0.0
    z = tl.where(has_mass, kl_z, 1.0)
    kl = kl_a / z - tl.log(z) + log_l - kl_b / z
    return tl.where(has_mass, kl, 0.0), tl.where(has_mass, tl.log(z), float("-inf"))


@triton.jit
def _kl_grad(ds, p, s, t_ptrs, load_mask, tnorm, grad_kl):
    """Adds the fused KL's score gradient grad_kl * (p - t / Z) to ds."""
    t = tl.load(t_ptrs, mask=load_mask, other=0.0).to(tl.float32)
    t = tl.where(s > float("-inf"), t, 0.0)
    has_mass = tnorm > float("-inf")
    inv_z = tl.where(has_mass, tl.exp(-tl.where(has_mass, tnorm, 0.0)), 0.0)
    grad_kl = tl.where(has_mass, grad_kl, 0.0)
    return ds + grad_kl[:, None] * (p - t * inv_z[:, None])


@triton.jit
def attention_fwd_kernel(
    Q, K, V, MASK, OUT, STATS, W, T, KL, TNORM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_wb, stride_wh, stride_wm, stride_wn,
    stride_tb, stride_th, stride_tm, stride_tn,
    H, GROUP, M, N, scale, w_start, w_stop,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KL: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (row block, b, h). Writes OUT (B, H, M, Dv), STATS (B, H, M, 2) and, for the rows
    in [w_start, w_stop), the exact maps W (B, H, w_stop - w_start, N).

    Row blocks that overlap the map rows take two passes over the keys: the first finds the row
    max and sum, the second computes P = exp((S - m) - log l) exactly, writes it, and accumulates P V.
    The other row blocks take the usual single online-softmax pass.
    With HAS_KL, the same pass also computes KL(T || P) per row into KL (B, H, M) and the log of
    the target mass into TNORM (B, H, M), T (B, H, M, N) being target probabilities read through
    strides (restricted to the attended keys and renormalised there).
    """
    pid_m, pid_bh, b, h, offs_m, row_ok = _row_block(M, H, BLOCK_M)
    hk = h // GROUP

    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh + offs_d[:, None] * stride_kd
    v_base = V + b * stride_vb + hk * stride_vh + offs_dv[None, :] * stride_vd
    mask_base = MASK + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mm

    hi = N
    if IS_CAUSAL:
        hi = tl.minimum(N, (pid_m + 1) * BLOCK_M)

    t_base = T + b * stride_tb + h * stride_th + offs_m[:, None] * stride_tm

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    kl_a = tl.zeros([BLOCK_M], dtype=tl.float32)
    kl_b = tl.zeros([BLOCK_M], dtype=tl.float32)
    kl_z = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_lo = pid_m * BLOCK_M
    writes_maps = (row_lo < w_stop) & (row_lo + BLOCK_M > w_start)
    if writes_maps:
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            s = _scores(q, k_base + offs_n[None, :] * stride_kn, mask_base + offs_n[None, :] * stride_mn,
                        offs_m, offs_n, M, N, scale,
                        (offs_d < HEAD_DIM)[:, None] & (offs_n < N)[None, :],
                        IS_CAUSAL, HAS_MASK, MASK_BOOL, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            if HAS_KL:
                kl_a, kl_b, kl_z = _kl_accumulate(t_base + offs_n[None, :] * stride_tn,
                                                  row_ok[:, None] & (offs_n < N)[None, :], s, m_i, m_safe,
                                                  kl_a, kl_b, kl_z)
            m_i = m_new
        m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
        log_l = tl.where(l_i == 0.0, float("inf"), tl.log(tl.where(l_i == 0.0, 1.0, l_i)))
        w_rows = (offs_m >= w_start) & (offs_m < w_stop)
        w_base = W + b * stride_wb + h * stride_wh + (offs_m - w_start)[:, None] * stride_wm
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            s = _scores(q, k_base + offs_n[None, :] * stride_kn, mask_base + offs_n[None, :] * stride_mn,
                        offs_m, offs_n, M, N, scale,
                        (offs_d < HEAD_DIM)[:, None] & (offs_n < N)[None, :],
                        IS_CAUSAL, HAS_MASK, MASK_BOOL, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
            p = tl.exp((s - m_fin[:, None]) - log_l[:, None]).to(W.dtype.element_ty)
            tl.store(w_base + offs_n[None, :] * stride_wn, p, mask=w_rows[:, None] & (offs_n < N)[None, :])
            v = tl.load(v_base + offs_n[:, None] * stride_vn,
                        mask=(offs_n < N)[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
            acc = _dot(p.to(V.dtype.element_ty), v, acc, DOT_FP32, PRECISION)
        # Causal rows have no keys past `hi`: their maps are zero there.
        for start_n in range(hi, N, BLOCK_N):
            offs_n = start_n + offs_n0
            tl.store(w_base + offs_n[None, :] * stride_wn, tl.zeros([BLOCK_M, BLOCK_N], dtype=W.dtype.element_ty),
                     mask=w_rows[:, None] & (offs_n < N)[None, :])
    else:
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            s = _scores(q, k_base + offs_n[None, :] * stride_kn, mask_base + offs_n[None, :] * stride_mn,
                        offs_m, offs_n, M, N, scale,
                        (offs_d < HEAD_DIM)[:, None] & (offs_n < N)[None, :],
                        IS_CAUSAL, HAS_MASK, MASK_BOOL, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_KL:
                kl_a, kl_b, kl_z = _kl_accumulate(t_base + offs_n[None, :] * stride_tn,
                                                  row_ok[:, None] & (offs_n < N)[None, :], s, m_i, m_safe,
                                                  kl_a, kl_b, kl_z)
            v = tl.load(v_base + offs_n[:, None] * stride_vn,
                        mask=(offs_n < N)[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
            acc = _dot(p.to(V.dtype.element_ty), v, acc * alpha[:, None], DOT_FP32, PRECISION)
            m_i = m_new
        m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
        log_l = tl.where(l_i == 0.0, float("inf"), tl.log(tl.where(l_i == 0.0, 1.0, l_i)))
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]

    stats = STATS + (pid_bh.to(tl.int64) * M + offs_m) * 2
    tl.store(stats, m_fin, mask=row_ok)
    tl.store(stats + 1, log_l, mask=row_ok)
    if HAS_KL:
        kl, tnorm = _kl_finish(kl_a, kl_b, kl_z, log_l)
        tl.store(KL + pid_bh.to(tl.int64) * M + offs_m, kl, mask=row_ok)
        tl.store(TNORM + pid_bh.to(tl.int64) * M + offs_m, tnorm, mask=row_ok)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])


@triton.jit
def attention_bwd_preprocess_kernel(
    OUT, DOUT, DELTA, Q, K, MASK, STATS, DW,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gn,
    H, GROUP, M, N, scale, w_start, w_stop,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_DW: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """DELTA (B, H, M) float32 = rowsum(dO * O) + rowsum(P * G), G = dL/dW on the map rows."""
    pid_m, pid_bh, b, h, offs_m, row_ok = _row_block(M, H, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ov_mask = row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                mask=ov_mask, other=0.0).to(tl.float32)
    do = tl.load(DOUT + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=ov_mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DW:
        row_lo = pid_m * BLOCK_M
        if (row_lo < w_stop) & (row_lo + BLOCK_M > w_start):
            hk = h // GROUP
            offs_n0 = tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
            m_row, log_l = _load_stats(STATS, pid_bh.to(tl.int64) * M, offs_m, row_ok)
            k_base = K + b * stride_kb + hk * stride_kh + offs_d[:, None] * stride_kd
            mask_base = MASK + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mm
            w_rows = (offs_m >= w_start) & (offs_m < w_stop)
            g_base = DW + b * stride_gb + h * stride_gh + (offs_m - w_start)[:, None] * stride_gm
            hi = N
            if IS_CAUSAL:
                hi = tl.minimum(N, (pid_m + 1) * BLOCK_M)
            for start_n in range(0, hi, BLOCK_N):
                offs_n = start_n + offs_n0
                s = _scores(q, k_base + offs_n[None, :] * stride_kn, mask_base + offs_n[None, :] * stride_mn,
                            offs_m, offs_n, M, N, scale,
                            (offs_d < HEAD_DIM)[:, None] & (offs_n < N)[None, :],
                            IS_CAUSAL, HAS_MASK, MASK_BOOL, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
                p = tl.exp((s - m_row[:, None]) - log_l[:, None])
                g = tl.load(g_base + offs_n[None, :] * stride_gn, mask=w_rows[:, None] & (offs_n < N)[None, :],
                            other=0.0).to(tl.float32)
                delta += tl.sum(p * g, 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * M + offs_m, delta, mask=row_ok)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, MASK, DOUT, DW, STATS, DELTA, DK, DV, T, TNORM, GKL,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_gb, stride_gh, stride_gm, stride_gn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_gklb, stride_gklh, stride_gklm,
    H, HKV, GROUP, M, N, scale, w_start, w_stop,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_DW: tl.constexpr,
    HAS_KL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key block, b, kv head): dV = sum P^T dO and dK = scale sum dS^T Q over the
    GROUP query heads sharing the kv head, so no atomics are needed."""
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    pid_bhk = pid // num_n_blocks
    b = (pid_bhk // HKV).to(tl.int64)
    hk = (pid_bhk % HKV).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_ok = offs_n < N
    k_t_ptrs = K + b * stride_kb + hk * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    k_t_mask = (offs_d < HEAD_DIM)[:, None] & key_ok[None, :]
    v_t = tl.load(V + b * stride_vb + hk * stride_vh + offs_dv[:, None] * stride_vd + offs_n[None, :] * stride_vn,
                  mask=(offs_dv < HEAD_DIM_V)[:, None] & key_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    lo = 0
    if IS_CAUSAL:
        # Query i sees key j only when j <= i: skip row blocks entirely above this key block.
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh + offs_d[None, :] * stride_qd
        do_base = DOUT + b * stride_dob + h * stride_doh + offs_dv[None, :] * stride_dod
        mask_base = MASK + b * stride_mb + h * stride_mh + offs_n[None, :] * stride_mn
        g_base = DW + b * stride_gb + h * stride_gh + offs_n[None, :] * stride_gn
        t_base = T + b * stride_tb + h * stride_th + offs_n[None, :] * stride_tn
        gkl_base = GKL + b * stride_gklb + h * stride_gklh
        row_stats = (b * H + h) * M
        for start_m in range(lo, M, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < M
            q = tl.load(q_base + offs_m[:, None] * stride_qm, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
                        other=0.0)
            s = _scores(q, k_t_ptrs, mask_base + offs_m[:, None] * stride_mm, offs_m, offs_n, M, N, scale,
                        k_t_mask, IS_CAUSAL, HAS_MASK, MASK_BOOL, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
            m_row, log_l = _load_stats(STATS, row_stats, offs_m, row_ok)
            p = tl.exp((s - m_row[:, None]) - log_l[:, None])
            do = tl.load(do_base + offs_m[:, None] * stride_dom, mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :],
                         other=0.0)
            dv = _dot(tl.trans(p.to(DOUT.dtype.element_ty)), do, dv, DOT_FP32, PRECISION)
            dp = _dot(do, v_t.to(DOUT.dtype.element_ty), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                      DOT_FP32, PRECISION)
            if HAS_DW:
                w_rows = (offs_m >= w_start) & (offs_m < w_stop)
                dp += tl.load(g_base + (offs_m - w_start)[:, None] * stride_gm, mask=w_rows[:, None] & key_ok[None, :],
                              other=0.0).to(tl.float32)
            delta = tl.load(DELTA + row_stats + offs_m, mask=row_ok, other=0.0)
            ds = p * (dp - delta[:, None])
            if HAS_KL:
                ds = _kl_grad(ds, p, s, t_base + offs_m[:, None] * stride_tm, row_ok[:, None] & key_ok[None, :],
                              tl.load(TNORM + row_stats + offs_m, mask=row_ok, other=float("-inf")),
                              tl.load(gkl_base + offs_m * stride_gklm, mask=row_ok, other=0.0).to(tl.float32))
            dk = _dot(tl.trans(ds.to(Q.dtype.element_ty)), q, dk, DOT_FP32, PRECISION)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=key_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, MASK, DOUT, DW, STATS, DELTA, DQ, DS, T, TNORM, GKL,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_gb, stride_gh, stride_gm, stride_gn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_gklb, stride_gklh, stride_gklm,
    H, GROUP, M, N, scale, w_start, w_stop,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_DW: tl.constexpr,
    HAS_KL: tl.constexpr, WRITE_DS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (row block, b, h): dQ = scale * dS K (dS including the fused KL's
    grad_kl * (P - T / Z) when HAS_KL). With WRITE_DS, also stores dS into the
    contiguous float32 buffer DS (B, H, M, N) (the gradient of an additive mask)."""
    pid_m, pid_bh, b, h, offs_m, row_ok = _row_block(M, H, BLOCK_M)
    hk = h // GROUP

    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    do = tl.load(DOUT + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
    row_stats = pid_bh.to(tl.int64) * M
    m_row, log_l = _load_stats(STATS, row_stats, offs_m, row_ok)
    delta = tl.load(DELTA + row_stats + offs_m, mask=row_ok, other=0.0)
    if HAS_KL:
        tnorm = tl.load(TNORM + row_stats + offs_m, mask=row_ok, other=float("-inf"))
        grad_kl = tl.load(GKL + b * stride_gklb + h * stride_gklh + offs_m * stride_gklm, mask=row_ok,
                          other=0.0).to(tl.float32)
    t_base = T + b * stride_tb + h * stride_th + offs_m[:, None] * stride_tm
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = MASK + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mm
    w_rows = (offs_m >= w_start) & (offs_m < w_stop)
    g_base = DW + b * stride_gb + h * stride_gh + (offs_m - w_start)[:, None] * stride_gm
    ds_base = DS + pid_bh.to(tl.int64) * M * N + offs_m[:, None] * N
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = N
    if IS_CAUSAL:
        hi = tl.minimum(N, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        key_ok = offs_n < N
        s = _scores(q, k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                    mask_base + offs_n[None, :] * stride_mn, offs_m, offs_n, M, N, scale,
                    (offs_d < HEAD_DIM)[:, None] & key_ok[None, :],
                    IS_CAUSAL, HAS_MASK, MASK_BOOL, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
        p = tl.exp((s - m_row[:, None]) - log_l[:, None])
        v_t = tl.load(v_base + offs_dv[:, None] * stride_vd + offs_n[None, :] * stride_vn,
                      mask=(offs_dv < HEAD_DIM_V)[:, None] & key_ok[None, :], other=0.0)
        dp = _dot(do, v_t.to(DOUT.dtype.element_ty), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                  DOT_FP32, PRECISION)
        if HAS_DW:
            dp += tl.load(g_base + offs_n[None, :] * stride_gn, mask=w_rows[:, None] & key_ok[None, :],
                          other=0.0).to(tl.float32)
        ds = p * (dp - delta[:, None])
        if HAS_KL:
            ds = _kl_grad(ds, p, s, t_base + offs_n[None, :] * stride_tn, row_ok[:, None] & key_ok[None, :],
                          tnorm, grad_kl)
        if WRITE_DS:
            tl.store(ds_base + offs_n[None, :], ds, mask=row_ok[:, None] & key_ok[None, :])
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=key_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        dq = _dot(ds.to(K.dtype.element_ty), k, dq, DOT_FP32, PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
