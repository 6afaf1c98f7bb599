// The decoding step of a llama-family model in C++, for one or several rows, each at its own
// position and cache row (see decode_kernel.py): the server's batch, and bf16 prompts, a token a
// row; and the sampler's passes over the vocabulary.
//
// The weight products of a bf16 model (bf16 or int8 weights) are written out below: AVX-512
// loops that fetch the weights ahead of use, and AMX tiles for bf16 batches; elsewhere (fp32,
// other CPUs) they are PyTorch's own operators (at::mv, _weight_int8pack_mm). The vector work
// between the products (RMSNorm, rotary embedding, the residual adds, SiLU and its product) is
// written out with the roundings of the Python decoder, and so is attention (one query per row:
// scores, softmax and values in fp32). In fp32 the step matches the Python step to float
// rounding; in bf16 its products and attention sum in other orders than PyTorch's kernels
// (tests/test_decoder.py measures by how much). A row's results never depend on the other rows.
#include <torch/extension.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>

#include <dlfcn.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
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
constexpr int64_t ROWS = 4;     // rows of the weight per pass
constexpr int64_t VECTORS = 4;  // vectors per pass (each weight chunk is loaded once for them)

// Dot products of rows n..n+M-1 of a bf16 weight (N, K) with vectors b..b+V-1 of x (batch, K),
// into out (batch, N): fp32 sums of the pairwise bf16 products (vdpbf16ps) over the chunks of
// 32 in order, then the masked tail, then the lanes; rounded to bf16. Every (row, vector) sum
// has that one order whatever M, V and the batch, so a vector gets the same bits alone as beside
// others.
template <int M, int V>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void dot_bf16(
    const at::BFloat16* w, const at::BFloat16* x, at::BFloat16* out, int64_t k, int64_t n_total, int64_t n, int64_t b,
    bool prefetch) {
  const int64_t full = k / 32;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (k % 32)) - 1);
  __m512 acc[M][V];
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < V; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c <= full; ++c) {
    if (c == full && !tail) break;
    const __mmask32 mask = c < full ? ~__mmask32{0} : tail;
    __m512bh xv[V];
    for (int j = 0; j < V; ++j) xv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (b + j) * k + c * 32);
    for (int r = 0; r < M; ++r) {
      const at::BFloat16* p = w + (n + r) * k + c * 32;
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(p) + PREFETCH_BYTES, _MM_HINT_T0);
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
      for (int j = 0; j < V; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);
    }
  }
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < V; ++j) out[(b + j) * n_total + n + r] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(acc[r][j]));
}

// The same for int8 weights with one scale per row (the layout of _weight_int8pack_mm) and fp32
// vectors: each weight widened to fp32, fused multiply-adds over the chunks of 16 in order, the
// row's sum times its scale, rounded to bf16.
template <int M, int V>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void dot_int8(const int8_t* w, const float* x,
                                                                           const at::BFloat16* scale,
                                                                           at::BFloat16* out, int64_t k,
                                                                           int64_t n_total, int64_t n, int64_t b,
                                                                           bool prefetch) {
  const int64_t full = k / 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (k % 16)) - 1);
  __m512 acc[M][V];
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < V; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c <= full; ++c) {
    if (c == full && !tail) break;
    const __mmask16 mask = c < full ? __mmask16(0xFFFF) : tail;
    __m512 xv[V];
    for (int j = 0; j < V; ++j) xv[j] = _mm512_maskz_loadu_ps(mask, x + (b + j) * k + c * 16);
    for (int r = 0; r < M; ++r) {
      const int8_t* p = w + (n + r) * k + c * 16;
      if (prefetch && (c & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + PREFETCH_BYTES, _MM_HINT_T0);
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
      for (int j = 0; j < V; ++j) acc[r][j] = _mm512_fmadd_ps(wv, xv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < M; ++r) {
    const float s = static_cast<float>(scale[n + r]);
    for (int j = 0; j < V; ++j)
      out[(b + j) * n_total + n + r] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(acc[r][j]) * s);
  }
}

// Rows n0..n1-1 of the weight against every vector: passes of 4 rows by up to 4 vectors; the
// weights are prefetched on the first pass over them.
template <int M, typename Dot>
inline void pass(Dot dot, int64_t batch, int64_t n) {
  int64_t b = 0;
  for (; b + VECTORS <= batch; b += VECTORS) dot(std::integral_constant<int, M>{}, std::integral_constant<int, 4>{}, n, b);
  switch (batch - b) {
    case 3: dot(std::integral_constant<int, M>{}, std::integral_constant<int, 3>{}, n, b); break;
    case 2: dot(std::integral_constant<int, M>{}, std::integral_constant<int, 2>{}, n, b); break;
    case 1: dot(std::integral_constant<int, M>{}, std::integral_constant<int, 1>{}, n, b); break;
    default: break;
  }
}

template <typename Dot>
void rows(Dot dot, int64_t batch, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) pass<4>(dot, batch, n);
  switch (n1 - n) {
    case 3: pass<3>(dot, batch, n); break;
    case 2: pass<2>(dot, batch, n); break;
    case 1: pass<1>(dot, batch, n); break;
    default: break;
  }
}

void mv_bf16_rows(const at::BFloat16* w, const at::BFloat16* x, at::BFloat16* out, int64_t k, int64_t n_total,
                  int64_t batch, int64_t n0, int64_t n1) {
  rows([&](auto m, auto v, int64_t n, int64_t b) { dot_bf16<m(), v()>(w, x, out, k, n_total, n, b, b == 0); },
       batch, n0, n1);
}

