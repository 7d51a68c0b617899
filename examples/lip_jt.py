"""Lip-JT: Lipschitz-bounded encoders and a plain fusion head trained with a certified (GloRo-style) loss.

    python examples/lip_jt.py                      # AV digits (audio + image)
    python examples/lip_jt.py --dataset mfeat      # six views

The fair baseline of crmt_lip.py: the same 1-Lipschitz encoders (crmt_plugin.lipschitz_layers), the
loss that maximises the sound certified radius of the fused model.
"""

import torch

import common
from crmt_plugin.benchmark.lipschitz_models import construction_constants, lipschitz_model
from crmt_plugin.certified_loss import lipschitz_margin_loss


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    run = common.setup(args, "lip-jt")
    run.model, run.head = lipschitz_model(run.data).to(run.device), "fusion"   # 1-Lipschitz layers
    model = run.model
    lipschitz = construction_constants(model)                                   # L^(m) by construction
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    for epoch in run.epochs():
        model.train()
        for inputs, y in run.batches():
            loss = lipschitz_margin_loss(model(**inputs), y, head=model.fusion, widths=model.feature_dims,
                                         lipschitz=lipschitz, eps=args.train_eps)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log(loss)
        run.validate(model)
    run.restore_best(model)

    return run.finish(model)


if __name__ == "__main__":
    main()
