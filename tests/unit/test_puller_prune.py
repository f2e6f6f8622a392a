"""The prune decision."""

from __future__ import annotations

from cedar.puller.prune import LocalImage, Scope, decide, is_desired

DAY = 86400.0
SCOPED = LocalImage("sha256:1", ("reg.local:5000/team/app:1",), labels={})
LABELLED = LocalImage("sha256:2", ("other.io/x/y:2",), labels={"maintainer": "platform"})
OUTSIDE = LocalImage("sha256:3", ("nginx:latest",), labels={"maintainer": "someone"})
SCOPE = Scope.from_settings("maintainer=platform", ["reg.local:5000/team/"])


def test_scope() -> None:
    assert SCOPE.contains(SCOPED)
    assert SCOPE.contains(LABELLED)
    assert not SCOPE.contains(OUTSIDE)
    assert Scope.from_settings("maintainer", []).contains(OUTSIDE)
    assert Scope.from_settings(None, ["library/nginx"]).contains(OUTSIDE)
    assert Scope.from_settings(None, []).empty
    # An image also named outside the scope is out of it: removing it would remove that name.
    mixed = LocalImage("sha256:4", ("reg.local:5000/team/app:1", "reg.local:5000/other/app:1"))
    assert not SCOPE.contains(mixed)


def test_is_desired_by_tag_or_digest() -> None:
    digest = "sha256:" + "b" * 64
    image = LocalImage("i", (), (f"reg.local:5000/team/app@{digest}",))
    assert is_desired(image, {f"reg.local:5000/team/app@{digest}"})
    assert is_desired(image, {f"reg.local:5000/team/app:1@{digest}"})
    assert is_desired(SCOPED, {"reg.local:5000/team/app:1"})
    assert not is_desired(SCOPED, {"reg.local:5000/team/app:2"})


def test_first_seen_undesired_is_tracked_not_removed() -> None:
    d = decide([SCOPED, LABELLED, OUTSIDE], set(), {}, set(), scope=SCOPE, now=100, prune_after=DAY)
    assert d.remove == []
    assert d.track == {"sha256:1": 100, "sha256:2": 100}


def test_removed_only_after_window_and_when_unused() -> None:
    since = {"sha256:1": 0.0, "sha256:2": 0.0, "sha256:3": 0.0}
    early = decide(
        [SCOPED, LABELLED], set(), since, set(), scope=SCOPE, now=DAY - 1, prune_after=DAY
    )
    assert early.remove == []
    late = decide(
        [SCOPED, LABELLED, OUTSIDE],
        set(),
        since,
        {"sha256:2"},
        scope=SCOPE,
        now=DAY,
        prune_after=DAY,
    )
    assert late.remove == [SCOPED]
    assert late.kept_in_use == ["sha256:2"]


def test_desired_again_forgets_and_gone_forgets() -> None:
    since = {"sha256:1": 0.0, "sha256:gone": 0.0}
    d = decide(
        [SCOPED],
        {"reg.local:5000/team/app:1"},
        since,
        set(),
        scope=SCOPE,
        now=DAY * 9,
        prune_after=DAY,
    )
    assert d.remove == []
    assert d.forget == {"sha256:1", "sha256:gone"}


def test_empty_scope_touches_nothing() -> None:
    d = decide(
        [SCOPED, OUTSIDE],
        set(),
        {"sha256:1": 0.0},
        set(),
        scope=Scope(),
        now=DAY * 9,
        prune_after=DAY,
    )
    assert d.remove == [] and d.track == {}
