// Backward from the saved output z and the incoming gradient dz only (x was overwritten):
//   y = act^-1(z), dy = dz * act'(z), xhat = (y - r - bias) / gamma  (all in registers)
// r is the optional residual added before the activation (z = act(BN(x) + r)); it is read
// again here, never stored by forward, and its gradient is dr = dy.
//   iabn_backward_reduce      partial sums (G, 2, C) of dy and dy * xhat
//   iabn_backward_finalize    ordered merge (finalize.cuh merge_rows) -> sums (2, C); dweight = abs_slope(w) sum(dy xhat), dbias = sum(dy)
//   iabn_backward_elementwise dx (which may be dz's own buffer: in place):
//       training: dx = gamma * invstd * (dy - sum(dy)/m - xhat * sum(dy xhat)/m)
//       eval:     dx = gamma * invstd * dy
//       with a residual, also dr = dy (a separate output buffer)
// Synchronized BN all-reduces `sums` between finalize and elementwise. Otherwise the
// elementwise kernel sums the G partials itself when G is small (per block, for its channels,
// in the order iabn_backward_finalize uses) and its blocks with blockIdx.y == 0 store dweight
// and dbias: two launches per backward; with many partials, three (finalize.cuh kSerialRows).
#include "activations.cuh"
#include "common.cuh"
#include "finalize.cuh"
#include "layout.cuh"
#include "reduce.cuh"

namespace iabn {

// Per-channel constants of the backward pass. `scale`, `mean_dy` and `mean_dy_xhat` are only
// used by the elementwise kernel.
template <class Acc> struct BackwardCoef {
  Acc gamma, inv_gamma, shift, scale, mean_dy, mean_dy_xhat;
};

template <class Acc, class P>
__device__ __forceinline__ BackwardCoef<Acc> affine_of(const P* weight, const P* bias, Acc eps, long long c) {
  BackwardCoef<Acc> k;
  k.gamma = weight ? acc_abs(to_acc<Acc>(load(weight + c))) + eps : Acc(1);
  k.inv_gamma = Acc(1) / k.gamma;
  k.shift = load_or<Acc>(bias, c, Acc(0));
  k.scale = k.mean_dy = k.mean_dy_xhat = Acc(0);
  return k;
}

// (dy, xhat) of one element, recovered from its output, output-gradient and residual (0 without).
template <class Act, class Acc>
__device__ __forceinline__ void recover(Acc z, Acc dz, Acc r, const BackwardCoef<Acc>& a, Acc p, Acc& dy,
                                        Acc& xhat) {
  dy = dz * Act::derivative(z, p);
  xhat = (Act::inverse(z, p) - r - a.shift) * a.inv_gamma;
}

// Channel c's row g of partials (G, 2, C).
template <class Acc>
__device__ __forceinline__ SumPair<Acc> sum_row(const Acc* partials, long long C, long long g, long long c) {
  return SumPair<Acc>{load(partials + g * 2 * C + c), load(partials + g * 2 * C + C + c)};
}

// gamma = |w| + eps and dL/dgamma = sum(dy * xhat); d|w|/dw is +1 at w = 0 (abs_slope).
template <class Acc, class P>
__device__ __forceinline__ void store_param_grads(const SumPair<Acc>& s, const P* weight, P* dweight, P* dbias,
                                                  long long c) {
  if (dweight) store(dweight + c, Cast<P>::from(abs_slope(to_acc<Acc>(load(weight + c))) * s.dy_xhat));
  if (dbias) store(dbias + c, Cast<P>::from(s.dy));
}

}  // namespace iabn

template <class T, class P, class Act, class Layout, int VEC>
__global__ void __launch_bounds__(iabn::kBlockThreads)
iabn_backward_reduce(const T* __restrict__ z, const T* __restrict__ dz, iabn::acc_t<T>* __restrict__ partials,
                     const P* __restrict__ weight, const P* __restrict__ bias, iabn::acc_t<T> eps,
                     iabn::acc_t<T> act_param, long long N, long long C, long long S, long long seg,
                     const T* __restrict__ residual) {
  using namespace iabn;
  typedef acc_t<T> Acc;
  constexpr int CH = Layout::template channels_per_thread<VEC>();
  BackwardCoef<Acc> aff[CH];
  SumPair<Acc> acc[CH];
  for (int k = 0; k < CH; ++k) acc[k] = SumPair<Acc>::identity();
  Layout::channel_constants(C, aff, [&](long long c) { return affine_of<Acc>(weight, bias, eps, c); });

  Layout::template for_each_vector<VEC>(N, C, S, seg, [&](long long off) {
    const Vec<T, VEC> zv = load_vec<VEC>(z + off);
    const Vec<T, VEC> gv = load_vec<VEC>(dz + off);
    Vec<T, VEC> rv;
    if (residual) rv = load_vec<VEC>(residual + off);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int s = Layout::slot(k);
      const Acc r = residual ? to_acc<Acc>(rv.v[k]) : Acc(0);
      Acc dy, xhat;
      recover<Act>(to_acc<Acc>(zv.v[k]), to_acc<Acc>(gv.v[k]), r, aff[s], act_param, dy, xhat);
      acc[s].dy += dy;
      acc[s].dy_xhat += dy * xhat;
    }
  });

  Acc* out = partials + (long long)blockIdx.y * 2 * C;
  Layout::reduce_block(acc, C, [&](int, long long c, const SumPair<Acc>& v) {
    store(out + c, v.dy);
    store(out + C + c, v.dy_xhat);
  });
}

