"""The governance TOML configuration: the example loads into the objects it describes, and
every kind of mistake fails at load with a ConfigError naming the field by its path."""

from __future__ import annotations

import copy
import re
import textwrap
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asyncquota.governance import config
from asyncquota.governance.alerts import Pace, Route, Thresholds, UsageMonitor, WebhookSink
from asyncquota.governance.budget import Price
from asyncquota.governance.config import (
    AlertsSpec,
    BudgetSpec,
    ConfigError,
    GatewaySpec,
    GovernanceConfig,
    UpstreamSpec,
    WebhookSpec,
    load_config,
    parse_config,
)
from asyncquota.governance.routing import Model, Rule
from asyncquota.governance.tiers import TenantQuotas, Tier, TierLimits


def docstring_example() -> str:
    """The TOML example of config.py's docstring, exactly as a reader would copy it."""
    doc = config.__doc__
    assert doc is not None
    block = doc.split("as written::\n\n", 1)[1]
    return textwrap.dedent(block)


EXAMPLE = docstring_example()

MINIMAL = """
[upstreams.local]
base_url = "http://127.0.0.1:8000"

[models.llama]
upstream = "local"
context_window = 8192
input_per_mtok = 0
output_per_mtok = 0
"""


def example_data() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE)


def test_the_docstring_example_loads_from_a_file_into_the_objects_it_describes(
    tmp_path: Path,
) -> None:
    file = tmp_path / "governance.toml"
    file.write_text(EXAMPLE, encoding="utf-8")

    loaded = load_config(file)

    gpt4o = Model(
        name="gpt-4o",
        upstream="openai",
        context_window=128_000,
        price=Price(2.50, 10.00),
        api_name="gpt-4o-2024-08-06",
    )
    mini = Model(
        name="gpt-4o-mini", upstream="openai", context_window=128_000, price=Price(0.15, 0.60)
    )
    haiku = Model(
        name="claude-haiku",
        upstream="anthropic",
        context_window=200_000,
        price=Price(0.80, 4.00),
        api_name="claude-3-5-haiku-latest",
        path="/v1/messages",
    )
    assert loaded == GovernanceConfig(
        timezone="Europe/Paris",
        store=tmp_path / "quota.sqlite3",
        upstreams=(
            UpstreamSpec(
                name="openai",
                base_url="https://api.openai.com",
                api_key_env="OPENAI_API_KEY",
                auth="bearer",
                headers={"OpenAI-Organization": "org-123"},
                rpm=10_000,
                tpm=2_000_000,
                max_connections=100,
                default_deadline=60.0,
                timeout=120.0,
            ),
            UpstreamSpec(
                name="anthropic",
                base_url="https://api.anthropic.com",
                api_key_env="ANTHROPIC_API_KEY",
                auth="x-api-key",
                headers={"anthropic-version": "2023-06-01"},
                monthly_cap=500.0,
            ),
        ),
        models=(gpt4o, mini, haiku),
        rules=(
            Rule(model="gpt-4o", task="code_review", complexity="high"),
            Rule(model="claude-haiku", min_context=32_000),
        ),
        fallbacks={"gpt-4o": ("claude-haiku", "gpt-4o-mini")},
        default_model="gpt-4o-mini",
        tiers=(
            Tier(
                name="free",
                models={"*": TierLimits(rpm=20, rpd=200, tpm=40_000)},
                shared=TierLimits(rpd=300),
            ),
            Tier(
                name="pro",
                models={
                    "*": TierLimits(rpm=600, rpd=20_000),
                    "gpt-4o": TierLimits(rpm=100, tpm=400_000),
                },
            ),
        ),
        tenants={"acme": "pro"},
        default_tier="free",
        tenant_timezone="Asia/Shanghai",
        budget=BudgetSpec(
            monthly=5000.0,
            tenants={"acme": 1000.0},
            downgrade_share=0.10,
            when_spent="downgrade",
            downgrade_at=0.80,
            overdraft_limit=250.0,
        ),
        gateway=GatewaySpec(
            exhausted_hold=600.0, fallback_on=("exhausted", "overloaded", "transport")
        ),
        alerts=AlertsSpec(
            warning=0.70,
            critical=0.90,
            hysteresis=0.05,
            log=True,
            shed_batch_on_critical=True,
            shed_seconds=60.0,
            webhooks=(
                WebhookSpec(url_env="SLACK_WEBHOOK_URL", format="slack", timeout=5.0),
                WebhookSpec(
                    url_env="DINGTALK_WEBHOOK_URL",
                    format="dingtalk",
                    secret_env="DINGTALK_SECRET",
                    markdown=True,
                    route=Route(
                        min_level="warning",
                        kinds={"usage", "exhausted", "fallback"},
                        dimensions=("upstream:*", "budget", "model:*"),
                    ),
                    pace=Pace(20, per=60.0),
                ),
            ),
            thresholds={
                "tenant:*:rpd": Thresholds(
                    warning=0.8, critical_action="offer the customer the pro tier"
                )
            },
        ),
    )


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"exhausted_hold": 0}, "gateway.exhausted_hold must be a positive number, not 0."),
        (
            {"fallback_on": ["exhausted", "timeout"]},
            "gateway.fallback_on[1] names an unknown cause 'timeout'; known: exhausted, "
            "overloaded, transport.",
        ),
        ({"fallback_on": "exhausted"}, "gateway.fallback_on must be an array"),
        ({"exhausted": 1}, "gateway"),
    ],
)
def test_the_gateway_section_is_checked(section: dict[str, Any], message: str) -> None:
    data = tomllib.loads(MINIMAL)
    data["gateway"] = section
    with pytest.raises(ConfigError) as refused:
        parse_config(data)
    assert message in str(refused.value)


