"""Where a GPU forward's time goes: torch.profiler's CUDA kernel table for a HAFA model and its baseline.

python benchmarks/profile_cuda.py --models hafa_pvt_tiny --batch 1 --amp bf16
"""

import argparse

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import hafa  # noqa: F401  (registers the models)
from hafa.models.table import BASELINE

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def kernel_table(name: str, batch: int, amp: str, img_size: int, rows: int) -> tuple[float, str]:
    """(CUDA ms of one forward, the top kernels by CUDA time) after warm-up."""
    model = timm.create_model(name).cuda().eval()
    images = torch.randn(batch, 3, img_size, img_size, device="cuda")
    dtype = AMP[amp]
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(5):
            model(images)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(images)
            torch.cuda.synchronize()
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    total_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    table = averages.table(sort_by="self_cuda_time_total", row_limit=rows)
    return total_ms, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["hafa_pvt_tiny"], help="HAFA models (with their baselines)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--amp", choices=tuple(AMP), default="none")
    parser.add_argument("--rows", type=int, default=25, help="kernels listed per model")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, autocast {args.amp}")
    for name in args.models:
        for model in (BASELINE[name], name):
            total_ms, table = kernel_table(model, args.batch, args.amp, args.img_size, args.rows)
            print(f"\n## {model}: {total_ms:.2f} ms of CUDA kernels in one forward\n{table}")


if __name__ == "__main__":
    main()
