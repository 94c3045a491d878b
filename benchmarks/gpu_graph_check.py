"""CUDA-graph decode equals eager decode (fp32, heterogeneous child), on a GPU."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cost_model import children  # noqa: E402
from gpu_check import SMOLLM2, Checks, random_model, require_cuda  # noqa: E402
from tessera.generate import CudaGraphDecode  # noqa: E402

require_cuda()
checks = Checks()
torch.backends.cuda.matmul.allow_tf32 = False
for name, arch in [("parent", SMOLLM2), ("mixed", children(SMOLLM2)["mixed"])]:
    model = random_model(arch).cuda()
    ids = torch.randint(100, 40000, (4, 32), device="cuda")
    outs = []
    for graphs in (False, True):
        model.setup_cache(4, 64)
        with torch.inference_mode():
            tok = model(ids, use_cache=True, last_only=True)[:, -1].argmax(-1, keepdim=True)
            step = CudaGraphDecode(model) if graphs else model.decode_step
            seq, logits = [], []
            for _ in range(16):
                out = step(tok)
                logits.append(out)
                tok = out.argmax(-1, keepdim=True)
                seq.append(tok)
        outs.append((torch.cat(seq, 1), torch.stack(logits)))
        model.reset_cache()
    same = torch.equal(outs[0][0], outs[1][0])
    diff = (outs[0][1] - outs[1][1]).abs().max().item()
    checks.expect(same and diff < 1e-4, f"{name}: CUDA-graph decode tokens equal eager: {same}; max |logit diff| {diff:.2e}")
checks.finish()
