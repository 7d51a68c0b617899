"""CRMT-AT: PGD adversarial training with the CRMT head and margin loss, then step 2.

    python examples/crmt_at.py                 # AV digits (audio + image)
    python examples/crmt_at.py --dataset mfeat # six views

The same loop as pgd_at.py; `diff examples/pgd_at.py examples/crmt_at.py` shows the CRMT lines.
"""

import crmt_plugin
import torch

import common


def main(argv=None):
    args = common.parse_args(__doc__, argv, crmt=True)
    run = common.setup(args, "crmt-at")
    model = run.model
    # the wrapper's default shared scale (one learnable scale for all a^(m)) lets the logits grow as a plain
    # head's do under Adam: the training attack and TRADES' KL depend on it (docs/method.md, "The shared scale")
    crmt = crmt_plugin.CRMTWrapper(model, head=run.head, modalities=model.feature_dims)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    attack = run.train_attack()  # PGD, l2, eps=--train-eps, --train-steps steps, in eval mode

    for epoch in run.epochs():
        model.train()
        for inputs, y in run.batches():
            adversarial = attack(model, inputs, y)
            loss = crmt_plugin.crmt_loss(crmt(adversarial), y, **common.crmt_kwargs(args))
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
