"""Determinism: the same seeds give bitwise the same training, Lipschitz constants and step 2 on CPU."""

from __future__ import annotations

import torch

from helpers import assert_states_equal, cnn_batch, cnn_model, state_of, train_steps, wrap


def seeded_run(seed, fit_seed=0):
    torch.manual_seed(seed)
    crmt = wrap(cnn_model(seed=seed))
    train_steps(crmt, torch.optim.Adam(crmt.parameters(), lr=1e-2), 4)
    data = [cnn_batch(batch=8, seed=100 + i) for i in range(3)]
    lip = crmt.estimate_lipschitz(data)
    result = crmt.fit_integration(data, lipschitz=lip, epochs=4, batch_size=8, lr=5e-2,
                                  generator=torch.Generator().manual_seed(fit_seed))
    return state_of(crmt), lip.values, result


def test_same_seed_same_results_on_cpu():
    first, second = seeded_run(0), seeded_run(0)
    assert_states_equal(first[0], second[0])
    assert torch.equal(first[1], second[1])
    assert first[2] == second[2]
    # the seeds do matter: a different shuffle of step 2 gives another a (so the check above can fail)
    other = seeded_run(0, fit_seed=1)
    assert not torch.equal(other[0]["model.fusion.fc.integration.audio"], first[0]["model.fusion.fc.integration.audio"])
