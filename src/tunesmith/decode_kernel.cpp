// One decoding step of a llama-family model for one sequence, in C++ (see decode_kernel.py).
//
// The weight products, attention, the int8 products, SiLU and the norms' means are PyTorch's own
// operators (at::mv, scaled_dot_product_attention, _weight_int8pack_mm, silu, mean); only the
// small vector work between them (the rest of RMSNorm, rotary embedding, the residual adds, the
// SiLU product) is written out here, in the order and with the roundings of the Python decoder,
// so that a step gives the Python step's bits and costs the products plus ~250 operators
// dispatched from C++ rather than ~1,500 from Python.
#include <torch/extension.h>

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
// The mean of the squares is PyTorch's own (at::mean), so that it sums in the same order and the
// step gives the Python step's bits; ``squares`` is an fp32 buffer of n.
template <typename T>
void rms_norm(const T* x, const T* w, T* out, at::Tensor& squares, float eps) {
  const int64_t n = squares.size(0);
  float* sq = squares.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) sq[i] = f(x[i]) * f(x[i]);
  const float r = 1.0f / std::sqrt(at::mean(squares).data_ptr<float>()[0] + eps);
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
      at::Tensor keys = k[i], values = v[i];  // (kv_heads, length, head_dim)
      keys.select(1, pos).copy_(qkv.narrow(0, q_size, kv_size).view({kv_heads_, head_dim_}));
      values.select(1, pos).copy_(qkv.narrow(0, q_size + kv_size, kv_size).view({kv_heads_, head_dim_}));
      at::Tensor attn = at::scaled_dot_product_attention(
          qkv.narrow(0, 0, q_size).view({1, heads_, 1, head_dim_}), keys.narrow(1, 0, pos + 1).unsqueeze(0),
          values.narrow(1, 0, pos + 1).unsqueeze(0), {}, 0.0, false, scaling_, true);
      at::Tensor o = product(l.o, l.o_scale, attn.reshape({q_size}));
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
