"""The one place that chooses between the CPU kernels and PyTorch's operators: it says why a
kernel was not used, follows what it says, has one switch, builds the library only when a call
would run on it, and the kernels themselves refuse sizes outside their limits."""
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from titans_lightning import kernels
from titans_lightning.encoder import EncoderLayer
from titans_lightning.kernels import build, cpu

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason="no C++ compiler for the kernels")


@pytest.fixture
def fresh_library():
    """No build attempted yet in this process; the real library again afterwards."""
    build._load.cache_clear()
    yield
    build._load.cache_clear()


def flat_weights(d, h, slots=1, dtype=torch.float32, device="cpu"):
    return torch.zeros(slots, 2 * h * d + h + d, dtype=dtype, device=device)


def layer_parts(d=16, f=64):
    layer = EncoderLayer(d, 2, f, 0.1)
    return layer.linear1, layer.linear2, layer.norm2


def test_why_not_names_devices_dtypes_and_autocast():
    x = torch.randn(2, 5, 16)
    assert kernels.why_not("keys_values", x.to("meta"), torch.zeros(16, 16), torch.zeros(16, 16)
                           ) == ["tensor on meta"]
    assert kernels.why_not("keys_values", x.double(), torch.zeros(16, 16).half(),
                           torch.zeros(16, 16)) == ["float16 tensor", "float64 tensor"]
    linear = nn.Linear(16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.why_not("mac_query", x, linear, True) == ["CPU autocast is on"]


def test_why_not_names_the_sizes_a_kernel_does_not_take():
    """hidden_dim 32: the row kernels take 16-wide rows, and the user is told so."""
    x = torch.randn(4, 12, 32)
    linear1, linear2, norm = layer_parts(d=32)
    assert kernels.why_not("feed_forward_add_norm", x, linear1, linear2, norm, 0.1) == [
        "rows of width 32, the kernel takes 16",
        "linear1 of 32 -> 64 features",
        "a layer norm other than an affine one over 16 features"]
    assert kernels.why_not("attention", torch.randn(4, 300, 48), 2, 0.1) == [
        "windows of 300 tokens, the kernel takes 1 to 256"]
    assert kernels.why_not("attention", torch.randn(4, 12, 48), 8, 0.1) == [
        "head width 2 not among the kernel's (4, 8, 16, 32)"]
    assert kernels.why_not("memory_mlp", torch.randn(1, 5, 16), flat_weights(16, 48)) == [
        "hidden width 48 not among the kernel's (16, 32, 64)"]
    linear1, linear2, norm = layer_parts(f=40)
    assert kernels.why_not("feed_forward_add_norm", torch.randn(3, 16), linear1, linear2, norm,
                           0.0) == ["feed-forward width 40, not a multiple of 16"]
    with pytest.raises(ValueError, match="no operation 'feed_forward'"):
        kernels.why_not("feed_forward", x)


def test_the_switch_turns_every_kernel_off_and_says_so(monkeypatch, fresh_library):
    monkeypatch.setenv(build.SWITCH, "0")
    q = torch.randn(1, 5, 16)
    assert kernels.why_not("memory_mlp", q, flat_weights(16, 32)) == [
        "disabled by TITANS_LIGHTNING_KERNELS=0"]
    assert kernels.why_not("memory_mlp", q.double(), flat_weights(16, 32).double()) == [
        "disabled by TITANS_LIGHTNING_KERNELS=0", "float64 tensor"]
    assert not kernels.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off on purpose: nothing to warn about
        EncoderLayer(16, 2, 32, 0.1)(torch.randn(2, 6, 16))
    assert build._load.cache_info().currsize == 0  # no build was even tried


def test_the_library_is_built_only_when_a_call_would_run_on_it(monkeypatch, tmp_path,
                                                                fresh_library):
    """Tensors the kernels never take (other devices, float64, sizes outside their limits) do
    not build the library; the first float32 CPU call that would run on it does. Without a
    compiler that call warns with what the failure means, and runs on PyTorch's operators."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TITANS_LIGHTNING_CACHE", str(tmp_path))
    layer = EncoderLayer(16, 2, 32, 0.1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no build, so no build failure to warn about
        warnings.simplefilter("ignore", kernels.KernelSizeWarning)  # h = 48 below says so
        layer(torch.randn(2, 6, 16, dtype=torch.double))
        kernels.memory_mlp(torch.randn(1, 5, 16), flat_weights(16, 48))  # h = 48: no kernel
        kernels.why_not("attention", torch.randn(2, 6, 48, device="meta"), 2, 0.0)
    assert build._load.cache_info().currsize == 0
    x = torch.randn(2, 6, 16)
    with pytest.warns(RuntimeWarning, match="CPU kernels could not be built") as caught:
        out = EncoderLayer(16, 2, 32, 0.1)(x)
    message = str(caught[0].message)
    assert "tensors on other devices never use these kernels" in message
    assert out.shape == x.shape and torch.isfinite(out).all()
    (reason,) = kernels.why_not("attention", torch.randn(2, 6, 48), 2, 0.0)
    assert reason.startswith("library not built: ") and "no-such-compiler" in reason


@needs_kernels
def test_each_operation_runs_on_its_kernel_exactly_where_why_not_is_empty(monkeypatch):
    calls = []
    for name in ("attention", "mac_query", "memory_forward", "commit_update"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _r=real, _n=name, **k: calls.append(_n)
                            or _r(*a, **k))
    linear = nn.Linear(16, 16)
    counters = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)
    cases = [
        ("attention", (torch.randn(2, 6, 48), 2, 0.0), kernels.attention),
        ("attention", (torch.randn(2, 6, 48).double(), 2, 0.0), kernels.attention),
        ("attention", (torch.randn(2, 6, 48), 8, 0.0), kernels.attention),
        ("mac_query", (torch.randn(3, 16), linear, True), kernels.mac_query),
        ("mac_query", (torch.randn(3, 16, requires_grad=True), linear, True), kernels.mac_query),
        ("memory_mlp", (torch.randn(1, 5, 16), flat_weights(16, 32)), kernels.memory_mlp),
        ("memory_mlp", (torch.randn(1, 5, 16), flat_weights(16, 24)), kernels.memory_mlp),
        ("commit_update", (torch.zeros(1), torch.zeros(1, 9), torch.zeros(1, 9),
                           torch.zeros(1, 9), *counters), kernels.commit_update),
        ("commit_update", (torch.zeros(2), torch.zeros(1, 9), torch.zeros(1, 9),
                           torch.zeros(1, 9), *counters), kernels.commit_update),
    ]
    for op, args, run in cases:
        calls.clear()
        reasons = kernels.why_not(op, *args)
        run(*args)
        assert bool(calls) == (reasons == []), (op, reasons)
    assert counters[0] == 2  # both commits counted their update, on the kernel or not


@needs_kernels
@pytest.mark.parametrize("d, h", [(d, h) for d in (8, 16, 24, 32, 48) for h in (8, 16, 32, 48, 64,
                                                                                 128)])
def test_the_memory_kernel_refuses_the_widths_the_choice_refuses(d, h):
    q, flat = torch.randn(1, 5, d), flat_weights(d, h)
    if kernels.why_not("memory_mlp", q, flat):
        with pytest.raises(cpu.KernelError, match="titans_mlp_forward does not take these"):
            cpu.memory_forward(q, flat, h, keep=False)
        with pytest.raises(cpu.KernelError, match="titans_mlp_surprise_and_gradient"):
            cpu.surprise_and_gradient(q, q, flat, h)
    else:
        cpu.memory_forward(q, flat, h, keep=False)


@needs_kernels
@pytest.mark.parametrize("heads, tokens", [(16, 12), (8, 12), (4, 12), (1, 12), (2, 256),
                                           (2, 257), (1, 300)])
def test_the_attention_kernel_refuses_the_sizes_the_choice_refuses(heads, tokens):
    qkv = torch.randn(2, tokens, 3 * 16 if heads > 1 else 3 * 64)
    for p in (0.0, 0.1):  # the evaluation and the training kernel
        if kernels.why_not("attention", qkv, heads, p):
            with pytest.raises(cpu.KernelError, match="titans_attention_"):
                cpu.attention(qkv, heads, p)
        else:
            assert cpu.attention(qkv, heads, p).shape == (2, tokens, qkv.shape[-1] // 3)


@needs_kernels
def test_the_feed_forward_kernel_refuses_a_width_not_a_multiple_of_16():
    w1, b1, w2, b2 = torch.randn(40, 16), torch.randn(40), torch.randn(16, 40), torch.randn(16)
    with pytest.raises(cpu.KernelError, match="titans_ffn_forward"):
        cpu.feed_forward(torch.randn(5, 16), w1, b1, w2, b2, 0.0)


def test_every_status_is_checked_with_one_convention():
    cpu._check(0, "k")
    with pytest.raises(MemoryError, match="k could not allocate"):
        cpu._check(1, "k")
    with pytest.raises(cpu.KernelError, match="k does not take these sizes"):
        cpu._check(2, "k")
    with pytest.raises(cpu.KernelError, match="status 5"):
        cpu._check(5, "k")


def test_every_c_function_returns_a_status_that_python_declares():
    """Each exported function of csrc/ returns an int status, and build.py declares it (its
    result is then checked by cpu._check): none is left unchecked or undeclared."""
    returning_int, defined = set(), set()
    for source in build.SOURCES:
        text = source.read_text()
        body = text[text.index('extern "C" {'):]
        returning_int |= set(re.findall(r"^int (titans_\w+)\(", body, flags=re.M))
        defined |= set(re.findall(r"^\w+[\w\s*]* (titans_\w+)\(", body, flags=re.M))
    assert defined == returning_int == set(build.SIGNATURES)


@pytest.fixture
def warned_about_nothing_yet(monkeypatch):
    monkeypatch.setattr(kernels, "_SIZES_WARNED", set())


def size_warnings(model, x):
    """The KernelSizeWarnings of a training forward and an evaluation forward, each warned
    about afresh."""
    kernels._SIZES_WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", kernels.KernelSizeWarning)
        model(x)  # training: the query needs a gradient, which its kernel has not anyway
        with torch.no_grad():
            model(x)
    return [w for w in caught if issubclass(w.category, kernels.KernelSizeWarning)]


def operations(caught):
    return sorted(str(w.message).split(" ")[0] for w in caught)


@needs_kernels
def test_a_model_of_sizes_the_kernels_do_not_take_says_which_operations_lose_them(
        warned_about_nothing_yet):
    """``--model.hidden_dim 32`` used to lose the encoder's and the keys' kernels silently:
    each operation is named once, at the package's line that called it."""
    from titans_lightning import MACTitan
    torch.manual_seed(0)
    x = torch.randn(2, 40, 1)
    wide = MACTitan(hidden_dim=32, dim_feedforward=64, context_window=16)
    caught = size_warnings(wide, x)
    assert operations(caught) == ["add_norm", "feed_forward_add_norm", "keys_values", "mac_query"]
    assert operations(size_warnings(wide.double(), x.double())) == []  # float64: the user's
    assert operations(size_warnings(MACTitan(dim_feedforward=64, context_window=16), x)) == []
    # a memory of width 64 misses the memory kernels too; no warning points inside the kernels
    caught += size_warnings(MACTitan(hidden_dim=64, dim_feedforward=64, context_window=16), x)
    assert {"memory_mlp", "recall_error"} <= set(operations(caught[4:]))
    package = Path(kernels.__file__).parents[1]
    for w in caught:
        assert Path(w.filename).parent in (package, package / "strategies"), w.filename
        assert Path(w.filename).name != "memory_network.py", w.filename


def test_a_refusal_that_other_sizes_would_not_lift_does_not_warn(warned_about_nothing_yet):
    """Only a size stands between these arguments and the kernel, or nothing is said: a query
    that needs a gradient runs on PyTorch whatever its sizes."""
    x = torch.randn(2, 5, 32, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernels.KernelSizeWarning)
        kernels.mac_query(x, nn.Linear(32, 32), True)
    with pytest.warns(kernels.KernelSizeWarning, match="mac_query runs on PyTorch"), \
            torch.no_grad():
        kernels.mac_query(x, nn.Linear(32, 32), True)


def test_the_probe_of_a_strategy_does_not_warn_about_its_own_small_sizes(
        warned_about_nothing_yet):
    from titans_lightning.strategy import probe_strategy
    from titans_lightning.strategies import titans_default
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernels.KernelSizeWarning)
        probe_strategy(titans_default, "titans_default", {"theta": 0.0217})  # not probed yet
    assert not kernels._SIZES_WARNED  # nor keeps a real model of those sizes from warning
