// The FP8 quantizer handler (CONTRACT.md, jax_fa3_fp8_quantize): checks the buffers, fills
// QuantizeParams and launches on XLA's stream. The two-pass case keeps its chunk amaxes in
// the workspace result, so nothing is allocated and the call stays graph-safe.
#include "ffi/quantize_ffi.h"

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include <cuda_runtime_api.h>

#include "ffi/buffers.h"
#include "quantize/params.h"

namespace jax_fa3 {
namespace {

namespace ffi = xla::ffi;

constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;

bool input_of(ffi::DataType t, QuantizeInput& input) {
  switch (t) {
    case ffi::DataType::BF16: input = QuantizeInput::kBfloat16; return true;
    case ffi::DataType::F16: input = QuantizeInput::kFloat16; return true;
    case ffi::DataType::F32: input = QuantizeInput::kFloat32; return true;
    default: return false;
  }
}

ffi::Error QuantizeImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer signs, ffi::Result<ffi::AnyBuffer> x8,
                        ffi::Result<ffi::AnyBuffer> descale, ffi::Result<ffi::AnyBuffer> workspace, int64_t block_rows) {
  QuantizeParams p{};
  if (!input_of(x.element_type(), p.input)) { return invalid("fp8_quantize: x must be bfloat16, float16 or float32"); }
  if (x.dimensions().size() != 4) {
    return invalid("fp8_quantize: x must be rank 4 [batch, seqlen, heads, head_dim]; got " + shape_str(x));
  }
  auto const xd = x.dimensions();
  int64_t const batch = xd[0], seqlen = xd[1], heads = xd[2], head_dim = xd[3];
  if (!quantize_head_dim_compiled(head_dim)) {
    return invalid("fp8_quantize: head_dim must be 64, 128 or 256; got x " + shape_str(x));
  }
  if (block_rows < 0) { return invalid("fp8_quantize: block_rows must be >= 0 (0: one block per batch and head)"); }
  bool const hadamard = !absent(signs);
  if (hadamard && (signs.element_type() != ffi::DataType::F32 || !has_dims(signs, {head_dim}))) {
    return invalid("fp8_quantize: signs must be float32 [head_dim] or absent ([0]); got " + shape_str(signs));
  }
  QuantizeGeometry const g = quantize_geometry(seqlen, block_rows);
  if (batch * heads * g.chunks_per_head() > kMaxGridX) {
    return invalid("fp8_quantize: batch * heads * blocks of x " + shape_str(x) + " must be < 2^31");
  }
  if (x8->element_type() != ffi::DataType::F8E4M3FN || !has_dims(*x8, {batch, seqlen, heads, head_dim})) {
    return invalid("fp8_quantize: x8 must be float8_e4m3fn of x's shape; got " + shape_str(*x8));
  }
  if (descale->element_type() != ffi::DataType::F32 || !has_dims(*descale, {batch, heads, g.num_blocks})) {
    return invalid("fp8_quantize: descale must be float32 [batch, heads, " + std::to_string(g.num_blocks) + "]; got " +
                   shape_str(*descale));
  }
  int64_t const needed = g.workspace_bytes(batch, heads);
  if (workspace->element_type() != ffi::DataType::U8 || int64_t(workspace->size_bytes()) < needed) {
    return invalid("fp8_quantize: workspace must be uint8 of at least " + std::to_string(needed) + " bytes");
  }
  if (x.element_count() > 0 && (!aligned16(x.untyped_data()) || !aligned16(x8->untyped_data()))) {
    return invalid("fp8_quantize: x and x8 must be 16-byte aligned");
  }

  p.x = x.untyped_data();
  p.signs = hadamard ? static_cast<float const*>(signs.untyped_data()) : nullptr;
  p.x8 = static_cast<uint8_t*>(x8->untyped_data());
  p.descale = static_cast<float*>(descale->untyped_data());
  p.partial_amax = static_cast<float*>(workspace->untyped_data());
  p.batch = batch;
  p.seqlen = seqlen;
  p.heads = heads;
  p.head_dim = int(head_dim);
  p.hadamard_scale = static_cast<float>(1.0 / std::sqrt(double(head_dim)));
  p.geometry = g;

  return poison_and_launch("fp8_quantize", stream, {&x8, &descale}, [&] { return run_fp8_quantize(p, stream); });
}

}  // namespace
}  // namespace jax_fa3

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFa3Fp8Quantize, jax_fa3::QuantizeImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // x
                                  .Arg<xla::ffi::AnyBuffer>()  // signs
                                  .Ret<xla::ffi::AnyBuffer>()  // x8
                                  .Ret<xla::ffi::AnyBuffer>()  // descale
                                  .Ret<xla::ffi::AnyBuffer>()  // workspace
                                  .Attr<int64_t>("block_rows"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
