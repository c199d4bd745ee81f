"""MACTitan against a plain per-window implementation of the reference model, and causality."""
import pytest
import torch
import torch.nn.functional as F

from titans_lightning import MACTitan

C, B = 4, 2  # window 4: a sequence of T steps has T-3 windows, in groups of 4 and a last, shorter one
T = 19  # 16 windows: four full groups (the parametrised test adds short last groups)


def small_model(**kw) -> MACTitan:
    torch.manual_seed(0)
    kw = {"context_window": C, "dim_feedforward": 24, "strategy_options": {"theta": 0.3}, **kw}
    return MACTitan(**kw).double().eval()


def mlp(w, q):
    """The memory MLP written out: Linear(16, 32) -> SiLU -> Linear(32, 16), slot 0."""
    h = F.silu(q @ w["w1"][0].T + w["b1"][0])
    return h @ w["w2"][0].T + w["b2"][0]


def reference_update(memory, w, momentum, z):
    """The reference's default update on rows z (R, d), written out with plain autograd."""
    K, V = memory.state["key_proj"], memory.state["value_proj"]
    keys = F.normalize(F.silu(z @ K.T), dim=-1)
    values = F.silu(z @ V.T)
    with torch.enable_grad():
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in w.items()}
        loss = (mlp(leaves, keys) - values).pow(2).mean(0).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
    new_w, new_m = {}, {}
    for (n, t), g in zip(w.items(), grads):
        new_m[n] = 0.9 * momentum[n] - 0.3 * g
        new_w[n] = 0.999 * t + new_m[n]
    return new_w, new_m


def library_encoder(layer):
    """The library's own encoder layer, carrying the MAC layer's trained weights."""
    d = layer.query.in_features
    ref = torch.nn.TransformerEncoderLayer(d, 2, layer.attention.linear1.out_features, 0.1,
                                           activation=F.silu, batch_first=True)
    ref.load_state_dict(layer.attention.state_dict())
    return ref.double().eval()


def reference_layer(layer, windows, w, momentum, order="reference"):
    """One MAC layer over a list of windows, one window at a time, then one memory update; the
    gate reads the memory after the update (reference order) or before it (causal)."""
    encoder = library_encoder(layer)
    ys = []
    for x in windows:  # x: (C, d)
        q = F.silu(F.normalize(layer.query(x), dim=-1))
        h = mlp(w, q)
        ctx = torch.cat([layer.persistent, h, x])[None]  # (1, P+2C, d)
        ys.append(layer.project(F.silu(encoder(ctx)).flatten()).view(C, -1))
    new_w, momentum = reference_update(layer.memory, w, momentum, torch.cat(ys))
    gate = new_w if order == "reference" else w
    outs = [y * torch.sigmoid(mlp(gate, F.normalize(layer.query(y), dim=-1))) for y in ys]
    return outs, new_w, momentum


def per_window_forward(model, inputs, order, sequences):
    """The reference's forward, one window at a time, with one memory for ``sequences``: the
    predictions (B, T, 1) at those sequences' rows, and the memories' final weights."""
    T = inputs.shape[1]
    mems = [m.weights for m in model.memories]  # the starting weights
    moms = [{n: torch.zeros_like(t) for n, t in m.items()} for m in mems]
    expected = torch.zeros(inputs.shape, dtype=torch.double)
    emb = model.emb(inputs)
    for start in range(C - 1, T, C):  # windows grouped by C consecutive end positions
        ends = [(b, t) for b in sequences for t in range(start, min(start + C, T))]
        xs = [emb[b, t - C + 1:t + 1] for b, t in ends]
        for i, layer in enumerate(model.layers):
            outs, mems[i], moms[i] = reference_layer(layer, xs, mems[i], moms[i], order)
            xs = [x + F.silu(o) for x, o in zip(xs, outs)]
        for (b, t), x in zip(ends, xs):
            expected[b, t] = model.head(x.flatten())
    return expected, mems


@pytest.mark.parametrize("scope", ["shared", "per_sequence"])
@pytest.mark.parametrize("order", ["reference", "causal"])
@pytest.mark.parametrize("T", [17, 18, 19, 20])  # last group of 2, 3, 4 (full) and 1 windows
def test_chunked_forward_equals_per_window_loop(T, order, scope):
    model = small_model(mac_order=order, memory_scope=scope)
    inputs = torch.randn(B, T, 1, dtype=torch.double)
    with torch.no_grad():
        if scope == "shared":  # one memory for the whole batch
            expected, mems = per_window_forward(model, inputs, order, range(B))
        else:  # each sequence its own, from the starting weights
            runs = [per_window_forward(model, inputs, order, [b]) for b in range(B)]
            expected = sum(run[0] for run in runs)
            mems = [{n: torch.cat([run[1][i][n] for run in runs]) for n in runs[0][1][i]}
                    for i in range(len(model.memories))]
        preds, valid = model(inputs)
    assert torch.equal(valid, torch.arange(T) >= C - 1)
    torch.testing.assert_close(preds, expected, rtol=1e-9, atol=1e-10)
    for memory, w in zip(model.memories, mems):
        for n, t in memory.weights.items():
            torch.testing.assert_close(t, w[n], rtol=1e-9, atol=1e-11)


