// XLA FFI handlers: decode buffers and attributes, re-check every rule of CONTRACT.md,
// fill the kernel parameters and launch on XLA's stream. Bad input returns
// InvalidArgument and launches nothing. The handlers allocate nothing and never
// synchronise, so XLA may capture them in CUDA graphs.
#include "ffi/attention_ffi.h"

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <mutex>
#include <string>
#include <tuple>

#include <cuda_runtime_api.h>

#include "common/bwd_params.h"
#include "common/params.h"
#include "ffi/buffers.h"
#include "ffi/registry.h"

namespace jax_fa3 {
namespace {

namespace ffi = xla::ffi;

constexpr int64_t kMaxSeqlen = int64_t(1) << 30;  // keeps every row/column index in int32
constexpr int64_t kFwdWorkspaceBytes = 4;         // the dynamic scheduler's tile counter
constexpr int64_t kMaxGridBlocks = (int64_t(1) << 31) - 1;  // a grid's x dimension

// SM counts are read once per device; XLA may call from one host thread per GPU.
int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static int counts[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) { return 0; }
  std::call_once(once[device], [device] {
    if (cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      counts[device] = 0;
    }
  });
  return counts[device];
}

struct Dims {
  int64_t batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, head_dim_v;
};

// Shapes, dtypes and attributes shared by both directions.
ffi::Error check_inputs(ffi::AnyBuffer const& q, ffi::AnyBuffer const& k, ffi::AnyBuffer const& v,
                        ffi::AnyBuffer const& seqused_q, ffi::AnyBuffer const& seqused_k, float softmax_scale,
                        float softcap, int64_t window_left, int64_t window_right, int64_t diagonal_offset,
                        Dims& d, bool fp8_allowed = false) {
  if (q.dimensions().size() != 4 || k.dimensions().size() != 4 || v.dimensions().size() != 4) {
    return invalid("q, k, v must be rank 4 [batch, seqlen, heads, head_dim]; got q " + shape_str(q) + ", k " +
                   shape_str(k) + ", v " + shape_str(v));
  }
  if (!(fp8_allowed ? fwd_input_dtype_name(q.element_type()) : dtype_name(q.element_type()))) {
    return invalid(fp8_allowed ? "q must be bfloat16, float16 or float8_e4m3fn" : "q must be bfloat16 or float16");
  }
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type()) {
    return invalid("k and v must have q's dtype");
  }
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  d = {qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], vd[3]};
  if (kd[0] != d.batch || vd[0] != d.batch || vd[1] != d.seqlen_k || vd[2] != d.kv_heads || kd[3] != d.head_dim) {
    return invalid("k " + shape_str(k) + " and v " + shape_str(v) + " do not match q " + shape_str(q) +
                   " (same batch; k and v same seqlen and heads; k has q's head_dim)");
  }
  if (d.batch < 1 || d.seqlen_q < 1 || d.seqlen_k < 1 || d.heads < 1 || d.kv_heads < 1) {
    return invalid("batch, seqlens and heads must be >= 1; got q " + shape_str(q) + ", k " + shape_str(k));
  }
  if (d.seqlen_q > kMaxSeqlen || d.seqlen_k > kMaxSeqlen) { return invalid("seqlens must be <= 2^30"); }
  // The kernels count their tiles (of >= 64 rows or keys) per (batch, head) in int32.
  if (d.batch * d.heads * ((std::max(d.seqlen_q, d.seqlen_k) + 63) / 64) > kMaxGridBlocks) {
    return invalid("batch * heads * ceil(max(seqlen_q, seqlen_k) / 64) must be < 2^31 (the kernels' tile count)");
  }
  if (d.heads % d.kv_heads != 0) {
    return invalid("q heads (" + std::to_string(d.heads) + ") must be a multiple of k/v heads (" +
                   std::to_string(d.kv_heads) + ")");
  }
  for (ffi::AnyBuffer const* s : {&seqused_q, &seqused_k}) {
    auto sd = s->dimensions();
    if (s->element_type() != ffi::DataType::S32 || sd.size() != 1 || (sd[0] != 0 && sd[0] != d.batch)) {
      return invalid("seqused_q/seqused_k must be int32 of shape [batch] or [0]; got " + shape_str(*s));
    }
  }
  if (!(std::isfinite(softmax_scale) && softmax_scale > 0.f)) { return invalid("softmax_scale must be finite and > 0"); }
  if (!(std::isfinite(softcap) && softcap >= 0.f)) { return invalid("softcap must be finite and >= 0"); }
  if (window_left < -1 || window_right < -1) { return invalid("window sizes must be >= -1 (-1 = unbounded)"); }
  if (diagonal_offset < -kMaxSeqlen || diagonal_offset > kMaxSeqlen) {
    return invalid("|diagonal_offset| must be <= 2^30");
  }
  if (!aligned16(q.untyped_data()) || !aligned16(k.untyped_data()) || !aligned16(v.untyped_data())) {
    return invalid("q, k, v must be 16-byte aligned");
  }
  return ffi::Error::Success();
}