def test_the_gateway_section_may_narrow_what_falls_back() -> None:
    data = tomllib.loads(MINIMAL)
    data["gateway"] = {"fallback_on": ["overloaded"]}
    assert parse_config(data).gateway == GatewaySpec(fallback_on=("overloaded",))
    assert parse_config(tomllib.loads(MINIMAL)).gateway == GatewaySpec()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("downgrade_at", 1.5, "budget.downgrade_at must be a number above 0 and at most 1"),
        ("overdraft_limit", -1, "budget.overdraft_limit must be a number of dollars >= 0"),
    ],
)
def test_the_budget_thresholds_are_checked(key: str, value: object, message: str) -> None:
    data = tomllib.loads(MINIMAL)
    data["budget"] = {"monthly": 10.0, key: value}
    with pytest.raises(ConfigError) as refused:
        parse_config(data)
    assert message in str(refused.value)


def test_the_loaded_configuration_is_read_only() -> None:
    loaded = parse_config(example_data())

    with pytest.raises(AttributeError):
        loaded.timezone = "UTC"  # type: ignore[misc]
    with pytest.raises(TypeError):
        loaded.tenants["acme"] = "free"  # type: ignore[index]
    with pytest.raises(TypeError):
        loaded.upstreams[0].headers["Authorization"] = "Bearer x"  # type: ignore[index]


def test_only_upstreams_and_models_are_required_and_the_rest_defaults() -> None:
    loaded = parse_config(tomllib.loads(MINIMAL))

    assert loaded == GovernanceConfig(
        upstreams=(UpstreamSpec(name="local", base_url="http://127.0.0.1:8000"),),
        models=(Model(name="llama", upstream="local", context_window=8192, price=Price(0, 0)),),
    )
    assert (loaded.timezone, loaded.store, loaded.budget, loaded.alerts) == (
        "UTC",
        None,
        None,
        None,
    )
    # The Shaper's own defaults apply where the file says nothing.
    upstream = loaded.upstreams[0]
    assert (upstream.api_key_env, upstream.max_connections, upstream.timeout) == (None, None, None)


def test_empty_budget_and_alerts_sections_switch_them_on_with_their_defaults() -> None:
    loaded = parse_config(tomllib.loads(MINIMAL + "[budget]\n[alerts]\n"))

    assert loaded.budget == BudgetSpec(
        monthly=None, tenants={}, downgrade_share=0.1, when_spent="downgrade"
    )
    assert loaded.alerts == AlertsSpec(
        warning=0.7,
        critical=0.9,
        hysteresis=0.05,
        log=True,
        shed_batch_on_critical=False,
        shed_seconds=60.0,
        webhooks=(),
    )


# ---------------------------------------------------------------------------- the store path


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("quota.sqlite3", "conf/quota.sqlite3"),
        ("data/quota.sqlite3", "conf/data/quota.sqlite3"),
        ("../shared/quota.sqlite3", "conf/../shared/quota.sqlite3"),
    ],
)
def test_a_relative_store_path_is_taken_from_the_toml_files_folder(
    tmp_path: Path, written: str, expected: str
) -> None:
    (tmp_path / "conf").mkdir()
    file = tmp_path / "conf" / "governance.toml"
    file.write_text(f'store = "{written}"\n{MINIMAL}', encoding="utf-8")

    assert load_config(file).store == tmp_path / expected


def test_an_absolute_store_path_is_kept(tmp_path: Path) -> None:
    file = tmp_path / "governance.toml"
    elsewhere = tmp_path / "var" / "quota.sqlite3"
    file.write_text(f'store = "{elsewhere.as_posix()}"\n{MINIMAL}', encoding="utf-8")

    assert load_config(file).store == elsewhere


