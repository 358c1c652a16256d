"""Chapter 1's modules rebuilt from PyTorch's own, with the same parameters: the independent
authority that the parity tests of chapter 1 and of the chapters built on it compare against."""

import torch
import torch.nn as nn


def to_torch_mha(ours):
    d = ours.W_q.in_features
    theirs = nn.MultiheadAttention(d, ours.n_heads, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.W_q.weight, ours.W_k.weight, ours.W_v.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.W_q.bias, ours.W_k.bias, ours.W_v.bias]))
        theirs.out_proj.load_state_dict(ours.W_o.state_dict())
    return theirs.eval()


def to_torch_layer(ours, norm_first):
    d, d_ff = ours.ff.fc1.in_features, ours.ff.fc1.out_features
    theirs = nn.TransformerEncoderLayer(d, ours.attn.n_heads, d_ff, dropout=0.0, activation="gelu",
                                        batch_first=True, norm_first=norm_first)
    with torch.no_grad():
        theirs.self_attn.load_state_dict(to_torch_mha(ours.attn).state_dict())
        theirs.norm1.load_state_dict(ours.ln1.state_dict())
        theirs.norm2.load_state_dict(ours.ln2.state_dict())
        theirs.linear1.load_state_dict(ours.ff.fc1.state_dict())
        theirs.linear2.load_state_dict(ours.ff.fc2.state_dict())
    return theirs.eval()


def perturbed(module):
    """Move every parameter off its initial value (LayerNorm starts as the identity map)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()
