// Shared-memory atoms for WGMMA operands and register views of WGMMA accumulators.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_conversion.h>

namespace jax_fa3 {

using namespace cute;

// The widest swizzle atom that tiles an (mn, k) WGMMA operand with the given major mode.
template <GMMA::Major kMajor, class Element, int kMN, int kK>
constexpr auto gmma_smem_atom() {
  if constexpr (kMajor == GMMA::Major::K) {
    if constexpr (kK % size<1>(GMMA::Layout_K_SW128_Atom<Element>{}) == 0) {
      return GMMA::Layout_K_SW128_Atom<Element>{};
    } else if constexpr (kK % size<1>(GMMA::Layout_K_SW64_Atom<Element>{}) == 0) {
      return GMMA::Layout_K_SW64_Atom<Element>{};
    } else {
      static_assert(kK % size<1>(GMMA::Layout_K_SW32_Atom<Element>{}) == 0, "head dim must be a multiple of 16");
      return GMMA::Layout_K_SW32_Atom<Element>{};
    }
  } else {
    if constexpr (kMN % size<0>(GMMA::Layout_MN_SW128_Atom<Element>{}) == 0) {
      return GMMA::Layout_MN_SW128_Atom<Element>{};
    } else if constexpr (kMN % size<0>(GMMA::Layout_MN_SW64_Atom<Element>{}) == 0) {
      return GMMA::Layout_MN_SW64_Atom<Element>{};
    } else {
      static_assert(kMN % size<0>(GMMA::Layout_MN_SW32_Atom<Element>{}) == 0, "head dim must be a multiple of 16");
      return GMMA::Layout_MN_SW32_Atom<Element>{};
    }
  }
}

// A WGMMA accumulator ((2, 2, N/8), MMA_M, MMA_N) seen as (rows, columns). Within a 64-row
// atom a thread owns rows r and r+8 and, in every group of 8 columns, two adjacent columns;
// the four threads of a quad share the rows.
template <class AccLayout>
CUTE_HOST_DEVICE constexpr auto acc_rows_cols(AccLayout acc) {
  static_assert(decltype(rank(acc))::value == 3);
  static_assert(decltype(size<0, 0>(acc))::value == 2 && decltype(size<0, 1>(acc))::value == 2);
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                     make_layout(get<0, 0>(acc), get<0, 2>(acc), get<2>(acc)));
}

// The same registers, once converted to 16 bits, as the A operand of a register-sourced
// WGMMA: one k-block of 16 columns is two consecutive 8-column groups of the accumulator.
template <class AccLayout>
CUTE_HOST_DEVICE constexpr auto acc_as_operand_a(AccLayout acc) {
  auto split = logical_divide(get<0>(acc), Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, N/16))
  return make_layout(make_layout(get<0>(split), get<1>(split), get<2, 0>(split)),
                     get<1>(acc),
                     coalesce(make_layout(get<2, 1>(split), get<2>(acc))));
}

// FP8: the registers of P as the A operand of a register-sourced FP8 WGMMA (k-blocks of 32):
// per k-block, 16 values ((4 keys, 2 row halves, 2 key halves), 1, N/32), compact.
template <int kBlockN>
CUTE_HOST_DEVICE constexpr auto fp8_operand_a_layout() {
  static_assert(kBlockN % 32 == 0, "FP8 P·V needs key tiles of a multiple of 32");
  return make_layout(Shape<Shape<_4, _2, _2>, _1, Int<kBlockN / 32>>{});
}

// Rounds the float32 probabilities (an accumulator ((2, 2, N/8), 1, 1)) to e4m3 in the FP8
// A-operand registers without moving data between threads. The accumulator gives a thread,
// in each 8-key group, keys 2t and 2t+1 (t = its lane in the quad); the A operand wants keys
// 4t..4t+3 of each 16. Both are read as the same 4 registers of a row, so A's key 4t+i is
// taken to be key 2t + (i & 1) + 8 (i >> 1) of the accumulator, and V^T's keys are stored in
// that order (fwd/transpose_v.h); the sum over keys is unchanged.
template <class AccEngine, class AccLayout, class OpEngine, class OpLayout>
CUTE_DEVICE void convert_to_fp8_operand_a(Tensor<AccEngine, AccLayout> const& acc, Tensor<OpEngine, OpLayout>& op) {
  using To = typename OpEngine::value_type;
  static_assert(sizeof(To) == 1);
  constexpr int kBlocks = decltype(size<2>(op))::value;
  static_assert(decltype(size(acc))::value == 16 * kBlocks);
  uint32_t* words = reinterpret_cast<uint32_t*>(raw_pointer_cast(op.data()));
  cutlass::NumericArrayConverter<To, float, 4> convert;
  CUTLASS_PRAGMA_UNROLL
  for (int block = 0; block < kBlocks; ++block) {
    CUTLASS_PRAGMA_UNROLL
    for (int key_half = 0; key_half < 2; ++key_half) {
      CUTLASS_PRAGMA_UNROLL
      for (int row_half = 0; row_half < 2; ++row_half) {
        // Accumulator index: column parity + 2 * row half + 4 * 8-key group.
        int const group = 4 * block + 2 * key_half;
        cutlass::Array<float, 4> const four{acc(2 * row_half + 4 * group), acc(1 + 2 * row_half + 4 * group),
                                            acc(2 * row_half + 4 * (group + 1)),
                                            acc(1 + 2 * row_half + 4 * (group + 1))};
        cutlass::Array<To, 4> const packed = convert(four);
        words[4 * block + 2 * key_half + row_half] = reinterpret_cast<uint32_t const&>(packed);
      }
    }
  }
}

// Element-wise numeric conversion of a register fragment into another of equal size.
template <class SrcEngine, class SrcLayout, class DstEngine, class DstLayout>
CUTE_DEVICE void convert_into(Tensor<SrcEngine, SrcLayout> const& src, Tensor<DstEngine, DstLayout>& dst) {
  using From = typename SrcEngine::value_type;
  using To = typename DstEngine::value_type;
  constexpr int kSize = decltype(size(src))::value;
  static_assert(decltype(size(dst))::value == kSize);
  cutlass::NumericArrayConverter<To, From, kSize> convert;
  *reinterpret_cast<cutlass::Array<To, kSize>*>(raw_pointer_cast(dst.data())) =
      convert(*reinterpret_cast<cutlass::Array<From, kSize> const*>(raw_pointer_cast(src.data())));
}

template <class To, class Engine, class Layout>
CUTE_DEVICE auto convert_fragment(Tensor<Engine, Layout> const& src) {
  Tensor dst = make_tensor<To>(src.layout());
  convert_into(src, dst);
  return dst;
}

// Two adjacent values of an accumulator row as one 32-bit word of 16-bit elements, for a
// single 4-byte store. (Built as two converted halves, ptxas stored them as two 16-bit
// stores plus one.)
template <class Element>
CUTE_DEVICE uint32_t pack_pair(float a, float b) {
  cutlass::Array<Element, 2> const pair = cutlass::NumericArrayConverter<Element, float, 2>{}(cutlass::Array<float, 2>{a, b});
  return reinterpret_cast<uint32_t const&>(pair);
}

}  // namespace jax_fa3
