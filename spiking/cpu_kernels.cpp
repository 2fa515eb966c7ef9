// CPU kernels of spikerl: the fused selective scan (forward + backward) and the one-token step.
//
// Built on first use by spiking/kernels/cpu_kernels.py (torch.utils.cpp_extension.load, g++,
// -O3 -march=native -fopenmp; ~10 s once per machine, cached). Registered as torch ops
// `spikerl_cpu::*`. Every op has a PyTorch twin (`selective_scan_ref`, `selective_state_update_ref`,
// the model's own layers) that the tests compare it with, forward and backward.
//
// Layout: channel-last. u, delta, z, out: [B, L, D] with unit stride over D (any stride over B, L,
// so the model's transposed views need no copy); B, C: [B, G, L, N] with unit stride over N;
// A passed transposed as [N, D]. One work item = (batch row b, block of W = 16 consecutive
// channels of one group); items run in parallel (at::parallel_for, torch's threads), each walks
// the sequence in order holding its state h [N][W] in registers / L1, vectorised over the W
// channels. Nothing of size [B, L, D, N] is ever materialised: exp(Δ·A), Δ·B·u and C·h are
// computed on the fly. The forward keeps only the state at the start of every CHUNK tokens
// ([B, L/CHUNK, N, D]); the backward recomputes a chunk's states from it into a per-thread
// buffer [CHUNK][N][W] and runs the adjoint recurrence backwards over the chunk.
//
//   h_t = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·B_t·u_t,   y_t = C_t·h_t + D·u_t,   out_t = y_t·SiLU(z_t)
//   backward: g_t = ∂h_t = C_t·dy_t + exp(Δ_{t+1}·A) ⊙ g_{t+1}
//             ∂A += g_t ⊙ h_{t-1} ⊙ exp(Δ_t·A) · Δ_t,  ∂Δ_t = Σ_n g_t h_{t-1} exp(Δ_t A) A + u_t Σ_n g_t B_t
//
// Reductions over channels (∂B, ∂C: shared by a group's channels; ∂A, ∂D, ∂delta_bias: shared
// by the batch) go to per-thread buffers summed at the end, so the result does not depend on
// the order items finish in (it does depend on the thread count, at fp32 rounding level).
//
// exp / log are vector polynomials (Cephes' expf / logf, ~1 ulp), not libm calls: they are the
// inner loop (B·L·D·N exponentials), and a polynomial vectorises.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

constexpr int W = 16;      // channels per vector: one AVX-512 register, two AVX2 ones
constexpr int NMAX = 256;  // largest state size N (Mamba uses 16)
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf splat(float x) { return vf{} + x; }
// Lanes past `n` (a block's tail) read as 0 and are not written. A full block is one unaligned
// vector load / store (a memcpy of constant size compiles to one instruction).
inline vf load_n(const float* p, int n) {
  vf v;
  if (__builtin_expect(n == W, 1)) {
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  v = vf{};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
inline void store_n(float* p, vf v, int n) {
  if (__builtin_expect(n == W, 1)) {
    std::memcpy(p, &v, sizeof v);
    return;
  }
  for (int i = 0; i < n; ++i) p[i] = v[i];
}
inline vf as_vf(vi x) {
  vf v;
  std::memcpy(&v, &x, sizeof v);
  return v;
}
inline vi as_vi(vf x) {
  vi v;
  std::memcpy(&v, &x, sizeof v);
  return v;
}

// exp(x), Cephes expf: x = n·ln2 + r, e^r by a degree-6 polynomial, 2^n through the exponent bits.
inline vf vexp(vf x) {
  const vi under = x < -87.33654475f;  // below FLT_MIN: 0, as libm (a denormal at most)
  const vi over = x > 88.0f;
  x = x < -87.33654475f ? splat(-87.33654475f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const vf magic = splat(12582912.0f);  // 1.5·2^23: adding it rounds to the nearest integer
  const vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vf y = p * (r * r) + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  y = y * as_vf(bits);
  y = under ? splat(0.0f) : y;
  return over ? splat(__builtin_inff()) : y;
}

// log(x) for finite x > 0, Cephes logf.
inline vf vlog(vf x) {
  const vi bits = as_vi(x);
  vf e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf);
  vf m = as_vf((bits & 0x007fffff) | 0x3f000000);  // x = m·2^e, m in [0.5, 1)
  const vi small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const vf z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + e * 0.693359375f;
}

// torch's softplus (threshold 20) and its derivative sigmoid(x); log1p through Kahan's
// log(1+e)·e/((1+e)-1), exact where 1+e rounds (small e: a Mamba Δ is often ~1e-3).
inline vf vsoftplus(vf x, vf* sigmoid_out) {
  const vf e = vexp(x);
  const vf up = 1.0f + e;
  const vf num = up - 1.0f;
  const vi exact = num == 0.0f;
  vf sp = exact ? e : vlog(up) * (e / (exact ? splat(1.0f) : num));
  const vi big = x > 20.0f;
  sp = big ? x : sp;
  if (sigmoid_out) *sigmoid_out = big ? splat(1.0f) : e / up;
  return sp;
}

inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }

// out[i] = Σ_w v[i][w] for 16 vectors at once: a transpose-and-add network (15 shuffle pairs
// instead of 16 separate horizontal sums).
inline vf hsum16(const vf* v) {
  typedef int32_t mask __attribute__((vector_size(64)));
  vf a[8], b[4], c[2];
  const mask lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const mask hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const mask lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const mask hi2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const mask lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const mask hi3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const mask lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const mask hi4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo1) + __builtin_shuffle(v[2 * i], v[2 * i + 1], hi1);
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lo2) + __builtin_shuffle(a[2 * i], a[2 * i + 1], hi2);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], lo3) + __builtin_shuffle(b[2 * i], b[2 * i + 1], hi3);
  return __builtin_shuffle(c[0], c[1], lo4) + __builtin_shuffle(c[0], c[1], hi4);
}