// Dense BTNH: row stride = heads * head_dim, batch stride = seqlen * row stride.
template <class Params>
void set_dense_strides(Dims const& d, Params& p) {
  p.q_head_stride = d.head_dim;
  p.q_row_stride = d.heads * d.head_dim;
  p.q_batch_stride = d.seqlen_q * p.q_row_stride;
  p.k_head_stride = d.head_dim;
  p.k_row_stride = d.kv_heads * d.head_dim;
  p.k_batch_stride = d.seqlen_k * p.k_row_stride;
  p.v_head_stride = d.head_dim_v;
  p.v_row_stride = d.kv_heads * d.head_dim_v;
  p.v_batch_stride = d.seqlen_k * p.v_row_stride;
  p.o_head_stride = d.head_dim_v;
  p.o_row_stride = d.heads * d.head_dim_v;
  p.o_batch_stride = d.seqlen_q * p.o_row_stride;
}

bool same_shape(ffi::AnyBuffer const& a, ffi::AnyBuffer const& b) {
  auto x = a.dimensions(), y = b.dimensions();
  return x.size() == y.size() && std::equal(x.begin(), x.end(), y.begin());
}

// A window wider than any sequence is the same as none; clamping keeps int32 arithmetic safe.
int clamp_window(int64_t w) { return w < 0 ? -1 : int(std::min<int64_t>(w, 2 * kMaxSeqlen)); }

// The fields both directions share: inputs, shapes, dense strides, mask, device facts.
template <class Params>
ffi::Error set_common(Params& p, Dims const& d, ffi::AnyBuffer const& q, ffi::AnyBuffer const& k,
                      ffi::AnyBuffer const& v, ffi::AnyBuffer const& seqused_q, ffi::AnyBuffer const& seqused_k,
                      float softmax_scale, float softcap, int64_t window_left, int64_t window_right,
                      int64_t diagonal_offset) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) { return ffi::Error::Internal("jax_fa3: cudaGetDevice failed"); }
  p.num_sms = sm_count(device);
  if (p.num_sms <= 0) { return ffi::Error::Internal("jax_fa3: could not read the SM count"); }
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.seqused_q = seqused_q.dimensions()[0] ? static_cast<int const*>(seqused_q.untyped_data()) : nullptr;
  p.seqused_k = seqused_k.dimensions()[0] ? static_cast<int const*>(seqused_k.untyped_data()) : nullptr;
  p.batch = int(d.batch);
  p.seqlen_q = int(d.seqlen_q);
  p.seqlen_k = int(d.seqlen_k);
  p.heads = int(d.heads);
  p.kv_heads = int(d.kv_heads);
  p.head_dim = int(d.head_dim);
  p.head_dim_v = int(d.head_dim_v);
  set_dense_strides(d, p);
  p.softmax_scale = softmax_scale;
  p.softcap = softcap;
  p.window_left = clamp_window(window_left);
  p.window_right = clamp_window(window_right);
  p.diagonal_offset = int(diagonal_offset);
  return ffi::Error::Success();
}

