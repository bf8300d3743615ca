// Vector types and loads for one instruction set. Included by kernels.inl inside the target's
// namespace (msda::cpu::<target>), with MSDA_VEC_BYTES set by the target's translation unit, so
// every function here is compiled once per target and never shared between them (Highway's
// rule: per-target code lives in a per-target namespace).
#if !defined(MSDA_VEC_BYTES)
#error "simd.h is included from a target translation unit that defines MSDA_VEC_BYTES"
#endif

#if defined(__x86_64__) || defined(__i386__)
#define MSDA_X86 1
#include <immintrin.h>
#endif
// The Arm targets include <arm_neon.h> or <arm_sve.h> themselves, before their namespace opens:
// those headers declare their types and functions in the global namespace.
#if defined(MSDA_TARGET_SVE)
// This build's SVE registers as fixed-size types (CMakeLists.txt fixes the vector length), which
// convert to and from the GCC vector types below.
static_assert(__ARM_FEATURE_SVE_BITS == 8 * MSDA_VEC_BYTES, "sve targets are built with -msve-vector-bits");
typedef svfloat32_t SveF32 __attribute__((arm_sve_vector_bits(__ARM_FEATURE_SVE_BITS)));
typedef svuint32_t SveU32 __attribute__((arm_sve_vector_bits(__ARM_FEATURE_SVE_BITS)));
#endif

template <class C>
struct VecOf {
  typedef C type __attribute__((vector_size(MSDA_VEC_BYTES)));
};
template <class C>
using Vec = typename VecOf<C>::type;
template <class C>
inline constexpr int kLanes = MSDA_VEC_BYTES / static_cast<int>(sizeof(C));

template <class V>
using Compute = typename Storage<V>::Compute;

// kLanes<Compute<V>> elements of V from p, widened to their compute type.
template <class V>
MSDA_INLINE Vec<Compute<V>> load(const V* p) {
  using C = Compute<V>;
  Vec<C> v;
  if constexpr (std::is_same_v<V, C>) {
    __builtin_memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same_v<V, bf16>) {
    // bf16 is the top half of an f32: widen and shift. GCC lowers the generic form for Arm
    // through lane inserts or the stack, hence one instruction (NEON: shll) or two (SVE: ld1h
    // into 32-bit lanes, lsl) spelled out.
#if defined(MSDA_TARGET_SVE)
    const svbool_t all = svwhilelt_b32(0, kLanes<C>);
    const SveU32 wide = svlsl_n_u32_x(all, svld1uh_u32(all, reinterpret_cast<const std::uint16_t*>(p)), 16);
    __builtin_memcpy(&v, &wide, sizeof(v));
#elif defined(MSDA_TARGET_NEON)
    const uint32x4_t wide = vshll_n_u16(vld1_u16(reinterpret_cast<const std::uint16_t*>(p)), 16);
    __builtin_memcpy(&v, &wide, sizeof(v));
#elif defined(MSDA_X86) && MSDA_VEC_BYTES == 64
    // x86 spelled out too: GCC 12 widens the generic form in 128-bit pieces (two loads, two
    // vpmovzxwd, an extract and an insert per vector), which made a bf16 forward's taps twice
    // an f32 one's; one vpmovzxwd from memory and a shift. (The masked forms: GCC 12 warns of
    // the unmasked ones' undefined destinations.)
    const __m512i narrow = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i wide = _mm512_maskz_slli_epi32(0xFFFF, narrow, 16);
    __builtin_memcpy(&v, &wide, sizeof(v));
#elif defined(MSDA_X86) && MSDA_VEC_BYTES == 32
    const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
    __builtin_memcpy(&v, &wide, sizeof(v));
#else
    typedef std::uint16_t Narrow __attribute__((vector_size(MSDA_VEC_BYTES / 2)));
    typedef std::uint32_t Wide __attribute__((vector_size(MSDA_VEC_BYTES)));
    Narrow bits;
    __builtin_memcpy(&bits, p, sizeof(bits));
    const Wide wide = __builtin_convertvector(bits, Wide) << 16;
    __builtin_memcpy(&v, &wide, sizeof(v));
#endif
  } else {
#if defined(__F16C__) && MSDA_VEC_BYTES == 64
    const __m512 x = _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    __builtin_memcpy(&v, &x, sizeof(v));
#elif defined(__F16C__) && MSDA_VEC_BYTES == 32
    const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    __builtin_memcpy(&v, &x, sizeof(v));
#elif defined(MSDA_TARGET_SVE)
    // Each half into the low half of a 32-bit lane, where fcvt .s, .h reads it. Exact, like the
    // NEON form: every f16 (subnormals, inf, NaN) is an f32.
    const svbool_t all = svwhilelt_b32(0, kLanes<C>);
    const SveF32 x = svcvt_f32_f16_x(all, svreinterpret_f16_u32(svld1uh_u32(all, reinterpret_cast<const std::uint16_t*>(p))));
    __builtin_memcpy(&v, &x, sizeof(v));
#elif defined(MSDA_TARGET_NEON)
    const float32x4_t x = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const std::uint16_t*>(p))));
    __builtin_memcpy(&v, &x, sizeof(v));
