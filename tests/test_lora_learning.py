"""The chapter's experiment holds at the cpu profile's size (fixed seed): the small Llama learns
addition and cannot yet write sums backwards; LoRA teaches it the new format at r = 4 on every linear
layer and at r = 16 on the attention layers alone, but not at r = 1. (Full fine-tuning and r = 16 on
every layer sometimes stall on a plateau for one batch order, so the test asserts the settings that
reached the format for every seed in the chapter's run.) The accuracy measure agrees with greedy
decoding on the trained model."""

import pytest
import torch

from solutions import lora

lora.quiet_libraries()
CPU_SIZE = {"hidden_size": 96, "n_layers": 4, "n_heads": 4, "intermediate_size": 256}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    tok = lora.CharTokenizer()
    model = lora.new_tiny_llama(tok, **CPU_SIZE)
    lora.train_causal_lm(model, tok, lora.ArithmeticTask("add"), 1200, 3e-3, batch_size=64)
    path = tmp_path_factory.mktemp("lora") / "base"
    model.save_pretrained(path)
    return path


def test_pretraining_learns_addition_but_not_the_reversed_format(base_dir):
    tok, model = lora.CharTokenizer(), lora.load_base(base_dir)
    add, reverse = lora.ArithmeticTask("add"), lora.ArithmeticTask("reverse")
    held_out = add.split()[1]
    assert lora.answer_accuracy(model, tok, add, held_out) > 0.9
    assert lora.answer_accuracy(model, tok, reverse, held_out) < 0.2
    pairs = held_out[:60]
    by_decoding = sum(lora.greedy_answer(model, tok, add.prompt_and_answer(a, b)[0]) == str(a + b) for a, b in pairs)
    assert lora.answer_accuracy(model, tok, add, pairs) == by_decoding / len(pairs)


def test_lora_learns_the_new_format_at_rank_4_but_not_at_rank_1(base_dir):
    tok, reverse = lora.CharTokenizer(), lora.ArithmeticTask("reverse")
    lora_model, all4 = lora.adapt(base_dir, tok, reverse, 600, 3e-3, r=4, targets=lora.ALL_LINEAR, seed=0)
    _, attn16 = lora.adapt(base_dir, tok, reverse, 600, 3e-3, r=16, targets=lora.ATTENTION, seed=0)
    _, all1 = lora.adapt(base_dir, tok, reverse, 600, 3e-3, r=1, targets=lora.ALL_LINEAR, seed=0)
    assert all4["final_accuracy"] > 0.75 and attn16["final_accuracy"] > 0.75
    assert all1["final_accuracy"] < 0.4
    assert all4["trainable"] == 29_184  # 4 blocks × r·Σ(in + out) over the seven linear layers
    # the base weights did not move: only the adapter learned
    base = lora.load_base(base_dir).state_dict()
    for name, m in lora_model.named_modules():
        if isinstance(m, lora.LoRALinear):
            assert torch.equal(m.base.weight, base[name + ".weight"])
