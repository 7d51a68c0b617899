"""CRMTHead: the map V -> W~ and the W~ cache (computed once per parameter update).

The cache must be invisible: the same values and gradients as computing W~ at every call, and never
a stale W~ after an optimiser step, an in-place edit, ``load_state_dict``, ``.to(...)`` or a DDP
broadcast. Its point is fewer QRs: the tests count them.
"""

from __future__ import annotations

import copy
import datetime
import io
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from crmt_plugin import CRMTError, crmt_loss
from crmt_plugin.head import CRMTHead, normalize_rows, orthonormalize_rows

from helpers import tanh_batch, tanh_model, wrap


@pytest.fixture
def qr_calls(monkeypatch):
    """Counts torch.linalg.qr calls (the head's only QR)."""
    calls = []
    qr = torch.linalg.qr

    def counting(*args, **kwargs):
        calls.append(1)
        return qr(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", counting)
    return calls


def pair(widths, num_classes, dtype=torch.float64, orthonormal=True, seed=0):
    """A cached head and an uncached copy with the same parameters (integration weights spread out)."""
    torch.manual_seed(seed)
    cached = CRMTHead(widths, num_classes, dtype=dtype, orthonormal=orthonormal)
    with torch.no_grad():
        for p in cached.integration.values():
            p.copy_(torch.randn_like(p))
        cached.bias.copy_(torch.randn_like(cached.bias))
    plain = copy.deepcopy(cached)
    plain.cache_directions = False
    return cached, plain


def loss_of(head, x, cotangent):
    """A loss that back-propagates through the fused and every uni-modal logit."""
    fused = head(x)
    unimodal = head.pop_last()["unimodal"]
    return (fused * cotangent[0]).sum() + sum((z * c).sum() for z, c in zip(unimodal.values(), cotangent[1:]))


def grads(head):
    return {n: p.grad.clone() for n, p in head.named_parameters()}


def reference_weight(head, name):
    """W~ computed from the current parameter, without the head's cache."""
    v = head.directions[name].detach()
    return orthonormalize_rows(v) if head.orthonormal_rows[name] else normalize_rows(v)


def assert_fresh(head):
    for name in head.modalities:
        torch.testing.assert_close(head.unimodal_weight(name), reference_weight(head, name), rtol=0, atol=0)


# ============================================================================ the map and the head
@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 6), extra=st.integers(0, 5), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_orthonormalize_rows_properties(k, extra, batch, seed):
    """Orthonormal rows; the identity on rows that already are; a batch equals its items; smooth:
    a small change of V moves W~ a little (the sign fix never flips a row)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, k, k + extra, generator=gen, dtype=torch.float64)
    w = orthonormalize_rows(v)
    torch.testing.assert_close(w @ w.mT, torch.eye(k, dtype=torch.float64).expand(batch, k, k), rtol=0, atol=1e-10)
    torch.testing.assert_close(orthonormalize_rows(w), w, rtol=0, atol=1e-10)
    for i in range(batch):
        torch.testing.assert_close(orthonormalize_rows(v[i]), w[i], rtol=0, atol=1e-12)
    nearby = orthonormalize_rows(v + 1e-7 * torch.randn(v.shape, generator=gen, dtype=torch.float64))
    assert (nearby - w).abs().max() < 1e-4
    unit = normalize_rows(v)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(batch, k, dtype=torch.float64))


def test_forward_is_the_fused_linear_and_keeps_the_unimodal_parts():
    head, _ = pair({"a": 6, "b": 3}, 4)  # K > d_b: unit rows for b
    x = torch.randn(5, 9, dtype=torch.float64)
    out = head(x)
    torch.testing.assert_close(out, F.linear(x, head.fused_weight(), head.bias))
    last = head.pop_last()
    a = head.integration_weights()
    torch.testing.assert_close(out, a[0] * last["unimodal"]["a"] + a[1] * last["unimodal"]["b"] + head.bias)
    torch.testing.assert_close(last["features"]["b"], x[:, 6:])
    assert head.orthonormal_rows == {"a": True, "b": False}
    with pytest.raises(CRMTError, match="was not called"):
        head.pop_last()
    with pytest.raises(CRMTError, match="last dimension 9"):
        head(torch.randn(5, 8, dtype=torch.float64))


def test_unit_row_head_from_linear_reproduces_the_linear_exactly():
    linear = nn.Linear(9, 4).double()
    head = CRMTHead.from_linear(linear, {"a": 6, "b": 3}, orthonormal=False)
    x = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(head(x), linear(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("args, kwargs, message", [
    (({"a": 3}, 4), {}, "at least 2 modalities"),
    (({"a": 3, "b": 2}, 1), {}, "at least 2 classes"),
    (({"a.x": 3, "b": 2}, 4), {}, "without '.'"),
    (({"a": 0, "b": 2}, 4), {}, "positive int"),
    (({"a": 3, "b": 2}, 4), {"integration_init": 0.0}, "integration_init"),
])
def test_bad_construction_raises(args, kwargs, message):
    with pytest.raises(CRMTError, match=message):
        CRMTHead(*args, **kwargs)


# ============================================================================ values and gradients
@settings(max_examples=30, deadline=None)
@given(num_modalities=st.integers(2, 3), num_classes=st.integers(2, 6), orthonormal=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16), data=st.data())
def test_cached_values_and_gradients_equal_the_uncached_map(num_modalities, num_classes, orthonormal, dtype, seed,
                                                            data):
    widths = {f"m{i}": data.draw(st.integers(1, 8), label=f"d{i}") for i in range(num_modalities)}  # K > d too
    cached, plain = pair(widths, num_classes, dtype=dtype, orthonormal=orthonormal, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, sum(widths.values()), generator=gen).to(dtype)
    cotangent = [torch.randn(5, num_classes, generator=gen).to(dtype) for _ in range(num_modalities + 1)]
    for _ in range(2):  # the second pass is a cache hit
        with torch.no_grad():
            torch.testing.assert_close(cached(x), plain(x), rtol=0, atol=0)  # same ops: bitwise
        cached.zero_grad()
        plain.zero_grad()
        loss_of(cached, x, cotangent).backward()
        loss_of(plain, x, cotangent).backward()
        tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
        got, expected = grads(cached), grads(plain)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], **tol, msg=name)


def test_gradcheck_and_gradgradcheck_of_the_cached_map():
    """Finite differences against the cached backward (and the double backward). gradcheck perturbs its
    input through ``.data``, which no version counter sees: the function clears the cache itself, as
    documented for such edits."""
    head = CRMTHead({"a": 6, "b": 4}, 4, dtype=torch.float64)
    x = torch.randn(3, 10, dtype=torch.float64)

    def fn(va, vb):
        head.clear_cache()
        params = {"directions.a": va, "directions.b": vb}
        with torch.no_grad():  # a miss without the graph: the call below is a hit, through the cached backward
            torch.func.functional_call(head, params, (x,))
        out = torch.func.functional_call(head, params, (x,))
        unimodal = head.pop_last()["unimodal"]
        return out, unimodal["a"], unimodal["b"]

    va = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    vb = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (va, vb))
    assert torch.autograd.gradgradcheck(fn, (va, vb))


def test_double_backward_after_an_in_place_edit_is_refused():
    head = CRMTHead({"a": 6, "b": 4}, 3, dtype=torch.float64)
    w = head.unimodal_weight("a")
    (g,) = torch.autograd.grad((w ** 3).sum(), head.directions["a"], create_graph=True)
    w = head.unimodal_weight("a")
    with torch.no_grad():
        head.directions["a"].mul_(2.0)
    with pytest.raises(CRMTError, match="modified in place"):
        torch.autograd.grad((w ** 3).sum(), head.directions["a"], create_graph=True)
    assert torch.isfinite(g).all()


# ============================================================================ hits and misses
def test_one_qr_per_update_shared_by_attack_and_training_forwards(qr_calls):
    """A PGD-AT step: 3 input-gradient passes and the training forward share one QR per modality;
    the optimiser step invalidates it; the gradients equal the uncached step's."""
    crmt, plain = wrap(tanh_model(seed=3)), wrap(tanh_model(seed=3))
    plain.head.cache_directions = False
    crmt.head.clear_cache()  # start cold: the counts below are per step
    x, y = tanh_batch(seed=4)
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (crmt, plain)]
    used = None
    for step in range(3):
        got = []
        for model, optimiser in zip((crmt, plain), optimisers):
            before = len(qr_calls)
            delta = {n: torch.zeros_like(t, requires_grad=True) for n, t in x.items()}
            for _ in range(3):  # the attack: gradients w.r.t. the inputs only
                loss = crmt_loss(model({n: x[n] + delta[n] for n in x}), y)
                g = torch.autograd.grad(loss, list(delta.values()))
                with torch.no_grad():
                    for d, gd in zip(delta.values(), g):
                        d.add_(0.05 * gd.sign())
            optimiser.zero_grad()
            crmt_loss(model({n: x[n] + delta[n].detach() for n in x}), y).backward()
            got.append(([p.grad.clone() for p in model.parameters()], len(qr_calls) - before))
            used = model.head.unimodal_weight("a").detach().clone() if model is crmt else used  # a hit, no QR
            optimiser.step()
        (cached_grads, cached_qrs), (plain_grads, plain_qrs) = got
        assert cached_qrs == 2  # one per modality, this step
        assert plain_qrs == 2 * 4  # uncached: one per modality and forward
        for a, b in zip(cached_grads, plain_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(used, crmt.head.unimodal_weight("a"))  # the last step moved W~
    assert_fresh(crmt.head)


def test_eval_batches_reuse_the_cache_and_pickling_drops_it(qr_calls):
    head = CRMTHead({"a": 6, "b": 5}, 4)
    x = torch.randn(7, 11)
    qr_calls.clear()  # construction orthonormalises the initial directions
    with torch.no_grad():
        first = head(x)
        for _ in range(4):
            torch.testing.assert_close(head(x), first, rtol=0, atol=0)
    assert len(qr_calls) == 2
    buffer = io.BytesIO()
    torch.save(head, buffer)  # a whole-module checkpoint: the weak references are not pickled
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(head)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), first, rtol=0, atol=0)
        torch.testing.assert_close(clone(x), first, rtol=0, atol=0)
    assert len(qr_calls) == 2 + 2 + 2  # each copy factorises its own parameters once


