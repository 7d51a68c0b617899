"""TRADES: cross-entropy on clean inputs + beta * KL(clean || adversarial), the adversary maximising the KL.

    python examples/trades.py                  # AV digits (audio + image)
    python examples/trades.py --dataset mfeat  # six views

Compare with crmt_trades.py: the CRMT version of this very loop.
"""

import torch
import torch.nn.functional as F
from crmt_plugin.attacks import trades_kl_loss

import common


def kl(adversarial_logits, clean_logits):
    """TRADES' KL(softmax(clean) || softmax(adversarial)), batch mean, gradient through both."""
    return F.kl_div(F.log_softmax(adversarial_logits, 1), F.softmax(clean_logits, 1), reduction="batchmean")


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    run = common.setup(args, "trades")
    model = run.model
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    attack = run.train_attack(loss=trades_kl_loss)  # PGD maximising the KL to the clean prediction

    for epoch in run.epochs():
        model.train()
        for inputs, y in run.batches():
            logits = model(**inputs)
            adversarial = attack(model, inputs, logits.detach())
            loss = F.cross_entropy(logits, y) + args.beta * kl(model(**adversarial), logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log(loss)
        run.validate(model)
    run.restore_best(model)

    return run.finish(model)


if __name__ == "__main__":
    main()