struct Block {
  int64_t d0;
  int width;
  int64_t group;
};

// Blocks of <= W channels that never straddle a group of B/C (so one B_t row serves all lanes).
std::vector<Block> make_blocks(int64_t dim, int64_t groups) {
  std::vector<Block> blocks;
  const int64_t per_group = dim / groups;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t d = g * per_group; d < (g + 1) * per_group; d += W)
      blocks.push_back({d, static_cast<int>(std::min<int64_t>(W, (g + 1) * per_group - d)), g});
  return blocks;
}

const float* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void check_lanes(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1, name, " must be [B, L, D] with unit stride over D");
}

void check_bc(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, name, " must be [B, G, L, N] with unit stride over N");
}

struct ScanArgs {
  int64_t batch, length, dim, state, groups, chunk, n_chunks;
  const float *u, *delta, *AT, *Bm, *Cm, *Dskip, *z, *bias;
  int64_t su_b, su_l, sd_b, sd_l, sz_b, sz_l;      // [B, L, D] strides (D stride is 1)
  int64_t sB_b, sB_g, sB_l, sC_b, sC_g, sC_l;      // [B, G, L, N] strides (N stride is 1)
  bool softplus;
};

ScanArgs scan_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& AT, const at::Tensor& Bm,
                   const at::Tensor& Cm, const std::optional<at::Tensor>& Dskip, const std::optional<at::Tensor>& z,
                   const std::optional<at::Tensor>& bias, bool softplus, int64_t chunk) {
  check_lanes(u, "u");
  check_lanes(delta, "delta");
  check_bc(Bm, "B");
  check_bc(Cm, "C");
  ScanArgs a{};
  a.batch = u.size(0);
  a.length = u.size(1);
  a.dim = u.size(2);
  a.state = AT.size(0);
  a.groups = Bm.size(1);
  TORCH_CHECK(AT.scalar_type() == at::kFloat && AT.is_contiguous() && AT.size(1) == a.dim, "A must be [N, D] float32");
  TORCH_CHECK(a.state <= NMAX, "state size N must be <= ", NMAX);
  TORCH_CHECK(a.groups >= 1 && a.dim % a.groups == 0 && Cm.size(1) == a.groups, "B, C: G must divide D");
  TORCH_CHECK(delta.sizes() == u.sizes() && Bm.size(0) == a.batch && Bm.size(2) == a.length && Bm.size(3) == a.state &&
                  Cm.sizes() == Bm.sizes(),
              "scan: inconsistent shapes");
  TORCH_CHECK(chunk >= 1, "chunk must be >= 1");
  a.chunk = chunk;
  a.n_chunks = std::max<int64_t>((a.length + chunk - 1) / chunk, 1);
  a.u = u.data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.AT = AT.data_ptr<float>();
  a.Bm = Bm.data_ptr<float>();
  a.Cm = Cm.data_ptr<float>();
  a.su_b = u.stride(0), a.su_l = u.stride(1);
  a.sd_b = delta.stride(0), a.sd_l = delta.stride(1);
  a.sB_b = Bm.stride(0), a.sB_g = Bm.stride(1), a.sB_l = Bm.stride(2);
  a.sC_b = Cm.stride(0), a.sC_g = Cm.stride(1), a.sC_l = Cm.stride(2);
  if (Dskip.has_value()) {
    TORCH_CHECK(Dskip->scalar_type() == at::kFloat && Dskip->is_contiguous() && Dskip->numel() == a.dim, "D must be [D] float32");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == a.dim,
                "delta_bias must be [D] float32");
  }
  if (z.has_value()) {
    check_lanes(*z, "z");
    TORCH_CHECK(z->sizes() == u.sizes(), "z must have u's shape");
    a.sz_b = z->stride(0), a.sz_l = z->stride(1);
  }
  a.Dskip = ptr_or_null(Dskip);
  a.z = ptr_or_null(z);
  a.bias = ptr_or_null(bias);
  a.softplus = softplus;
  return a;
}

// Δ_t for one block: bias added, softplus applied; `sig` gets softplus' derivative (or 1).
inline vf load_dt(const ScanArgs& a, int64_t b, int64_t t, int64_t d0, int width, vf bias, vf* sig) {
  vf raw = load_n(a.delta + b * a.sd_b + t * a.sd_l + d0, width) + bias;
  if (a.softplus) {
    vf dt = vsoftplus(raw, sig);
    // lanes past the block are inert (u = 0, h = 0); keep their Δ at 0 too
    if (width < W) {
      vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
      dt = lane < width ? dt : splat(0.0f);
    }
    return dt;
  }
  if (sig) *sig = splat(1.0f);
  return raw;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// NT: the state size when known at compile time (16: Mamba's; the loops over N unroll and the
// state stays in registers), 0 for any other N.
template <int NT>
void scan_fwd_impl(const ScanArgs& a, const float* h0p, float* outp, float* lastp, float* chunkp) {
  const std::vector<Block> blocks = make_blocks(a.dim, a.groups);
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  const int64_t N = NT ? NT : a.state;

  at::parallel_for(0, a.batch * n_blocks, 1, [&](int64_t begin, int64_t end) {
    vf Av[NT ? NT : NMAX], h[NT ? NT : NMAX];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_blocks;
      const Block& blk = blocks[item % n_blocks];
      const int64_t d0 = blk.d0;
      const int width = blk.width;
      for (int64_t n = 0; n < N; ++n) Av[n] = load_n(a.AT + n * a.dim + d0, width);
      const vf Dv = a.Dskip ? load_n(a.Dskip + d0, width) : splat(0.0f);
      const vf biasv = a.bias ? load_n(a.bias + d0, width) : splat(0.0f);
      for (int64_t n = 0; n < N; ++n) {
        h[n] = splat(0.0f);
        if (h0p)
          for (int w = 0; w < width; ++w) h[n][w] = h0p[(b * a.dim + d0 + w) * N + n];
      }
      const float* Bbase = a.Bm + b * a.sB_b + blk.group * a.sB_g;
      const float* Cbase = a.Cm + b * a.sC_b + blk.group * a.sC_g;
      for (int64_t t = 0; t < a.length; ++t) {
        if (chunkp && t % a.chunk == 0) {
          float* dst = chunkp + ((b * a.n_chunks + t / a.chunk) * N) * a.dim + d0;
          for (int64_t n = 0; n < N; ++n) store_n(dst + n * a.dim, h[n], width);
        }
        const vf dt = load_dt(a, b, t, d0, width, biasv, nullptr);
        const vf uv = load_n(a.u + b * a.su_b + t * a.su_l + d0, width);
        const vf dtu = dt * uv;
        const float* Bt = Bbase + t * a.sB_l;
        const float* Ct = Cbase + t * a.sC_l;
        vf y = Dv * uv;
        for (int64_t n = 0; n < N; ++n) {
          h[n] = vexp(dt * Av[n]) * h[n] + dtu * Bt[n];
          y += h[n] * Ct[n];
        }
        if (a.z) {
          const vf zv = load_n(a.z + b * a.sz_b + t * a.sz_l + d0, width);
          y = y * (zv * vsigmoid(zv));
        }
        store_n(outp + (b * a.length + t) * a.dim + d0, y, width);
      }
      for (int64_t n = 0; n < N; ++n)
        for (int w = 0; w < width; ++w) lastp[(b * a.dim + d0 + w) * N + n] = h[n][w];
    }
  });
}

