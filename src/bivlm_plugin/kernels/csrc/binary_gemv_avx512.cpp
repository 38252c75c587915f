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
// + a2 B2), 16 rows per vector. A PackedLayer (prepared once per layer) re-lays out its salient
// entries once (build_plan: one int16 each); one-shot calls gather them from the stored tensors.
//
// Entry points: binary_linear_cpu (one-shot), PackedLayer (prepared; Python calls it directly),
// bivlm_cpu::packed_linear (a torch op on a registered PackedLayer, for compiled graphs), and
// dequantize_cpu (the prefill path's dense weight).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

namespace {

// Round-to-nearest-even fp32 -> bf16 for 16 lanes (AVX512F/BW only: no AVX512_BF16 needed).
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  const __m512i h = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                            _mm512_srli_epi32(r, 16), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(h);  // NaN stays a (quiet) NaN
}

// Lanes [0, n) of 16 (all of them for n >= 16).
inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

constexpr int kRowBlock = 16;  // output rows per vector (one lane each)
constexpr int64_t kAhead = 6;   // row blocks prefetched ahead

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
  int64_t nb_words;        // NB * W: int32 words per row of rings
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
  if (nw <= 4) {
    // A tail of at most 4 words (576-wide layers: 18 words = 16 + 2): rows as 128-bit pieces,
    // four rows per register, a 4 x 4 transpose inside each 128-bit lane, then one lane
    // permute per word (dst[w] lane 4 L + i holds row 4 i + L before it): ~30 instructions
    // instead of a full 16 x 16 transpose's ~96.
    const __mmask8 m4 = static_cast<__mmask8>((1u << nw) - 1);
    __m512i q[4];
    for (int g = 0; g < 4; ++g) {
      q[g] = _mm512_setzero_si512();
      for (int l = 0; l < 4; ++l) {
        const int64_t o = o0 + 4 * g + l;
        if (o < out) {
          const __m128i v = _mm_maskz_loadu_epi32(m4, plane + o * stride + w0);
          if (l == 0) q[g] = _mm512_inserti32x4(q[g], v, 0);
          if (l == 1) q[g] = _mm512_inserti32x4(q[g], v, 1);
          if (l == 2) q[g] = _mm512_inserti32x4(q[g], v, 2);
          if (l == 3) q[g] = _mm512_inserti32x4(q[g], v, 3);
        }
      }
    }
    const __m512i t0 = _mm512_unpacklo_epi32(q[0], q[1]), t1 = _mm512_unpackhi_epi32(q[0], q[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(q[2], q[3]), t3 = _mm512_unpackhi_epi32(q[2], q[3]);
    const __m512i perm = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i u[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                          _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
    for (int w = 0; w < nw; ++w) dst[w] = _mm512_permutexvar_epi32(perm, u[w]);
    return;
  }
  const __mmask16 m = tail_mask(nw);
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

// Parameters for turning ring sums into outputs (fp16 tensors read directly).
struct Epilogue {
  const at::Half* scales;  // (O, N) or (N,)
  bool row_scales;
  int64_t n_rings;
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
  // Salient plan of a prepared layer (see build_plan), or nullptr: (blocks, k, 16) int16, entry
  // j of row 16 b + r = column | B1 << 14 | B2 << 15 (0 where the row has fewer entries).
  const uint16_t* plan = nullptr;
};

// 32-bit words at byte offsets `off` (lanes in m) of a buffer of `size` bytes. Lanes whose four
// bytes would pass the end of the buffer are assembled byte by byte (never read past the end).
inline __m512i gather_bytes4(const uint8_t* base, int64_t size, __m512i off, __mmask16 m) {
  const __mmask16 safe = m & _mm512_cmple_epi32_mask(off, _mm512_set1_epi32(static_cast<int32_t>(size - 4)));
  __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), safe, off, base, 1);
  const __mmask16 rest = m & static_cast<__mmask16>(~safe);
  if (rest) {
    alignas(64) int32_t o[16];
    _mm512_store_si512(o, off);
    for (int r = 0; r < 16; ++r) {
      if (!((rest >> r) & 1)) continue;
      uint32_t w = 0;
      for (int b = 0; b < 4 && o[r] + b < size; ++b) w |= static_cast<uint32_t>(base[o[r] + b]) << (8 * b);
      v = _mm512_mask_set1_epi32(v, static_cast<__mmask16>(1u << r), static_cast<int32_t>(w));
    }
  }
  return v;
}

// fp16 values h[o * stride + c] of rows o = o0 + lane (lanes in m) as fp32; h holds n halves.
inline __m512 load_halves(const at::Half* h, int64_t n, int64_t stride, int64_t c, int64_t o0,
                          __mmask16 m) {
  __m256i bits;
  if (stride == 1) {
    bits = _mm256_maskz_loadu_epi16(m, h + o0 + c);
  } else {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i off = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(o0))),
                                            _mm512_set1_epi32(static_cast<int32_t>(stride))),
                         _mm512_set1_epi32(static_cast<int32_t>(c))),
        1);
    bits = _mm512_cvtepi32_epi16(gather_bytes4(reinterpret_cast<const uint8_t*>(h), 2 * n, off, m));
  }
  return _mm512_cvtph_ps(bits);
}