void mv_int8_rows(const int8_t* w, const float* x, const at::BFloat16* scale, at::BFloat16* out, int64_t k,
                  int64_t n_total, int64_t batch, int64_t n0, int64_t n1) {
  rows([&](auto m, auto v, int64_t n, int64_t b) { dot_int8<m(), v()>(w, x, scale, out, k, n_total, n, b, b == 0); },
       batch, n0, n1);
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

// The products' threads. A step makes ~120 parallel calls of 20-500 us each. On the process's
// main thread these run on PyTorch's OpenMP pool, whose threads spin between calls. From any
// other thread (the server's loop) that pool is a second OpenMP team beside the main thread's,
// and with more OpenMP threads than CPUs its threads sleep between calls and are woken for each:
// 25 ms a step against 15 (bench/NOTES.md, decoding round 5). There the products run on the
// helpers below, which spin between the calls of a step and sleep when the step ends (rest()),
// so that nothing spins while PyTorch's own threads sample. One caller at a time.
class Pool {
 public:
  // Runs part(i, parts) for i in 0..parts-1 (part 0 on the calling thread); returns when all are done.
  void run(int parts, const std::function<void(int, int)>& part) {
    if (parts <= 1) return part(0, 1);
    std::lock_guard<std::mutex> caller(run_);
    if (owner_ != getpid()) {  // a forked child has none of its parent's threads: start afresh
      new std::vector<std::thread>(std::move(threads_));  // left alone: destroying them would terminate
      threads_.clear();
      owner_ = getpid();
    }
    while (static_cast<int>(threads_.size()) < parts - 1) {
      const int index = static_cast<int>(threads_.size()) + 1;
      const uint64_t now = generation_.load(std::memory_order_acquire);  // it waits for the next job
      threads_.emplace_back([this, index, now] { work(index, now); });
    }
    job_ = &part;
    parts_ = parts;
    resting_.store(false, std::memory_order_relaxed);
    pending_.store(static_cast<int>(threads_.size()), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(sleep_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    part(0, parts);
    for (int polls = 1; pending_.load(std::memory_order_acquire) != 0; ++polls) pause(polls);
  }

  // The step is over: the helpers go to sleep now rather than spin on.
  void rest() { resting_.store(true, std::memory_order_release); }

 private:
  static constexpr double SPIN_SECONDS = 0.002;

  // A spinning thread gives its CPU up now and then, to whatever else is ready to run there (the
  // server's event loop, a preempted helper): with more threads than CPUs, pure spinning would
  // keep them waiting a whole time slice.
  static void pause(int polls) {
    if (polls % 64 == 0) {
      std::this_thread::yield();
    } else {
      _mm_pause();
    }
  }

  void work(int index, uint64_t seen) {
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(SPIN_SECONDS);
      int polls = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        pause(++polls);
        if (resting_.load(std::memory_order_acquire) ||
            (polls % 256 == 0 && std::chrono::steady_clock::now() > until)) {
          std::unique_lock<std::mutex> lock(sleep_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index < parts_) (*job_)(index, parts_);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::mutex run_, sleep_;
  std::condition_variable wake_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> resting_{false};
  const std::function<void(int, int)>* job_ = nullptr;
  int parts_ = 0;
  pid_t owner_ = getpid();
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads live as long as the process
  return *p;
}

bool on_main_thread() { return static_cast<pid_t>(syscall(SYS_gettid)) == getpid(); }

// Rows 0..n-1 split between at::get_num_threads() threads in blocks of ``unit`` rows.
template <typename F>
void over_rows(int64_t n, F rows, int64_t unit = ROWS, int64_t grain = 16) {
  const int64_t groups = (n + unit - 1) / unit;
  if (on_main_thread()) {
    at::parallel_for(0, groups, grain, [&](int64_t b, int64_t e) { rows(b * unit, std::min(n, e * unit)); });
    return;
  }
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), groups / grain)));
  // Each thread takes the next block of rows until none is left, so that a thread the OS
  // preempts (the server's clients and event loop share the CPUs) does not hold up the others.
  const int64_t block = std::max<int64_t>(grain, groups / (8 * parts));
  std::atomic<int64_t> next{0};
  pool().run(parts, [&](int, int) {
    for (int64_t g0; (g0 = next.fetch_add(block, std::memory_order_relaxed)) < groups;) {
      rows(g0 * unit, std::min(n, std::min(groups, g0 + block) * unit));
    }
  });
}

// bf16 products on AMX tiles (Sapphire Rapids and later), where the CPU and the OS allow it. A
// tile product multiplies 16 rows of weights by 16 vectors at once, so a batch of up to 16
// vectors costs about what one does (the weights' reads bound both): the bundled model's
// products, 14 ms a step for 1 vector, 15 for 4 and 18 for 16, against 14, 18 and 39 with the
// AVX-512 loop above (bench/NOTES.md, decoding round 5). Each (row, vector) is summed over the
// chunks of 32 in order, in its own element of a tile, whatever the other vectors; rows past
// the last whole 16 take the AVX-512 loop, and a weight whose K is not a multiple of 32 takes it
// whole.
std::atomic<bool> tiles_allowed{true};  // set_tiles(false): the AVX-512 loop only (tests, benchmarks)

bool has_amx() {
  if (!tiles_allowed.load(std::memory_order_relaxed)) return false;
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
    return tile && bf16 && has_avx512_bf16() && at::cpu::init_amx();  // init_amx asks the OS for the tile state
  }();
  return yes;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// x (batch, k) in the layout of a tile's second operand: per block of 16 vectors and chunk of 32,
// 16 rows (pairs of k) of 16 vectors x 2 values; vectors past the batch are zeros.
// (Each chunk of a vector is 16 pairs, which go 16 pairs apart: one scatter of 32-bit pairs.)
__attribute__((target("avx512f,avx512bw,avx512vl"))) void vectors_to_tiles(const at::BFloat16* x, int64_t batch,
                                                                           int64_t k, at::BFloat16* tiles) {
  const int64_t chunks = k / 32, blocks = (batch + 15) / 16;
  if (batch % 16) {  // the last block's vectors past the batch are zeros
    at::BFloat16* last = tiles + (blocks - 1) * chunks * 512;
    std::fill(last, last + chunks * 512, at::BFloat16(0.0f));
  }
  const __m512i apart = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
  for (int64_t b = 0; b < batch; ++b) {
    at::BFloat16* block = tiles + (b / 16) * chunks * 512 + (b % 16) * 2;
    const at::BFloat16* xb = x + b * k;
    for (int64_t c = 0; c < chunks; ++c)
      _mm512_i32scatter_epi32(block + c * 512, apart, _mm512_loadu_si512(xb + c * 32), 4);
  }
}

// A tile of sums (16 weight rows x 16 vectors, fp32) into out (batch, N): vector first + j gets
// column j (its outputs n..n+15), rounded to bf16 nearest-even (as c10::BFloat16 rounds) in one store.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void tile_columns(
    const float* sums, at::BFloat16* out, int64_t n_total, int64_t n, int64_t first, int64_t vectors) {
  const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
  for (int64_t j = 0; j < vectors; ++j) {
    const __m512 col = _mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32(static_cast<int>(j))), sums, 4);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (first + j) * n_total + n), (__m256i)_mm512_cvtneps_pbh(col));
  }
}