std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& AT, const at::Tensor& Bm,
                                 const at::Tensor& Cm, const std::optional<at::Tensor>& Dskip,
                                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                                 bool softplus, const std::optional<at::Tensor>& h0, int64_t chunk, bool save_chunks) {
  const ScanArgs a = scan_args(u, delta, AT, Bm, Cm, Dskip, z, bias, softplus, chunk);
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor out = at::empty({a.batch, a.length, a.dim}, f32);
  at::Tensor last = at::empty({a.batch, a.dim, a.state}, f32);  // [B, D, N], the API's layout
  at::Tensor chunks = save_chunks ? at::empty({a.batch, a.n_chunks, a.state, a.dim}, f32) : at::empty({0}, f32);
  if (h0.has_value()) {
    TORCH_CHECK(h0->scalar_type() == at::kFloat && h0->is_contiguous() && h0->size(0) == a.batch &&
                    h0->size(1) == a.dim && h0->size(2) == a.state,
                "initial_state must be [B, D, N] float32, contiguous");
  }
  float* chunkp = save_chunks ? chunks.data_ptr<float>() : nullptr;
  if (a.state == 16)
    scan_fwd_impl<16>(a, ptr_or_null(h0), out.data_ptr<float>(), last.data_ptr<float>(), chunkp);
  else
    scan_fwd_impl<0>(a, ptr_or_null(h0), out.data_ptr<float>(), last.data_ptr<float>(), chunkp);
  return {out, last, chunks};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& AT, const at::Tensor& Bm,
                                 const at::Tensor& Cm, const std::optional<at::Tensor>& Dskip,
                                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                                 bool softplus, const at::Tensor& chunks, int64_t chunk, const at::Tensor& dout,
                                 const std::optional<at::Tensor>& dlast) {
  const ScanArgs a = scan_args(u, delta, AT, Bm, Cm, Dskip, z, bias, softplus, chunk);
  check_lanes(dout, "dout");
  TORCH_CHECK(dout.sizes() == u.sizes(), "dout must have u's shape");
  TORCH_CHECK(chunks.is_contiguous() && chunks.dim() == 4 && chunks.size(1) == a.n_chunks, "chunk states: bad shape");
  if (dlast.has_value()) {
    TORCH_CHECK(dlast->scalar_type() == at::kFloat && dlast->is_contiguous() && dlast->numel() == a.batch * a.dim * a.state,
                "dlast must be [B, D, N] float32, contiguous");
  }
  const int64_t N = a.state, L = a.length, CH = a.chunk;
  const auto f32 = u.options().dtype(at::kFloat);
  const int64_t n_threads = at::get_num_threads();
  at::Tensor du = at::empty({a.batch, L, a.dim}, f32);
  at::Tensor ddelta = at::empty({a.batch, L, a.dim}, f32);
  at::Tensor dz = a.z ? at::empty({a.batch, L, a.dim}, f32) : at::empty({0}, f32);
  at::Tensor dh0 = at::empty({a.batch, a.dim, N}, f32);
  // per-thread partial sums, added up below: [T, B, G, L, N], [T, N, D], [T, D], [T, D]
  at::Tensor dB_part = at::zeros({n_threads, a.batch, a.groups, L, N}, f32);
  at::Tensor dC_part = at::zeros({n_threads, a.batch, a.groups, L, N}, f32);
  at::Tensor dA_part = at::zeros({n_threads, N, a.dim}, f32);
  at::Tensor dD_part = at::zeros({n_threads, a.dim}, f32);
  at::Tensor dbias_part = at::zeros({n_threads, a.dim}, f32);
  const float* chunkp = chunks.data_ptr<float>();
  const float* doutp = dout.data_ptr<float>();
  const int64_t so_b = dout.stride(0), so_l = dout.stride(1);
  const float* dlastp = ptr_or_null(dlast);
  float *dup = du.data_ptr<float>(), *ddp = ddelta.data_ptr<float>(), *dzp = a.z ? dz.data_ptr<float>() : nullptr;
  float* dh0p = dh0.data_ptr<float>();
  const std::vector<Block> blocks = make_blocks(a.dim, a.groups);
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  const int64_t N16 = (N + 15) / 16 * 16;  // rows padded for hsum16

  at::parallel_for(0, a.batch * n_blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < n_threads, "scan_bwd: thread id out of range");
    float* dB_t = dB_part.data_ptr<float>() + tid * a.batch * a.groups * L * N;
    float* dC_t = dC_part.data_ptr<float>() + tid * a.batch * a.groups * L * N;
    float* dA_t = dA_part.data_ptr<float>() + tid * N * a.dim;
    float* dD_t = dD_part.data_ptr<float>() + tid * a.dim;
    float* dbias_t = dbias_part.data_ptr<float>() + tid * a.dim;
    // this thread's chunk buffers: states h_t and decays exp(Δ_t·A) [CH][N][W], Δ_t, softplus'
    std::vector<vf> hs(CH * N), decay(CH * N), dts(CH), sigs(CH);
    vf Av[NMAX], g[NMAX], h_start[NMAX], dA_acc[NMAX], row_dB[NMAX + 16], row_dC[NMAX + 16];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_blocks;
      const Block& blk = blocks[item % n_blocks];
      const int64_t d0 = blk.d0;
      const int width = blk.width;
      for (int64_t n = 0; n < N; ++n) {
        Av[n] = load_n(a.AT + n * a.dim + d0, width);
        dA_acc[n] = splat(0.0f);
        g[n] = splat(0.0f);
        if (dlastp)
          for (int w = 0; w < width; ++w) g[n][w] = dlastp[(b * a.dim + d0 + w) * N + n];
      }
      for (int64_t n = N; n < N16; ++n) row_dB[n] = row_dC[n] = splat(0.0f);
      const vf Dv = a.Dskip ? load_n(a.Dskip + d0, width) : splat(0.0f);
      const vf biasv = a.bias ? load_n(a.bias + d0, width) : splat(0.0f);
      vf dD_acc = splat(0.0f), dbias_acc = splat(0.0f);
      const float* Bbase = a.Bm + b * a.sB_b + blk.group * a.sB_g;
      const float* Cbase = a.Cm + b * a.sC_b + blk.group * a.sC_g;
      float* dBbase = dB_t + (b * a.groups + blk.group) * L * N;
      float* dCbase = dC_t + (b * a.groups + blk.group) * L * N;

      for (int64_t c = a.n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * CH, t1 = std::min(L, t0 + CH);
        const float* src = chunkp + ((b * a.n_chunks + c) * N) * a.dim + d0;
        for (int64_t n = 0; n < N; ++n) h_start[n] = load_n(src + n * a.dim, width);
        // 1. recompute the chunk's states from its boundary state
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i = t - t0;
          vf sig;
          const vf dt = load_dt(a, b, t, d0, width, biasv, &sig);
          dts[i] = dt;
          sigs[i] = sig;
          const vf dtu = dt * load_n(a.u + b * a.su_b + t * a.su_l + d0, width);
          const float* Bt = Bbase + t * a.sB_l;
          const vf* prev = i == 0 ? h_start : &hs[(i - 1) * N];
          for (int64_t n = 0; n < N; ++n) {
            const vf dA = vexp(dt * Av[n]);
            decay[i * N + n] = dA;
            hs[i * N + n] = dA * prev[n] + dtu * Bt[n];
          }
        }
        // 2. the adjoint recurrence, last token of the chunk first
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t i = t - t0;
          const vf dt = dts[i];
          const vf uv = load_n(a.u + b * a.su_b + t * a.su_l + d0, width);
          const vf dtu = dt * uv;
          const float* Bt = Bbase + t * a.sB_l;
          const float* Ct = Cbase + t * a.sC_l;
          const vf* ht = &hs[i * N];
          const vf* hprev = i == 0 ? h_start : &hs[(i - 1) * N];
          const vf doutv = load_n(doutp + b * so_b + t * so_l + d0, width);
          vf dy = doutv;
          if (a.z) {
            vf y = Dv * uv;
            for (int64_t n = 0; n < N; ++n) y += ht[n] * Ct[n];
            const vf zv = load_n(a.z + b * a.sz_b + t * a.sz_l + d0, width);
            const vf sz = vsigmoid(zv);
            store_n(dzp + (b * L + t) * a.dim + d0, doutv * y * sz * (1.0f + zv * (1.0f - sz)), width);
            dy = doutv * (zv * sz);
          }
          dD_acc += dy * uv;
          vf du_v = dy * Dv;
          vf ddt = splat(0.0f), gB = splat(0.0f);
          for (int64_t n = 0; n < N; ++n) {
            const vf gn = g[n] + dy * Ct[n];
            row_dC[n] = dy * ht[n];
            row_dB[n] = gn * dtu;
            gB += gn * Bt[n];
            const vf gdA = gn * hprev[n] * decay[i * N + n];  // ∂ of Δ·A through exp
            dA_acc[n] += gdA * dt;
            ddt += gdA * Av[n];
            g[n] = gn * decay[i * N + n];  // carried to t - 1
          }
          du_v += gB * dt;
          ddt = (ddt + gB * uv) * sigs[i];
          dbias_acc += ddt;
          store_n(dup + (b * L + t) * a.dim + d0, du_v, width);
          store_n(ddp + (b * L + t) * a.dim + d0, ddt, width);
          float* dBrow = dBbase + t * N;
          float* dCrow = dCbase + t * N;
          for (int64_t n0 = 0; n0 < N; n0 += 16) {
            const int k = static_cast<int>(std::min<int64_t>(16, N - n0));
            const vf sB = hsum16(row_dB + n0), sC = hsum16(row_dC + n0);
            store_n(dBrow + n0, load_n(dBrow + n0, k) + sB, k);
            store_n(dCrow + n0, load_n(dCrow + n0, k) + sC, k);
          }
        }
      }
      for (int64_t n = 0; n < N; ++n) {
        store_n(dA_t + n * a.dim + d0, load_n(dA_t + n * a.dim + d0, width) + dA_acc[n], width);
        for (int w = 0; w < width; ++w) dh0p[(b * a.dim + d0 + w) * N + n] = g[n][w];
      }
      store_n(dD_t + d0, load_n(dD_t + d0, width) + dD_acc, width);
      store_n(dbias_t + d0, load_n(dbias_t + d0, width) + dbias_acc, width);
    }
  });
  return {du, ddelta, dz, dB_part.sum(0), dC_part.sum(0), dA_part.sum(0), dD_part.sum(0), dbias_part.sum(0), dh0};
}


