// Forward, in place: x <- act(gamma * (x - mean) * invstd + bias [+ r]), gamma = |weight| + eps.
// One read and one write of x (and one read of the optional residual r, a tensor shaped and
// laid out like x); the per-channel coefficients are formed once per block.
//
// The per-channel statistics come one of three ways (`mode`, a FinalizeMode):
//   kMergeOnly  read from `stats` (4, C), finalized by iabn_stats_finalize (synchronized BN,
//               whose exchange sits between the two);
//   kTrain      merged here from the R block partials of iabn_batch_stats, and
//   kEval       taken here from the running statistics (eval_mean/eval_var),
// in the last two by every block for its own channels (finalize.cuh: the same bits as
// iabn_stats_finalize); the blocks with blockIdx.y == 0, one per channel, also store `stats`
// and, in training, update the running statistics. A training forward is then two launches.
// `batches` (optional) is the module's num_batches_tracked counter, incremented once.
#include "activations.cuh"
#include "common.cuh"
#include "finalize.cuh"
#include "layout.cuh"

namespace iabn {
template <class Acc> struct ForwardCoef { Acc mean, scale, shift; };
}

template <class T, class P, class Act, class Layout, int VEC>
__global__ void __launch_bounds__(iabn::kBlockThreads)
iabn_forward(T* __restrict__ x, iabn::acc_t<T>* __restrict__ stats, const P* __restrict__ weight,
             const P* __restrict__ bias, iabn::acc_t<T> eps, iabn::acc_t<T> act_param, long long N,
             long long C, long long S, long long seg, const T* __restrict__ residual,
             const iabn::acc_t<T>* __restrict__ partials, long long R, const P* __restrict__ eval_mean,
             const P* __restrict__ eval_var, P* __restrict__ running_mean, P* __restrict__ running_var,
             iabn::acc_t<T> momentum, iabn::acc_t<T> eval_count, int mode,
             long long* __restrict__ batches) {
  using namespace iabn;
  typedef acc_t<T> Acc;
  // The module's num_batches_tracked, counted here by one thread (nothing in this launch
  // reads it) instead of by a separate launch of torch's add_; null when not counting.
  if (batches && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0)
    store(batches, load(batches) + 1);
  constexpr int CH = Layout::template channels_per_thread<VEC>();
  ForwardCoef<Acc> coef[CH];
  Layout::channel_constants(C, coef, [&](long long c) {
    const Acc gamma = weight ? acc_abs(to_acc<Acc>(load(weight + c))) + eps : Acc(1);
    Acc mean, invstd;
    if (mode == kMergeOnly) {
      mean = load(stats + C + c);
      invstd = load(stats + 3 * C + c);
    } else {
      const ChannelStats<Acc> s = channel_stats<Acc>(partials, R, C, c, eval_mean, eval_var, eval_count, mode);
      mean = s.mean;
      invstd = acc_rsqrt(s.var + eps);
      if (blockIdx.y == 0) store_channel_stats<Acc>(s, stats, C, c, running_mean, running_var, momentum, eps, mode);
    }
    return ForwardCoef<Acc>{mean, gamma * invstd, load_or<Acc>(bias, c, Acc(0))};
  });

  Layout::template for_each_vector<VEC>(N, C, S, seg, [&](long long off) {
    Vec<T, VEC> v = load_vec<VEC>(x + off);
    Vec<T, VEC> r;  // residual; only touched when present (a uniform branch: no divergence)
    if (residual) r = load_vec<VEC>(residual + off);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const ForwardCoef<Acc>& cf = coef[Layout::slot(k)];
      Acc y = (to_acc<Acc>(v.v[k]) - cf.mean) * cf.scale + cf.shift;
      if (residual) y += to_acc<Acc>(r.v[k]);
      v.v[k] = Cast<T>::from(Act::forward(y, act_param));
    }
    store_vec<VEC>(x + off, v);
  });
}