def test_a_file_named_relative_to_the_working_directory_gives_an_absolute_store_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "governance.toml").write_text(f'store = "q.sqlite3"\n{MINIMAL}', encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    store = load_config("governance.toml").store

    # Still the same file after the process changes directory.
    assert store == tmp_path / "q.sqlite3"
    assert store is not None and store.is_absolute()


def test_parse_config_takes_a_relative_store_from_base_dir_or_keeps_it_relative(
    tmp_path: Path,
) -> None:
    data = tomllib.loads(f'store = "q.sqlite3"\n{MINIMAL}')

    assert parse_config(data, base_dir=tmp_path).store == tmp_path / "q.sqlite3"
    assert parse_config(data).store == Path("q.sqlite3")


def test_no_store_means_counters_in_memory() -> None:
    assert parse_config(tomllib.loads(MINIMAL), base_dir=Path("/etc")).store is None


# ---------------------------------------------------------------------------- file errors


def test_a_toml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    file = tmp_path / "governance.toml"
    lines = EXAMPLE.splitlines()
    broken = next(i for i, line in enumerate(lines) if line.startswith("context_window"))
    lines[broken] = "context_window = "
    file.write_text("\n".join(lines), encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_config(file)

    message = str(caught.value)
    assert message.startswith(f"{file} is not valid TOML: ")
    assert f"line {broken + 1}," in message


def test_a_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "governance.toml"
    file.write_bytes(b'timezone = "Europe/Z\xfcrich"\n')

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(file))} is not UTF-8 text"):
        load_config(file)


def test_a_missing_file_is_an_os_error_not_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nowhere.toml")


# ---------------------------------------------------------------------------- invalid fields

Edit = Callable[[dict[str, Any]], None]


def setting(*path: str | int, to: Any) -> Edit:
    """An edit of the example: the value at ``path`` becomes ``to`` (created if absent)."""

    def edit(data: dict[str, Any]) -> None:
        *parents, last = path
        for step in parents:
            data = data[step]  # type: ignore[index]
        data[last] = to  # type: ignore[index]

    return edit


def removing(*path: str | int) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path
        for step in parents:
            data = data[step]  # type: ignore[index]
        del data[last]  # type: ignore[arg-type]

    return edit


def renaming(*path: str, to: str) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path
        for step in parents:
            data = data[step]
        data[to] = data.pop(last)

    return edit


KNOWN_MODELS = "claude-haiku, gpt-4o, gpt-4o-mini"