// ---------------------------------------------------------------------------------------------
// One-token step: the SSM state update, and the whole backbone for one token (generation)
// ---------------------------------------------------------------------------------------------

// state [B, D, N] (updated in place), x, dt [B, D] (row strides ldx, lddt), A [D, N],
// B_t, C_t [B, N] (row strides ldbc), D [D], z [B, D] (row stride ldz), dt_bias [D]
// -> out [B, D]. One item = (batch row, 16 channels); the state rows of the 16 channels are
// contiguous (16·N floats), each updated with lanes over N, and their C·h sums reduced together.
void state_update(float* state, const float* x, int64_t ldx, const float* dt, int64_t lddt, const float* A,
                  const float* Bm, const float* Cm, int64_t ldbc, const float* Dskip, const float* z, int64_t ldz,
                  const float* dt_bias, bool softplus, float* out, int64_t batch, int64_t dim, int64_t N) {
  const int64_t n_blocks = (dim + W - 1) / W;
  at::parallel_for(0, batch * n_blocks, 16, [&](int64_t begin, int64_t end) {
    vf acc[W];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_blocks, d0 = (item % n_blocks) * W;
      const int width = static_cast<int>(std::min<int64_t>(W, dim - d0));
      vf dtv = load_n(dt + b * lddt + d0, width);
      if (dt_bias) dtv += load_n(dt_bias + d0, width);
      if (softplus) dtv = vsoftplus(dtv, nullptr);
      const vf xv = load_n(x + b * ldx + d0, width);
      const vf dtx = dtv * xv;
      const float* Bt = Bm + b * ldbc;
      const float* Ct = Cm + b * ldbc;
      for (int j = 0; j < W; ++j) {
        acc[j] = splat(0.0f);
        if (j >= width) continue;
        float* h = state + (b * dim + d0 + j) * N;
        const float* Arow = A + (d0 + j) * N;
        for (int64_t n0 = 0; n0 < N; n0 += W) {
          const int k = static_cast<int>(std::min<int64_t>(W, N - n0));
          const vf hn = vexp(dtv[j] * load_n(Arow + n0, k)) * load_n(h + n0, k) + dtx[j] * load_n(Bt + n0, k);
          store_n(h + n0, hn, k);
          acc[j] += hn * load_n(Ct + n0, k);
        }
      }
      vf y = hsum16(acc);
      if (Dskip) y += load_n(Dskip + d0, width) * xv;
      if (z) {
        const vf zv = load_n(z + b * ldz + d0, width);
        y = y * (zv * vsigmoid(zv));
      }
      store_n(out + b * dim + d0, y, width);
    }
  });
}

