"""Every path on a GPU: run with `pytest -m cuda` on a machine with CUDA (skipped elsewhere).

The default suite stays CPU-only; benchmarks/gpu_check.sh runs these on a lent GPU machine.
"""

import contextlib
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import hafa  # noqa: F401  (registers the models)
from hafa.cli import main
from hafa.layers import LAA
from hafa.ops import cluster_dpc_knn, map2token, merge_tokens, token2map
from hafa.tools import export

pytestmark = pytest.mark.cuda

FAMILIES = ["hafa_pvt_tiny", "hafa_pvt_v2_b1", "hafa_swin_tiny_patch4_window7_224"]
CUDA = torch.device("cuda")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """Partitions equal the CPU's only when float32 matmuls are float32 (TF32 off, torch's default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def sync_is_an_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("seed", range(8))
def test_clustering_gives_the_same_partitions_as_on_cpu(seed):
    g = torch.Generator().manual_seed(seed)
    B, N, C = 2, [49, 196, 784, 4200][seed % 4], [64, 320, 512][seed % 3]
    x = torch.randn(B, N, C, generator=g)
    mask = torch.zeros(B, N, dtype=torch.bool)
    if seed % 2:
        mask[1, N * 3 // 4 :] = True
    cpu = cluster_dpc_knn(x, N // 4, k=5, mask=mask)
    gpu = cluster_dpc_knn(x.to(CUDA), N // 4, k=5, mask=mask.to(CUDA))
    for got, want in zip(gpu, cpu):
        assert torch.equal(got.cpu(), want)


def test_clustering_makes_no_host_device_synchronisation():
    x = torch.randn(2, 4200, 320, device=CUDA)
    cluster_dpc_knn(x, 1050)  # warm-up (allocator, kernels)
    with sync_is_an_error():
        cluster_dpc_knn(x, 1050)


def test_merging_and_the_dictionary_agree_with_cpu():
    g = torch.Generator().manual_seed(0)
    x, scores = torch.randn(2, 196, 64, generator=g), torch.randn(2, 196, generator=g)
    ids, _ = cluster_dpc_knn(x, 49)
    merged = merge_tokens(x, ids, 49, scores)
    merged_gpu = merge_tokens(x.to(CUDA), ids.to(CUDA), 49, scores.to(CUDA))
    torch.testing.assert_close(merged_gpu.cpu(), merged, rtol=1e-5, atol=1e-5)
    for out_size in [(7, 7), (14, 14), (5, 9)]:
        painted = token2map(merged, ids, (14, 14), out_size)
        painted_gpu = token2map(merged_gpu, ids.to(CUDA), (14, 14), out_size)
        torch.testing.assert_close(painted_gpu.cpu(), painted, rtol=1e-5, atol=1e-5)
        back = map2token(painted, ids, (14, 14), 49)
        torch.testing.assert_close(map2token(painted_gpu, ids.to(CUDA), (14, 14), 49).cpu(), back, rtol=1e-5, atol=1e-5)


def test_laa_and_sia_agree_with_cpu():
    torch.manual_seed(0)
    laa = LAA(in_channels=32, out_channels=64, kernel_size=3, stride=2, padding=1)
    with torch.no_grad():
        laa.offset.weight.normal_(std=0.1)  # non-zero offsets: real bilinear sampling
    x = torch.randn(2, 32, 28, 28)
    torch.testing.assert_close(laa.to(CUDA)(x.to(CUDA)).cpu(), laa.cpu()(x), rtol=1e-4, atol=1e-4)
    model = timm.create_model("hafa_pvt_v2_b0", num_classes=10).eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = model.forward_intermediates(images, intermediates_only=True)
        got = model.to(CUDA).forward_intermediates(images.to(CUDA), intermediates_only=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_makes_no_host_device_synchronisation(name):
    model = timm.create_model(name).to(CUDA).eval()
    images = torch.randn(2, 3, 224, 224, device=CUDA)
    with torch.no_grad():
        model(images)
        with sync_is_an_error():
            model(images)


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_and_backward_in_fp32_bf16_and_fp16(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).to(CUDA).train()
    images, labels = torch.randn(4, 3, 224, 224, device=CUDA), torch.arange(4, device=CUDA)
    results = {}
    for amp in ("fp32", "bf16", "fp16"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same stochastic depth draws
        with torch.autocast("cuda", dtype=AUTOCAST.get(amp, torch.float32), enabled=amp in AUTOCAST):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert torch.isfinite(logits).all()
        assert all(torch.isfinite(grad).all() for grad in grads)
        results[amp] = logits.float().detach()
    for amp in ("bf16", "fp16"):
        scale = results["fp32"].abs().max()
        assert (results[amp] - results["fp32"]).abs().max() <= 0.1 * scale + 0.05


def test_cuda_graphs_capture_a_compiled_hafa_model():
    torch._dynamo.reset()
    model = timm.create_model("hafa_pvt_v2_b0", num_classes=10).to(CUDA).eval()
    images = torch.randn(2, 3, 224, 224, device=CUDA)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        expected = model(images)
        for _ in range(3):  # recorded on the second call, replayed after
            got = compiled(images)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_export_of_a_cuda_model_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    model = timm.create_model("hafa_pvt_v2_b0", num_classes=10).to(CUDA).eval()
    example = torch.randn(2, 3, 96, 96, device=CUDA)
    path = str(tmp_path / "model.onnx")
    export.export_onnx(model, example, path)
    differences = export.onnxruntime_differences(path, model.cpu(), [example.cpu()])
    assert max(differences) < 1e-3


def test_bench_runs_on_cuda(tmp_path):
    path = tmp_path / "bench.json"
    argv = ["bench", "--device", "cuda", "--models", "hafa_pvt_v2_b0", "--quick", "--amp", "bf16", "--json", str(path)]
    assert main(argv) == 0
    assert "H100" in path.read_text() or "cuda" in path.read_text()


def test_bench_times_cuda_graphs_on_cuda(tmp_path):
    path = tmp_path / "bench.json"
    argv = ["bench", "--device", "cuda", "--models", "hafa_pvt_v2_b0", "--quick", "--no-train"]
    assert main([*argv, "--compile", "cudagraphs", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["models"]
    assert all(row["latency"]["median_ms"] > 0 for row in rows)


def write_image_folder(root, classes=3, per_split=(6, 3), size=40):
    """A tiny ImageFolder dataset of noise images: enough for a few training steps."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_split):
        for c in range(classes):
            (root / split / f"class_{c}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"class_{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("task", ["classification", "segmentation", "detection"])
def test_each_task_trains_on_cuda(tmp_path, task, amp):
    commands = {
        "classification": ["train", "--data", str(write_image_folder(tmp_path / "data")), "--epochs", "1"],
        "segmentation": ["seg-train", "--iterations", "4", "--batch-size", "4"],  # the embedded scenes
        "detection": ["det-train", "--epochs", "1", "--batch-size", "4"],
    }
    argv = [*commands[task], "--model", "hafa_pvt_v2_b0", "--device", "cuda", "--amp", amp, "--workers", "2"]
    if task == "classification":
        argv += ["--recipe", "mnist_demo", "--img-size", "32", "--batch-size", "4", "--set", "warmup_epochs=0"]
    assert main([*argv, "--output", str(tmp_path / "runs")]) == 0
    assert (tmp_path / "runs" / "hafa_pvt_v2_b0" / "last.pth").exists()