INVALID: dict[str, tuple[Edit, str]] = {
    # Values out of range or of the wrong type.
    "negative context window": (
        setting("models", "gpt-4o", "context_window", to=-5),
        "models.gpt-4o.context_window must be a positive integer, not -5.",
    ),
    "context window as a string": (
        setting("models", "gpt-4o", "context_window", to="128k"),
        "models.gpt-4o.context_window must be a positive integer, not '128k'.",
    ),
    "context window as a float": (
        setting("models", "gpt-4o", "context_window", to=128000.0),
        "models.gpt-4o.context_window must be a positive integer, not 128000.0.",
    ),
    "negative price": (
        setting("models", "claude-haiku", "output_per_mtok", to=-4.0),
        "models.claude-haiku.output_per_mtok must be a number of dollars >= 0, not -4.0.",
    ),
    "nan price": (
        setting("models", "claude-haiku", "input_per_mtok", to=float("nan")),
        "models.claude-haiku.input_per_mtok must be a number of dollars >= 0, not nan.",
    ),
    "boolean rpm": (
        setting("upstreams", "openai", "rpm", to=True),
        "upstreams.openai.rpm must be a positive whole number, not true.",
    ),
    "infinite tpm": (
        setting("upstreams", "openai", "tpm", to=float("inf")),
        "upstreams.openai.tpm must be a positive whole number, not inf.",
    ),
    "zero max connections": (
        setting("upstreams", "openai", "max_connections", to=0),
        "upstreams.openai.max_connections must be a positive integer, not 0.",
    ),
    "negative timeout": (
        setting("upstreams", "openai", "timeout", to=-1.0),
        "upstreams.openai.timeout must be a positive number, not -1.0.",
    ),
    "auth not one of the two": (
        setting("upstreams", "openai", "auth", to="basic"),
        'upstreams.openai.auth must be "bearer" or "x-api-key", not \'basic\'.',
    ),
    "header value not a string": (
        setting("upstreams", "anthropic", "headers", "anthropic-version", to=2023),
        "upstreams.anthropic.headers.anthropic-version must be a non-empty string, not 2023.",
    ),
    "headers not a table": (
        setting("upstreams", "anthropic", "headers", to=["anthropic-version"]),
        "upstreams.anthropic.headers must be a table, not an array.",
    ),
    "a model that is not a table": (
        setting("models", "gpt-4o-mini", to="openai"),
        "models.gpt-4o-mini must be a table, not 'openai'.",
    ),
    "rules not an array": (
        setting("routing", "rules", to={"model": "gpt-4o"}),
        "routing.rules must be an array, not a table.",
    ),
    "complexity not one of three": (
        setting("routing", "rules", 0, "complexity", to="extreme"),
        'routing.rules[0].complexity must be "low" or "medium" or "high", not \'extreme\'.',
    ),
    "negative min context": (
        setting("routing", "rules", 1, "min_context", to=-1),
        "routing.rules[1].min_context must be an integer >= 0, not -1.",
    ),
    "tier limit zero": (
        setting("tiers", "free", "*", "rpd", to=0),
        'tiers.free."*".rpd must be a positive whole number, not 0.',
    ),
    "budget tenant negative": (
        setting("budget", "tenants", "acme", to=-10),
        "budget.tenants.acme must be a positive number, not -10.",
    ),
    "downgrade share zero": (
        setting("budget", "downgrade_share", to=0),
        "budget.downgrade_share must be a number above 0 and at most 1, not 0.",
    ),
    "when spent neither": (
        setting("budget", "when_spent", to="panic"),
        'budget.when_spent must be "downgrade" or "reject", not \'panic\'.',
    ),
    "log not a boolean": (
        setting("alerts", "log", to="yes"),
        "alerts.log must be true or false, not 'yes'.",
    ),
    "webhook format unknown": (
        setting("alerts", "webhooks", 0, "format", to="teams"),
        'alerts.webhooks[0].format must be "json" or "wecom" or "dingtalk" or "feishu" or '
        "\"slack\", not 'teams'.",
    ),
    "webhook timeout zero": (
        setting("alerts", "webhooks", 0, "timeout", to=0),
        "alerts.webhooks[0].timeout must be a positive number, not 0.",
    ),
    "a key in a quoted path": (
        setting("tiers", "free", to={"gpt 4o": {"rpm": 1}}),
        "tiers.free.\"gpt 4o\" names an unknown model 'gpt 4o'; known: " + KNOWN_MODELS + ".",
    ),
    # Unknown keys, anywhere.
    "misspelt model field": (
        renaming("models", "gpt-4o", "context_window", to="contxt_window"),
        "models.gpt-4o.contxt_window is not a known field; did you mean context_window?",
    ),
    "misspelt tier limit": (
        renaming("tiers", "pro", "gpt-4o", "tpm", to="tpn"),
        "tiers.pro.gpt-4o.tpn is not a known field; did you mean tpm?",
    ),
    "misspelt top-level section": (
        renaming("routing", to="routes"),
        "routes is not a known field; did you mean routing?",
    ),
    "unknown field with nothing close": (
        setting("alerts", "webhooks", 0, "channel", to="#ops"),
        "alerts.webhooks[0].channel is not a known field; known fields: dimensions, format, "
        "kinds, markdown, min_level, pace, secret, secret_env, tenants, timeout, url, url_env.",
    ),
    "misspelt field in a rule": (
        setting("routing", "rules", 1, "max_contxt", to=8000),
        "routing.rules[1].max_contxt is not a known field; did you mean max_context?",
    ),
    # Required fields.
    "no upstreams": (removing("upstreams"), "upstreams is required."),
    "no models": (removing("models"), "models is required."),
    "model without upstream": (
        removing("models", "gpt-4o-mini", "upstream"),
        "models.gpt-4o-mini.upstream is required.",
    ),
    "upstream without base url": (
        removing("upstreams", "anthropic", "base_url"),
        "upstreams.anthropic.base_url is required.",
    ),
    "rule without model": (
        removing("routing", "rules", 0, "model"),
        "routing.rules[0].model is required.",
    ),
    "an empty key": (
        setting("tenants", "members", "", to="pro"),
        'tenants.members has an empty key ""; give it a name.',
    ),
    # References to what does not exist.
    "rule naming an unknown model": (
        setting("routing", "rules", 1, "model", to="gpt-5"),
        f"routing.rules[1].model names an unknown model 'gpt-5'; known: {KNOWN_MODELS}.",
    ),
    "default model unknown": (
        setting("routing", "default_model", to="gpt-3.5"),
        f"routing.default_model names an unknown model 'gpt-3.5'; known: {KNOWN_MODELS}.",
    ),
    "model naming an unknown upstream": (
        setting("models", "gpt-4o", "upstream", to="azure"),
        "models.gpt-4o.upstream names an unknown upstream 'azure'; known: anthropic, openai.",
    ),
    "fallback naming an unknown model": (
        setting("models", "gpt-4o", "fallbacks", to=["claude-haiku", "claude-sonnet"]),
        "models.gpt-4o.fallbacks[1] names an unknown model 'claude-sonnet'; known: "
        f"{KNOWN_MODELS}.",
    ),
    "fallback to itself": (
        setting("models", "gpt-4o", "fallbacks", to=["gpt-4o-mini", "gpt-4o"]),
        "models.gpt-4o.fallbacks[1] repeats the model 'gpt-4o' in its own chain.",
    ),
    "fallback twice": (
        setting("models", "gpt-4o", "fallbacks", to=["gpt-4o-mini", "gpt-4o-mini"]),
        "models.gpt-4o.fallbacks[1] repeats the model 'gpt-4o-mini' in its own chain.",
    ),
    "tier naming an unknown model": (
        renaming("tiers", "pro", "gpt-4o", to="gpt4o"),
        f"tiers.pro.gpt4o names an unknown model 'gpt4o'; known: {KNOWN_MODELS}.",
    ),
    "tenant naming an unknown tier": (
        setting("tenants", "members", "globex", to="enterprise"),
        "tenants.members.globex names an unknown tier 'enterprise'; known: free, pro.",
    ),
    "default tier unknown": (
        setting("tenants", "default_tier", to="trial"),
        "tenants.default_tier names an unknown tier 'trial'; known: free, pro.",
    ),
    "tenant tier without any tiers": (
        removing("tiers"),
        "tenants.default_tier names an unknown tier 'free'; known: none.",
    ),
    # Webhooks and URLs.
    "webhook with neither url nor url_env": (
        removing("alerts", "webhooks", 0, "url_env"),
        "alerts.webhooks[0] needs exactly one of url and url_env; it has neither.",
    ),
    "webhook with both url and url_env": (
        setting("alerts", "webhooks", 0, "url", to="https://hooks.slack.com/services/T/B/x"),
        "alerts.webhooks[0] needs exactly one of url and url_env; it has both.",
    ),
    "base url not http": (
        setting("upstreams", "openai", "base_url", to="ftp://api.openai.com"),
        "upstreams.openai.base_url must be an http:// or https:// URL, not 'ftp://api.openai.com'.",
    ),
    "base url without a host": (
        setting("upstreams", "openai", "base_url", to="https://"),
        "upstreams.openai.base_url must be an http:// or https:// URL, not 'https://'.",
    ),
    "model path without a slash": (
        setting("models", "claude-haiku", "path", to="v1/messages"),
        "models.claude-haiku.path must be a path starting with '/', not 'v1/messages'.",
    ),
    # Checks that span fields, made by the classes the configuration builds.
    "max context not above min context": (
        setting("routing", "rules", 1, "max_context", to=8000),
        "routing.rules[1].max_context must be None or an integer greater than min_context "
        "(32000), not 8000.",
    ),
    "critical below warning": (
        setting("alerts", "critical", to=0.6),
        "alerts: Alert thresholds must satisfy 0 < warning < critical <= 1; got "
        "warning=0.7 and critical=0.6.",
    ),
    "unknown time zone": (
        setting("timezone", to="Europe/Parsi"),
        "timezone must be an IANA time zone name such as 'UTC' or 'Europe/Paris', not "
        "'Europe/Parsi'.",
    ),
    "unknown time zone of tenants' days": (
        setting("tenants", "timezone", to="Asia/Shanghia"),
        "tenants.timezone: timezone must be an IANA time zone name such as 'UTC' or "
        "'Europe/Paris', not 'Asia/Shanghia'.",
    ),
    "tenants' time zone not a string": (
        setting("tenants", "timezone", to=8),
        "tenants.timezone must be a non-empty string, not 8.",
    ),
    "misspelt shared tier limit": (
        setting("tiers", "free", "shared", to={"rpds": 300}),
        "tiers.free.shared.rpds is not a known field; did you mean rpd?",
    ),
    "shared tier limit zero": (
        setting("tiers", "free", "shared", "rpd", to=0),
        "tiers.free.shared.rpd must be a positive whole number, not 0.",
    ),
    "auth without a key to send": (
        removing("upstreams", "anthropic", "api_key_env"),
        "upstreams.anthropic.auth says how to send a key, but upstreams.anthropic.api_key_env "
        "names no variable to read it from.",
    ),
}


