"""Hugging Face models as users build them: default configs (``use_cache=True``, return
dicts, cache objects in the outputs), attention mask given or not, no flag set by hand.
Capture leaves the cache out and says so in ``result.notes``; every prune is checked by
the oracle. Written back (``result.apply``), the model keeps its class: greedy
``generate()`` with its KV cache gives the tokens of ``result.module`` run step by step,
the config follows sizes that are the same in every layer, and ``save_pretrained`` then
``from_pretrained`` gives it back bit for bit. A config that cannot express the result
warns with what works."""

import tempfile
import warnings

import pytest
import torch

import fxprune
from fxprune.hf import ConfigWarning
from tests.helpers.healthy import make_healthy
from tests.helpers.oracle import assert_sensitive, assert_untouched, snapshot

transformers = pytest.importorskip("transformers")

T = transformers
# no end-of-sequence token: generate() runs every step, as the reference loop does
TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=0)
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=64, initializer_range=0.2, **TOKENS)
MODELS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **COMMON)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, **COMMON)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **COMMON)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   initializer_range=0.2, **TOKENS)),
    "bert": lambda: T.BertForMaskedLM(T.BertConfig(**COMMON)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                          num_heads=4, decoder_start_token_id=0,
                                                          initializer_factor=10.0, **TOKENS)),
}
GENERATES = ("llama", "mistral", "qwen2", "gpt2", "t5")
# config fields of the head counts (whole heads halved: 4 -> 2, GQA kv heads 2 -> 1)
HEADS = {"llama": {"num_attention_heads": 2, "num_key_value_heads": 1}, "mistral": {"num_key_value_heads": 1},
         "qwen2": {"num_key_value_heads": 1}, "gpt2": {"n_head": 2}, "bert": {"num_attention_heads": 2},
         "t5": {"num_heads": 2}}


def _ids(shape=(2, 8), seed=0):
    return torch.randint(1, 64, shape, generator=torch.Generator().manual_seed(seed))


def _inputs(name, mask=True):
    """Positional inputs as each family's forward takes them (GPT-2's second is the cache)."""
    ids = _ids()
    if name == "gpt2" or not mask:
        return (ids,)
    if name == "t5":
        return ids, torch.ones_like(ids), _ids((2, 5), seed=1)
    return ids, torch.ones_like(ids)


def prune_checked(model, inputs, **kwargs):
    """``fxprune.prune`` on a default-config model, through the oracle: every removed channel
    checked, a perturbed copy refused, the user's model untouched (its config too)."""
    make_healthy(model, inputs[0].shape)
    before = snapshot(model)
    use_cache = model.config.use_cache
    with torch.no_grad():
        ref = model(*inputs)
    result = fxprune.prune(model, inputs, **kwargs)
    assert_untouched(model, before)
    assert model.config.use_cache == use_cache
    assert result.plan.n_removed > 0 and result.report.after.params < result.report.before.params
    v = fxprune.verify(model, result, inputs)
    assert v.complete and not v.unchecked and v.max_rel_err < 1e-4, v.summary()
    assert v.effect > 1e-4
    assert_sensitive(model, result, inputs)
    with torch.no_grad():
        out = result.module(*inputs)
    assert type(out) is type(ref)
    assert out.logits.shape == ref.logits.shape and float(out.logits.std()) > 1e-3
    assert_untouched(model, before)
    return result


