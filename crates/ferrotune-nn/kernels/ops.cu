// CUDA kernels of ferrotune's differentiable ops (crates/ferrotune-nn/src/ops/cuda.rs launches
// them). Compiled to PTX by build.rs when the `cuda` feature is on.
//
// Owns: the row-wise and elementwise math (RMSNorm, LayerNorm, RoPE, SwiGLU, the masked softmax
// of attention and its backward, the log-softmax of the vocabulary log-prob). Does not own:
// matrix products (cuBLAS, through candle) or any op's shape checks (the Rust side does them).
//
// Every kernel reads its inputs as T (float, bf16 or half), computes in f32 and writes T, like
// the CPU ops. Row kernels run one block per row; reductions are block-wide in f32.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float ld(const __half* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }
__device__ __forceinline__ void st(__half* p, size_t i, float v) { p[i] = __float2half(v); }

// Block-wide sum / max; every thread gets the result. Safe to call repeatedly.
__device__ float block_sum(float v) {
    __shared__ float sh[32];
    __shared__ float res;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    if (wid == 0) {
        const int nw = (blockDim.x + 31) >> 5;
        v = lane < nw ? sh[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0) res = v;
    }
    __syncthreads();
    return res;
}

__device__ float block_max(float v) {
    __shared__ float sh[32];
    __shared__ float res;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    if (wid == 0) {
        const int nw = (blockDim.x + 31) >> 5;
        v = lane < nw ? sh[lane] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
        if (lane == 0) res = v;
    }
    __syncthreads();
    return res;
}

// ---------------------------------------------------------------- RMSNorm
// y = x * r * w, r = 1 / sqrt(mean(x^2) + eps). Grid: rows.
template <typename T>
__device__ void rms_fwd(const T* x, const T* w, T* y, int h, float eps) {
    const size_t base = (size_t)blockIdx.x * h;
    float ss = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) { float v = ld(x, base + j); ss += v * v; }
    ss = block_sum(ss);
    const float r = 1.f / sqrtf(ss / h + eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x) st(y, base + j, ld(x, base + j) * r * ld(w, j));
}

// dx = r g w - r^3 / H * x * sum(g w x); dw_part[row] = g x r (summed over rows by the caller).
template <typename T>
__device__ void rms_bwd(const T* x, const T* w, const T* g, T* dx, float* dwp, int h, float eps,
                        int want_dx, int want_dw) {
    const size_t base = (size_t)blockIdx.x * h;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float xv = ld(x, base + j);
        ss += xv * xv;
        dot += ld(g, base + j) * ld(w, j) * xv;
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    const float r = 1.f / sqrtf(ss / h + eps);
    const float c = r * r * r * dot / h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float xv = ld(x, base + j), gv = ld(g, base + j);
        if (want_dx) st(dx, base + j, r * gv * ld(w, j) - c * xv);
        if (want_dw) dwp[base + j] = gv * xv * r;
    }
}

// ---------------------------------------------------------------- LayerNorm
template <typename T>
__device__ void ln_fwd(const T* x, const T* w, const T* b, T* y, int h, float eps) {
    const size_t base = (size_t)blockIdx.x * h;
    float s = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) s += ld(x, base + j);
    const float mean = block_sum(s) / h;
    float v = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) { float d = ld(x, base + j) - mean; v += d * d; }
    const float r = 1.f / sqrtf(block_sum(v) / h + eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x)
        st(y, base + j, (ld(x, base + j) - mean) * r * ld(w, j) + ld(b, j));
}