@pytest.mark.parametrize(("edit", "message"), INVALID.values(), ids=INVALID.keys())
def test_an_invalid_configuration_fails_at_load_naming_the_field(edit: Edit, message: str) -> None:
    data = example_data()
    edit(data)

    with pytest.raises(ConfigError) as caught:
        parse_config(data)

    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


def test_a_tiers_shared_key_cannot_be_read_two_ways() -> None:
    data = example_data()
    data["models"]["shared"] = dict(data["models"]["gpt-4o-mini"])

    with pytest.raises(ConfigError) as caught:
        parse_config(data)

    assert str(caught.value) == (
        "tiers.free.shared is ambiguous: 'shared' holds the limits every model of the tier "
        "shares, and is also a model's name; rename that model (its api_name keeps the name "
        "sent upstream)."
    )
    # A model named "shared" is fine where no tier uses the key.
    del data["tiers"]["free"]["shared"]
    assert parse_config(data).tiers[0].shared == TierLimits()


def test_tenants_days_take_the_top_time_zone_unless_tenants_name_their_own() -> None:
    data = example_data()
    del data["tenants"]["timezone"]
    loaded = parse_config(data)
    assert (loaded.timezone, loaded.tenant_timezone) == ("Europe/Paris", None)
    assert parse_config(tomllib.loads(MINIMAL)).tenant_timezone is None


