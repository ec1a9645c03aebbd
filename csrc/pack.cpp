// autoselect_fast._C: packs the kept tokens of a batch into FlashAttention varlen format.
//
// This file owns the host plan (per-request output lengths, computed once on the host), the CPU
// path and the Python bindings. The CUDA path is pack_cuda.cpp + pack_kernel.cu; both paths take
// their segment arithmetic from pack_index.h. The user-facing argument checks with readable
// messages live in autoselect_fast/packing.py; the checks here only guard memory safety for
// callers that bypass the wrapper.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "pack.h"
#include "pack_index.h"

namespace autoselect_fast {
namespace {

void check_host_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
              "_C.pack_varlen: ", name, " must be a contiguous 1-D int64 CPU tensor (the Python "
              "wrapper autoselect_fast.packing.pack_varlen prepares it), got ", t.toString(), " of shape ",
              t.sizes());
}

HostPlan make_plan(const at::Tensor& text_cu, const at::Tensor& vis_cu, const at::Tensor& image_request,
                   const at::Tensor& insert_at, int64_t text_rows, int64_t visual_rows, int64_t row_bytes,
                   bool pinned) {
  check_host_index(text_cu, "text_cu_seqlens");
  check_host_index(vis_cu, "visual_cu_seqlens");
  check_host_index(image_request, "image_request");
  check_host_index(insert_at, "image_insert_at");

  HostPlan p;
  p.num_requests = text_cu.size(0) - 1;
  p.num_images = vis_cu.size(0) - 1;
  const int64_t B = p.num_requests, I = p.num_images;
  TORCH_CHECK(B >= 1, "_C.pack_varlen: need at least one request");
  TORCH_CHECK(I >= 0 && image_request.size(0) == I && insert_at.size(0) == I,
              "_C.pack_varlen: image_request and image_insert_at need one entry per image");

  p.off_text_cu = 0;
  p.off_img_begin = p.off_text_cu + (B + 1);
  p.off_vis_cu = p.off_img_begin + (B + 1);
  p.off_insert_at = p.off_vis_cu + (I + 1);
  p.off_out_cu = p.off_insert_at + I;
  p.off_last_token = p.off_out_cu + (B + 1);
  // Every text row and every kept visual row lands in the output once.
  p.total_rows = text_rows + visual_rows;
  p.rows_per_tile = rows_per_tile_for(row_bytes);
  p.num_tiles = (p.total_rows + p.rows_per_tile - 1) / p.rows_per_tile;
  p.off_seg_dst = p.off_last_token + B;
  p.off_seg_src = p.off_seg_dst + (B + 2 * I + 1);
  p.off_tile_first = p.off_seg_src + (B + 2 * I);
  const int64_t size = p.off_tile_first + p.num_tiles;
  p.index = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(pinned));
  int64_t* base = p.index.data_ptr<int64_t>();

  const int64_t* tcu = text_cu.data_ptr<int64_t>();
  const int64_t* vcu = vis_cu.data_ptr<int64_t>();
  const int64_t* req = image_request.data_ptr<int64_t>();
  const int64_t* ins = insert_at.data_ptr<int64_t>();
  std::copy(tcu, tcu + B + 1, base + p.off_text_cu);
  std::copy(vcu, vcu + I + 1, base + p.off_vis_cu);
  std::copy(ins, ins + I, base + p.off_insert_at);

  // Memory-safety invariants (the wrapper reports violations with full messages first).
  TORCH_CHECK(tcu[0] == 0 && tcu[B] == text_rows, "_C.pack_varlen: text_cu_seqlens must run from 0 to ",
              text_rows);
  TORCH_CHECK(vcu[0] == 0 && vcu[I] == visual_rows, "_C.pack_varlen: visual_cu_seqlens must run from 0 to ",
              visual_rows);
  for (int64_t r = 0; r < B; ++r) {
    TORCH_CHECK(tcu[r + 1] >= tcu[r], "_C.pack_varlen: text_cu_seqlens must be non-decreasing");
  }
  for (int64_t i = 0; i < I; ++i) {
    TORCH_CHECK(vcu[i + 1] >= vcu[i], "_C.pack_varlen: visual_cu_seqlens must be non-decreasing");
    TORCH_CHECK(req[i] >= 0 && req[i] < B && (i == 0 || req[i] >= req[i - 1]),
                "_C.pack_varlen: image_request must be non-decreasing request indices in [0, ", B, ")");
    const int64_t text_len = tcu[req[i] + 1] - tcu[req[i]];
    const bool same_request = i > 0 && req[i] == req[i - 1];
    TORCH_CHECK(ins[i] >= 0 && ins[i] <= text_len && (!same_request || ins[i] >= ins[i - 1]),
                "_C.pack_varlen: image_insert_at must be non-decreasing within a request and in [0, "
                "text length of the request]");
  }

  // Images are sorted by request, so img_begin is a prefix sum of per-request image counts.
  int64_t* img_begin = base + p.off_img_begin;
  std::fill(img_begin, img_begin + B + 1, 0);
  for (int64_t i = 0; i < I; ++i) {
    ++img_begin[req[i] + 1];
  }
  for (int64_t r = 0; r < B; ++r) {
    img_begin[r + 1] += img_begin[r];
  }

  // Output length of request r: its text plus its images' kept tokens.
  int64_t* out_cu = base + p.off_out_cu;
  int64_t* last = base + p.off_last_token;
  out_cu[0] = 0;
  for (int64_t r = 0; r < B; ++r) {
    const int64_t len = (tcu[r + 1] - tcu[r]) + (vcu[img_begin[r + 1]] - vcu[img_begin[r]]);
    TORCH_CHECK(len >= 1, "_C.pack_varlen: request ", r, " has no tokens");
    out_cu[r + 1] = out_cu[r] + len;
    last[r] = out_cu[r + 1] - 1;
    p.max_seqlen = std::max(p.max_seqlen, len);
  }
  TORCH_CHECK(out_cu[B] == p.total_rows, "_C.pack_varlen: internal error: the requests do not cover every row");
  TORCH_CHECK(p.total_rows <= INT32_MAX, "_C.pack_varlen: ", p.total_rows,
              " packed tokens do not fit int32 cu_seqlens");

  build_segment_table(p.meta(base), p.total_rows, p.rows_per_tile, base + p.off_seg_dst, base + p.off_seg_src,
                      base + p.off_tile_first);
  return p;
}

