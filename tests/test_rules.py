"""Rules: parsing, first match wins, defaults before rules, paths."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import QuantizedTensor, QuantType
from jquant._model.rules import decide, parse_rules, path_to_str


def fmt_of(x):
    return x.qtype.name if isinstance(x, QuantizedTensor) else None


def params():
    rng = np.random.default_rng(0)

    def w(*s):
        return jnp.asarray(rng.standard_normal(s, dtype=np.float32))

    return {
        "embed": {"embedding": w(100, 64)},
        "layers": [
            {"attn": {"kernel": w(64, 64), "bias": w(64)}, "mlp": {"kernel": w(64, 256)}},
            {"attn": {"kernel": w(64, 64), "bias": w(64)}, "mlp": {"kernel": w(64, 256)}},
        ],
        "norm": {"scale": w(64)},
        "lm_head": {"kernel": w(64, 100)},
        "tiny": w(4, 8),
        "step": jnp.array(10, jnp.int32),
        "mask": jnp.ones((64, 64), bool),
    }


def test_single_format_everywhere_except_defaults():
    qp = jquant.quantize_model(params(), "q4_0")
    assert fmt_of(qp["embed"]["embedding"]) == "Q4_0"
    assert fmt_of(qp["layers"][1]["mlp"]["kernel"]) == "Q4_0"
    assert fmt_of(qp["lm_head"]["kernel"]) == "Q4_0"
    for leaf in (
        qp["layers"][0]["attn"]["bias"],
        qp["norm"]["scale"],
        qp["tiny"],
        qp["step"],
        qp["mask"],
    ):
        assert not isinstance(leaf, QuantizedTensor)


@pytest.mark.parametrize("as_dict", [True, False])
def test_first_match_wins_and_overrides(as_dict):
    rules = [
        ("embed|lm_head", "q8_0"),
        (r"layers/0/", None),  # keep the first layer in full precision
        ("mlp", "q5_1"),
        ("mlp", "q4_1"),  # never used: the previous rule matches first
        (".*", "q4_0"),
    ]
    qp, rep = jquant.quantize_model(params(), dict(rules) if as_dict else rules, report=True)
    if as_dict:  # a dict can't hold 'mlp' twice: the later value replaces the earlier
        assert fmt_of(qp["layers"][1]["mlp"]["kernel"]) == "Q4_1"
        return
    assert fmt_of(qp["embed"]["embedding"]) == "Q8_0"
    assert fmt_of(qp["lm_head"]["kernel"]) == "Q8_0"
    assert fmt_of(qp["layers"][0]["attn"]["kernel"]) is None
    assert fmt_of(qp["layers"][0]["mlp"]["kernel"]) is None
    assert fmt_of(qp["layers"][1]["mlp"]["kernel"]) == "Q5_1"
    assert fmt_of(qp["layers"][1]["attn"]["kernel"]) == "Q4_0"
    assert rep["layers/0/attn/kernel"].reason == "rule 'layers/0/' keeps it"
    assert rep["layers/1/mlp/kernel"].rule == "mlp"
    # the second 'mlp' rule is shadowed by the first: it decided no leaf, and says so
    assert rep.unmatched_rules == ("mlp",)
    rules2 = rules[:3] + [("mlpx", "q4_1")] + rules[4:]
    _, rep2 = jquant.quantize_model(params(), rules2, report=True)
    assert rep2.unmatched_rules == ("mlpx",)
    # a rule that matches only leaves the defaults keep decides nothing either
    _, rep3 = jquant.quantize_model(params(), [("bias|scale", "q8_0"), (".*", "q4_0")], report=True)
    assert rep3.unmatched_rules == ("bias|scale",)


def test_keep_spellings():
    for keep in (None, "keep", "KEEP", "none", "skip"):
        (rule,) = parse_rules([("x", keep)])
        assert rule.qtype is None
    assert parse_rules("int8")[0].qtype is QuantType.Q8_0
    assert parse_rules(QuantType.Q5_0)[0].qtype is QuantType.Q5_0
    assert parse_rules(2)[0].qtype is QuantType.Q4_0  # GGML id


def test_defaults_can_be_turned_off():
    qp = jquant.quantize_model(params(), "q8_0", keep_1d=False, min_size=0)
    assert fmt_of(qp["norm"]["scale"]) == "Q8_0"
    assert fmt_of(qp["layers"][0]["attn"]["bias"]) == "Q8_0"
    assert fmt_of(qp["tiny"]) == "Q8_0"
    # non-float leaves are never quantized
    assert qp["step"].dtype == jnp.int32 and qp["mask"].dtype == jnp.bool_


def test_min_size_threshold_is_configurable():
    qp = jquant.quantize_model(params(), "q8_0", min_size=64 * 64 + 1)
    assert fmt_of(qp["layers"][0]["attn"]["kernel"]) is None  # 4096 values
    assert fmt_of(qp["layers"][0]["mlp"]["kernel"]) == "Q8_0"  # 16384 values
    assert fmt_of(qp["embed"]["embedding"]) == "Q8_0"  # 6400


def test_decide_reasons():
    rules = parse_rules({"w": "q4_0"})
    assert decide("a", "text", rules).reason == "not an array (str)"
    assert decide("a", 1.5, rules).reason == "not an array (float)"
    assert (
        decide("a", np.ones((64, 64), np.int8), rules).reason
        == "int8 is not a floating-point dtype"
    )
    assert "keep_1d" in decide("w", np.ones(5000), rules).reason
    assert "min_size=1024" in decide("w", np.ones((2, 3)), rules).reason
    assert decide("v", np.ones((64, 64)), rules).reason == "no rule matched"
    d = decide("w", np.ones((64, 64)), rules)
    assert d.qtype is QuantType.Q4_0 and d.reason is None and d.rule == 0


def test_search_semantics_and_anchoring():
    rules = parse_rules([(r"^layers/1/", "q8_0"), (r"kernel$", "q4_0")])
    qp = jquant.quantize_model(params(), rules)
    assert fmt_of(qp["layers"][1]["attn"]["kernel"]) == "Q8_0"
    assert fmt_of(qp["layers"][0]["attn"]["kernel"]) == "Q4_0"
    assert fmt_of(qp["embed"]["embedding"]) is None  # neither rule matches it
    compiled = parse_rules([(re.compile("EMBED", re.I), "q8_0")])
    assert fmt_of(jquant.quantize_model(params(), compiled)["embed"]["embedding"]) == "Q8_0"


def test_bad_patterns_and_formats_name_the_rule():
    with pytest.raises(jquant.QuantError, match=r"'layers\[0'.*not a valid regular expression"):
        parse_rules({"layers[0": "q4_0"})
    with pytest.raises(jquant.QuantError, match="patterns are regular expressions"):
        parse_rules([(3, "q4_0")])
    with pytest.raises(jquant.QuantError, match="list of \\(pattern, format\\) pairs"):
        parse_rules(["q4_0", "q8_0"])
    with pytest.raises(jquant.UnknownFormatError, match="rule 'mlp'.*Q4_0"):
        parse_rules({"mlp": "q7_k"})


def test_paths():
    tree = {"a": [{"b": 1}], "c": (2,)}
    paths = [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["a/0/b", "c/0"]

    from flax import nnx

    state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    paths = [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert paths == ["bias", "kernel"]  # nnx's trailing '.value' is dropped
