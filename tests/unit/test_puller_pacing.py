"""Fleet-wide registry pacing: the budget setting, the grant order and the lease rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cedar.puller.errors import PullerConfigError
from cedar.puller.lease_codec import (
    decode_lease,
    decode_request,
    encode_lease,
    encode_request,
    lease_key,
    request_key,
)
from cedar.puller.pacing import (
    MAX_LOOK_INTERVAL,
    FleetBudget,
    FleetPullsError,
    Grant,
    Lease,
    LeaseTable,
    PullPriority,
    Request,
    Wait,
    decide,
    next_look,
    parse_fleet_pulls,
    priority_of,
    renew_due,
    renewed,
    share_of,
    to_withdraw,
    without_store,
)

H = "harbor.example.com"


def test_budget_per_host_with_wildcard() -> None:
    budget = parse_fleet_pulls("harbor.example.com=40,*=100")
    assert budget.limit_for(H) == 40
    assert budget.limit_for("Harbor.Example.COM") == 40
    assert budget.limit_for("quay.io") == 100
    assert str(budget) == "harbor.example.com=40,*=100"
    assert budget.enabled


def test_budget_without_wildcard_leaves_others_unpaced_and_empty_is_off() -> None:
    budget = parse_fleet_pulls(" registry.local:5000 = 3 , ")
    assert budget.limit_for("registry.local:5000") == 3
    assert budget.limit_for("registry.local") is None
    off = parse_fleet_pulls("")
    assert not off.enabled
    assert off.limit_for(H) is None


def test_docker_hub_aliases_are_one_registry() -> None:
    budget = parse_fleet_pulls("index.docker.io=5")
    assert budget.limit_for("docker.io") == 5
    with pytest.raises(FleetPullsError, match="given twice"):
        parse_fleet_pulls("docker.io=5,registry-1.docker.io=6")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("harbor.example.com", "is not host=N"),
        ("=4", "is not host=N"),
        ("harbor.example.com=forty", "not a whole number"),
        ("harbor.example.com=0", "must be 1 to"),
        ("harbor.example.com=-3", "must be 1 to"),
        ("harbor.example.com=1000001", "must be 1 to"),
        ("https://harbor.example.com=4", "not a registry host"),
        ("harbor.example.com/team=4", "not a registry host"),
        ("bad host=4", "not a registry host"),
        ("*=4,*=5", "'\\*' is given twice"),
        ("a.io=1,A.io=2", "given twice"),
    ],
)
def test_bad_budgets_are_refused_with_the_entry(text: str, message: str) -> None:
    with pytest.raises(FleetPullsError, match=message) as info:
        parse_fleet_pulls(text)
    assert "CEDAR_REGISTRY_FLEET_PULLS" in str(info.value)
    assert isinstance(info.value, PullerConfigError)
    assert isinstance(info.value, ValueError)


def test_priorities_cold_before_missing_before_refresh() -> None:
    assert priority_of("refresh", node_warming=True) is PullPriority.COLD
    assert priority_of("pull", node_warming=False) is PullPriority.MISSING
    assert priority_of("refresh", node_warming=False) is PullPriority.REFRESH
    assert PullPriority.COLD < PullPriority.MISSING < PullPriority.REFRESH


def _req(
    token: str, priority: PullPriority, since: float, holder: str = "n", exp: float = 1e9
) -> Request:
    return Request(H, holder, token, priority, since, exp)


def _lease(token: str, slot: int, exp: float = 1e9) -> Lease:
    return Lease(H, slot, "n", token, PullPriority.MISSING, 0.0, exp)


def test_decide_grants_free_slots_in_rank_order() -> None:
    waiting = [
        _req("refresh-early", PullPriority.REFRESH, 1.0),
        _req("missing-late", PullPriority.MISSING, 5.0),
        _req("cold-latest", PullPriority.COLD, 9.0),
    ]
    leases = [_lease("a", 0), _lease("b", 2)]
    # Budget 4: slots 1 and 3 free; the cold request ranks first, the missing one second.
    first = decide(waiting[2], limit=4, leases=leases, waiting=waiting, now=10.0)
    second = decide(waiting[1], limit=4, leases=leases, waiting=waiting, now=10.0)
    third = decide(waiting[0], limit=4, leases=leases, waiting=waiting, now=10.0)
    assert first == Grant(slot=1, reason="slot 1 of 4")
    assert second == Grant(slot=3, reason="slot 3 of 4")
    assert third == Wait(ahead=2, free=2)


def test_expired_leases_and_requests_do_not_count() -> None:
    me = _req("me", PullPriority.REFRESH, 5.0)
    leases = [_lease("dead", 0, exp=9.0)]
    waiting = [_req("gone", PullPriority.COLD, 1.0, exp=9.0), me]
    assert decide(me, limit=1, leases=leases, waiting=waiting, now=8.0) == Wait(ahead=1, free=0)
    assert decide(me, limit=1, leases=leases, waiting=waiting, now=9.0) == Grant(0, "slot 0 of 1")


def test_a_holder_asking_again_keeps_its_slot_and_unpaced_goes() -> None:
    me = _req("me", PullPriority.MISSING, 1.0)
    held = [_lease("x", 0), _lease("me", 1)]
    assert decide(me, limit=2, leases=held, waiting=[me], now=2.0).slot == 1  # type: ignore[union-attr]
    assert decide(me, limit=None, leases=held, waiting=[], now=2.0) == Grant(
        None, "registry not paced"
    )
    assert without_store(me).slot is None
    assert "local bound only" in without_store(me).reason


def test_renewal_rules() -> None:
    lease = Lease(H, 0, "n", "t", PullPriority.MISSING, 0.0, 30.0)
    assert not renew_due(lease, 9.9, 30.0)
    assert renew_due(lease, 10.0, 30.0)
    fresh = renewed(lease, 10.0, 30.0)
    assert fresh.expires_at == 40.0
    assert fresh.acquired_at == 0.0
    assert fresh.slot == 0
    waiting = Request(H, "n", "w", PullPriority.MISSING, 0.0, 30.0)
    assert not renew_due(waiting, 9.9, 30.0) and renew_due(waiting, 10.0, 30.0)


def test_a_waiter_looks_again_when_something_ahead_of_it_could_lapse() -> None:
    mine = Request(H, "me", "mine", PullPriority.MISSING, 5.0, 35.0)
    ahead = Request(H, "a", "ahead", PullPriority.COLD, 6.0, 7.5)
    behind = Request(H, "b", "behind", PullPriority.REFRESH, 0.0, 6.5)
    elsewhere = Lease("quay.io", 0, "c", "q", PullPriority.MISSING, 0.0, 6.2)
    held = Lease(H, 0, "d", "held", PullPriority.MISSING, 0.0, 8.0)
    lapsed = Lease(H, 1, "e", "gone", PullPriority.MISSING, 0.0, 5.0)
    leases, requests = [held, elsewhere, lapsed], [ahead, behind, mine]
    # The request ranked ahead lapses first; the one behind and the other registry's lease
    # cannot let `mine` go, and a lapsed lease is no longer in the way.
    assert next_look(mine, leases, requests, 6.0, ttl=30.0) == pytest.approx(1.5)
    assert next_look(mine, [held], [mine], 6.0, ttl=30.0) == pytest.approx(2.0)
    assert next_look(mine, [], [mine], 6.0, ttl=30.0) == MAX_LOOK_INTERVAL
    assert next_look(mine, [], [mine], 14.99, ttl=30.0) == pytest.approx(0.05)  # renewal due


def test_withdraw_only_lower_priorities_lowest_first() -> None:
    waiting = {
        "r1": PullPriority.REFRESH,
        "m1": PullPriority.MISSING,
        "r2": PullPriority.REFRESH,
        "c1": PullPriority.COLD,
    }
    assert to_withdraw(waiting, blocked=PullPriority.MISSING, count=5) == ["r1", "r2"]
    assert to_withdraw(waiting, blocked=PullPriority.MISSING, count=1) == ["r1"]
    assert to_withdraw(waiting, blocked=PullPriority.COLD, count=3) == ["r1", "r2", "m1"]
    assert to_withdraw(waiting, blocked=PullPriority.REFRESH, count=3) == []
    assert to_withdraw(waiting, blocked=PullPriority.MISSING, count=0) == []


def test_keys_are_kv_safe_and_values_round_trip() -> None:
    for host in ("harbor.example.com", "[::1]:5000", "registry.local:5000"):
        key = lease_key(host, 7)
        assert key.startswith("lease.") and key.endswith(".7")
        assert all(c.isalnum() or c in "._" for c in key)
        assert all(c.isalnum() or c in "._" for c in request_key(host, "node-1/x:1/3"))
    assert lease_key("Harbor.Example.com", 1) == lease_key(H, 1)
    lease = Lease(H, 3, "node-1", "tok", PullPriority.COLD, 1.5, 31.5)
    assert decode_lease(encode_lease(lease)) == lease
    request = Request(H, "node-2", "tok2", PullPriority.REFRESH, 2.0, 32.0, share=2)
    assert decode_request(encode_request(request)) == request
    with pytest.raises(FleetPullsError, match="share must be"):
        decode_request(encode_request(request).replace(b'"share": 2', b'"share": -1'))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "not an object"),
        (b'{"registry": "h"}', "lacks slot"),
        (
            b'{"registry":"h","slot":-1,"holder":"n","token":"t","priority":"cold",'
            b'"acquired_at":0,"expires_at":1}',
            "non-negative integer",
        ),
        (
            b'{"registry":"h","slot":1,"holder":"n","token":"t","priority":"urgent",'
            b'"acquired_at":0,"expires_at":1}',
            "unknown priority",
        ),
        (
            b'{"registry":"h","slot":1,"holder":"n","token":"t","priority":"cold",'
            b'"acquired_at":"x","expires_at":1}',
            "must be a number",
        ),
    ],
)
def test_bad_stored_leases_are_clear_errors(data: bytes, message: str) -> None:
    with pytest.raises(FleetPullsError, match=message):
        decode_lease(data)


def test_table_budget_priority_and_fifo() -> None:
    table = LeaseTable(parse_fleet_pulls("harbor.example.com=2"), ttl=30.0)
    assert isinstance(table.request(H, "a", "a1", PullPriority.REFRESH, 0.0), Lease)
    assert isinstance(table.request(H, "a", "a2", PullPriority.REFRESH, 0.0), Lease)
    assert table.request(H, "b", "b1", PullPriority.REFRESH, 1.0) is None
    assert table.request(H, "c", "c1", PullPriority.MISSING, 2.0) is None
    assert table.request(H, "d", "d1", PullPriority.COLD, 3.0) is None
    assert table.request(H, "e", "e1", PullPriority.MISSING, 4.0) is None
    assert table.held(H) == 2 and table.waiting(H) == 4
    order = [table.release("a1", 5.0), table.release("a2", 5.0)]
    assert [[g.token for g in grants] for grants in order] == [["d1"], ["c1"]]
    assert [g.token for g in table.release("d1", 6.0)] == ["e1"]
    assert [g.token for g in table.release("c1", 6.0)] == ["b1"]
    assert table.peak[H] == 2
    assert isinstance(table.request("quay.io", "a", "q", PullPriority.REFRESH, 7.0), Grant)


def test_a_nodes_second_pull_waits_behind_every_nodes_first() -> None:
    table = LeaseTable(parse_fleet_pulls("*=2"), ttl=30.0)
    assert isinstance(table.request(H, "a", "a1", PullPriority.MISSING, 0.0), Lease)
    assert isinstance(table.request(H, "a", "a2", PullPriority.MISSING, 0.0), Lease)
    assert table.request(H, "a", "a3", PullPriority.MISSING, 1.0) is None  # a's third
    assert table.request(H, "b", "b1", PullPriority.MISSING, 2.0) is None  # b's first
    assert table.request(H, "c", "c1", PullPriority.REFRESH, 3.0) is None
    assert [g.token for g in table.release("a1", 4.0)] == ["b1"]
    assert [g.token for g in table.release("a2", 4.0)] == ["a3"]
    assert [g.token for g in table.release("b1", 5.0)] == ["c1"]
    # The share is fixed when the request is made: asking again keeps it.
    table.request(H, "d", "d1", PullPriority.MISSING, 6.0)
    table.request(H, "d", "d2", PullPriority.MISSING, 6.0)
    waiting = {r.token: r.share for r in table.requests()}
    assert waiting == {"d1": 0, "d2": 1}
    table.request(H, "d", "d2", PullPriority.MISSING, 7.0)
    assert {r.token: r.share for r in table.requests()} == waiting
    assert share_of("d", H, table.leases(), table.requests(), 7.0) == 2
    assert share_of("a", H, table.leases(), table.requests(), 7.0) == 1


def test_table_a_crashed_holder_frees_its_slot_within_the_ttl() -> None:
    table = LeaseTable(parse_fleet_pulls("*=1"), ttl=30.0)
    table.request(H, "dead", "d", PullPriority.MISSING, 0.0)
    assert table.request(H, "b", "b", PullPriority.MISSING, 1.0) is None
    assert table.expire(29.9) == []
    # The waiter keeps its request alive; the dead holder does not renew.
    assert table.request(H, "b", "b", PullPriority.MISSING, 20.0) is None
    granted = table.expire(30.0)
    assert [g.token for g in granted] == ["b"]
    assert table.renew("b", 40.0) is not None
    assert table.renew("d", 40.0) is None


def test_table_withdrawn_and_lapsed_requests_never_get_a_lease() -> None:
    table = LeaseTable(parse_fleet_pulls("*=1"), ttl=10.0)
    table.request(H, "a", "a", PullPriority.MISSING, 0.0)
    table.request(H, "b", "b", PullPriority.COLD, 1.0)
    table.request(H, "c", "c", PullPriority.MISSING, 2.0)
    table.cancel("b")
    table.request(H, "a", "a-again", PullPriority.REFRESH, 3.0)
    assert [g.token for g in table.release("a", 5.0)] == ["c"]
    # a-again lapsed (not refreshed within 10 s) by the time c is released.
    assert table.release("c", 14.0) == []
    assert table.held(H) == 0


def test_table_refuses_a_non_positive_ttl() -> None:
    with pytest.raises(FleetPullsError, match="TTL"):
        LeaseTable(FleetBudget(default=1), ttl=0)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["request", "release", "cancel"]),
        st.integers(min_value=0, max_value=11),  # which pull
        st.sampled_from(list(PullPriority)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(min_value=1, max_value=4), ops=OPS)
def test_table_never_exceeds_the_budget_and_grants_what_decide_grants(
    budget: int, ops: list[tuple[str, int, PullPriority]]
) -> None:
    table = LeaseTable(FleetBudget(limits={H: budget}), ttl=1e6)
    now = 0.0
    for op, which, priority in ops:
        now += 1.0
        token = f"pull-{which}"
        before_leases, before_requests = table.leases(), table.requests()
        if op == "request":
            result = table.request(H, f"node-{which % 3}", token, priority, now)
            existing = next((r for r in before_requests if r.token == token), None)
            holder = f"node-{which % 3}"
            share = (
                existing.share
                if existing
                else share_of(holder, H, before_leases, before_requests, now)
            )
            mine = Request(
                H, holder, token, priority, existing.since if existing else now, 2e6, share
            )
            others = [r for r in before_requests if r.token != token]
            expected = decide(
                mine, limit=budget, leases=before_leases, waiting=[*others, mine], now=now
            )
            if isinstance(expected, Grant):
                assert isinstance(result, Lease) and result.slot == expected.slot
            else:
                assert result is None
        elif op == "release":
            granted = table.release(token, now)
            queue = sorted((r for r in before_requests if r.token != token), key=Request.rank)
            assert [g.token for g in granted] == [r.token for r in queue[: len(granted)]]
        else:
            table.cancel(token)
        leases = table.leases()
        assert len(leases) <= budget
        assert len({lease.slot for lease in leases}) == len(leases)
        assert all(0 <= lease.slot < budget for lease in leases)
        # Never a free slot while someone waits.
        assert len(leases) == budget or not table.requests()
