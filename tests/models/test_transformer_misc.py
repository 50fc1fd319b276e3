"""Small properties of the model's building blocks."""

import torch

from miles_fsdp.models.transformer import Embedding


def test_embedding_gradient_is_reproducible():
    # Many tokens share each id: the backward sums them. Indexing's backward (index_put_
    # with accumulate) gave 20 different results in 20 runs on 2 CPU threads; runs must agree
    # bit for bit, or two identical training runs drift apart.
    torch.manual_seed(0)
    emb = Embedding(64, 256)
    torch.nn.init.normal_(emb.weight)
    ids = torch.randint(0, 64, (20000,))
    g = torch.randn(20000, 256)
    grads = {torch.autograd.grad(emb(ids), emb.weight, g)[0].numpy().tobytes() for _ in range(10)}
    assert len(grads) == 1
    assert torch.equal(emb(ids), emb.weight.detach()[ids])  # the forward is the plain lookup


def test_moe_input_gradient_is_reproducible():
    # each token is sent to k experts; the backward sums its k copies: in a fixed order
    from miles_fsdp.models.args import ModelArgs
    from miles_fsdp.models.moe import MoE

    args = ModelArgs(arch="qwen3_moe", vocab_size=32, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32,
                     ffn_dim=64, norm_eps=1e-6, max_position_embeddings=64, n_experts=8, n_experts_per_tok=4,
                     moe_ffn_dim=32)
    torch.manual_seed(0)
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(4000, 64, requires_grad=True)
    g = torch.randn(4000, 64)
    wrt = [x, *moe.parameters()]
    grads = {b"".join(t.numpy().tobytes() for t in torch.autograd.grad(moe(x), wrt, g)) for _ in range(10)}
    assert len(grads) == 1
