// CUDA path of varlen packing, torch side: device guard, the caller's current stream, output
// allocation and the single upload of the host plan. The copy itself is pack_kernel.cu.
// Compiled only when the extension is built with CUDA (setup.py defines AUTOSELECT_FAST_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "pack.h"
#include "pack_kernel.h"

namespace autoselect_fast {

PackResult pack_varlen_cuda(const PackInputs& in, const HostPlan& plan) {
  const at::Device device = in.text_embeds.device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());

  // One host-to-device copy of every index table; plan.index is pinned, so this is asynchronous
  // and the host never waits here (the wrapper already paid the one sync, if any).
  const at::Tensor index = plan.index.to(device, at::kLong, /*non_blocking=*/true);

  const int64_t T = plan.total_rows;
  const int64_t H = in.text_embeds.size(1);
  at::Tensor out = at::empty({T, H}, in.text_embeds.options());
  at::Tensor out_pos = at::empty({in.pos_planes, T}, in.text_positions.options());

  PackKernelArgs args;
  args.table = plan.table(index.data_ptr<int64_t>());
  args.text = in.text_embeds.data_ptr();
  args.visual = in.visual_embeds.data_ptr();
  args.out = out.data_ptr();
  args.row_bytes = H * static_cast<int64_t>(in.text_embeds.element_size());
  args.text_pos = in.text_positions.data_ptr<int64_t>();
  args.visual_pos = in.visual_positions.data_ptr<int64_t>();
  args.out_pos = out_pos.data_ptr<int64_t>();
  args.pos_planes = in.pos_planes;
  args.text_rows = in.text_embeds.size(0);
  args.visual_rows = in.visual_embeds.size(0);
  args.total_rows = T;
  C10_CUDA_CHECK(launch_pack_varlen(args, stream));

  at::Tensor cu = index.narrow(0, plan.off_out_cu, plan.num_requests + 1).to(at::kInt);
  at::Tensor last = index.narrow(0, plan.off_last_token, plan.num_requests).clone();
  return {out, cu, plan.max_seqlen, out_pos, last};
}

}  // namespace autoselect_fast
