// One decoding step of a llama-family model for one sequence, in C++ (see decode_kernel.py).
//
// The weight products of a bf16 model (bf16 or int8 weights) are written out below with AVX-512
// (one row of weights against the vector, in fp32, with the weights prefetched ahead of use);
// elsewhere they are PyTorch's own operators (at::mv, _weight_int8pack_mm). SiLU and the norms'
// sums are PyTorch's; the small vector work between the products (the rest of RMSNorm, rotary
// embedding, the residual adds, the SiLU product) is written out with the roundings of the Python
// decoder, and so is attention (one query: scores, softmax and values in fp32). In fp32 the step
// matches the Python step to float rounding; in bf16 its products and attention sum in another
// order than PyTorch's kernels (tests/test_decoder.py measures by how much).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TUNESMITH_AVX512 1
#endif

namespace {

struct Layer {
  at::Tensor ln1, qkv, qkv_scale, o, o_scale, ln2, gate_up, gate_up_scale, down, down_scale;
};

#ifdef TUNESMITH_AVX512
// Matrix-vector products at batch 1 read every weight once, so they run at the speed memory
// delivers the weights. PyTorch's at::mv and _weight_int8pack_mm reach about 15 and 10 GB/s here
// (bench/NOTES.md, decoding round 5); these loops, which ask for the weights 8 KiB ahead of use,
// reach about 20. Each output is one row's dot product summed in one fixed order by one thread,
// so the result does not depend on the number of threads.
constexpr int64_t PREFETCH_BYTES = 8192;
constexpr int64_t ROWS = 4;  // rows of the weight per pass over the vector

// out[n] = sum_k w[n, k] x[k] for rows n0..n1-1 of a bf16 weight (N, K), in fp32 (the pairwise
// bf16 products of vdpbf16ps), rounded to bf16 at the end.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void mv_bf16_rows(const at::BFloat16* w, const at::BFloat16* x, at::BFloat16* out, int64_t k, int64_t n0,
                  int64_t n1) {
  const int64_t full = k / 32;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (k % 32)) - 1);
  for (int64_t n = n0; n < n1; n += ROWS) {
    const int64_t m = std::min(ROWS, n1 - n);
    __m512 acc[ROWS] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < full; ++c) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + c * 32);
      for (int64_t r = 0; r < m; ++r) {
        const at::BFloat16* p = w + (n + r) * k + c * 32;
        _mm_prefetch(reinterpret_cast<const char*>(p) + PREFETCH_BYTES, _MM_HINT_T0);
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(p), xv);
      }
    }
    if (tail) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + full * 32);
      for (int64_t r = 0; r < m; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(tail, w + (n + r) * k + full * 32), xv);
    }
    for (int64_t r = 0; r < m; ++r) out[n + r] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(acc[r]));
  }
}

// The same for int8 weights with one scale per row (the layout of _weight_int8pack_mm): each
// weight widened to fp32 times the fp32 vector, the row's sum times its scale, rounded to bf16.
__attribute__((target("avx512f,avx512bw,avx512vl")))
void mv_int8_rows(const int8_t* w, const float* x, const at::BFloat16* scale, at::BFloat16* out, int64_t k, int64_t n0,
                  int64_t n1) {
  const int64_t full = k / 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (k % 16)) - 1);
  for (int64_t n = n0; n < n1; n += ROWS) {
    const int64_t m = std::min(ROWS, n1 - n);
    __m512 acc[ROWS] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < full; ++c) {
      const __m512 xv = _mm512_loadu_ps(x + c * 16);
      for (int64_t r = 0; r < m; ++r) {
        const int8_t* p = w + (n + r) * k + c * 16;
        if ((c & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + PREFETCH_BYTES, _MM_HINT_T0);
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
        acc[r] = _mm512_fmadd_ps(wv, xv, acc[r]);
      }
    }
    if (tail) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + full * 16);
      for (int64_t r = 0; r < m; ++r) {
        const __m128i b = _mm_maskz_loadu_epi8(tail, w + (n + r) * k + full * 16);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), xv, acc[r]);
      }
    }
    for (int64_t r = 0; r < m; ++r)
      out[n + r] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(acc[r]) * static_cast<float>(scale[n + r]));
  }
}

bool has_avx512() {
  static const bool yes =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return yes;
}

bool has_avx512_bf16() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

// Rows split between PyTorch's threads in blocks of whole passes.
template <typename F>
void over_rows(int64_t n, F rows) {
  at::parallel_for(0, (n + ROWS - 1) / ROWS, 16, [&](int64_t b, int64_t e) { rows(b * ROWS, std::min(n, e * ROWS)); });
}
#endif

