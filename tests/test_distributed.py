"""CRMT under torch.distributed: 2 CPU processes (gloo) against a single-process run on the union.

One spawn per module (the workers run every scenario and save what they saw); the tests below
compare it with single-process references computed here. Training uses a model *without*
BatchNorm: with BatchNorm every rank normalises with its own batch statistics, so DDP and one
process differ by design (SyncBatchNorm fixes that, but it only runs on GPUs).
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from crmt_plugin import CRMTWrapper, LipschitzConstants, crmt_loss

from conftest import LateFusion

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 12
NUM_CLASSES = 4
IN_DIMS = {"audio": 5, "image": 7}
WIDTHS = {"audio": 6, "image": 8}
DECLARED = {"audio": 2.0, "image": 3.0}
DEADLINE_S = 90  # the whole spawn; a deadlock fails the tests instead of hanging CI


def make_model(seed: int = 0, batchnorm: bool = False) -> CRMTWrapper:
    """Tanh MLP encoders, float64, no BatchNorm / Dropout: DDP must equal one process exactly."""
    torch.manual_seed(seed)
    norm = (lambda: nn.BatchNorm1d(10)) if batchnorm else nn.Identity
    encoders = {n: nn.Sequential(nn.Linear(IN_DIMS[n], 10), norm(), nn.Tanh(), nn.Linear(10, WIDTHS[n]))
                for n in IN_DIMS}
    model = LateFusion(encoders, WIDTHS, NUM_CLASSES).double()
    return CRMTWrapper(model, head="fusion.fc", modalities=WIDTHS)


def make_data(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    inputs = {name: torch.randn(n, d, generator=gen, dtype=torch.float64) for name, d in IN_DIMS.items()}
    return inputs, torch.randint(0, NUM_CLASSES, (n,), generator=gen)


def take(batch, index):
    inputs, y = batch
    return {n: t[index].clone() for n, t in inputs.items()}, y[index].clone()


def train_batches():
    return [make_data(GLOBAL_BATCH, seed=100 + s) for s in range(STEPS)]


FILL = {name: torch.full((d,), 0.5, dtype=torch.float64) for name, d in IN_DIMS.items()}


def train(module, params_owner: CRMTWrapper, batches, rank=None, fill=None):
    """SGD with momentum on crmt_loss (+ ``params_owner.missing_fill_loss(fill)`` when ``fill`` is given);
    ``rank`` given: this rank's half of every global batch."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    params_owner.check_optimizer(optimizer)
    for batch in batches:
        if rank is not None:
            half = GLOBAL_BATCH // WORLD
            batch = take(batch, slice(rank * half, (rank + 1) * half))
        inputs, y = batch
        loss = crmt_loss(module(inputs), y, rho=2.0, margin_target=1.0)  # pinned: not the defaults under test
        if fill is not None:  # the same term on every rank: DDP's average of it is the term itself
            loss = loss + params_owner.missing_fill_loss(fill)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in params_owner.state_dict().items()}


# Per rank: the Lipschitz loaders (uneven: 2 batches / 1 batch; and rank 1 empty), and the step-2
# data (uneven: 20 / 12 samples; and rank 1 empty).
LIP_SPLIT = {0: [(0, 5), (5, 9)], 1: [(9, 16)]}
FIT_SPLIT = {0: (0, 20), 1: (20, 32)}
FIT_KW = dict(epochs=6, lr=5e-2, batch_size=64)


def lip_data():
    return make_data(16, seed=7)


def fit_data():
    return make_data(32, seed=8)