def test_unimodal_weight_hands_out_a_copy_when_detached():
    head = CRMTHead({"a": 6, "b": 5}, 4)
    with torch.no_grad():
        w = head.unimodal_weight("a")
        w.zero_()  # the caller's tensor, not the cache
    assert_fresh(head)


def test_gradient_accumulation_two_forwards_then_two_backwards():
    """Two forwards on one version, then a backward each: every graph owns its backward."""
    cached, plain = pair({"a": 6, "b": 5}, 4)
    x1, x2 = torch.randn(3, 11, dtype=torch.float64), torch.randn(4, 11, dtype=torch.float64)
    for head in (cached, plain):
        l1, l2 = head(x1).square().sum(), head(x2).square().sum()
        l1.backward()
        l2.backward()
    for name, g in grads(plain).items():
        torch.testing.assert_close(grads(cached)[name], g, rtol=1e-12, atol=1e-12)


def test_frozen_directions_and_inference_mode():
    head = CRMTHead({"a": 6, "b": 5}, 4)
    x = torch.randn(3, 11)
    with torch.inference_mode():
        expected = head(x)
    head(x).sum().backward()  # factors computed in inference mode still serve a training forward
    assert all(head.directions[n].grad is not None for n in head.modalities)
    head.directions.requires_grad_(False)
    out = head(x)
    assert out.requires_grad  # through a and b
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_autocast_leaves_the_cache_in_the_parameters_dtype():
    cached, plain = pair({"a": 6, "b": 5}, 4, dtype=torch.float32)
    x = torch.randn(3, 11)
    for head in (cached, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(x)
        z = head.pop_last()["unimodal"]
        assert z["a"].dtype == torch.bfloat16  # the matmuls did run in low precision
        (out.float().square().sum() + sum(t.float().sum() for t in z.values())).backward()
    for name, g in grads(plain).items():
        torch.testing.assert_close(grads(cached)[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert cached.unimodal_weight("a").dtype == torch.float32  # outside autocast: the float32 factors
    assert_fresh(cached)


# ============================================================================ never stale
OPTIMISERS = {
    "sgd-foreach": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, foreach=True),
    "sgd-loop": lambda p: torch.optim.SGD(p, lr=0.5, foreach=False),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.1, fused=True),  # bumps no version counter
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=3),
}


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_no_stale_weight_after_an_optimiser_step(name):
    head = CRMTHead({"a": 6, "b": 5}, 4)
    optimiser = OPTIMISERS[name](head.parameters())
    x = torch.randn(8, 11)
    for _ in range(3):
        def closure():
            optimiser.zero_grad()
            loss = head(x).logsumexp(1).mean()
            loss.backward()
            return loss
        before = head.unimodal_weight("a").detach().clone()
        optimiser.step(closure)
        assert_fresh(head)
        assert not torch.equal(head.unimodal_weight("a"), before)  # it did move


