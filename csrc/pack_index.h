// Index arithmetic of varlen packing, shared by the CPU path (pack.cpp) and the CUDA kernel
// (pack_kernel.cu). Everything here is plain C++ on the host and __host__ __device__ under nvcc,
// so the CPU tests exercise exactly the logic the GPU runs (docs/design.md, "Conventions").
//
// Model. Request r owns text rows [text_cu[r], text_cu[r+1]) and images [img_begin[r],
// img_begin[r+1]) (images are sorted by request). With n images, its output is 2n+1 *segments*:
//
//   text chunk 0, image 0, text chunk 1, image 1, ..., image n-1, text chunk n
//
// where text chunk c is the request's text rows [insert_at[c-1], insert_at[c]) (chunk 0 starts at
// 0, chunk n ends at the request's text length). Every segment is a run of contiguous rows in its
// source (text or visual) and in the output, so a segment is copied as one block. Empty segments
// (empty text around an image, an image with 0 kept tokens) are legal and copy nothing.
// Segments of the whole batch are numbered request after request: request r starts at segment
// r + 2 * img_begin[r], and there are B + 2 I of them.
//
// Copy plan. The host flattens the segments once into a SegmentTable (build_segment_table, from
// segment_at) and cuts the output into tiles of rows_per_tile rows, recording the first segment of
// each tile. Both paths then walk output rows tile by tile: advance_segment moves to the segment
// holding a row (a few steps at most, past empty segments) and the row's source follows by offset,
// so the CUDA kernel is a 1-D grid over output tiles with no search and no idle blocks, and the CPU
// path splits the same tiles over its threads.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define AS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AS_HOST_DEVICE inline
#endif

namespace autoselect_fast {

// Per-batch index tables (int64). On the host they point into a CPU buffer, on the GPU into the
// same buffer copied to the device.
struct PackMeta {
  const int64_t* text_cu;    // (B+1) offsets of each request's text rows in the text input
  const int64_t* img_begin;  // (B+1) first image of each request; img_begin[B] = I
  const int64_t* vis_cu;     // (I+1) offsets of each image's kept rows in the visual input
  const int64_t* insert_at;  // (I)   text tokens of its request that precede each image
  const int64_t* out_cu;     // (B+1) offsets of each request in the packed output
  int64_t num_requests;      // B
  int64_t num_images;        // I
};

// One contiguous copy: rows [src_begin, src_begin + length) of the text (visual == false) or
// visual input go to output rows [dst_begin, dst_begin + length).
struct Segment {
  bool visual;
  int64_t src_begin;
  int64_t dst_begin;
  int64_t length;
};

AS_HOST_DEVICE int64_t num_segments(const PackMeta& m) {
  return m.num_requests + 2 * m.num_images;
}

AS_HOST_DEVICE int64_t first_segment_of_request(const PackMeta& m, int64_t r) {
  return r + 2 * m.img_begin[r];
}

// The request that owns segment s: the largest r with first_segment_of_request(r) <= s.
// first_segment_of_request is strictly increasing in r, so a binary search finds it.
AS_HOST_DEVICE int64_t request_of_segment(const PackMeta& m, int64_t s) {
  int64_t lo = 0, hi = m.num_requests - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (first_segment_of_request(m, mid) <= s) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Source and destination of segment s (0 <= s < num_segments(m)).
AS_HOST_DEVICE Segment segment_at(const PackMeta& m, int64_t s) {
  const int64_t r = request_of_segment(m, s);
  const int64_t k = s - first_segment_of_request(m, r);  // position inside the request
  const int64_t ib = m.img_begin[r];
  const int64_t n_images = m.img_begin[r + 1] - ib;
  const int64_t out_base = m.out_cu[r];
  Segment seg;
  if (k % 2 == 1) {
    // Image ib + k/2: it lands after insert_at[i] text tokens and all earlier images' rows.
    const int64_t i = ib + k / 2;
    seg.visual = true;
    seg.src_begin = m.vis_cu[i];
    seg.length = m.vis_cu[i + 1] - m.vis_cu[i];
    seg.dst_begin = out_base + m.insert_at[i] + (m.vis_cu[i] - m.vis_cu[ib]);
  } else {
    // Text chunk c: the request's text rows between the previous and the next insert point,
    // shifted in the output by the rows of the c images that precede it.
    const int64_t c = k / 2;
    const int64_t text_len = m.text_cu[r + 1] - m.text_cu[r];
    const int64_t local_begin = c == 0 ? 0 : m.insert_at[ib + c - 1];
    const int64_t local_end = c == n_images ? text_len : m.insert_at[ib + c];
    seg.visual = false;
    seg.src_begin = m.text_cu[r] + local_begin;
    seg.length = local_end - local_begin;
    seg.dst_begin = out_base + local_begin + (m.vis_cu[ib + c] - m.vis_cu[ib]);
  }
  return seg;
}

// The flattened segments and the tiling of the output (arrays in the plan's index buffer).
struct SegmentTable {
  const int64_t* dst;         // (S+1) first output row of each segment; dst[S] = total rows T
  const int64_t* src;         // (S)   first source row; a visual segment stores -(row + 1)
  const int64_t* tile_first;  // (num_tiles) the segment holding the first row of each tile
  int64_t num_segments;       // S
  int64_t rows_per_tile;
  int64_t num_tiles;          // ceil(T / rows_per_tile)
};

// Output rows per tile: about 32 KiB of row data, at most 16 rows (so short rows still make
// several tiles, and tests with small H cross tile boundaries).
AS_HOST_DEVICE int64_t rows_per_tile_for(int64_t row_bytes) {
  const int64_t rows = row_bytes > 0 ? (int64_t{32} << 10) / row_bytes : 16;
  return rows < 1 ? 1 : (rows > 16 ? 16 : rows);
}

// Fills dst (S+1), src (S) and tile_first (num_tiles) from the metadata (host side, O(S + tiles)).
inline void build_segment_table(const PackMeta& m, int64_t total_rows, int64_t rows_per_tile, int64_t* dst,
                                int64_t* src, int64_t* tile_first) {
  const int64_t S = num_segments(m);
  for (int64_t s = 0; s < S; ++s) {
    const Segment seg = segment_at(m, s);
    dst[s] = seg.dst_begin;
    src[s] = seg.visual ? -(seg.src_begin + 1) : seg.src_begin;
  }
  dst[S] = total_rows;
  int64_t s = 0;
  for (int64_t t = 0; t * rows_per_tile < total_rows; ++t) {
    while (dst[s + 1] <= t * rows_per_tile) ++s;  // skips empty segments; dst[S] = T stops it
    tile_first[t] = s;
  }
}

// The segment holding output row `row`, walking forward from segment s (s must not be past it).
AS_HOST_DEVICE int64_t advance_segment(const SegmentTable& t, int64_t s, int64_t row) {
  while (t.dst[s + 1] <= row) ++s;
  return s;
}

// Whether segment s copies visual rows, and the source row of output row `row` inside it.
AS_HOST_DEVICE bool segment_is_visual(const SegmentTable& t, int64_t s) { return t.src[s] < 0; }

AS_HOST_DEVICE int64_t source_row(const SegmentTable& t, int64_t s, int64_t row) {
  const int64_t begin = t.src[s] < 0 ? -t.src[s] - 1 : t.src[s];
  return begin + (row - t.dst[s]);
}

}  // namespace autoselect_fast
