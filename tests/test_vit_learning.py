"""The chapter's ViT really learns at the cpu profile's size (fixed seeds): with Mixup it beats a
linear classifier on the same digits and reaches the chapter's 97 % target; without augmentation
it memorises the training set, as the chapter says."""

import pytest
import torch

from solutions import vit

CPU_SIZE = {"patch_size": 2, "in_channels": 1, "n_classes": 10, "d_model": 64, "n_heads": 4, "n_layers": 3, "d_ff": 128}
EPOCHS = 50


@pytest.fixture(scope="module")
def data():
    return vit.load_digits_images()


def trained(data, augmentation, seed=0):
    torch.manual_seed(seed)
    model = vit.VisionTransformer(data.img_size, **CPU_SIZE)
    return model, vit.train_vit(model, data, EPOCHS, 64, 1e-3, augmentation=augmentation, alpha=1.0, seed=seed)


def test_vit_with_mixup_beats_the_linear_classifier(data):
    linear = vit.linear_baseline_accuracy(data)
    assert 0.95 < linear < 0.98
    model, history = trained(data, "mixup")
    accuracy = vit.evaluate(model, data.test_x, data.test_y)["accuracy"]
    assert accuracy == history["test_acc"][-1]
    assert accuracy >= 0.97 and accuracy > linear
    # centred digits give no reason for neighbouring positions to look alike (the chapter says so)
    assert vit.position_distance_correlation(model) < 0


def test_without_augmentation_the_vit_memorises_the_training_set(data):
    _, history = trained(data, "none")
    assert history["clean_train_acc"] == 1.0 and history["clean_train_loss"] < 0.02
    assert history["test_acc"][-1] < 0.975
