"""CRMT-JT: joint training with the CRMT head and margin loss, then step 2 (integration weights).

    python examples/crmt_jt.py                 # AV digits (audio + image)
    python examples/crmt_jt.py --dataset mfeat # six views

The same loop as jt.py; `diff examples/jt.py examples/crmt_jt.py` shows the CRMT lines.
"""

import crmt_plugin
import torch

import common


def main(argv=None):
    args = common.parse_args(__doc__, argv, crmt=True)
    run = common.setup(args, "crmt-jt")
    model = run.model
    # a = 0.1 to start (the paper's fresh head): more robust than the wrapper's default (a fitted to the fresh
    # head) without adversarial examples, docs/method.md "The initial a"
    crmt = crmt_plugin.CRMTWrapper(model, head=run.head, modalities=model.feature_dims, integration_init=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    for epoch in run.epochs():
        model.train()
        for inputs, y in run.batches():
            loss = crmt_plugin.crmt_loss(crmt(inputs), y, **common.crmt_kwargs(args))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log(loss)
        run.validate(model)
    run.restore_best(model)
    lipschitz = crmt.estimate_lipschitz(run.train_loader)
    step2 = crmt.fit_integration(run.train_loader, lipschitz=lipschitz, **common.step2_kwargs(args, run))

    return run.finish(model, crmt, lipschitz, step2=vars(step2))


if __name__ == "__main__":
    main()