// Per 16-row block: the ring coefficients and the salient columns and coefficients, one lane per
// output row, computed once and shared by every activation row (all vector work: gathers across
// the 16 rows instead of a loop per row).
template <int N>
struct RowBlock {
  __m512 cs[N], cp[N];  // y = sum_q cs_q S_q + cp_q P_q + bias + salient
  __m512 bias;
  __mmask16 rows;       // lanes that are real rows
  int64_t kmax;         // salient entries of the widest row in the block
  __m512i* col;         // [kmax] salient columns (0 in lanes without an entry)
  __m512* coef;         // [kmax] salient coefficients (0 in lanes without an entry)
};

template <int N>
void row_block(const Problem& p, const Epilogue& e, int64_t o0, RowBlock<N>& rb) {
  const __mmask16 m = tail_mask(p.out - o0);
  rb.rows = m;
  const int64_t out = p.out;
  __m512 a0 = _mm512_setzero_ps(), mean0 = _mm512_setzero_ps();
  for (int q = 0; q < N; ++q) {
    const __m512 a = e.row_scales ? load_halves(e.scales, out * N, N, q, o0, m)
                                  : _mm512_set1_ps(static_cast<float>(e.scales[q]));
    const __m512 mu = load_halves(e.mean, out * e.mcols, e.mcols, e.mcols > 1 ? q : 0, o0, m);
    if (q == 0) { a0 = a; mean0 = mu; }
    rb.cs[q] = _mm512_sub_ps(mu, a);
    rb.cp[q] = _mm512_add_ps(a, a);
  }
  rb.bias = e.bias ? _mm512_maskz_loadu_ps(m, e.bias + o0) : _mm512_setzero_ps();
  rb.kmax = 0;
  if (!e.k) return;
  __m512i cnt = _mm512_set1_epi32(static_cast<int32_t>(e.k));
  if (e.count) {
    cnt = _mm512_maskz_mov_epi32(m, _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, e.count + o0)));
    rb.kmax = _mm512_reduce_max_epi32(cnt);
  } else {
    rb.kmax = e.k;
  }
  if (!rb.kmax) return;
  // A salient weight is stored as ring 0: correct it by mu_s - mu_0 + (a1 - alpha_0) B1 + a2 B2.
  const __m512 mu_s = e.mcols > 1 ? load_halves(e.mean, out * e.mcols, e.mcols, N, o0, m) : mean0;
  const __m512 a1 = load_halves(e.sal_scales, out * 2, 2, 0, o0, m);
  const __m512 a2 = load_halves(e.sal_scales, out * 2, 2, 1, o0, m);
  const __m512 d0 = _mm512_sub_ps(mu_s, mean0), d1 = _mm512_sub_ps(a1, a0);
  const __m512 nd1 = _mm512_sub_ps(_mm512_setzero_ps(), d1), na2 = _mm512_sub_ps(_mm512_setzero_ps(), a2);
  if (e.plan) {  // one contiguous load per entry instead of three gathers
    const uint16_t* pb = e.plan + (o0 / kRowBlock) * e.k * 16;
    for (int64_t j = 0; j < rb.kmax; ++j) {
      const __mmask16 mj = m & _mm512_cmpgt_epi32_mask(cnt, _mm512_set1_epi32(static_cast<int32_t>(j)));
      const __m512i v = _mm512_cvtepu16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(pb + 16 * j)));
      const __mmask16 b1 = _mm512_test_epi32_mask(v, _mm512_set1_epi32(1 << 14));
      const __mmask16 b2 = _mm512_test_epi32_mask(v, _mm512_set1_epi32(1 << 15));
      __m512 cf = _mm512_add_ps(d0, _mm512_mask_blend_ps(b1, nd1, d1));
      cf = _mm512_add_ps(cf, _mm512_mask_blend_ps(b2, na2, a2));
      rb.col[j] = _mm512_maskz_and_epi32(mj, v, _mm512_set1_epi32(0x3FFF));
      rb.coef[j] = _mm512_maskz_mov_ps(mj, cf);
    }
    return;
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i row = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(o0)));
  const __m512i row_k = _mm512_mullo_epi32(row, _mm512_set1_epi32(static_cast<int32_t>(e.k)));
  const __m512i row_w = _mm512_mullo_epi32(row, _mm512_set1_epi32(static_cast<int32_t>(e.words)));
  const __m512i row_s2 = _mm512_mullo_epi32(row, _mm512_set1_epi32(static_cast<int32_t>(e.s2w)));
  const int64_t idx_bytes = out * e.k * (e.idx8 ? 1 : 2);
  const uint8_t* idx_base = e.idx8 ? e.idx8 : reinterpret_cast<const uint8_t*>(e.idx16);
  // One 32-bit gather reads 4 / 2 consecutive salient indices of a row (uint8 / int16) and 32
  // of its sign2 bits: gathers are the cost here (Zen 4 runs them far slower than loads).
  const int per = e.idx8 ? 4 : 2, ibits = e.idx8 ? 8 : 16;
  const __m512i imask = _mm512_set1_epi32(e.idx8 ? 0xFF : 0xFFFF);
  __m512i cgroup = _mm512_setzero_si512(), s2group = _mm512_setzero_si512();
  for (int64_t j = 0; j < rb.kmax; ++j) {
    const __mmask16 mj = m & _mm512_cmpgt_epi32_mask(cnt, _mm512_set1_epi32(static_cast<int32_t>(j)));
    const int jp = static_cast<int>(j % per);
    if (jp == 0) {
      const __m512i at = _mm512_add_epi32(row_k, _mm512_set1_epi32(static_cast<int32_t>(j)));
      cgroup = gather_bytes4(idx_base, idx_bytes, e.idx8 ? at : _mm512_slli_epi32(at, 1), mj);
    }
    if (j % 32 == 0)
      s2group = gather_bytes4(e.sign2, out * e.s2w,
                              _mm512_add_epi32(row_s2, _mm512_set1_epi32(static_cast<int32_t>(j / 8))), mj);
    const __m512i c = _mm512_and_si512(_mm512_srli_epi32(cgroup, ibits * jp), imask);
    const __m512i wd = _mm512_mask_i32gather_epi32(
        _mm512_setzero_si512(), mj, _mm512_add_epi32(row_w, _mm512_srli_epi32(c, 5)), e.signs, 4);
    const __mmask16 b1 = _mm512_test_epi32_mask(
        _mm512_srlv_epi32(wd, _mm512_and_si512(c, _mm512_set1_epi32(31))), _mm512_set1_epi32(1));
    const __mmask16 b2 = _mm512_test_epi32_mask(s2group, _mm512_set1_epi32(static_cast<int32_t>(1u << (j % 32))));
    __m512 cf = _mm512_add_ps(d0, _mm512_mask_blend_ps(b1, nd1, d1));
    cf = _mm512_add_ps(cf, _mm512_mask_blend_ps(b2, na2, a2));
    rb.col[j] = _mm512_maskz_mov_epi32(mj, c);
    rb.coef[j] = _mm512_maskz_mov_ps(mj, cf);
  }
}

