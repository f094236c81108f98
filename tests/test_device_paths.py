"""Every device-specific branch of the trainer, run on the CPU in CI (and on CUDA too where one
is present, through the `device` fixture): fp16 autocast with an enabled gradient scaler,
torch.compile, fused SGD, the execution choice for a CUDA device, the DDP wrapper (Gloo, one
process), the JPEG loader's fallback decoder, and the scaler's state across a resume."""
import copy
import gc
import io
import sys
import time
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import engine.trainer
import train_student
import train_teacher
from conftest import ROOT, crash_after_checkpoint, fast_args
from core.distributed import Context
from dataset.image_codec import DECODE_ERRORS, decode_jpegs
from dataset.jpeg_decode import decode_rgb
from engine import student_run
from engine.build import build_model
from engine.checkpoint import save_checkpoint
from engine.loop import train_epoch
from engine.optim import build_sgd
from engine.precision import grad_scaler, resolve_execution
from engine.session import build_data
from engine.task import SupervisedTask
from engine.trainer import Prepared, Stage, wrap_ddp

BATCH = 8
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def distill_task(tmp_path, device, method_flags):
    """(task, one training batch) of resnet8x4 -> resnet8 on digits, built as a run builds it."""
    torch.manual_seed(0)
    ckpt = tmp_path / "resnet8x4.pth"
    save_checkpoint({"model": build_model("resnet8x4", 10).state_dict(), "arch": "resnet8x4"}, ckpt)
    args = train_student.parse_args(["--dataset", "digits", "--model_s", "resnet8", "--path_t", str(ckpt),
                                     "--batch_size", str(BATCH), "--loader", "memory", "--seed", "0",
                                     "--device", device.type, *method_flags])
    run = student_run.configure(vars(args))
    ctx = Context(device=device)
    loader, _, info = build_data(run.config, ctx, run.objective.needs)
    task = student_run.build_task(run, ctx, loader, info)
    loader.set_epoch(1)
    return task, next(iter(loader))


def teacher_task(device):
    torch.manual_seed(0)
    images = torch.rand(BATCH, 3, 32, 32, device=device)
    return SupervisedTask(build_model("resnet8", 10).to(device), 10), (images, torch.arange(BATCH, device=device) % 10)


def step(task, batch, device, amp_dtype, scaler=None, module=None):
    """One trainer step (engine.loop.train_epoch) of `module` (default: the task itself) with an
    lr-0 SGD, so the gradients stay in .grad; returns the epoch's means."""
    module = module or task
    module.train()
    task.keep_frozen_in_eval()
    optimizer = torch.optim.SGD(task.main_parameters(), lr=0.0)
    scaler = scaler or grad_scaler(device, amp_dtype)
    return train_epoch(module, [batch], optimizer, scaler, device=device, amp_dtype=amp_dtype,
                       channels_last=False, print_freq=10**9, desc="test", show_progress=False)


def flat_grad(task):
    return torch.cat([p.grad.reshape(-1) for p in task.main_parameters()])


@pytest.fixture(scope="module")
def kd_crd(tmp_path_factory):
    return distill_task(tmp_path_factory.mktemp("t"), torch.device("cpu"),
                        ["--distill", "crd", "-a", "0.9", "--nce_k", "32"])


