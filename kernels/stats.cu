// Batch statistics: per-(block, channel) Welford partials, then an ordered merge per channel.
//
//   iabn_batch_stats    x -> partials (G, 3, C): count, mean, biased var of each block's share
//   iabn_stats_finalize partials (R, 3, C) -> merged (3, C), or stats (4, C) with inverse std
//                       and the running-statistics update; eval mode reads the running stats.
// The same finalize merges the G block partials of one device and, for synchronized BN, the
// R replicas' (count, mean, var) rows, so both merges follow one formula and one order
// (finalize.cuh, which iabn_forward also runs per block when it finalizes for itself).
#include "common.cuh"
#include "finalize.cuh"
#include "layout.cuh"
#include "reduce.cuh"

template <class T, class Layout, int VEC>
__global__ void __launch_bounds__(iabn::kBlockThreads)
iabn_batch_stats(const T* __restrict__ x, iabn::acc_t<T>* __restrict__ partials, long long N,
                 long long C, long long S, long long seg) {
  using namespace iabn;
  typedef acc_t<T> Acc;
  constexpr int CH = Layout::template channels_per_thread<VEC>();
  Welford<Acc> acc[CH];
  for (int k = 0; k < CH; ++k) acc[k] = Welford<Acc>::identity();

  // A division per value would make this kernel compute-bound for 16-bit inputs on fast
  // memory, so values are folded with one division per vector: a vector of one channel is
  // merged as a group (Chan), and a vector across CH channels shares one 1/n.
  Layout::template for_each_vector<VEC>(N, C, S, seg, [&](long long off) {
    const Vec<T, VEC> v = load_vec<VEC>(x + off);
    Acc a[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] = to_acc<Acc>(v.v[k]);
    if constexpr (CH == 1) {
      acc[0] = Welford<Acc>::combine(acc[0], Welford<Acc>::of_group(a));
    } else {
      const Acc n = acc[0].n + Acc(1);
      const Acc inv_n = Acc(1) / n;
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k].push_counted(a[k], n, inv_n);
    }
  });

  Acc* out = partials + (long long)blockIdx.y * 3 * C;
  Layout::reduce_block(acc, C, [&](int, long long c, const Welford<Acc>& w) {
    store(out + c, w.n);
    store(out + C + c, w.mean);
    store(out + 2 * C + c, w.n > Acc(0) ? w.m2 / w.n : Acc(0));
  });
}

// One channel per threadIdx.x, its rows merged by merge_rows (finalize.cuh); threadIdx.y == 0
// stores. Eval mode reads the running statistics through eval_mean/eval_var (const: they may
// be read-only memory) and training updates running_mean/running_var; the other pair is null.
template <class Acc, class P>
__global__ void __launch_bounds__(iabn::kBlockThreads)
iabn_stats_finalize(const Acc* __restrict__ partials, long long R, long long C, Acc* __restrict__ out,
                    const P* __restrict__ eval_mean, const P* __restrict__ eval_var,
                    P* __restrict__ running_mean, P* __restrict__ running_var, Acc momentum, Acc eps,
                    Acc eval_count, int mode) {
  using namespace iabn;
  const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = c < C;
  Welford<Acc> w = Welford<Acc>::identity();
  if (mode != kEval)  // uniform
    w = merge_rows<Welford<Acc>>(R, active, [&](long long r) { return partial_row(partials, C, r, c); });
  if (!active || threadIdx.y != 0) return;
  const ChannelStats<Acc> s = finish_stats<Acc>(w, c, eval_mean, eval_var, eval_count, mode);
  store_channel_stats<Acc>(s, out, C, c, running_mean, running_var, momentum, eps, mode);
}