// Below this many bytes per task a thread is not worth waking.
constexpr int64_t kMinBytesPerTask = 256 * 1024;

// On CPU, first touch of a large fresh output costs more than the copy itself: one page fault per
// 4 KiB page (cloning 80 MB took 27 ms, 7 ms with huge pages, on a 2-core CPU machine). Asking
// for transparent huge pages on the untouched output makes that one fault per 2 MiB. Only advice:
// where THP is off, or the memory was already touched (reused heap), nothing changes.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (bytes < static_cast<int64_t>(4 * kHugePage)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHugePage - 1);
  if (end > begin) {
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // failure is harmless
  }
#else
  (void)data;
  (void)bytes;
#endif
}

PackResult pack_varlen_cpu(const PackInputs& in, const HostPlan& plan) {
  const int64_t T = plan.total_rows;
  const int64_t H = in.text_embeds.size(1);
  const int64_t row_bytes = H * static_cast<int64_t>(in.text_embeds.element_size());
  const int64_t P = in.pos_planes;
  const int64_t text_rows = in.text_embeds.size(0);
  const int64_t visual_rows = in.visual_embeds.size(0);

  at::Tensor out = at::empty({T, H}, in.text_embeds.options());
  at::Tensor out_pos = at::empty({P, T}, in.text_positions.options());
  advise_huge_pages(out.data_ptr(), T * row_bytes);

  // The tiles of the CUDA grid, split over the threads (each task a run of whole tiles); inside a
  // tile, every piece of a segment is one memcpy. The segment walk is pack_index.h's, as on the GPU.
  const SegmentTable table = plan.table(plan.index.data_ptr<int64_t>());
  const char* text = static_cast<const char*>(in.text_embeds.data_ptr());
  const char* visual = static_cast<const char*>(in.visual_embeds.data_ptr());
  const int64_t* text_pos = in.text_positions.data_ptr<int64_t>();
  const int64_t* visual_pos = in.visual_positions.data_ptr<int64_t>();
  char* dst = static_cast<char*>(out.data_ptr());
  int64_t* dst_pos = out_pos.data_ptr<int64_t>();

  const int64_t tile_bytes = std::max<int64_t>(table.rows_per_tile * row_bytes, 1);
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / tile_bytes);
  at::parallel_for(0, table.num_tiles, grain, [&](int64_t tile_begin, int64_t tile_end) {
    const int64_t end = std::min(T, tile_end * table.rows_per_tile);
    int64_t row = tile_begin * table.rows_per_tile;
    int64_t s = table.tile_first[tile_begin];
    while (row < end) {
      s = advance_segment(table, s, row);
      const int64_t rows = std::min(end, table.dst[s + 1]) - row;  // the rest of the segment in range
      const bool from_visual = segment_is_visual(table, s);
      const int64_t src_row = source_row(table, s, row);
      std::memcpy(dst + row * row_bytes, (from_visual ? visual : text) + src_row * row_bytes,
                  static_cast<size_t>(rows * row_bytes));
      const int64_t* src_pos = from_visual ? visual_pos : text_pos;
      const int64_t src_stride = from_visual ? visual_rows : text_rows;
      for (int64_t q = 0; q < P; ++q) {
        std::memcpy(dst_pos + q * T + row, src_pos + q * src_stride + src_row, static_cast<size_t>(rows) * sizeof(int64_t));
      }
      row += rows;
    }
  });

  const at::Tensor index = plan.index;
  at::Tensor cu = index.narrow(0, plan.off_out_cu, plan.num_requests + 1).to(at::kInt);
  at::Tensor last = index.narrow(0, plan.off_last_token, plan.num_requests).clone();
  return {out, cu, plan.max_seqlen, out_pos, last};
}

