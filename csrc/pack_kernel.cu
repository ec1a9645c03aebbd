// CUDA kernel of varlen packing: one block column per segment (pack_index.h), block rows stride
// over the segment's rows, threads of a block copy one row with the widest aligned vector type.
//
// Plain CUDA only (no torch headers), see pack_kernel.h.
#include <stdint.h>

#include "pack_index.h"
#include "pack_kernel.h"

namespace autoselect_fast {
namespace {

constexpr int kMaxThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// Vec is the unit of the row copy; the launcher picks the widest one that divides the row size
// and every base pointer, so one template covers every dtype (rows are copied as bytes).
template <typename Vec>
__global__ void pack_varlen_kernel(PackKernelArgs a) {
  const Segment seg = segment_at(a.meta, static_cast<int64_t>(blockIdx.x));
  const char* src = static_cast<const char*>(seg.visual ? a.visual : a.text);
  const int64_t* src_pos = seg.visual ? a.visual_pos : a.text_pos;
  const int64_t src_rows = seg.visual ? a.visual_rows : a.text_rows;
  char* out = static_cast<char*>(a.out);
  const int64_t vecs_per_row = a.row_bytes / static_cast<int64_t>(sizeof(Vec));

  for (int64_t row = blockIdx.y; row < seg.length; row += gridDim.y) {
    const int64_t src_row = seg.src_begin + row;
    const int64_t dst_row = seg.dst_begin + row;
    const Vec* s = reinterpret_cast<const Vec*>(src + src_row * a.row_bytes);
    Vec* d = reinterpret_cast<Vec*>(out + dst_row * a.row_bytes);
    for (int64_t v = threadIdx.x; v < vecs_per_row; v += blockDim.x) {
      d[v] = s[v];
    }
    if (static_cast<int64_t>(threadIdx.x) < a.pos_planes) {
      const int64_t p = threadIdx.x;
      a.out_pos[p * a.total_rows + dst_row] = src_pos[p * src_rows + src_row];
    }
  }
}

bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename Vec>
cudaError_t launch_with(const PackKernelArgs& a, cudaStream_t stream) {
  const int64_t segments = num_segments(a.meta);
  if (segments == 0 || a.max_segment_rows == 0) {
    return cudaSuccess;
  }
  if (segments > 0x7fffffffLL) {
    return cudaErrorInvalidConfiguration;
  }
  const int64_t vecs_per_row = a.row_bytes / static_cast<int64_t>(sizeof(Vec));
  // Whole warps, no more threads than vectors in a row (short rows, e.g. small H in tests).
  int64_t threads = (vecs_per_row + 31) / 32 * 32;
  threads = threads < 32 ? 32 : (threads > kMaxThreads ? kMaxThreads : threads);
  const int64_t grid_y = a.max_segment_rows < kMaxGridY ? a.max_segment_rows : kMaxGridY;
  const dim3 grid(static_cast<unsigned>(segments), static_cast<unsigned>(grid_y));
  pack_varlen_kernel<Vec><<<grid, static_cast<unsigned>(threads), 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pack_varlen(const PackKernelArgs& a, cudaStream_t stream) {
  const auto fits = [&](int64_t bytes) {
    return a.row_bytes % bytes == 0 && aligned_to(a.text, bytes) && aligned_to(a.visual, bytes) &&
           aligned_to(a.out, bytes);
  };
  if (fits(16)) return launch_with<uint4>(a, stream);
  if (fits(8)) return launch_with<uint2>(a, stream);
  if (fits(4)) return launch_with<unsigned int>(a, stream);
  if (fits(2)) return launch_with<unsigned short>(a, stream);
  return launch_with<unsigned char>(a, stream);
}

}  // namespace autoselect_fast