// dx = r (g w - mean(g w) - xhat mean(g w xhat)); dw_part = g xhat; db_part = g.
template <typename T>
__device__ void ln_bwd(const T* x, const T* w, const T* g, T* dx, float* dwp, float* dbp, int h,
                       float eps, int want_dx, int want_dw, int want_db) {
    const size_t base = (size_t)blockIdx.x * h;
    float s = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) s += ld(x, base + j);
    const float mean = block_sum(s) / h;
    float v = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) { float d = ld(x, base + j) - mean; v += d * d; }
    const float r = 1.f / sqrtf(block_sum(v) / h + eps);
    float s1 = 0.f, s2 = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float gw = ld(g, base + j) * ld(w, j);
        s1 += gw;
        s2 += gw * (ld(x, base + j) - mean) * r;
    }
    s1 = block_sum(s1) / h;
    s2 = block_sum(s2) / h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float xh = (ld(x, base + j) - mean) * r, gv = ld(g, base + j);
        if (want_dx) st(dx, base + j, r * (gv * ld(w, j) - s1 - xh * s2));
        if (want_dw) dwp[base + j] = gv * xh;
        if (want_db) dbp[base + j] = gv;
    }
}

// ---------------------------------------------------------------- RoPE
// x, y: (B, H, T, D); cos, sin: (CB, T, D/2) f32 with CB = B or 1. One thread per pair.
template <typename T>
__device__ void rope(const T* x, const float* cs, const float* sn, T* y, size_t pairs, int h, int t,
                     int d, int cb, float sign) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= pairs) return;
    const int half = d / 2;
    const int j = idx % half;
    const size_t rest = idx / half;
    const int ti = rest % t;
    const size_t bh = rest / t;
    const size_t bi = cb == 1 ? 0 : bh / h;
    const size_t ci = (bi * t + ti) * half + j;
    const float c = cs[ci], s = sign * sn[ci];
    const size_t base = (bh * t + ti) * d;
    const float x1 = ld(x, base + j), x2 = ld(x, base + half + j);
    st(y, base + j, x1 * c - x2 * s);
    st(y, base + half + j, x2 * c + x1 * s);
}

// ---------------------------------------------------------------- SwiGLU
template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* y, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float x = ld(g, i);
    st(y, i, x / (1.f + __expf(-x)) * ld(u, i));
}

template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* d, T* dg, T* du, size_t n, int want_g,
                           int want_u) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float x = ld(g, i), dv = ld(d, i);
    const float s = 1.f / (1.f + __expf(-x));
    if (want_g) st(dg, i, dv * ld(u, i) * s * (1.f + x * (1.f - s)));
    if (want_u) st(du, i, dv * x * s);
}

// ---------------------------------------------------------------- attention
// Scores S: rows of Tk for the rows [row0, row0 + gridDim.x) of the folded (B * Hkv, G * Tq)
// query layout, which is the (B, Hq, Tq) order. Query i sits at key position Tk - Tq + i and
// sees keys j <= that position whose mask is non-zero (mask: (B, Tk) f32, or none), within the
// sliding window (j > pos - window; window 0 = none) and of its own segment (seg: (B, Tk) f32
// segment ids, or none).
struct AttnVis {
    const float* mask;
    const float* seg;
    int window;
};

__device__ __forceinline__ bool visible(AttnVis vis, size_t bi, int tk, int j, int pos) {
    return j <= pos && (vis.window == 0 || j > pos - vis.window) &&
           (vis.mask == nullptr || vis.mask[bi * tk + j] != 0.f) &&
           (vis.seg == nullptr || vis.seg[bi * tk + j] == vis.seg[bi * tk + pos]);
}

