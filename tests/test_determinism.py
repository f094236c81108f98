"""--deterministic on every device: the methods' pooling uses fixed windows where the sizes
divide (deterministic CUDA backward), equal in value and gradient to the adaptive pooling it
replaces; what has no deterministic kernel still runs (warn_only) and is named once; the run's
header says which mode it runs in."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from core.seeding import determinism_line, seed_everything
from distiller_zoo.base import avg_pool_to
from distiller_zoo.irg import pool_channels


def value_and_grad(fn, x, seed=1):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))
    return out.detach(), x.grad


@pytest.mark.parametrize("shape,size", [((2, 3, 8, 8), 4), ((2, 3, 8, 8), 2), ((2, 3, 8, 8), 1),
                                        ((2, 3, 8, 4), (2, 2)), ((2, 3, 6, 6), 3), ((2, 3, 7, 7), 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fixed_window_pooling_equals_adaptive_pooling(shape, size, channels_last):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, ours_grad = value_and_grad(lambda t: avg_pool_to(t, size), x)
    ref, ref_grad = value_and_grad(lambda t: F.adaptive_avg_pool2d(t, size), x)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("channels,out", [(8, 4), (12, 4), (6, 6), (10, 4)])
def test_channel_pooling_equals_adaptive_pooling(channels, out):
    x = torch.randn(2, channels, 3, 3, generator=torch.Generator().manual_seed(0))

    def adaptive(t):
        return F.adaptive_avg_pool3d(t.unsqueeze(1), (out, 3, 3)).squeeze(1)

    ours, ours_grad = value_and_grad(lambda t: pool_channels(t, out), x)
    ref, ref_grad = value_and_grad(adaptive, x)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-6, atol=1e-7)


@pytest.fixture
def restore_determinism():
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    with warnings.catch_warnings():
        yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.benchmark = state[2]


def test_deterministic_mode_warns_once_per_operation(restore_determinism):
    """The chosen mode: deterministic kernels with warn_only, cuDNN autotuning off. put_ has no
    deterministic kernel on the CPU either, so it stands in for CUDA's adaptive pooling backward:
    it runs, and torch's warning naming it appears once however often it runs."""
    seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cudnn.benchmark
    x = torch.zeros(4)
    with warnings.catch_warnings(record=True) as caught:
        for _ in range(3):
            x.put_(torch.tensor([1]), torch.tensor([2.0]))
    named = [str(w.message) for w in caught if "deterministic implementation" in str(w.message)]
    assert len(named) == 1 and named[0].startswith("put_ ")
    assert x[1] == 2.0
    assert "warn_only" in determinism_line()
    seed_everything(0, deterministic=False)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
