"""Hugging Face transformers models (small configs, no weights downloaded) captured by
the symbolic trace following example values (and through torch.export when asked) and
pruned by head_dim, by whole heads and in the residual stream; every result is checked
by the oracle."""

import pytest
import torch

import fxprune
from tests.helpers.oracle import prune_and_verify

transformers = pytest.importorskip("transformers")


def bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                                   use_cache=False, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


MODELS = {"bert": bert, "gpt2": gpt2, "llama": llama}
ATTENTION = {  # (query weight, key weight, value weight); GPT-2 packs them in one Conv1D
    "bert": ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.key.weight",
             "bert.encoder.layer.0.attention.self.value.weight"),
    "llama": ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.0.self_attn.v_proj.weight"),
}


def _ids(seed=0):
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("policy,frontend", [("inner", "auto"), ("outer", "auto"), ("both", "auto"),
                                             ("inner", "export")])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_models_prune(name, policy, frontend):
    torch.manual_seed(0)
    model = MODELS[name]()
    ids = _ids()
    result, v = prune_and_verify(model, ids, ratio=0.5, policy=policy, frontend=frontend)
    # the symbolic trace follows a Hugging Face model's size checks on the example values
    assert result.frontend == ("fx" if frontend == "auto" else "export")
    assert v.exact_groups >= 4  # attention and MLP groups of both layers
    assert result.report.after.params < 0.75 * result.report.before.params
    p = dict(result.module.named_parameters())
    if name in ATTENTION:
        q, k, val = (p[n].shape[0] for n in ATTENTION[name])
        heads, kv_heads = (4, 2) if name == "llama" else (4, 4)
        original = (32, 32 * kv_heads // heads, 32 * kv_heads // heads)
        assert (q, k, val) != original  # the attention block got smaller
        if policy == "inner":  # head_dim: every head keeps the same number of channels
            assert q % heads == 0 and val % kv_heads == 0 and q // heads == k // kv_heads
        elif policy == "both":  # two stages, each checked by the oracle
            assert len(result.stages) == 2 and q * kv_heads == k * heads
        else:  # whole heads (whole kv groups in llama): head_dim 8 stays
            assert q % 8 == 0 and k % 8 == 0 and val % 8 == 0 and q // k == heads // kv_heads
    else:  # GPT-2's fused c_attn: q, k and v sections that each split into 4 heads
        w = p["transformer.h.0.attn.c_attn.weight"]
        assert w.shape[1] < 96
    out = result.module(ids)
    assert type(out).__name__ == type(model(ids)).__name__


def test_hf_residual_stream_is_pruned_and_reported_inexact():
    torch.manual_seed(0)
    model = gpt2()
    ids = _ids()
    result, v = prune_and_verify(model, ids, ratio=0.5)
    hidden = result.groups.group_of("transformer.wpe.weight")
    assert not hidden.exact and any("norm" in r for r in hidden.inexact_reasons)
    wte = dict(result.module.named_parameters())["lm_head.weight"]
    assert wte.shape == (64, 16)  # tied embedding / lm_head: one tensor, pruned once
    assert v.inexact_groups >= 1


def test_hf_bert_heads_found_without_hints():
    groups = fxprune.analyze(bert().eval(), _ids(), policy="outer")
    assert groups.frontend == "fx"  # the trace follows its size checks
    g = groups.group_of(ATTENTION["bert"][0])
    assert g.size == 4 and groups.group_of(ATTENTION["bert"][1]) is g  # 4 heads; q and k together


def test_hf_llama_keeps_kv_heads_with_q_heads_mode():
    torch.manual_seed(0)
    model = llama()
    result, v = prune_and_verify(model, _ids(), ratio=0.5, policy="heads", gqa="q_heads")
    p = dict(result.module.named_parameters())
    attn = "model.layers.0.self_attn."
    assert p[attn + "q_proj.weight"].shape[0] == 16  # 2 of 4 query heads, one in each kv group
    assert p[attn + "k_proj.weight"].shape[0] == 16 and p[attn + "v_proj.weight"].shape[0] == 16


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pruned_hf_model_takes_other_batch_and_sequence_sizes(name, tmp_path):
    """Batch and sequence length stay symbolic (read from the inputs at run time), so the
    pruned model runs (and matches the oracle) at shapes it was not captured with, also
    after save/load."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    result = fxprune.prune(model, _ids(), ratio=0.5, policy="heads")
    reads_sizes = lambda n: "sym_size" in str(n.target) or n.target in ("size", "shape") or (  # noqa: E731
        n.target is getattr and n.args[1] == "shape")
    assert any(reads_sizes(n) for n in result.module.graph.nodes)
    fxprune.save(result, tmp_path / name)
    loaded = fxprune.load(tmp_path / name)
    for shape in [(3, 5), (1, 12)]:
        ids = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(1))
        v = fxprune.verify(model, result, ids)
        assert v.max_rel_err < 1e-4 and v.effect > 1e-3
        with torch.no_grad():
            assert torch.equal(pytree_leaves(loaded(ids))[0], pytree_leaves(result.module(ids))[0])


def pytree_leaves(out):
    import torch.utils._pytree as pytree
    return pytree.tree_leaves(out)


SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=32)
MORE = {  # other attention layouts: fused qkv (GPT-NeoX), partial rotary (Phi), MQA (Gemma), ...
    "distilbert": lambda: transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=32)),
    "roberta": lambda: transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        **SMALL, pad_token_id=1, num_labels=2)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **SMALL, num_key_value_heads=2, use_cache=False)),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(
        **SMALL, num_key_value_heads=1, head_dim=8, use_cache=False)),
    "phi": lambda: transformers.PhiForCausalLM(transformers.PhiConfig(**SMALL, use_cache=False)),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**SMALL, use_cache=False)),
    "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
        max_position_embeddings=32, word_embed_proj_dim=32, use_cache=False)),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(  # relative bias as SDPA mask
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=4,
        use_cache=False, decoder_start_token_id=0)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(  # experts: grouped_mm, topk
        **SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, use_cache=False)),
    "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32,
        patch_size=8, num_labels=3)),
}


# where the followed symbolic trace stops and torch.export captures the model: Mixtral's
# routing (item assignment at data-dependent indices)
FRONTEND = {"mixtral": "export"}


@pytest.mark.parametrize("name", sorted(MORE))
def test_more_hf_architectures_prune_heads_exactly(name):
    torch.manual_seed(0)
    model = MORE[name]().eval()
    x = torch.randn(2, 3, 32, 32) if name == "vit" else torch.randint(2, 64, (2, 8))
    if name == "t5":  # (input_ids, attention_mask, decoder_input_ids)
        x = (x, None, torch.randint(2, 64, (2, 6)))
    result, v = prune_and_verify(model, x, ratio=0.5, policy="heads", min_effect=1e-3)
    assert result.frontend == FRONTEND.get(name, "fx")
    assert not result.groups.barriers, result.groups.barriers
    assert result.groups.head_groups  # heads were found from the shapes
    assert result.report.after.params < 0.7 * result.report.before.params


def test_mixtral_experts_lose_the_same_hidden_units_and_the_router_keeps_every_expert():
    torch.manual_seed(0)
    model = MORE["mixtral"]().eval()
    result, _ = prune_and_verify(model, torch.randint(2, 64, (2, 8)), ratio=0.5, min_effect=1e-3)
    shapes = {k: tuple(p.shape) for k, p in result.module.named_parameters()}
    gate_up = next(v for k, v in shapes.items() if k.endswith("experts.gate_up_proj"))
    down = next(v for k, v in shapes.items() if k.endswith("experts.down_proj"))
    router = next(v for k, v in shapes.items() if k.endswith("mlp.gate.weight"))
    assert gate_up[0] == down[0] == router[0] == 4  # every expert stays (top-k pins the router)
    assert gate_up[1] == 2 * down[2] == 48  # (experts, 2 x hidden, in): 48 -> 24 hidden units