// S -> P = softmax(scale S) over visible keys (0 elsewhere), in place; lse[row] = log-sum-exp
// (-inf for a query with no visible key, whose P row is all zero).
template <typename T>
__device__ void attn_softmax(T* s, float* lse, AttnVis vis, size_t row0, int hq, int tq, int tk,
                             float scale) {
    const size_t row = row0 + blockIdx.x;
    const int i = row % tq;
    const size_t bi = row / ((size_t)tq * hq);
    const int pos = tk - tq + i;
    T* sr = s + (size_t)blockIdx.x * tk;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < tk; j += blockDim.x)
        if (visible(vis, bi, tk, j, pos)) m = fmaxf(m, ld(sr, j) * scale);
    m = block_max(m);
    if (m == -INFINITY) {
        for (int j = threadIdx.x; j < tk; j += blockDim.x) st(sr, j, 0.f);
        if (threadIdx.x == 0) lse[row] = -INFINITY;
        return;
    }
    float sum = 0.f;
    for (int j = threadIdx.x; j < tk; j += blockDim.x)
        if (visible(vis, bi, tk, j, pos)) sum += __expf(ld(sr, j) * scale - m);
    const float l = m + logf(block_sum(sum));
    for (int j = threadIdx.x; j < tk; j += blockDim.x)
        st(sr, j, visible(vis, bi, tk, j, pos) ? __expf(ld(sr, j) * scale - l) : 0.f);
    if (threadIdx.x == 0) lse[row] = l;
}

// Backward, step 1: recompute P from S and the saved lse, in place.
template <typename T>
__device__ void attn_probs(T* s, const float* lse, AttnVis vis, size_t row0, int hq, int tq, int tk,
                           float scale) {
    const size_t row = row0 + blockIdx.x;
    const int i = row % tq;
    const size_t bi = row / ((size_t)tq * hq);
    const int pos = tk - tq + i;
    const float l = lse[row];
    T* sr = s + (size_t)blockIdx.x * tk;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        const bool ok = l != -INFINITY && visible(vis, bi, tk, j, pos);
        st(sr, j, ok ? __expf(ld(sr, j) * scale - l) : 0.f);
    }
}

// Backward, step 2: dS = P (dP - delta) scale, written over dP. delta[row] = sum(dO * O).
template <typename T>
__device__ void attn_dscores(const T* p, T* dp, const float* delta, size_t row0, int tk, float scale) {
    const size_t row = row0 + blockIdx.x;
    const float dl = delta[row];
    const size_t base = (size_t)blockIdx.x * tk;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        const float pv = ld(p, base + j);
        st(dp, base + j, pv * (ld(dp, base + j) - dl) * scale);
    }
}

// ---------------------------------------------------------------- vocabulary log-prob
// z: (rows, V) raw logits of a chunk; out[row] = z_t / T - logsumexp(z / T).
template <typename T>
__device__ void lp_rows(const T* z, const uint32_t* tg, float inv_t, float* out, int v) {
    const size_t base = (size_t)blockIdx.x * v;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, ld(z, base + j) * inv_t);
    m = block_max(m);
    float sum = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) sum += __expf(ld(z, base + j) * inv_t - m);
    const float l = m + logf(block_sum(sum));
    if (threadIdx.x == 0) out[blockIdx.x] = ld(z, base + tg[blockIdx.x]) * inv_t - l;
}

// z -> d logp / d z = (onehot(t) - softmax(z / T)) / T, in place.
template <typename T>
__device__ void lp_grad(T* z, const uint32_t* tg, float inv_t, int v) {
    const size_t base = (size_t)blockIdx.x * v;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, ld(z, base + j) * inv_t);
    m = block_max(m);
    float sum = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) sum += __expf(ld(z, base + j) * inv_t - m);
    const float l = m + logf(block_sum(sum));
    const uint32_t t = tg[blockIdx.x];
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float p = __expf(ld(z, base + j) * inv_t - l);
        st(z, base + j, (((uint32_t)j == t ? 1.f : 0.f) - p) * inv_t);
    }
}

