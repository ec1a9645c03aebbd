// Torch-level pieces of the packing extension shared by pack.cpp (host plan, CPU path, bindings)
// and pack_cuda.cpp (CUDA path, built only when the extension is compiled with CUDA).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "pack_index.h"

namespace autoselect_fast {

// (embeds (T, H), cu_seqlens int32 (B+1), max_seqlen, positions (T) or (P, T), last_token (B))
using PackResult = std::tuple<at::Tensor, at::Tensor, int64_t, at::Tensor, at::Tensor>;

// Contiguous inputs, all on one device; positions are (P, rows) with P = 1 for 1-D positions.
struct PackInputs {
  at::Tensor text_embeds;
  at::Tensor visual_embeds;
  at::Tensor text_positions;
  at::Tensor visual_positions;
  bool positions_1d;
  int64_t pos_planes;
};

// Everything the copy needs, computed once on the host from the (host) index tensors. All tables
// live in one int64 buffer so the CUDA path uploads them with a single copy.
struct HostPlan {
  at::Tensor index;  // int64 CPU buffer; pinned when the batch is on CUDA
  int64_t num_requests = 0;
  int64_t num_images = 0;
  int64_t off_text_cu = 0, off_img_begin = 0, off_vis_cu = 0, off_insert_at = 0;
  int64_t off_out_cu = 0, off_last_token = 0;
  int64_t off_seg_dst = 0, off_seg_src = 0, off_tile_first = 0;  // the SegmentTable (pack_index.h)
  int64_t total_rows = 0;        // T
  int64_t max_seqlen = 0;        // longest request
  int64_t rows_per_tile = 1;     // output rows per copy tile (rows_per_tile_for(row bytes))
  int64_t num_tiles = 0;         // ceil(T / rows_per_tile): the CUDA grid

  // The tables as seen through `base`: index.data_ptr() on the host, or the device copy's.
  PackMeta meta(const int64_t* base) const {
    PackMeta m;
    m.text_cu = base + off_text_cu;
    m.img_begin = base + off_img_begin;
    m.vis_cu = base + off_vis_cu;
    m.insert_at = base + off_insert_at;
    m.out_cu = base + off_out_cu;
    m.num_requests = num_requests;
    m.num_images = num_images;
    return m;
  }

  SegmentTable table(const int64_t* base) const {
    SegmentTable t;
    t.dst = base + off_seg_dst;
    t.src = base + off_seg_src;
    t.tile_first = base + off_tile_first;
    t.num_segments = num_requests + 2 * num_images;
    t.rows_per_tile = rows_per_tile;
    t.num_tiles = num_tiles;
    return t;
  }
};

#ifdef AUTOSELECT_FAST_WITH_CUDA
PackResult pack_varlen_cuda(const PackInputs& in, const HostPlan& plan);
#endif

}  // namespace autoselect_fast