def test_tenant_ids_in_the_file_are_the_strings_an_int_tenant_is_read_as() -> None:
    data = example_data()
    data["tenants"]["members"]["42"] = "free"
    loaded = parse_config(data)
    quotas = TenantQuotas(
        tiers=loaded.tiers, tenants=dict(loaded.tenants), default_tier=loaded.default_tier
    )
    assert quotas.tier_of(42) is quotas.tier_of("42") is loaded.tiers[0]
    assert quotas.tier_of("acme") is loaded.tiers[1]


def test_the_same_mistake_in_a_file_fails_at_load_config(tmp_path: Path) -> None:
    file = tmp_path / "governance.toml"
    file.write_text(EXAMPLE.replace("context_window = 200000", "context_window = -5"), "utf-8")

    with pytest.raises(ConfigError, match=r"^models\.claude-haiku\.context_window must be"):
        load_config(file)


SECRET = "sk-proj-0123456789abcdef"

SECRETS: dict[str, tuple[Edit, str]] = {
    "a key pasted as api_key_env": (
        setting("upstreams", "openai", "api_key_env", to=SECRET),
        "upstreams.openai.api_key_env must name an environment variable",
    ),
    "a webhook URL pasted as url_env": (
        setting("alerts", "webhooks", 0, "url_env", to=f"https://hooks.slack.com/{SECRET}"),
        "alerts.webhooks[0].url_env must name an environment variable",
    ),
    "a webhook url that is not http": (
        setting("alerts", "webhooks", 0, to={"url": f"hooks.slack.com/{SECRET}"}),
        "alerts.webhooks[0].url: A webhook URL must be an absolute http or https URL",
    ),
    "a password in a base URL that is not http": (
        setting("upstreams", "openai", "base_url", to=f"ftp://me:{SECRET}@proxy.example/v1"),
        "upstreams.openai.base_url must be an http:// or https:// URL, not 'ftp://***@proxy",
    ),
    "a key in a base URL's query": (
        setting("upstreams", "openai", "base_url", to=f"https://me:{SECRET}@h/v1?key={SECRET}"),
        "upstreams.openai.base_url: The base URL 'https://***@h/v1?key=***' is not an absolute",
    ),
    "a key written as a header": (
        setting("upstreams", "openai", "headers", "Authorization", to=f"Bearer {SECRET}"),
        "upstreams.openai.headers.Authorization would carry a credential in the file",
    ),
    "an x-api-key header": (
        setting("upstreams", "anthropic", "headers", "X-Api-Key", to=SECRET),
        "upstreams.anthropic.headers.X-Api-Key would carry a credential in the file",
    ),
}


@pytest.mark.parametrize(("edit", "start"), SECRETS.values(), ids=SECRETS.keys())
def test_a_secret_in_the_wrong_place_is_refused_without_being_repeated(
    edit: Edit, start: str
) -> None:
    data = example_data()
    edit(data)

    with pytest.raises(ConfigError) as caught:
        parse_config(data)

    assert str(caught.value).startswith(start)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("tiers", "free", "*", "rpd"), 0.5),
        (("tiers", "pro", "gpt-4o", "tpm"), 400000.5),
        (("tiers", "pro", "*", "rpm"), 1e-3),
        (("upstreams", "openai", "rpm"), 9999.5),
        (("upstreams", "openai", "tpm"), 0.25),
    ],
)
def test_a_rate_that_counts_requests_or_tokens_must_be_whole(where, value) -> None:
    data = example_data()
    setting(*where, to=value)(data)
    with pytest.raises(ConfigError, match="must be a positive whole number, not"):
        parse_config(data)
    setting(*where, to=float(max(1, round(value))))(data)  # 600.0 is whole
    parse_config(data)


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_a_file_nested_too_deeply_is_a_config_error_not_a_recursion_error(
    tmp_path: Path, depth: int
) -> None:
    file = tmp_path / "deep.toml"
    file.write_text("x = " + "[" * depth + "]" * depth + "\n", "utf-8")
    with pytest.raises(ConfigError, match="nests arrays or tables too deeply"):
        load_config(file)
    inline = tmp_path / "inline.toml"
    inline.write_text("x = " + "{a = " * depth + "1" + "}" * depth + "\n", "utf-8")
    with pytest.raises(ConfigError, match="nests arrays or tables too deeply"):
        load_config(inline)