def test_fp16_autocast_with_an_enabled_scaler(device, kd_crd):
    """The fp16 path: the scaler is on, scales the loss, unscales the gradients before the step
    (they match fp32's), and an overflowing step is skipped and the scale halved."""
    task, batch = kd_crd
    task = copy.deepcopy(task).to(device)
    batch = [t.to(device) for t in batch]
    reference = copy.deepcopy(task)
    step(reference, batch, device, None)
    scaler = grad_scaler(device, torch.float16)
    assert scaler.is_enabled() and not grad_scaler(device, torch.bfloat16).is_enabled()
    means = step(task, batch, device, torch.float16, scaler=scaler)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in means.items() if k.startswith("train_"))
    fp16, fp32 = flat_grad(task).double(), flat_grad(reference).double()
    if torch.isfinite(fp16).all():  # the step was taken with unscaled gradients
        assert scaler.get_scale() == 2.0 ** 16
        assert F.cosine_similarity(fp16, fp32, dim=0) > 0.99
    else:                           # the step was skipped and the scale backed off
        assert scaler.get_scale() == 2.0 ** 15


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["teacher", "kd", "crd"])
def test_one_compiled_step_equals_the_eager_step(kind, tmp_path):
    """torch.compile of the networks (Inductor on the CPU) gives the eager step's loss and
    gradients. Slow: Inductor's first compilation on a machine took 207 s (teacher), 54 s (KD)
    and 6 s (CRD, the same networks as KD) on the loaded 2-core CI machine, and 2.7, 2.1 and
    1.2 s once Inductor's on-disk cache held them; run with --runslow (make test-slow)."""
    cpu = torch.device("cpu")
    if kind == "teacher":
        task, batch = teacher_task(cpu)
    else:
        flags = ["--distill", "kd"] if kind == "kd" else ["--distill", "crd", "--nce_k", "32"]
        task, batch = distill_task(tmp_path, cpu, flags)
    eager = copy.deepcopy(task)
    torch._dynamo.reset()
    task.compile_networks()
    start = time.perf_counter()
    compiled_means = step(task, batch, cpu, None)
    seconds = time.perf_counter() - start
    eager_means = step(eager, batch, cpu, None)
    assert compiled_means["train_loss"] == pytest.approx(eager_means["train_loss"], rel=1e-4)
    torch.testing.assert_close(flat_grad(task), flat_grad(eager), rtol=1e-3, atol=1e-5)
    print(f"{kind}: first compiled step {seconds:.1f} s")


