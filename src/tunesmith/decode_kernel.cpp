// One decoding step of a llama-family model for one sequence, in C++ (see decode_kernel.py).
//
// The weight products, the int8 products, SiLU and the norms' sums are PyTorch's own operators
// (at::mv, _weight_int8pack_mm, silu, sum); the small vector work between them (the rest of
// RMSNorm, rotary embedding, the residual adds, the SiLU product) is written out here with the
// roundings of the Python decoder, and so is attention (one query: scores, softmax and values in
// fp32). A step then costs the products plus ~200 operators dispatched from C++ rather than
// ~1,500 from Python. In fp32 it matches the Python step to float rounding; in bf16 its
// attention rounds differently from PyTorch's kernel (tests/test_decoder.py measures by how much).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Layer {
  at::Tensor ln1, qkv, qkv_scale, o, o_scale, ln2, gate_up, gate_up_scale, down, down_scale;
};

at::Tensor product(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& x) {
  if (scale.defined() && scale.numel() > 0) {
    return at::_weight_int8pack_mm(x.view({1, x.size(0)}), w, scale).view({w.size(0)});
  }
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
}