def test_last_short_group_and_invalid_positions():
    model = small_model()
    preds, valid = model(torch.randn(B, 10, 1, dtype=torch.double))  # 7 windows: groups 4 + 3
    assert valid.tolist() == [False] * (C - 1) + [True] * (10 - C + 1)
    assert int(model.memories[0].num_updates) == 2
    assert torch.all(preds[:, : C - 1] == 0)


def predictions_after_change(order: str, t: int):
    model = small_model(mac_order=order)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(B, 27, 1, dtype=torch.double)
    with torch.no_grad():
        before, _ = model(x)
        model.load_state_dict(state)
        x[:, t + 1:] += torch.randn_like(x[:, t + 1:])
        after, _ = model(x)
    return (before - after).abs().amax(dim=(0, 2))  # (T,)


@pytest.mark.parametrize("t", [5, 9, 14, 20])
def test_causal_order_is_causal_per_step(t):
    diff = predictions_after_change("causal", t)
    assert torch.all(diff[: t + 1] == 0)
    assert diff[t + 1:].max() > 0


@pytest.mark.parametrize("t", [6, 10, 14])  # last window of a group: 6 ends group 1, 10 group 2
def test_reference_order_is_causal_per_group(t):
    diff = predictions_after_change("reference", t)
    assert torch.all(diff[: t + 1] == 0)


def test_reference_order_gate_sees_its_own_group():
    """Documented property of the published model: inside a group the gate has seen later steps."""
    diff = predictions_after_change("reference", 8)  # group 2 ends at t=10
    assert diff[7:9].max() > 0


def test_outer_gradients_reach_query_but_not_fast_weights():
    model = small_model().train()
    preds, valid = model(torch.randn(B, T, 1, dtype=torch.double))
    preds[:, valid].sum().backward()
    layer = model.layers[0]
    assert layer.query.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())
    assert not any(b.requires_grad for b in model.buffers())
    names = {n for n, _ in model.named_parameters()}
    assert not any("fast_weights" in n or "key_proj" in n for n in names)


@pytest.mark.parametrize("memory_layers", [1, 2])
@pytest.mark.parametrize("input_dim,context_window,pm_len", [(5, 3, 2), (1, 8, 4)])
def test_any_shape(memory_layers, input_dim, context_window, pm_len):
    model = MACTitan(input_dim=input_dim, context_window=context_window, pm_len=pm_len,
                     memory_layers=memory_layers, dim_feedforward=16, hidden_dim=8, nhead=2)
    preds, valid = model(torch.randn(3, 21, input_dim))
    assert preds.shape == (3, 21, 1) and valid.sum() == 21 - context_window + 1
    assert torch.isfinite(preds).all()


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="--model.memory_scope='global' is not allowed"):
        MACTitan(memory_scope="global")
    with pytest.raises(ValueError, match="--model.mac_order='sideways' is not allowed"):
        MACTitan(mac_order="sideways")
    with pytest.raises(ValueError, match="shorter than the context window 16"):
        MACTitan(dim_feedforward=8)(torch.randn(1, 10, 1))


def test_per_sequence_memory_ignores_the_other_sequences():
    model = small_model(memory_scope="per_sequence")
    x = torch.randn(3, T, 1, dtype=torch.double)
    with torch.no_grad():
        together, _ = model(x)
        slots = model.memories[1].fast_weights.clone()
        other = x.clone()
        other[[0, 2]] = torch.randn_like(other[[0, 2]])
        swapped, _ = model(other)
        alone, _ = model(x[1:2])
    torch.testing.assert_close(swapped[1], together[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(alone[0], together[1], rtol=1e-10, atol=1e-12)
    assert slots.shape[0] == 3 and not torch.equal(slots[0], slots[1])
    torch.testing.assert_close(model.memories[1].fast_weights[0], slots[1], rtol=1e-10, atol=1e-12)


def test_per_sequence_memory_starts_every_batch_from_the_initial_weights():
    model = small_model(memory_scope="per_sequence")
    x = torch.randn(2, T, 1, dtype=torch.double)
    with torch.no_grad():
        first, _ = model(x)
        second, _ = model(x)
    assert torch.equal(first, second)
