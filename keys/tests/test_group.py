from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError

from keys.models import AGGREGATE_TEST_MODEL, APIKey, Group, GroupSubGroup, GroupType

pytestmark = pytest.mark.django_db


def standard(name="openai-main", channel="openai", **fields):
    values = {
        "upstreams": [{"url": "https://api.openai.com", "weight": 1}],
        "test_model": "gpt-4.1-nano",
    }
    values.update(fields)
    return Group(name=name, channel_type=channel, **values)


def errors_of(group: Group) -> dict[str, list[str]]:
    with pytest.raises(ValidationError) as caught:
        group.full_clean()
    return caught.value.message_dict


def test_a_well_formed_group_is_valid():
    group = standard(proxy_keys=" sk-a , sk-b,sk-a,", config={"max_retries": "2"})
    group.full_clean()
    group.save()
    assert group.proxy_key_list == ["sk-a", "sk-b"]
    assert group.config == {"max_retries": 2}


@pytest.mark.parametrize("name", ["Upper", "has space", "dot.name", "x" * 101, "ümlaut"])
def test_names_must_be_url_segments(name):
    assert "lowercase letters" in errors_of(standard(name=name))["name"][0]


def test_a_name_is_required():
    assert "cannot be blank" in errors_of(standard(name=""))["name"][0]


def test_names_are_unique():
    standard(name="dup").save()
    assert "already exists" in errors_of(standard(name="dup"))["name"][0]


@pytest.mark.parametrize(
    ("upstreams", "message"),
    [
        ([{"url": "ftp://files.example", "weight": 1}], "not an http:// or https:// URL"),
        ([{"url": "api.openai.com", "weight": 1}], "not an http:// or https:// URL"),
        ([{"url": "https://a.example", "weight": -1}], "weight must be a whole number ≥ 0"),
        ([{"url": "https://a.example", "weight": "3"}], "weight must be a whole number ≥ 0"),
        (
            [{"url": "https://a.example", "weight": 0}],
            "At least one upstream needs a weight above 0",
        ),
        (
            [{"url": "https://a.example", "weight": 1}, {"url": "https://a.example/", "weight": 2}],
            "listed twice",
        ),
        ([{"url": "https://a.example", "weight": 1, "extra": True}], "expected"),
        ("https://a.example", "must be a list"),
        ([], "Add at least one upstream URL"),
    ],
)
def test_upstreams_are_checked(upstreams, message):
    assert message in " ".join(errors_of(standard(upstreams=upstreams))["upstreams"])


def test_a_zero_weight_upstream_is_allowed_beside_a_live_one():
    standard(
        upstreams=[
            {"url": "https://a.example", "weight": 0},
            {"url": "http://b.example:8080", "weight": 3},
        ]
    ).full_clean()


def test_standard_groups_need_a_test_model():
    assert "validate keys" in errors_of(standard(test_model=" "))["test_model"][0]


def test_unknown_channel_types_are_refused():
    assert "not a valid choice" in errors_of(standard(channel="azure"))["channel_type"][0]


@pytest.mark.parametrize("endpoint", ["v1/chat", "https://x/v1/chat", "/a://b"])
def test_validation_endpoint_is_a_path(endpoint):
    assert (
        "starting with '/'"
        in errors_of(standard(validation_endpoint=endpoint))["validation_endpoint"][0]
    )


def test_config_overrides_are_checked_through_the_registry():
    assert (
        "unknown config field 'retries'" in errors_of(standard(config={"retries": 1}))["config"][0]
    )
    assert "system-wide" in errors_of(standard(config={"proxy_keys": "x"}))["config"][0]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            [
                {"key": "X-Api-Key", "value": "${API_KEY}", "action": "set"},
                {"key": "x-api-key", "value": "", "action": "remove"},
            ],
            "X-Api-Key has more than one rule",
        ),
        ([{"key": "Bad Header", "value": "v", "action": "set"}], "not a valid header name"),
        ([{"key": "X-A", "value": "v", "action": "append"}], "action must be 'set' or 'remove'"),
        ({"key": "X-A"}, "must be a list"),
    ],
)
def test_header_rules_are_checked(rules, message):
    assert message in errors_of(standard(header_rules=rules))["header_rules"][0]


def test_model_redirects_need_both_names():
    assert (
        "non-empty"
        in errors_of(standard(model_redirect_rules={"gpt-4o": ""}))["model_redirect_rules"][0]
    )
    standard(model_redirect_rules={"gpt-4o": "gpt-4.1"}).full_clean()


def test_param_overrides_are_an_object():
    assert "JSON object" in errors_of(standard(param_overrides=[1]))["param_overrides"][0]


def aggregate(name="agg", channel="openai", **fields):
    return Group(name=name, channel_type=channel, group_type=GroupType.AGGREGATE, **fields)


def test_an_aggregate_group_has_no_upstreams_or_redirects_of_its_own():
    group = aggregate()
    group.full_clean()
    assert group.test_model == AGGREGATE_TEST_MODEL
    errors = errors_of(
        aggregate(
            upstreams=[{"url": "https://a.example", "weight": 1}], model_redirect_rules={"a": "b"}
        )
    )
    assert "no upstreams of its own" in errors["upstreams"][0]
    assert "member groups" in errors["model_redirect_rules"][0]


def member(group, sub_group, weight=10):
    return GroupSubGroup(group=group, sub_group=sub_group, weight=weight)


def saved(group: Group) -> Group:
    group.save()
    return group


def test_members_must_be_standard_groups_of_the_same_channel():
    agg = saved(aggregate())
    openai = saved(standard(name="o1"))
    member(agg, openai).full_clean()
    gemini = saved(standard(name="g1", channel="gemini", test_model="gemini-2.0-flash-lite"))
    with pytest.raises(ValidationError, match="must be a openai group"):
        member(agg, gemini).full_clean()
    with pytest.raises(ValidationError, match="Only standard groups"):
        member(agg, saved(aggregate(name="agg2"))).full_clean()
    with pytest.raises(ValidationError, match="only be added to an aggregate"):
        member(openai, saved(standard(name="o2"))).full_clean()
    with pytest.raises(ValidationError, match="cannot be a member of itself"):
        member(agg, agg).full_clean()
    with pytest.raises(ValidationError, match="between 0 and 1000"):
        member(agg, openai, weight=1001).full_clean()


def test_members_share_one_validation_endpoint():
    agg = saved(aggregate())
    member(agg, saved(standard(name="o1"))).save()
    other = saved(standard(name="o2", validation_endpoint="/v1/models"))
    with pytest.raises(ValidationError, match="share one validation endpoint"):
        member(agg, other).full_clean()


def test_a_member_is_unique_per_aggregate():
    agg, sub = aggregate(), standard()
    agg.save()
    sub.save()
    member(agg, sub).save()
    with pytest.raises(IntegrityError):
        member(agg, sub).save()


def test_a_members_channel_is_locked_while_it_belongs_to_an_aggregate():
    agg, sub = aggregate(), standard()
    agg.save()
    sub.save()
    member(agg, sub).save()
    sub.channel_type = "anthropic"
    assert "belongs to an aggregate" in errors_of(sub)["channel_type"][0]


def test_deleting_a_group_removes_its_keys_and_memberships_on_both_sides():
    agg, sub = aggregate(), standard()
    agg.save()
    sub.save()
    member(agg, sub).save()
    APIKey.build(sub, "sk-one").save()
    sub.delete()
    assert not GroupSubGroup.objects.exists()
    assert not APIKey.objects.exists()
