// Per-shard decode attention on CPU that returns the log-sum-exp Helix needs.
//
// One pass over each query token's visible prefix of its paged KV shard,
// reading the cache in place through the block table (no gather, no copy):
// for every block, the G query heads of a KV head score the block's keys,
// an online softmax rescales the running sums, and the value rows are
// accumulated. Output: out [T, H, Dv] and the natural-log lse [T, H]
// (-inf and zeros for a token that sees nothing).
//
// Why not vLLM's own kernel: it returns no LSE. Why not torch's flash kernel:
// it needs views or gathered copies of the shard and tiles for prefill-sized
// query blocks; a decode token has 1 query row per head, and the read of K/V
// is the whole cost, so the loop below is written around that read.
//
// K and V are given as strided tensors [blocks, block_size, kv_heads, dim]
// (last dim contiguous), so one kernel serves GQA's K|V-packed cache and
// MLA's latent (the same cache as key, its first kv_lora_rank dims as value).
// Accumulation is float32 (float64 for float64 inputs). A token's shard is cut
// into fixed-size pieces (work for several threads), merged exactly in order.
//
// append_kv (at the end) writes a step's K/V rows into the plugin's [.., K|V]
// GQA cache: one call instead of a dozen small torch operations per layer.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using at::vec::Vectorized;

template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& x) {
  return x.exp();
}

template <>
inline Vectorized<float> vexp<float>(const Vectorized<float>& x) {
  return x.exp_u20();  // the exp torch's own CPU flash attention uses
}

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec s0(acc_t(0)), s1(acc_t(0));
  int64_t d = 0;
  for (; d + 2 * W <= n; d += 2 * W) {
    s0 = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + d + W), Vec::loadu(b + d + W), s1);
  }
  for (; d + W <= n; d += W) {
    s0 = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), s0);
  }
  acc_t r = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, s0 + s1);
  for (; d < n; ++d) r += a[d] * b[d];
  return r;
}

template <typename acc_t>
inline void axpy(acc_t* acc, acc_t p, const acc_t* v, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vp(p);
  int64_t d = 0;
  for (; d + W <= n; d += W) {
    at::vec::fmadd(vp, Vec::loadu(v + d), Vec::loadu(acc + d)).store(acc + d);
  }
  for (; d < n; ++d) acc[d] += p * v[d];
}

// A row of the cache in the accumulation type: in place when the types match.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* row, acc_t* scratch, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    for (int64_t d = 0; d < n; ++d) scratch[d] = static_cast<acc_t>(row[d]);
    return scratch;
  }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HELIX_HAVE_AVX2 1

constexpr int64_t kSubBlock = 16;  // tokens per online-softmax step on the AVX2 path