at::Tensor state_update_op(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                           const at::Tensor& Bm, const at::Tensor& Cm, const std::optional<at::Tensor>& Dskip,
                           const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias, bool softplus) {
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.dim() == 3, "state must be [B, D, N] float32, contiguous");
  const int64_t batch = state.size(0), dim = state.size(1), N = state.size(2);
  for (const at::Tensor* t : {&x, &dt, &Bm, &Cm})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->stride(1) == 1 && t->size(0) == batch,
                "x, dt, B, C must be [B, ·] float32 with unit stride over the last dim");
  TORCH_CHECK(x.size(1) == dim && dt.size(1) == dim && Bm.size(1) == N && Cm.size(1) == N && Bm.stride(0) == Cm.stride(0),
              "state update: inconsistent shapes");
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.is_contiguous() && A.size(0) == dim && A.size(1) == N, "A must be [D, N] float32");
  if (z.has_value()) TORCH_CHECK(z->scalar_type() == at::kFloat && z->stride(1) == 1 && z->sizes() == x.sizes(), "z must be [B, D]");
  for (const std::optional<at::Tensor>* t : {&Dskip, &dt_bias})
    if (t->has_value()) TORCH_CHECK((*t)->scalar_type() == at::kFloat && (*t)->is_contiguous() && (*t)->numel() == dim, "D, dt_bias must be [D]");
  at::Tensor out = at::empty({batch, dim}, x.options());
  state_update(state.data_ptr<float>(), x.data_ptr<float>(), x.stride(0), dt.data_ptr<float>(), dt.stride(0),
               A.data_ptr<float>(), Bm.data_ptr<float>(), Cm.data_ptr<float>(), Bm.stride(0), ptr_or_null(Dskip),
               ptr_or_null(z), z.has_value() ? z->stride(0) : 0, ptr_or_null(dt_bias), softplus, out.data_ptr<float>(),
               batch, dim, N);
  return out;
}

enum NeuronKind { kNoNeuron = 0, kSILIF = 1, kATMN = 2 };

// src [rows, cols] (row stride src_ld) -> dst (row stride dst_ld; dst == src: in place): the
// closed-form neuron of spiking/neurons.py, the same float ops in the same order (u = x / V,
// |u| (+ 0.5), floor, clip, sign, s·V), then SGC's mix. floor is a truncation here (the value is
// >= 0), after clipping to levels + 1 so that the int conversion cannot overflow; vectorised over
// 16 channels.
void neuron_(const float* src, int64_t src_ld, float* dst, int64_t dst_ld, int64_t rows, int64_t cols, int kind,
             float levels, float lam, const float* V) {
  const float keep = static_cast<float>(1.0 - lam);
  const vf top = splat(levels), past_top = splat(levels + 1.0f), zero = splat(0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = src + r * src_ld;
    float* out = dst + r * dst_ld;
    for (int64_t c = 0; c < cols; c += W) {
      const int k = static_cast<int>(std::min<int64_t>(W, cols - c));
      const vf xv = load_n(row + c, k);
      vf v = load_n(V + c, k);
      for (int i = k; i < W; ++i) v[i] = 1.0f;  // lanes past the row: finite u (they are not stored)
      const vf u = xv / v;
      const vf a = u < zero ? -u : u;
      vf count = kind == kSILIF ? a + 0.5f : a;
      count = count > past_top ? past_top : count;
      count = __builtin_convertvector(__builtin_convertvector(count, vi), vf);  // floor of a value >= 0
      count = count > top ? top : count;
      const vf s = u > zero ? count : (u < zero ? -count : zero);
      const vf q = s * v;
      store_n(out + c, lam == 0 ? q : keep * q + static_cast<float>(lam) * xv, k);
    }
  }
}