// Bit-masked sums of rows [o0, o0 + 16) for batch rows [b0, b0 + BT): v[t][s] holds streams
// P_0..P_{N-1} (sums of x over ring q where the sign bit is set), then S_1..S_{N-1} (sums of x
// over ring q), one lane per output row.
template <int N, int BT>
void accumulate(const Problem& p, int64_t o0, int64_t b0, __m512 (*v)[2 * N - 1]) {
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
  for (int t = 0; t < BT; ++t)
    for (int s = 0; s < SN; ++s) {
      v[t][s] = acc[t][s][0];
      for (int c = 1; c < CH; ++c) v[t][s] = _mm512_add_ps(v[t][s], acc[t][s][c]);
    }
}

// Outputs of rows [o0, o0 + 16) for batch row b from its stream sums v.
template <int N>
inline void epilogue(const Problem& p, const Epilogue& e, const RowBlock<N>& rb, int64_t o0,
                     int64_t b, const __m512* v) {
  __m512 y = rb.bias;
  __m512 s0 = _mm512_set1_ps(p.xsum[b]);  // S_0 = sum(x) - S_1 - ... - S_{N-1}
  for (int q = 1; q < N; ++q) {
    s0 = _mm512_sub_ps(s0, v[N + q - 1]);
    y = _mm512_fmadd_ps(rb.cs[q], v[N + q - 1], y);
  }
  y = _mm512_fmadd_ps(rb.cs[0], s0, y);
  for (int q = 0; q < N; ++q) y = _mm512_fmadd_ps(rb.cp[q], v[q], y);
  if (rb.kmax) {
    const float* xb = p.x + b * p.ldx;
    __m512 sal0 = _mm512_setzero_ps(), sal1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= rb.kmax; j += 2) {
      sal0 = _mm512_fmadd_ps(_mm512_i32gather_ps(rb.col[j], xb, 4), rb.coef[j], sal0);
      sal1 = _mm512_fmadd_ps(_mm512_i32gather_ps(rb.col[j + 1], xb, 4), rb.coef[j + 1], sal1);
    }
    if (j < rb.kmax) sal0 = _mm512_fmadd_ps(_mm512_i32gather_ps(rb.col[j], xb, 4), rb.coef[j], sal0);
    y = _mm512_add_ps(y, _mm512_add_ps(sal0, sal1));
  }
  _mm512_mask_storeu_ps(e.y + b * p.out + o0, rb.rows, y);
}

