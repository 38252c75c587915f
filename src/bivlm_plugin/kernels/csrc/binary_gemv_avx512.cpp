// Bi-VLM binary GEMV / small GEMM for x86 AVX512 (fp32 accumulate).
//
// For output row o and activation row x (zero-padded to 32 * W columns):
//   y_o = sum_r (mu_r - alpha_r) * S_r + 2 * alpha_r * P_r + salient corrections
// with S_r = sum of x over ring r and P_r = sum of x over ring r where the sign bit is set.
// S_0 = sum(x) - sum_{r>0} S_r, so N rings need 2N - 1 bit-masked sums ("streams").
//
// Each stream is computed with lookup tables over groups of 4 activations (as T-MAC does):
// T_g[m] = sum of x[4g + j] over the bits j set in m, 16 floats = one zmm register. 16 output
// rows are handled at once: their 32-bit words of one column chunk are loaded and transposed
// (lane r = word of row r), and for each 4-bit nibble one vpermps of T_g by the nibble vector
// gives 16 rows' partial sums (vpermps reads only the low 4 bits of each index, so a plain right
// shift selects the nibble). That is one permute + one add per 64 weights, against one masked
// add per 16 weights for the bit-mask formulation. Ring streams are the sign words ANDed with
// the ring-equality masks, computed in registers. Signs are read in the stored layout (bit j of
// word w is column 32 w + j): nothing is repacked.
// A salient weight (ring stored as 0) is corrected by x_c * ((mu_s - mu_0) + (a1 - alpha_0) B1
// + a2 B2).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kRowBlock = 16;  // output rows per vector (one lane each)

constexpr int ring_bits(int n) { return n <= 1 ? 0 : (n <= 2 ? 1 : (n <= 4 ? 2 : 3)); }

// Batch rows handled together: keep accumulators (2N - 1) * BT * chains within ~16 zmm.
constexpr int max_bt(int n) { return n <= 2 ? 4 : 2; }

constexpr int chains(int streams, int bt) {
  // Independent accumulators per (batch row, stream) to hide the add latency (>= 4 in flight).
  const int live = streams * bt;
  return live >= 4 ? 1 : (live >= 2 ? 2 : 4);
}

struct Problem {
  const float* x;          // (B, 32 W) fp32, zero padded
  const float* xsum;       // (B,)
  const float* tables;     // (B, 8 W, 16) fp32 lookup tables
  int64_t ldx;             // 32 W
  const int32_t* signs;    // (O, W)
  const int32_t* rings;    // (O, NB, W), or nullptr
  int64_t words;           // W
  int64_t out;             // O
};

// In-register transpose of a 16 x 16 block of 32-bit words: r[i] lane j -> r[j] lane i.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4 i + j], 128-bit lane L, holds rows 4i..4i+3 of column 4L + j.
  for (int j = 0; j < 4; ++j) {
    const __m512i a = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);
    const __m512i b = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xDD);
    const __m512i c = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
    const __m512i d = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xDD);
    t[0 + j] = _mm512_shuffle_i32x4(a, c, 0x88);
    t[8 + j] = _mm512_shuffle_i32x4(a, c, 0xDD);
    t[4 + j] = _mm512_shuffle_i32x4(b, d, 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Words [w0, w0 + nw) of rows [o0, o0 + 16) of a (O, stride) int32 plane, transposed: lane r of
// dst[w] is word w0 + w of row o0 + r (rows past O read as zero).
inline void load_transposed(const int32_t* plane, int64_t stride, int64_t o0, int64_t out,
                            int64_t w0, int nw, __m512i dst[16]) {
  const __mmask16 m = nw >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nw) - 1);
  for (int r = 0; r < 16; ++r)
    dst[r] = o0 + r < out ? _mm512_maskz_loadu_epi32(m, plane + (o0 + r) * stride + w0)
                          : _mm512_setzero_si512();
  transpose16(dst);
}

