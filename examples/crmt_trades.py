"""CRMT-TRADES: TRADES with the CRMT head, plus rho * the CRMT margin term (on the adversarial outputs), then step 2.

    python examples/crmt_trades.py                 # AV digits (audio + image)
    python examples/crmt_trades.py --dataset mfeat # six views

The same loop as trades.py; `diff examples/trades.py examples/crmt_trades.py` shows the CRMT lines.
"""

import crmt_plugin
import torch
import torch.nn.functional as F
from crmt_plugin.attacks import trades_kl_loss

import common


def kl(adversarial_logits, clean_logits):
    """TRADES' KL(softmax(clean) || softmax(adversarial)), batch mean, gradient through both."""
    return F.kl_div(F.log_softmax(adversarial_logits, 1), F.softmax(clean_logits, 1), reduction="batchmean")


def main(argv=None):
    args = common.parse_args(__doc__, argv, crmt=True)
    run = common.setup(args, "crmt-trades")
    model = run.model
    # the wrapper's default shared scale (one learnable scale for all a^(m)) lets the logits grow as a plain
    # head's do under Adam: the training attack and TRADES' KL depend on it (docs/method.md, "The shared scale")
    crmt = crmt_plugin.CRMTWrapper(model, head=run.head, modalities=model.feature_dims)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    attack = run.train_attack(loss=trades_kl_loss)  # PGD maximising the KL to the clean prediction

    for epoch in run.epochs():
        model.train()
        for inputs, y in run.batches():
            out = crmt(inputs)
            adversarial = attack(model, inputs, out.logits.detach())
            out_adversarial = crmt(adversarial)
            trades = lambda logits, y: F.cross_entropy(out.logits, y) + args.beta * kl(logits, out.logits)  # noqa: E731
            loss = crmt_plugin.crmt_loss(out_adversarial, y, base_loss=trades, **common.crmt_kwargs(args))
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
