// Weighted masking, the part shared by the CPU and the CUDA kernels (DESIGN section 3.3).
//
// Every valid position t of row b gets a key from one counter-based random number: the exponential race
// E / w_t with E = -log(U), U = Philox4x32-10(counter = (t, b), key = seed). The k positions with the
// smallest (key, position) pairs are a successive sample without replacement proportional to w, the law of
// numpy.random.choice(replace=False, p=w/sum(w)). Zero-weight positions rank after every positive one, in
// the uniformly random order of E, which is the zero-weight fill-up.
//
// Both kernels must compute bit-identical keys so that one seed gives one mask on either device. Hence no
// library transcendental (glibc and CUDA may round log differently): the log below uses +, *, / and frexp
// only, and every operation is rounded once, through explicit round-to-nearest intrinsics on the device and
// plain operations on the host, whose translation units are built with -ffp-contract=off (no fused
// multiply-add). Torch-free, so that nvcc compiles the CUDA kernel without torch's headers.
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define RECLMIS_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define RECLMIS_HD inline __attribute__((always_inline))
#else
#define RECLMIS_HD inline
#endif

namespace reclmis {
namespace wm {

// Per-row status bits reported by the kernels.
constexpr uint8_t kBadWeight = 1;  // a valid position holds a negative, NaN or infinite weight
constexpr uint8_t kBadLength = 2;  // the row's length lies outside [0, T]

RECLMIS_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

RECLMIS_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

RECLMIS_HD double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

RECLMIS_HD uint64_t bits_of(double v) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(v));
#else
  uint64_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits;
#endif
}

struct Words {
  uint32_t w[4];
};

// Philox4x32-10 (Salmon et al., SC'11): ten rounds of two 32x32->64 multiplications, the key bumped by
// the Weyl constants before rounds 2..10. Checked against the Random123 known-answer vectors in the tests.
RECLMIS_HD Words philox4x32_10(Words c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c.w[0];
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c.w[2];
    c = Words{{static_cast<uint32_t>(p1 >> 32) ^ c.w[1] ^ k0, static_cast<uint32_t>(p1),
               static_cast<uint32_t>(p0 >> 32) ^ c.w[3] ^ k1, static_cast<uint32_t>(p0)}};
  }
  return c;
}

// U(0, 1] with 53 random bits for position `pos` of row `row`.
RECLMIS_HD double uniform(uint64_t seed, uint64_t row, uint64_t pos) {
  const Words counter{{static_cast<uint32_t>(pos), static_cast<uint32_t>(pos >> 32), static_cast<uint32_t>(row),
                       static_cast<uint32_t>(row >> 32)}};
  const Words r = philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint64_t bits53 = ((static_cast<uint64_t>(r.w[0]) << 32) | r.w[1]) >> 11;
  return static_cast<double>(bits53 + 1) * 0x1.0p-53;  // both steps exact
}

// -log(u) for u in (0, 1], within a few ulp. With u = m 2^e, m in [sqrt(1/2), sqrt(2)):
// log(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), s = (m - 1) / (m + 1), |s| < 0.1716, so twelve terms
// reach double precision. log(2) is split so that e * kLn2Hi is exact.
RECLMIS_HD double neg_log(double u) {
  constexpr double kSqrtHalf = 0.70710678118654752440;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  int e;
  double m = frexp(u, &e);  // exact, m in [1/2, 1)
  if (m < kSqrtHalf) {
    m *= 2.0;  // exact
    e -= 1;
  }
  const double s = div_rn(add_rn(m, -1.0), add_rn(m, 1.0));
  const double s2 = mul_rn(s, s);
  constexpr double kInvOdd[12] = {1.0,        1.0 / 3,  1.0 / 5,  1.0 / 7,  1.0 / 9,  1.0 / 11,
                                  1.0 / 13, 1.0 / 15, 1.0 / 17, 1.0 / 19, 1.0 / 21, 1.0 / 23};
  double series = kInvOdd[11];
  for (int n = 10; n >= 0; --n) {
    series = add_rn(kInvOdd[n], mul_rn(s2, series));
  }
  const double log_m = mul_rn(mul_rn(2.0, s), series);
  const double ed = static_cast<double>(e);
  return -add_rn(mul_rn(ed, kLn2Hi), add_rn(mul_rn(ed, kLn2Lo), log_m));
}

RECLMIS_HD bool weight_is_valid(double w) { return w >= 0.0 && w <= DBL_MAX; }  // false for NaN

// Sort key of a valid position from its weight w and exponential draw e: the k smallest (key, position)
// pairs of a row are its sample. Positive weights race with arrival time e / w (the IEEE bit pattern of a
// non-negative double orders like the value; e < 37, so e / w is finite for every weight above 2e-307,
// which covers all float32, float16 and bfloat16 values). Zero weights, and invalid ones (which the
// kernels flag), get the top bit set: they come after every positive weight, in the order of e.
RECLMIS_HD uint64_t sort_key(double w, double e) {
  if (w > 0.0 && weight_is_valid(w)) {
    return bits_of(div_rn(e, w));
  }
  return (uint64_t{1} << 63) | bits_of(e);
}

// k = max(1, floor(ratio * len)), 0 for an empty row; floor(ratio * len) in double as the official
// int(len * mask_rate). The kernels receive ratio in [0, 1], so k <= len.
RECLMIS_HD int64_t mask_count(int64_t len, double ratio) {
  if (len <= 0) {
    return 0;
  }
  const int64_t k = static_cast<int64_t>(floor(mul_rn(ratio, static_cast<double>(len))));
  return k < 1 ? 1 : (k > len ? len : k);
}

// The valid prefix length of a row, clamped to [0, tokens]; sets kBadLength in *status when out of range.
RECLMIS_HD int64_t clamp_length(int64_t len, int64_t tokens, uint8_t* status) {
  if (len < 0 || len > tokens) {
    *status |= kBadLength;
    return len < 0 ? 0 : tokens;
  }
  return len;
}

}  // namespace wm
}  // namespace reclmis
