"""Mixup: train on convex combinations of pairs of samples (every modality mixed with the same lambda).

    python examples/mixup.py                   # AV digits (audio + image)
    python examples/mixup.py --dataset mfeat   # six views

Compare with crmt_mix.py: the CRMT version of this very loop.
"""

import torch
import torch.nn.functional as F

import common


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    run = common.setup(args, "mixup")
    model = run.model
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    beta = torch.distributions.Beta(args.alpha, args.alpha)

    for epoch in run.epochs():
        model.train()
        for inputs, y in run.batches():
            lam, other = float(beta.sample()), torch.randperm(y.shape[0], device=y.device)
            mixed = {name: lam * x + (1 - lam) * x[other] for name, x in inputs.items()}
            logits = model(**mixed)
            loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[other])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log(loss)
        run.validate(model)
    run.restore_best(model)

    return run.finish(model)


if __name__ == "__main__":
    main()
