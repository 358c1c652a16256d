"""QLoRA learns on this CPU: the loss falls, the 4-bit weights stay as they were, and the run equals
LoRA on an FP32 model whose weights are the values the 4-bit ones stand for."""

import logging

import pytest
import torch

from solutions import lora, quant

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    lora.quiet_libraries()
    tok = lora.CharTokenizer()
    model = lora.new_tiny_llama(tok, hidden_size=64, n_layers=2, n_heads=4, intermediate_size=128, seed=0)
    lora.train_causal_lm(model, tok, lora.ArithmeticTask("add"), 150, 3e-3, batch_size=64)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    return path


def test_qlora_lowers_the_loss_and_leaves_the_4bit_weights_alone(base_dir):
    tok, task = lora.CharTokenizer(), lora.ArithmeticTask("reverse")
    model = quant.qlora_model(base_dir, r=8, seed=0)
    frozen = quant.quantized_weights(model)
    assert len(frozen) == 2 * 7
    assert all(w.dtype == torch.uint8 for w in frozen.values())
    history = lora.train_causal_lm(model, tok, task, 80, 3e-3, batch_size=32, seed=0)
    first, last = sum(history["loss"][:5]) / 5, sum(history["loss"][-5:]) / 5
    assert last < 0.6 * first, (first, last)
    after = quant.quantized_weights(model)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    # QLoRA is LoRA on the weights its 4-bit form stands for: with an FP32 compute dtype the same run
    # on those weights, stored in FP32, gives the same losses step by step.
    rounded = quant.lora_model(base_dir, r=8, seed=0, rounded_to="nf4-dq")
    ref_history = lora.train_causal_lm(rounded, tok, task, 80, 3e-3, batch_size=32, seed=0)
    worst = max(abs(a - b) / b for a, b in zip(history["loss"], ref_history["loss"], strict=True))
    assert worst < 1e-3, worst