// Packed sequences: the rows and plans of common/segments.h, all absent (shape [0]) or all
// present. `plans` pairs each plan with its expected [batch, blocks, width]. The plans come
// from jax_fa3/segments.py; the kernels clamp what they index memory with.
// A tile plan: int32 [batch, blocks, width], or [blocks, width] when `flat` (one list for
// every batch row).
struct Plan {
  ffi::AnyBuffer const* buffer;
  int64_t blocks, width;
  char const* name;
  bool flat = false;
};

ffi::Error check_segments(Dims const& d, ffi::AnyBuffer const& q_rows, ffi::AnyBuffer const& kv_rows,
                          std::initializer_list<Plan> plans, bool has_seqused, bool& present) {
  present = q_rows.size_bytes() > 0;
  auto is_absent = [](ffi::AnyBuffer const& b) { return b.dimensions().size() == 1 && b.dimensions()[0] == 0; };
  if (!present) {
    bool all_absent = is_absent(q_rows) && is_absent(kv_rows);
    for (Plan const& plan : plans) { all_absent = all_absent && is_absent(*plan.buffer); }
    return all_absent ? ffi::Error::Success()
                      : invalid("q_rows, kv_rows and the tile plans must all be absent (shape [0]) or all present");
  }
  if (has_seqused) { return invalid("seqused_q/seqused_k must be absent with q_rows (fold the lengths into the rows)"); }
  auto has_shape = [](ffi::AnyBuffer const& b, int64_t batch, int64_t length, int64_t width) {
    auto s = b.dimensions();
    return b.element_type() == ffi::DataType::S32 && s.size() == 3 && s[0] == batch && s[1] == length &&
           s[2] == width && aligned16(b.untyped_data());
  };
  if (!has_shape(q_rows, d.batch, d.seqlen_q, 4)) {
    return invalid("q_rows must be int32 [batch, seqlen_q, 4]; got " + shape_str(q_rows));
  }
  if (!has_shape(kv_rows, d.batch, d.seqlen_k, 4)) {
    return invalid("kv_rows must be int32 [batch, seqlen_k, 4]; got " + shape_str(kv_rows));
  }
  for (Plan const& plan : plans) {
    auto s = plan.buffer->dimensions();
    bool const flat_ok = plan.buffer->element_type() == ffi::DataType::S32 && s.size() == 2 && s[0] == plan.blocks &&
                         s[1] == plan.width && aligned16(plan.buffer->untyped_data());
    if (plan.flat ? !flat_ok : !has_shape(*plan.buffer, d.batch, plan.blocks, plan.width)) {
      return invalid(std::string(plan.name) + " must be int32 [" + (plan.flat ? "" : "batch, ") +
                     std::to_string(plan.blocks) + ", " + std::to_string(plan.width) + "]; got " +
                     shape_str(*plan.buffer));
    }
  }
  return ffi::Error::Success();
}

// Attention sinks: float32 [batch, heads], or absent (shape [0]). Sets `sinks` to the data or nullptr.
ffi::Error check_sinks(Dims const& d, ffi::AnyBuffer const& buffer, float const*& sinks) {
  auto s = buffer.dimensions();
  sinks = nullptr;
  if (buffer.element_type() == ffi::DataType::F32 && s.size() == 1 && s[0] == 0) { return ffi::Error::Success(); }
  if (buffer.element_type() != ffi::DataType::F32 || s.size() != 2 || s[0] != d.batch || s[1] != d.heads) {
    return invalid("sinks must be float32 [batch, heads] or [0] (none); got " + shape_str(buffer));
  }
  if (d.batch * d.heads > kMaxGridBlocks) { return invalid("with sinks, batch * heads must be < 2^31"); }
  sinks = static_cast<float const*>(buffer.untyped_data());
  return ffi::Error::Success();
}