def _capture(fn):
    """Run ``fn``; return ("ok", value) or ("error", type name, message) -- never hang the test."""
    try:
        return ("ok", fn())
    except Exception as exc:  # noqa: BLE001 - recorded and compared in the parent
        return ("error", type(exc).__name__, str(exc))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    results = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=40))
        # -- step 1 under DDP: wrap with CRMT first, then DDP; optimizer from ddp.parameters()
        crmt = make_model()
        ddp = DDP(crmt)
        results["output_type"] = type(ddp(take(make_data(2, 0), slice(None))[0])).__name__
        results["train"] = train(ddp, crmt, train_batches(), rank=rank)
        results["ddp_keys"] = list(ddp.state_dict())[:3]
        filled = make_model()
        results["train_fill"] = train(DDP(filled), filled, train_batches(), rank=rank, fill=FILL)

        for kwargs_name, kwargs in (("unused", {"find_unused_parameters": True}), ("static", {"static_graph": True})):
            other = make_model()
            results[f"train_{kwargs_name}"] = train(DDP(other, **kwargs), other, train_batches(), rank=rank)

        # -- BatchNorm: per-rank statistics; SyncBatchNorm (GPU only in torch <= 2.13)
        bn = make_model(batchnorm=True)
        results["train_bn"] = train(DDP(bn), bn, train_batches(), rank=rank)
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(make_model(batchnorm=True))
        results["train_syncbn"] = _capture(lambda: train(DDP(sync), sync, train_batches(), rank=rank))

        # -- Lipschitz: max over ranks, uneven and empty ranks
        inputs, y = lip_data()
        mine = [take((inputs, y), slice(a, b)) for a, b in LIP_SPLIT[rank]]
        results["lip_uneven"] = _capture(lambda: crmt.estimate_lipschitz(mine).values)
        results["lip_one_empty"] = _capture(
            lambda: crmt.estimate_lipschitz(mine if rank == 0 else []).values)
        results["lip_all_empty"] = _capture(lambda: crmt.estimate_lipschitz([]).values)
        bad = [take((inputs, y), slice(a, b)) for a, b in LIP_SPLIT[rank]]
        if rank == 1:
            bad[0][0]["image"][0, 0] = float("nan")
        results["lip_nan_one_rank"] = _capture(lambda: crmt.estimate_lipschitz(bad).values)

        # -- step 2: objective averaged over all ranks' samples
        lip = LipschitzConstants.declared(DECLARED)
        state = {k: v.clone() for k, v in crmt.state_dict().items()}

        def fit(loader, **kw):
            crmt.load_state_dict(state)
            result = crmt.fit_integration(loader, lipschitz=lip, generator=torch.Generator().manual_seed(0),
                                          **{**FIT_KW, **kw})
            return result, crmt.head.integration_weights().detach().clone()

        inputs, y = fit_data()
        a, b = FIT_SPLIT[rank]
        mine = [take((inputs, y), slice(a, b))]
        results["fit_uneven"] = _capture(lambda: fit(mine))
        results["fit_one_empty"] = _capture(lambda: fit(mine if rank == 0 else []))
        results["fit_small_batches"] = _capture(lambda: fit(mine, batch_size=8))  # 3 vs 2 steps per epoch
        results["fit_all_empty"] = _capture(lambda: fit([]))
        bad = [take((inputs, y), slice(a, b))]
        if rank == 0:
            bad[0][0]["audio"][1, 0] = float("inf")
        results["fit_inf_one_rank"] = _capture(lambda: fit(bad))
        results["certify_local"] = _capture(lambda: crmt.certify(*mine[0], lipschitz=lip).radius)

        # -- the wrong order: DDP first, then CRMT
        results["wrong_order"] = _capture(
            lambda: CRMTWrapper(DDP(make_model().model), head="module.fusion.fc", modalities=WIDTHS))
        dist.barrier()
    except Exception:  # noqa: BLE001
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    start = time.monotonic()
    context = mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False)
    while not context.join(timeout=1):
        if time.monotonic() - start > DEADLINE_S:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {WORLD} DDP workers did not finish in {DEADLINE_S} s: deadlock")
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank, res in enumerate(results):
        assert "crash" not in res, f"rank {rank} crashed:\n{res['crash']}"
    return results


def assert_same_state(got, expected, atol=1e-10):
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def single():
    """The single-process run on the same global batches."""
    crmt = make_model()
    return crmt, train(crmt, crmt, train_batches())


def test_ddp_training_matches_single_process(ranks, single):
    _, expected = single
    assert ranks[0]["output_type"] == "CRMTOutput"
    for res in ranks:
        assert_same_state(res["train"], expected, atol=1e-10)
    # the parameters really moved: a broken gradient sync could not pass the check above
    assert max((expected[k] - make_model().state_dict()[k]).abs().max() for k in expected) > 1e-2


def test_ddp_training_with_the_missing_fill_term_matches_single_process(ranks, single):
    """The term's extra forward runs outside DDP's forward, on the wrapped module: its gradient joins the
    same backward and DDP averages it like the rest."""
    crmt = make_model()
    expected = train(crmt, crmt, train_batches(), fill=FILL)
    for res in ranks:
        assert_same_state(res["train_fill"], expected, atol=1e-10)
    assert max((expected[k] - single[1][k]).abs().max() for k in expected) > 1e-4   # the term changed training


@pytest.mark.parametrize("variant", ["unused", "static"])
def test_ddp_options_match_single_process(ranks, single, variant):
    """find_unused_parameters=True and static_graph=True see a CRMTOutput dataclass as output."""
    _, expected = single
    for res in ranks:
        assert_same_state(res[f"train_{variant}"], expected, atol=1e-10)