// T[g][m] = sum_{j < 4, bit j of m} x[4 g + j] for every group g of one activation row.
void build_tables(const float* x, int64_t groups, float* t) {
  __m512 bit[4];
  for (int j = 0; j < 4; ++j) {
    alignas(64) float v[16];
    for (int m = 0; m < 16; ++m) v[m] = (m >> j) & 1 ? 1.f : 0.f;
    bit[j] = _mm512_load_ps(v);
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc = _mm512_mul_ps(_mm512_set1_ps(x[4 * g]), bit[0]);
    for (int j = 1; j < 4; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(x[4 * g + j]), bit[j], acc);
    _mm512_store_ps(t + 16 * g, acc);
  }
}

// sums: [row - o_base][batch][2N] = S_0..S_{N-1}, P_0..P_{N-1} for rows [o0, o0 + 16) and
// batch rows [b0, b0 + BT).
template <int N, int BT>
void block(const Problem& p, int64_t o0, int64_t b0, float* sums, int64_t o_base, int64_t batch) {
  constexpr int NB = ring_bits(N);
  constexpr int SN = 2 * N - 1;  // streams: P_0..P_{N-1}, then S_1..S_{N-1}
  constexpr int CH = chains(SN, BT);
  __m512 acc[BT][SN][CH];
  for (int t = 0; t < BT; ++t)
    for (int s = 0; s < SN; ++s)
      for (int c = 0; c < CH; ++c) acc[t][s][c] = _mm512_setzero_ps();
  const int64_t tstride = 8 * p.words * 16;  // floats per batch row of tables
  const float* tb0 = p.tables + b0 * tstride;
  __m512i sw[16];
  __m512i rw[NB > 0 ? NB : 1][16];
  for (int64_t w0 = 0; w0 < p.words; w0 += 16) {
    const int nw = static_cast<int>(std::min<int64_t>(16, p.words - w0));
    load_transposed(p.signs, p.words, o0, p.out, w0, nw, sw);
    for (int b = 0; b < NB; ++b) load_transposed(p.rings + b * p.words, NB * p.words, o0, p.out, w0, nw, rw[b]);
    for (int w = 0; w < nw; ++w) {
      __m512i st[SN];
      if constexpr (NB == 0) {
        st[0] = sw[w];
      } else {
        const __m512i ones = _mm512_set1_epi32(-1);
        for (int q = 0; q < N; ++q) {
          __m512i mq = ones;
          for (int b = 0; b < NB; ++b)
            mq = ((q >> b) & 1) ? _mm512_and_si512(mq, rw[b][w]) : _mm512_andnot_si512(rw[b][w], mq);
          st[q] = _mm512_and_si512(mq, sw[w]);
          if (q > 0) st[N + q - 1] = mq;
        }
      }
      const float* tg = tb0 + (w0 + w) * 8 * 16;
#pragma GCC unroll 8
      for (int n = 0; n < 8; ++n) {
        for (int s = 0; s < SN; ++s) {
          const __m512i idx = n ? _mm512_srli_epi32(st[s], 4 * n) : st[s];
          for (int t = 0; t < BT; ++t)
            acc[t][s][n % CH] = _mm512_add_ps(
                acc[t][s][n % CH],
                _mm512_permutexvar_ps(idx, _mm512_load_ps(tg + t * tstride + 16 * n)));
        }
      }
    }
  }
  const int64_t nrows = std::min<int64_t>(16, p.out - o0);
  for (int t = 0; t < BT; ++t) {
    alignas(64) float v[SN][16];
    for (int s = 0; s < SN; ++s) {
      __m512 a = acc[t][s][0];
      for (int c = 1; c < CH; ++c) a = _mm512_add_ps(a, acc[t][s][c]);
      _mm512_store_ps(v[s], a);
    }
    for (int64_t r = 0; r < nrows; ++r) {
      float* dst = sums + ((o0 + r - o_base) * batch + b0 + t) * 2 * N;
      float rest = 0.f;
      for (int q = 1; q < N; ++q) {
        dst[q] = v[N + q - 1][r];
        rest += dst[q];
      }
      dst[0] = p.xsum[b0 + t] - rest;
      for (int q = 0; q < N; ++q) dst[N + q] = v[q][r];
    }
  }
}