// FP8 descale factors (CONTRACT.md): each float32 [0] (absent: 1) or, with FP8 inputs only,
// q [batch, heads, 1 or ceil(seqlen_q / 64)], k [batch, kv_heads, 1 or ceil(seqlen_k /
// key tile)], v [batch, kv_heads].
ffi::Error check_descales(Dims const& d, bool fp8, int key_tile, ffi::AnyBuffer const& q, ffi::AnyBuffer const& k,
                          ffi::AnyBuffer const& v, FwdParams& p) {
  auto absent = [](ffi::AnyBuffer const& b) {
    return b.element_type() == ffi::DataType::F32 && b.dimensions().size() == 1 && b.dimensions()[0] == 0;
  };
  p.descale_q = p.descale_k = p.descale_v = nullptr;
  p.descale_q_blocks = p.descale_k_blocks = 1;
  if (absent(q) && absent(k) && absent(v)) { return ffi::Error::Success(); }
  if (!fp8) { return invalid("descale_q/descale_k/descale_v are for float8_e4m3fn inputs only; pass [0] arrays"); }
  auto blocks_match = [](ffi::AnyBuffer const& b, int64_t batch, int64_t heads, int64_t blocks) {
    auto s = b.dimensions();
    return b.element_type() == ffi::DataType::F32 && s.size() == 3 && s[0] == batch && s[1] == heads &&
           (s[2] == 1 || s[2] == blocks);
  };
  int64_t const q_blocks = (d.seqlen_q + kFp8DescaleQRows - 1) / kFp8DescaleQRows;
  int64_t const k_blocks = (d.seqlen_k + key_tile - 1) / key_tile;
  if (!absent(q)) {
    if (!blocks_match(q, d.batch, d.heads, q_blocks)) {
      return invalid("descale_q must be float32 [batch, heads, 1 or " + std::to_string(q_blocks) +
                     " (blocks of 64 rows)] or [0]; got " + shape_str(q));
    }
    p.descale_q = static_cast<float const*>(q.untyped_data());
    p.descale_q_blocks = int(q.dimensions()[2]);
  }
  if (!absent(k)) {
    if (!blocks_match(k, d.batch, d.kv_heads, k_blocks)) {
      return invalid("descale_k must be float32 [batch, kv_heads, 1 or " + std::to_string(k_blocks) + " (blocks of " +
                     std::to_string(key_tile) + " keys)] or [0]; got " + shape_str(k));
    }
    p.descale_k = static_cast<float const*>(k.untyped_data());
    p.descale_k_blocks = int(k.dimensions()[2]);
  }
  if (!absent(v)) {
    auto s = v.dimensions();
    if (v.element_type() != ffi::DataType::F32 || s.size() != 2 || s[0] != d.batch || s[1] != d.kv_heads) {
      return invalid("descale_v must be float32 [batch, kv_heads] or [0]; got " + shape_str(v));
    }
    p.descale_v = static_cast<float const*>(v.untyped_data());
  }
  return ffi::Error::Success();
}

// A float32 or uint32 [batch, heads] result that is wanted, or [1] (untouched) when not.
ffi::Error check_per_head_result(Dims const& d, ffi::AnyBuffer const& buffer, ffi::DataType type, bool wanted,
                                 char const* name, char const* when) {
  auto s = buffer.dimensions();
  bool const ok = wanted ? s.size() == 2 && s[0] == d.batch && s[1] == d.heads : s.size() == 1 && s[0] == 1;
  if (buffer.element_type() != type || !ok) {
    return invalid(std::string(name) + " must be [batch, heads] " + when + ", else [1]; got " + shape_str(buffer));
  }
  return ffi::Error::Success();
}

int64_t blocks_of(int64_t length, int block) { return (length + block - 1) / block; }

std::string no_kernel(char const* direction, std::string const& dtype, Dims const& d) {
  return std::string("no ") + direction + " kernel for dtype " + dtype + ", head_dim " + std::to_string(d.head_dim) +
         ", head_dim_v " + std::to_string(d.head_dim_v) + " (see jax_fa3.kernels_available())";
}