def test_batchnorm_breaks_the_equality_and_syncbatchnorm_restores_it_where_it_runs(ranks):
    """BatchNorm normalises with each rank's half batch, so DDP != one process (documented).
    SyncBatchNorm shares the statistics but torch runs it on GPUs only: on CPU it must say so."""
    bn = make_model(batchnorm=True)
    expected = train(bn, bn, train_batches())
    for res in ranks:
        assert max((res["train_bn"][k] - expected[k]).abs().max() for k in expected) > 1e-6
        status, *rest = res["train_syncbn"]
        if status == "error":
            assert rest[0] == "ValueError" and "GPU" in rest[1]
        else:  # a torch that runs SyncBatchNorm on CPU: then it must match one process
            assert_same_state(rest[0], expected, atol=1e-10)


def test_ddp_state_dict_keys_have_the_module_prefix(ranks):
    assert all(k.startswith("module.model.") for k in ranks[0]["ddp_keys"])


def trained_single(single):
    crmt = make_model()
    crmt.load_state_dict(single[1])
    return crmt


def test_lipschitz_is_the_max_over_ranks_and_uneven_ranks_do_not_deadlock(ranks, single):
    crmt = trained_single(single)
    inputs, y = lip_data()
    expected = crmt.estimate_lipschitz([(inputs, y)]).values
    rank0_only = crmt.estimate_lipschitz([take((inputs, y), slice(0, 9))]).values
    for res in ranks:
        status, value = res["lip_uneven"]
        assert status == "ok"
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12)
        status, value = res["lip_one_empty"]
        assert status == "ok"
        torch.testing.assert_close(value, rank0_only, rtol=1e-9, atol=1e-12)
    # each rank alone would see less: the reduction is really a max over ranks
    assert not torch.allclose(rank0_only, expected)


def test_lipschitz_errors_are_raised_on_every_rank(ranks):
    for res in ranks:
        assert res["lip_all_empty"][:2] == ("error", "CRMTError") and "empty" in res["lip_all_empty"][2]
        assert res["lip_nan_one_rank"][:2] == ("error", "CRMTError"), res["lip_nan_one_rank"]
    assert "non-finite" in ranks[1]["lip_nan_one_rank"][2]
    assert "other rank" in ranks[0]["lip_nan_one_rank"][2]


def fit_single(single, index, **kw):
    crmt = trained_single(single)
    inputs, y = fit_data()
    result = crmt.fit_integration([take((inputs, y), index)], lipschitz=LipschitzConstants.declared(DECLARED),
                                  generator=torch.Generator().manual_seed(0), **{**FIT_KW, **kw})
    return result, crmt.head.integration_weights().detach()


@pytest.mark.parametrize("case, index", [("fit_uneven", slice(0, 32)), ("fit_one_empty", slice(0, 20))])
def test_step_two_matches_single_process_on_the_union(ranks, single, case, index):
    """batch_size covers every rank's data: one full-batch step per epoch, as in one process."""
    expected_result, expected_a = fit_single(single, index)
    assert expected_result.best_epoch > 0  # a really changed
    for res in ranks:
        status, (result, a) = res[case]
        assert status == "ok"
        torch.testing.assert_close(a, expected_a, rtol=1e-9, atol=1e-12)
        assert result.best_epoch == expected_result.best_epoch
        for field in ("mean_radius_before", "mean_radius_after", "accuracy_before", "accuracy_after"):
            assert getattr(result, field) == pytest.approx(getattr(expected_result, field), rel=1e-9, abs=1e-12)
        assert result.history == pytest.approx(expected_result.history, rel=1e-9)


def test_step_two_with_different_step_counts_keeps_ranks_in_sync(ranks):
    (s0, (r0, a0)), (s1, (r1, a1)) = ranks[0]["fit_small_batches"], ranks[1]["fit_small_batches"]
    assert s0 == s1 == "ok"
    assert torch.equal(a0, a1) and r0 == r1


def test_step_two_errors_are_raised_on_every_rank(ranks):
    for res in ranks:
        assert res["fit_all_empty"][:2] == ("error", "CRMTError") and "empty" in res["fit_all_empty"][2]
        # the Tanh encoder squashes the Inf into finite logits: the inputs themselves are checked
        assert res["fit_inf_one_rank"][:2] == ("error", "CRMTError"), res["fit_inf_one_rank"]
        assert "1 of 32 samples have non-finite inputs" in res["fit_inf_one_rank"][2]


def test_certify_is_local_to_each_rank(ranks, single):
    crmt = trained_single(single)
    inputs, y = fit_data()
    for rank, res in enumerate(ranks):
        a, b = FIT_SPLIT[rank]
        status, radius = res["certify_local"]
        assert status == "ok" and radius.shape == (b - a,)
        expected = crmt.certify(*take((inputs, y), slice(a, b)), lipschitz=DECLARED).radius
        torch.testing.assert_close(radius, expected, rtol=1e-9, atol=1e-12)


def test_wrapping_a_ddp_model_is_refused(ranks):
    for res in ranks:
        assert res["wrong_order"][:2] == ("error", "CRMTError")
        assert "DistributedDataParallel" in res["wrong_order"][2]