// Rows n0..n1-1 (whole blocks of 16) of a bf16 weight (N, K) against every vector, two blocks at
// a time where it can (two independent tile sums). Tiles: 0 and 3 sums, 1 and 4 weights, 2 vectors.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16"))) void amx_rows(
    const at::BFloat16* w, const at::BFloat16* tiles, at::BFloat16* out, int64_t k, int64_t n_total, int64_t batch,
    int64_t n0, int64_t n1) {
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  const int64_t chunks = k / 32, blocks = (batch + 15) / 16, stride = k * 2;
  alignas(64) float sums[16 * 16];
  auto store = [&](int64_t n, int64_t vb) { tile_columns(sums, out, n_total, n, vb * 16, std::min<int64_t>(16, batch - vb * 16)); };
  int64_t n = n0;
  for (; n + 32 <= n1; n += 32) {
    for (int64_t vb = 0; vb < blocks; ++vb) {
      const at::BFloat16* xt = tiles + vb * chunks * 512;
      _tile_zero(0);
      _tile_zero(3);
      for (int64_t c = 0; c < chunks; ++c) {
        const at::BFloat16* a = w + n * k + c * 32;
        _tile_loadd(2, xt + c * 512, 64);
        _tile_loadd(1, a, stride);
        _tile_loadd(4, a + 16 * k, stride);
        _tile_dpbf16ps(0, 1, 2);
        _tile_dpbf16ps(3, 4, 2);
      }
      _tile_stored(0, sums, 64);
      store(n, vb);
      _tile_stored(3, sums, 64);
      store(n + 16, vb);
    }
  }
  for (; n + 16 <= n1; n += 16) {
    for (int64_t vb = 0; vb < blocks; ++vb) {
      const at::BFloat16* xt = tiles + vb * chunks * 512;
      _tile_zero(0);
      for (int64_t c = 0; c < chunks; ++c) {
        _tile_loadd(2, xt + c * 512, 64);
        _tile_loadd(1, w + n * k + c * 32, stride);
        _tile_dpbf16ps(0, 1, 2);
      }
      _tile_stored(0, sums, 64);
      store(n, vb);
    }
  }
  _tile_release();
}
#endif

// x @ w^T for a weight (N, K) and vectors x (batch, K): bf16 weights, int8 weights with per-row
// ``scale`` (when it is not empty), or any other dtype through PyTorch, one vector at a time. A
// vector's result does not depend on the others in the batch, bit for bit.
at::Tensor product(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& x, bool tiles) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "x must be (batch, ", w.size(1), ")");
  const bool int8 = scale.defined() && scale.numel() > 0;
  const int64_t batch = x.size(0), n = w.size(0), k = w.size(1);
#ifdef TUNESMITH_AVX512
  if (x.scalar_type() == at::kBFloat16 && w.is_contiguous() && x.is_contiguous()) {
    if (!int8 && w.scalar_type() == at::kBFloat16 && has_avx512_bf16()) {
      at::Tensor out = at::empty({batch, n}, x.options());
      const auto* wp = w.data_ptr<at::BFloat16>();
      const auto* xp = x.data_ptr<at::BFloat16>();
      auto* op = out.data_ptr<at::BFloat16>();
      const int64_t tiled = tiles && k % 32 == 0 && has_amx() ? n / 16 * 16 : 0;  // rows on AMX tiles
      if (tiled > 0) {
        at::Tensor tiles = at::empty({(batch + 15) / 16 * (k / 32) * 512}, x.options());
        vectors_to_tiles(xp, batch, k, tiles.data_ptr<at::BFloat16>());
        const auto* tp = tiles.data_ptr<at::BFloat16>();
        over_rows(tiled, [&](int64_t n0, int64_t n1) { amx_rows(wp, tp, op, k, n, batch, n0, n1); }, 32, 2);
      }
      if (tiled < n) {
        over_rows(n - tiled, [&](int64_t n0, int64_t n1) { mv_bf16_rows(wp, xp, op, k, n, batch, tiled + n0, tiled + n1); });
      }
      return out;
    }
    if (int8 && w.scalar_type() == at::kChar && scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() &&
        has_avx512()) {
      at::Tensor out = at::empty({batch, n}, x.options());
      const at::Tensor xf = x.to(at::kFloat);
      const auto* wp = w.data_ptr<int8_t>();
      const auto* xp = xf.data_ptr<float>();
      const auto* sp = scale.data_ptr<at::BFloat16>();
      auto* op = out.data_ptr<at::BFloat16>();
      over_rows(n, [&](int64_t n0, int64_t n1) { mv_int8_rows(wp, xp, sp, op, k, n, batch, n0, n1); });
      return out;
    }
  }
