// Bi-VLM binary GEMV / small GEMM for x86 AVX512 (fp32 accumulate).
//
// For output row o and activation row x (zero-padded to 32 * W columns):
//   y_o = sum_r (mu_r - alpha_r) * S_r + 2 * alpha_r * P_r + salient corrections
// with S_r = sum of x over ring r and P_r = sum of x over ring r where the sign bit is set.
// S_0 = sum(x) - sum_{r>0} S_r, so N rings cost 2N - 1 masked adds per 16 inputs. Masks come
// straight from the packed words: bit j of word w is column 32 w + j, so the low / high 16 bits
// of a word are the __mmask16 of columns [32 w, 32 w + 16) / [32 w + 16, 32 w + 32).
// R output rows share each loaded activation vector and BT activation rows share each mask.
// A salient weight (ring stored as 0) is corrected by x_c * ((mu_s - mu_0) + (a1 - alpha_0) B1
// + a2 B2).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kRowBlock = 8;

constexpr int ring_bits(int n) { return n <= 1 ? 0 : (n <= 2 ? 1 : (n <= 4 ? 2 : 3)); }

constexpr int rows_per_pass(int n, int bt) {
  // Keep accumulators R * BT * (2N - 1) <= 24 zmm registers; R a power of two <= 8.
  int budget = 24 / ((2 * n - 1) * bt);
  return budget >= 8 ? 8 : (budget >= 4 ? 4 : (budget >= 2 ? 2 : 1));
}

struct Problem {
  const float* x;          // (B, 32 W) fp32, zero padded
  const float* xsum;       // (B,)
  int64_t ldx;             // 32 W
  const uint16_t* signs;   // (O, 2 W) halves
  const uint16_t* rings;   // (O, 2 W b) halves, plane-major, or nullptr
  int64_t halves;          // 2 W
  int64_t out;             // O
};

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

// sums: [row - o_base][batch][2N] = S_0..S_{N-1}, P_0..P_{N-1}.
template <int N, int R, int BT>
void block(const Problem& p, int64_t o0, int64_t b0, float* sums, int64_t o_base, int64_t batch) {
  constexpr int NB = ring_bits(N);
  __m512 P[R][BT][N];
  __m512 S[R][BT][N];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < BT; ++t)
      for (int q = 0; q < N; ++q) {
        P[r][t][q] = _mm512_setzero_ps();
        S[r][t][q] = _mm512_setzero_ps();
      }
  const float* x0 = p.x + b0 * p.ldx;
  const uint16_t* s0 = p.signs + o0 * p.halves;
  const uint16_t* r0 = p.rings ? p.rings + o0 * p.halves * NB : nullptr;
  for (int64_t h = 0; h < p.halves; ++h) {
    __m512 xv[BT];
    for (int t = 0; t < BT; ++t) xv[t] = _mm512_loadu_ps(x0 + t * p.ldx + 16 * h);
    for (int r = 0; r < R; ++r) {
      const uint32_t s = s0[r * p.halves + h];
      if constexpr (NB == 0) {
        const __mmask16 m = _cvtu32_mask16(s);
        for (int t = 0; t < BT; ++t) P[r][t][0] = _mm512_mask_add_ps(P[r][t][0], m, P[r][t][0], xv[t]);
      } else {
        uint32_t pl[NB > 0 ? NB : 1];
        for (int b = 0; b < NB; ++b) pl[b] = r0[(r * NB + b) * p.halves + h];
        for (int q = 0; q < N; ++q) {
          uint32_t mq = 0xFFFFu;
          for (int b = 0; b < NB; ++b) mq &= ((q >> b) & 1) ? pl[b] : ~pl[b];
          const __mmask16 mp = _cvtu32_mask16(mq & s);
          for (int t = 0; t < BT; ++t) P[r][t][q] = _mm512_mask_add_ps(P[r][t][q], mp, P[r][t][q], xv[t]);
          if (q > 0) {
            const __mmask16 ms = _cvtu32_mask16(mq);
            for (int t = 0; t < BT; ++t) S[r][t][q] = _mm512_mask_add_ps(S[r][t][q], ms, S[r][t][q], xv[t]);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < BT; ++t) {
      float* dst = sums + ((o0 + r - o_base) * batch + b0 + t) * 2 * N;
      float rest = 0.f;
      for (int q = 1; q < N; ++q) {
        dst[q] = _mm512_reduce_add_ps(S[r][t][q]);
        rest += dst[q];
      }
      dst[0] = p.xsum[b0 + t] - rest;
      for (int q = 0; q < N; ++q) dst[N + q] = _mm512_reduce_add_ps(P[r][t][q]);
    }
}

template <int N, int BT>
void rows(const Problem& p, int64_t o_begin, int64_t o_end, int64_t b0, float* sums,
          int64_t batch) {
  constexpr int R = rows_per_pass(N, BT);
  int64_t o = o_begin;
  for (; o + R <= o_end; o += R) block<N, R, BT>(p, o, b0, sums, o_begin, batch);
  for (; o < o_end; ++o) block<N, 1, BT>(p, o, b0, sums, o_begin, batch);
}

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
  const int64_t nblocks = (p.out + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(kRowBlock * batch * 2 * N);
    // 64-byte aligned salient scratch (whole zmm stores and loads only).
    const int64_t kpad = (e.k + 15) / 16 * 16 + 16;
    std::vector<__m512i> colv(kpad / 16);
    std::vector<__m512> coefv(kpad / 16);
    auto* col = reinterpret_cast<int32_t*>(colv.data());
    auto* coef = reinterpret_cast<float*>(coefv.data());
    // Row blocks outermost so a block's masks stay in L1 across the whole batch.
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t ob = blk * kRowBlock, oe = std::min(ob + kRowBlock, p.out);
      int64_t b = 0;
      for (; b + 4 <= batch; b += 4) rows<N, 4>(p, ob, oe, b, sums.data(), batch);
      for (; b + 2 <= batch; b += 2) rows<N, 2>(p, ob, oe, b, sums.data(), batch);
      for (; b < batch; ++b) rows<N, 1>(p, ob, oe, b, sums.data(), batch);
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
  const int64_t ldx = 32 * words;
  auto xf = at::zeros({batch, ldx}, x.options().dtype(at::kFloat));
  xf.narrow(1, 0, in_f).copy_(x);
  auto xsum = xf.sum(1);
  const int64_t k = salient_idx.numel() ? salient_idx.size(1) : 0;
  auto y = at::empty({batch, out_f}, xf.options());
  Problem p{xf.data_ptr<float>(), xsum.data_ptr<float>(), ldx,
            reinterpret_cast<const uint16_t*>(signs.data_ptr<int32_t>()),
            rings.numel() ? reinterpret_cast<const uint16_t*>(rings.data_ptr<int32_t>()) : nullptr,
            2 * words, out_f};
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
             bias.numel() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>()};
  switch (n_rings) {
    case 1: run<1>(p, e, batch); break;
    case 2: run<2>(p, e, batch); break;
    case 3: run<3>(p, e, batch); break;
    default: run<4>(p, e, batch); break;
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("binary_linear_cpu", &binary_linear_cpu, "Bi-VLM binary linear (AVX512)");
}
