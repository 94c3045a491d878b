"""Run by tests/test_distill.py under torchrun: distil a tiny student with DDP or FSDP2 (gloo) and save its weights."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from helpers import random_model, tiny_arch  # noqa: E402
from tessera.distill import DistillConfig, distill  # noqa: E402
from tessera.importance import random_importance  # noqa: E402
from tessera.prune import PruneTarget, prune  # noqa: E402

CFG = DistillConfig(tokens=16 * 8 * 4, seq_len=16, batch=8, lr=1e-2, warmup_steps=1, eval_every=100,
                    ckpt_every=100)


def make():
    teacher = random_model(tiny_arch(layers=2))
    student = prune(teacher, random_importance(teacher), PruneTarget(ffn=32))
    chunks = torch.randint(0, 96, (32, 16), generator=torch.Generator().manual_seed(7))
    return teacher, student, chunks


if __name__ == "__main__":
    # argv: OUT.safetensors [ddp|fsdp] [CKPT_DIR MAX_STEPS RESUME]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    parallel = sys.argv[2] if len(sys.argv) > 2 else "ddp"
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    max_steps = int(sys.argv[4]) if len(sys.argv) > 4 else None
    resume = len(sys.argv) > 5 and sys.argv[5] == "resume"
    cfg = CFG if ckpt is None else DistillConfig(**{**CFG.__dict__, "ckpt_every": 1})
    teacher, student, chunks = make()
    student, log = distill(teacher, student, chunks, cfg, progress=False, parallel=parallel, ckpt_dir=ckpt,
                           max_steps=max_steps, resume=resume)
    if dist.get_rank() == 0:
        import json

        from safetensors.torch import save_file

        Path(sys.argv[1]).with_suffix(".json").write_text(json.dumps(log))
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, sys.argv[1])
    dist.destroy_process_group()
