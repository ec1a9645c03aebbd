// CUDA kernel of varlen packing: a 1-D grid over output tiles of rows_per_tile rows (pack_index.h).
// A block starts at its tile's first segment (a table lookup, no search), walks the tile's rows,
// and its threads copy each row with the widest aligned vector type. Every block has the same
// amount of work, whatever the mix of segment lengths.
//
// Plain CUDA only (no torch headers), see pack_kernel.h.
#include <stdint.h>

#include "pack_index.h"
#include "pack_kernel.h"

namespace autoselect_fast {
namespace {

constexpr int kMaxThreads = 256;

// Vec is the unit of the row copy; the launcher picks the widest one that divides the row size
// and every base pointer, so one template covers every dtype (rows are copied as bytes).
template <typename Vec>
__global__ void pack_varlen_kernel(PackKernelArgs a) {
  const SegmentTable& table = a.table;
  const int64_t tile = blockIdx.x;
  const int64_t first_row = tile * table.rows_per_tile;
  const int64_t end_row = first_row + table.rows_per_tile < a.total_rows ? first_row + table.rows_per_tile
                                                                        : a.total_rows;
  char* out = static_cast<char*>(a.out);
  const int64_t vecs_per_row = a.row_bytes / static_cast<int64_t>(sizeof(Vec));

  int64_t s = table.tile_first[tile];
  for (int64_t row = first_row; row < end_row; ++row) {
    s = advance_segment(table, s, row);
    const bool visual = segment_is_visual(table, s);
    const int64_t src_row = source_row(table, s, row);
    const char* src = static_cast<const char*>(visual ? a.visual : a.text);
    const Vec* from = reinterpret_cast<const Vec*>(src + src_row * a.row_bytes);
    Vec* to = reinterpret_cast<Vec*>(out + row * a.row_bytes);
    for (int64_t v = threadIdx.x; v < vecs_per_row; v += blockDim.x) {
      to[v] = from[v];
    }
    if (static_cast<int64_t>(threadIdx.x) < a.pos_planes) {
      const int64_t p = threadIdx.x;
      const int64_t* src_pos = visual ? a.visual_pos : a.text_pos;
      const int64_t src_rows = visual ? a.visual_rows : a.text_rows;
      a.out_pos[p * a.total_rows + row] = src_pos[p * src_rows + src_row];
    }
  }
}

bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename Vec>
cudaError_t launch_with(const PackKernelArgs& a, cudaStream_t stream) {
  if (a.table.num_tiles == 0) {
    return cudaSuccess;
  }
  if (a.table.num_tiles > 0x7fffffffLL) {
    return cudaErrorInvalidConfiguration;
  }
  const int64_t vecs_per_row = a.row_bytes / static_cast<int64_t>(sizeof(Vec));
  // Whole warps, no more threads than vectors in a row (short rows, e.g. small H in tests).
  int64_t threads = (vecs_per_row + 31) / 32 * 32;
  threads = threads < 32 ? 32 : (threads > kMaxThreads ? kMaxThreads : threads);
  pack_varlen_kernel<Vec><<<static_cast<unsigned>(a.table.num_tiles), static_cast<unsigned>(threads), 0, stream>>>(a);
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
