// Index arithmetic of varlen packing, shared by the CPU path (pack.cpp) and the CUDA kernel
// (pack_kernel.cu). Everything here is plain C++ on the host and __host__ __device__ under nvcc,
// so the CPU tests exercise exactly the logic the GPU runs (DESIGN.md section 7).
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

}  // namespace autoselect_fast
