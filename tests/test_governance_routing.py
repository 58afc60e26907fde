"""Routing: a declarative table picks the model, fallback chains keep only models that fit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncquota.errors import NoRouteError
from asyncquota.governance.budget import Price
from asyncquota.governance.routing import Model, Route, Router, Rule

SMALL = Model(name="llama-8b", upstream="groq", context_window=8_192, price=Price(0.05, 0.08))
MINI = Model(
    name="gpt-4o-mini",
    upstream="openai",
    context_window=128_000,
    price=Price(0.15, 0.60),
)
GPT4O = Model(name="gpt-4o", upstream="openai", context_window=128_000, price=Price(2.50, 10.0))
OPUS = Model(
    name="claude-opus",
    upstream="anthropic",
    context_window=200_000,
    price=Price(15.0, 75.0),
    api_name="claude-opus-4-1",
    path="/v1/messages",
)
LONG = Model(
    name="gemini-pro", upstream="google", context_window=1_000_000, price=Price(1.25, 10.0)
)
MODELS = (SMALL, MINI, GPT4O, OPUS, LONG)

RULES = (
    Rule(model="llama-8b", task="qa", complexity="low", max_context=8_000),  # 0
    Rule(model="gpt-4o-mini", task="qa", max_context=32_000),  # 1
    Rule(model="claude-opus", task="code_review", complexity="high"),  # 2
    Rule(model="gpt-4o", task="code_review", max_context=32_000),  # 3
    Rule(model="gemini-pro", min_context=32_000),  # 4
    Rule(model="gpt-4o-mini", task="batch"),  # 5
)
FALLBACKS = {
    "claude-opus": ["gpt-4o", "gpt-4o-mini"],
    "gpt-4o": ["llama-8b", "gpt-4o-mini"],
    "gpt-4o-mini": ["llama-8b"],
}


def router(**overrides: object) -> Router:
    config: dict[str, object] = {
        "models": MODELS,
        "rules": RULES,
        "fallbacks": FALLBACKS,
        "default_model": "gpt-4o",
    }
    config.update(overrides)
    return Router(**config)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("task", "complexity", "context", "model", "reason"),
    [
        ("qa", "low", 2_000, "llama-8b", "rule 0: task=qa, complexity=low, context < 8000"),
        ("qa", "low", 8_000, "gpt-4o-mini", "rule 1: task=qa, context < 32000"),
        ("qa", "high", 2_000, "gpt-4o-mini", "rule 1: task=qa, context < 32000"),
        ("qa", None, 31_999, "gpt-4o-mini", "rule 1: task=qa, context < 32000"),
        ("qa", "low", 32_000, "gemini-pro", "rule 4: context >= 32000"),
        ("code_review", "high", 2_000, "claude-opus", "rule 2: task=code_review, complexity=high"),
        (
            "code_review",
            "high",
            150_000,
            "claude-opus",
            "rule 2: task=code_review, complexity=high",
        ),
        ("code_review", "low", 20_000, "gpt-4o", "rule 3: task=code_review, context < 32000"),
        ("code_review", None, 40_000, "gemini-pro", "rule 4: context >= 32000"),
        ("batch", "medium", 10_000, "gpt-4o-mini", "rule 5: task=batch"),
        ("analysis", "high", 10_000, "gpt-4o", "default model"),
        (None, None, 10_000, "gpt-4o", "default model"),
    ],
)
def test_the_table_picks_the_first_rule_whose_task_complexity_and_context_all_hold(
    task: str | None, complexity: str | None, context: int, model: str, reason: str
):
    route = router().route(context_tokens=context, task=task, complexity=complexity)
    assert route.model.name == model
    assert route.reason == reason


def test_a_rule_with_both_context_bounds_reads_as_a_range():
    rule = Rule(model="gpt-4o", min_context=8_000, max_context=32_000)
    assert rule.describe() == "8000 <= context < 32000"
    assert Rule(model="gpt-4o").describe() == "any request"


def test_a_model_named_by_the_request_wins_over_every_rule():
    route = router().route(context_tokens=2_000, model="claude-opus", task="qa", complexity="low")
    assert route.model is OPUS
    assert route.reason == "model claude-opus requested"
    assert route.chain == (GPT4O, MINI)
    assert route.model.api_name == "claude-opus-4-1"
    assert route.model.path == "/v1/messages"


def test_the_fallback_chain_keeps_its_order_and_drops_models_whose_window_is_too_small():
    r = router()
    assert r.route(context_tokens=4_000, model="gpt-4o").chain == (SMALL, MINI)
    assert r.route(context_tokens=20_000, model="gpt-4o").chain == (MINI,)
    assert r.route(context_tokens=130_000, model="claude-opus").chain == ()


def test_a_chosen_model_too_small_for_the_request_gives_way_to_its_first_fallback_that_fits() -> (
    None
):
    r = router(fallbacks={"llama-8b": ["gpt-4o-mini", "gpt-4o"]})
    route = r.route(context_tokens=8_000, model="llama-8b")
    assert route.model is SMALL  # 8 000 fits a window of 8 192
    route = r.route(context_tokens=9_000, model="llama-8b")
    assert route.model is MINI
    assert route.chain == (GPT4O,)
    assert route.reason == (
        "model llama-8b requested; fallback from llama-8b (8192 tokens): too small for 9000 tokens"
    )


def test_a_request_no_model_of_the_chain_can_hold_gets_no_route_error():
    with pytest.raises(NoRouteError) as caught:
        router().route(context_tokens=300_000, task="code_review", complexity="high")
    assert caught.value.reason == "no_route"
    assert str(caught.value) == (
        "No model can take 300000 tokens (rule 2: task=code_review, complexity=high): "
        "claude-opus (200000 tokens), gpt-4o (128000 tokens), gpt-4o-mini (128000 tokens) "
        "are too small."
    )


def test_no_matching_rule_and_no_default_model_is_no_route():
    with pytest.raises(NoRouteError, match="no default model is configured"):
        router(default_model=None).route(context_tokens=1_000, task="analysis")


def test_moving_along_the_chain_says_which_model_failed_and_why():
    route = router().route(context_tokens=4_000, model="gpt-4o")
    second = route.fallback("cooling down")
    assert second == Route(model=SMALL, reason="fallback from gpt-4o: cooling down", chain=(MINI,))
    third = second.fallback("out of quota")
    assert third == Route(model=MINI, reason="fallback from llama-8b: out of quota", chain=())
    assert third.fallback("shedding") is None


def test_cheaper_picks_the_cheapest_model_of_the_route_that_fits_input_plus_output():
    r = router()
    route = r.route(context_tokens=6_000, model="claude-opus")  # chain: gpt-4o, mini
    down = r.cheaper(route, input_tokens=5_000, output_tokens=1_000)
    assert down is not None
    assert down.model is MINI
    # claude-opus: 5000 × 15 + 1000 × 75 per million = $0.15; mini: $0.00135.
    assert down.reason == "downgraded from claude-opus: $0.00135 instead of $0.15"
    assert down.chain == (GPT4O,)


def test_cheaper_never_leaves_the_route_for_a_model_whose_window_is_too_small():
    r = router()
    route = r.route(context_tokens=4_000, model="gpt-4o")  # chain: llama-8b, mini
    fits_all = r.cheaper(route, input_tokens=3_000, output_tokens=1_000)
    assert fits_all is not None
    assert fits_all.model is SMALL
    assert fits_all.chain == (MINI,)
    too_big_for_llama = r.cheaper(route, input_tokens=8_000, output_tokens=1_000)
    assert too_big_for_llama is not None
    assert too_big_for_llama.model is MINI


def test_cheaper_within_max_cost_and_none_when_nothing_is_cheaper_enough():
    r = router()
    route = r.route(context_tokens=6_000, model="claude-opus")
    # gpt-4o costs $0.0225 for 5 000 in + 1 000 out, mini $0.00135.
    within = r.cheaper(route, input_tokens=5_000, output_tokens=1_000, max_cost=0.001)
    assert within is None
    within = r.cheaper(route, input_tokens=5_000, output_tokens=1_000, max_cost=0.05)
    assert within is not None
    assert within.model is MINI
    assert within.reason.endswith(", within $0.05")
    cheapest = r.route(context_tokens=4_000, model="llama-8b")
    assert r.cheaper(cheapest, input_tokens=3_000, output_tokens=1_000) is None


def test_cheaper_is_strictly_cheaper_and_ties_keep_the_chain_order():
    twin = Model(name="mini-twin", upstream="azure", context_window=128_000, price=MINI.price)
    r = Router(
        models=(MINI, twin, GPT4O),
        fallbacks={"gpt-4o-mini": ["mini-twin"], "gpt-4o": ["mini-twin", "gpt-4o-mini"]},
    )
    assert (
        r.cheaper(r.route(context_tokens=10, model="gpt-4o-mini"), input_tokens=5, output_tokens=5)
        is None
    )
    down = r.cheaper(r.route(context_tokens=10, model="gpt-4o"), input_tokens=5, output_tokens=5)
    assert down is not None
    assert (down.model, down.chain) == (twin, (MINI,))


@given(
    context=st.integers(min_value=0, max_value=1_100_000),
    task=st.sampled_from([None, "qa", "code_review", "batch", "analysis"]),
    complexity=st.sampled_from([None, "low", "medium", "high"]),
)
def test_every_route_and_every_model_of_its_chain_fits_the_request(
    context: int, task: str | None, complexity: str | None
):
    try:
        route = router().route(context_tokens=context, task=task, complexity=complexity)
    except NoRouteError:
        assert context > 200_000
        return
    assert all(m.context_window >= context for m in (route.model, *route.chain))
    assert route.model not in route.chain


def test_a_request_naming_an_unknown_model_is_refused_with_no_route_error():
    with pytest.raises(NoRouteError) as caught:
        router().route(context_tokens=10, model="gpt-5")
    assert str(caught.value) == (
        "The requested model 'gpt-5' is not one of the configured models: "
        "claude-opus, gemini-pro, gpt-4o, gpt-4o-mini, llama-8b."
    )


def test_model_lookup_by_name():
    assert router().model("gpt-4o") is GPT4O
    with pytest.raises(
        ValueError,
        match=r"The model 'gpt-5' is not one of the configured models: "
        r"claude-opus, gemini-pro, gpt-4o, gpt-4o-mini, llama-8b\.",
    ):
        router().model("gpt-5")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"models": ()}, "A router needs at least one model."),
        ({"models": (MINI, GPT4O, MINI)}, "The model name 'gpt-4o-mini' appears more than once."),
        ({"rules": (*RULES, Rule(model="gpt-5"))}, "rules[6].model 'gpt-5' is not one of"),
        (
            {"rules": (Rule(model="gpt-4o", complexity="hard"),)},
            "rules[0].complexity must be one of low, medium, high or None, not 'hard'.",
        ),
        (
            {"rules": (Rule(model="gpt-4o", min_context=-1),)},
            "rules[0].min_context must be an integer >= 0, not -1.",
        ),
        (
            {"rules": (RULES[0], Rule(model="gpt-4o", min_context=8_000, max_context=8_000))},
            "rules[1].max_context must be None or an integer greater than min_context (8000), "
            "not 8000.",
        ),
        ({"fallbacks": {"gpt-5": ["gpt-4o"]}}, "The fallbacks key 'gpt-5' is not one of"),
        (
            {"fallbacks": {"gpt-4o": ["gpt-4o-mini", "o3"]}},
            "fallbacks['gpt-4o'][1] 'o3' is not one of",
        ),
        ({"fallbacks": {"gpt-4o": ["gpt-4o"]}}, "fallbacks['gpt-4o'] repeats the model 'gpt-4o'."),
        (
            {"fallbacks": {"gpt-4o": ["gpt-4o-mini", "gpt-4o-mini"]}},
            "fallbacks['gpt-4o'] repeats the model 'gpt-4o-mini'.",
        ),
        (
            {"fallbacks": {"gpt-4o": "gpt-4o-mini"}},
            "fallbacks['gpt-4o'] must be a sequence of model names, not the string 'gpt-4o-mini'.",
        ),
        ({"default_model": "gpt-5"}, "default_model 'gpt-5' is not one of"),
    ],
)
def test_invalid_configuration_fails_at_construction_naming_the_field(
    overrides: dict[str, object], message: str
):
    with pytest.raises(ValueError) as caught:
        router(**overrides)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_a_request_must_count_its_context_in_whole_tokens(bad: object):
    with pytest.raises(ValueError, match=f"^context_tokens must be an integer >= 0, not {bad!r}."):
        router().route(context_tokens=bad)  # type: ignore[arg-type]


def test_a_request_with_an_unknown_complexity_is_a_value_error():
    with pytest.raises(
        ValueError, match="complexity must be one of low, medium, high or None, not 'extreme'"
    ):
        router().route(context_tokens=10, complexity="extreme")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "A model's name must be a non-empty string, not ''."),
        ({"upstream": ""}, "A model's upstream must be a non-empty string, not ''."),
        (
            {"context_window": 0},
            "Model 'm': context_window must be a positive integer of tokens, not 0.",
        ),
        (
            {"context_window": True},
            "Model 'm': context_window must be a positive integer of tokens, not True.",
        ),
        ({"api_name": ""}, "Model 'm': api_name must be a non-empty string or None, not ''."),
        ({"path": "v1/chat"}, "Model 'm': path must start with '/', not 'v1/chat'."),
    ],
)
def test_a_model_validates_its_fields(fields: dict[str, object], message: str):
    config: dict[str, object] = {
        "name": "m",
        "upstream": "u",
        "context_window": 1_000,
        "price": Price(1.0, 2.0),
    }
    config.update(fields)
    with pytest.raises(ValueError) as caught:
        Model(**config)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_repr_shows_the_size_of_the_table():
    assert repr(router()) == "<Router models=5 rules=6 default='gpt-4o'>"