#endif
  std::vector<at::Tensor> rows;
  for (int64_t b = 0; b < batch; ++b) {
    rows.push_back(int8 ? at::_weight_int8pack_mm(x.narrow(0, b, 1), w, scale).view({n}) : at::mv(w, x[b]));
  }
  return batch == 1 ? rows[0].view({1, n}) : at::stack(rows);
}

template <typename T>
inline float f(T v) {
  return static_cast<float>(v);
}

// RMSNorm as the model computes it: in fp32, rounded to the model's dtype, then times the weight.
// The squares are summed here (in another order than at::sum: float rounding apart, the same),
// so a row costs no dispatched operator.
template <typename T>
void rms_norm(const T* x, const T* w, T* out, int64_t n, float eps) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += f(x[i]) * f(x[i]);
  const float r = 1.0f / std::sqrt(total / static_cast<float>(n) + eps);
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

// silu(gate) * up, each rounded to T as PyTorch rounds them (the exp is std::exp, which rounds
// unlike PyTorch's vectorized one in the last bit).
template <typename T>
void silu_mul(const T* gate, const T* up, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = f(gate[i]);
    out[i] = static_cast<T>(f(static_cast<T>(g / (1.0f + std::exp(-g)))) * f(up[i]));
  }
}

// Attention of one query of head h over positions 0..n-1 of a layer's cache, in fp32 (scores,
// softmax and the weighted sum of values), written out: PyTorch's CPU attention kernel costs
// about 100 us a call for one query, this about a tenth. Head h reads kv head h / (heads /
// kv_heads). ``q`` and ``out`` point at head 0 of the row; ``k``/``v`` at kv head 0, position 0;
// ``head_stride``/``pos_stride`` in elements; ``scores`` is an fp32 buffer of at least n.
template <typename T>
void attend(const T* q, const T* k, const T* v, int64_t head_stride, int64_t pos_stride, T* out, int64_t h,
            int64_t heads, int64_t kv_heads, int64_t n, int64_t dim, float scale, float* scores) {
  const int64_t g = h / (heads / kv_heads);
  std::vector<float> qf(dim), acc(dim, 0.f);
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
  for (int64_t t = 0; t < n; ++t) {
    const T* vt = v + g * head_stride + t * pos_stride;
    const float w = scores[t];
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) acc[i] += w * f(vt[i]);
  }
  const float inv = 1.0f / total;
  for (int64_t i = 0; i < dim; ++i) out[h * dim + i] = static_cast<T>(acc[i] * inv);
}

#ifdef TUNESMITH_AVX512
// The same vector work for bf16 rows in AVX-512, 16 values a register. Each value gets the
// roundings of the loops above (to bf16 wherever they round, nearest-even like c10::BFloat16);
// what differs is the order of sums (the norm's squares, attention's dot products) and exp, a
// polynomial good to about 2 ulp in fp32 (std::exp: under 1). Scalar, the bf16 step spent about
// 0.7 ms a row outside its products and 50 ns a head and position in attention; these take a
// fraction of that (bench/NOTES.md, decoding round 6).
#define TUNESMITH_VEC __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

TUNESMITH_VEC inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

TUNESMITH_VEC inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// fp32 to bf16, nearest-even (vcvtneps2bf16; c10::BFloat16 rounds the same way)
TUNESMITH_VEC inline __m512 round16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

TUNESMITH_VEC inline void store16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

TUNESMITH_VEC inline void store16(at::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

// e^x: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r (Cephes' expf), times 2^n
TUNESMITH_VEC inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.972084045410f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

TUNESMITH_VEC void rms_norm_vec(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* out, int64_t n, float eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = load16(x + i, lanes(n - i));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(n) + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    store16(out + i, _mm512_mul_ps(load16(w + i, m), round16(_mm512_mul_ps(load16(x + i, m), r))), m);
  }
}

TUNESMITH_VEC void add_vec(at::BFloat16* x, const at::BFloat16* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    store16(x + i, _mm512_add_ps(load16(x + i, m), load16(y + i, m)), m);
  }
}

TUNESMITH_VEC void silu_mul_vec(const at::BFloat16* gate, const at::BFloat16* up, at::BFloat16* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __m512 g = load16(gate + i, m);
    const __m512 s = round16(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
    store16(out + i, _mm512_mul_ps(s, load16(up + i, m)), m);
  }
}

// rotate() for head dims that are multiples of 32 (the halves in whole registers)
TUNESMITH_VEC void rotate_vec(at::BFloat16* x, const at::BFloat16* cos, const at::BFloat16* sin, int64_t heads,
                              int64_t dim) {
  const int64_t half = dim / 2;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t h = 0; h < heads; ++h) {
    at::BFloat16* head = x + h * dim;
    for (int64_t i = 0; i < half; i += 16) {
      const __m512 lo = load16(head + i), hi = load16(head + half + i);
      const __m512 a_lo = round16(_mm512_mul_ps(lo, load16(cos + i)));
      const __m512 b_lo = round16(_mm512_mul_ps(_mm512_sub_ps(zero, hi), load16(sin + i)));
      const __m512 a_hi = round16(_mm512_mul_ps(hi, load16(cos + half + i)));
      const __m512 b_hi = round16(_mm512_mul_ps(lo, load16(sin + half + i)));
      store16(head + i, _mm512_add_ps(a_lo, b_lo));
      store16(head + half + i, _mm512_add_ps(a_hi, b_hi));
    }
  }
}

