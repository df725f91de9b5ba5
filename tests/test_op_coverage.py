"""docs/op-coverage.md is generated from the rule registry and kept current, and every
registered op is exercised by a test or listed as known-untested."""

import importlib.util
import re
from pathlib import Path

import fxprune.rules  # noqa: F401  (fills the registry)
from fxprune.rules import registry

ROOT = Path(__file__).resolve().parent.parent


def test_the_op_coverage_table_is_current():
    spec = importlib.util.spec_from_file_location("op_coverage", ROOT / "tools" / "op_coverage.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = tool.table()
    assert "| norm | `layer_norm` | yes |" in text and "`nn.LayerNorm`" in text
    assert (ROOT / "docs" / "op-coverage.md").read_text() == text, \
        "docs/op-coverage.md is stale: run python tools/op_coverage.py --write"


KNOWN_UNTESTED = {  # rule -> (why, op names that no test mentions)
    'affine_grid': ("export's affine_grid",
        {'affine_grid_generator'}),
    'batch_norm': ("other batch/instance norm forms; export's native batch norms",
        {'InstanceNorm1d', 'InstanceNorm3d', 'SyncBatchNorm', '_native_batch_norm_legit',
         '_native_batch_norm_legit_no_training', 'native_batch_norm'}),
    'cat': ('alias of torch.cat',
        {'concatenate'}),
    'cell': ("export's recurrent cells (tests run LSTMCell/GRUCell/RNNCell modules under fx)",
        {'gru_cell', 'lstm_cell', 'rnn_relu_cell', 'rnn_tanh_cell'}),
    'channel_shuffle': ('the module and ATen forms of channel_shuffle',
        {'ChannelShuffle', 'native_channel_shuffle'}),
    'col2im': ("export's name of F.fold",
        {'col2im'}),
    'conv': ('other dims/transposed forms of the conv rule tested with Conv1d/Conv2d/ConvTranspose2d',
        {'ConvTranspose3d', 'conv_transpose2d', 'conv_transpose3d'}),
    'deform_conv2d': ("torchvision's deformable convolution has no test yet",
        {'deform_conv2d'}),
    'embedding': ('embedding bags are tested as nn.EmbeddingBag; these are the functional and ATen forms',
        {'_embedding_bag', 'embedding_bag'}),
    'factory': ('constants made in forward; tests use torch.zeros/ones/new_zeros',
        {'new_empty', 'new_full', 'scalar_tensor'}),
    'first_input': ("ops that return their input's positions (dropout variants, casts)",
        {'AlphaDropout', 'Dropout1d', 'Dropout3d', 'FeatureAlphaDropout', 'alpha_dropout', 'cuda',
         'dropout1d', 'dropout2d', 'dropout3d', 'full_like', 'type_as'}),
    'getitem': ('the method spelling of x[index] (tests index with [])',
        {'__getitem__'}),
    'grid_sample': ("export's grid sampler ops",
        {'grid_sampler', 'grid_sampler_2d', 'grid_sampler_3d'}),
    'grouped_mm': ('mixture-of-experts grouped matmuls: no test model uses them yet',
        {'_grouped_mm', 'transformers::grouped_mm_fallback'}),
    'im2col': ("export's name of F.unfold",
        {'im2col'}),
    'local_response_norm': ('the functional form of nn.LocalResponseNorm (tested as the module)',
        {'local_response_norm'}),
    'matmul': ('the @ operator and torch.sparse.mm spellings of matmul',
        {'__matmul__', '_sparse_mm'}),
    'mixing_along_dim': ('ATen and min/cumprod forms of the softmax/cumsum rule',
        {'Softmin', '_log_softmax', '_softmax', 'cumprod', 'softmin'}),
    'outer': ('alias of torch.outer',
        {'ger'}),
    'pad': ("padding modules share F.pad's rule (tested with F.pad)",
        {'CircularPad1d', 'CircularPad2d', 'CircularPad3d', 'ConstantPad1d', 'ConstantPad2d',
         'ConstantPad3d', 'ReflectionPad1d', 'ReflectionPad2d', 'ReflectionPad3d', 'ReplicationPad1d',
         'ReplicationPad2d', 'ReplicationPad3d', 'ZeroPad1d', 'ZeroPad2d', 'ZeroPad3d', 'constant_pad_nd'}),
    'patch_merging_pad': ("Swin's patch merging: no test names it (Swin models in the tests may reach it)",
        {'_patch_merging_pad'}),
    'pointwise': ('elementwise ops share one rule (tested with add, mul, sub, div, relu, sigmoid, gelu, where, ...); dunder, in-place, operator-module and ATen spellings are written as symbols or reached only through export',
        {'CELU', 'Hardshrink', 'Hardtanh', 'LogSigmoid', 'RReLU', 'SELU', 'Softshrink', 'Softsign',
         'Tanhshrink', 'Threshold', '__add__', '__and__', '__mul__', '__or__', '__radd__', '__rmul__',
         '__sub__', '__truediv__', '__xor__', '_threshold', '_to_copy', 'addcdiv', 'addcmul', 'alias',
         'alpha_dropout', 'and_', 'ceil', 'celu', 'clamp_', 'clamp_max', 'clamp_min', 'div_', 'elu_', 'erf',
         'exp2', 'exp_', 'expm1', 'feature_alpha_dropout', 'feature_dropout', 'fill', 'floordiv', 'fmod',
         'full_like', 'ge', 'hardsigmoid', 'hardtanh', 'hardtanh_', 'iadd', 'imul', 'invert', 'isub',
         'itruediv', 'le', 'leaky_relu_', 'lerp', 'lift_fresh_copy', 'log', 'log1p', 'log_sigmoid',
         'logical_and', 'logical_or', 'lt', 'masked_fill_', 'minimum', 'mish', 'ne', 'or_', 'pow_',
         'reciprocal', 'relu6', 'relu_', 'remainder', 'rrelu', 'selu', 'sigmoid_', 'sign', 'softplus',
         'softshrink', 'softsign', 'square', 'sub_', 'tanhshrink', 'true_divide', 'truediv', 'type_as'}),
    'prelu': ("export's PReLU kernel",
        {'_prelu_kernel'}),
    'recurrent': ("export's plain-RNN ops (tests run nn.RNN under fx)",
        {'rnn_relu', 'rnn_tanh'}),
    'reduce': ('reductions share one rule (tested with sum, mean, amax, max, norm, ...)',
        {'amin', 'linalg_vector_norm', 'nanmean', 'nansum'}),
    'relabel': ('layout ops that only move positions, as permute/transpose/flatten/pixel_shuffle do',
        {'PixelShuffle', 'PixelUnshuffle', 'mT', 'moveaxis', 'numpy_T', 'pixel_unshuffle', 'swapaxes',
         'swapdims', 'tile'}),
    'scatter': ('in-place and index_copy/index_reduce forms of the scatter rule (tested with scatter_add/index_add)',
        {'index_copy', 'index_copy_', 'index_reduce', 'index_reduce_', 'scatter_', 'scatter_add_',
         'scatter_reduce_'}),
    'spatial': ('pooling and upsampling share one rule (tested with 2-d pools, adaptive pools and interpolate)',
        {'AdaptiveMaxPool1d', 'AdaptiveMaxPool2d', 'AdaptiveMaxPool3d', 'AvgPool1d', 'AvgPool2d',
         'AvgPool3d', 'FractionalMaxPool2d', 'LPPool1d', 'LPPool2d', 'MaxPool1d', 'MaxPool2d', 'MaxPool3d',
         'Upsample', 'UpsamplingBilinear2d', 'UpsamplingNearest2d', '_adaptive_avg_pool2d',
         '_adaptive_avg_pool3d', '_upsample_bicubic2d_aa', '_upsample_bilinear2d_aa',
         '_upsample_nearest_exact1d', '_upsample_nearest_exact2d', '_upsample_nearest_exact3d',
         'adaptive_avg_pool1d', 'adaptive_avg_pool3d', 'adaptive_max_pool1d',
         'adaptive_max_pool1d_with_indices', 'adaptive_max_pool2d_with_indices', 'adaptive_max_pool3d',
         'adaptive_max_pool3d_with_indices', 'avg_pool1d', 'avg_pool3d', 'lp_pool1d', 'lp_pool2d',
         'max_pool1d', 'max_pool1d_with_indices', 'max_pool2d_with_indices', 'max_pool3d',
         'max_pool3d_with_indices', 'upsample', 'upsample_bicubic2d', 'upsample_bilinear',
         'upsample_bilinear2d', 'upsample_linear1d', 'upsample_nearest', 'upsample_nearest1d',
         'upsample_nearest2d', 'upsample_nearest3d', 'upsample_trilinear3d'}),
    'spectral': ("export's names of the torch.fft transforms (tests run torch.fft under fx)",
        {'_fft_c2c', '_fft_c2r', '_fft_r2c', 'fft_fft', 'fft_fft2', 'fft_fftn', 'fft_hfft', 'fft_hfft2',
         'fft_hfftn', 'fft_ifft', 'fft_ifft2', 'fft_ifftn', 'fft_ihfft', 'fft_ihfft2', 'fft_ihfftn',
         'fft_irfft', 'fft_irfft2', 'fft_irfftn', 'fft_rfft', 'fft_rfft2', 'fft_rfftn'}),
    'split': ('ATen spellings of split/chunk (export)',
        {'split_with_sizes', 'unsafe_split'}),
    'split_relabel': ("unflatten and export's _unsafe_view",
        {'Unflatten', '_unsafe_view', 'unflatten'}),
    'triangle': ('in-place triu/tril',
        {'tril_', 'triu_'}),
}


def _op_name(table: str, key) -> str:
    """The name an op is written with: a method name, a module class's name, a function's
    or ATen packet's ``__name__``, a custom op's qualified name, ``tag:<name>``."""
    if table == "method":
        return key
    if table == "module":
        return key.__name__
    if table == "tag":
        return "tag:" + key.name
    if table == "op_name":
        return key
    return getattr(key, "__name__", str(key))


def _untested() -> dict[str, set[str]]:
    """rule name -> names of its ops that no test file mentions."""
    sources = [p for p in (ROOT / "tests").rglob("*.py") if p.name != Path(__file__).name]
    text = "\n".join(p.read_text() for p in sources)
    found: dict[str, set[str]] = {}
    for table, key, rule in registry.entries():
        if not rule.analyze.__module__.startswith("fxprune."):
            continue  # a rule registered by a test
        name = _op_name(table, key)
        word = name.split("::")[-1].removeprefix("tag:")
        if not re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", text):
            found.setdefault(rule.name, set()).add(name)
    return found


def test_every_registered_op_is_tested_or_listed_as_known_untested():
    """Every op in the rule registry (``registry.entries()``, the table
    docs/op-coverage.md lists) is named in some test file, or is listed in
    ``KNOWN_UNTESTED`` under its rule with the reason.

    The evidence is textual and says so: an op counts as exercised when its name (a
    function's or ATen op's ``__name__``: ``cat``, ``conv2d``; a method name: ``view``; a
    module class: ``Conv2d``) appears as a word in a file under tests/ other than this
    one. That is necessary, not sufficient (a name can appear in a comment), but it is
    cheap, deterministic and needs no model to run; the rule tests and the oracle decide
    whether the rule is right. Ops reached only through another spelling (ATen ops of
    exported graphs, in-place and dunder forms, Python operators written as symbols)
    are listed, so the gap is visible. The list must stay exact: an op that gains a test
    has to leave it (the test fails on stale entries too)."""
    untested = _untested()
    missing = {rule: sorted(names - KNOWN_UNTESTED.get(rule, ("", set()))[1])
               for rule, names in untested.items()}
    missing = {r: n for r, n in missing.items() if n}
    assert not missing, f"ops without a test (add one, or list them in KNOWN_UNTESTED with a reason): {missing}"
    stale = {rule: sorted(names - untested.get(rule, set())) for rule, (_, names) in KNOWN_UNTESTED.items()}
    stale = {r: n for r, n in stale.items() if n}
    assert not stale, f"KNOWN_UNTESTED lists ops that now have a test or no longer exist: {stale}"
    assert all(why for why, _ in KNOWN_UNTESTED.values())