ffi::Error FwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::AnyBuffer seqused_q, ffi::AnyBuffer seqused_k, ffi::AnyBuffer q_rows, ffi::AnyBuffer kv_rows,
                   ffi::AnyBuffer tile_plan, ffi::AnyBuffer sinks, ffi::AnyBuffer descale_q,
                   ffi::AnyBuffer descale_k, ffi::AnyBuffer descale_v, ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> workspace,
                   ffi::Result<ffi::AnyBuffer> max_logit, float softmax_scale, float softcap, int64_t window_left,
                   int64_t window_right, int64_t diagonal_offset, bool return_max_logit) {
  Dims d;
  if (ffi::Error e = check_inputs(q, k, v, seqused_q, seqused_k, softmax_scale, softcap, window_left, window_right,
                                  diagonal_offset, d, /*fp8_allowed=*/true);
      e.failure()) {
    return e;
  }
  bool const fp8 = q.element_type() == ffi::DataType::F8E4M3FN;
  auto od = out->dimensions();
  if ((fp8 ? !dtype_name(out->element_type()) : out->element_type() != q.element_type()) || od.size() != 4 ||
      od[0] != d.batch || od[1] != d.seqlen_q || od[2] != d.heads || od[3] != d.head_dim_v) {
    return invalid("out must be [batch, seqlen_q, heads, head_dim_v] in q's dtype (bfloat16 or float16 for "
                   "float8_e4m3fn inputs); got " + shape_str(*out));
  }
  auto ld = lse->dimensions();
  if (lse->element_type() != ffi::DataType::F32 || ld.size() != 3 || ld[0] != d.batch || ld[1] != d.heads ||
      ld[2] != d.seqlen_q) {
    return invalid("lse must be float32 [batch, heads, seqlen_q]; got " + shape_str(*lse));
  }
  if (workspace->element_type() != ffi::DataType::U8 || workspace->size_bytes() < kFwdWorkspaceBytes ||
      !aligned16(workspace->untyped_data())) {
    return invalid("workspace must be uint8 of at least " + std::to_string(kFwdWorkspaceBytes) + " bytes");
  }
  if (!aligned16(out->untyped_data())) { return invalid("out must be 16-byte aligned"); }
  if (ffi::Error e = check_per_head_result(d, *max_logit, ffi::DataType::U32, return_max_logit, "max_logit",
                                           "(uint32) with return_max_logit");
      e.failure()) {
    return e;
  }
  float const* sink_logits = nullptr;
  if (ffi::Error e = check_sinks(d, sinks, sink_logits); e.failure()) { return e; }
  std::string const dtype = fwd_input_dtype_name(q.element_type());
  std::string const out_dtype = dtype_name(out->element_type());
  FwdVariant const* variant = find_fwd_variant(dtype, out_dtype, int(d.head_dim), int(d.head_dim_v));
  if (!variant) { return invalid(no_kernel("forward", dtype + " -> " + out_dtype, d)); }
  if (fp8 && q_rows.size_bytes() > 0) { return invalid("float8_e4m3fn inputs take no packed sequences (q_rows)"); }
  bool segments = false;
  if (ffi::Error e = check_segments(
          d, q_rows, kv_rows,
          {{&tile_plan, fp8 ? 0 : 1 + fwd_plan_capacity(d.batch, d.seqlen_q, variant->segment_tile.block_m), 8,
            "tile_plan", true}},
          seqused_q.size_bytes() || seqused_k.size_bytes(), segments);
      e.failure()) {
    return e;
  }
  if (segments && fwd_plan_capacity(d.batch, d.seqlen_q, variant->segment_tile.block_m) * d.heads > kMaxGridBlocks) {
    return invalid("packed sequences: batch * heads * (3 * ceil(seqlen_q / " +
                   std::to_string(variant->segment_tile.block_m) + ") + 1) must be < 2^31");
  }

  FwdParams p{};
  if (ffi::Error e = set_common(p, d, q, k, v, seqused_q, seqused_k, softmax_scale, softcap, window_left, window_right,
                                diagonal_offset);
      e.failure()) {
    return e;
  }
  p.out = out->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
  p.tile_counter = static_cast<int*>(workspace->untyped_data());
  p.sinks = sink_logits;
  p.max_logit = return_max_logit ? static_cast<uint32_t*>(max_logit->untyped_data()) : nullptr;
  if (ffi::Error e = check_descales(d, fp8, variant->tile.block_n, descale_q, descale_k, descale_v, p); e.failure()) {
    return e;
  }
  if (segments) {
    p.q_rows = static_cast<int const*>(q_rows.untyped_data());
    p.kv_rows = static_cast<int const*>(kv_rows.untyped_data());
    p.tile_plan = static_cast<int const*>(tile_plan.untyped_data());
  }

  return poison_and_launch("forward", stream, {&out, &lse}, [&] { return variant->run(p, stream); });
}

