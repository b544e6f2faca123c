// Per-sample math of multi-scale deformable attention, shared by the CPU and
// CUDA kernels so that the CPU tests exercise exactly the arithmetic the GPU
// runs. Everything here is a host/device inline function on plain values.
//
// Convention (identical to the official kernel and to grid_sample with
// align_corners=False, zero padding): a normalised location (x, y) in [0, 1]
// maps to the continuous pixel coordinate (x * W - 0.5, y * H - 0.5), pixel
// centres sit at integer coordinates, and taps outside the map read zero.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DD_HOST_DEVICE inline
#endif

namespace detr_deform {

// The four taps of one bilinear sample: flat pixel offsets inside the level
// (-1 for a tap outside the map) and their interpolation weights. The weight
// factors are kept so that the location gradient can be formed from them.
// index_t: int64_t, or int32_t on the CUDA forward's fast path (every extent fits).
template <typename acc_t, typename index_t = int64_t>
struct BilinearTaps {
  index_t offset[4];  // (h_low, w_low), (h_low, w_high), (h_high, w_low), (h_high, w_high)
  acc_t weight[4];
  acc_t lh, lw, hh, hw;  // fractional parts and their complements
  bool inside;           // false: the whole sample is zero (and so is its gradient)
};

// Locates the taps of the sample at normalised (loc_x, loc_y) on an H x W map.
template <typename acc_t, typename index_t = int64_t>
DD_HOST_DEVICE BilinearTaps<acc_t, index_t> bilinear_taps(acc_t loc_x, acc_t loc_y, index_t height,
                                                          index_t width) {
  BilinearTaps<acc_t, index_t> taps;
  const acc_t h_im = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  const acc_t w_im = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  // The official kernel skips samples that lie a full pixel or more outside
  // the map; the comparison is written so that NaN locations are skipped too.
  taps.inside = (h_im > acc_t(-1)) && (w_im > acc_t(-1)) && (h_im < static_cast<acc_t>(height)) &&
                (w_im < static_cast<acc_t>(width));
  if (!taps.inside) {
    for (int i = 0; i < 4; ++i) {
      taps.offset[i] = -1;
      taps.weight[i] = acc_t(0);
    }
    taps.lh = taps.lw = taps.hh = taps.hw = acc_t(0);
    return taps;
  }
  const acc_t h_floor = floor(h_im);
  const acc_t w_floor = floor(w_im);
  const index_t h_low = static_cast<index_t>(h_floor);
  const index_t w_low = static_cast<index_t>(w_floor);
  const index_t h_high = h_low + 1;
  const index_t w_high = w_low + 1;
  taps.lh = h_im - h_floor;
  taps.lw = w_im - w_floor;
  taps.hh = acc_t(1) - taps.lh;
  taps.hw = acc_t(1) - taps.lw;
  const bool h_low_ok = h_low >= 0;
  const bool w_low_ok = w_low >= 0;
  const bool h_high_ok = h_high <= height - 1;
  const bool w_high_ok = w_high <= width - 1;
  taps.offset[0] = (h_low_ok && w_low_ok) ? h_low * width + w_low : -1;
  taps.offset[1] = (h_low_ok && w_high_ok) ? h_low * width + w_high : -1;
  taps.offset[2] = (h_high_ok && w_low_ok) ? h_high * width + w_low : -1;
  taps.offset[3] = (h_high_ok && w_high_ok) ? h_high * width + w_high : -1;
  taps.weight[0] = taps.hh * taps.hw;
  taps.weight[1] = taps.hh * taps.lw;
  taps.weight[2] = taps.lh * taps.hw;
  taps.weight[3] = taps.lh * taps.lw;
  return taps;
}

// Interpolated value of one channel given the four tap values (0 for taps
// outside the map).
template <typename acc_t, typename index_t>
DD_HOST_DEVICE acc_t bilinear_value(const BilinearTaps<acc_t, index_t>& taps, acc_t v0, acc_t v1, acc_t v2,
                                    acc_t v3) {
  return taps.weight[0] * v0 + taps.weight[1] * v1 + taps.weight[2] * v2 + taps.weight[3] * v3;
}

// Derivatives of the interpolated value with respect to the continuous pixel
// coordinates (h_im, w_im) of the sample, for one channel.
template <typename acc_t, typename index_t>
DD_HOST_DEVICE void bilinear_coord_grad(const BilinearTaps<acc_t, index_t>& taps, acc_t v0, acc_t v1,
                                        acc_t v2, acc_t v3, acc_t* d_h, acc_t* d_w) {
  *d_h = taps.hw * (v2 - v0) + taps.lw * (v3 - v1);
  *d_w = taps.hh * (v1 - v0) + taps.lh * (v3 - v2);
}

// Loads a tap value, reading nothing for taps outside the map.
template <typename scalar_t, typename acc_t, typename index_t>
DD_HOST_DEVICE acc_t load_tap(const scalar_t* level_value, index_t offset, index_t pixel_stride) {
  return offset >= 0 ? static_cast<acc_t>(level_value[offset * pixel_stride]) : acc_t(0);
}

}  // namespace detr_deform