// Rows [o0, o0 + 16) for batch rows [b0, b0 + BT). The block's row parameters are read after
// the first tile's sums: the salient corrections gather sign words, which must be in L1 by then
// (a gather whose lanes miss the cache stalls for each of them: measured as half of a decode
// call when the parameters came first).
template <int N, int BT>
void tile(const Problem& p, const Epilogue& e, RowBlock<N>& rb, int64_t o0, int64_t b0, bool first) {
  __m512 v[BT][2 * N - 1];
  accumulate<N, BT>(p, o0, b0, v);
  if (first) row_block<N>(p, e, o0, rb);
  for (int t = 0; t < BT; ++t) epilogue<N>(p, e, rb, o0, b0 + t, v[t]);
}

template <int Hint>
inline void prefetch_bytes(const void* ptr, int64_t bytes) {
  const char* a = static_cast<const char*>(ptr);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(a + i, static_cast<_mm_hint>(Hint));
}

// Every packed byte of rows [o0, o1) of a layer.
template <int Hint>
void prefetch_rows(const Problem& p, const Epilogue& e, int64_t o0, int64_t o1) {
  if (o1 <= o0) return;
  const int64_t n = o1 - o0;
  prefetch_bytes<Hint>(p.signs + o0 * p.words, n * p.words * 4);
  if (p.rings) prefetch_bytes<Hint>(p.rings + o0 * p.nb_words, n * p.nb_words * 4);
  if (e.plan) {
    prefetch_bytes<Hint>(e.plan + o0 * e.k, n * e.k * 2);  // o0 is a multiple of 16
  } else {
    if (e.idx8) prefetch_bytes<Hint>(e.idx8 + o0 * e.k, n * e.k);
    if (e.idx16) prefetch_bytes<Hint>(e.idx16 + o0 * e.k, n * e.k * 2);
    if (e.sign2) prefetch_bytes<Hint>(e.sign2 + o0 * e.s2w, n * e.s2w);
  }
  if (e.sal_scales) prefetch_bytes<Hint>(e.sal_scales + 2 * o0, n * 4);
  if (e.row_scales) prefetch_bytes<Hint>(e.scales + o0 * e.n_rings, n * e.n_rings * 2);
  prefetch_bytes<Hint>(e.mean + o0 * e.mcols, n * e.mcols * 2);
}

