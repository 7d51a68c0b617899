"""PGD adversarial training (PGD-AT): cross-entropy on l2-PGD examples, one joint budget over all modalities.

    python examples/pgd_at.py                  # AV digits (audio + image)
    python examples/pgd_at.py --dataset mfeat  # six views

Compare with crmt_at.py: the CRMT version of this very loop.
"""

import torch
import torch.nn.functional as F

import common


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    run = common.setup(args, "pgd-at")
    model = run.model
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    attack = run.train_attack()  # PGD, l2, eps=--train-eps, --train-steps steps, in eval mode

    for epoch in run.epochs():
        model.train()
        for inputs, y in run.batches():
            adversarial = attack(model, inputs, y)
            loss = F.cross_entropy(model(**adversarial), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log(loss)
        run.validate(model)
    run.restore_best(model)

    return run.finish(model)


if __name__ == "__main__":
    main()