// Parameters for turning ring sums into outputs (fp16 tensors read directly).
struct Epilogue {
  const at::Half* scales;  // (O, N) or (N,)
  bool row_scales;
  const at::Half* mean;    // (O, mcols)
  int64_t mcols;
  int64_t k;               // salient width
  const uint8_t* idx8;     // (O, k) or nullptr
  const int16_t* idx16;    // (O, k) or nullptr
  const at::Half* sal_scales;  // (O, 2)
  const uint8_t* sign2;    // (O, s2w)
  int64_t s2w;
  const int16_t* count;    // (O,) or nullptr
  const int32_t* signs;    // (O, W)
  int64_t words;
  const float* bias;       // (O,) or nullptr
  float* y;                // (B, O) fp32
};

template <typename Idx>
inline int64_t col_at(const Idx* idx, int64_t j) { return static_cast<int64_t>(idx[j]); }

// y[b, o] for rows [o_begin, o_end) from their ring sums, while their signs are still in L1.
template <int N>
void finish(const Problem& p, const Epilogue& e, int64_t o_begin, int64_t o_end,
            const float* sums, int64_t batch, int32_t* col, float* coef) {
  for (int64_t o = o_begin; o < o_end; ++o) {
    float cs[N], cp[N];
    for (int q = 0; q < N; ++q) {
      const float a = static_cast<float>(e.scales[e.row_scales ? o * N + q : q]);
      const float m = static_cast<float>(e.mean[o * e.mcols + (e.mcols > 1 ? q : 0)]);
      cs[q] = m - a;
      cp[q] = 2.f * a;
    }
    const int64_t nk = e.count ? e.count[o] : e.k;
    if (nk) {
      const float mu_s = static_cast<float>(e.mean[o * e.mcols + (e.mcols > 1 ? N : 0)]);
      const float a1 = static_cast<float>(e.sal_scales[2 * o]);
      const float a2 = static_cast<float>(e.sal_scales[2 * o + 1]);
      const float d0 = mu_s - static_cast<float>(e.mean[o * e.mcols]);         // mu_s - mu_0
      const float d1 = a1 - static_cast<float>(e.scales[e.row_scales ? o * N : 0]);  // a1 - alpha_0
      // 16 entries at a time, all in registers: scalar stores followed by vector loads stall
      // store forwarding badly (measured ~10 ns per entry), so nothing scalar is stored here.
      const int32_t* srow = e.signs + o * e.words;
      const uint8_t* s2row = e.sign2 + o * e.s2w;
      const __m512 vd0 = _mm512_set1_ps(d0), vd1 = _mm512_set1_ps(d1), va2 = _mm512_set1_ps(a2);
      for (int64_t j = 0; j < nk; j += 16) {
        const int64_t left = nk - j;
        const __mmask16 m = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
        __m512i ci;
        if (e.idx8) {
          ci = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, e.idx8 + o * e.k + j));
        } else {
          ci = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, e.idx16 + o * e.k + j));
        }
        const __m512i wd = _mm512_mask_i32gather_epi32(
            _mm512_setzero_si512(), m, _mm512_srli_epi32(ci, 5), srow, 4);
        const __m512i bit = _mm512_srlv_epi32(wd, _mm512_and_si512(ci, _mm512_set1_epi32(31)));
        const __mmask16 b1 = _mm512_test_epi32_mask(bit, _mm512_set1_epi32(1));
        // Entries j..j+15 are bits 0..15 of the little-endian uint16 at byte j / 8.
        uint16_t s2bits = 0;
        const int64_t nbytes = std::min<int64_t>(2, e.s2w - j / 8);
        for (int64_t t = 0; t < nbytes; ++t) s2bits |= static_cast<uint16_t>(s2row[j / 8 + t]) << (8 * t);
        const __mmask16 b2 = _cvtu32_mask16(s2bits);
        __m512 c = _mm512_add_ps(vd0, _mm512_mask_blend_ps(b1, _mm512_sub_ps(_mm512_setzero_ps(), vd1), vd1));
        c = _mm512_add_ps(c, _mm512_mask_blend_ps(b2, _mm512_sub_ps(_mm512_setzero_ps(), va2), va2));
        _mm512_store_si512(col + j, _mm512_maskz_mov_epi32(m, ci));
        _mm512_store_ps(coef + j, _mm512_maskz_mov_ps(m, c));
      }
    }
    const float bias = e.bias ? e.bias[o] : 0.f;
    for (int64_t b = 0; b < batch; ++b) {
      const float* s = sums + ((o - o_begin) * batch + b) * 2 * N;
      float acc = bias;
      for (int q = 0; q < N; ++q) acc += cs[q] * s[q] + cp[q] * s[N + q];
      if (nk) {
        const float* xb = p.x + b * p.ldx;
        __m512 v = _mm512_setzero_ps();
        for (int64_t j = 0; j < nk; j += 16) {
          // Padding lanes hold column 0 and coefficient 0.
          const __m512i ci = _mm512_load_si512(col + j);
          v = _mm512_fmadd_ps(_mm512_i32gather_ps(ci, xb, 4), _mm512_load_ps(coef + j), v);
        }
        acc += _mm512_reduce_add_ps(v);
      }
      e.y[b * p.out + o] = acc;
    }
  }
}