ffi::Error BwdImpl(cudaStream_t stream, ffi::AnyBuffer dout, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::AnyBuffer out, ffi::AnyBuffer lse, ffi::AnyBuffer seqused_q, ffi::AnyBuffer seqused_k,
                   ffi::AnyBuffer q_rows, ffi::AnyBuffer kv_rows, ffi::AnyBuffer query_tile_plan,
                   ffi::AnyBuffer key_block_plan, ffi::AnyBuffer sinks, ffi::Result<ffi::AnyBuffer> dq,
                   ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                   ffi::Result<ffi::AnyBuffer> workspace, ffi::Result<ffi::AnyBuffer> dsinks, float softmax_scale,
                   float softcap, int64_t window_left,
                   int64_t window_right, int64_t diagonal_offset, bool deterministic) {
  Dims d;
  if (ffi::Error e = check_inputs(q, k, v, seqused_q, seqused_k, softmax_scale, softcap, window_left, window_right,
                                  diagonal_offset, d);
      e.failure()) {
    return e;
  }
  auto od = out.dimensions();
  if (out.element_type() != q.element_type() || od.size() != 4 || od[0] != d.batch || od[1] != d.seqlen_q ||
      od[2] != d.heads || od[3] != d.head_dim_v) {
    return invalid("out must be [batch, seqlen_q, heads, head_dim_v] in q's dtype; got " + shape_str(out));
  }
  if (!same_shape(dout, out) || dout.element_type() != q.element_type()) {
    return invalid("dout must have out's shape and dtype; got " + shape_str(dout));
  }
  auto ld = lse.dimensions();
  if (lse.element_type() != ffi::DataType::F32 || ld.size() != 3 || ld[0] != d.batch || ld[1] != d.heads ||
      ld[2] != d.seqlen_q) {
    return invalid("lse must be float32 [batch, heads, seqlen_q]; got " + shape_str(lse));
  }
  for (auto [grad, input, name] : {std::tuple{&dq, &q, "dq"}, std::tuple{&dk, &k, "dk"}, std::tuple{&dv, &v, "dv"}}) {
    if (!same_shape(**grad, *input) || (*grad)->element_type() != q.element_type() ||
        !aligned16((*grad)->untyped_data())) {
      return invalid(std::string(name) + " must have its input's shape and dtype; got " + shape_str(**grad));
    }
  }
  if (!aligned16(dout.untyped_data()) || !aligned16(out.untyped_data())) {
    return invalid("dout and out must be 16-byte aligned");
  }
  float const* sink_logits = nullptr;
  if (ffi::Error e = check_sinks(d, sinks, sink_logits); e.failure()) { return e; }
  if (ffi::Error e = check_per_head_result(d, *dsinks, ffi::DataType::F32, sink_logits != nullptr, "dsinks",
                                           "(float32) with sinks");
      e.failure()) {
    return e;
  }
  std::string const dtype = dtype_name(q.element_type());
  BwdVariant const* variant = find_bwd_variant(dtype, int(d.head_dim), int(d.head_dim_v));
  if (!variant) { return invalid(no_kernel("backward", dtype, d)); }
  bool segments = false;
  TileShape const tile = variant->segment_tile;
  if (ffi::Error e = check_segments(
          d, q_rows, kv_rows,
          {{&query_tile_plan, blocks_of(d.seqlen_q, tile.block_m), 4, "query_tile_plan"},
           {&key_block_plan, blocks_of(d.seqlen_k, tile.block_n), 2, "key_block_plan"}},
          seqused_q.size_bytes() || seqused_k.size_bytes(), segments);
      e.failure()) {
    return e;
  }
  BwdParams p{};
  if (ffi::Error e = set_common(p, d, q, k, v, seqused_q, seqused_k, softmax_scale, softcap, window_left, window_right,
                                diagonal_offset);
      e.failure()) {
    return e;
  }
  p.dout = dout.untyped_data();
  p.out = out.untyped_data();
  p.lse = static_cast<float const*>(lse.untyped_data());
  p.dq = dq->untyped_data();
  p.dk = dk->untyped_data();
  p.dv = dv->untyped_data();
  p.workspace = workspace->untyped_data();
  p.workspace_bytes = int64_t(workspace->size_bytes());
  p.deterministic = deterministic;
  p.sinks = sink_logits;
  p.dsinks = sink_logits ? static_cast<float*>(dsinks->untyped_data()) : nullptr;
  if (segments) {
    p.q_rows = static_cast<int const*>(q_rows.untyped_data());
    p.kv_rows = static_cast<int const*>(kv_rows.untyped_data());
    p.query_tile_plan = static_cast<int const*>(query_tile_plan.untyped_data());
    p.key_block_plan = static_cast<int const*>(key_block_plan.untyped_data());
  }
  int64_t const needed = variant->workspace_bytes(p);
  if (workspace->element_type() != ffi::DataType::U8 || p.workspace_bytes < needed || !aligned16(p.workspace)) {
    return invalid("workspace must be uint8 of at least " + std::to_string(needed) + " bytes; got " +
                   std::to_string(p.workspace_bytes));
  }
  return poison_and_launch("backward", stream, {&dq, &dk, &dv, &dsinks}, [&] { return variant->run(p, stream); });
}

}  // namespace
}  // namespace jax_fa3

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFa3Bwd, jax_fa3::BwdImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // dout
                                  .Arg<xla::ffi::AnyBuffer>()  // q
                                  .Arg<xla::ffi::AnyBuffer>()  // k
                                  .Arg<xla::ffi::AnyBuffer>()  // v
                                  .Arg<xla::ffi::AnyBuffer>()  // out
                                  .Arg<xla::ffi::AnyBuffer>()  // lse
                                  .Arg<xla::ffi::AnyBuffer>()  // seqused_q
                                  .Arg<xla::ffi::AnyBuffer>()  // seqused_k
                                  .Arg<xla::ffi::AnyBuffer>()  // q_rows
                                  .Arg<xla::ffi::AnyBuffer>()  // kv_rows
                                  .Arg<xla::ffi::AnyBuffer>()  // query_tile_plan
                                  .Arg<xla::ffi::AnyBuffer>()  // key_block_plan
                                  .Arg<xla::ffi::AnyBuffer>()  // sinks
                                  .Ret<xla::ffi::AnyBuffer>()  // dq
                                  .Ret<xla::ffi::AnyBuffer>()  // dk
                                  .Ret<xla::ffi::AnyBuffer>()  // dv
                                  .Ret<xla::ffi::AnyBuffer>()  // workspace
                                  .Ret<xla::ffi::AnyBuffer>()  // dsinks
                                  .Attr<float>("softmax_scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right")
                                  .Attr<int64_t>("diagonal_offset")
                                  .Attr<bool>("deterministic"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFa3Fwd, jax_fa3::FwdImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q
                                  .Arg<xla::ffi::AnyBuffer>()  // k
                                  .Arg<xla::ffi::AnyBuffer>()  // v
                                  .Arg<xla::ffi::AnyBuffer>()  // seqused_q
                                  .Arg<xla::ffi::AnyBuffer>()  // seqused_k
                                  .Arg<xla::ffi::AnyBuffer>()  // q_rows
                                  .Arg<xla::ffi::AnyBuffer>()  // kv_rows
                                  .Arg<xla::ffi::AnyBuffer>()  // tile_plan
                                  .Arg<xla::ffi::AnyBuffer>()  // sinks
                                  .Arg<xla::ffi::AnyBuffer>()  // descale_q
                                  .Arg<xla::ffi::AnyBuffer>()  // descale_k
                                  .Arg<xla::ffi::AnyBuffer>()  // descale_v
                                  .Ret<xla::ffi::AnyBuffer>()  // out
                                  .Ret<xla::ffi::AnyBuffer>()  // lse
                                  .Ret<xla::ffi::AnyBuffer>()  // workspace
                                  .Ret<xla::ffi::AnyBuffer>()  // max_logit
                                  .Attr<float>("softmax_scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right")
                                  .Attr<int64_t>("diagonal_offset")
                                  .Attr<bool>("return_max_logit"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