inline void silu_(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += W) {
    const int k = static_cast<int>(std::min<int64_t>(W, n - i));
    const vf v = load_n(x + i, k);
    store_n(x + i, v * vsigmoid(v), k);
  }
}

// HF's MambaRMSNorm: x / sqrt(mean(x²) + eps), times the weight.
at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), H = x.size(1);
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * H;
    vf sq = splat(0.0f);
    for (int64_t i = 0; i < H; i += W) {
      const vf v = load_n(row + i, static_cast<int>(std::min<int64_t>(W, H - i)));
      sq += v * v;
    }
    float total = 0.0f;
    for (int w = 0; w < W; ++w) total += sq[w];
    const float inv = 1.0f / __builtin_sqrtf(total / static_cast<float>(H) + static_cast<float>(eps));
    for (int64_t i = 0; i < H; ++i) op[r * H + i] = wp[i] * (row[i] * inv);
  }
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  // what F.linear runs for a 2-D input
  return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
}

// The nonzero entries of a neuron's output x [B, K], row by row (CSR): index = k·O (the offset of
// W^T's row k), value = x[b, k]. One branch-free pass (about half the entries are nonzero at the
// crossing, where a branch would mispredict on every other one), stopped as soon as more than
// `limit` entries fired: then the caller runs the dense matmul instead.
struct Spikes {
  std::vector<int64_t> start, index;
  std::vector<float> value;
};

bool list_spikes(const at::Tensor& x, int64_t O, int64_t limit, Spikes& out) {
  const int64_t batch = x.size(0), K = x.size(1), ld = x.stride(0);
  const float* xp = x.data_ptr<float>();
  out.start.assign(batch + 1, 0);
  out.index.resize(batch * K);  // the slot written for entry e is the count before it, at most e
  out.value.resize(batch * K);
  int64_t* idx = out.index.data();
  float* val = out.value.data();
  int64_t n = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = xp + b * ld;
    for (int64_t k = 0; k < K; ++k) {
      const float v = row[k];
      idx[n] = k * O;
      val[n] = v;
      n += v != 0.0f;
    }
    out.start[b + 1] = n;
    if (n > limit) return false;
  }
  return true;
}

// out [B, O] = x [B, K] @ WT [K, O] (+ bias), reading only the rows of WT whose input entry is
// nonzero: a spike-driven projection. x holds a neuron's output (s·V, mostly 0 after sparsify), so
// the work is (nonzero entries) x O instead of B x K x O. With the nonzero entries listed per row
// (CSR), each column block of WT ([K, NV·16]) is read by every batch row in turn while it is in
// cache, NV output vectors in registers (NV independent FMA chains). Column blocks run in parallel
// when there is enough work to share. NV = 8 for outputs of 512 and more, 4 below (a one-off A/B of
// the two on the 2-core VM, not kept: 8 was about 1.25x faster than 4 at in_proj's and the LM
// head's widths at 50% nonzero, slower at out_proj's 256).
template <int NV>
at::Tensor spike_linear_blocks(const Spikes& spikes, int64_t batch, const at::Tensor& WT,
                               const std::optional<at::Tensor>& bias) {
  const int64_t O = WT.size(1);
  at::Tensor out = at::empty({batch, O}, WT.options());
  const float* wp = WT.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t* index = spikes.index.data();
  const float* value = spikes.value.data();
  const int64_t* start = spikes.start.data();
  constexpr int64_t kBlock = NV * W;
  const int64_t n_blocks = (O + kBlock - 1) / kBlock;
  // below ~32k multiply-adds a block, waking the second thread costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, start[batch] * kBlock));
  at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c = blk * kBlock;
      for (int64_t b = 0; b < batch; ++b) {
        float* o = op + b * O;
        const int64_t* idx = index + start[b];
        const float* val = value + start[b];
        const int64_t n = start[b + 1] - start[b];
        if (c + kBlock <= O) {
          vf acc[NV];
          for (int j = 0; j < NV; ++j) acc[j] = bp ? load_n(bp + c + j * W, W) : splat(0.0f);
          for (int64_t i = 0; i < n; ++i) {
            const float v = val[i];
            const float* w = wp + idx[i] + c;
            for (int j = 0; j < NV; ++j) acc[j] += v * load_n(w + j * W, W);
          }
          for (int j = 0; j < NV; ++j) store_n(o + c + j * W, acc[j], W);
        } else {  // the last, partial block: one vector at a time
          for (int64_t cc = c; cc < O; cc += W) {
            const int w = static_cast<int>(std::min<int64_t>(W, O - cc));
            vf acc = bp ? load_n(bp + cc, w) : splat(0.0f);
            for (int64_t i = 0; i < n; ++i) acc += val[i] * load_n(wp + idx[i] + cc, w);
            store_n(o + cc, acc, w);
          }
        }
      }
    }
  });
  return out;
}

constexpr int64_t kWide = 512;  // outputs from here on use 8-vector blocks

at::Tensor spike_linear_listed(const Spikes& spikes, int64_t batch, const at::Tensor& WT,
                               const std::optional<at::Tensor>& bias) {
  return WT.size(1) >= kWide ? spike_linear_blocks<8>(spikes, batch, WT, bias)
                             : spike_linear_blocks<4>(spikes, batch, WT, bias);
}

