"""meta_nlms with a surprise over a sliding window of chunks (``omega_window``, the Omega rule).

Atlas (Behrouz et al., 2025) fits the memory to a window of recent tokens rather than to the
current chunk alone. Here the window is the current chunk and the ``window - 1`` chunks before
it; every row of the window counts alike, so per slot, over the rows r of chunks t-W+1 .. t:

    keys   = l2normalize(silu(K z))        values = silu(V z)          K, V learned
    loss   = sum_r sum_features (M(k_r) - v_r)^2 / (rows in the window)
    g      = d loss / d w,   g <- g * min(1, c / |g|)                  per slot
    S     <- eta * S - theta * g                                        momentum
    w     <- w0 + alpha * (w - w0) + S                                  decay toward the start

with theta = softplus(.), eta = sigmoid(.), alpha = sigmoid(.) learned scalars and w0 the
learned start (``memory.initial_weights``): the update is meta_nlms's, only the loss differs
(``window = 1`` is meta_nlms).

The past chunks' keys and values are per-slot state of a fixed shape, most recent first:
``past_keys``, ``past_values`` (S, W-1, m, d) and ``past_weight`` (S, W-1, m), the number of
chunk rows each stored row stands for (0 for an empty row), so the loss is
``sum_r weight_r * err_r / sum_r weight_r`` with weight 1 on the current rows. A chunk of R <= m
rows is stored whole, padded with empty rows (the last window group of a sequence is shorter
than the others); a longer one by m evenly strided rows of weight R / m each (an estimate, and
in the MAC model's row order a stride that divides the context window keeps only some window
positions: choose m to hold the chunks). The state starts empty, so the first chunk after
``start_sequences`` (per-sequence scope: every sequence) or ``reset()`` is fitted on its own
rows; the shared memory's window runs on across batches. The chunk is stored by assignment
after the surprise is taken, so an update the harness skips leaves the slot's window as it was
(the skipped chunk never enters it).

Graph: keys and values are K, V applied to the detached layer outputs, so they depend on no
earlier update. They are stored *with* their graph to K and V, which the harness cuts between
forwards (``detach_``), as for the weights: within a forward the outer gradient of K and V is
exact through every chunk of every window (``DIFFERENTIABLE = True``); the shared memory's
first window of a forward holds the previous forward's last chunks as constants, made with
that forward's K and V. In evaluation the stored chunks keep no graph (the harness commits
state outside autograd there).

Under data-parallel training of the shared memory the ranks are weighted by their current
rows, as for the other rules: exact while the ranks hold equal shares of every batch, except in
the first update after the harness copies rank 0's memory to all ranks (start of a stage,
after validation), when every rank's window holds rank 0's past chunks.

Options (``strategy_options``): ``window`` W, chunks in the window including the current one
(2); ``max_rows`` m, rows kept of each past chunk (1024: the benchmark's chunks whole in both
scopes; every past chunk costs m rows of surprise, padding included, so per-sequence runs of
context window 16, whose chunks have 256 rows, take about a third less time with 256);
meta_nlms's ``theta`` (0.1), ``eta`` (0.5), ``alpha`` (0.999) initial values and ``clip`` c (1.0).
"""
import torch
import torch.nn.functional as F

from . import meta_nlms
from .contrastive_ema import strided_rows
from .meta_nlms import apply_update  # the clipped momentum step toward w0, as it is
from .titans_default import compute_keys_values  # the default rule's keys and values

DIFFERENTIABLE = True
DEFAULTS = {"window": 2, "max_rows": 1024, **meta_nlms.DEFAULTS}
PAST = ("past_keys", "past_values", "past_weight")


def init_memory_state(memory, emb_dim):
    meta_nlms.init_memory_state(memory, emb_dim)  # K, V, theta, eta, alpha, momentum, w0
    register_window(memory, emb_dim)


def register_window(memory, emb_dim, rule="omega_window", defaults=DEFAULTS):
    """The past chunks' state (``PAST``), of the shape the options ``window`` and ``max_rows``
    give, or the ``defaults`` of the ``rule`` (refused unless whole numbers >= 1)."""
    window, max_rows = (memory.options.get(k, defaults[k]) for k in ("window", "max_rows"))
    for name, value in (("window", window), ("max_rows", max_rows)):
        if value < 1 or value != int(value):
            raise ValueError(f"{rule} needs a whole number {name} >= 1, got {value!r}")
    shape = (memory.n_slots, int(window) - 1, int(max_rows))  # (S, W-1, m)
    memory.register_state("past_keys", torch.zeros(*shape, emb_dim), per_slot=True)
    memory.register_state("past_values", torch.zeros(*shape, emb_dim), per_slot=True)
    memory.register_state("past_weight", torch.zeros(shape), per_slot=True)


def compute_surprise(memory, keys, values):
    past_keys, past_values, past_weight = (memory.state[n] for n in PAST)
    S, R, _ = keys.shape
    k = torch.cat([keys, past_keys.flatten(1, 2)], dim=1)  # (S, R + (W-1) m, d)
    v = torch.cat([values, past_values.flatten(1, 2)], dim=1)
    weight = torch.cat([keys.new_ones(S, R), past_weight.flatten(1)], dim=1)  # (S, R + (W-1) m)
    err = (memory.retrieve(k) - v).pow(2).sum(-1)  # (S, R + (W-1) m)
    surprise = (err * weight).sum(1) / weight.sum(1)  # (S,)
    remember_chunk(memory, keys, values)
    return surprise


def remember_chunk(memory, keys, values):
    """Slide the window: the chunk (S, R, d) becomes the most recent past chunk, m rows of it
    with their weights, and the oldest one leaves (assigned, never in place)."""
    if memory.state["past_weight"].shape[1] == 0:  # window 1: nothing to remember
        return
    m = memory.state["past_weight"].shape[2]
    S, R, _ = keys.shape
    if R > m:
        rows = strided_rows(R, m, keys.device)
        keys, values = keys[:, rows], values[:, rows]  # (S, m, d)
        weight = keys.new_full((S, m), R / m)
    else:
        keys, values = (F.pad(t, (0, 0, 0, m - R)) for t in (keys, values))  # (S, m, d)
        weight = F.pad(keys.new_ones(S, R), (0, m - R))  # (S, m)
    for name, new in zip(PAST, (keys, values, weight)):
        old = memory.state[name]  # (S, W-1, m, ...)
        memory.state[name] = torch.cat([new.unsqueeze(1), old[:, :-1]], dim=1)