def test_a_webhook_may_give_its_url_in_the_file() -> None:
    data = example_data()
    data["alerts"]["webhooks"] = [{"url": "https://oapi.dingtalk.com/robot/send?access_token=t"}]

    alerts = parse_config(data).alerts

    assert alerts is not None
    assert alerts.webhooks == (
        WebhookSpec(url="https://oapi.dingtalk.com/robot/send?access_token=t", format="json"),
    )


def test_parse_config_leaves_its_input_untouched() -> None:
    data = example_data()
    before = copy.deepcopy(data)

    parse_config(data)

    assert data == before


# ---------------------------------------------------------------------------- alert sinks


def test_a_webhook_takes_its_secret_route_and_pace_and_builds_the_sink_they_describe() -> None:
    data = example_data()
    data["alerts"]["webhooks"] = [
        {
            "url": "https://open.feishu.cn/open-apis/bot/v2/hook/x",
            "format": "feishu",
            "secret": "s3cr3t",
            "tenants": ["acme"],
            "pace": {"messages": 3},
        },
        {"url_env": "WECOM_URL", "format": "wecom", "min_level": "critical"},
    ]
    alerts = parse_config(data).alerts

    assert alerts is not None
    feishu, wecom = alerts.webhooks
    assert feishu == WebhookSpec(
        url="https://open.feishu.cn/open-apis/bot/v2/hook/x",
        format="feishu",
        secret="s3cr3t",
        route=Route(tenants={"acme"}),
        pace=Pace(3, per=60.0),
    )
    assert wecom == WebhookSpec(
        url_env="WECOM_URL", format="wecom", route=Route(min_level="critical")
    )
    # What the Gateway makes of them, and the monitor of the thresholds.
    sink = WebhookSink(
        feishu.url or "",
        format=feishu.format,
        secret=feishu.secret,
        markdown=feishu.markdown,
        route=feishu.route,
        pace=feishu.pace,
    )
    assert (sink.route, sink.pace) == (Route(tenants={"acme"}), Pace(3))
    assert repr(sink) == "<WebhookSink feishu signed https://open.feishu.cn/…>"
    monitor = UsageMonitor(thresholds=alerts.thresholds, sinks=())
    assert monitor.thresholds("tenant:acme:gpt-4o:rpd") == (
        0.8,
        0.9,
        "raise tier",
        "offer the customer the pro tier",
    )
    assert monitor.thresholds("budget")[0] == 0.8


ALERT_SECRET = "SECd0-n0t-r3p3at"

INVALID_ALERTS: dict[str, tuple[Edit, str]] = {
    "a negative re-arm time": (
        setting("alerts", "rearm_after", to=-1),
        "alerts.rearm_after must be a number of seconds >= 0, not -1.",
    ),
    "a threshold above 1": (
        setting("alerts", "thresholds", "budget", to={"warning": 1.5}),
        "alerts.thresholds.budget.warning must be a number above 0 and at most 1, not 1.5.",
    ),
    "a rule's levels the wrong way round": (
        setting("alerts", "thresholds", "upstream:*", to={"warning": 0.9, "critical": 0.8}),
        'alerts.thresholds."upstream:*": Alert thresholds must satisfy 0 < warning < critical '
        "<= 1; got warning=0.9 and critical=0.8.",
    ),
    "a rule's level past the monitor's": (
        setting("alerts", "thresholds", "x", to={"warning": 0.95}),
        "alerts: The thresholds of 'x' must satisfy warning < critical; with the monitor's "
        "filled in they are warning=0.95 and critical=0.9.",
    ),
    "an empty action": (
        setting("alerts", "thresholds", "x", to={"critical_action": ""}),
        "alerts.thresholds.x.critical_action must be a non-empty string, not ''.",
    ),
    "a misspelt threshold field": (
        setting("alerts", "thresholds", "x", to={"warn": 0.5}),
        "alerts.thresholds.x.warn is not a known field; did you mean warning?",
    ),
    "thresholds not a table": (
        setting("alerts", "thresholds", to=[0.5]),
        "alerts.thresholds must be a table, not an array.",
    ),
    "markdown not a boolean": (
        setting("alerts", "webhooks", 1, "markdown", to="yes"),
        "alerts.webhooks[1].markdown must be true or false, not 'yes'.",
    ),
    "markdown where the format has none": (
        setting("alerts", "webhooks", 0, "markdown", to=True),
        "alerts.webhooks[0]: Markdown is for WeCom, DingTalk and Feishu robots, not a slack "
        "webhook.",
    ),
    "a secret where the format signs nothing": (
        setting("alerts", "webhooks", 0, "secret_env", to="SLACK_SECRET"),
        "alerts.webhooks[0]: Only DingTalk and Feishu robots sign their messages; a slack "
        "webhook takes no secret.",
    ),
    "both secret and secret_env": (
        setting("alerts", "webhooks", 1, "secret", to=ALERT_SECRET),
        "alerts.webhooks[1] needs at most one of secret and secret_env; it has both.",
    ),
    "an unknown level": (
        setting("alerts", "webhooks", 1, "min_level", to="error"),
        'alerts.webhooks[1].min_level must be "info" or "warning" or "critical", not \'error\'.',
    ),
    "an unknown kind": (
        setting("alerts", "webhooks", 1, "kinds", to=["usage", "digest"]),
        'alerts.webhooks[1].kinds[1] must be "usage" or "exhausted" or "fallback" or '
        "\"recovered\", not 'digest'.",
    ),
    "kinds not an array": (
        setting("alerts", "webhooks", 1, "kinds", to="usage"),
        "alerts.webhooks[1].kinds must be an array, not 'usage'.",
    ),
    "an empty dimension pattern": (
        setting("alerts", "webhooks", 1, "dimensions", to=["budget", ""]),
        "alerts.webhooks[1].dimensions[1] must be a non-empty string, not ''.",
    ),
    "a tenant that is not a string": (
        setting("alerts", "webhooks", 1, "tenants", to=[42]),
        "alerts.webhooks[1].tenants[0] must be a non-empty string, not 42.",
    ),
    "a pace of no messages": (
        setting("alerts", "webhooks", 1, "pace", to={"messages": 0}),
        "alerts.webhooks[1].pace.messages must be a positive integer, not 0.",
    ),
    "a pace without messages": (
        setting("alerts", "webhooks", 1, "pace", to={"per": 60}),
        "alerts.webhooks[1].pace.messages is required.",
    ),
    "a pace over no time": (
        setting("alerts", "webhooks", 1, "pace", to={"messages": 20, "per": 0}),
        "alerts.webhooks[1].pace.per must be a positive number, not 0.",
    ),
    "a pace that is a number": (
        setting("alerts", "webhooks", 1, "pace", to=20),
        "alerts.webhooks[1].pace must be a table, not 20.",
    ),
}


