"""The chapter 4 reference answers against peft 0.21 (the independent authority for LoRA) and by hand.

peft and our code get the same base model and the same A and B; then logits, gradients, merged
weights, the set of modules a target list selects, the trainable parameter count and the saved
adapter must agree.
"""

import copy
import logging

import pytest
import torch
import torch.nn as nn

from solutions import lora
from solutions.exercises.lora import _tiny_lm

logging.getLogger("peft").setLevel(logging.ERROR)
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def tiny():
    tok = lora.CharTokenizer()
    return lora.new_tiny_llama(tok, hidden_size=32, n_layers=2, n_heads=4, intermediate_size=64, seed=0), tok


def both(base, targets, r=4, alpha=8, seed=0):
    """Our injected model and peft's, built on copies of ``base``, with the same random B (and A)."""
    ours = lora.inject_lora(copy.deepcopy(base), targets, r, alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.copy_(0.2 * torch.randn(m.lora_B.shape, generator=g))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                            lora_dropout=0.0))
    assert lora.copy_lora_into_peft(ours, theirs) > 0
    return ours, theirs


@pytest.mark.parametrize("targets", [lora.ATTENTION, lora.ALL_LINEAR, ("v_proj",)])
def test_logits_and_gradients_equal_peft(tiny, targets):
    base, tok = tiny
    ours, theirs = both(base, targets)
    x, y = lora.make_batch(tok, lora.ArithmeticTask("reverse"), [(3, 45), (99, 99), (0, 7)])
    torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, **TOL)
    lora.lm_loss(ours, x, y).backward()
    lora.lm_loss(theirs, x, y).backward()
    peft_grads = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_grads) == set(peft_grads)
    for n in our_grads:
        torch.testing.assert_close(our_grads[n], peft_grads[n], **TOL)


def test_trainable_count_equals_peft_and_the_formula(tiny):
    base, _ = tiny
    ours, theirs = both(base, lora.ALL_LINEAR, r=8, alpha=16)
    trainable, total = theirs.get_nb_trainable_parameters()
    assert lora.count_parameters(ours, trainable_only=True) == trainable
    assert lora.count_parameters(ours) == total
    shape = lora.DecoderShape(hidden=32, intermediate=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab=15)
    assert shape.lora_parameters(8, lora.ALL_LINEAR) == trainable
    assert shape.total_parameters() == lora.count_parameters(base)


def test_merged_weights_equal_peft_merge_and_unload(tiny):
    base, tok = tiny
    ours, theirs = both(base, lora.ALL_LINEAR)
    x, _ = lora.make_batch(tok, lora.ArithmeticTask("add"), [(12, 34), (5, 6)])
    before = ours(input_ids=x).logits.detach()
    merged_ours = lora.merge_lora(ours)
    merged_theirs = theirs.merge_and_unload()
    assert not any(isinstance(m, lora.LoRALinear) for m in merged_ours.modules())
    sd_theirs = merged_theirs.state_dict()
    for k, v in merged_ours.state_dict().items():
        torch.testing.assert_close(v, sd_theirs[k], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged_ours(input_ids=x).logits, before, **TOL)


def test_merge_by_hand_on_one_layer():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    W = base.weight.detach().clone()
    layer = lora.LoRALinear(base, r=2, alpha=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    out = layer(x).detach()
    layer.merge()
    layer.merge()
    torch.testing.assert_close(base.weight.detach(), W + 1.5 * layer.lora_B.detach() @ layer.lora_A.detach())
    torch.testing.assert_close(layer(x), out, **TOL)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), W, atol=1e-6, rtol=0)


@pytest.mark.parametrize("targets", [["gate"], ["q_proj", "v_proj"], ["mlp.up_proj", "lm_head"],
                                     ["o_proj", "down_proj"],
                                     ["self_attn.k_proj", "shared_expert_gate"]])