template <int N>
void run(const Problem& p, const Epilogue& e, int64_t batch) {
  constexpr int BT = max_bt(N);
  const int64_t nblocks = (p.out + kRowBlock - 1) / kRowBlock;
  // Layers below ~0.5M weights run on the calling thread: their GEMV is a few microseconds, less
  // than a fork/join, and a busy sibling core turns the join into a long wait (measured in
  // vLLM decode: 600 us per call with the threads, 20-80 us without).
  const int64_t grain = p.out * p.words * 32 * batch >= (int64_t{1} << 19) ? 1 : nblocks;
  at::parallel_for(0, nblocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(kRowBlock * batch * 2 * N);
    // 64-byte aligned salient scratch (whole zmm stores and loads only).
    const int64_t kpad = (e.k + 15) / 16 * 16 + 16;
    std::vector<__m512i> colv(kpad / 16);
    std::vector<__m512> coefv(kpad / 16);
    auto* col = reinterpret_cast<int32_t*>(colv.data());
    auto* coef = reinterpret_cast<float*>(coefv.data());
    // Row blocks outermost so a block's words stay in L1 across the whole batch.
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t ob = blk * kRowBlock, oe = std::min(ob + kRowBlock, p.out);
      int64_t b = 0;
      for (; b + BT <= batch; b += BT) block<N, BT>(p, ob, b, sums.data(), ob, batch);
      if constexpr (BT > 2) for (; b + 2 <= batch; b += 2) block<N, 2>(p, ob, b, sums.data(), ob, batch);
      for (; b < batch; ++b) block<N, 1>(p, ob, b, sums.data(), ob, batch);
      finish<N>(p, e, ob, oe, sums.data(), batch, col, coef);
    }
  });
}

}  // namespace