// attend() for head dims that are multiples of 32: each score a vdpbf16ps dot product of the
// bf16 query and key (pairs summed in fp32), softmax with exp16, values summed in fp32 registers.
TUNESMITH_VEC void attend_vec(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v, int64_t head_stride,
                              int64_t pos_stride, at::BFloat16* out, int64_t h, int64_t heads, int64_t kv_heads,
                              int64_t n, int64_t dim, float scale, float* scores) {
  const int64_t g = h / (heads / kv_heads), chunks = dim / 32;
  constexpr int64_t MAX_CHUNKS = 8;  // head dims up to 256
  __m512bh qv[MAX_CHUNKS];
  for (int64_t c = 0; c < chunks; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + h * dim + c * 32);
  const at::BFloat16* kg = k + g * head_stride;
  __m512 top16 = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t < n; ++t) {
    const at::BFloat16* kt = kg + t * pos_stride;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(kt + c * 32), qv[c]);
    scores[t] = _mm512_reduce_add_ps(acc) * scale;
  }
  for (t = 0; t < n; t += 16) top16 = _mm512_mask_max_ps(top16, lanes(n - t), top16, _mm512_maskz_loadu_ps(lanes(n - t), scores + t));
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(top16));
  __m512 total16 = _mm512_setzero_ps();
  for (t = 0; t < n; t += 16) {
    const __mmask16 m = lanes(n - t);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + t), top));
    _mm512_mask_storeu_ps(scores + t, m, e);
    total16 = _mm512_add_ps(total16, _mm512_maskz_mov_ps(m, e));
  }
  const float total = _mm512_reduce_add_ps(total16);
  const at::BFloat16* vg = v + g * head_stride;
  __m512 acc[2 * MAX_CHUNKS];
  for (int64_t c = 0; c < 2 * chunks; ++c) acc[c] = _mm512_setzero_ps();
  for (t = 0; t < n; ++t) {
    const at::BFloat16* vt = vg + t * pos_stride;
    const __m512 w = _mm512_set1_ps(scores[t]);
    for (int64_t c = 0; c < 2 * chunks; ++c) acc[c] = _mm512_fmadd_ps(w, load16(vt + c * 16), acc[c]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / total);
  for (int64_t c = 0; c < 2 * chunks; ++c) store16(out + h * dim + c * 16, _mm512_mul_ps(acc[c], inv));
}
#endif

// The vector work of a row: the AVX-512 versions for bf16 where the CPU has them, else the loops above.
template <typename T>
constexpr bool vec_type() {
#ifdef TUNESMITH_AVX512
  return std::is_same<T, at::BFloat16>::value;
#else
  return false;
#endif
}

template <typename T>
void row_norm(const T* x, const T* w, T* out, int64_t n, float eps) {
#ifdef TUNESMITH_AVX512
  if constexpr (vec_type<T>()) {
    if (has_avx512_bf16()) return rms_norm_vec(x, w, out, n, eps);
  }
#endif
  rms_norm(x, w, out, n, eps);
}

template <typename T>
void row_add(T* x, const T* y, int64_t n) {
#ifdef TUNESMITH_AVX512
  if constexpr (vec_type<T>()) {
    if (has_avx512_bf16()) return add_vec(x, y, n);
  }
#endif
  add(x, y, n);
}

template <typename T>
void row_silu_mul(const T* gate, const T* up, T* out, int64_t n) {
#ifdef TUNESMITH_AVX512
  if constexpr (vec_type<T>()) {
    if (has_avx512_bf16()) return silu_mul_vec(gate, up, out, n);
  }
#endif
  silu_mul(gate, up, out, n);
}

template <typename T>
void row_rotate(T* x, const T* cos, const T* sin, int64_t heads, int64_t dim) {
#ifdef TUNESMITH_AVX512
  if constexpr (vec_type<T>()) {
    if (has_avx512_bf16() && dim % 32 == 0) return rotate_vec(x, cos, sin, heads, dim);
  }
#endif
  rotate(x, cos, sin, heads, dim);
}

template <typename T>
void row_attend(const T* q, const T* k, const T* v, int64_t head_stride, int64_t pos_stride, T* out, int64_t h,
                int64_t heads, int64_t kv_heads, int64_t n, int64_t dim, float scale, float* scores) {
#ifdef TUNESMITH_AVX512
  if constexpr (vec_type<T>()) {
    if (has_avx512_bf16() && dim % 32 == 0 && dim <= 256)
      return attend_vec(q, k, v, head_stride, pos_stride, out, h, heads, kv_heads, n, dim, scale, scores);
  }
#endif
  attend(q, k, v, head_stride, pos_stride, out, h, heads, kv_heads, n, dim, scale, scores);
}

// fn(i0, i1) over 0..n-1, split between the threads the products use; each item is computed
// whole by one thread, so the split does not change the results.
template <typename F>
void split(int64_t n, F fn) {
#ifdef TUNESMITH_AVX512
  over_rows(n, fn, 1, 1);
#else
  at::parallel_for(0, n, 1, fn);
#endif
}