@pytest.fixture(scope="module")
def heads_pruned():
    """Each family pruned to half its heads (and half the MLP and hidden widths), once."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model = MODELS[name]().eval()
            inputs = _inputs(name)
            cache[name] = model, inputs, prune_checked(model, inputs, ratio=0.5, policy="heads")
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_config_prunes_and_notes_the_dropped_cache(name, heads_pruned):
    model, inputs, result = heads_pruned(name)
    assert model.config.use_cache is True and result.frontend == "fx"  # T5 too: its None mask is absent
    with torch.no_grad():
        ref, out = model(*inputs), result.module(*inputs)
    if name in GENERATES:  # the model returns a cache, the pruned graph does not, and says why
        assert getattr(ref, "cache", None) is not None and getattr(out, "cache", None) is None
        assert len(result.notes) == 1 and "use_cache=False" in result.notes[0]
        assert "result.apply(model)" in result.notes[0]
    else:
        assert result.notes == ()


def _greedy_steps(module, name, inputs, steps):
    """Greedy decoding with the pruned graph: the whole sequence again at every step."""
    if name == "t5":
        seq = torch.zeros(inputs[0].shape[0], 1, dtype=torch.long)
        for _ in range(steps):
            logits = module(inputs[0], inputs[1], seq).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return seq[:, 1:]
    seq = inputs[0]
    for _ in range(steps):
        args = (seq,) if len(inputs) == 1 else (seq, torch.ones_like(seq))
        seq = torch.cat([seq, module(*args).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, inputs[0].shape[1]:]


@pytest.mark.parametrize("name", GENERATES)
def test_written_back_model_generates_like_the_pruned_graph(name, heads_pruned):
    model, inputs, result = heads_pruned(name)
    before = snapshot(model)
    out = result.apply(model, inputs)
    assert_untouched(model, before)
    assert type(out) is type(model) and out.config.use_cache is True
    for field, value in HEADS[name].items():
        assert getattr(out.config, field) == value and getattr(model.config, field) != value
    assert out.config.hidden_size == out.get_input_embeddings().embedding_dim <= model.config.hidden_size
    kwargs = {"attention_mask": inputs[1]} if len(inputs) > 1 else {}
    with torch.no_grad():
        tokens = out.generate(inputs[0], max_new_tokens=6, do_sample=False, **kwargs)
        expected = _greedy_steps(result.module, name, inputs, 6)
    new = tokens[:, 1:] if name == "t5" else tokens[:, inputs[0].shape[1]:]
    assert torch.equal(new, expected)
    assert len(set(new.flatten().tolist())) > 1  # not one token over and over


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_pretrained_round_trips_exactly(name, heads_pruned, tmp_path):
    model, inputs, result = heads_pruned(name)
    out = result.apply(model, inputs)
    out.save_pretrained(tmp_path)
    back = type(out).from_pretrained(tmp_path).eval()
    mine, theirs = out.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for key, t in mine.items():
        assert torch.equal(t, theirs[key]), key
    with torch.no_grad():
        assert torch.equal(out(*inputs).logits, back(*inputs).logits)


def test_head_size_of_a_rotary_model_warns_and_keeps_the_config():
    """head_dim pruning of a rotary model: the rotary table computed from the config would
    differ, so the config stays (from_pretrained fails on the shapes) and the warning says
    what round-trips. In memory the model works, without an attention mask too."""
    torch.manual_seed(0)
    model = MODELS["llama"]().eval()
    inputs = _inputs("llama", mask=False)
    result = prune_checked(model, inputs, ratio=0.5)  # default policy: head_dim
    with pytest.warns(ConfigWarning, match=r"rotary_emb.inv_freq.*policy='heads'.*fxprune.save"):
        out = result.apply(model)
    assert out.config.head_dim == model.config.head_dim
    assert out.model.layers[0].self_attn.head_dim == 4
    with torch.no_grad():
        tokens = out.generate(inputs[0], max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens[:, 8:], _greedy_steps(result.module, "llama", inputs, 5))
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out.save_pretrained(folder)
        with pytest.raises(Exception, match="size"):
            type(out).from_pretrained(folder)
    with pytest.raises(fxprune.ConfigError, match="cannot express"):
        result.apply(model, strict_config=True)


def test_sizes_that_differ_per_layer_warn_with_what_works():
    torch.manual_seed(0)
    model = MODELS["qwen2"]().eval()
    inputs = _inputs("qwen2")
    result = prune_checked(model, inputs, ratio=0.5, global_ranking=True)
    with pytest.warns(ConfigWarning, match=r"differs across layers.*isomorphic=True"):
        out = result.apply(model, inputs)
    widths = {layer.mlp.up_proj.out_features for layer in out.model.layers}
    assert len(widths) > 1 and out.config.intermediate_size == 48


def test_heads_then_head_size_round_trip(tmp_path):
    """policy='both': whole heads, then head_dim of the rest; BERT's config holds both (its
    head size is hidden_size / heads, and the attention scale follows it)."""
    torch.manual_seed(0)
    model = MODELS["bert"]().eval()
    inputs = _inputs("bert")
    result = prune_checked(model, inputs, ratio=0.75, policy="both")
    assert len(result.stages) == 2
    out = result.apply(model, inputs)
    attn = out.bert.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.attention_head_size, attn.scaling) == (2, 4, 0.5)
    assert (out.config.num_attention_heads, out.config.hidden_size) == (2, 8)
    out.save_pretrained(tmp_path)
    back = type(out).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(out(*inputs).logits, back(*inputs).logits)