// Sum of each of 8 vectors, as the 8 lanes of one vector.
inline __m256 sum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// Online softmax of a tile of 8 query rows (float32) over `n` consecutive tokens of a block.
// q: [8, dk] pre-scaled; keys / values: rows `k_stride` / `v_stride` apart; m, l: [8];
// acc: [8, dv] unnormalised. scores: scratch [n, 8]. dk and dv are multiples of 8.
template <typename scalar_t>
void tile8_block(const float* q, const scalar_t* keys, int64_t k_stride, const scalar_t* values, int64_t v_stride,
                 int64_t n, int64_t dk, int64_t dv, float* m, float* l, float* acc, float* scores, float* krow,
                 float* vbuf) {
  for (int64_t j = 0; j < n; ++j) {
    const float* k = as_acc<scalar_t, float>(keys + j * k_stride, krow, dk);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t d = 0; d < dk; d += 8) {
      const __m256 kv = _mm256_loadu_ps(k + d);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 0 * dk + d), kv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 1 * dk + d), kv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 2 * dk + d), kv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 3 * dk + d), kv, a3);
      a4 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 4 * dk + d), kv, a4);
      a5 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 5 * dk + d), kv, a5);
      a6 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 6 * dk + d), kv, a6);
      a7 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 7 * dk + d), kv, a7);
    }
    _mm256_storeu_ps(scores + 8 * j, sum8(a0, a1, a2, a3, a4, a5, a6, a7));
  }
  // Softmax across the block, 8 rows in the 8 lanes.
  const __m256 old_m = _mm256_loadu_ps(m);
  __m256 new_m = old_m;
  for (int64_t j = 0; j < n; ++j) new_m = _mm256_max_ps(new_m, _mm256_loadu_ps(scores + 8 * j));
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  // Rows that have seen only -inf so far keep weight 0 (and avoid -inf - -inf).
  const __m256 dead = _mm256_cmp_ps(new_m, ninf, _CMP_EQ_OQ);
  const __m256 safe_m = _mm256_blendv_ps(new_m, _mm256_setzero_ps(), dead);
  const __m256 alpha = _mm256_blendv_ps(
      Vectorized<float>(_mm256_sub_ps(old_m, safe_m)).exp_u20(), _mm256_set1_ps(1.0f), dead);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 p = Vectorized<float>(_mm256_sub_ps(_mm256_loadu_ps(scores + 8 * j), safe_m)).exp_u20();
    _mm256_storeu_ps(scores + 8 * j, p);
    sum = _mm256_add_ps(sum, p);
  }
  _mm256_storeu_ps(l, _mm256_fmadd_ps(_mm256_loadu_ps(l), alpha, sum));
  _mm256_storeu_ps(m, new_m);
  alignas(32) float al[8];
  _mm256_store_ps(al, alpha);
  // Values: 8 accumulators (one per row) per 8 dims, kept in registers over the block.
  const float* vrows[kSubBlock];
  const bool direct = std::is_same_v<scalar_t, float>;
  for (int64_t j = 0; j < n; ++j) {
    vrows[j] = as_acc<scalar_t, float>(values + j * v_stride, direct ? nullptr : vbuf + j * dv, dv);
  }
  for (int64_t d = 0; d < dv; d += 8) {
    __m256 c0 = _mm256_mul_ps(_mm256_loadu_ps(acc + 0 * dv + d), _mm256_set1_ps(al[0]));
    __m256 c1 = _mm256_mul_ps(_mm256_loadu_ps(acc + 1 * dv + d), _mm256_set1_ps(al[1]));
    __m256 c2 = _mm256_mul_ps(_mm256_loadu_ps(acc + 2 * dv + d), _mm256_set1_ps(al[2]));
    __m256 c3 = _mm256_mul_ps(_mm256_loadu_ps(acc + 3 * dv + d), _mm256_set1_ps(al[3]));
    __m256 c4 = _mm256_mul_ps(_mm256_loadu_ps(acc + 4 * dv + d), _mm256_set1_ps(al[4]));
    __m256 c5 = _mm256_mul_ps(_mm256_loadu_ps(acc + 5 * dv + d), _mm256_set1_ps(al[5]));
    __m256 c6 = _mm256_mul_ps(_mm256_loadu_ps(acc + 6 * dv + d), _mm256_set1_ps(al[6]));
    __m256 c7 = _mm256_mul_ps(_mm256_loadu_ps(acc + 7 * dv + d), _mm256_set1_ps(al[7]));
    for (int64_t j = 0; j < n; ++j) {
      const __m256 v = _mm256_loadu_ps(vrows[j] + d);
      const float* p = scores + 8 * j;
      c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + 0), v, c0);
      c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + 1), v, c1);
      c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + 2), v, c2);
      c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + 3), v, c3);
      c4 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + 4), v, c4);
      c5 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + 5), v, c5);
      c6 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + 6), v, c6);
      c7 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + 7), v, c7);
    }
    _mm256_storeu_ps(acc + 0 * dv + d, c0);
    _mm256_storeu_ps(acc + 1 * dv + d, c1);
    _mm256_storeu_ps(acc + 2 * dv + d, c2);
    _mm256_storeu_ps(acc + 3 * dv + d, c3);
    _mm256_storeu_ps(acc + 4 * dv + d, c4);
    _mm256_storeu_ps(acc + 5 * dv + d, c5);
    _mm256_storeu_ps(acc + 6 * dv + d, c6);
    _mm256_storeu_ps(acc + 7 * dv + d, c7);
  }
}
#endif

