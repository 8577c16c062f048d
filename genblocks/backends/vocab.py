"""The only ``xp.`` names block and model code may call.

Every name here exists, with the same meaning, on every backend namespace returned by
:func:`genblocks.backends.namespace`. The numpy backend patches the ones autograd cannot
differentiate; ``tests/test_vocab.py`` walks the AST of ``genblocks/blocks`` and
``genblocks/models`` and fails on any ``xp.NAME`` outside this list.
"""

# Array-API (2023.12) names, as implemented on numpy (autograd), cupy and array_api_strict.
ARRAY_API = (
    # creation
    "asarray", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange", "linspace",
    "eye", "tril", "triu", "empty",
    # shapes
    "reshape", "broadcast_to", "broadcast_arrays", "expand_dims", "squeeze", "stack", "concat",
    "permute_dims", "matrix_transpose", "flip", "moveaxis", "tile", "repeat", "roll",
    # elementwise
    "abs", "exp", "expm1", "log", "log1p", "log2", "sqrt", "square", "sin", "cos", "tan", "tanh",
    "sinh", "cosh", "asin", "acos", "atan", "atan2", "asinh", "acosh", "atanh", "pow", "sign",
    "floor", "ceil", "round", "trunc", "maximum", "minimum", "clip", "logaddexp", "where",
    "isfinite", "isnan", "isinf", "logical_and", "logical_or", "logical_not", "equal", "not_equal",
    "less", "less_equal", "greater", "greater_equal", "astype", "copysign",
    # reductions and scans
    "sum", "prod", "mean", "var", "std", "max", "min", "argmax", "argmin", "all", "any",
    "cumulative_sum", "sort", "argsort", "searchsorted",
    # linear algebra
    "matmul", "tensordot", "vecdot", "linalg",
    # indexing
    "take", "take_along_axis",
    # dtypes and constants
    "float32", "float64", "int32", "int64", "bool", "isdtype", "result_type", "finfo", "iinfo",
    "pi", "e", "inf", "nan",
)

# The ``xp.linalg.NAME`` names blocks may use.
LINALG = ("cholesky", "inv", "det", "slogdet", "solve", "diagonal", "matrix_norm", "vector_norm")

# genblocks extras: same signature on every backend (see ``genblocks.backends.extras``).
EXTRAS = (
    "dense",  # dense(x, W, b=None, activation=None): activation(x @ W + b); fused primitive on numpy
    "log_softmax_take",  # log_softmax_take(logits, index): logits[..., index] - logsumexp(logits); primitive on numpy
    "gated_tanh",  # gated_tanh(a): tanh(a[..., :F]) * sigmoid(a[..., F:]), a (..., 2F); primitive on numpy
    "adam_leaf",  # adam_leaf(p, g, m, v, b1, b2, shift, scale, decay=None): one leaf of Adam, three fresh arrays
    "normal_rsample_kl",  # normal_rsample_kl(h, eps): (mu + exp(log_sigma) eps, KL to N(0, 1)); primitive on numpy
    "elbo_loss",  # elbo_loss(log_px, kl_dims, beta): -mean(mean(log_px, 0)) + beta mean(sum(kl_dims, -1)); primitive
    "conv2d",  # conv2d(x, W, b=None, stride, pads, activation=None): NHWC conv, W (kh, kw, c_in, c_out); primitive
    "im2col",  # im2col(x, kernel_size, stride, pads): NHWC conv patches (N, Ho, Wo, kh*kw*C); primitive on numpy
    "device_of",  # device_of(x): the device an array lives on (None on numpy)
    "backend_name",  # the backend's name as a str: "numpy", "cupy" or "strict"
    "vector_norm",  # vector_norm(x, axis=None, keepdims=False, ord=2)
)

VOCAB = frozenset(ARRAY_API + EXTRAS)