def test_fused_sgd_for_a_cuda_device_equals_foreach():
    """engine.optim picks fused SGD for a CUDA device and foreach elsewhere; the fused kernel
    (it runs on the CPU too) takes the same step."""
    args = SimpleNamespace(learning_rate=0.1, momentum=0.9, weight_decay=5e-4)
    nets = [build_model("resnet8", 10) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    fused = build_sgd(nets[0].parameters(), args, torch.device("cuda"))
    foreach = build_sgd(nets[1].parameters(), args, torch.device("cpu"))
    assert fused.param_groups[0]["fused"] and foreach.param_groups[0]["foreach"]
    images = torch.rand(4, 3, 32, 32)
    for net, optimizer in zip(nets, (fused, foreach)):
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(net(images), torch.arange(4)).backward()
            optimizer.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_execution_choice_for_a_cuda_device():
    """A CUDA device needs no probe: bf16 and channels_last unless the flags say otherwise."""
    cuda, net = torch.device("cuda"), build_model("resnet8", 10)

    def no_probe():
        raise AssertionError("CUDA's defaults measure nothing")

    auto = resolve_execution(None, None, cuda, net, [], no_probe)
    assert (auto.amp_dtype, auto.channels_last, auto.reason) == (torch.bfloat16, True, "CUDA defaults")
    fp16 = resolve_execution("fp16", False, cuda, net, [], no_probe)
    assert (fp16.amp_dtype, fp16.channels_last, fp16.reason) == (torch.float16, False, "as asked")
    assert resolve_execution("off", None, cuda, net, [], no_probe).amp_dtype is None


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapper_over_gloo(gloo_group, kd_crd):
    """The trainer's DDP wrapper (one process, Gloo) takes the unwrapped task's step: same loss
    terms, same gradients (the all-reduce over one rank averages nothing)."""
    task, batch = kd_crd
    plain, wrapped = copy.deepcopy(task), copy.deepcopy(task)
    cpu = torch.device("cpu")
    plain_means = step(plain, batch, cpu, None)
    ddp_means = step(wrapped, batch, cpu, None, module=wrap_ddp(wrapped, cpu))
    assert ddp_means["train_loss"] == pytest.approx(plain_means["train_loss"], rel=1e-6)
    torch.testing.assert_close(flat_grad(wrapped), flat_grad(plain))


def encoded(image: Image.Image, fmt: str) -> torch.Tensor:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def test_jpeg_batch_with_a_png_and_a_cmyk_file_falls_back(device):
    """ImageNet holds a PNG named .JPEG and CMYK JPEGs: a batch with them is decoded file by file,
    every image 3 x H x W uint8 on the device, the PNG's pixels exactly PIL's."""
    rgb = Image.frombytes("RGB", (6, 4), bytes(range(72)))
    files = [encoded(rgb, "JPEG"), encoded(rgb, "PNG"), encoded(rgb.convert("CMYK"), "JPEG")]
    images = decode_rgb(files, device)
    assert [tuple(i.shape) for i in images] == [(3, 4, 6)] * 3
    assert all(i.dtype == torch.uint8 and i.device.type == device.type for i in images)
    png = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(4, 6, 3).permute(2, 0, 1)
    assert torch.equal(images[1].cpu(), png)
    with pytest.raises(DECODE_ERRORS):  # the batch call itself refuses the PNG: the fallback ran
        decode_jpegs(files, device)


def test_scaler_state_is_saved_and_restored(tmp_path, monkeypatch):
    """A run with loss scaling keeps the scaler's state in its checkpoint and a resumed run
    starts from it. The run is fp32 with the scaler forced on (fp16 convolutions are emulated
    on the CPU, 20x slower): the scaler's path is the same, and scaling fp32 gradients by a
    power of two and back changes no bit of them."""
    monkeypatch.setattr(engine.trainer, "grad_scaler", lambda device, dtype: torch.amp.GradScaler(device.type))
    real_load, loaded = torch.amp.GradScaler.load_state_dict, []

    def load(scaler, state):
        loaded.append(dict(state))
        real_load(scaler, state)

    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", load)
    argv = fast_args(tmp_path, "--model", "resnet8", "--epochs", "1", "--batch_size", "256", "--amp", "off",
                     "--no-channels_last", "--run_name", "scaled")
    crash_after_checkpoint(train_teacher.main, argv, monkeypatch, epoch=1)
    saved = torch.load(tmp_path / "teachers" / "scaled" / "ckpt_last.pth", weights_only=False)["scaler"]
    assert saved["scale"] == 2.0 ** 16 and saved["_growth_tracker"] > 0  # steps counted since the start
    train_teacher.main(fast_args(tmp_path, "--resume", str(tmp_path / "teachers" / "scaled")))
    assert loaded == [saved]


def test_a_finished_stage_releases_its_ddp_wrapper(gloo_group):
    """An init stage's DDP wrapper (over parameters the main stage's wrapper shares) is dropped
    when its stage ends, so it holds no gradient buckets or hooks through the main stage."""
    prepared = Prepared(execution=None, scaler=None, ctx=Context(device=torch.device("cpu"), world_size=2))
    net = build_model("resnet8", 10)
    task = SupervisedTask(net, 10)
    params = list(net.parameters())
    wrapper = prepared.wrap(task, net, params)
    assert prepared.wrap(task, net, params) is wrapper  # one wrapper per module while its stage runs
    assert not wrapper.find_unused_parameters
    alive = weakref.ref(wrapper)
    del wrapper
    prepared.unwrap(net)
    gc.collect()
    assert alive() is None and prepared._ddp == {}


@pytest.mark.parametrize("method,expected", [("kd", {"main": False}), ("ft", {"init_ft": True, "main": True}),
                                             ("ab", {"init_ab": True, "main": False}),
                                             ("fitnet:0", {"main": True}), ("sskd", {"init_sskd": True, "main": True})])
def test_ddp_looks_for_unused_parameters_where_a_stage_has_some(method, expected):
    """find_unused_parameters per stage, as the task decides it, is whether a step really leaves a
    trainable parameter of the stage's module without a gradient (FT's paraphraser in the main
    stage, the student's classifier in an init stage, a term switched off by a zero weight)."""
    task, inputs = gpu_check.method_inputs(method, "resnet20", "resnet8", 2, torch.device("cpu"))
    stages = task.init_stages() + [Stage("main", 1, task, task.main_parameters())]
    decided, actual = {}, {}
    for stage in stages:
        trainable = [p for p in stage.module.parameters() if p.requires_grad]
        loss = stage.module(*inputs)[0]["loss"]
        actual[stage.name] = any(g is None for g in torch.autograd.grad(loss, trainable, allow_unused=True))
        decided[stage.name] = task.has_unused_parameters(stage.module, stage.params)
    assert decided == actual == expected