// Layers below ~0.5M weights x rows run on the calling thread: their GEMV is a few microseconds,
// less than a fork/join, and a busy sibling core turns the join into a long wait (measured in
// vLLM decode: 600 us per call with the threads, 20-80 us without).
inline bool threaded(const Problem& p, int64_t batch) {
  return p.out * p.words * 32 * batch >= (int64_t{1} << 19);
}

template <int N>
void run(const Problem& p, const Epilogue& e, int64_t batch) {
  constexpr int BT = max_bt(N);
  const int64_t nblocks = (p.out + kRowBlock - 1) / kRowBlock;
  const bool par = threaded(p, batch);
  at::parallel_for(0, nblocks, par ? 1 : nblocks, [&](int64_t begin, int64_t end) {
    thread_local std::vector<__m512i> colv;
    thread_local std::vector<__m512> coefv;
    if (static_cast<int64_t>(colv.size()) < e.k) {
      colv.resize(e.k);
      coefv.resize(e.k);
    }
    RowBlock<N> rb;
    rb.col = colv.data();
    rb.coef = coefv.data();
    // Row blocks outermost so a block's words stay in L1 across the whole batch. A decode step
    // streams every layer's bytes from DRAM once: blocks are prefetched kAhead blocks ahead
    // (SmolLM2 served by vLLM, eager, mean decode tok/s of two runs at kAhead 2 / 6 / 12:
    // 71 / 75 / 73; docs/RESULTS.md).
    prefetch_rows<_MM_HINT_T0>(p, e, begin * kRowBlock, std::min((begin + kAhead) * kRowBlock, p.out));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t ob = blk * kRowBlock;
      if (blk + kAhead < end)
        prefetch_rows<_MM_HINT_T0>(p, e, ob + kAhead * kRowBlock, std::min(ob + (kAhead + 1) * kRowBlock, p.out));
      int64_t b = 0;
      for (; b + BT <= batch; b += BT) tile<N, BT>(p, e, rb, ob, b, b == 0);
      if constexpr (BT > 2) for (; b + 2 <= batch; b += 2) tile<N, 2>(p, e, rb, ob, b, b == 0);
      for (; b < batch; ++b) tile<N, 1>(p, e, rb, ob, b, b == 0);
    }
  });
}

// The weight side of one packed layer: pointers into its tensors (x and y are per call).
struct Weights {
  Problem p{};
  Epilogue e{};
  int64_t in_f = 0;
  int64_t n_rings = 1;
};

Weights make_weights(const torch::Tensor& signs, const torch::Tensor& rings, const torch::Tensor& scales,
                     const torch::Tensor& mean, const torch::Tensor& salient_idx,
                     const torch::Tensor& salient_scales, const torch::Tensor& salient_sign2,
                     const torch::Tensor& salient_count, const torch::Tensor& bias, int64_t in_f,
                     int64_t n_rings) {
  TORCH_CHECK(n_rings >= 1 && n_rings <= 4, "n_rings must be in [1, 4], got ", n_rings);
  TORCH_CHECK(signs.scalar_type() == at::kInt && signs.is_contiguous() && signs.dim() == 2,
              "signs: contiguous 2-D int32");
  const int64_t out_f = signs.size(0), words = signs.size(1);
  TORCH_CHECK(words * 32 >= in_f && (words - 1) * 32 < in_f, "signs width ", words,
              " words does not match ", in_f, " input features");
  // Salient and sign gathers use 32-bit offsets.
  TORCH_CHECK(out_f * words < (int64_t{1} << 31) && salient_idx.numel() * 2 < (int64_t{1} << 31),
              "layer too large for the AVX512 kernel's 32-bit offsets");
  for (const auto* t : {&rings, &scales, &mean, &salient_idx, &salient_scales, &salient_sign2,
                        &salient_count, &bias})
    TORCH_CHECK(t->is_contiguous(), "packed tensors must be contiguous");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && mean.scalar_type() == at::kHalf,
              "scales and mean must be float16");
  TORCH_CHECK(!bias.numel() || (bias.scalar_type() == at::kFloat && bias.numel() == out_f),
              "bias must be float32 (O,)");
  const int64_t k = salient_idx.numel() ? salient_idx.size(1) : 0;
  const bool idx8 = k && salient_idx.scalar_type() == at::kByte;
  Weights w;
  w.in_f = in_f;
  w.n_rings = n_rings;
  w.p = Problem{nullptr, nullptr, nullptr, 32 * words,
                signs.data_ptr<int32_t>(), rings.numel() ? rings.data_ptr<int32_t>() : nullptr,
                words, out_f, rings.numel() ? rings.size(1) : 0};
  w.e = Epilogue{scales.data_ptr<at::Half>(), scales.dim() == 2, n_rings, mean.data_ptr<at::Half>(),
                 mean.size(1), k,
                 idx8 ? salient_idx.data_ptr<uint8_t>() : nullptr,
                 (k && !idx8) ? salient_idx.data_ptr<int16_t>() : nullptr,
                 k ? salient_scales.data_ptr<at::Half>() : nullptr,
                 k ? salient_sign2.data_ptr<uint8_t>() : nullptr,
                 k ? salient_sign2.size(1) : 0,
                 salient_count.numel() ? salient_count.data_ptr<int16_t>() : nullptr,
                 signs.data_ptr<int32_t>(), words,
                 bias.numel() ? bias.data_ptr<float>() : nullptr, nullptr};
  return w;
}