// w @ x for a weight (N, K) and a vector (K,): bf16 weights, int8 weights with per-row ``scale``
// (when it is not empty), or any other dtype through PyTorch.
at::Tensor product(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& x) {
  const bool int8 = scale.defined() && scale.numel() > 0;
#ifdef TUNESMITH_AVX512
  if (x.scalar_type() == at::kBFloat16 && w.is_contiguous() && x.is_contiguous() && w.size(1) == x.size(0)) {
    const int64_t n = w.size(0), k = w.size(1);
    if (!int8 && w.scalar_type() == at::kBFloat16 && has_avx512_bf16()) {
      at::Tensor out = at::empty({n}, x.options());
      const auto* wp = w.data_ptr<at::BFloat16>();
      const auto* xp = x.data_ptr<at::BFloat16>();
      auto* op = out.data_ptr<at::BFloat16>();
      over_rows(n, [&](int64_t n0, int64_t n1) { mv_bf16_rows(wp, xp, op, k, n0, n1); });
      return out;
    }
    if (int8 && w.scalar_type() == at::kChar && scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() &&
        has_avx512()) {
      at::Tensor out = at::empty({n}, x.options());
      const at::Tensor xf = x.to(at::kFloat);
      const auto* wp = w.data_ptr<int8_t>();
      const auto* xp = xf.data_ptr<float>();
      const auto* sp = scale.data_ptr<at::BFloat16>();
      auto* op = out.data_ptr<at::BFloat16>();
      over_rows(n, [&](int64_t n0, int64_t n1) { mv_int8_rows(wp, xp, sp, op, k, n0, n1); });
      return out;
    }
  }
#endif
  if (int8) return at::_weight_int8pack_mm(x.view({1, x.size(0)}), w, scale).view({w.size(0)});
  return at::mv(w, x);
}

template <typename T>
inline float f(T v) {
  return static_cast<float>(v);
}

// RMSNorm as the model computes it: in fp32, rounded to the model's dtype, then times the weight.
// The sum of the squares is PyTorch's own (at::sum), so that it sums in the same order and the
// step gives the Python step's bits; ``squares`` is an fp32 buffer of n.
template <typename T>
void rms_norm(const T* x, const T* w, T* out, at::Tensor& squares, float eps) {
  const int64_t n = squares.size(0);
  float* sq = squares.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) sq[i] = f(x[i]) * f(x[i]);
  // at::mean is at::sum divided by n (as its profile shows), without its extra dispatches
  const float mean = at::sum(squares).data_ptr<float>()[0] / static_cast<float>(n);
  const float r = 1.0f / std::sqrt(mean + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(f(w[i]) * f(static_cast<T>(f(x[i]) * r)));
}

// x * cos + rotate_half(x) * sin, each product and the sum rounded to T as PyTorch rounds them.
template <typename T>
void rotate(T* x, const T* cos, const T* sin, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  std::vector<T> v(dim);
  for (int64_t h = 0; h < heads; ++h) {
    T* head = x + h * dim;
    std::copy(head, head + dim, v.begin());
    for (int64_t i = 0; i < dim; ++i) {
      const float rot = i < half ? -f(v[i + half]) : f(v[i - half]);
      const T a = static_cast<T>(f(v[i]) * f(cos[i]));
      const T b = static_cast<T>(rot * f(sin[i]));
      head[i] = static_cast<T>(f(a) + f(b));
    }
  }
}

template <typename T>
void add(T* x, const T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(f(x[i]) + f(y[i]));
}

// silu(gate) * up: the SiLU is PyTorch's own (its vectorized exp rounds unlike std::exp).
template <typename T>
void silu_mul(const at::Tensor& gate, const T* up, T* out) {
  at::Tensor s = at::silu(gate);
  const T* sp = s.data_ptr<T>();
  const int64_t n = s.size(0);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(f(sp[i]) * f(up[i]));
}

// Attention of one query per head over positions 0..n-1 of a layer's cache, in fp32 (scores,
// softmax and the weighted sum of values), written out: PyTorch's CPU attention kernel costs
// about 100 us a call for one query, this about a tenth. Head h reads kv head h / (heads /
// kv_heads). ``k``/``v`` point at kv head 0, position 0; ``head_stride``/``pos_stride`` in
// elements; ``scores`` is an fp32 buffer of at least n.
template <typename T>
void attend(const T* q, const T* k, const T* v, int64_t head_stride, int64_t pos_stride, T* out, int64_t heads,
            int64_t kv_heads, int64_t n, int64_t dim, float scale, float* scores) {
  const int64_t group = heads / kv_heads;
  std::vector<float> qf(dim), acc(dim);
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t g = h / group;
    for (int64_t i = 0; i < dim; ++i) qf[i] = f(q[h * dim + i]);
    float top = -INFINITY;
    for (int64_t t = 0; t < n; ++t) {
      const T* kt = k + g * head_stride + t * pos_stride;
      float d = 0.f;
#pragma omp simd reduction(+ : d)
      for (int64_t i = 0; i < dim; ++i) d += qf[i] * f(kt[i]);
      scores[t] = d * scale;
      top = std::max(top, scores[t]);
    }
    float total = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      scores[t] = std::exp(scores[t] - top);
      total += scores[t];
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t t = 0; t < n; ++t) {
      const T* vt = v + g * head_stride + t * pos_stride;
      const float w = scores[t];
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) acc[i] += w * f(vt[i]);
    }
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < dim; ++i) out[h * dim + i] = static_cast<T>(acc[i] * inv);
  }
}