def test_target_matching_equals_peft(targets):
    ours = lora.inject_lora(_tiny_lm(), targets, 2, 2)
    theirs = get_peft_model(_tiny_lm(), LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    ours_names = {n for n, m in ours.named_modules() if isinstance(m, lora.LoRALinear)}
    peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)}
    assert ours_names == peft_names


def test_a_matched_module_that_is_not_linear_is_skipped_here_and_refused_by_peft():
    ours = lora.inject_lora(_tiny_lm(), ["o_proj", "norm1"], 2, 2)
    assert isinstance(ours.layers[0].norm1, nn.LayerNorm)
    assert isinstance(ours.layers[0].self_attn.o_proj, lora.LoRALinear)
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(_tiny_lm(), LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj", "norm1"]))


def test_initialisation_follows_peft_and_nn_linear():
    torch.manual_seed(0)
    A = lora.LoRALinear(nn.Linear(512, 8), r=64, alpha=64).lora_A.detach()
    theirs = get_peft_model(nn.Sequential(nn.Linear(512, 8)), LoraConfig(r=64, lora_alpha=64, target_modules=["0"]))
    A_peft = theirs.base_model.model[0].lora_A["default"].weight.detach()
    bound = 512 ** -0.5
    for a in (A, A_peft):
        assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
        assert abs(a.std().item() - bound / 3 ** 0.5) < 0.02 * bound


def test_adapter_round_trips_through_safetensors_and_peft(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    base, tok = tiny
    base.save_pretrained(tmp_path / "base")
    ours, theirs = both(base, lora.ATTENTION)
    x, _ = lora.make_batch(tok, lora.ArithmeticTask("reverse"), [(42, 17), (8, 90)])
    expected = ours(input_ids=x).logits.detach()
    save_file(lora.lora_state_dict(ours), tmp_path / "adapter.safetensors")
    fresh = lora.inject_lora(lora.load_base(tmp_path / "base"), lora.ATTENTION, 4, 8)
    lora.load_lora_state_dict(fresh, load_file(tmp_path / "adapter.safetensors"))
    torch.testing.assert_close(fresh(input_ids=x).logits, expected, **TOL)
    theirs.save_pretrained(tmp_path / "peft_adapter")
    assert (tmp_path / "peft_adapter" / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(lora.load_base(tmp_path / "base"), tmp_path / "peft_adapter")
    torch.testing.assert_close(reloaded(input_ids=x).logits, expected, **TOL)
    with pytest.raises(KeyError):
        lora.load_lora_state_dict(lora.inject_lora(lora.load_base(tmp_path / "base"), ["q_proj"], 4, 8),
                                  load_file(tmp_path / "adapter.safetensors"))


def test_accuracy_is_greedy_decoding(tiny):
    """answer_accuracy (one forward pass) counts exactly the problems greedy decoding answers right."""
    base, tok = tiny
    task = lora.ArithmeticTask("add")
    pairs = task.split()[1][:40]
    model = copy.deepcopy(base)
    with torch.no_grad():  # make the untrained model right on some problems: bias its head towards digits
        model.lm_head.weight.mul_(0.0)
    for _ in range(2):
        acc = lora.answer_accuracy(model, tok, task, pairs)
        by_decoding = sum(lora.greedy_answer(model, tok, task.prompt_and_answer(a, b)[0]) + "\n"
                          == task.prompt_and_answer(a, b)[1] for a, b in pairs) / len(pairs)
        assert acc == by_decoding
        lora.train_causal_lm(model, tok, task, 30, 3e-3, batch_size=32)


def test_all_linear_means_the_seven_block_layers_as_in_peft(tiny):
    """The chapter's 'every linear layer' (lora.ALL_LINEAR) is what peft's "all-linear" picks: lm_head excluded."""
    base, _ = tiny
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=2, target_modules="all-linear"))
    peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)}
    ours = set(lora.lora_layers(lora.inject_lora(copy.deepcopy(base), lora.ALL_LINEAR, 2, 2)))
    assert peft_names == ours and not any("lm_head" in n for n in ours)
