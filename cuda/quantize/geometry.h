// How the FP8 quantizer cuts the rows of each (batch, head) into CTAs. Plain C++ with no
// CUDA header, so that tests/cpp/quantize_geometry_check.cc compiles it on the host.
#pragma once

#include <algorithm>
#include <cstdint>

namespace jax_fa3 {

// A CTA is kQuantizeSlabRows rows of 32 or 64 values a thread: one slab of rows in registers
// at a time. It takes a chunk of up to kQuantizeChunkRows rows: a chunk of one slab is read
// once and held from the load to the store; a longer one is read twice (the amax, then the
// write, the second read from L2), so that small CTAs at several an SM keep loads in flight
// while others compute.
// Values a thread: 64 at head dim 256 (4 lanes a row: one cross-lane butterfly stage fewer,
// at 128 registers and 512 threads an SM), 32 elsewhere (64 registers, 1024 threads an SM).
// Measured on the H200 (benchmarks/NOTES.md, session 22), 64 against 32: d256 q and k -6%,
// v -1.5%; d128 q -4%, k +7%, v +4%; d64 +23 to +60% (fewer loads in flight).
constexpr int quantize_values_per_thread(int head_dim) { return head_dim == 256 ? 64 : 32; }
constexpr int quantize_threads_per_sm(int head_dim) { return quantize_values_per_thread(head_dim) == 64 ? 512 : 1024; }
constexpr int kQuantizeSlabRows = 64;
constexpr int64_t kQuantizeChunkRows = 256;
constexpr int quantize_threads(int head_dim) { return kQuantizeSlabRows * head_dim / quantize_values_per_thread(head_dim); }

// How the rows of one (batch, head) are cut: blocks (one scale each) of chunks (one CTA
// each). A block of one chunk is done by one launch. A longer block takes two: one writes
// each chunk's amax to the workspace, the second reduces them and writes.
struct QuantizeGeometry {
  int64_t block_rows;        // rows per scale: the block_rows attribute, or seqlen for one per head
  int64_t num_blocks;        // scales per (batch, head)
  int64_t chunks_per_block;  // CTAs per block
  int64_t chunk_rows;        // rows per CTA (the last chunk of a block may have fewer)

  bool two_pass() const { return chunks_per_block > 1; }
  int64_t chunks_per_head() const { return num_blocks * chunks_per_block; }
  // float32 partial amax per chunk in the two-pass case; nothing otherwise.
  int64_t workspace_bytes(int64_t batch, int64_t heads) const {
    return two_pass() ? int64_t(sizeof(float)) * batch * heads * chunks_per_head() : 0;
  }
};

// block_rows = 0 means one block per (batch, head) (Python's block_rows=None).
inline QuantizeGeometry quantize_geometry(int64_t seqlen, int64_t block_rows) {
  QuantizeGeometry g{};
  g.block_rows = block_rows > 0 ? block_rows : seqlen;
  g.num_blocks = block_rows > 0 ? (seqlen + block_rows - 1) / block_rows : 1;
  int64_t const rows = std::min(g.block_rows, seqlen);  // rows in the largest block
  g.chunks_per_block = std::max<int64_t>(1, (rows + kQuantizeChunkRows - 1) / kQuantizeChunkRows);
  g.chunk_rows = g.chunks_per_block > 1 ? kQuantizeChunkRows : rows;
  return g;
}

}  // namespace jax_fa3