struct Shapes {
  int64_t tokens, heads, kv_heads, group, dk, dv, block_size, max_blocks;
  int64_t rows;      // query rows per KV head in the state: group, rounded up to 8 on the AVX2 path
  bool tiled;        // the AVX2 path (float accumulation, dims multiples of 8, any block size)
  int64_t k_block, k_token, k_head;  // strides of the key cache (elements)
  int64_t v_block, v_token, v_head;
};

// Online softmax of one KV head's `rows` query rows over tokens [lo, hi) of a token's shard.
// Leaves unnormalised sums in acc [rows, Dv], the running max in m and sum in l.
template <typename scalar_t, typename acc_t, typename index_t>
void attend_range(const Shapes& s, const acc_t* q /* [rows, Dk], pre-scaled */, const scalar_t* key_cache,
                  const scalar_t* value_cache, const index_t* table_row, int64_t kv_head, int64_t lo,
                  int64_t hi, acc_t* acc, acc_t* m, acc_t* l, std::vector<acc_t>& work) {
  const int64_t R = s.rows, bs = s.block_size;
  work.resize(R * bs + s.dk + bs * s.dv);
  acc_t* scores = work.data();    // [R, bs] (tiled: [bs, 8] per tile)
  acc_t* krow = scores + R * bs;  // one converted key row
  acc_t* vrows = krow + s.dk;     // converted value rows
  std::fill(m, m + R, -std::numeric_limits<acc_t>::infinity());
  std::fill(l, l + R, acc_t(0));
  std::fill(acc, acc + R * s.dv, acc_t(0));
  for (int64_t start = lo; start < hi;) {
    const int64_t block = start / bs, first = start % bs;
    const int64_t n = std::min(bs - first, hi - start);
    const int64_t bid = static_cast<int64_t>(table_row[block]);
    const scalar_t* kb = key_cache + bid * s.k_block + kv_head * s.k_head + first * s.k_token;
    const scalar_t* vb = value_cache + bid * s.v_block + kv_head * s.v_head + first * s.v_token;
    start += n;
#ifdef HELIX_HAVE_AVX2
    if constexpr (std::is_same_v<acc_t, float>) {
      if (s.tiled) {
        // Sub-blocks of kSubBlock tokens: a token's key and value are used while in L1
        // (a whole 128-token block per step measured 1.3-1.6x slower; prefetching the
        // next sub-block by hand measured no gain).
        for (int64_t j0 = 0; j0 < n; j0 += kSubBlock) {
          const int64_t nj = std::min(kSubBlock, n - j0);
          for (int64_t r = 0; r < R; r += 8) {
            tile8_block<scalar_t>(q + r * s.dk, kb + j0 * s.k_token, s.k_token, vb + j0 * s.v_token, s.v_token, nj,
                                  s.dk, s.dv, m + r, l + r, acc + r * s.dv, scores, krow, vrows);
          }
        }
        continue;
      }
    }
#endif
    for (int64_t j = 0; j < n; ++j) {
      const acc_t* k = as_acc<scalar_t, acc_t>(kb + j * s.k_token, krow, s.dk);
      for (int64_t g = 0; g < R; ++g) scores[g * bs + j] = dot<acc_t>(q + g * s.dk, k, s.dk);
    }
    for (int64_t g = 0; g < R; ++g) {
      acc_t* row = scores + g * bs;
      const acc_t new_m = std::max(m[g], *std::max_element(row, row + n));
      if (new_m == -std::numeric_limits<acc_t>::infinity()) {  // only -inf scores so far: weight 0
        std::fill(row, row + n, acc_t(0));
        continue;
      }
      const acc_t alpha = std::exp(m[g] - new_m);  // 0 on the first block (m = -inf)
      using Vec = Vectorized<acc_t>;
      at::vec::map([new_m](Vec x) { return vexp<acc_t>(x - Vec(new_m)); }, row, row, n);
      l[g] = l[g] * alpha + at::vec::reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, row, n);
      m[g] = new_m;
      if (alpha != acc_t(1)) {
        acc_t* a = acc + g * s.dv;
        for (int64_t d = 0; d < s.dv; ++d) a[d] *= alpha;
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const acc_t* v = as_acc<scalar_t, acc_t>(vb + j * s.v_token, vrows, s.dv);
      for (int64_t g = 0; g < R; ++g) axpy<acc_t>(acc + g * s.dv, scores[g * bs + j], v, s.dv);
    }
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
void run(const Shapes& s, const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
         const at::Tensor& block_table, const at::Tensor& visible, double scale, int64_t split_tokens,
         at::Tensor& out, at::Tensor& lse) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const scalar_t* qp = query.data_ptr<scalar_t>();
  const scalar_t* kp = key_cache.data_ptr<scalar_t>();
  const scalar_t* vp = value_cache.data_ptr<scalar_t>();
  const index_t* tp = block_table.data_ptr<index_t>();
  const int64_t* lens = visible.data_ptr<int64_t>();
  acc_t* op = out.data_ptr<acc_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  const int64_t G = s.group, R = s.rows, q_token = query.stride(0), q_head = query.stride(1);
  const int64_t table_stride = block_table.stride(0);
  // A token's shard is cut into pieces of split_tokens (whole blocks), each one work item
  // per KV head: the cut depends only on the token's own length, so a result never
  // depends on the thread count or on what else is in the batch.
  std::vector<int64_t> first_split(s.tokens + 1, 0);
  for (int64_t t = 0; t < s.tokens; ++t) {
    first_split[t + 1] = first_split[t] + std::max<int64_t>(1, (lens[t] + split_tokens - 1) / split_tokens);
  }
  const int64_t splits = first_split[s.tokens];
  // Per (split, KV head): unnormalised acc [R, Dv], max [R], sum [R].
  const int64_t state = R * s.dv + 2 * R;
  std::vector<acc_t> partial(splits * s.kv_heads * state);

  at::parallel_for(0, splits * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> work, qbuf(R * s.dk, acc_t(0));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t split = item / s.kv_heads, h = item % s.kv_heads;
      const int64_t t = std::upper_bound(first_split.begin(), first_split.end(), split) - first_split.begin() - 1;
      const int64_t lo = (split - first_split[t]) * split_tokens;
      const int64_t hi = std::min(lens[t], lo + split_tokens);
      acc_t* st = partial.data() + item * state;
      acc_t *acc = st, *m = st + R * s.dv, *l = m + R;
      for (int64_t g = 0; g < G; ++g) {  // rows G..R stay zero (padding of the last tile)
        const scalar_t* src = qp + t * q_token + (h * G + g) * q_head;
        for (int64_t d = 0; d < s.dk; ++d) {
          qbuf[g * s.dk + d] = static_cast<acc_t>(src[d]) * static_cast<acc_t>(scale);
        }
      }
      if (lo < hi) {
        attend_range<scalar_t, acc_t, index_t>(s, qbuf.data(), kp, vp, tp + t * table_stride, h, lo, hi, acc, m,
                                               l, work);
      } else {  // an empty shard: weight 0
        std::fill(st, st + state, acc_t(0));
        std::fill(m, m + R, kNegInf);
      }
    }
  });
  // Exact merge of a token's pieces, in order: rescale each to the overall max, sum, normalise.
  at::parallel_for(0, s.tokens * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t t = pair / s.kv_heads, h = pair % s.kv_heads;
      for (int64_t g = 0; g < G; ++g) {
        acc_t top = kNegInf;
        for (int64_t k = first_split[t]; k < first_split[t + 1]; ++k) {
          top = std::max(top, partial[(k * s.kv_heads + h) * state + R * s.dv + g]);
        }
        const int64_t head = h * G + g;
        acc_t* o = op + (t * s.heads + head) * s.dv;
        std::fill(o, o + s.dv, acc_t(0));
        acc_t total = 0;
        for (int64_t k = first_split[t]; k < first_split[t + 1] && top != kNegInf; ++k) {
          const acc_t* st = partial.data() + (k * s.kv_heads + h) * state;
          const acc_t lk = st[R * s.dv + R + g];
          if (lk <= 0) continue;
          const acc_t w = std::exp(st[R * s.dv + g] - top);
          total += lk * w;
          axpy<acc_t>(o, w, st + g * s.dv, s.dv);
        }
        const acc_t inv = total > 0 ? acc_t(1) / total : acc_t(0);
        for (int64_t d = 0; d < s.dv; ++d) o[d] *= inv;
        lp[t * s.heads + head] = total > 0 ? top + std::log(total) : kNegInf;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> shard_decode(const at::Tensor& query, const at::Tensor& key_cache,
                                                const at::Tensor& value_cache, const at::Tensor& block_table,
                                                const at::Tensor& visible, double scale, int64_t split_tokens) {
  TORCH_CHECK(query.dim() == 3, "query must be [tokens, heads, dim]");
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.dim() == 4,
              "caches must be [blocks, block_size, kv_heads, dim]");
  TORCH_CHECK(key_cache.stride(3) == 1 && value_cache.stride(3) == 1 && query.stride(2) == 1,
              "the last dim of query and caches must be contiguous");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() && value_cache.scalar_type() == query.scalar_type(),
              "query and caches must share a dtype");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == query.size(0), "block_table must be [tokens, blocks]");
  TORCH_CHECK(visible.dim() == 1 && visible.size(0) == query.size(0), "visible must be [tokens]");
  TORCH_CHECK(block_table.scalar_type() == at::kLong || block_table.scalar_type() == at::kInt,
              "block_table must be int32 or int64");
  Shapes s;
  s.tokens = query.size(0);
  s.heads = query.size(1);
  s.dk = query.size(2);
  s.kv_heads = key_cache.size(2);
  TORCH_CHECK(s.heads % s.kv_heads == 0, "query heads must group over the KV heads");
  TORCH_CHECK(key_cache.size(3) == s.dk, "key dim differs from the query's");
  s.group = s.heads / s.kv_heads;
  s.dv = value_cache.size(3);
  s.block_size = key_cache.size(1);
  TORCH_CHECK(value_cache.size(1) == s.block_size && value_cache.size(2) == s.kv_heads,
              "key and value caches differ in block size or KV heads");
