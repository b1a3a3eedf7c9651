// The KV-cache decode handler (CONTRACT.md, jax_fa3_decode): checks the buffers, fills
// DecodeParams and runs the split kernel and the combine on XLA's stream. The caches are
// aliased operand -> result, so the append happens in place.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include <cuda_runtime_api.h>

#include "decode/params.h"
#include "ffi/attention_ffi.h"
#include "ffi/buffers.h"
#include "ffi/registry.h"

namespace jax_fa3 {
namespace {

namespace ffi = xla::ffi;

constexpr int64_t kMaxPositions = int64_t(1) << 30;  // a sequence's capacity; positions stay int32
constexpr int64_t kMaxCacheRows = (int64_t(1) << 31) - 1;  // num_pages * page_size: cache rows are int32
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;

bool same_dtype_and_shape(ffi::AnyBuffer const& a, ffi::AnyBuffer const& b) {
  auto x = a.dimensions(), y = b.dimensions();
  return a.element_type() == b.element_type() && x.size() == y.size() && std::equal(x.begin(), x.end(), y.begin());
}

// The smallest compiled head dim that holds `head_dim` (the kernel zero-pads the rest).
DecodeVariant const* decode_variant_for(std::string const& dtype, int64_t head_dim) {
  DecodeVariant const* best = nullptr;
  for (DecodeVariant const& v : decode_variants()) {
    if (v.dtype == dtype && v.head_dim >= head_dim && (!best || v.head_dim < best->head_dim)) { best = &v; }
  }
  return best;
}

ffi::Error DecodeImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                      ffi::AnyBuffer cache_seqlens, ffi::AnyBuffer k_new, ffi::AnyBuffer v_new,
                      ffi::AnyBuffer page_table, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                      ffi::Result<ffi::AnyBuffer> k_cache_out, ffi::Result<ffi::AnyBuffer> v_cache_out,
                      ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale, float softcap, int64_t window_left,
                      int64_t window_right, int64_t num_splits) {
  char const* const dtype = dtype_name(q.element_type());
  if (!dtype) { return invalid("decode: q must be bfloat16 or float16"); }
  if (q.dimensions().size() != 4 || k_cache.dimensions().size() != 4) {
    return invalid("decode: q and k_cache must be rank 4; got q " + shape_str(q) + ", k_cache " + shape_str(k_cache));
  }
  auto const qd = q.dimensions(), cd = k_cache.dimensions();
  int64_t const batch = qd[0], seqlen_q = qd[1], heads = qd[2], head_dim = qd[3];
  int64_t const kv_heads = cd[2];
  bool const paged = !absent(page_table);
  if (batch < 1 || seqlen_q < 1 || heads < 1 || kv_heads < 1 || cd[0] < 1 || cd[1] < 1) {
    return invalid("decode: empty q " + shape_str(q) + " or k_cache " + shape_str(k_cache));
  }
  if (cd[3] != head_dim || heads % kv_heads != 0 || seqlen_q > kMaxPositions) {
    return invalid("decode: k_cache " + shape_str(k_cache) + " must have q's head_dim and kv_heads dividing q's heads; q " +
                   shape_str(q));
  }
  if (head_dim % 8 != 0) { return invalid("decode: head_dim must be a multiple of 8"); }
  if (!same_dtype_and_shape(v_cache, k_cache) || k_cache.element_type() != q.element_type()) {
    return invalid("decode: k_cache and v_cache must have q's dtype and one shape; got " + shape_str(k_cache) + ", " +
                   shape_str(v_cache));
  }
  if (cache_seqlens.element_type() != ffi::DataType::S32 || !has_dims(cache_seqlens, {batch})) {
    return invalid("decode: cache_seqlens must be int32 [batch]; got " + shape_str(cache_seqlens));
  }
  int64_t num_pages = batch, page_size = cd[1], max_pages = 1;
  if (paged) {
    auto const pd = page_table.dimensions();
    if (page_table.element_type() != ffi::DataType::S32 || pd.size() != 2 || pd[0] != batch || pd[1] < 1) {
      return invalid("decode: page_table must be int32 [batch, max_pages]; got " + shape_str(page_table));
    }
    num_pages = cd[0];
    max_pages = pd[1];
  } else if (cd[0] != batch) {
    return invalid("decode: a contiguous k_cache must be [batch, max_seqlen, kv_heads, head_dim]; got " +
                   shape_str(k_cache));
  }
  if (max_pages * page_size > kMaxPositions || num_pages * page_size > kMaxCacheRows) {
    return invalid("decode: at most 2^30 positions per sequence and 2^31 - 1 cache rows; got k_cache " +
                   shape_str(k_cache) + ", page_table " + shape_str(page_table));
  }
  int64_t seqlen_new = 0;
  if (!absent(k_new) || !absent(v_new)) {
    seqlen_new = k_new.dimensions().size() == 4 ? k_new.dimensions()[1] : -1;
    if (!has_dims(k_new, {batch, seqlen_new, kv_heads, head_dim}) || !same_dtype_and_shape(v_new, k_new) ||
        k_new.element_type() != q.element_type() || seqlen_new > kMaxPositions) {
      return invalid("decode: k_new and v_new must be [batch, seqlen_new, kv_heads, head_dim] in q's dtype; got " +
                     shape_str(k_new) + ", " + shape_str(v_new));
    }
  }
  int64_t const group = heads / kv_heads;
  int64_t const m_blocks = (group * seqlen_q + kDecodeRows - 1) / kDecodeRows;
  // One grid axis holds every (batch, KV head, m-block) (decode/kernel.h); query rows are int32.
  if (batch * kv_heads * m_blocks > kMaxGridX || group * seqlen_q > kMaxGridX) {
    return invalid("decode: batch * kv_heads * ceil(heads / kv_heads * seqlen_q / 16) and heads / kv_heads * "
                   "seqlen_q must be < 2^31");
  }
  if (num_splits < 1 || num_splits > kDecodeMaxSplits) {
    return invalid("decode: num_splits must be in [1, " + std::to_string(kDecodeMaxSplits) + "]");
  }
  if (!(std::isfinite(softmax_scale) && softmax_scale > 0.f)) { return invalid("softmax_scale must be finite and > 0"); }
  if (!(std::isfinite(softcap) && softcap >= 0.f)) { return invalid("softcap must be finite and >= 0"); }
  if (window_left < -1 || window_right < -1) { return invalid("window sizes must be >= -1 (-1 = unbounded)"); }
  if (!has_dims(*out, {batch, seqlen_q, heads, head_dim}) || out->element_type() != q.element_type()) {
    return invalid("decode: out must be q's shape and dtype; got " + shape_str(*out));
  }
  if (!has_dims(*lse, {batch, heads, seqlen_q}) || lse->element_type() != ffi::DataType::F32) {
    return invalid("decode: lse must be float32 [batch, heads, seqlen_q]; got " + shape_str(*lse));
  }
  // The caches are updated in place: XLA must hand back the operands' own buffers
  // (input_output_aliases), or the untouched entries would be missing from the results.
  if (k_cache_out->untyped_data() != k_cache.untyped_data() || v_cache_out->untyped_data() != v_cache.untyped_data()) {
    return invalid("decode: the k_cache/v_cache results must alias their operands (input_output_aliases)");
  }
  int64_t const needed = decode_workspace_bytes(int(batch), int(kv_heads), int(m_blocks), int(num_splits), int(head_dim));
  if (workspace->element_type() != ffi::DataType::U8 || int64_t(workspace->size_bytes()) < needed) {
    return invalid("decode: workspace must be uint8 of at least " + std::to_string(needed) + " bytes");
  }
  for (void const* ptr : {q.untyped_data(), k_cache.untyped_data(), v_cache.untyped_data(), out->untyped_data(),
                          workspace->untyped_data(), seqlen_new ? k_new.untyped_data() : nullptr,
                          seqlen_new ? v_new.untyped_data() : nullptr}) {
    if (!aligned16(ptr)) { return invalid("decode: buffers must be 16-byte aligned"); }
  }
  DecodeVariant const* variant = decode_variant_for(dtype, head_dim);
  if (!variant) {
    return invalid(std::string("decode: no kernel for dtype ") + dtype + ", head_dim " + std::to_string(head_dim) +
                   " (see jax_fa3.kernels_available())");
  }

  DecodeParams p{};
  p.q = q.untyped_data();
  p.k_cache = k_cache_out->untyped_data();
  p.v_cache = v_cache_out->untyped_data();
  p.cache_seqlens = static_cast<int const*>(cache_seqlens.untyped_data());
  p.k_new = seqlen_new ? k_new.untyped_data() : nullptr;
  p.v_new = seqlen_new ? v_new.untyped_data() : nullptr;
  p.page_table = paged ? static_cast<int const*>(page_table.untyped_data()) : nullptr;
  p.out = out->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
  if (num_splits > 1) {
    auto* const base = static_cast<unsigned char*>(workspace->untyped_data());
    p.partial_out = reinterpret_cast<float*>(base);
    p.partial_lse = reinterpret_cast<float*>(
        base + decode_partial_out_bytes(int(batch), int(kv_heads), int(m_blocks), int(num_splits), int(head_dim)));
  }
  p.batch = int(batch);
  p.seqlen_q = int(seqlen_q);
  p.heads = int(heads);
  p.kv_heads = int(kv_heads);
  p.head_dim = int(head_dim);
  p.seqlen_new = int(seqlen_new);
  p.page_size = int(page_size);
  p.page_shift = -1;
  for (int shift = 0; shift < 31; ++shift) {
    if (page_size == (int64_t(1) << shift)) { p.page_shift = shift; }
  }
  p.num_pages = int(num_pages);
  p.max_pages = int(max_pages);
  p.capacity = max_pages * page_size;
  p.softmax_scale = softmax_scale;
  p.softcap = softcap;
  // A window wider than any sequence is the same as none.
  p.window_left = window_left < 0 ? -1 : int(std::min(window_left, kMaxPositions));
  p.window_right = window_right < 0 ? -1 : int(std::min(window_right, kMaxPositions));
  p.num_splits = int(num_splits);
  p.num_m_blocks = int(m_blocks);

  return poison_and_launch("decode", stream, {&out, &lse}, [&] { return variant->run(p, stream); });
}

}  // namespace
}  // namespace jax_fa3

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFa3Decode, jax_fa3::DecodeImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q
                                  .Arg<xla::ffi::AnyBuffer>()  // k_cache
                                  .Arg<xla::ffi::AnyBuffer>()  // v_cache
                                  .Arg<xla::ffi::AnyBuffer>()  // cache_seqlens
                                  .Arg<xla::ffi::AnyBuffer>()  // k_new
                                  .Arg<xla::ffi::AnyBuffer>()  // v_new
                                  .Arg<xla::ffi::AnyBuffer>()  // page_table
                                  .Ret<xla::ffi::AnyBuffer>()  // out
                                  .Ret<xla::ffi::AnyBuffer>()  // lse
                                  .Ret<xla::ffi::AnyBuffer>()  // k_cache (aliased)
                                  .Ret<xla::ffi::AnyBuffer>()  // v_cache (aliased)
                                  .Ret<xla::ffi::AnyBuffer>()  // workspace
                                  .Attr<float>("softmax_scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right")
                                  .Attr<int64_t>("num_splits"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