// y = x W^T (+ bias) for x (B, I) bf16 / fp16 / fp32 (any leading dims), y in x's dtype.
torch::Tensor launch(const Weights& w, const torch::Tensor& x_in) {
  TORCH_CHECK(x_in.size(-1) == w.in_f, "x has ", x_in.size(-1), " features, the layer ", w.in_f);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16 ||
                  x_in.scalar_type() == at::kHalf,
              "x dtype must be float32, bfloat16 or float16, got ", x_in.scalar_type());
  const auto x = x_in.reshape({-1, w.in_f}).contiguous();
  const int64_t batch = x.size(0), in_f = w.in_f, out_f = w.p.out, ldx = w.p.ldx;
  // Per-call scratch lives in thread-local buffers (decode calls are ~10 us of work: ATen
  // allocations and dispatches would cost as much). x is converted to fp32, zero padded.
  thread_local std::vector<float> xbuf, ybuf;
  thread_local std::vector<__m512> tbuf;
  xbuf.assign(batch * ldx + batch, 0.f);
  float* xf = xbuf.data();
  float* xsum = xf + batch * ldx;
  const auto dt = x.scalar_type();
  const float* x32 = dt == at::kFloat ? x.data_ptr<float>() : nullptr;
  const auto* x16 = static_cast<const uint16_t*>(x.data_ptr());  // bf16 / fp16 bits
  for (int64_t b = 0; b < batch; ++b) {
    float* dst = xf + b * ldx;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < in_f; i += 16) {
      const __mmask16 m = tail_mask(in_f - i);
      __m512 v;
      if (x32) {
        v = _mm512_maskz_loadu_ps(m, x32 + b * in_f + i);
      } else {
        const __m256i h = _mm256_maskz_loadu_epi16(m, x16 + b * in_f + i);
        v = dt == at::kHalf ? _mm512_cvtph_ps(h)
                            : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
      _mm512_mask_storeu_ps(dst + i, m, v);
      acc = _mm512_add_ps(acc, v);
    }
    xsum[b] = _mm512_reduce_add_ps(acc);
  }
  const int64_t tstride = 8 * w.p.words;  // zmm tables per batch row
  if (static_cast<int64_t>(tbuf.size()) < batch * tstride) tbuf.resize(batch * tstride);
  float* tables = reinterpret_cast<float*>(tbuf.data());
  at::parallel_for(0, batch, batch > 4 ? 1 : batch, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) build_tables(xf + b * ldx, tstride, tables + b * tstride * 16);
  });
  const bool f32 = x.scalar_type() == at::kFloat;
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = out_f;
  auto y = at::empty(out_shape, x.options());
  if (!f32) ybuf.resize(batch * out_f);
  float* yf = f32 ? y.data_ptr<float>() : ybuf.data();
  Problem p = w.p;
  p.x = xf;
  p.xsum = xsum;
  p.tables = tables;
  Epilogue e = w.e;
  e.y = yf;
  switch (w.n_rings) {
    case 1: run<1>(p, e, batch); break;
    case 2: run<2>(p, e, batch); break;
    case 3: run<3>(p, e, batch); break;
    default: run<4>(p, e, batch); break;
  }
  if (!f32) {
    auto* dst = static_cast<uint16_t*>(y.data_ptr());
    const int64_t n = batch * out_f;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      const __m512 v = _mm512_maskz_loadu_ps(m, yf + i);
      const __m256i h = dt == at::kHalf ? _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                        : to_bf16(v);
      _mm256_mask_storeu_epi16(dst + i, m, h);
    }
  }
  return y;
}

}  // namespace