#ifdef HELIX_HAVE_AVX2
  s.tiled = query.scalar_type() != at::kDouble && s.dk % 8 == 0 && s.dv % 8 == 0;
#else
  s.tiled = false;
#endif
  s.rows = s.tiled ? (s.group + 7) / 8 * 8 : s.group;
  s.max_blocks = block_table.size(1);
  s.k_block = key_cache.stride(0);
  s.k_token = key_cache.stride(1);
  s.k_head = key_cache.stride(2);
  s.v_block = value_cache.stride(0);
  s.v_token = value_cache.stride(1);
  s.v_head = value_cache.stride(2);
  const at::Tensor lens = visible.to(at::kLong).contiguous();
  if (s.tokens > 0) {
    TORCH_CHECK(lens.min().item<int64_t>() >= 0, "visible lengths must be >= 0");
    TORCH_CHECK((lens.max().item<int64_t>() + s.block_size - 1) / s.block_size <= s.max_blocks,
                "a visible length exceeds the block table");
  }
  TORCH_CHECK(split_tokens > 0, "split_tokens must be positive");
  split_tokens = (split_tokens + s.block_size - 1) / s.block_size * s.block_size;  // whole blocks
  const auto acc_type = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({s.tokens, s.heads, s.dv}, query.options().dtype(acc_type));
  at::Tensor lse = at::empty({s.tokens, s.heads}, query.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "helix_shard_decode", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (block_table.scalar_type() == at::kLong) {
      run<scalar_t, acc_t, int64_t>(s, query, key_cache, value_cache, block_table, lens, scale, split_tokens, out,
                                    lse);
    } else {
      run<scalar_t, acc_t, int32_t>(s, query, key_cache, value_cache, block_table, lens, scale, split_tokens, out,
                                    lse);
    }
  });
  return {out, lse};
}

