// The packed-sequence descriptor handlers: check the int32 buffers, fill the plans' params
// and launch on XLA's stream. Every leading dimension of the ids (or rows) counts as the
// batch, so a vmap that broadcasts them needs nothing more.
#include "ffi/plans_ffi.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "ffi/buffers.h"
#include "plans/params.h"

namespace jax_fa3 {
namespace {

namespace ffi = xla::ffi;

constexpr int64_t kMaxPositions = int64_t(1) << 30;  // positions and plan entries stay int32
constexpr int64_t kMaxRows = (int64_t(1) << 31) - 1;  // CTAs of a grid's x

// The product of all but the last `trailing` dimensions.
int64_t leading(ffi::AnyBuffer const& b, size_t trailing) {
  int64_t n = 1;
  auto const d = b.dimensions();
  for (size_t i = 0; i + trailing < d.size(); ++i) { n *= d[i]; }
  return n;
}

bool int32_rank_at_least(ffi::AnyBuffer const& b, size_t rank) {
  return b.element_type() == ffi::DataType::S32 && b.dimensions().size() >= rank;
}

ffi::Error check_workspace(char const* what, ffi::AnyBuffer const& workspace, int64_t ints) {
  if (workspace.element_type() != ffi::DataType::U8 || int64_t(workspace.size_bytes()) < 4 * ints) {
    return invalid(std::string(what) + ": workspace must be uint8 of at least " + std::to_string(4 * ints) +
                   " bytes; got " + shape_str(workspace));
  }
  return ffi::Error::Success();
}

// q rows as [batch, seqlen_q, 4] int32 (any leading dimensions as the batch).
ffi::Error check_q_rows(char const* what, ffi::AnyBuffer const& q_rows, int64_t& batch, int64_t& seqlen_q) {
  auto const d = q_rows.dimensions();
  if (!int32_rank_at_least(q_rows, 2) || d.back() != 4) {
    return invalid(std::string(what) + ": q_rows must be int32 [..., seqlen_q, 4]; got " + shape_str(q_rows));
  }
  batch = leading(q_rows, 2);
  seqlen_q = d[d.size() - 2];
  if (seqlen_q > kMaxPositions || batch > kMaxRows) {
    return invalid(std::string(what) + ": q_rows " + shape_str(q_rows) + " is too large");
  }
  return ffi::Error::Success();
}

ffi::Error check_tile(char const* what, int64_t block_m, int64_t block_n) {
  if (block_m <= 0 || block_n <= 0 || block_m > 1024 || block_n > 1024) {
    return invalid(std::string(what) + ": block_m and block_n must be in [1, 1024]");
  }
  return ffi::Error::Success();
}

ffi::Error SegmentRowsImpl(cudaStream_t stream, ffi::AnyBuffer q_ids, ffi::AnyBuffer kv_ids, ffi::AnyBuffer q_offsets,
                           ffi::AnyBuffer kv_offsets, ffi::Result<ffi::AnyBuffer> q_rows,
                           ffi::Result<ffi::AnyBuffer> kv_rows, ffi::Result<ffi::AnyBuffer> workspace,
                           int64_t window_left, int64_t window_right) {
  if (!int32_rank_at_least(q_ids, 1) || !int32_rank_at_least(kv_ids, 1)) {
    return invalid("segment_rows: q_ids and kv_ids must be int32 [..., seqlen]; got " + shape_str(q_ids) + " and " +
                   shape_str(kv_ids));
  }
  int64_t const batch = leading(q_ids, 1);
  int64_t const seqlen_q = q_ids.dimensions().back(), seqlen_k = kv_ids.dimensions().back();
  if (leading(kv_ids, 1) != batch || q_ids.dimensions().size() != kv_ids.dimensions().size()) {
    return invalid("segment_rows: q_ids " + shape_str(q_ids) + " and kv_ids " + shape_str(kv_ids) +
                   " must have the same leading dimensions");
  }
  if (q_offsets.element_type() != ffi::DataType::S32 || q_offsets.element_count() != q_ids.element_count() ||
      kv_offsets.element_type() != ffi::DataType::S32 || kv_offsets.element_count() != kv_ids.element_count()) {
    return invalid("segment_rows: q_offsets and kv_offsets must be int32 of q_ids' and kv_ids' shapes");
  }
  if (seqlen_q > kMaxPositions || seqlen_k > kMaxPositions || batch > kMaxRows) {
    return invalid("segment_rows: q_ids " + shape_str(q_ids) + " or kv_ids " + shape_str(kv_ids) + " is too large");
  }
  if (q_rows->element_count() != 4 * q_ids.element_count() || kv_rows->element_count() != 4 * kv_ids.element_count()) {
    return invalid("segment_rows: q_rows and kv_rows must be int32 [..., seqlen, 4]");
  }
  if (window_left < -1 || window_right < -1) { return invalid("segment_rows: windows must be -1 or >= 0"); }
  int64_t const widest = seqlen_q + seqlen_k;  // a wider window is none (segments.rows)
  RowsParams p{};
  p.q_ids = static_cast<int const*>(q_ids.untyped_data());
  p.kv_ids = static_cast<int const*>(kv_ids.untyped_data());
  p.q_offsets = static_cast<int const*>(q_offsets.untyped_data());
  p.kv_offsets = static_cast<int const*>(kv_offsets.untyped_data());
  p.q_rows = static_cast<int4*>(q_rows->untyped_data());
  p.kv_rows = static_cast<int4*>(kv_rows->untyped_data());
  p.table = static_cast<int*>(workspace->untyped_data());
  p.batch = int(batch);
  p.seqlen_q = int(seqlen_q);
  p.seqlen_k = int(seqlen_k);
  p.window_left = int(window_left < 0 ? -1 : std::min(window_left, widest));
  p.window_right = int(window_right < 0 ? -1 : std::min(window_right, widest));
  p.q_table_log2 = rows_table_log2(seqlen_k);
  p.kv_table_log2 = rows_table_log2(seqlen_q);
  if (ffi::Error e = check_workspace("segment_rows", *workspace, rows_workspace_ints(batch, seqlen_q, seqlen_k));
      e.failure()) {
    return e;
  }
  return poison_and_launch("segment_rows", stream, {&q_rows, &kv_rows}, [&] { return run_segment_rows(p, stream); });
}

ffi::Error ForwardTilesImpl(cudaStream_t stream, ffi::AnyBuffer q_rows, ffi::Result<ffi::AnyBuffer> plan,
                            ffi::Result<ffi::AnyBuffer> workspace, int64_t block_m, int64_t block_n) {
  int64_t batch, seqlen_q;
  if (ffi::Error e = check_q_rows("forward_tiles", q_rows, batch, seqlen_q); e.failure()) { return e; }
  if (ffi::Error e = check_tile("forward_tiles", block_m, block_n); e.failure()) { return e; }
  int64_t const capacity = forward_tile_capacity(seqlen_q, int(block_m));
  if (plan->element_type() != ffi::DataType::S32 || !has_dims(*plan, {1 + batch * capacity, 8})) {
    return invalid("forward_tiles: plan must be int32 [1 + batch * " + std::to_string(capacity) + ", 8]; got " +
                   shape_str(*plan));
  }
  if (ffi::Error e = check_workspace("forward_tiles", *workspace, tiles_workspace_ints(batch, seqlen_q, int(block_m)));
      e.failure()) {
    return e;
  }
  TilesParams p{};
  p.q_rows = static_cast<int4 const*>(q_rows.untyped_data());
  p.plan = static_cast<int*>(plan->untyped_data());
  p.workspace = static_cast<int*>(workspace->untyped_data());
  p.batch = int(batch);
  p.seqlen_q = int(seqlen_q);
  p.block_m = int(block_m);
  p.block_n = int(block_n);
  p.capacity = int(capacity);
  p.row_ints = tiles_workspace_row_ints(seqlen_q, int(block_m));
  return poison_and_launch("forward_tiles", stream, {&plan}, [&] { return run_forward_tiles(p, stream); });
}

ffi::Error BackwardPlansImpl(cudaStream_t stream, ffi::AnyBuffer q_rows, ffi::Result<ffi::AnyBuffer> query_tiles,
                             ffi::Result<ffi::AnyBuffer> key_blocks, ffi::Result<ffi::AnyBuffer> workspace,
                             int64_t block_m, int64_t block_n) {
  int64_t batch, seqlen_q;
  if (ffi::Error e = check_q_rows("backward_plans", q_rows, batch, seqlen_q); e.failure()) { return e; }
  if (ffi::Error e = check_tile("backward_plans", block_m, block_n); e.failure()) { return e; }
  int64_t const tiles = (seqlen_q + block_m - 1) / block_m;
  auto const kd = key_blocks->dimensions();
  if (query_tiles->element_type() != ffi::DataType::S32 || !has_dims(*query_tiles, {batch, tiles, 4})) {
    return invalid("backward_plans: query_tiles must be int32 [batch, " + std::to_string(tiles) + ", 4]; got " +
                   shape_str(*query_tiles));
  }
  if (key_blocks->element_type() != ffi::DataType::S32 || kd.size() != 3 || kd[0] != batch || kd[2] != 2 ||
      kd[1] > kMaxPositions) {
    return invalid("backward_plans: key_blocks must be int32 [batch, key blocks, 2]; got " + shape_str(*key_blocks));
  }
  if (ffi::Error e =
          check_workspace("backward_plans", *workspace, backward_plans_workspace_ints(batch, seqlen_q, int(block_m)));
      e.failure()) {
    return e;
  }
  BackwardPlansParams p{};
  p.q_rows = static_cast<int4 const*>(q_rows.untyped_data());
  p.query_tiles = static_cast<int4*>(query_tiles->untyped_data());
  p.key_blocks = static_cast<int2*>(key_blocks->untyped_data());
  p.workspace = static_cast<int*>(workspace->untyped_data());
  p.batch = int(batch);
  p.seqlen_q = int(seqlen_q);
  p.block_m = int(block_m);
  p.block_n = int(block_n);
  p.tiles = int(tiles);
  p.num_key_blocks = int(kd[1]);
  return poison_and_launch("backward_plans", stream, {&query_tiles, &key_blocks},
                           [&] { return run_backward_plans(p, stream); });
}

}  // namespace
}  // namespace jax_fa3

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFa3SegmentRows, jax_fa3::SegmentRowsImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q_ids
                                  .Arg<xla::ffi::AnyBuffer>()  // kv_ids
                                  .Arg<xla::ffi::AnyBuffer>()  // q_offsets
                                  .Arg<xla::ffi::AnyBuffer>()  // kv_offsets
                                  .Ret<xla::ffi::AnyBuffer>()  // q_rows
                                  .Ret<xla::ffi::AnyBuffer>()  // kv_rows
                                  .Ret<xla::ffi::AnyBuffer>()  // workspace
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFa3ForwardTiles, jax_fa3::ForwardTilesImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q_rows
                                  .Ret<xla::ffi::AnyBuffer>()  // plan
                                  .Ret<xla::ffi::AnyBuffer>()  // workspace
                                  .Attr<int64_t>("block_m")
                                  .Attr<int64_t>("block_n"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFa3BackwardPlans, jax_fa3::BackwardPlansImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q_rows
                                  .Ret<xla::ffi::AnyBuffer>()  // query_tiles
                                  .Ret<xla::ffi::AnyBuffer>()  // key_blocks
                                  .Ret<xla::ffi::AnyBuffer>()  // workspace
                                  .Attr<int64_t>("block_m")
                                  .Attr<int64_t>("block_n"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