// One-shot call (the torch op's path): x (B, I) bf16 / fp16 / fp32 -> (B, O) in x's dtype.
torch::Tensor binary_linear_cpu(
    torch::Tensor x, torch::Tensor signs, torch::Tensor rings, torch::Tensor scales,
    torch::Tensor mean, torch::Tensor salient_idx, torch::Tensor salient_scales,
    torch::Tensor salient_sign2, torch::Tensor salient_count, torch::Tensor bias,
    int64_t n_rings) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (B, I)");
  const Weights w = make_weights(signs, rings, scales, mean, salient_idx, salient_scales,
                                 salient_sign2, salient_count, bias, x.size(1), n_rings);
  return launch(w, x);
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
        const __mmask16 keep = tail_mask(in_f - c0);
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

// A packed layer prepared once for many calls: its tensors are checked and their pointers taken
// at construction, so a decode call converts one tensor argument, not eleven.
class PackedLayer {
 public:
  PackedLayer(torch::Tensor signs, torch::Tensor rings, torch::Tensor scales, torch::Tensor mean,
              torch::Tensor salient_idx, torch::Tensor salient_scales, torch::Tensor salient_sign2,
              torch::Tensor salient_count, int64_t in_features, int64_t n_rings, int64_t max_rows)
      : t_{signs, rings, scales, mean, salient_idx, salient_scales, salient_sign2, salient_count},
        w_(make_weights(signs, rings, scales, mean, salient_idx, salient_scales, salient_sign2,
                        salient_count, torch::empty({0}, torch::kFloat), in_features, n_rings)),
        max_rows_(max_rows) {
    build_plan();
  }

  // The GEMV kernel's y, or None when x has more than max_rows rows, another dtype or device,
  // or another width (the caller then takes another path).
  std::optional<torch::Tensor> forward(const torch::Tensor& x,
                                       const std::optional<torch::Tensor>& bias) const {
    const auto dt = x.scalar_type();
    if (x.dim() < 1 || x.size(-1) != w_.in_f || !x.device().is_cpu() ||
        (dt != at::kFloat && dt != at::kBFloat16 && dt != at::kHalf))
      return std::nullopt;
    const int64_t rows = x.numel() / w_.in_f;
    if (rows > max_rows_ || rows < 1) return std::nullopt;
    if (!bias || !bias->defined()) return launch(w_, x);
    TORCH_CHECK(bias->numel() == w_.p.out, "bias has ", bias->numel(), " values, the layer ",
                w_.p.out, " outputs");
    const auto b32 = bias->to(torch::kFloat).contiguous();
    Weights w = w_;
    w.e.bias = b32.data_ptr<float>();
    return launch(w, x);
  }

  // Any number of rows: the GEMV kernel for few, else dequantize once and one dense GEMM
  // (prefill). bf16 / fp16 activations get a weight in their dtype, fp32 an fp32 one.
  torch::Tensor linear(const torch::Tensor& x, const std::optional<torch::Tensor>& bias) const {
    if (auto y = forward(x, bias)) return *y;
    TORCH_CHECK(x.size(-1) == w_.in_f, "x has ", x.size(-1), " features, the layer ", w_.in_f);
    const bool low = x.scalar_type() == at::kBFloat16;
    auto w = dequantize_cpu(t_[0], t_[1], t_[2], t_[3], t_[4], t_[5], t_[6], t_[7], w_.in_f,
                            w_.n_rings, low);
    if (w.scalar_type() != x.scalar_type()) w = w.to(x.scalar_type());
    std::optional<torch::Tensor> b;
    if (bias && bias->defined()) b = bias->to(x.scalar_type());
    return at::linear(x, w, b);
  }

  int64_t in_features() const { return w_.in_f; }
  int64_t out_features() const { return w_.p.out; }
  // Bytes this object holds beyond the layer's packed tensors (its salient plan).
  int64_t extra_bytes() const { return plan_.defined() ? plan_.numel() * 2 : 0; }