class Step {
 public:
  Step(at::Tensor embed, std::vector<std::vector<at::Tensor>> layers, at::Tensor norm, at::Tensor head,
       at::Tensor head_scale, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t kv_heads, int64_t head_dim,
       int64_t intermediate, double eps, double scaling)
      : embed_(embed), norm_(norm), head_(head), head_scale_(head_scale), cos_(cos), sin_(sin), heads_(heads),
        kv_heads_(kv_heads), head_dim_(head_dim), intermediate_(intermediate), eps_(eps), scaling_(scaling) {
    for (auto& l : layers) {
      TORCH_CHECK(l.size() == 10, "a layer takes 10 tensors");
      layers_.push_back({l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], l[8], l[9]});
    }
  }

  // Feed ``token`` at position ``pos``; ``k``/``v`` are this sequence's cache, (layers, kv_heads,
  // length, head_dim), written at ``pos``. Returns the float logits (vocab,).
  at::Tensor operator()(int64_t token, int64_t pos, at::Tensor k, at::Tensor v) {
    c10::InferenceMode guard;
    TORCH_CHECK(pos >= 0 && pos < k.size(2), "position ", pos, " is outside the cache");
    TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.strides() == v.strides(), "unexpected cache layout");
    TORCH_CHECK(k.scalar_type() == embed_.scalar_type() && v.scalar_type() == embed_.scalar_type(),
                "the cache's dtype is not the model's");
    at::Tensor out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, embed_.scalar_type(), "decode_step", [&] {
      out = run<scalar_t>(token, pos, k, v);
    });
    return out;
  }

 private:
  template <typename T>
  at::Tensor run(int64_t token, int64_t pos, const at::Tensor& k, const at::Tensor& v) {
    const int64_t hidden = embed_.size(1);
    const int64_t q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
    const float eps = static_cast<float>(eps_);
    at::Tensor x = embed_[token].clone();
    at::Tensor h = at::empty_like(x);
    at::Tensor act = at::empty({intermediate_}, x.options());
    at::Tensor squares = at::empty({hidden}, x.options().dtype(at::kFloat));
    at::Tensor attn = at::empty({q_size}, x.options());
    at::Tensor scores = at::empty({pos + 1}, x.options().dtype(at::kFloat));
    T* xp = x.data_ptr<T>();
    T* hp = h.data_ptr<T>();
    const T* cos = cos_[pos].data_ptr<T>();
    const T* sin = sin_[pos].data_ptr<T>();
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      rms_norm(xp, l.ln1.data_ptr<T>(), hp, squares, eps);
      at::Tensor qkv = product(l.qkv, l.qkv_scale, h);
      T* q = qkv.data_ptr<T>();
      rotate(q, cos, sin, heads_, head_dim_);
      rotate(q + q_size, cos, sin, kv_heads_, head_dim_);
      // this layer's cache, (kv_heads, length, head_dim): the new key and value go in at ``pos``
      T* keys = k.data_ptr<T>() + i * k.stride(0);
      T* values = v.data_ptr<T>() + i * v.stride(0);
      for (int64_t g = 0; g < kv_heads_; ++g) {
        std::copy(q + q_size + g * head_dim_, q + q_size + (g + 1) * head_dim_,
                  keys + g * k.stride(1) + pos * k.stride(2));
        std::copy(q + q_size + kv_size + g * head_dim_, q + q_size + kv_size + (g + 1) * head_dim_,
                  values + g * v.stride(1) + pos * v.stride(2));
      }
      attend(q, keys, values, k.stride(1), k.stride(2), attn.data_ptr<T>(), heads_, kv_heads_, pos + 1, head_dim_,
             static_cast<float>(scaling_), scores.data_ptr<float>());
      at::Tensor o = product(l.o, l.o_scale, attn);
      add(xp, o.data_ptr<T>(), hidden);
      rms_norm(xp, l.ln2.data_ptr<T>(), hp, squares, eps);
      at::Tensor gu = product(l.gate_up, l.gate_up_scale, h);
      silu_mul(gu.narrow(0, 0, intermediate_), gu.data_ptr<T>() + intermediate_, act.data_ptr<T>());
      at::Tensor d = product(l.down, l.down_scale, act);
      add(xp, d.data_ptr<T>(), hidden);
    }
    rms_norm(xp, norm_.data_ptr<T>(), hp, squares, eps);
    return product(head_, head_scale_, h).to(at::kFloat);
  }

  at::Tensor embed_, norm_, head_, head_scale_, cos_, sin_;
  std::vector<Layer> layers_;
  int64_t heads_, kv_heads_, head_dim_, intermediate_;
  double eps_, scaling_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Step>(m, "Step")
      .def(pybind11::init<at::Tensor, std::vector<std::vector<at::Tensor>>, at::Tensor, at::Tensor, at::Tensor,
                          at::Tensor, at::Tensor, int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("__call__", &Step::operator(), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("product", &product, "w @ x as the step computes it (for tests)", pybind11::arg("w"), pybind11::arg("scale"),
        pybind11::arg("x"));
}