def test_no_stale_weight_after_in_place_edits_load_state_dict_and_to():
    head = CRMTHead({"a": 6, "b": 5}, 4)
    x = torch.randn(3, 11)
    head(x)
    with torch.no_grad():
        head.directions["a"].add_(torch.randn(4, 6))
        head.directions["b"][0, 0] = 3.0
    assert_fresh(head)
    other = CRMTHead({"a": 6, "b": 5}, 4)
    head.load_state_dict(other.state_dict())
    assert_fresh(head)
    torch.testing.assert_close(head(x), other(x), rtol=0, atol=0)
    head.double()
    assert head.unimodal_weight("a").dtype == torch.float64
    assert_fresh(head)
    head.load_state_dict({k: v.clone() for k, v in other.double().state_dict().items()}, assign=True)
    assert_fresh(head)


def test_writes_through_data_need_clear_cache_or_cache_off():
    """Documented limit: ``.data`` writes bypass the version counter; clear_cache() or the switch."""
    head = CRMTHead({"a": 6, "b": 5}, 4)
    before = head.unimodal_weight("a").detach().clone()
    head.directions["a"].data.mul_(-1.0)
    torch.testing.assert_close(head.unimodal_weight("a"), before, rtol=0, atol=0)  # the known limit
    head.clear_cache()
    assert_fresh(head)
    head.directions["a"].data.mul_(-1.0)
    head.cache_directions = False
    assert_fresh(head)


