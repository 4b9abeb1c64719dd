// One pass of the NFNet optimizer over every parameter leaf, for XLA:CPU.
//
// Per element, in the order of the optax chain that `nfnet_jax.optim.sgd_agc`
// builds (arXiv 2102.06171 section 3 and appendix C), then the parameter EMA:
//   t  = g * s + wd * p          AGC scale of the element's unit, coupled decay
//   m' = t + mu * m              optax.trace
//   u  = t + mu * m'  (Nesterov) or m'
//   p' = p + (-lr) * u           scale_by_learning_rate, apply_updates
//   e' = e * d + p' * (1 - d)    EMA of the parameters
// and the sum of u'^2 (u' = -lr * u) over all leaves, for the update norm.
//
// XLA:CPU computes p', m' and e' as separate fusions that each read the leaves
// again; here each leaf is read once and written in place (the outputs alias
// p, m and e: every element is read before it is written, and only by the
// thread that writes it). The parallel work runs on XLA's intra-op thread pool.
//
// Buffers: args = scalars f32[2] (lr, d), then per leaf g, p, m, e, s, where s
// holds the AGC scale of each unit: length 1 (one unit) or the leaf's trailing
// size (one unit per output column). rets = update sum of squares f32[], then
// per leaf p', m', e'. Attributes: momentum (f32), nesterov (bool), and
// weight_decay (f32[num_leaves]).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Leaf {
  const float *g, *p, *m, *e, *s;
  float *po, *mo, *eo;
  int64_t size, scale_len;
  float wd;
};

struct Chunk {
  int32_t leaf;
  int64_t begin, end;  // Element range; a multiple of scale_len when it is > 1.
};

struct Step {
  std::vector<Leaf> leaves;
  std::vector<Chunk> chunks;
  std::vector<double> sums;  // One per chunk, added in chunk order at the end.
  float lr, d, mu;
  bool nesterov;
  std::atomic<int64_t> next{0}, done{0};
};

template <bool kNesterov>
float Elementwise(const Leaf& f, int64_t i, float s, float lr, float d, float mu) {
  const float t = f.g[i] * s + f.wd * f.p[i];
  const float m2 = t + mu * f.m[i];
  const float u = -lr * (kNesterov ? t + mu * m2 : m2);
  const float p2 = f.p[i] + u;
  f.mo[i] = m2;
  f.po[i] = p2;
  f.eo[i] = f.e[i] * d + p2 * (1.0f - d);
  return u * u;
}

template <bool kNesterov>
double RunChunk(const Step& st, const Chunk& c) {
  const Leaf& f = st.leaves[c.leaf];
  double total = 0.0;
  if (f.scale_len == 1) {
    const float s = f.s[0];
    float acc = 0.0f;
    for (int64_t i = c.begin; i < c.end; ++i) acc += Elementwise<kNesterov>(f, i, s, st.lr, st.d, st.mu);
    return acc;
  }
  for (int64_t row = c.begin; row < c.end; row += f.scale_len) {
    float acc = 0.0f;
    for (int64_t j = 0; j < f.scale_len; ++j)
      acc += Elementwise<kNesterov>(f, row + j, f.s[j], st.lr, st.d, st.mu);
    total += acc;
  }
  return total;
}

void Work(Step* st) {
  const int64_t n = static_cast<int64_t>(st->chunks.size());
  for (;;) {
    const int64_t k = st->next.fetch_add(1, std::memory_order_relaxed);
    if (k >= n) return;
    st->sums[k] = st->nesterov ? RunChunk<true>(*st, st->chunks[k]) : RunChunk<false>(*st, st->chunks[k]);
    st->done.fetch_add(1, std::memory_order_release);
  }
}

// About 256 KiB of each of the seven streams per chunk: enough work to amortise
// the claim, small enough to balance the threads on the large leaves.
constexpr int64_t kChunkElements = 1 << 16;

ffi::Error FusedSgdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args,
                        ffi::ResultBuffer<ffi::F32> update_sq, ffi::RemainingRets rets, float momentum,
                        bool nesterov, ffi::Span<const float> weight_decay) {
  const size_t num_leaves = weight_decay.size();
  if (scalars.element_count() != 2 || args.size() != 5 * num_leaves || rets.size() != 3 * num_leaves)
    return ffi::Error::InvalidArgument("fused_sgd: expected 5 inputs and 3 outputs per leaf");
  auto step = std::make_shared<Step>();
  step->lr = scalars.typed_data()[0];
  step->d = scalars.typed_data()[1];
  step->mu = momentum;
  step->nesterov = nesterov;
  step->leaves.reserve(num_leaves);
  for (size_t i = 0; i < num_leaves; ++i) {
    Leaf f{};
    const float* in[5];
    for (size_t k = 0; k < 5; ++k) {
      auto b = args.get<ffi::Buffer<ffi::F32>>(5 * i + k);
      if (b.has_error()) return b.error();
      in[k] = b->typed_data();
      if (k == 0) f.size = static_cast<int64_t>(b->element_count());
      if (k == 4) f.scale_len = static_cast<int64_t>(b->element_count());
    }
    float* out[3];
    for (size_t k = 0; k < 3; ++k) {
      auto b = rets.get<ffi::Buffer<ffi::F32>>(3 * i + k);
      if (b.has_error()) return b.error();
      out[k] = (*b)->typed_data();
    }
    if (f.scale_len < 1 || f.size % f.scale_len != 0)
      return ffi::Error::InvalidArgument("fused_sgd: AGC scale length does not divide the leaf");
    f.g = in[0], f.p = in[1], f.m = in[2], f.e = in[3], f.s = in[4];
    f.po = out[0], f.mo = out[1], f.eo = out[2];
    f.wd = weight_decay[i];
    const int64_t step_len = f.scale_len > 1 ? f.scale_len : 1;
    const int64_t rows = f.size / step_len;
    const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElements / step_len);
    for (int64_t r = 0; r < rows; r += rows_per_chunk)
      step->chunks.push_back({static_cast<int32_t>(i), r * step_len, std::min(rows, r + rows_per_chunk) * step_len});
    step->leaves.push_back(f);
  }
  step->sums.assign(step->chunks.size(), 0.0);
  // The helpers hold the step by shared_ptr: one may start after the calling
  // thread has finished every chunk and returned. The calling thread works too
  // and then spins, rather than waiting on the pool, which may be busy with the
  // very call that scheduled these tasks.
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), static_cast<int64_t>(step->chunks.size()) - 1);
  for (int64_t k = 0; k < helpers; ++k) pool.Schedule([step] { Work(step.get()); });
  Work(step.get());
  const int64_t n = static_cast<int64_t>(step->chunks.size());
  while (step->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  double total = 0.0;
  for (double v : step->sums) total += v;
  update_sq->typed_data()[0] = static_cast<float>(total);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NfnetFusedSgd, FusedSgdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets()
                                  .Attr<float>("momentum")
                                  .Attr<bool>("nesterov")
                                  .Attr<ffi::Span<const float>>("weight_decay"));
