// Raw launcher of the CUDA packing kernel (pack_kernel.cu).
//
// Deliberately free of torch headers: it takes raw pointers and a cudaStream_t, so pack_kernel.cu
// compiles with nvcc and the plain CUDA headers alone (.ci/compile_cuda.sh checks that on machines
// whose torch has no CUDA). The torch side (current stream, allocation) lives in pack_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "pack_index.h"

namespace autoselect_fast {

struct PackKernelArgs {
  SegmentTable table;           // segment table and output tiling, in device memory
  const void* text;             // (text_rows, row_bytes) bytes
  const void* visual;           // (visual_rows, row_bytes) bytes
  void* out;                    // (total_rows, row_bytes) bytes
  int64_t row_bytes;
  const int64_t* text_pos;      // (pos_planes, text_rows)
  const int64_t* visual_pos;    // (pos_planes, visual_rows)
  int64_t* out_pos;             // (pos_planes, total_rows)
  int64_t pos_planes;           // 1 for 1-D positions, 3 for M-RoPE
  int64_t text_rows;
  int64_t visual_rows;
  int64_t total_rows;
};

// Enqueues the copy on `stream`; returns the launch status (never synchronises).
cudaError_t launch_pack_varlen(const PackKernelArgs& args, cudaStream_t stream);

}  // namespace autoselect_fast