template <class Acc, class P>
__global__ void __launch_bounds__(iabn::kBlockThreads)
iabn_backward_finalize(const Acc* __restrict__ partials, long long G, long long C, Acc* __restrict__ sums,
                       const P* __restrict__ weight, P* __restrict__ dweight, P* __restrict__ dbias) {
  using namespace iabn;
  const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = c < C;
  const SumPair<Acc> s =
      merge_rows<SumPair<Acc>>(G, active, [&](long long g) { return sum_row(partials, C, g, c); });
  if (!active || threadIdx.y != 0) return;
  store(sums + c, s.dy);
  store(sums + C + c, s.dy_xhat);
  store_param_grads(s, weight, dweight, dbias, c);
}

template <class T, class P, class Act, class Layout, int VEC>
__global__ void __launch_bounds__(iabn::kBlockThreads)
// dz and dx may be the same buffer (in-place backward), so neither is __restrict__; each
// element is read before it is written, by the same thread. dresidual overlaps nothing.
iabn_backward_elementwise(const T* __restrict__ z, const T* dz, T* dx, const iabn::acc_t<T>* __restrict__ stats,
                          const iabn::acc_t<T>* __restrict__ sums, const P* __restrict__ weight,
                          const P* __restrict__ bias, iabn::acc_t<T> eps, iabn::acc_t<T> act_param,
                          int training, long long N, long long C, long long S, long long seg,
                          const T* __restrict__ residual, T* __restrict__ dresidual,
                          const iabn::acc_t<T>* __restrict__ partials, long long G,
                          P* __restrict__ dweight, P* __restrict__ dbias) {
  using namespace iabn;
  typedef acc_t<T> Acc;
  constexpr int CH = Layout::template channels_per_thread<VEC>();
  BackwardCoef<Acc> aff[CH];
  Layout::channel_constants(C, aff, [&](long long c) {
    BackwardCoef<Acc> k = affine_of<Acc>(weight, bias, eps, c);
    k.scale = k.gamma * load(stats + 3 * C + c);
    // The sums: from `sums` (finalized, or all-reduced by synchronized BN), or merged here from
    // the reduction's G partials (then blocks with blockIdx.y == 0 store dweight and dbias).
    SumPair<Acc> s = SumPair<Acc>::identity();
    if (partials) {
      s = merge_serial<SumPair<Acc>>(G, [&](long long g) { return sum_row(partials, C, g, c); });
      if (blockIdx.y == 0) store_param_grads(s, weight, dweight, dbias, c);
    }
    if (training) {
      // The count row of stats is the global count m (replicas included for synchronized BN).
      const Acc inv_m = Acc(1) / load(stats + c);
      k.mean_dy = (partials ? s.dy : load(sums + c)) * inv_m;
      k.mean_dy_xhat = (partials ? s.dy_xhat : load(sums + C + c)) * inv_m;
    }
    return k;
  });

  Layout::template for_each_vector<VEC>(N, C, S, seg, [&](long long off) {
    const Vec<T, VEC> zv = load_vec<VEC>(z + off);
    Vec<T, VEC> gv = load_vec<VEC>(dz + off);
    Vec<T, VEC> rv;  // residual in, then its gradient out (dr = dy)
    if (residual) rv = load_vec<VEC>(residual + off);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int s = Layout::slot(k);
      const Acc r = residual ? to_acc<Acc>(rv.v[k]) : Acc(0);
      Acc dy, xhat;
      recover<Act>(to_acc<Acc>(zv.v[k]), to_acc<Acc>(gv.v[k]), r, aff[s], act_param, dy, xhat);
      const BackwardCoef<Acc>& a = aff[s];
      // Eval leaves xhat out (dx = scale * dy): xhat * 0 would turn an Inf or NaN z into a
      // NaN dx where the NumPy backend and the reference give a finite one.
      gv.v[k] = Cast<T>::from(a.scale * (training ? dy - a.mean_dy - xhat * a.mean_dy_xhat : dy));
      if (residual) rv.v[k] = Cast<T>::from(dy);
    }
    store_vec<VEC>(dx + off, gv);
    if (residual) store_vec<VEC>(dresidual + off, rv);
  });
}