 private:
  // The salient entries re-laid out for the GEMV epilogue: per 16-row block and entry j, the 16
  // rows' columns with their two sign bits (B1 read from the sign words, B2 from sign2) in one
  // int16 each: a contiguous load replaces three gathers (index, sign word, sign2), which were
  // half of a decode call at 1% salient. Same size as salient_idx (int16 per entry); only for
  // inputs below 2^14 columns (wider layers keep the gathers).
  void build_plan() {
    const Epilogue& e = w_.e;
    if (!e.k || w_.in_f > (1 << 14)) return;
    const int64_t out = w_.p.out, nblocks = (out + kRowBlock - 1) / kRowBlock;
    plan_ = torch::zeros({nblocks, e.k, kRowBlock}, torch::kShort);
    auto* dst = reinterpret_cast<uint16_t*>(plan_.data_ptr<int16_t>());
    for (int64_t o = 0; o < out; ++o) {
      const int64_t nk = e.count ? e.count[o] : e.k;
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t c = e.idx8 ? e.idx8[o * e.k + j] : e.idx16[o * e.k + j];
        TORCH_CHECK(c >= 0 && c < w_.in_f, "salient index ", c, " of row ", o, " is outside ",
                    w_.in_f, " columns");
        const uint32_t b1 = (static_cast<uint32_t>(e.signs[o * e.words + (c >> 5)]) >> (c & 31)) & 1u;
        const uint32_t b2 = (e.sign2[o * e.s2w + (j >> 3)] >> (j & 7)) & 1u;
        dst[((o / kRowBlock) * e.k + j) * kRowBlock + o % kRowBlock] =
            static_cast<uint16_t>(c | (b1 << 14) | (b2 << 15));
      }
    }
    w_.e.plan = dst;
  }

  std::vector<torch::Tensor> t_;  // owns the memory the pointers in w_ point into
  torch::Tensor plan_;
  Weights w_;
  int64_t max_rows_;
};

// Prepared layers by handle, for bivlm_cpu::packed_linear (graphs built by torch.compile carry
// the int handle; vLLM's attention op looks its layer up by name the same way).
namespace {
std::mutex g_mu;
std::vector<std::shared_ptr<const PackedLayer>> g_layers;

std::shared_ptr<const PackedLayer> layer_at(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_mu);
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(g_layers.size()) && g_layers[handle],
              "bivlm_cpu::packed_linear: no prepared layer with handle ", handle);
  return g_layers[handle];
}
}  // namespace

int64_t register_layer(std::shared_ptr<PackedLayer> layer) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_layers.push_back(std::move(layer));
  return static_cast<int64_t>(g_layers.size()) - 1;
}

void release_layer(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (handle >= 0 && handle < static_cast<int64_t>(g_layers.size())) g_layers[handle].reset();
}

int64_t layer_out_features(int64_t handle) { return layer_at(handle)->out_features(); }

torch::Tensor packed_linear(const torch::Tensor& x, int64_t handle,
                            const std::optional<torch::Tensor>& bias) {
  return layer_at(handle)->linear(x, bias);
}

TORCH_LIBRARY(bivlm_cpu, m) {
  m.def("packed_linear(Tensor x, int handle, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(bivlm_cpu, CPU, m) { m.impl("packed_linear", &packed_linear); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("binary_linear_cpu", &binary_linear_cpu, "Bi-VLM binary linear (AVX512)");
  py::class_<PackedLayer, std::shared_ptr<PackedLayer>>(m, "PackedLayer")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                    torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t>())
      .def("__call__", &PackedLayer::forward, py::arg("x"), py::arg("bias") = py::none())
      .def("linear", &PackedLayer::linear, py::arg("x"), py::arg("bias") = py::none())
      .def_property_readonly("in_features", &PackedLayer::in_features)
      .def_property_readonly("out_features", &PackedLayer::out_features)
      .def_property_readonly("extra_bytes", &PackedLayer::extra_bytes);
  m.def("register_layer", &register_layer, "handle of a PackedLayer for bivlm_cpu::packed_linear");
  m.def("release_layer", &release_layer, "drop the registry's reference to a handle's layer");
  m.def("layer_out_features", &layer_out_features, "out_features of a handle's layer");
  m.def("dequantize_cpu", &dequantize_cpu, "Bi-VLM packed layer -> dense weight (AVX512)");
}
