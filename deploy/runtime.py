"""Running a network in PyTorch or ONNX Runtime (CPU execution provider) over a tensor of images,
batch by batch, and timing it: the median of timed runs after untimed warm-up runs."""
import statistics
import time

import torch

try:  # the optional deploy extra; deploy.extras.require() names the install command when missing
    import onnxruntime as ort
except ImportError:
    ort = None

ORT_INPUT = "images"


def ort_session(path, threads=None):
    """A CPU session with ONNX Runtime's full graph optimisation (it fuses QDQ pairs into int8 kernels)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(session):
    """images (torch, CPU) -> logits (torch) through `session`."""
    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {ORT_INPUT: images.numpy()})[0])
    return run


def torch_runner(model):
    @torch.inference_mode()
    def run(images: torch.Tensor) -> torch.Tensor:
        return model(images).float()
    return run


def batched_logits(run, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([run(chunk) for chunk in images.split(batch_size)])


def latency_stats(run, inputs, runs: int, warmup: int, sync=lambda: None) -> tuple:
    """(median, first quartile, third quartile) of the wall times of `runs` calls of run(inputs)
    after `warmup` untimed calls, in ms; `sync` waits for an asynchronous device (CUDA)."""
    for _ in range(warmup):
        run(inputs)
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(inputs)
        sync()
        times.append(1000.0 * (time.perf_counter() - start))
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, _, q3 = statistics.quantiles(times, n=4)
    return statistics.median(times), q1, q3


def median_ms(run, inputs, runs: int, warmup: int) -> float:
    return latency_stats(run, inputs, runs, warmup)[0]


def random_batch(batch: int, input_shape) -> torch.Tensor:
    """A fixed random input: latency does not depend on the pixel values."""
    return torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