// Writes each token's K and V rows at its slot of a [blocks, kv_heads, block_size, Dk + Dv] cache
// (K in the first Dk, V in the last Dv of a row); a slot < 0 is a token another KVP rank stores.
// One call per layer replaces the ten-odd torch operations (mask, divide, index, two index_puts)
// that cost more than the write itself at decode.
void append_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& cache, const at::Tensor& slots) {
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3 && cache.dim() == 4,
              "key/value must be [tokens, kv_heads, dim] and the cache [blocks, kv_heads, block_size, Dk + Dv]");
  TORCH_CHECK(key.scalar_type() == cache.scalar_type() && value.scalar_type() == cache.scalar_type(),
              "key, value and cache must share a dtype");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1 && cache.stride(3) == 1,
              "the last dim of key, value and cache must be contiguous");
  const int64_t tokens = key.size(0), kv_heads = key.size(1), dk = key.size(2), dv = value.size(2);
  TORCH_CHECK(value.size(0) == tokens && value.size(1) == kv_heads && cache.size(1) == kv_heads,
              "key, value and cache differ in tokens or KV heads");
  TORCH_CHECK(cache.size(3) == dk + dv, "cache rows must hold K then V (Dk + Dv)");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) >= tokens, "slots must be [>= tokens]");
  const at::Tensor slot = slots.slice(0, 0, tokens).to(at::kLong).contiguous();
  const int64_t* slot_ptr = slot.data_ptr<int64_t>();
  const int64_t blocks = cache.size(0), block_size = cache.size(2);
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slot_ptr[t] < blocks * block_size, "slot ", slot_ptr[t], " is past the cache's ", blocks * block_size);
  }
  const size_t item = cache.element_size();
  const auto* key_bytes = static_cast<const char*>(key.data_ptr());
  const auto* value_bytes = static_cast<const char*>(value.data_ptr());
  auto* cache_bytes = static_cast<char*>(cache.data_ptr());
  for (int64_t t = 0; t < tokens; ++t) {
    if (slot_ptr[t] < 0) continue;
    const int64_t block = slot_ptr[t] / block_size, offset = slot_ptr[t] % block_size;
    for (int64_t h = 0; h < kv_heads; ++h) {
      char* row = cache_bytes + (block * cache.stride(0) + h * cache.stride(1) + offset * cache.stride(2)) * item;
      std::memcpy(row, key_bytes + (t * key.stride(0) + h * key.stride(1)) * item, dk * item);
      std::memcpy(row + dk * item, value_bytes + (t * value.stride(0) + h * value.stride(1)) * item, dv * item);
    }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shard_decode", &shard_decode,
        "Per-shard paged decode attention with LSE (query, key_cache, value_cache, block_table, visible, scale, "
        "split_tokens) -> (out, lse)");
  m.def("append_kv", &append_kv,
        "Write K|V rows at their slots, skipping slots < 0 (key, value, cache, slots) -> None");
}