// heads x positions attended in a layer from which attention is split between the threads
// (measured: 4 rows at position 100, 17.0 ms a step against 19.6 unsplit; one row unchanged)
constexpr int64_t SPLIT_ATTENTION = 1024;
// rows from which their vector work (norms, rotation, SiLU, adds) is split between the threads
constexpr int64_t SPLIT_ROWS = 16;

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

  // Feed ``tokens[b]`` at position ``positions[b]`` for each row b; ``k``/``v`` are the cache,
  // (layers, rows, kv_heads, length, head_dim), row b's written at its position into cache row
  // ``cache_rows[b]`` (default: b). Several rows may feed one cache row at consecutive positions
  // (a prompt's tokens: each attends to the positions up to its own, written in the same layer
  // first). Returns the float logits (rows, vocab), or of the rows ``logit_rows`` only. A row's
  // logits and cache do not depend on the other rows, as long as ``tiles`` is the same: bf16
  // products on AMX tiles where the CPU has them (what a batch should take), or the AVX-512
  // loop (a little faster for one row alone).
  at::Tensor operator()(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions, at::Tensor k,
                        at::Tensor v, bool tiles, const std::vector<int64_t>& cache_rows,
                        const std::vector<int64_t>& logit_rows) {
    c10::InferenceMode guard;
    const int64_t rows = static_cast<int64_t>(tokens.size());
    TORCH_CHECK(rows >= 1 && positions.size() == tokens.size(), "one position per token");
    TORCH_CHECK(cache_rows.empty() || cache_rows.size() == tokens.size(), "one cache row per token");
    TORCH_CHECK(k.dim() == 5 && k.sizes() == v.sizes() && (!cache_rows.empty() || k.size(1) >= rows),
                "the cache holds fewer rows than tokens");
    for (int64_t b = 0; b < rows; ++b) {
      TORCH_CHECK(positions[b] >= 0 && positions[b] < k.size(3), "position ", positions[b], " is outside the cache");
      TORCH_CHECK(tokens[b] >= 0 && tokens[b] < embed_.size(0), "token ", tokens[b], " is outside the vocabulary");
      TORCH_CHECK(cache_rows.empty() || (cache_rows[b] >= 0 && cache_rows[b] < k.size(1)), "cache row ",
                  cache_rows.empty() ? b : cache_rows[b], " is outside the cache");
    }
    for (const int64_t r : logit_rows) TORCH_CHECK(r >= 0 && r < rows, "logit row ", r, " is not a row");
    TORCH_CHECK(k.stride(4) == 1 && v.stride(4) == 1 && k.strides() == v.strides(), "unexpected cache layout");
    TORCH_CHECK(k.scalar_type() == embed_.scalar_type() && v.scalar_type() == embed_.scalar_type(),
                "the cache's dtype is not the model's");
    at::Tensor out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, embed_.scalar_type(), "decode_step", [&] {
      out = run<scalar_t>(tokens, positions, k, v, tiles, cache_rows, logit_rows);
    });
#ifdef TUNESMITH_AVX512
    pool().rest();
#endif
    return out;
  }

 private:
  template <typename T>
  at::Tensor run(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions, const at::Tensor& k,
                 const at::Tensor& v, bool tiles, const std::vector<int64_t>& cache_rows,
                 const std::vector<int64_t>& logit_rows) {
    const auto crow = [&](int64_t b) { return cache_rows.empty() ? b : cache_rows[b]; };
    const int64_t rows = static_cast<int64_t>(tokens.size());
    const int64_t hidden = embed_.size(1);
    const int64_t q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
    const float eps = static_cast<float>(eps_);
    const int64_t longest = *std::max_element(positions.begin(), positions.end()) + 1;
    int64_t attended = 0;  // positions attended over, all rows
    for (const int64_t p : positions) attended += p + 1;
    at::Tensor x = embed_.index_select(0, at::tensor(tokens, at::kLong));  // (rows, hidden), a copy
    at::Tensor h = at::empty_like(x);
    at::Tensor act = at::empty({rows, intermediate_}, x.options());
    at::Tensor attn = at::empty({rows, q_size}, x.options());
    at::Tensor scores = at::empty({rows * heads_, longest}, x.options().dtype(at::kFloat));
    T* xp = x.data_ptr<T>();
    T* hp = h.data_ptr<T>();
    // the vector work of each row: on this thread for a step's few rows, split between the
    // threads for a prompt's many (a prefill of 136 tokens spent a fifth of its time there alone)
    const auto each_row = [&](const auto& fn) {
      if (rows >= SPLIT_ROWS) {
        split(rows, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) fn(b);
        });
      } else {
        for (int64_t b = 0; b < rows; ++b) fn(b);
      }
    };
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      each_row([&](int64_t b) { row_norm(xp + b * hidden, l.ln1.data_ptr<T>(), hp + b * hidden, hidden, eps); });
      at::Tensor qkv = product(l.qkv, l.qkv_scale, h, tiles);
      const int64_t width = qkv.size(1);
      each_row([&](int64_t b) {
        const int64_t pos = positions[b];
        const T* cos = cos_[pos].data_ptr<T>();
        const T* sin = sin_[pos].data_ptr<T>();
        T* q = qkv.data_ptr<T>() + b * width;
        row_rotate(q, cos, sin, heads_, head_dim_);
        row_rotate(q + q_size, cos, sin, kv_heads_, head_dim_);
        // row b's cache in this layer, (kv_heads, length, head_dim): the new key and value go in at ``pos``
        T* keys = k.data_ptr<T>() + i * k.stride(0) + crow(b) * k.stride(1);
        T* values = v.data_ptr<T>() + i * v.stride(0) + crow(b) * v.stride(1);
        for (int64_t g = 0; g < kv_heads_; ++g) {
          std::copy(q + q_size + g * head_dim_, q + q_size + (g + 1) * head_dim_,
                    keys + g * k.stride(2) + pos * k.stride(3));
          std::copy(q + q_size + kv_size + g * head_dim_, q + q_size + kv_size + (g + 1) * head_dim_,
                    values + g * v.stride(2) + pos * v.stride(3));
        }
      });
      // attention, one (row, head) per item; split between the threads where it is long enough
      // to pay for waking them (a few ns a head and position here, most of it reading the cache)
      const auto heads_of = [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t b = j / heads_, h = j % heads_;
          row_attend(qkv.data_ptr<T>() + b * width, k.data_ptr<T>() + i * k.stride(0) + crow(b) * k.stride(1),
                 v.data_ptr<T>() + i * v.stride(0) + crow(b) * v.stride(1), k.stride(2), k.stride(3),
                 attn.data_ptr<T>() + b * q_size, h, heads_, kv_heads_, positions[b] + 1, head_dim_,
                 static_cast<float>(scaling_), scores.data_ptr<float>() + j * longest);
        }
      };
      if (heads_ * attended >= SPLIT_ATTENTION) {
        split(rows * heads_, heads_of);
      } else {
        heads_of(0, rows * heads_);
      }
      at::Tensor o = product(l.o, l.o_scale, attn, tiles);
      each_row([&](int64_t b) {
        row_add(xp + b * hidden, o.data_ptr<T>() + b * hidden, hidden);
        row_norm(xp + b * hidden, l.ln2.data_ptr<T>(), hp + b * hidden, hidden, eps);
      });
      at::Tensor gu = product(l.gate_up, l.gate_up_scale, h, tiles);
      each_row([&](int64_t b) {
        const T* g = gu.data_ptr<T>() + b * 2 * intermediate_;
        row_silu_mul(g, g + intermediate_, act.data_ptr<T>() + b * intermediate_, intermediate_);
      });
      at::Tensor d = product(l.down, l.down_scale, act, tiles);
      each_row([&](int64_t b) { row_add(xp + b * hidden, d.data_ptr<T>() + b * hidden, hidden); });
    }
    std::vector<int64_t> heads_rows = logit_rows;  // the rows whose logits are asked for
    if (heads_rows.empty())
      for (int64_t b = 0; b < rows; ++b) heads_rows.push_back(b);
    const int64_t out_rows = static_cast<int64_t>(heads_rows.size());
    at::Tensor last = at::empty({out_rows, hidden}, x.options());
    for (int64_t j = 0; j < out_rows; ++j)
      row_norm(xp + heads_rows[j] * hidden, norm_.data_ptr<T>(), last.data_ptr<T>() + j * hidden, hidden, eps);
    // to fp32 here rather than with .to(): that copy would be a parallel region of PyTorch's
    // OpenMP pool, whose threads then spin beside the products' own
    const at::Tensor logits = product(head_, head_scale_, last, tiles);
    at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
    const T* lp = logits.data_ptr<T>();
    float* op = out.data_ptr<float>();
    for (int64_t i = 0; i < logits.numel(); ++i) op[i] = f(lp[i]);
    return out;
  }

  at::Tensor embed_, norm_, head_, head_scale_, cos_, sin_;
  std::vector<Layer> layers_;
  int64_t heads_, kv_heads_, head_dim_, intermediate_;
  double eps_, scaling_;
};