PackResult pack_varlen(const at::Tensor& text_embeds, const at::Tensor& text_positions,
                       const at::Tensor& visual_embeds, const at::Tensor& visual_positions,
                       const at::Tensor& text_cu_seqlens, const at::Tensor& visual_cu_seqlens,
                       const at::Tensor& image_request, const at::Tensor& image_insert_at) {
  TORCH_CHECK(text_embeds.dim() == 2 && visual_embeds.dim() == 2 &&
                  text_embeds.size(1) == visual_embeds.size(1),
              "_C.pack_varlen: text_embeds and visual_embeds must be (rows, H) with the same H");
  TORCH_CHECK(text_embeds.scalar_type() == visual_embeds.scalar_type(),
              "_C.pack_varlen: text_embeds and visual_embeds must share a dtype");
  const at::Device device = text_embeds.device();
  TORCH_CHECK(visual_embeds.device() == device && text_positions.device() == device &&
                  visual_positions.device() == device,
              "_C.pack_varlen: embeddings and positions must be on one device");
  TORCH_CHECK(text_positions.scalar_type() == at::kLong && visual_positions.scalar_type() == at::kLong,
              "_C.pack_varlen: positions must be int64");
  TORCH_CHECK(text_positions.dim() == visual_positions.dim() &&
                  (text_positions.dim() == 1 || text_positions.dim() == 2),
              "_C.pack_varlen: positions must both be 1-D or both 2-D");

  PackInputs in;
  in.positions_1d = text_positions.dim() == 1;
  in.text_embeds = text_embeds.contiguous();
  in.visual_embeds = visual_embeds.contiguous();
  // Positions as (P, rows); a 1-D tensor is the P = 1 case.
  in.text_positions = (in.positions_1d ? text_positions.unsqueeze(0) : text_positions).contiguous();
  in.visual_positions = (in.positions_1d ? visual_positions.unsqueeze(0) : visual_positions).contiguous();
  in.pos_planes = in.text_positions.size(0);
  TORCH_CHECK(in.visual_positions.size(0) == in.pos_planes &&
                  in.text_positions.size(1) == text_embeds.size(0) &&
                  in.visual_positions.size(1) == visual_embeds.size(0),
              "_C.pack_varlen: positions must have one column per token");

  const bool on_cuda = device.is_cuda();
#ifndef AUTOSELECT_FAST_WITH_CUDA
  TORCH_CHECK(!on_cuda, "_C.pack_varlen: this build of autoselect_fast._C has no CUDA path (torch "
              "without CUDA, or AUTOSELECT_FAST_SKIP_CUDA=1 at build time); rebuild with "
              "`pip install --no-build-isolation -e .` on a CUDA build of torch");
#endif
  TORCH_CHECK(device.is_cpu() || on_cuda, "_C.pack_varlen: unsupported device ", device);

  const int64_t row_bytes = text_embeds.size(1) * static_cast<int64_t>(text_embeds.element_size());
  const HostPlan plan = make_plan(text_cu_seqlens, visual_cu_seqlens, image_request, image_insert_at,
                                  text_embeds.size(0), visual_embeds.size(0), row_bytes, /*pinned=*/on_cuda);

  PackResult result;
#ifdef AUTOSELECT_FAST_WITH_CUDA
  if (on_cuda) {
    result = pack_varlen_cuda(in, plan);
  } else {
    result = pack_varlen_cpu(in, plan);
  }
#else
  result = pack_varlen_cpu(in, plan);
#endif
  if (in.positions_1d) {
    std::get<3>(result) = std::get<3>(result).squeeze(0);
  }
  return result;
}

bool built_with_cuda() {
#ifdef AUTOSELECT_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace autoselect_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "autoselect_fast C++/CUDA extension: varlen packing of kept visual tokens and text";
  m.def("pack_varlen", &autoselect_fast::pack_varlen,
        "Pack text and kept visual tokens into FlashAttention varlen format. Index tensors must be "
        "contiguous int64 CPU tensors; use autoselect_fast.packing.pack_varlen, which checks and "
        "prepares the arguments. Returns (embeds, cu_seqlens, max_seqlen, positions, last_token_index).",
        py::arg("text_embeds"), py::arg("text_positions"), py::arg("visual_embeds"),
        py::arg("visual_positions"), py::arg("text_cu_seqlens"), py::arg("visual_cu_seqlens"),
        py::arg("image_request"), py::arg("image_insert_at"));
  m.def("built_with_cuda", &autoselect_fast::built_with_cuda,
        "True when this build includes the CUDA packing kernel");
}
