"""The ACL table covers every service and every documented channel."""

from __future__ import annotations

from analytics_engine.core import channels
from analytics_engine.core.acl import REPLAY, SERVICE_ACCESS, acl_file, acl_rules
from analytics_engine.core.payloads import EVENT_PAYLOADS


def test_every_event_channel_has_a_publisher_and_durable_ones_a_consumer() -> None:
    published = {c for a in SERVICE_ACCESS.values() for c in a.publishes}
    consumed = {c for a in SERVICE_ACCESS.values() for c in (*a.consumes, *a.listens)}
    for channel in EVENT_PAYLOADS:
        name = channel.replace("{kpi_code}", "*")
        if channel == channels.SERVICE_HEARTBEAT:
            continue  # every service publishes heartbeats
        assert name in published, f"nobody may publish {channel}"
        assert name in consumed, f"nobody may read {channel}"


def test_request_channels_have_a_responder_and_a_caller() -> None:
    for channel in channels.REQUEST_CHANNELS:
        assert any(channel in a.serves for a in SERVICE_ACCESS.values())
        assert any(channel in a.requests for a in SERVICE_ACCESS.values())


def test_xadd_is_confined_to_produced_streams_and_dead_letters() -> None:
    rules = acl_rules("data_simulator", SERVICE_ACCESS["data_simulator"])
    publish, dead_letters = [r for r in rules if r.startswith(("(+fcall", "(+xadd"))]
    assert publish.startswith("(+fcall +xadd ")
    assert f"~{channels.stream_key(channels.ENTITY_CREATED)}" in publish
    assert dead_letters.startswith("(+xadd ") and "%W~ae:dlq:" in dead_letters
    assert channels.stream_key(channels.KPI_CALCULATED) not in " ".join(rules)
    assert "+xadd" not in [r for r in rules if not r.startswith("(")]


def test_acl_file_disables_the_default_user_and_never_grants_all_to_services() -> None:
    text = acl_file({s: "pw" for s in SERVICE_ACCESS}, admin_password="admin")
    lines = text.splitlines()
    assert lines[0].startswith("user default off ")  # off: nobody can log in as it
    for line in lines[2:]:
        assert "+@all" not in line and " ~* " not in line and "&*" not in line


# Lua of a service's own (EVAL "while true do end" 0 freezes Redis), or replacing the code
# others call: services call the admin's functions (FCALL) and nothing else of scripting.
SCRIPTING = ("eval", "evalsha", "eval_ro", "evalsha_ro", "script", "function", "@scripting")


def test_no_service_may_run_or_load_lua() -> None:
    for service, access in SERVICE_ACCESS.items():
        grants = " ".join(acl_rules(service, access)).replace("(", " ").replace(")", " ").split()
        granted = {g[1:].split("|")[0] for g in grants if g.startswith("+")}
        assert not granted & set(SCRIPTING), service
        assert "fcall" in granted, service  # heartbeats: every service publishes
        assert "fcall_ro" not in granted, service


# Grants that touch any key whatever its type: delete, rename, expire or overwrite it.
KEY_MANAGEMENT = ("+@keyspace", "+@string", "+@hash", "+@set", "+del", "+set", "+unlink")


def test_key_management_is_granted_only_in_selectors_on_owned_keys() -> None:
    """DEL, RENAME, EXPIRE, SET and the like never come with the streams a service reads (its
    consumer commands need write access to them): only in selectors on the keys it owns."""
    for service, access in SERVICE_ACCESS.items():
        rules = acl_rules(service, access)
        root = [r for r in rules if not r.startswith("(")]
        assert not [r for r in root if r.startswith("+@")], service
        assert not set(root) & set(KEY_MANAGEMENT), service
        owned = {
            *access.state_keys,
            channels.request_claim_key("*"),
            *(channels.stream_key(c) for c in access.deletes),
        }
        for selector in (r.strip("()").split() for r in rules if r.startswith("(")):
            if set(selector) & set(KEY_MANAGEMENT):
                keys = {k.removeprefix("~") for k in selector if "~" in k}
                assert keys and keys <= owned, (service, selector)
                assert all(k.startswith("~") for k in selector if "~" in k), (service, selector)


def test_only_private_replay_streams_may_be_deleted_by_their_reader() -> None:
    for access in SERVICE_ACCESS.values():
        assert set(access.deletes) <= {REPLAY} and set(access.deletes) <= set(access.consumes)
    rules = acl_rules("calculation_engine", SERVICE_ACCESS["calculation_engine"])
    assert "(+del ~ae:stream:stream.replay.*)" in rules
    assert "(+@string +@hash +@set +@keyspace +watch -@dangerous ~ae:calc:*)" in rules