// ---------------------------------------------------------------- sampling
// One row of logits z (f32, V) per block. Greedy (inv_t == 0): the first maximum. Otherwise the
// token where the running sum of exp(z / T - max), in vocabulary order, first reaches
// u * (total sum) — inverse-CDF sampling with the caller's uniform u, the same rule as the CPU
// sampler without top-k/top-p. lp = log-softmax(z / T) at the token (z at T = 0).
extern "C" __global__ void sample_rows(const float* z, const float* u, float inv_t, int v,
                                       uint32_t* tok, float* lp) {
    __shared__ float seg_sum[1024];
    __shared__ float smax[32];
    __shared__ int sarg[32];
    __shared__ int found;
    const size_t base = (size_t)blockIdx.x * v;
    const bool greedy = inv_t == 0.f;
    const float sc = greedy ? 1.f : inv_t;
    // Max and its first index: each thread scans j = tid, tid + nt, ... (increasing j, strict >).
    float m = -INFINITY;
    int arg = v;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float s = z[base + j] * sc;
        if (s > m) { m = s; arg = j; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float om = __shfl_xor_sync(0xffffffff, m, o);
        const int oa = __shfl_xor_sync(0xffffffff, arg, o);
        if (om > m || (om == m && oa < arg)) { m = om; arg = oa; }
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    if (lane == 0) { smax[wid] = m; sarg[wid] = arg; }
    if (threadIdx.x == 0) found = -1;
    __syncthreads();
    m = smax[0];
    arg = sarg[0];
    for (int w = 1; w < nw; ++w)
        if (smax[w] > m || (smax[w] == m && sarg[w] < arg)) { m = smax[w]; arg = sarg[w]; }
    // Contiguous segments, one per thread, so the inverse-CDF walk is in vocabulary order.
    const int seg = (v + blockDim.x - 1) / blockDim.x;
    const int j0 = min(v, (int)threadIdx.x * seg), j1 = min(v, j0 + seg);
    float part = 0.f;
    for (int j = j0; j < j1; ++j) part += __expf(z[base + j] * sc - m);
    seg_sum[threadIdx.x] = part;
    __syncthreads();
    if (threadIdx.x == 0) {  // exclusive scan of the segment sums
        float acc = 0.f;
        for (int t = 0; t < (int)blockDim.x; ++t) { const float x = seg_sum[t]; seg_sum[t] = acc; acc += x; }
        smax[0] = acc;  // the total
    }
    __syncthreads();
    const float total = smax[0];
    const float lse = m + logf(total);
    if (greedy) {
        if (threadIdx.x == 0) { tok[blockIdx.x] = arg; lp[blockIdx.x] = z[base + arg] - lse; }
        return;
    }
    const float target = u[blockIdx.x] * total;
    // The segments' intervals [prefix, prefix + part) partition [0, total): one thread owns
    // the target. Rounding inside its walk can leave it just short: then its last token with mass.
    float acc = seg_sum[threadIdx.x];
    if (acc < target && acc + part >= target) {
        int pick = -1;
        for (int j = j0; j < j1; ++j) {
            const float e = __expf(z[base + j] * sc - m);
            acc += e;
            if (e > 0.f) pick = j;
            if (acc >= target && e > 0.f) break;
        }
        found = pick;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int t = found;
        if (t < 0) {  // rounding left the target past the total: the last token with mass
            t = v - 1;
            while (t > 0 && __expf(z[base + t] * sc - m) == 0.f) --t;
        }
        tok[blockIdx.x] = t;
        lp[blockIdx.x] = z[base + t] * sc - lse;
    }
}

// ---------------------------------------------------------------- AdamW
// One torch-order AdamW update of f32 parameters in place (the CPU optimizer's update_body):
// decay, m = lerp(m, g, 1 - beta1), v = v beta2 + (1 - beta2) g^2,
// p += neg_step * m / (sqrt(v) / sqrt(bc2) + eps).
extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, size_t n,
                                     int has_decay, float decay, float omb1, float b2, float omb2,
                                     float bc2_sqrt, float eps, float neg_step) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float pi = p[i];
    if (has_decay) pi *= decay;
    const float gi = g[i];
    float mi = m[i];
    mi = fabsf(omb1) < 0.5f ? fmaf(omb1, gi - mi, mi) : fmaf(omb1 - 1.f, gi - mi, gi);
    const float vi = v[i] * b2 + omb2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + neg_step * mi / (sqrtf(vi) / bc2_sqrt + eps);
}