@pytest.mark.parametrize(("edit", "message"), INVALID_ALERTS.values(), ids=INVALID_ALERTS.keys())
def test_an_invalid_alert_option_fails_at_load_naming_the_field(edit: Edit, message: str) -> None:
    data = example_data()
    edit(data)

    with pytest.raises(ConfigError) as caught:
        parse_config(data)

    assert str(caught.value) == message
    assert ALERT_SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("secret", "start"),
    [
        ("", "alerts.webhooks[1].secret must be a non-empty string; the value given is not"),
        (["SEC", ALERT_SECRET], "alerts.webhooks[1].secret must be a non-empty string; the"),
    ],
)
def test_a_webhook_secret_that_is_not_one_is_refused_without_being_repeated(
    secret: object, start: str
) -> None:
    data = example_data()
    del data["alerts"]["webhooks"][1]["secret_env"]
    data["alerts"]["webhooks"][1]["secret"] = secret

    with pytest.raises(ConfigError) as caught:
        parse_config(data)

    assert str(caught.value).startswith(start)
    assert ALERT_SECRET not in str(caught.value)
    data["alerts"]["webhooks"][1]["secret_env"] = ALERT_SECRET
    data["alerts"]["webhooks"][1]["secret"] = "SECx"
    with pytest.raises(ConfigError) as caught:  # a secret pasted as secret_env
        parse_config(data)
    assert str(caught.value).startswith("alerts.webhooks[1].secret_env must name an environment")
    assert ALERT_SECRET not in str(caught.value)


def test_the_readmes_night_configuration_loads_as_written():
    readme = Path(__file__).resolve().parent.parent / "README.md"
    block = re.search(r"<!-- config: night -->\n```toml\n(.*?)```", readme.read_text(), re.S)
    assert block, "README has no configuration named 'night'"
    night = parse_config(tomllib.loads(block.group(1)))
    assert (night.gateway.exhausted_hold, night.default_model) == (600.0, "claude-sonnet")
    assert night.budget is not None and night.budget.downgrade_at == 0.8
    assert [(u.name, u.monthly_cap) for u in night.upstreams] == [
        ("anthropic", 500.0),
        ("openai", None),
    ]
    assert night.alerts is not None
    (robot,) = night.alerts.webhooks
    assert (robot.format, robot.secret_env, robot.markdown) == ("dingtalk", "DINGTALK_SECRET", True)


def test_an_alert_re_arm_time_is_read_and_zero_re_arms_at_once() -> None:
    loaded = parse_config(tomllib.loads(MINIMAL + "[alerts]\nrearm_after = 0\n"))
    default = parse_config(tomllib.loads(MINIMAL + "[alerts]\n"))

    assert loaded.alerts is not None and loaded.alerts.rearm_after == 0.0
    assert default.alerts is not None and default.alerts.rearm_after == 60.0