// -- sampling over the vocabulary ------------------------------------------------------------
// The sampler's passes over a row of float logits (generate.py: _log_norm, _candidate_rows),
// one row at a time, so that a row's result is the same alone and beside others. In PyTorch they
// are some 30 dispatched operators a step and a partial sort of the vocabulary, about 0.9 ms for
// one row and 2.3 ms for four in the server's loop; here a few passes over memory.

// max, then log(sum(exp(x - max))) + max of x[0..n-1] (summed in 16 lanes, then across them)
#ifdef TUNESMITH_AVX512
TUNESMITH_VEC float lse_vec(const float* x, int64_t n) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) top = _mm512_mask_max_ps(top, lanes(n - i), top, _mm512_maskz_loadu_ps(lanes(n - i), x + i));
  const float m = _mm512_reduce_max_ps(top);
  if (std::isinf(m)) return m;
  const __m512 mv = _mm512_set1_ps(m);
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(n - i);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv))));
  }
  return m + std::log(_mm512_reduce_add_ps(total));
}
#endif

float lse(const float* x, int64_t n) {
#ifdef TUNESMITH_AVX512
  if (has_avx512_bf16()) return lse_vec(x, n);
#endif
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  if (std::isinf(m)) return m;
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) total += std::exp(x[i] - m);
  return m + std::log(total);
}

// logsumexp of each row of float logits (rows, V): (rows, 1)
at::Tensor log_norms(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.is_cpu(),
              "logits must be contiguous float (rows, vocab) on the CPU");
  const int64_t rows = logits.size(0), n = logits.size(1);
  at::Tensor out = at::empty({rows, 1}, logits.options());
  for (int64_t r = 0; r < rows; ++r) out.data_ptr<float>()[r] = lse(logits.data_ptr<float>() + r * n, n);
  return out;
}

