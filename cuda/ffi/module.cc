// The Python extension jax_fa3._fa3_cuda: FFI handler capsules and the variant table.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>
#include <cutlass/version.h>

#include "ffi/attention_ffi.h"
#include "ffi/plans_ffi.h"
#include "ffi/quantize_ffi.h"
#include "ffi/registry.h"

namespace py = pybind11;

PYBIND11_MODULE(_fa3_cuda, m) {
  m.doc() = "jax_fa3 Hopper kernels as XLA FFI handlers";

  m.def("registrations", [] {
    py::dict targets;
    targets["jax_fa3_fwd"] = py::capsule(reinterpret_cast<void*>(&JaxFa3Fwd));
    targets["jax_fa3_bwd"] = py::capsule(reinterpret_cast<void*>(&JaxFa3Bwd));
    targets["jax_fa3_decode"] = py::capsule(reinterpret_cast<void*>(&JaxFa3Decode));
    targets["jax_fa3_fp8_quantize"] = py::capsule(reinterpret_cast<void*>(&JaxFa3Fp8Quantize));
    targets["jax_fa3_segment_rows"] = py::capsule(reinterpret_cast<void*>(&JaxFa3SegmentRows));
    targets["jax_fa3_forward_tiles"] = py::capsule(reinterpret_cast<void*>(&JaxFa3ForwardTiles));
    targets["jax_fa3_backward_plans"] = py::capsule(reinterpret_cast<void*>(&JaxFa3BackwardPlans));
    return targets;
  }, "FFI target name -> handler capsule, for jax.ffi.register_ffi_target(..., platform='CUDA').");

  m.def("variants", [] {
    py::list out;
    for (auto const& v : jax_fa3::fwd_variants()) {
      out.append(py::make_tuple("fwd", v.dtype, v.out_dtype, v.head_dim, v.head_dim_v));
    }
    for (auto const& v : jax_fa3::bwd_variants()) {
      out.append(py::make_tuple("bwd", v.dtype, v.dtype, v.head_dim, v.head_dim_v));
    }
    for (auto const& v : jax_fa3::decode_variants()) {
      out.append(py::make_tuple("decode", v.dtype, v.dtype, v.head_dim, v.head_dim));
    }
    return out;
  }, "The compiled (direction, dtype, out_dtype, head_dim, head_dim_v) kernel variants.");

  m.def("descale_blocks", [] {
    py::list out;
    for (auto const& v : jax_fa3::fwd_variants()) {
      if (v.dtype == "float8_e4m3fn") {
        out.append(py::make_tuple(v.dtype, v.out_dtype, v.head_dim, jax_fa3::kFp8DescaleQRows, v.tile.block_n));
      }
    }
    return out;
  }, "(dtype, out_dtype, head_dim, q_block_rows, k_block_rows) of the FP8 forward kernels: the rows one "
     "per-block q descale factor covers, and the keys one k factor covers (a key tile).");

  m.def("segment_tiles", [] {
    py::list out;
    for (auto const& v : jax_fa3::fwd_variants()) {
      if (v.segment_tile.block_m > 0) {
        out.append(py::make_tuple("fwd", v.dtype, v.head_dim, v.segment_tile.block_m, v.segment_tile.block_n));
      }
    }
    for (auto const& v : jax_fa3::bwd_variants()) {
      out.append(py::make_tuple("bwd", v.dtype, v.head_dim, v.segment_tile.block_m, v.segment_tile.block_n));
    }
    return out;
  }, "(direction, dtype, head_dim, block_m, block_n): the packed-sequence kernels' tiles, for their plans.");

  m.def("decode_shapes", [] {
    py::list out;
    for (auto const& v : jax_fa3::decode_variants()) {
      out.append(py::make_tuple(v.dtype, v.head_dim, v.shape.block_n, v.shape.ctas_per_sm));
    }
    return out;
  }, "(dtype, head_dim, block_n, ctas_per_sm) of the decode kernels, for the split-count heuristic.");

  m.def("build_info", [] {
    py::dict info;
    info["cuda_runtime"] = CUDART_VERSION;
    info["cutlass"] = std::to_string(CUTLASS_MAJOR) + "." + std::to_string(CUTLASS_MINOR) + "." +
                      std::to_string(CUTLASS_PATCH);
    info["arch"] = "sm_90a";
    return info;
  }, "How the extension was built.");
}
