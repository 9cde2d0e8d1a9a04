"""Triton kernels for attention that can also write its exact softmax maps.

Notation (per batch b, query head h, kv head h // GROUP): S = scale * Q K^T + mask, P = softmax(S),
O = P V. Each row's softmax statistics are stored as STATS (B, H, M, 2) float32: the row max m and
log l, l = sum exp(S - m), in natural units, as every backend (why a pair, and (0, +inf) on rows with
no attended key: lfi._numerics).

Units inside the kernels (why two): without a float mask the scores are bounded by |scale q.k|, so
the loops work in base 2 like FlashAttention: the raw q.k tile is scaled by qk_scale2 = |scale| *
log2(e) in the same fused multiply-add that subtracts the row max, and exp2 is one MUFU.EX2. A float
mask can hold finfo.min, which overflows when multiplied by log2(e): those kernels keep the scores
and the row max in natural units (s = qk_scale * q.k + mask) and scale the *difference* s - m by
log2(e) before exp2, which never overflows. The FLOAT_MASK constexpr selects the units; the stored
statistics are natural in both.

A negative scale is applied by negating q on load (exact), so the row max of a tile is max(q.k) *
qk_scale2 with qk_scale2 >= 0 (Q_SIGN = -1; Q_SIGN = 0 for scale = 0, where every score is 0).

Loop structure: key (or query) blocks that cannot cross N, M or the causal diagonal run in a main
loop without bounds or causal predicates; the one ragged block and the diagonal blocks run after it
(EDGE tiles, unrolled, so each kernel keeps one loop per pass; dK/dV with grouped heads or the 16-bit
fused KL runs its edge tiles in a second loop, see attention_bwd_dkdv_kernel). Keys above the causal diagonal are
never visited. A key-padding mask (stride 0 along the query rows, e.g. (B, 1, 1, N)) is read as one
vector per key block (KEY_MASK). WRITE_MAPS, HAS_KL, HAS_DW and the mask kinds are constexprs: a
call without maps compiles no maps code.

All tensors are read through their strides (masks broadcast with stride 0); batch and head
offsets are computed in int64 because maps of (B, H, N, N) overflow int32 offsets. Programs are
laid out on a 1-D grid with the row blocks of one (b, h) adjacent, so they share K/V in L2.

Kernels know nothing of autograd or modules: lfi.backends.triton launches them.
"""
import triton
import triton.language as tl

from . import INTERPRET

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# _fwd_pass modes: one online pass (out only), or the two passes of rows that write maps.
ONLINE = tl.constexpr(0)
STATS_ONLY = tl.constexpr(1)
MAPS = tl.constexpr(2)
# WRITE_MAPS values: no maps, maps of a window of rows (other row blocks take the online pass), all rows.
MAPS_NONE = tl.constexpr(0)
MAPS_SOME_ROWS = tl.constexpr(1)
MAPS_ALL_ROWS = tl.constexpr(2)
# lg2.approx (inline PTX) when compiled; the interpreter cannot run inline assembly.
FAST_LOG2 = tl.constexpr(not INTERPRET)
# Float32 without TF32 (PRECISION "3xtf32", see _dot_parts): every product is three TF32 products of
# high and low parts. The parts of Q, K, V and dO are split once by tf32_split_kernel (the launcher
# puts each tensor's low part LO elements after its high part, so `ptrs + LO` reads it); only the
# computed P and dS are split in the kernels (_parts). Split operands straight from a load are what lets sm_90 read
# the resident tiles (K, V in dK/dV; Q, dO in dQ; Q forward) from shared memory in its warpgroup
# products: split in registers, a warp held every row of its warp-row in both parts (~256 registers
# for dK/dV's four, spilling at every tile once causal, GQA or D = 128).


