"""The model's fused row ops (mk.qk_norm_rope in Attention, mk.add_rms_norm for every residual
add) leave its bits unchanged: hidden states, log-probs, the MTP draft's outputs and every
parameter's grad equal those of the same model run with the unfused ops, written out below
as the model was before the fusions."""

import pytest
import torch
import torch.nn.functional as F

import miles_kernels as mk
from miles_fsdp.models import load_model, packed_inputs


def unfused_attention(attn, x_TD, cos_TF, sin_TF, meta, slot_T, k_cache, v_cache):
    T = x_TD.shape[0]
    q_TN, k_TN, v_TN = mk.linears(x_TD, [attn.wq.weight, attn.wk.weight, attn.wv.weight])
    q_THD = q_TN.view(T, attn.n_heads, attn.head_dim)
    k_TKD = k_TN.view(T, attn.n_kv_heads, attn.head_dim)
    v_TKD = v_TN.view(T, attn.n_kv_heads, attn.head_dim)
    q_THD, k_TKD = attn.q_norm(q_THD), attn.k_norm(k_TKD)
    q_THD, k_TKD = mk.apply_rope(q_THD, cos_TF, sin_TF), mk.apply_rope(k_TKD, cos_TF, sin_TF)
    o_THD = mk.kv_attention(q_THD, k_TKD, v_TKD, k_cache, v_cache, meta, slot_T, attn.head_dim**-0.5)
    return attn.wo(o_THD.reshape(T, attn.n_heads * attn.head_dim))


def unfused_block(block, x_TD, *attn_args):
    h_TD = x_TD + unfused_attention(block.attn, block.attn_norm(x_TD), *attn_args)
    ffn = block.moe if hasattr(block, "moe") else block.mlp
    return h_TD + ffn(block.mlp_norm(h_TD))


def unfused_forward(model, ids_T, pos_T, meta, slot_T):
    h_TD = model.embed(ids_T)
    cos_TF, sin_TF = model._rope_cos_sin(pos_T)
    caches = model._scratch_caches(ids_T.shape[0], meta, h_TD, model.args.n_layers)
    for layer, cache in zip(model.layers, caches):
        h_TD = unfused_block(layer, h_TD, cos_TF, sin_TF, meta, slot_T, *cache)
    return model.norm(h_TD)


def unfused_draft(model, hidden_TD, ids_T, pos_T, meta, slot_T, targets_T):
    mtp = model.mtp[0]
    emb_TD = F.embedding(ids_T, model.embed.weight.detach())
    x_TD = mtp.eh_proj(torch.cat([mtp.enorm(emb_TD), mtp.hnorm(hidden_TD)], dim=-1))
    cache = model._scratch_caches(ids_T.shape[0], meta, x_TD, 1)[0]
    g_TD = unfused_block(mtp.block, x_TD, *model._rope_cos_sin(pos_T), meta, slot_T, *cache)
    return mk.linear_logprobs(mtp.norm(g_TD), model.lm_head.weight.detach(), targets_T)[0], g_TD


def fused_draft(model, hidden_TD, ids_T, pos_T, meta, slot_T, targets_T):
    logp_T, _, g_TD = model.draft_token_logprobs(hidden_TD, ids_T, pos_T, meta, slot_T, targets_T)
    return logp_T, g_TD


def _run(model, forward, draft, ids_T, targets_T, cu):
    """(outputs, grads by parameter name) of the trunk and the draft, one backward."""
    pos_T, meta, slot_T = packed_inputs(cu)
    hidden_TD = forward(ids_T, pos_T, meta, slot_T)
    logp_T, ent_T = model.token_logprobs(hidden_TD, targets_T, temperature=0.9, entropy=True)
    d_logp_T, g_TD = draft(model, hidden_TD.detach(), ids_T, pos_T, meta, slot_T, targets_T)
    loss = (logp_T * torch.linspace(-1, 1, len(logp_T))).sum() + 0.1 * ent_T.sum() + d_logp_T.sum()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    outs = {"hidden": hidden_TD, "logp": logp_T, "entropy": ent_T, "draft_logp": d_logp_T, "draft_g": g_TD}
    return {k: v.detach() for k, v in outs.items()}, dict(zip(params, grads))


@pytest.mark.parametrize("mode", ["invariant", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_fused_row_ops_leave_the_model_bits_unchanged(ckpt, arch, dtype, mode):
    model = load_model(ckpt(arch), dtype, n_mtp=1).train()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a random draft (a fresh one is the trunk's last layer)
        for p in model.mtp.parameters():
            p.add_((0.05 * torch.randn(p.shape, generator=g)).to(dtype))
    seqs = [torch.randint(0, 320, (n,), generator=g) for n in (9, 33, 1, 20)]
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    ids_T = torch.cat(seqs)
    targets_T = ids_T.roll(-1)
    with mk.use_mode(mode):
        want, want_grads = _run(model, lambda *a: unfused_forward(model, *a), unfused_draft, ids_T, targets_T, cu)
        got, got_grads = _run(model, model, fused_draft, ids_T, targets_T, cu)
        with torch.no_grad():  # the engine's forward: no autograd
            pos_T, meta, slot_T = packed_inputs(cu)
            nograd = model(ids_T, pos_T, meta, slot_T)
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs ({arch}, {dtype}, {mode})"
    assert torch.equal(nograd, want["hidden"]), "the forward without autograd differs"
    for name, w in want_grads.items():
        assert (w is None) == (got_grads[name] is None), name
        assert w is None or torch.equal(got_grads[name], w), f"grad of {name} differs ({arch}, {dtype}, {mode})"