// The candidates of temperature, top-k and top-p sampling for each row of float logits (rows, V):
// the row's tokens sorted by scaled logit (x / temperature) descending, ties by id; top-k keeps
// the first k; top-p then keeps the smallest first ones whose probability reaches top_p (over the
// whole vocabulary, or over the k when top-k is on: a token is kept while the mass before it is
// below top_p). Returns (values, ids, counts): row r's first counts[r] columns hold its kept
// tokens (scaled logits and ids); the columns after them, up to the widest row, hold other ids of
// the row with -inf. Only tokens within a margin of the row's largest logit are sorted, a margin
// widened until the kept set provably lies inside it.
std::vector<at::Tensor> candidates(const at::Tensor& logits, double temperature, int64_t top_k, double top_p) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.is_cpu(),
              "logits must be contiguous float (rows, vocab) on the CPU");
  TORCH_CHECK(temperature > 0 && top_p > 0 && top_k >= 0, "temperature and top_p must be positive");
  const int64_t rows = logits.size(0), n = logits.size(1);
  const float t = static_cast<float>(temperature), p = static_cast<float>(top_p);
  std::vector<std::vector<std::pair<float, int64_t>>> kept(rows), spare(rows);
  std::vector<float> scaled(n);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = logits.data_ptr<float>() + r * n;
    float m = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
      scaled[i] = std::isnan(x[i]) ? -INFINITY : x[i] / t;
      m = std::max(m, scaled[i]);
    }
    const float norm = top_k == 0 && p < 1.0f ? lse(scaled.data(), n) : 0.f;
    const int64_t k = top_k > 0 ? std::min(top_k, n) : n;
    std::vector<std::pair<float, int64_t>> sorted;
    for (float margin = 8.f;; margin *= 2.f) {
      const bool last = margin > 1e30f || std::isinf(m);  // the last pass takes every token (NaN too)
      const float floor = m - margin;
      sorted.clear();
      for (int64_t i = 0; i < n; ++i)
        if (last || scaled[i] >= floor) sorted.emplace_back(-scaled[i], i);
      std::sort(sorted.begin(), sorted.end());
      const int64_t have = static_cast<int64_t>(sorted.size());
      const bool all = have == n;
      if (!all && have < k && top_k > 0) continue;  // top-k needs its k first
      const int64_t width = std::min(have, k);
      int64_t count = width;
      if (p < 1.0f) {
        // probabilities: over the whole vocabulary, or over the k (softmax of the k)
        // (summed in double: over tens of thousands of tokens a float sum drifts by more than
        // the last kept token's probability)
        double local = 0.0;
        if (top_k > 0) {
          const float first = -sorted[0].first;
          for (int64_t j = 0; j < width; ++j) local += std::exp(-sorted[j].first - first);
        }
        double cum = 0.0;
        count = 0;
        for (int64_t j = 0; j < width; ++j) {
          if (cum >= top_p) break;
          cum += top_k > 0 ? std::exp(-sorted[j].first + sorted[0].first) / local : std::exp(-sorted[j].first - norm);
          ++count;
        }
        if (count == width && !all && top_k == 0) continue;  // every sorted token kept: the next may be too
      }
      for (int64_t j = 0; j < count; ++j) kept[r].emplace_back(-sorted[j].first, sorted[j].second);
      for (int64_t j = count; j < have; ++j) spare[r].emplace_back(-INFINITY, sorted[j].second);
      break;
    }
  }
  size_t widest = 0;
  for (const auto& k : kept) widest = std::max(widest, k.size());
  at::Tensor values = at::empty({rows, static_cast<int64_t>(widest)}, logits.options());
  at::Tensor ids = at::empty({rows, static_cast<int64_t>(widest)}, logits.options().dtype(at::kLong));
  at::Tensor counts = at::empty({rows}, ids.options());
  for (int64_t r = 0; r < rows; ++r) {
    float* v = values.data_ptr<float>() + r * widest;
    int64_t* id = ids.data_ptr<int64_t>() + r * widest;
    counts.data_ptr<int64_t>()[r] = static_cast<int64_t>(kept[r].size());
    std::vector<bool> used;
    size_t j = 0, next_spare = 0;
    int64_t next_id = 0;
    for (; j < kept[r].size(); ++j) {
      v[j] = kept[r][j].first;
      id[j] = kept[r][j].second;
    }
    for (; j < widest; ++j) {  // padding: the row's next tokens, then any id it does not hold
      v[j] = -INFINITY;
      if (next_spare < spare[r].size()) {
        id[j] = spare[r][next_spare++].second;
        continue;
      }
      if (used.empty()) {
        used.assign(n, false);
        for (size_t i = 0; i < kept[r].size(); ++i) used[kept[r][i].second] = true;
        for (const auto& sp : spare[r]) used[sp.second] = true;
      }
      while (used[next_id]) ++next_id;
      id[j] = next_id;
      used[next_id] = true;
    }
  }
  return {values, ids, counts};
}

bool has_tiles() {
#ifdef TUNESMITH_AVX512
  return has_amx();
#else
  return false;
#endif
}

bool set_tiles(bool allowed) {
#ifdef TUNESMITH_AVX512
  tiles_allowed.store(allowed);
  return has_amx();
#else
  return false;
#endif
}

// The number of threads PyTorch's OpenMP operators use when called from this thread (OpenMP
// keeps it per thread); returns the previous number. The server's loop samples with one: its
// operators over one vocabulary are too small to gain from a second thread, and off the main
// thread a second one is woken from sleep for each of them (bench/NOTES.md, decoding round 5).
int threads_here(int n) {
#ifdef _OPENMP
  const int before = omp_get_max_threads();
  omp_set_num_threads(std::max(1, n));
  return before;
#else
  return 1;
#endif
}

// The same for MKL's vector math, which PyTorch calls for exp and log over long float tensors
// (the sampler's over the vocabulary) and which keeps a thread count of its own, not OpenMP's:
// a second thread it wakes there spins on for milliseconds after each call, on the CPU the next
// step's products need (the server's 1-row step: 17.5 ms against 14). Returns the previous
// thread-local count (0: MKL's global one), or -1 where PyTorch has no MKL.
int mkl_threads_here(int n) {
  using Set = int (*)(int);
  static const Set set = [] {
    void* torch = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    return torch == nullptr ? nullptr : reinterpret_cast<Set>(dlsym(torch, "MKL_Set_Num_Threads_Local"));
  }();
  return set == nullptr ? -1 : set(std::max(0, n));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Step>(m, "Step")
      .def(pybind11::init<at::Tensor, std::vector<std::vector<at::Tensor>>, at::Tensor, at::Tensor, at::Tensor,
                          at::Tensor, at::Tensor, int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("__call__", &Step::operator(), pybind11::arg("tokens"), pybind11::arg("positions"), pybind11::arg("k"),
           pybind11::arg("v"), pybind11::arg("tiles"), pybind11::arg("cache_rows") = std::vector<int64_t>{},
           pybind11::arg("logit_rows") = std::vector<int64_t>{}, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("tiles", &has_tiles, "whether bf16 products run on AMX tiles here");
  m.def("threads_here", &threads_here, "OpenMP threads of PyTorch's operators on this thread; returns the previous",
        pybind11::arg("n"));
  m.def("mkl_threads_here", &mkl_threads_here,
        "MKL threads of this thread (0: MKL's global count); returns the previous, -1 without MKL",
        pybind11::arg("n"));
  m.def("log_norms", &log_norms, "logsumexp of each row of float logits, (rows, 1)", pybind11::arg("logits"));
  m.def("candidates", &candidates, "the sampling candidates of each row: (values, ids, counts)",
        pybind11::arg("logits"), pybind11::arg("temperature"), pybind11::arg("top_k"), pybind11::arg("top_p"));
  m.def("set_tiles", &set_tiles, "allow AMX tiles for bf16 products (default) or not; returns whether they are used",
        pybind11::arg("allowed"));
  m.def("product", &product, "x @ w.T as the step computes it (for tests)", pybind11::arg("w"), pybind11::arg("scale"),
        pybind11::arg("x"), pybind11::arg("tiles") = true);
}