def test_functional_call_uses_the_tensors_it_is_given():
    head = CRMTHead({"a": 6, "b": 5}, 4)
    x = torch.randn(3, 11)
    head(x)
    params = {k: torch.randn_like(v) for k, v in head.named_parameters()}
    out = torch.func.functional_call(head, params, (x,))
    expected = F.linear(x, torch.cat([F.softplus(params[f"integration.{n}"])[:, None]
                                      * orthonormalize_rows(params[f"directions.{n}"]) for n in ("a", "b")], 1),
                        params["bias"])
    torch.testing.assert_close(out, expected)
    per_sample = torch.func.vmap(lambda v: torch.func.functional_call(head, {**params, "directions.a": v}, (x,)))(
        torch.stack([params["directions.a"], 2 * params["directions.a"]]))
    torch.testing.assert_close(per_sample[0], expected)


# ============================================================================ DDP
WORLD = 2
DEADLINE_S = 180  # the whole spawn (importing torch twice on a loaded 2-core box takes a while)


def ddp_steps(rank=None):
    """SGD on a CRMT model; ranks start from different weights (the broadcast must win over the
    cache filled before DDP); every step also runs two input-gradient forwards (an attack)."""
    model = wrap(tanh_model(seed=11 + (rank or 0))).double()
    x, y = tanh_batch(batch=8, dtype=torch.float64, seed=5)
    with torch.no_grad():
        model(x)  # fills the cache with this rank's own directions
    module = DDP(model) if rank is not None else model
    if rank is None:  # the single-process reference: rank 0's weights, the whole batch, no cache
        model.head.cache_directions = False
    optimiser = torch.optim.SGD(module.parameters(), lr=0.2, momentum=0.9)
    stale, weights = [], []
    for step in range(3):
        part = slice(None) if rank is None else slice(4 * rank, 4 * rank + 4)
        xs, ys = {n: t[part] for n, t in x.items()}, y[part]
        for _ in range(2):
            delta = {n: torch.zeros_like(t, requires_grad=True) for n, t in xs.items()}
            torch.autograd.grad(crmt_loss(module({n: xs[n] + delta[n] for n in xs}), ys), list(delta.values()))
        optimiser.zero_grad()
        crmt_loss(module(xs), ys).backward()
        optimiser.step()
        w = model.head.unimodal_weight("a").detach()
        stale.append(float((w - reference_weight(model.head, "a")).abs().max()))
        weights.append(w.clone())
    return {"stale": stale, "weights": weights, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=40))
        result = ddp_steps(rank)
        dist.barrier()
    except Exception:  # noqa: BLE001 - reported by the parent
        result = {"crash": traceback.format_exc()}
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def test_cache_under_ddp_matches_one_uncached_process(tmp_path):
    start = time.monotonic()
    context = mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False)
    while not context.join(timeout=1):
        if time.monotonic() - start > DEADLINE_S:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {WORLD} DDP workers did not finish in {DEADLINE_S} s: deadlock")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank, res in enumerate(ranks):
        assert "crash" not in res, f"rank {rank} crashed:\n{res['crash']}"
    reference = ddp_steps(None)
    for res in ranks:
        assert res["stale"] == [0.0, 0.0, 0.0]
        for w, expected in zip(res["weights"], reference["weights"]):
            torch.testing.assert_close(w, expected, rtol=0, atol=1e-10)
        for key, value in reference["state"].items():
            torch.testing.assert_close(res["state"][key], value, rtol=0, atol=1e-10, msg=key)