void check_spike_linear(const at::Tensor& x, const at::Tensor& WT, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1, "spike_linear: x must be [B, K] float32");
  TORCH_CHECK(WT.scalar_type() == at::kFloat && WT.dim() == 2 && WT.is_contiguous() && WT.size(0) == x.size(1),
              "spike_linear: WT must be [K, O] float32, contiguous");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == WT.size(1),
                "spike_linear: bias must be [O]");
}

at::Tensor spike_linear(const at::Tensor& x, const at::Tensor& WT, const std::optional<at::Tensor>& bias) {
  check_spike_linear(x, WT, bias);
  thread_local Spikes spikes;  // reused: no allocation per call
  list_spikes(x, WT.size(1), x.numel(), spikes);
  return spike_linear_listed(spikes, x.size(0), WT, bias);
}

// The share of nonzero inputs up to which spike_linear beats the dense matmul, measured with
// benchmarks/spike_linear.py on the 2-core VM (d256 and mamba-130m shapes, outputs of at least one
// 64-wide block; benchmarks/results/spike_linear.json): at batch 1 it is 1.4-2.4x faster even at
// 0.8; at batch 16 1.07-1.26x at 0.6 and 0.80-0.97x at 0.8; at batch 64 the dense GEMM's blocking
// pays sooner (1.26-1.59x at 0.4, 0.99-1.16x at 0.5, 0.78-0.90x at 0.6). Narrower outputs
// (x_proj's 48) stay dense.
double max_density(int64_t batch) { return batch <= 16 ? 0.7 : 0.45; }

// A projection of a neuron's output: spike-driven when W^T was planned (a neuron feeds it) and few
// enough inputs fired, else the dense matmul. Same sums; only the order of the additions differs.
at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& WT,
                   const std::optional<at::Tensor>& bias) {
  if (WT.has_value() && WT->size(1) >= 4 * W) {
    thread_local Spikes spikes;
    const auto limit = static_cast<int64_t>(max_density(x.size(0)) * static_cast<double>(x.numel()));
    if (list_spikes(x, WT->size(1), limit, spikes)) return spike_linear_listed(spikes, x.size(0), *WT, bias);
  }
  return linear(x, weight, bias);
}

// The neuron on x [B, C] (row stride free, columns contiguous): into `out` when given, else in place.
void apply_neuron(const at::Tensor& x, const std::optional<at::Tensor>& V, int64_t kind, int64_t levels, double lam,
                  const at::Tensor* out = nullptr) {
  if (kind == kNoNeuron) return;
  TORCH_CHECK(V.has_value() && V->is_contiguous() && V->numel() == x.size(1), "neuron threshold: bad shape");
  const at::Tensor& dst = out ? *out : x;
  neuron_(x.data_ptr<float>(), x.stride(0), dst.data_ptr<float>(), dst.stride(0), x.size(0), x.size(1),
          static_cast<int>(kind), static_cast<float>(levels), static_cast<float>(lam), V->data_ptr<float>());
}

// x's neuron output as a new [B, C] tensor (x itself without a neuron): for inputs that other
// consumers read unspiked (B and C beside dt_proj's input, the SSM's own input beside x_proj's).
at::Tensor neuron_copy(const at::Tensor& x, const std::optional<at::Tensor>& V, int64_t kind, int64_t levels,
                       double lam) {
  if (kind == kNoNeuron) return x;
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  apply_neuron(x, V, kind, levels, lam, &out);
  return out;
}

// The slots of one layer in `tensors` (spiking/fused_step.py builds them in this order).
enum Slot {
  kNorm, kInV, kInW, kInB, kConvW, kConvB, kConvState, kXV, kXW, kDtV, kDtW, kDtB, kA, kDskip, kSsmState, kOutV,
  kOutW, kOutB, kMlpNorm, kUpV, kGateW, kUpW, kDownV, kDownW, kInWT, kOutWT, kGateWT, kUpWT,
  kDownWT, kSlots
};
constexpr int kIntsPerLayer = 12;   // (kind, levels) for in_proj, x_proj, out_proj, mlp.up, mlp.down, dt_proj
constexpr int kFloatsPerLayer = 8;  // eps of norm, eps of mlp_norm, SGC λ of the six placements

