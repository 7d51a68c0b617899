"""CRMT-Lip: certified CRMT on Lipschitz-bounded encoders, then step 2 with the sound encoder bounds.

    python examples/crmt_lip.py                    # AV digits (audio + image)
    python examples/crmt_lip.py --dataset mfeat    # six views

The same loop as lip_jt.py; `diff examples/lip_jt.py examples/crmt_lip.py` shows the CRMT lines.
"""

import torch

import common
import crmt_plugin
from crmt_plugin.benchmark.lipschitz_models import construction_constants, lipschitz_model


def main(argv=None):
    args = common.parse_args(__doc__, argv, crmt=True)
    run = common.setup(args, "crmt-lip")
    run.model, run.head = lipschitz_model(run.data).to(run.device), "fusion"   # 1-Lipschitz layers
    model = run.model
    lipschitz = construction_constants(model)                                   # L^(m) by construction
    crmt = crmt_plugin.CRMTWrapper(model, head=run.head, modalities=model.feature_dims)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    for epoch in run.epochs():
        model.train()
        for inputs, y in run.batches():
            loss = crmt_plugin.certified_loss(crmt(inputs), y, crmt=crmt, lipschitz=lipschitz, eps=args.train_eps)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log(loss)
        run.validate(model)
    run.restore_best(model)
    sound = crmt_plugin.bounds.encoder_bounds(model.encoders, run.data.sample_shapes())   # cert.sound is True
    step2 = crmt.fit_integration(run.train_loader, lipschitz=sound, **common.step2_kwargs(args, run))

    return run.finish(model, crmt, crmt.estimate_lipschitz(run.train_loader), step2=vars(step2))


if __name__ == "__main__":
    main()