// ---------------------------------------------------------------- entry points
#define ENTRY(T, SFX)                                                                             \
    extern "C" __global__ void rms_fwd_##SFX(const T* x, const T* w, T* y, int h, float eps) {    \
        rms_fwd(x, w, y, h, eps);                                                                 \
    }                                                                                             \
    extern "C" __global__ void rms_bwd_##SFX(const T* x, const T* w, const T* g, T* dx,           \
                                             float* dwp, int h, float eps, int a, int b) {        \
        rms_bwd(x, w, g, dx, dwp, h, eps, a, b);                                                  \
    }                                                                                             \
    extern "C" __global__ void ln_fwd_##SFX(const T* x, const T* w, const T* b, T* y, int h,      \
                                            float eps) {                                          \
        ln_fwd(x, w, b, y, h, eps);                                                               \
    }                                                                                             \
    extern "C" __global__ void ln_bwd_##SFX(const T* x, const T* w, const T* g, T* dx,            \
                                            float* dwp, float* dbp, int h, float eps, int a,      \
                                            int b, int c) {                                       \
        ln_bwd(x, w, g, dx, dwp, dbp, h, eps, a, b, c);                                           \
    }                                                                                             \
    extern "C" __global__ void rope_##SFX(const T* x, const float* c, const float* s, T* y,       \
                                          size_t pairs, int h, int t, int d, int cb,              \
                                          float sign) {                                           \
        rope(x, c, s, y, pairs, h, t, d, cb, sign);                                               \
    }                                                                                             \
    extern "C" __global__ void swiglu_fwd_##SFX(const T* g, const T* u, T* y, size_t n) {         \
        swiglu_fwd(g, u, y, n);                                                                   \
    }                                                                                             \
    extern "C" __global__ void swiglu_bwd_##SFX(const T* g, const T* u, const T* d, T* dg,        \
                                                T* du, size_t n, int a, int b) {                  \
        swiglu_bwd(g, u, d, dg, du, n, a, b);                                                     \
    }                                                                                             \
    extern "C" __global__ void attn_softmax_##SFX(T* s, float* lse, const float* mask, int hm,    \
                                                  const float* seg, int hs, int window,           \
                                                  size_t row0, int hq, int tq, int tk,            \
                                                  float scale) {                                  \
        AttnVis vis = {hm ? mask : nullptr, hs ? seg : nullptr, window};                          \
        attn_softmax(s, lse, vis, row0, hq, tq, tk, scale);                                       \
    }                                                                                             \
    extern "C" __global__ void attn_probs_##SFX(T* s, const float* lse, const float* mask, int hm, \
                                                const float* seg, int hs, int window,             \
                                                size_t row0, int hq, int tq, int tk,              \
                                                float scale) {                                    \
        AttnVis vis = {hm ? mask : nullptr, hs ? seg : nullptr, window};                          \
        attn_probs(s, lse, vis, row0, hq, tq, tk, scale);                                         \
    }                                                                                             \
    extern "C" __global__ void attn_dscores_##SFX(const T* p, T* dp, const float* delta,          \
                                                  size_t row0, int tk, float scale) {             \
        attn_dscores(p, dp, delta, row0, tk, scale);                                              \
    }                                                                                             \
    extern "C" __global__ void lp_rows_##SFX(const T* z, const uint32_t* tg, float inv_t,         \
                                             float* out, int v) {                                 \
        lp_rows(z, tg, inv_t, out, v);                                                            \
    }                                                                                             \
    extern "C" __global__ void lp_grad_##SFX(T* z, const uint32_t* tg, float inv_t, int v) {      \
        lp_grad(z, tg, inv_t, v);                                                                 \
    }

ENTRY(float, f32)
ENTRY(__nv_bfloat16, bf16)
ENTRY(__half, f16)