// hidden [B, H] (the token's embeddings) -> the backbone's normed output [B, H], through the LM
// head's neuron when it has one; the conv and SSM states in `tensors` are updated in place.
// ints = [n_layers, per layer ..., (kind, levels) of the head neuron]; floats = [eps of norm_f, per
// layer ..., the head neuron's SGC λ]; tensors = per layer kSlots entries, norm_f's weight, the head
// neuron's threshold V (or None).
at::Tensor backbone_step(const at::Tensor& hidden, const c10::List<std::optional<at::Tensor>>& tensors,
                         c10::ArrayRef<int64_t> ints, c10::ArrayRef<double> floats) {
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.dim() == 2, "hidden must be [B, H] float32");
  const int64_t n_layers = ints[0];
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == n_layers * kSlots + 2 &&
                  static_cast<int64_t>(ints.size()) == 3 + n_layers * kIntsPerLayer &&
                  static_cast<int64_t>(floats.size()) == 2 + n_layers * kFloatsPerLayer,
              "backbone_step: argument lists do not match the layer count");
  at::Tensor h = hidden.contiguous().clone();  // the residual stream
  const int64_t batch = h.size(0);
  for (int64_t l = 0; l < n_layers; ++l) {
    auto slot = [&](int k) -> std::optional<at::Tensor> { return tensors.get(l * kSlots + k); };
    const int64_t* li = ints.data() + 1 + l * kIntsPerLayer;
    const double* lf = floats.data() + 1 + l * kFloatsPerLayer;

    // 1. norm, neuron, in_proj -> [x | z]  [B, 2D]
    at::Tensor x = rmsnorm(h, *slot(kNorm), lf[0]);
    apply_neuron(x, slot(kInV), li[0], li[1], lf[2]);
    const at::Tensor proj = project(x, *slot(kInW), slot(kInWT), slot(kInB));
    const int64_t dim = proj.size(1) / 2;

    // 2. causal conv over the K-window (the state shifts by one token), SiLU
    at::Tensor conv_state = *slot(kConvState);
    const at::Tensor conv_w = *slot(kConvW);
    const std::optional<at::Tensor> conv_b = slot(kConvB);
    const int64_t K = conv_state.size(2);
    TORCH_CHECK(conv_state.is_contiguous() && conv_state.size(0) == batch && conv_state.size(1) == dim &&
                    conv_w.is_contiguous() && conv_w.numel() == dim * K,
                "backbone_step: conv state / weight shapes");
    at::Tensor xc = at::empty({batch, dim}, h.options());
    {
      float* sp = conv_state.data_ptr<float>();
      const float* wp = conv_w.data_ptr<float>();
      const float* bp = conv_b.has_value() ? conv_b->data_ptr<float>() : nullptr;
      const float* pp = proj.data_ptr<float>();
      float* xp = xc.data_ptr<float>();
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t d = 0; d < dim; ++d) {
          float* window = sp + (b * dim + d) * K;
          for (int64_t k = 0; k + 1 < K; ++k) window[k] = window[k + 1];
          window[K - 1] = pp[b * 2 * dim + d];
          float acc = 0.0f;
          for (int64_t k = 0; k < K; ++k) acc += wp[d * K + k] * window[k];
          xp[b * dim + d] = bp ? acc + bp[d] : acc;
        }
      silu_(xp, batch * dim);
    }

    // 3. x_proj (neuron on its input), dt_proj (neuron on its input, the first R columns) -> Δ (bias
    //    included), B, C
    const at::Tensor xn = neuron_copy(xc, slot(kXV), li[2], li[3], lf[3]);  // the scan reads xc unspiked
    const at::Tensor dbc = at::mm(xn, slot(kXW)->t());  // [B, R + 2N]
    const at::Tensor A = *slot(kA);
    const int64_t N = A.size(1), R = slot(kDtW)->size(1);
    // a copy: B and C, the other columns of dbc, reach the scan without a neuron
    const at::Tensor dt_in = neuron_copy(dbc.narrow(1, 0, R), slot(kDtV), li[10], li[11], lf[7]);
    const at::Tensor dt = at::addmm(*slot(kDtB), dt_in, slot(kDtW)->t());  // [B, D]

    // 4. state update, D skip, gate y·SiLU(z)
    at::Tensor ssm_state = *slot(kSsmState);
    TORCH_CHECK(ssm_state.is_contiguous() && ssm_state.size(0) == batch && ssm_state.size(1) == dim && ssm_state.size(2) == N &&
                    A.is_contiguous() && A.size(0) == dim,
                "backbone_step: SSM state / A shapes");
    at::Tensor y = at::empty({batch, dim}, h.options());
    const std::optional<at::Tensor> Dskip = slot(kDskip);
    state_update(ssm_state.data_ptr<float>(), xc.data_ptr<float>(), dim, dt.data_ptr<float>(), dt.stride(0),
                 A.data_ptr<float>(), dbc.data_ptr<float>() + R, dbc.data_ptr<float>() + R + N, dbc.stride(0),
                 ptr_or_null(Dskip), proj.data_ptr<float>() + dim, 2 * dim, nullptr, true, y.data_ptr<float>(), batch,
                 dim, N);

    // 5. neuron, out_proj, residual
    apply_neuron(y, slot(kOutV), li[4], li[5], lf[4]);
    h.add_(project(y, *slot(kOutW), slot(kOutWT), slot(kOutB)));

    // 6. optional gated MLP: down(SiLU(gate(x)) · up(x)) on its own norm, + residual
    if (slot(kMlpNorm).has_value()) {
      at::Tensor m = rmsnorm(h, *slot(kMlpNorm), lf[1]);
      apply_neuron(m, slot(kUpV), li[6], li[7], lf[5]);
      at::Tensor gate = project(m, *slot(kGateW), slot(kGateWT), std::nullopt);
      const at::Tensor up = project(m, *slot(kUpW), slot(kUpWT), std::nullopt);
      silu_(gate.data_ptr<float>(), gate.numel());
      gate.mul_(up);
      apply_neuron(gate, slot(kDownV), li[8], li[9], lf[6]);
      h.add_(project(gate, *slot(kDownW), slot(kDownWT), std::nullopt));
    }
  }
  at::Tensor out = rmsnorm(h, *tensors.get(n_layers * kSlots), floats[0]);
  const int64_t* head = ints.data() + 1 + n_layers * kIntsPerLayer;
  apply_neuron(out, tensors.get(n_layers * kSlots + 1), head[0], head[1], floats[1 + n_layers * kFloatsPerLayer]);
  return out;
}

at::Tensor project_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& WT,
                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1, "project: x must be [B, K] float32");
  if (WT.has_value()) check_spike_linear(x, *WT, bias);
  return project(x, weight, WT, bias);
}

}  // namespace

TORCH_LIBRARY(spikerl_cpu, m) {
  m.def(
      "scan_fwd(Tensor u, Tensor delta, Tensor AT, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "bool softplus, Tensor? h0, int chunk, bool save_chunks) -> Tensor[]",
      &scan_fwd);
  m.def(
      "scan_bwd(Tensor u, Tensor delta, Tensor AT, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "bool softplus, Tensor chunks, int chunk, Tensor dout, Tensor? dlast) -> Tensor[]",
      &scan_bwd);
  m.def(
      "state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? dt_bias, bool softplus) -> Tensor",
      &state_update_op);
  m.def("backbone_step(Tensor hidden, Tensor?[] tensors, int[] ints, float[] floats) -> Tensor", &backbone_step);
  m.def("spike_linear(Tensor x, Tensor WT, Tensor? bias) -> Tensor", &spike_linear);
  m.def("project(Tensor x, Tensor weight, Tensor? WT, Tensor? bias) -> Tensor", &project_op);
}