// x: (B, I) bf16 / fp16 / fp32. Returns (B, O) in x's dtype.
torch::Tensor binary_linear_cpu(
    torch::Tensor x, torch::Tensor signs, torch::Tensor rings, torch::Tensor scales,
    torch::Tensor mean, torch::Tensor salient_idx, torch::Tensor salient_scales,
    torch::Tensor salient_sign2, torch::Tensor salient_count, torch::Tensor bias,
    int64_t n_rings) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (B, I)");
  TORCH_CHECK(n_rings >= 1 && n_rings <= 4, "n_rings must be in [1, 4], got ", n_rings);
  TORCH_CHECK(signs.scalar_type() == at::kInt && signs.is_contiguous(), "signs: contiguous int32");
  const int64_t batch = x.size(0), in_f = x.size(1), out_f = signs.size(0), words = signs.size(1);
  TORCH_CHECK(words * 32 >= in_f && (words - 1) * 32 < in_f, "signs width does not match x");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  const int64_t ldx = 32 * words;
  // Per-call scratch lives in thread-local buffers (decode calls are ~20 us of work: ATen
  // allocations and dispatches would cost as much). x is converted to fp32, zero padded.
  thread_local std::vector<float> xbuf, ybuf;
  thread_local std::vector<__m512> tbuf;
  xbuf.assign(batch * ldx + batch, 0.f);
  float* xf = xbuf.data();
  float* xsum = xf + batch * ldx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bivlm_load_x", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {
      float acc = 0.f;
      for (int64_t i = 0; i < in_f; ++i) {
        const float v = static_cast<float>(src[b * in_f + i]);
        xf[b * ldx + i] = v;
        acc += v;
      }
      xsum[b] = acc;
    }
  });
  const int64_t tstride = 8 * words;  // zmm tables per batch row
  if (static_cast<int64_t>(tbuf.size()) < batch * tstride) tbuf.resize(batch * tstride);
  float* tables = reinterpret_cast<float*>(tbuf.data());
  at::parallel_for(0, batch, batch > 4 ? 1 : batch, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) build_tables(xf + b * ldx, tstride, tables + b * tstride * 16);
  });
  const int64_t k = salient_idx.numel() ? salient_idx.size(1) : 0;
  const bool f32 = x.scalar_type() == at::kFloat;
  auto y = at::empty({batch, out_f}, x.options());
  if (!f32) ybuf.resize(batch * out_f);
  float* yf = f32 ? y.data_ptr<float>() : ybuf.data();
  Problem p{xf, xsum, tables, ldx,
            signs.data_ptr<int32_t>(), rings.numel() ? rings.data_ptr<int32_t>() : nullptr,
            words, out_f};
  const bool idx8 = k && salient_idx.scalar_type() == at::kByte;
  Epilogue e{scales.data_ptr<at::Half>(), scales.dim() == 2, mean.data_ptr<at::Half>(),
             mean.size(1), k,
             idx8 ? salient_idx.data_ptr<uint8_t>() : nullptr,
             (k && !idx8) ? salient_idx.data_ptr<int16_t>() : nullptr,
             k ? salient_scales.data_ptr<at::Half>() : nullptr,
             k ? salient_sign2.data_ptr<uint8_t>() : nullptr,
             k ? salient_sign2.size(1) : 0,
             salient_count.numel() ? salient_count.data_ptr<int16_t>() : nullptr,
             signs.data_ptr<int32_t>(), words,
             bias.numel() ? bias.data_ptr<float>() : nullptr, yf};
  switch (n_rings) {
    case 1: run<1>(p, e, batch); break;
    case 2: run<2>(p, e, batch); break;
    case 3: run<3>(p, e, batch); break;
    default: run<4>(p, e, batch); break;
  }
  if (!f32) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bivlm_store_y", [&] {
      scalar_t* dst = y.data_ptr<scalar_t>();
      for (int64_t i = 0; i < batch * out_f; ++i) dst[i] = static_cast<scalar_t>(yf[i]);
    });
  }
  return y;
}

