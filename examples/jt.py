"""Joint training (JT): the plain late-fusion baseline, cross-entropy on the fused logits.

    python examples/jt.py                      # AV digits (audio + image)
    python examples/jt.py --dataset mfeat      # six views

Compare with crmt_jt.py: the CRMT version of this very loop.
"""

import torch
import torch.nn.functional as F

import common


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    run = common.setup(args, "jt")
    model = run.model
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    for epoch in run.epochs():
        model.train()
        for inputs, y in run.batches():
            loss = F.cross_entropy(model(**inputs), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log(loss)
        run.validate(model)
    run.restore_best(model)

    return run.finish(model)


if __name__ == "__main__":
    main()