#else
    for (int i = 0; i < kLanes<C>; ++i) v[i] = f16_to_float(p[i]);
#endif
  }
  return v;
}

template <class C>
MSDA_INLINE Vec<C> load_compute(const C* p) {
  Vec<C> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <class C>
MSDA_INLINE void store_compute(C* p, Vec<C> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// kLanes<Compute<V>> elements to p, rounded to V as Storage<V>::store rounds each (the same bits:
// round to nearest even; a NaN stays a quiet NaN with its payload's top bits). Vector code where
// the target has it: the scalar conversions were a store's whole cost in the half types (f16 on
// an x86 core: a branchy software rounding per element, 9 ms of ddetr-dec's 11 ms backward).
template <class V>
MSDA_INLINE void store(V* p, Vec<Compute<V>> v) {
  using C = Compute<V>;
  if constexpr (std::is_same_v<V, C>) {
    __builtin_memcpy(p, &v, sizeof(v));
  } else if constexpr (std::is_same_v<V, f16>) {
#if defined(__F16C__) && MSDA_VEC_BYTES == 64
    __m512 x;
    __builtin_memcpy(&x, &v, sizeof(x));
    // The masked form: GCC 12 warns of the unmasked one's undefined destination.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtps_ph(0xFFFF, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__) && MSDA_VEC_BYTES == 32
    __m256 x;
    __builtin_memcpy(&x, &v, sizeof(x));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    for (int i = 0; i < kLanes<C>; ++i) p[i] = Storage<V>::store(v[i]);
#endif
  } else {
#if defined(MSDA_X86)
    // float_to_bf16 lane-wise: round the top half to nearest even, a NaN quieted instead.
    typedef std::uint32_t Wide __attribute__((vector_size(MSDA_VEC_BYTES)));
    typedef std::uint16_t Narrow __attribute__((vector_size(MSDA_VEC_BYTES / 2)));
    Wide x;
    __builtin_memcpy(&x, &v, sizeof(x));
    const auto nan = (x & 0x7FFFFFFFu) > 0x7F800000u;
    const Wide bits = nan ? (x >> 16) | 0x40u : (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
    const Narrow narrow = __builtin_convertvector(bits, Narrow);
    __builtin_memcpy(static_cast<void*>(p), &narrow, sizeof(narrow));
#else
    for (int i = 0; i < kLanes<C>; ++i) p[i] = Storage<V>::store(v[i]);
#endif
  }
}

// dst[0:count] = src[0:count] rounded to V: whole vectors through store(), then one at a time.
template <class V>
MSDA_INLINE void store_elements(V* dst, const Compute<V>* src, std::int64_t count) {
  using C = Compute<V>;
  std::int64_t i = 0;
  for (; i + kLanes<C> <= count; i += kLanes<C>) store(dst + i, load_compute(src + i));
  for (; i < count; ++i) dst[i] = Storage<V>::store(src[i]);
}

// floor() of every lane.
// (The loop is one instruction on Arm: frintm, on NEON and SVE registers alike.)
MSDA_INLINE Vec<double> floor_lanes(Vec<double> x) {
#if defined(MSDA_X86) && MSDA_VEC_BYTES == 64
  return (Vec<double>)_mm512_maskz_roundscale_pd(0xFF, (__m512d)x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#elif defined(MSDA_X86) && MSDA_VEC_BYTES == 32
  return (Vec<double>)_mm256_floor_pd((__m256d)x);
#else
  for (int i = 0; i < kLanes<double>; ++i) x[i] = __builtin_floor(x[i]);
  return x;
#endif
}

// The lanes of x, whole numbers below 2^51 in magnitude, as 64-bit integers (exactly what
// __builtin_convertvector gives for them). x86 has a vector conversion from double to 64-bit
// integer only from AVX-512DQ on; before it GCC converted lane by lane, ~16 instructions a
// vector, a fifth of the samples' geometry (AMD Zen 3, AVX2, callgrind). Added to 1.5 * 2^52, a
// whole number that small is exact in the sum's low mantissa bits (the sum lies in [2^52, 2^53),
// whose unit in the last place is 1), so the sum's bits less the constant's are x. A contracted
// multiply-add in x's making changes nothing: every step is exact on whole numbers this small.
MSDA_INLINE Vec<std::int64_t> whole_lanes_to_int(Vec<double> x) {
#if defined(MSDA_X86) && !defined(__AVX512DQ__)
  const Vec<double> shift = Vec<double>{} + 6755399441055744.0;  // 2^52 + 2^51
  return reinterpret_cast<Vec<std::int64_t>>(x + shift) - reinterpret_cast<Vec<std::int64_t>>(shift);
#else
  return __builtin_convertvector(x, Vec<std::int64_t>);
#endif
}

// v as computed, kept from being fused with what follows (FMA contraction): a product that
// goes through here is rounded before a following addition, as the reference backend rounds it.
// The empty asm claims to change the register, so the compiler cannot see the product through
// it (GCC's __builtin_assoc_barrier only promises to stop reassociation); without FMA there is
// nothing to prevent.
template <class T>
MSDA_INLINE T rounded(T v) {
#if defined(MSDA_X86) && defined(__FMA__)
  asm("" : "+v"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
  return v;
}

// v, hidden from the compiler as rounded() hides it: a loop that copies vectors through here is
// not recognised as a copy and turned into a call of memmove (a call per query's few dozen bytes).
template <class T>
MSDA_INLINE T opaque(T v) {
  return rounded(v);
}

// The kLanes<double> floats at src, as doubles. One conversion on x86: GCC 12 converts a vector
// of four floats to doubles in two halves, through the stack.
MSDA_INLINE Vec<double> load_floats_as_doubles(const float* src) {
#if defined(MSDA_X86) && MSDA_VEC_BYTES == 32
  return (Vec<double>)_mm256_cvtps_pd(_mm_loadu_ps(src));
#elif defined(MSDA_X86) && MSDA_VEC_BYTES == 64
  return (Vec<double>)_mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(src));  // maskz: GCC 12 warns of _mm512_cvtps_pd's undefined source
#else
  typedef float Half __attribute__((vector_size(sizeof(Vec<double>) / 2)));
  Half v;
  __builtin_memcpy(&v, src, sizeof(v));
  return __builtin_convertvector(v, Vec<double>);
#endif
}

// e^x of every lane, for x <= 0, -inf or NaN (the max-subtracted logits of a softmax): within
// 2 ulp of exp(), pure arithmetic, so the same bits on every call (no libm, whose results may
// change with the library version). Results below 2^-1022 (x < -708) become 0: a softmax weight
// that small is 0 against the row's largest, which is 1. NaN stays NaN.
MSDA_INLINE Vec<double> exp_lanes(Vec<double> x) {
  using VD = Vec<double>;
  using VI = Vec<std::int64_t>;
  const VD zero{};
  // x = k ln2 + r, |r| <= ln2 / 2, with ln2 split in two so that k ln2 is exact to 2^-60.
  const VD clamped = x < -746.0 ? zero - 746.0 : x;  // -inf too; NaN fails the compare and stays
  const VD k = floor_lanes(clamped * 1.4426950408889634 + 0.5);
  const VD r = (clamped - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  // Taylor series of e^r to r^13 (13! > 6e9: the last term is below 2^-53 for |r| <= 0.35).
  VD poly = zero + 1.0 / 6227020800.0;
  const double inverse_factorials[] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                                       1.0 / 40320.0,     1.0 / 5040.0,     1.0 / 720.0,     1.0 / 120.0,
                                       1.0 / 24.0,        1.0 / 6.0,        0.5,             1.0,
                                       1.0};
  for (double c : inverse_factorials) poly = poly * r + c;
  // 2^k through the exponent bits: -1022 <= k <= 0 here keeps them a normal number (the select
  // also keeps a NaN k from an integer conversion).
  const auto normal = k >= -1022.0;
  const VI bits = (__builtin_convertvector(normal ? k : zero, VI) + 1023) << 52;
  VD scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  const VD result = normal ? poly * scale : zero;
  return x == x ? result : x;
}

// x in every lane, as one broadcast (from memory where x is loaded). x - 0 is x for every x, -0
// and NaN included, so the compiler drops the subtraction; it must keep the addition of
// `Vec<C>{} + x` (0 + -0 is +0): one more dependent operation between every tap weight's load and
// its multiply-add.
template <class C>
MSDA_INLINE Vec<C> broadcast(C x) {
  return x - Vec<C>{};
}

// ---- horizontal sums ----
// Lane permutations are built at compile time from index functions, so each becomes a single
// shuffle instruction (vshuff32x4, vpermt2ps, ...) on every target.
template <class C>
using LaneIndex = std::conditional_t<sizeof(C) == 4, std::int32_t, std::int64_t>;
template <class C>
using Mask = Vec<LaneIndex<C>>;

template <class C, class F, int... I>
constexpr Mask<C> make_mask(F f, std::integer_sequence<int, I...>) {
  return Mask<C>{static_cast<LaneIndex<C>>(f(I))...};
}

// x and y as elements of E lanes in blocks of B lanes: each block of the result holds the sums of
// x's adjacent pairs of elements in that block, then y's. With B the lanes of 128 bits and E = 1
// each source is one in-lane shuffle (vshufps, vunpcklpd: a horizontal add); with B the whole
// vector and E the lanes of 128 bits, one shuffle of 128-bit lanes (vperm2f128, vshuff32x4); with
// B the whole vector and E = 1, SVE's uzp1 and uzp2. With B the whole vector and E = G / 2 it folds
// groups of G lanes to half their width (collapse, reduce4): those cross 128-bit lanes first,
// which x86 does in two instructions, or a vpermd with its index vector, per source.
template <class C, int E, int B>
MSDA_INLINE Vec<C> pair_sums(Vec<C> x, Vec<C> y) {
  constexpr int L = kLanes<C>;
  constexpr auto source = [](int i, int second) {
    const int block = i / B, j = i % B, half = B / 2;
    return j / half * L + block * B + (2 * ((j % half) / E) + second) * E + j % E;
  };
  constexpr Mask<C> first = make_mask<C>([source](int i) { return source(i, 0); }, std::make_integer_sequence<int, L>{});
  constexpr Mask<C> second = make_mask<C>([source](int i) { return source(i, 1); }, std::make_integer_sequence<int, L>{});
  return __builtin_shuffle(x, y, first) + __builtin_shuffle(x, y, second);
}

// Groups of G lanes folded down to their sums (in the first lanes, in order).
template <class C, int G>
MSDA_INLINE Vec<C> collapse(Vec<C> z) {
  if constexpr (G == 1) {
    return z;
  } else {
    return collapse<C, G / 2>(pair_sums<C, G / 2, kLanes<C>>(z, z));
  }
}

// out = {sum(a), sum(b), sum(c), sum(d)}, in a fixed order (the same bits on every call).
template <class C>
MSDA_INLINE void reduce4(Vec<C> a, Vec<C> b, Vec<C> c, Vec<C> d, C* out) {
  constexpr int L = kLanes<C>;
  const Vec<C> x = pair_sums<C, L / 2, L>(a, b), y = pair_sums<C, L / 2, L>(c, d);
  if constexpr (L == 2) {
    out[0] = x[0];
    out[1] = x[1];
    out[2] = y[0];
    out[3] = y[1];
  } else {
    const Vec<C> z = collapse<C, L / 4>(pair_sums<C, L / 4, L>(x, y));
    for (int i = 0; i < 4; ++i) out[i] = z[i];
  }
}

// x, with NaN (in any lane) replaced by the one canonical quiet NaN. Where two NaNs meet (an
// inf - inf beside a NaN of the input, say), which one an operation returns, and so its sign,
// follows the operand order the compiler chose for that compiled copy of the code, and a kernel's
// loop may be compiled more than once (the fuzzer found the backward's one- and two-pass plans,
// so 1 and 3 threads, giving NaN gradients of opposite signs). Results stored through here have
// the same bits from every copy. T: C or a vector of C.
template <class C, class T>
MSDA_INLINE T canonical_nan(T x) {
  const T nan = T{} + static_cast<C>(__builtin_nan(""));
  return x == x ? x : nan;
}

// reduce_lanes' levels: N vectors left (pairs summed into v[0, N / 2)); the first log2(P) levels
// add adjacent lanes within blocks of P lanes (128 bits on x86), the rest add blocks across them.
template <class C, int N, int P>
MSDA_INLINE void reduce_levels(Vec<C>* v) {
  if constexpr (N > 1) {
    constexpr int L = kLanes<C>;
#pragma GCC unroll 32
    for (int i = 0; i < N / 2; ++i) {
      if constexpr (N > L / P)
        v[i] = pair_sums<C, 1, P>(v[2 * i], v[2 * i + 1]);
      else
        v[i] = pair_sums<C, P, L>(v[2 * i], v[2 * i + 1]);
    }
    reduce_levels<C, N / 2, P>(v);
  }
}

// Lane i of the result = sum(v[i]), for kLanes<C> vectors v (overwritten), in a fixed order (the
// same bits on every call): log2(kLanes) levels of pair sums of pairs of vectors (adjacent lanes,
// then adjacent 128-bit blocks); kLanes - 1 of them for kLanes sums, where reduce4 takes 4 for 4.
// SVE has no 128-bit lanes in its permutes: there every level pairs adjacent lanes of the whole
// vector (uzp1, uzp2).
template <class C>
MSDA_INLINE Vec<C> reduce_lanes(Vec<C>* v) {
#if defined(MSDA_TARGET_SVE)
  constexpr int L = kLanes<C>, P = L;
#else
  constexpr int L = kLanes<C>, P = 16 / static_cast<int>(sizeof(C)) < L ? 16 / static_cast<int>(sizeof(C)) : L;
#endif
  reduce_levels<C, L, P>(v);
  return v[0];
}

template <class C>
MSDA_INLINE C reduce_add(Vec<C> v) {
  // Pairwise halving: a fixed order, so the sum is the same bits on every call.
  C lanes[kLanes<C>];
  __builtin_memcpy(lanes, &v, sizeof(v));
  for (int width = kLanes<C> / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return lanes[0];
}