@triton.jit
def _log2(x):
    """log2 of float32 x > 0. Compiled: lg2.approx.f32, one MUFU.LG2 plus a rescale of subnormal
    inputs (absolute error <= 2^-22 for x in [0.5, 2], else <= 2 ulp: at most ~1e-7 on a row's KL,
    below the float32 rounding of its terms), where tl.log2 lowers to a ~28-instruction polynomial
    that made up half of the forward's instructions with a probability target (t log t per key).
    Only target entropies use it, never the row statistics. tl.log2 under the interpreter."""
    if FAST_LOG2:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


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
def _key_block(N, HKV, BLOCK_N: tl.constexpr):
    """This program's key block in the 1-D grid of (key block, b, kv head), the key blocks of one
    (b, kv head) adjacent: (pid_n, b, hk), b and hk as int64 (see _row_block)."""
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_bhk = pid // num_n_blocks
    return pid % num_n_blocks, (pid_bhk // HKV).to(tl.int64), (pid_bhk % HKV).to(tl.int64)


@triton.jit
def _tf32_round(x):
    """float32 x rounded to the nearest TF32 value (10 mantissa bits, ties away from zero; inf and NaN
    kept): the low 13 mantissa bits cleared after adding half of their unit."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_parts(x):
    """(hi, lo), both exact in TF32, x = hi + lo within 2^-22 |x|, hi the nearest TF32 value: a
    tensor core that reads TF32 operands (ignoring the low 13 bits) multiplies them exactly, as the
    CPU interpreter does. Non-finite x gives (0, x), so that a product with a finite b = (b_hi, b_lo)
    reads x * b_hi (±inf, or NaN where b_hi = 0, as IEEE): as (x, 0) the product hi * b_lo would be
    inf * 0 = NaN wherever b is exact in TF32 (inf * inf inside one product gives NaN, not inf: README,
    Triton kernels). The test is on x, not on hi: the rounding carries the GPUs' canonical NaN
    0x7FFFFFFF into the sign bit (-0.0); the finite x within half a TF32 ulp of the float32 maximum,
    whose rounding overflows, also give (0, x) (then read truncated: 2^-10 relative)."""
    hi = _tf32_round(x)
    ok = (tl.abs(x) < float("inf")) & (tl.abs(hi) < float("inf"))
    return tl.where(ok, hi, 0.0), tl.where(ok, _tf32_round(x - hi), x)


@triton.jit
def _tf32_parts_in_registers(x, MAY_BE_INF: tl.constexpr):
    """(hi, lo) of a tile computed in the kernel, both exact in TF32, x = hi + lo within 2^-22 |x|,
    for fewer instructions than _tf32_parts (these splits run once per score): hi is x truncated
    (never overflows, and keeps a NaN whose payload has high bits, as every NaN the kernels compute:
    0x7FFFFFFF on GPUs, 0x7FC00000 under the interpreter), so the dropped lo * lo term is at most
    2^-21 of the product instead of 2^-22. MAY_BE_INF (dS): non-finite x gives (0, x) as in
    _tf32_parts; without it (P, which is <= 1 or NaN) a NaN x gives (NaN, any), NaN either way."""
    hi = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    lo = _tf32_round(x - hi)
    if MAY_BE_INF:
        ok = tl.abs(x) < float("inf")
        hi, lo = tl.where(ok, hi, 0.0), tl.where(ok, lo, x)
    return hi, lo


@triton.jit
def tf32_split_kernel(X, PARTS, n, LO, BLOCK: tl.constexpr):
    """PARTS[i] = hi and PARTS[i + LO] = lo of X[i] (_tf32_parts) for i < n; X contiguous float32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    hi, lo = _tf32_parts(tl.load(X + offs, mask=ok))
    tl.store(PARTS + offs, hi, mask=ok)
    tl.store(PARTS + LO + offs, lo, mask=ok)


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with tl.dot's input precision PRECISION (float32 operands; 16-bit ones ignore it)."""
    # The CPU interpreter multiplies raw bf16 bits in tl.dot, so it gets float32 operands.
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _dot_parts(a, a_lo, b, b_lo, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. With PRECISION "3xtf32", a and b are exact TF32 high parts and a_lo, b_lo their
    low parts (from _parts or tf32_split_kernel): hi*lo + lo*hi + hi*hi on TF32 tensor cores, each
    product exact, within a few float32 ulps of a @ b. Otherwise a_lo and b_lo are not read."""
    if PRECISION == "3xtf32":
        # In the attention kernels Triton's own "tf32x3" costs more SASS per score (dK/dV 32x128 w8
        # 2.69 vs 1.71, dQ 128x64 w8 1.45 vs 0.99, measured with the parts split in registers).
        acc = tl.dot(a, b_lo, acc, input_precision="tf32")
        acc = tl.dot(a_lo, b, acc, input_precision="tf32")
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = _dot(a, b, acc, DOT_FP32, PRECISION)
    return acc


@triton.jit
def _parts(x, MAY_BE_INF: tl.constexpr, PRECISION: tl.constexpr):
    """(hi, lo) of a computed float32 operand with PRECISION "3xtf32" (_tf32_parts_in_registers),
    else (x, x)."""
    if PRECISION == "3xtf32":
        return _tf32_parts_in_registers(x, MAY_BE_INF)
    else:
        return x, x


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """A 2-D tile, predicated only along the dims that can run out of bounds (zeros there)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_operand(ptrs, LO, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr,
                  PRECISION: tl.constexpr):
    """(x, x_lo): a product's operand tile (_load_tile) and, with PRECISION "3xtf32", its low part LO
    elements further on (see tf32_split_kernel); else (x, x)."""
    x = _load_tile(ptrs, row_ok, col_ok, CHECK_ROWS, CHECK_COLS)
    if PRECISION == "3xtf32":
        return x, _load_tile(ptrs + LO, row_ok, col_ok, CHECK_ROWS, CHECK_COLS)
    else:
        return x, x


@triton.jit
def _signed(q, Q_SIGN: tl.constexpr):
    """q * sign(scale), exactly (see the module docstring)."""
    if Q_SIGN == -1:
        q = -q
    elif Q_SIGN == 0:
        q = tl.zeros_like(q)
    return q


@triton.jit
def _load_q(ptrs, LO, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr, Q_SIGN: tl.constexpr,
            PRECISION: tl.constexpr):
    """(q, q_lo) of _load_operand, both multiplied by sign(scale) (_signed)."""
    q, q_lo = _load_operand(ptrs, LO, row_ok, col_ok, CHECK_ROWS, CHECK_COLS, PRECISION)
    return _signed(q, Q_SIGN), _signed(q_lo, Q_SIGN)


@triton.jit
def _apply_mask(s, mvals, qk_scale, MASK_BOOL: tl.constexpr):
    """Raw q.k tile -> -inf where a bool mask is False; natural-unit qk_scale * q.k + mask with a
    float mask (mvals broadcast to s's shape)."""
    if MASK_BOOL:
        s = tl.where(mvals != 0, s, float("-inf"))
    else:
        s = s * qk_scale + mvals.to(tl.float32)
    return s


@triton.jit
def _mask_scores(s, mask_ptrs, offs_m, offs_n, row_ok, key_ok, qk_scale,
                 EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                 KEY_MASK: tl.constexpr):
    """Masks the raw q.k tile s (BLOCK_M, BLOCK_N) of the rows offs_m: see _apply_mask; keys past N
    and above the causal diagonal are -inf on EDGE tiles (the only tiles that can have them).
    mask_ptrs: this tile's mask, (BLOCK_N,) pointers with KEY_MASK, else (BLOCK_M, BLOCK_N)."""
    if HAS_MASK:
        if KEY_MASK:
            if EDGE:
                mvals = tl.load(mask_ptrs, mask=key_ok, other=0)
            else:
                mvals = tl.load(mask_ptrs)
            s = _apply_mask(s, mvals[None, :], qk_scale, MASK_BOOL)
        else:
            s = _apply_mask(s, _load_tile(mask_ptrs, row_ok, key_ok, True, EDGE), qk_scale, MASK_BOOL)
    if EDGE:
        valid = key_ok[None, :]
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _probs(s, row_a, row_b, qk_scale2, FLOAT_MASK: tl.constexpr):
    """Exact P of a score tile from per-row offsets broadcast to the tile's shape (see _row_offsets)."""
    if FLOAT_MASK:
        return tl.math.exp2((s - row_a) * LOG2E - row_b)
    else:
        return tl.math.exp2(s * qk_scale2 - row_a)


@triton.jit
def _row_offsets(STATS, rows, row_ok, FLOAT_MASK: tl.constexpr):
    """Per-row offsets for _probs from the stored natural (m, log l): base 2 row_a = (m + log l)
    log2(e); with a float mask, row_a = m (natural) and row_b = log2 l. Rows past M read as empty
    rows (0, +inf), so their P is 0."""
    ptrs = STATS + rows * 2
    m = tl.load(ptrs, mask=row_ok, other=0.0)
    log_l = tl.load(ptrs + 1, mask=row_ok, other=float("inf"))
    if FLOAT_MASK:
        return m, log_l * LOG2E
    else:
        return (m + log_l) * LOG2E, log_l


@triton.jit
def _empty_rows(l_i, HAS_MASK: tl.constexpr):
    """Rows with no attended key (l == 0): zeros in out and the maps, (0, +inf) statistics. Only a
    mask can empty a row (top-left causal rows always attend key 0): without one, l == 0 means every
    score is -inf because of infinite q or k, and the row is NaN, as in eager softmax (log l = -inf
    then makes P = exp(-inf + inf) and out = 0 / 0 NaN). A NaN l is never empty."""
    if HAS_MASK:
        return l_i == 0.0
    else:
        return l_i < float("-inf")  # all False (also for NaN)


@triton.jit
def _kl_target(t_ptrs, row_ok, key_ok, s, EDGE: tl.constexpr, HAS_MASK: tl.constexpr):
    """Target tile (float32), zero on the keys the student does not attend (s = -inf)."""
    t = _load_tile(t_ptrs, row_ok, key_ok, True, EDGE).to(tl.float32)
    # A float32 target always goes through the select: Triton 3.8's thread-locality pass rewrites a
    # loop sum of a loaded tile (tl.sum(t, 1) into kl_z) and aborts the compile, kl_z being read twice.
    if EDGE or HAS_MASK or t_ptrs.dtype.element_ty == tl.float32:
        t = tl.where(s > float("-inf"), t, 0.0)
    return t


@triton.jit
def _ones_column(BLOCK_N: tl.constexpr):
    """(BLOCK_N, 16) float16, ones in column 0 and zeros elsewhere: P @ it is P's row sums (the
    smallest tile tl.dot takes). The stats pass of the maps forward sums its rows so, on the tensor
    cores, which that pass otherwise leaves idle, instead of one float32 add per score. P is rounded to
    float16 first (P <= 1: relative error <= 2^-11 per term, rounded to nearest, so l's error is far
    below the 16-bit outputs' and maps' rounding); the sums accumulate in float32."""
    cols = tl.arange(0, 16)
    return tl.where((cols[None, :] == 0) & (tl.arange(0, BLOCK_N)[:, None] >= 0), 1.0, 0.0).to(tl.float16)


@triton.jit
def _fwd_tile(q, q_lo, LO, start_n, k_base, v_base, k_offs, v_offs, mask_base, t_base, w_base, offs_m, row_ok, w_rows,
              m_i, l_i, acc, kl_a, kl_b, kl_z, row_a, row_b,
              stride_kn, stride_vn, stride_mn, stride_tn, stride_wn, N, qk_scale, qk_scale2,
              PASS: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
              MASK_BOOL: tl.constexpr, KEY_MASK: tl.constexpr, FLOAT_MASK: tl.constexpr, HAS_KL: tl.constexpr,
              ROWSUM_MMA: tl.constexpr,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of a forward pass. ONLINE / STATS_ONLY: online row max m_i and sum l_i (in the
    kernel's units), and for ONLINE the unnormalised acc; STATS_ONLY with ROWSUM_MMA keeps the sums
    in column 0 of acc (BLOCK_M, 16) instead of l_i; MAPS: P from the final offsets, written to the
    map rows and accumulated into acc."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < N
    # Block base (scalar) + loop-invariant tile offsets: the addresses cost one add per iteration.
    k_t, k_t_lo = _load_operand(k_base + start_n * stride_kn + k_offs, LO,
                                offs_d < HEAD_DIM, key_ok, BLOCK_D != HEAD_DIM, EDGE, PRECISION)
    if KEY_MASK:
        mask_ptrs = mask_base + offs_n * stride_mn
    else:
        mask_ptrs = mask_base + offs_n[None, :] * stride_mn
    s = _dot_parts(q, q_lo, k_t, k_t_lo, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)
    s = _mask_scores(s, mask_ptrs, offs_m, offs_n, row_ok, key_ok, qk_scale,
                     EDGE, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK)
    if PASS == MAPS:
        p = _probs(s, row_a[:, None], row_b[:, None], qk_scale2, FLOAT_MASK).to(w_base.dtype.element_ty)
        if EDGE:
            tl.store(w_base + offs_n[None, :] * stride_wn, p, mask=w_rows[:, None] & key_ok[None, :])
        else:
            tl.store(w_base + offs_n[None, :] * stride_wn, p, mask=w_rows[:, None])
        offs_dv = tl.arange(0, BLOCK_DV)
        v, v_lo = _load_operand(v_base + start_n * stride_vn + v_offs, LO,
                                key_ok, offs_dv < HEAD_DIM_V, EDGE, BLOCK_DV != HEAD_DIM_V, PRECISION)
        p_hi, p_lo = _parts(p.to(v.dtype), False, PRECISION)
        acc = _dot_parts(p_hi, p_lo, v, v_lo, acc, DOT_FP32, PRECISION)
    else:
        if FLOAT_MASK:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2((s - m_safe[:, None]) * LOG2E)
            alpha = tl.math.exp2((m_i - m_safe) * LOG2E)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale2)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s * qk_scale2 - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        if PASS == STATS_ONLY and ROWSUM_MMA:
            # The row sums on the tensor cores, idle in this pass (acc is a (BLOCK_M, 16) float32
            # accumulator here; see _ones_column): one matrix product per tile instead of a float32 add per score.
            acc = _dot(p.to(tl.float16), _ones_column(BLOCK_N), acc * alpha[:, None], DOT_FP32, PRECISION)
        else:
            l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_KL:
            # Online pieces of KL(t || softmax(s)): kl_a = sum t ln t, kl_b = sum t (s - m) centred on
            # the running max (in the kernel's units), kl_z = sum t.
            t = _kl_target(t_base + offs_n[None, :] * stride_tn, row_ok, key_ok, s, EDGE, HAS_MASK)
            # `!= 0`, not `> 0`: a negative probability (not checked on a GPU: it would synchronise,
            # see lfi.ops._kl) makes the row's KL NaN through its log, as F.kl_div, never a wrong number.
            pos = t != 0.0
            if FLOAT_MASK:
                s_units = s
            else:
                s_units = s * qk_scale2
            m_prev = tl.where(m_i == float("-inf"), 0.0, m_i)
            kl_b = kl_b + (m_prev - m_safe) * kl_z + tl.sum(t * tl.where(pos, s_units - m_safe[:, None], 0.0), 1)
            kl_a = kl_a + tl.sum(t * _log2(tl.where(pos, t, 1.0)), 1) * LN2
            kl_z = kl_z + tl.sum(t, 1)
        if PASS == ONLINE:
            offs_dv = tl.arange(0, BLOCK_DV)
            v, v_lo = _load_operand(v_base + start_n * stride_vn + v_offs, LO,
                                    key_ok, offs_dv < HEAD_DIM_V, EDGE, BLOCK_DV != HEAD_DIM_V, PRECISION)
            acc = acc * alpha[:, None]
            p_hi, p_lo = _parts(p.to(v.dtype), False, PRECISION)
            acc = _dot_parts(p_hi, p_lo, v, v_lo, acc, DOT_FP32, PRECISION)
        m_i = m_new
    return m_i, l_i, acc, kl_a, kl_b, kl_z


@triton.jit
def _fwd_pass(q, q_lo, LO, row_lo, k_base, v_base, k_offs, v_offs, mask_base, t_base, w_base, offs_m, row_ok, w_rows,
              m_i, l_i, acc, kl_a, kl_b, kl_z, row_a, row_b,
              stride_kn, stride_vn, stride_mn, stride_tn, stride_wn, N, qk_scale, qk_scale2,
              PASS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
              KEY_MASK: tl.constexpr, FLOAT_MASK: tl.constexpr, HAS_KL: tl.constexpr, ROWSUM_MMA: tl.constexpr,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """All key blocks of one pass for the rows [row_lo, row_lo + BLOCK_M): the full blocks below the
    diagonal in the main loop, then the ragged / diagonal blocks as EDGE tiles."""
    if IS_CAUSAL:
        hi = tl.minimum(N, row_lo + BLOCK_M)
        main_end = tl.minimum((N // BLOCK_N) * BLOCK_N, (row_lo // BLOCK_N) * BLOCK_N)
    else:
        hi = N
        main_end = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, main_end, BLOCK_N):
        m_i, l_i, acc, kl_a, kl_b, kl_z = _fwd_tile(
            q, q_lo, LO, start_n, k_base, v_base, k_offs, v_offs, mask_base, t_base, w_base, offs_m, row_ok, w_rows,
            m_i, l_i, acc, kl_a, kl_b, kl_z, row_a, row_b,
            stride_kn, stride_vn, stride_mn, stride_tn, stride_wn, N, qk_scale, qk_scale2,
            PASS, False, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK, FLOAT_MASK, HAS_KL, ROWSUM_MMA,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
    # Edge blocks: the ragged last block, or the (cdiv(BLOCK_M, BLOCK_N)) blocks on the diagonal.
    for i in tl.static_range((BLOCK_M + BLOCK_N - 1) // BLOCK_N if IS_CAUSAL else 1):
        start_n = main_end + i * BLOCK_N
        if start_n < hi:
            m_i, l_i, acc, kl_a, kl_b, kl_z = _fwd_tile(
                q, q_lo, LO, start_n, k_base, v_base, k_offs, v_offs, mask_base, t_base, w_base, offs_m, row_ok, w_rows,
                m_i, l_i, acc, kl_a, kl_b, kl_z, row_a, row_b,
                stride_kn, stride_vn, stride_mn, stride_tn, stride_wn, N, qk_scale, qk_scale2,
                PASS, True, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK, FLOAT_MASK, HAS_KL, ROWSUM_MMA,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
    return m_i, l_i, acc, kl_a, kl_b, kl_z


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
    H, GROUP, M, N, qk_scale, qk_scale2, w_start, w_stop, M_BUCKET, N_BUCKET, LO,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, KEY_MASK: tl.constexpr,
    FLOAT_MASK: tl.constexpr, HAS_KL: tl.constexpr, WRITE_MAPS: tl.constexpr, Q_SIGN: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (row block, b, h). Writes OUT (B, H, M, Dv), STATS (B, H, M, 2) and, with
    WRITE_MAPS (MAPS_SOME_ROWS, or MAPS_ALL_ROWS when [w_start, w_stop) = [0, M)), the exact maps
    W (B, H, w_stop - w_start, N) of the rows in [w_start, w_stop).

    Row blocks that overlap the map rows take two passes over the keys: the first finds the row
    max and sum, the second computes P exactly, writes it, and accumulates P V. The other row blocks
    take the usual single online-softmax pass.
    With HAS_KL, the same pass also computes KL(T || P) per row into KL (B, H, M) and the log of
    the target mass into TNORM (B, H, M), T (B, H, M, N) being target probabilities read through
    strides (restricted to the attended keys and renormalised there).
    The last dim of Q, K, V, OUT and the key dim of T are contiguous (the launcher ensures it).
    M_BUCKET and N_BUCKET only key the autotuner. LO: with PRECISION "3xtf32", Q, K and V are TF32
    high parts whose low parts lie LO elements further on (see _dot_parts).
    """
    pid_m, pid_bh, b, h, offs_m, row_ok = _row_block(M, H, BLOCK_M)
    hk = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_lo = pid_m * BLOCK_M

    q, q_lo = _load_q(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                      LO, row_ok, offs_d < HEAD_DIM, True, BLOCK_D != HEAD_DIM, Q_SIGN, PRECISION)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    arange_n = tl.arange(0, BLOCK_N)
    k_offs = offs_d[:, None] * stride_kd + arange_n[None, :] * stride_kn
    v_offs = arange_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    if KEY_MASK:
        mask_base = MASK + b * stride_mb + h * stride_mh
    else:
        mask_base = MASK + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mm
    t_base = T + b * stride_tb + h * stride_th + offs_m[:, None] * stride_tm
    w_rows = (offs_m >= w_start) & (offs_m < w_stop)
    w_base = W + b * stride_wb + h * stride_wh + (offs_m - w_start)[:, None] * stride_wm

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    kl_a = tl.zeros([BLOCK_M], dtype=tl.float32)
    kl_b = tl.zeros([BLOCK_M], dtype=tl.float32)
    kl_z = tl.zeros([BLOCK_M], dtype=tl.float32)
    if WRITE_MAPS == MAPS_ALL_ROWS:
        in_window = True
    elif WRITE_MAPS == MAPS_SOME_ROWS:
        in_window = (row_lo < w_stop) & (row_lo + BLOCK_M > w_start)
    else:
        in_window = False
    if in_window:
        # 16-bit inputs: the stats pass sums rows on the tensor cores (see _ones_column).
        ROWSUM_MMA: tl.constexpr = Q.dtype.element_ty != tl.float32
        m_i, l_i, l_acc, kl_a, kl_b, kl_z = _fwd_pass(
            q, q_lo, LO, row_lo, k_base, v_base, k_offs, v_offs, mask_base, t_base, w_base, offs_m, row_ok, w_rows,
            m_i, l_i, tl.zeros([BLOCK_M, 16], dtype=tl.float32), kl_a, kl_b, kl_z, m_i, l_i,
            stride_kn, stride_vn, stride_mn, stride_tn, stride_wn, N, qk_scale, qk_scale2,
            STATS_ONLY, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK, FLOAT_MASK, HAS_KL, ROWSUM_MMA,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
        if ROWSUM_MMA:
            l_i = tl.sum(l_acc, 1)  # column 0 holds the sums, the others exact zeros
        empty = _empty_rows(l_i, HAS_MASK)
        log2_l = tl.where(empty, float("inf"), tl.math.log2(tl.where(empty, 1.0, l_i)))
        if FLOAT_MASK:
            row_a = tl.where(empty, 0.0, m_i)
            row_b = log2_l
        else:
            row_a = tl.where(empty, 0.0, m_i) + log2_l
            row_b = log2_l
        m_i, l_i, acc, kl_a, kl_b, kl_z = _fwd_pass(
            q, q_lo, LO, row_lo, k_base, v_base, k_offs, v_offs, mask_base, t_base, w_base, offs_m, row_ok, w_rows,
            m_i, l_i, acc, kl_a, kl_b, kl_z, row_a, row_b,
            stride_kn, stride_vn, stride_mn, stride_tn, stride_wn, N, qk_scale, qk_scale2,
            MAPS, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK, FLOAT_MASK, HAS_KL, False,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
        if IS_CAUSAL:
            # Causal rows have no keys past the diagonal: their maps are zero there, NaN on a NaN row
            # (l NaN, or l = 0 without a mask: its whole row is NaN, as eager softmax; README "Numerics").
            nan_row = (l_i != l_i) | ((l_i == 0.0) & ~empty)
            zeros = tl.where(nan_row[:, None], float("nan"), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
            zeros = zeros.to(W.dtype.element_ty)
            for start_n in range(tl.minimum(N, row_lo + BLOCK_M), N, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                tl.store(w_base + offs_n[None, :] * stride_wn, zeros, mask=w_rows[:, None] & (offs_n < N)[None, :])
        out = acc
    else:
        m_i, l_i, acc, kl_a, kl_b, kl_z = _fwd_pass(
            q, q_lo, LO, row_lo, k_base, v_base, k_offs, v_offs, mask_base, t_base, w_base, offs_m, row_ok, w_rows,
            m_i, l_i, acc, kl_a, kl_b, kl_z, m_i, l_i,
            stride_kn, stride_vn, stride_mn, stride_tn, stride_wn, N, qk_scale, qk_scale2,
            ONLINE, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK, FLOAT_MASK, HAS_KL, False,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
        out = acc * (1.0 / tl.where(_empty_rows(l_i, HAS_MASK), 1.0, l_i))[:, None]

    empty = _empty_rows(l_i, HAS_MASK)
    log_l = tl.where(empty, float("inf"), tl.log(tl.where(empty, 1.0, l_i)))
    if FLOAT_MASK:
        m_nat = tl.where(empty, 0.0, m_i)
    else:
        m_nat = tl.where(empty, 0.0, m_i * LN2)
    rows = pid_bh.to(tl.int64) * M + offs_m
    tl.store(STATS + rows * 2, m_nat, mask=row_ok)
    tl.store(STATS + rows * 2 + 1, log_l, mask=row_ok)
    if HAS_KL:
        # KL = A/Z - ln Z + ln l - B/Z (B converted to natural units); rows without target mass give
        # KL 0 and TNORM -inf. `!= 0`, not `> 0`: a NaN in the target (Z = NaN) gives KL NaN, as F.kl_div.
        has_mass = kl_z != 0.0
        z = tl.where(has_mass, kl_z, 1.0)
        if FLOAT_MASK:
            b_nat = kl_b
        else:
            b_nat = kl_b * LN2
        kl = kl_a / z - tl.log(z) + tl.where(empty, 0.0, log_l) - b_nat / z
        tl.store(KL + rows, tl.where(has_mass, kl, 0.0), mask=row_ok)
        # Z = +inf (a +inf target weight): TNORM NaN, so that the row's gradient is NaN at every key.
        tnorm = tl.where(kl_z == float("inf"), float("nan"), tl.log(z))
        tl.store(TNORM + rows, tl.where(has_mass, tnorm, float("-inf")), mask=row_ok)
    # Rows without an attended key are exactly 0, even where acc holds 0 * NaN (a NaN in V at a key the
    # row does not attend); a NaN row (l NaN) keeps its NaN (README "Numerics"). Chosen on the sm_90
    # SASS (bf16 D64, benchmarks/kernel_report.py) so that the main loops stay instruction for
    # instruction as they were: without maps a select on out; with maps (where a select cost the maps
    # pass's loop 8 instructions at 254 registers, and complementary store masks cost the key-padding
    # case's first loop 10) every row is stored, then the empty rows are overwritten with zeros (the
    # same thread stores both, in program order).
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    dv_ok = (offs_dv < HEAD_DIM_V)[None, :]
    if WRITE_MAPS == MAPS_NONE:
        tl.store(o_ptrs, tl.where(empty[:, None], 0.0, out).to(OUT.dtype.element_ty), mask=row_ok[:, None] & dv_ok)
    else:
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dv_ok)
        tl.store(o_ptrs, tl.zeros_like(out).to(OUT.dtype.element_ty), mask=(row_ok & empty)[:, None] & dv_ok)


@triton.jit
def _delta_tile(q, q_lo, LO, start_n, k_base, k_offs, mask_base, g_base, offs_m, row_ok, w_rows, row_a, row_b, delta,
                stride_kn, stride_mn, stride_gn, N, qk_scale, qk_scale2,
                EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                KEY_MASK: tl.constexpr, FLOAT_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """delta += rowsum(P * G) over one key block of the map rows."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < N
    k_t, k_t_lo = _load_operand(k_base + start_n * stride_kn + k_offs, LO, offs_d < HEAD_DIM, key_ok,
                                BLOCK_D != HEAD_DIM, EDGE, PRECISION)
    if KEY_MASK:
        mask_ptrs = mask_base + offs_n * stride_mn
    else:
        mask_ptrs = mask_base + offs_n[None, :] * stride_mn
    s = _dot_parts(q, q_lo, k_t, k_t_lo, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)
    s = _mask_scores(s, mask_ptrs, offs_m, offs_n, row_ok, key_ok, qk_scale,
                     EDGE, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK)
    p = _probs(s, row_a[:, None], row_b[:, None], qk_scale2, FLOAT_MASK)
    g = _load_tile(g_base + offs_n[None, :] * stride_gn, w_rows, key_ok, True, EDGE).to(tl.float32)
    return delta + tl.sum(p * g, 1)


@triton.jit
def attention_bwd_preprocess_kernel(
    OUT, DOUT, DELTA, Q, K, MASK, STATS, DW,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gn,
    H, GROUP, M, N, qk_scale, qk_scale2, w_start, w_stop, M_BUCKET, N_BUCKET, LO,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, KEY_MASK: tl.constexpr,
    FLOAT_MASK: tl.constexpr, HAS_DW: tl.constexpr, HAS_DO: tl.constexpr, Q_SIGN: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """DELTA (B, H, M) float32 = rowsum(dO * O) + rowsum(P * G), G = dL/dW on the map rows; without
    HAS_DO (no gradient reaches out) the first term is 0 and OUT, DOUT are not read. LO: see
    attention_fwd_kernel (Q and K only; DOUT is read as given)."""
    pid_m, pid_bh, b, h, offs_m, row_ok = _row_block(M, H, BLOCK_M)
    if HAS_DO:
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < HEAD_DIM_V
        o = _load_tile(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                       + offs_dv[None, :] * stride_od, row_ok, dv_ok, True, BLOCK_DV != HEAD_DIM_V).to(tl.float32)
        do = _load_tile(DOUT + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                        + offs_dv[None, :] * stride_dod, row_ok, dv_ok, True, BLOCK_DV != HEAD_DIM_V).to(tl.float32)
        delta = tl.sum(o * do, 1)
    else:
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    rows = pid_bh.to(tl.int64) * M + offs_m
    if HAS_DW:
        row_lo = pid_m * BLOCK_M
        if (row_lo < w_stop) & (row_lo + BLOCK_M > w_start):
            hk = h // GROUP
            offs_d = tl.arange(0, BLOCK_D)
            q, q_lo = _load_q(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                              + offs_d[None, :] * stride_qd, LO, row_ok, offs_d < HEAD_DIM, True, BLOCK_D != HEAD_DIM,
                              Q_SIGN, PRECISION)
            row_a, row_b = _row_offsets(STATS, rows, row_ok, FLOAT_MASK)
            k_base = K + b * stride_kb + hk * stride_kh
            k_offs = offs_d[:, None] * stride_kd + tl.arange(0, BLOCK_N)[None, :] * stride_kn
            if KEY_MASK:
                mask_base = MASK + b * stride_mb + h * stride_mh
            else:
                mask_base = MASK + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mm
            w_rows = (offs_m >= w_start) & (offs_m < w_stop)
            g_base = DW + b * stride_gb + h * stride_gh + (offs_m - w_start)[:, None] * stride_gm
            if IS_CAUSAL:
                hi = tl.minimum(N, row_lo + BLOCK_M)
                main_end = tl.minimum((N // BLOCK_N) * BLOCK_N, (row_lo // BLOCK_N) * BLOCK_N)
            else:
                hi = N
                main_end = (N // BLOCK_N) * BLOCK_N
            for start_n in range(0, main_end, BLOCK_N):
                delta = _delta_tile(q, q_lo, LO, start_n, k_base, k_offs, mask_base, g_base, offs_m, row_ok, w_rows,
                                    row_a, row_b, delta, stride_kn, stride_mn, stride_gn, N, qk_scale, qk_scale2,
                                    False, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK, FLOAT_MASK, HEAD_DIM, BLOCK_D,
                                    DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
            for i in tl.static_range((BLOCK_M + BLOCK_N - 1) // BLOCK_N if IS_CAUSAL else 1):
                start_n = main_end + i * BLOCK_N
                if start_n < hi:
                    delta = _delta_tile(q, q_lo, LO, start_n, k_base, k_offs, mask_base, g_base, offs_m, row_ok,
                                        w_rows, row_a, row_b, delta, stride_kn, stride_mn, stride_gn, N, qk_scale,
                                        qk_scale2, True, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK, FLOAT_MASK,
                                        HEAD_DIM, BLOCK_D, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
    tl.store(DELTA + rows, delta, mask=row_ok)


@triton.jit
def _dkdv_tile(k, k_lo, v, v_lo, LO, dk, dv, start_m, q_base, q_offs, do_base, do_offs, dq_base, dq_offs, mask_base,
               g_base, t_base, STATS, DELTA, TNORM, gkl_base, row_stats, offs_n, key_ok, key_mask_vals,
               stride_qm, stride_dom, stride_dqm, stride_mm, stride_gm, stride_tm, stride_gklm,
               M, scale, qk_scale, qk_scale2, w_start, w_stop,
               EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
               KEY_MASK: tl.constexpr, FLOAT_MASK: tl.constexpr, HAS_DW: tl.constexpr, HAS_KL: tl.constexpr,
               HAS_DO: tl.constexpr, DQ_ATOMIC: tl.constexpr, DK_DV: tl.constexpr, Q_SIGN: tl.constexpr,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query block of the dK/dV loop, computed transposed (keys along rows) so that no
    computed tile is transposed: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q. With
    DQ_ATOMIC, also dQ += scale dS K, added atomically into the float32 accumulator at dq_base.
    k, v (k_lo, v_lo): the key block's tiles (and low parts, see _dot_parts). DK_DV: which of dK (1),
    dV (2) or both (3) the tile adds to."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < M
    q_t, q_t_lo = _load_q(q_base + start_m * stride_qm + q_offs, LO, offs_d < HEAD_DIM, row_ok,
                          BLOCK_D != HEAD_DIM, EDGE, Q_SIGN, PRECISION)
    s_t = _dot_parts(k, k_lo, q_t, q_t_lo, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), DOT_FP32, PRECISION)
    if HAS_MASK:
        if KEY_MASK:
            s_t = _apply_mask(s_t, key_mask_vals[:, None], qk_scale, MASK_BOOL)
        else:
            # Keys past N are never stored, but must not be read: they get masked (0 / -inf) entries.
            if EDGE:
                load_ok = key_ok[:, None] & row_ok[None, :]
            else:
                load_ok = key_ok[:, None]
            mvals = tl.load(mask_base + offs_m[None, :] * stride_mm, mask=load_ok,
                            other=0 if MASK_BOOL else float("-inf"))
            s_t = _apply_mask(s_t, mvals, qk_scale, MASK_BOOL)
    if EDGE and IS_CAUSAL:
        s_t = tl.where(offs_n[:, None] <= offs_m[None, :], s_t, float("-inf"))
    if EDGE:
        ptrs = STATS + (row_stats + offs_m) * 2
        m = tl.load(ptrs, mask=row_ok, other=0.0)
        log_l = tl.load(ptrs + 1, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_stats + offs_m, mask=row_ok, other=0.0)
    else:
        ptrs = STATS + (row_stats + offs_m) * 2
        m = tl.load(ptrs)
        log_l = tl.load(ptrs + 1)
        delta = tl.load(DELTA + row_stats + offs_m)
    if FLOAT_MASK:
        p_t = _probs(s_t, m[None, :], (log_l * LOG2E)[None, :], qk_scale2, FLOAT_MASK)
    else:
        p_t = _probs(s_t, ((m + log_l) * LOG2E)[None, :], m[None, :], qk_scale2, FLOAT_MASK)
    if HAS_DO:
        do, do_lo = _load_operand(do_base + start_m * stride_dom + do_offs, LO, row_ok, offs_dv < HEAD_DIM_V,
                                  EDGE, BLOCK_DV != HEAD_DIM_V, PRECISION)
        if DK_DV != 1:
            p_hi, p_lo = _parts(p_t.to(do.dtype), False, PRECISION)
            dv = _dot_parts(p_hi, p_lo, do, do_lo, dv, DOT_FP32, PRECISION)
    if DK_DV != 2:
        if HAS_DO:
            dp_t = _dot_parts(v, v_lo, tl.trans(do), tl.trans(do_lo), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32),
                              DOT_FP32, PRECISION)
        else:
            dp_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        if HAS_DW:
            w_rows = (offs_m >= w_start) & (offs_m < w_stop)
            g_t = tl.load(g_base + (offs_m - w_start)[None, :] * stride_gm,
                          mask=key_ok[:, None] & w_rows[None, :], other=0.0)
            dp_t += g_t.to(tl.float32)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_KL:
            t_t = tl.load(t_base + offs_m[None, :] * stride_tm,
                          mask=key_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
            # Zero on the keys the student does not attend; without a mask those are the causal ones,
            # recomputed so that s_t need not stay live across the dP product (GQA + KL spilled).
            if HAS_MASK:
                t_t = tl.where(s_t > float("-inf"), t_t, 0.0)
            elif EDGE and IS_CAUSAL:
                t_t = tl.where(offs_n[:, None] <= offs_m[None, :], t_t, 0.0)
            tnorm = tl.load(TNORM + row_stats + offs_m, mask=row_ok, other=float("-inf"))
            grad_kl = tl.load(gkl_base + offs_m * stride_gklm, mask=row_ok, other=0.0).to(tl.float32)
            has_mass = tnorm != float("-inf")  # NaN (a NaN target) propagates to the gradient
            inv_z = tl.where(has_mass, tl.exp(-tl.where(has_mass, tnorm, 0.0)), 0.0)
            grad_kl = tl.where(has_mass, grad_kl, 0.0)
            ds_t += grad_kl[None, :] * (p_t - t_t * inv_z[None, :])
        ds_hi, ds_lo = _parts(ds_t.to(q_t.dtype), True, PRECISION)
        dk = _dot_parts(ds_hi, ds_lo, tl.trans(q_t), tl.trans(q_t_lo), dk, DOT_FP32, PRECISION)
        if DQ_ATOMIC:
            dq = _dot_parts(tl.trans(ds_hi), tl.trans(ds_lo), k, k_lo, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
                            DOT_FP32, PRECISION)
            dq_ptrs = dq_base + start_m * stride_dqm + dq_offs
            if EDGE:
                tl.atomic_add(dq_ptrs, dq * scale, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq * scale, mask=(offs_d < HEAD_DIM)[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_head(Q, MASK, DOUT, DQ_ACC, DW, T, GKL, b, h, H, M, offs_n, key_ok,
               stride_qb, stride_qh, stride_mb, stride_mh, stride_mn, stride_dob, stride_doh,
               stride_gb, stride_gh, stride_gn, stride_dqb, stride_dqh, stride_tb, stride_th, stride_tn,
               stride_gklb, stride_gklh, HAS_MASK: tl.constexpr, KEY_MASK: tl.constexpr, MASK_BOOL: tl.constexpr):
    """Query head h's bases for dK/dV's tiles (and its key-padding mask values)."""
    mask_base = MASK + b * stride_mb + h * stride_mh + offs_n[:, None] * stride_mn
    key_mask_vals = key_ok
    if HAS_MASK:
        if KEY_MASK:
            key_mask_vals = tl.load(MASK + b * stride_mb + h * stride_mh + offs_n * stride_mn, mask=key_ok,
                                    other=0 if MASK_BOOL else float("-inf"))
    return (Q + b * stride_qb + h * stride_qh, DOUT + b * stride_dob + h * stride_doh,
            DQ_ACC + b * stride_dqb + h * stride_dqh, mask_base, key_mask_vals,
            DW + b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gn,
            T + b * stride_tb + h * stride_th + offs_n[:, None] * stride_tn,
            GKL + b * stride_gklb + h * stride_gklh, (b * H + h) * M)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, MASK, DOUT, DW, STATS, DELTA, DK, DV, DQ_ACC, T, TNORM, GKL,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_gb, stride_gh, stride_gm, stride_gn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_gklb, stride_gklh, stride_gklm,
    H, HKV, GROUP, M, N, scale, qk_scale, qk_scale2, w_start, w_stop, M_BUCKET, N_BUCKET, LO,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, KEY_MASK: tl.constexpr,
    FLOAT_MASK: tl.constexpr, HAS_DW: tl.constexpr, HAS_KL: tl.constexpr, HAS_DO: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, EDGE_LOOP: tl.constexpr, DK_DV: tl.constexpr,
    Q_SIGN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key block, b, kv head): dV = sum P^T dO and dK = |scale| sum dS^T Q over the
    GROUP query heads sharing the kv head, so dK and dV need no atomics. With DQ_ATOMIC the same
    tiles also add scale * dS K into DQ_ACC (B, H, M, D) float32 (zeroed by the launcher), and the
    dQ kernel is not run. Without HAS_DO (no gradient reaches out) dO is not read: dV = 0, dP = G.
    DK_DV: 3 computes and stores both; 2 only dV (no dP or dS), 1 only dK (and the atomic dQ), for
    the launcher's two launches where one kernel for both spills (see the launcher's dkdv_parts).
    EDGE_LOOP: the edge tiles run in their own loop (see below; the launcher sets it for grouped heads
    and for the 16-bit fused KL). LO: see attention_fwd_kernel (Q, K, V and DOUT)."""
    pid_n, b, hk = _key_block(N, HKV, BLOCK_N)
    n_lo = pid_n * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_ok = offs_n < N
    k, k_lo = _load_operand(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn
                            + offs_d[None, :] * stride_kd, LO, key_ok, offs_d < HEAD_DIM, True, BLOCK_D != HEAD_DIM,
                            PRECISION)
    v, v_lo = _load_operand(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn
                            + offs_dv[None, :] * stride_vd, LO, key_ok, offs_dv < HEAD_DIM_V, True,
                            BLOCK_DV != HEAD_DIM_V, PRECISION)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    arange_m = tl.arange(0, BLOCK_M)
    q_offs = offs_d[:, None] * stride_qd + arange_m[None, :] * stride_qm
    do_offs = arange_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    dq_offs = arange_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    m_full = (M // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        # Query i sees key j only when j <= i: row blocks entirely above this key block are skipped,
        # the cdiv(BLOCK_N, BLOCK_M) blocks on the diagonal are EDGE tiles.
        diag_lo = (n_lo // BLOCK_M) * BLOCK_M
        main_lo = diag_lo + ((BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    else:
        diag_lo = 0
        main_lo = 0
    main_hi = tl.maximum(main_lo, m_full)
    # Edge tiles: the cdiv(BLOCK_N, BLOCK_M) blocks on the causal diagonal and the ragged last query
    # block. Without EDGE_LOOP they run unrolled around the main loop (fewest instructions); with it,
    # after every head's main loop, in one loop over (head, edge block): unrolled inside the head loop
    # they kept more registers live (GQA with causal masking or the fused KL spilled 12-832 B at D = 64
    # and 20-500 B at D = 128 with map gradients, M = N = 197, sm_90), and unrolled around the fused
    # KL's main loop 4-140 B at D = 128 with a mask or causal masking.
    for g in range(0, GROUP):
        (q_base, do_base, dq_base, mask_base, key_mask_vals, g_base, t_base, gkl_base,
         row_stats) = _dkdv_head(Q, MASK, DOUT, DQ_ACC, DW, T, GKL, b, hk * GROUP + g, H, M, offs_n, key_ok,
                                 stride_qb, stride_qh, stride_mb, stride_mh, stride_mn, stride_dob, stride_doh,
                                 stride_gb, stride_gh, stride_gn, stride_dqb, stride_dqh, stride_tb, stride_th,
                                 stride_tn, stride_gklb, stride_gklh, HAS_MASK, KEY_MASK, MASK_BOOL)
        if IS_CAUSAL and not EDGE_LOOP:
            for i in tl.static_range((BLOCK_N + BLOCK_M - 1) // BLOCK_M):
                start_m = diag_lo + i * BLOCK_M
                if start_m < M:
                    dk, dv = _dkdv_tile(
                        k, k_lo, v, v_lo, LO, dk, dv, start_m, q_base, q_offs, do_base, do_offs, dq_base, dq_offs,
                        mask_base, g_base, t_base, STATS, DELTA, TNORM,
                        gkl_base, row_stats, offs_n, key_ok, key_mask_vals,
                        stride_qm, stride_dom, stride_dqm, stride_mm, stride_gm, stride_tm, stride_gklm,
                        M, scale, qk_scale, qk_scale2, w_start, w_stop,
                        True, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK, FLOAT_MASK, HAS_DW, HAS_KL, HAS_DO, DQ_ATOMIC,
                        DK_DV, Q_SIGN, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
        for start_m in range(main_lo, main_hi, BLOCK_M):
            dk, dv = _dkdv_tile(
                k, k_lo, v, v_lo, LO, dk, dv, start_m, q_base, q_offs, do_base, do_offs, dq_base, dq_offs, mask_base,
                g_base, t_base, STATS, DELTA, TNORM,
                gkl_base, row_stats, offs_n, key_ok, key_mask_vals,
                stride_qm, stride_dom, stride_dqm, stride_mm, stride_gm, stride_tm, stride_gklm,
                M, scale, qk_scale, qk_scale2, w_start, w_stop,
                False, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK, FLOAT_MASK, HAS_DW, HAS_KL, HAS_DO, DQ_ATOMIC,
                DK_DV, Q_SIGN, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
        if not EDGE_LOOP:
            if main_hi < M:  # the ragged last query block
                dk, dv = _dkdv_tile(
                    k, k_lo, v, v_lo, LO, dk, dv, main_hi, q_base, q_offs, do_base, do_offs, dq_base, dq_offs,
                    mask_base, g_base, t_base, STATS, DELTA, TNORM,
                    gkl_base, row_stats, offs_n, key_ok, key_mask_vals,
                    stride_qm, stride_dom, stride_dqm, stride_mm, stride_gm, stride_tm, stride_gklm,
                    M, scale, qk_scale, qk_scale2, w_start, w_stop,
                    True, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK, FLOAT_MASK, HAS_DW, HAS_KL, HAS_DO, DQ_ATOMIC,
                    DK_DV, Q_SIGN, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
    if EDGE_LOOP:
        diag_blocks = 0
        if IS_CAUSAL:
            diag_blocks = tl.minimum((BLOCK_N + BLOCK_M - 1) // BLOCK_M,
                                     (tl.maximum(M - diag_lo, 0) + BLOCK_M - 1) // BLOCK_M)
        edge_blocks = diag_blocks + (main_hi < M).to(tl.int32)
        for i in range(0, GROUP * edge_blocks):
            g = i // edge_blocks
            start_m = tl.where(i - g * edge_blocks < diag_blocks, diag_lo + (i - g * edge_blocks) * BLOCK_M, main_hi)
            (q_base, do_base, dq_base, mask_base, key_mask_vals, g_base, t_base, gkl_base,
             row_stats) = _dkdv_head(Q, MASK, DOUT, DQ_ACC, DW, T, GKL, b, hk * GROUP + g, H, M, offs_n, key_ok,
                                     stride_qb, stride_qh, stride_mb, stride_mh, stride_mn, stride_dob, stride_doh,
                                     stride_gb, stride_gh, stride_gn, stride_dqb, stride_dqh, stride_tb, stride_th,
                                     stride_tn, stride_gklb, stride_gklh, HAS_MASK, KEY_MASK, MASK_BOOL)
            dk, dv = _dkdv_tile(
                k, k_lo, v, v_lo, LO, dk, dv, start_m, q_base, q_offs, do_base, do_offs, dq_base, dq_offs, mask_base,
                g_base, t_base, STATS, DELTA, TNORM,
                gkl_base, row_stats, offs_n, key_ok, key_mask_vals,
                stride_qm, stride_dom, stride_dqm, stride_mm, stride_gm, stride_tm, stride_gklm,
                M, scale, qk_scale, qk_scale2, w_start, w_stop,
                True, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK, FLOAT_MASK, HAS_DW, HAS_KL, HAS_DO, DQ_ATOMIC,
                DK_DV, Q_SIGN, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
    if DK_DV != 2:
        tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 (dk * qk_scale).to(DK.dtype.element_ty), mask=key_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    if DK_DV != 1:
        tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])


@triton.jit
def _dq_tile(q, q_lo, do, do_lo, LO, dq, start_n, k_base, v_base, k_offs, v_offs, mask_base, g_base, t_base, ds_base,
             offs_m, row_ok, w_rows, row_a, row_b, delta, inv_z, grad_kl, stride_kn, stride_vn, stride_mn, stride_gn,
             stride_tn, N, qk_scale, qk_scale2,
             EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
             KEY_MASK: tl.constexpr, FLOAT_MASK: tl.constexpr, HAS_DW: tl.constexpr, HAS_KL: tl.constexpr,
             HAS_DO: tl.constexpr, WRITE_DS: tl.constexpr, Q_SIGN: tl.constexpr, HEAD_DIM: tl.constexpr,
             HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_FP32: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of the dQ loop: each K tile is loaded once and read both ways. q (signed), do
    (q_lo, do_lo): the row block's tiles (and low parts, see _dot_parts)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_ok = offs_n < N
    k, k_lo = _load_operand(k_base + start_n * stride_kn + k_offs, LO, key_ok, offs_d < HEAD_DIM,
                            EDGE, BLOCK_D != HEAD_DIM, PRECISION)
    if HAS_DO:
        v, v_lo = _load_operand(v_base + start_n * stride_vn + v_offs, LO, key_ok, offs_dv < HEAD_DIM_V,
                                EDGE, BLOCK_DV != HEAD_DIM_V, PRECISION)
    if KEY_MASK:
        mask_ptrs = mask_base + offs_n * stride_mn
    else:
        mask_ptrs = mask_base + offs_n[None, :] * stride_mn
    s = _dot_parts(q, q_lo, tl.trans(k), tl.trans(k_lo), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                   DOT_FP32, PRECISION)
    s = _mask_scores(s, mask_ptrs, offs_m, offs_n, row_ok, key_ok, qk_scale,
                     EDGE, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK)
    p = _probs(s, row_a[:, None], row_b[:, None], qk_scale2, FLOAT_MASK)
    if HAS_DO:
        dp = _dot_parts(do, do_lo, tl.trans(v), tl.trans(v_lo), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                        DOT_FP32, PRECISION)
    else:
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_DW:
        dp += _load_tile(g_base + offs_n[None, :] * stride_gn, w_rows, key_ok, True, EDGE).to(tl.float32)
    ds = p * (dp - delta[:, None])
    if HAS_KL:
        t = _kl_target(t_base + offs_n[None, :] * stride_tn, row_ok, key_ok, s, EDGE, HAS_MASK)
        ds += grad_kl[:, None] * (p - t * inv_z[:, None])
    if WRITE_DS:
        if EDGE:
            tl.store(ds_base + offs_n[None, :], ds, mask=row_ok[:, None] & key_ok[None, :])
        else:
            tl.store(ds_base + offs_n[None, :], ds, mask=row_ok[:, None])
    ds_hi, ds_lo = _parts(ds.to(k.dtype), True, PRECISION)
    return _dot_parts(ds_hi, ds_lo, k, k_lo, dq, DOT_FP32, PRECISION)


# The kernels' parameter lists repeat one another's (a pointer and four strides per tensor). The KL
# kernels take one stride tuple per tensor instead (Triton specializes tuple elements as scalars);
# these stay scalars until a change can re-verify the four kernels' SASS record by record (RESULTS.md).
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
    H, GROUP, M, N, scale, qk_scale, qk_scale2, w_start, w_stop, M_BUCKET, N_BUCKET, LO,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, KEY_MASK: tl.constexpr,
    FLOAT_MASK: tl.constexpr, HAS_DW: tl.constexpr, HAS_KL: tl.constexpr, HAS_DO: tl.constexpr,
    WRITE_DS: tl.constexpr,
    Q_SIGN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (row block, b, h): dQ = scale * dS K (dS including the fused KL's
    grad_kl * (P - T / Z) when HAS_KL). With WRITE_DS, also stores dS into the float32 buffer DS
    (B, H, M, cdiv(N, 16) * 16), contiguous, columns past N unwritten (the gradient of an additive
    mask: an N-element row stride made the dS stores scalar and the tile spill at N = 197). LO: see
    attention_fwd_kernel (Q, K, V and DOUT). Without HAS_DO (no gradient reaches out) dO is not read.
    """
    pid_m, pid_bh, b, h, offs_m, row_ok = _row_block(M, H, BLOCK_M)
    hk = h // GROUP
    row_lo = pid_m * BLOCK_M
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q, q_lo = _load_q(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                      LO, row_ok, offs_d < HEAD_DIM, True, BLOCK_D != HEAD_DIM, Q_SIGN, PRECISION)
    if HAS_DO:
        do, do_lo = _load_operand(DOUT + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                                  + offs_dv[None, :] * stride_dod, LO, row_ok, offs_dv < HEAD_DIM_V, True,
                                  BLOCK_DV != HEAD_DIM_V, PRECISION)
    else:  # not read
        do, do_lo = q, q_lo
    rows = pid_bh.to(tl.int64) * M + offs_m
    row_a, row_b = _row_offsets(STATS, rows, row_ok, FLOAT_MASK)
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    inv_z = delta
    grad_kl = delta
    if HAS_KL:
        # 1 / Z of the fused KL's target (0 on rows without target mass, whose grad_kl is 0 too).
        log_z = tl.load(TNORM + rows, mask=row_ok, other=float("-inf"))
        has_mass = log_z != float("-inf")  # NaN (a NaN target) propagates to the gradient
        inv_z = tl.where(has_mass, tl.exp(-tl.where(has_mass, log_z, 0.0)), 0.0)
        grad_kl = tl.load(GKL + b * stride_gklb + h * stride_gklh + offs_m * stride_gklm, mask=row_ok,
                          other=0.0).to(tl.float32)
        grad_kl = tl.where(has_mass, grad_kl, 0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    arange_n = tl.arange(0, BLOCK_N)
    k_offs = arange_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_offs = arange_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    if KEY_MASK:
        mask_base = MASK + b * stride_mb + h * stride_mh
    else:
        mask_base = MASK + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mm
    w_rows = (offs_m >= w_start) & (offs_m < w_stop)
    g_base = DW + b * stride_gb + h * stride_gh + (offs_m - w_start)[:, None] * stride_gm
    t_base = T + b * stride_tb + h * stride_th + offs_m[:, None] * stride_tm
    # Rows padded to 16 elements (the launcher's MAP_ROW_ALIGN): vectorized dS stores.
    ds_base = DS + rows[:, None] * (tl.cdiv(N, 16) * 16)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if IS_CAUSAL:
        hi = tl.minimum(N, row_lo + BLOCK_M)
        main_end = tl.minimum((N // BLOCK_N) * BLOCK_N, (row_lo // BLOCK_N) * BLOCK_N)
    else:
        hi = N
        main_end = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, main_end, BLOCK_N):
        dq = _dq_tile(q, q_lo, do, do_lo, LO, dq, start_n, k_base, v_base, k_offs, v_offs, mask_base, g_base, t_base,
                      ds_base, offs_m, row_ok, w_rows, row_a, row_b, delta, inv_z, grad_kl, stride_kn, stride_vn,
                      stride_mn, stride_gn, stride_tn, N, qk_scale, qk_scale2,
                      False, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK, FLOAT_MASK, HAS_DW, HAS_KL, HAS_DO, WRITE_DS,
                      Q_SIGN, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
    for i in tl.static_range((BLOCK_M + BLOCK_N - 1) // BLOCK_N if IS_CAUSAL else 1):
        start_n = main_end + i * BLOCK_N
        if start_n < hi:
            dq = _dq_tile(q, q_lo, do, do_lo, LO, dq, start_n, k_base, v_base, k_offs, v_offs, mask_base, g_base,
                          t_base, ds_base, offs_m, row_ok, w_rows, row_a, row_b, delta, inv_z, grad_kl, stride_kn,
                          stride_vn, stride_mn, stride_gn, stride_tn, N, qk_scale, qk_scale2,
                          True, IS_CAUSAL, HAS_MASK, MASK_BOOL, KEY_MASK, FLOAT_MASK, HAS_DW, HAS_KL, HAS_DO, WRITE_DS,
                          Q_SIGN, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
