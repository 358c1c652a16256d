"""The chapter's comparison holds at the cpu profile's size (fixed seed): with 30 % wrong labels,
SGD memorises them and SAM with a large rho does not, and reaches a clearly higher test accuracy."""

import torch

from solutions import sam


def test_sam_with_a_large_rho_does_not_memorise_wrong_labels():
    data = sam.load_noisy_digits(noise=0.3)
    results = {}
    for kind, rho in (("sgd", None), ("sam", 0.6)):
        torch.manual_seed(0)
        model = sam.make_mlp(256)
        history = sam.train(model, data, sam.make_optimizer(kind, model.parameters(), rho=rho), 40, seed=0)
        results[kind] = (history["test_acc"][-1], sam.evaluate(model, data.train_x, data.train_y)["loss"])
    (sgd_acc, sgd_loss), (sam_acc, sam_loss) = results["sgd"], results["sam"]
    assert sgd_loss < 0.05 < 0.5 < sam_loss  # SGD fits the wrong labels; SAM does not
    assert sam_acc > 0.93 and sam_acc > sgd_acc + 0.1