// Round-to-nearest-even fp32 -> bf16 for 16 lanes (AVX512F/BW only: no AVX512_BF16 needed).
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// The dense (O, I) weight of a packed layer, bf16 or fp32: the prefill path (dequantize once
// per call, then one dense GEMM). Same value rules as the GEMV epilogue above.
torch::Tensor dequantize_cpu(
    torch::Tensor signs, torch::Tensor rings, torch::Tensor scales, torch::Tensor mean,
    torch::Tensor salient_idx, torch::Tensor salient_scales, torch::Tensor salient_sign2,
    torch::Tensor salient_count, int64_t in_f, int64_t n_rings, bool bf16) {
  TORCH_CHECK(n_rings >= 1 && n_rings <= 4, "n_rings must be in [1, 4], got ", n_rings);
  TORCH_CHECK(signs.scalar_type() == at::kInt && signs.is_contiguous(), "signs: contiguous int32");
  const int64_t out_f = signs.size(0), words = signs.size(1);
  TORCH_CHECK(words * 32 >= in_f && (words - 1) * 32 < in_f, "signs width does not match in_f");
  const int nb = n_rings <= 1 ? 0 : (n_rings <= 2 ? 1 : 2);
  const int64_t k = salient_idx.numel() ? salient_idx.size(1) : 0;
  const bool idx8 = k && salient_idx.scalar_type() == at::kByte;
  const bool row_scales = scales.dim() == 2;
  const int64_t mcols = mean.size(1);
  auto w = at::empty({out_f, in_f}, signs.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const uint16_t* sg = reinterpret_cast<const uint16_t*>(signs.data_ptr<int32_t>());
  const uint16_t* rg = nb ? reinterpret_cast<const uint16_t*>(rings.data_ptr<int32_t>()) : nullptr;
  const at::Half* sc = scales.data_ptr<at::Half>();
  const at::Half* mn = mean.data_ptr<at::Half>();
  const int64_t halves = 2 * words;
  at::parallel_for(0, out_f, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      __m512 lo[4], hi[4];
      for (int q = 0; q < n_rings; ++q) {
        const float a = static_cast<float>(sc[row_scales ? o * n_rings + q : q]);
        const float m = static_cast<float>(mn[o * mcols + (mcols > 1 ? q : 0)]);
        lo[q] = _mm512_set1_ps(m - a);
        hi[q] = _mm512_set1_ps(m + a);
      }
      const uint16_t* srow = sg + o * halves;
      const uint16_t* rrow = nb ? rg + o * halves * nb : nullptr;
      for (int64_t h = 0; h < halves; ++h) {
        const int64_t c0 = 16 * h;
        if (c0 >= in_f) break;
        const __mmask16 s = _cvtu32_mask16(srow[h]);
        __m512 v = _mm512_mask_blend_ps(s, lo[0], hi[0]);
        if (nb) {
          uint32_t pl[2] = {rrow[h], nb > 1 ? rrow[halves + h] : 0u};
          for (int q = 1; q < n_rings; ++q) {
            uint32_t mq = 0xFFFFu;
            for (int b = 0; b < nb; ++b) mq &= ((q >> b) & 1) ? pl[b] : ~pl[b];
            v = _mm512_mask_blend_ps(_cvtu32_mask16(mq), v, _mm512_mask_blend_ps(s, lo[q], hi[q]));
          }
        }
        const int64_t left = in_f - c0;
        const __mmask16 keep = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
        if (bf16) {
          _mm256_mask_storeu_epi16(w.data_ptr<at::BFloat16>() + o * in_f + c0, keep, to_bf16(v));
        } else {
          _mm512_mask_storeu_ps(w.data_ptr<float>() + o * in_f + c0, keep, v);
        }
      }
      const int64_t nk = salient_count.numel() ? salient_count.data_ptr<int16_t>()[o] : k;
      if (!nk) continue;
      const float mu_s = static_cast<float>(mn[o * mcols + (mcols > 1 ? n_rings : 0)]);
      const float a1 = static_cast<float>(salient_scales.data_ptr<at::Half>()[2 * o]);
      const float a2 = static_cast<float>(salient_scales.data_ptr<at::Half>()[2 * o + 1]);
      const int32_t* swords = signs.data_ptr<int32_t>() + o * words;
      const uint8_t* s2 = salient_sign2.data_ptr<uint8_t>() + o * salient_sign2.size(1);
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t c = idx8 ? salient_idx.data_ptr<uint8_t>()[o * k + j]
                               : salient_idx.data_ptr<int16_t>()[o * k + j];
        const bool b1 = (static_cast<uint32_t>(swords[c >> 5]) >> (c & 31)) & 1u;
        const bool b2 = (s2[j >> 3] >> (j & 7)) & 1u;
        const float val = mu_s + (b1 ? a1 : -a1) + (b2 ? a2 : -a2);
        if (bf16) {
          w.data_ptr<at::BFloat16>()[o * in_f + c] = static_cast<at::BFloat16>(val);
        } else {
          w.data_ptr<float>()[o * in_f + c] = val;
        }
      }
    }
  });
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("binary_linear_cpu", &binary_linear_cpu, "Bi-VLM binary linear (AVX512)");
  m.def("dequantize_cpu", &dequantize_cpu, "Bi-VLM packed layer -> dense weight (AVX512)");
}
