"""Issue 15's trace, generated from a seed: the fleet, its tenants and their day.

`generate()` yields the records of bench/fleet/README.md's format in time order; the same
`Params` always give the same records. Nothing here depends on a strategy.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from fleetsim.trace import (
    APP_REGISTRY,
    DAY,
    FORMAT,
    GB,
    HOUR,
    PLATFORM_REGISTRY,
    PRUNE_LABEL,
    VERSION,
)


@dataclass(frozen=True)
class Params:
    """The knobs of the generated trace (the defaults are issue 15's fleet)."""

    nodes: int = 1000
    tenants: int = 10000
    hours: float = 24.0
    seed: int = 1
    apps: int = 30
    logins_per_tenant_day: float = 3.0
    session_mean_s: float = 3600.0
    release_share: float = 0.10  # of all tenants, every hour
    autoscale_share: float = 0.10  # nodes added at the peak, removed at night
    outage_s: float = 600.0
    prepull_lead_s: float = 0.0  # >0: a `cedar prepull` entry this long before each release
    node_bandwidth_Bps: float = 250e6
    app_registry_Bps: float = 5e9
    platform_registry_Bps: float = 2.5e9


POOLS: tuple[tuple[str, float, dict[str, str], list[dict[str, str]]], ...] = (
    ("general", 0.70, {"node-pool": "general"}, []),
    (
        "gpu",
        0.15,
        {"node-pool": "gpu", "nvidia.com/gpu.present": "true"},
        [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}],
    ),
    ("highmem", 0.15, {"node-pool": "highmem", "example.com/memory": "high"}, []),
)
# (name, stack layers in GB, app size range in GB)
STACKS: dict[str, tuple[tuple[tuple[str, float], ...], tuple[float, float]]] = {
    "general": ((("os", 0.08), ("python", 0.9)), (1.0, 6.0)),
    "general-jvm": ((("os", 0.08), ("jvm", 0.6)), (1.0, 6.0)),
    "general-node": ((("os", 0.08), ("node", 0.4)), (1.0, 6.0)),
    "gpu": ((("os", 0.08), ("python", 0.9), ("cuda", 4.5)), (8.0, 12.0)),
    "highmem": ((("os", 0.08), ("jvm", 0.6), ("datalibs", 1.2)), (3.0, 8.0)),
}


def _digest(*parts: object) -> str:
    return "sha256:" + hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def _split(total: int, shares: Iterable[float]) -> list[int]:
    """`total` split by `shares`, every part at least 1 when total allows, summing to total."""
    shares = list(shares)
    raw = [total * s for s in shares]
    parts = [max(1, math.floor(r)) if total >= len(shares) else math.floor(r) for r in raw]
    i = 0
    while sum(parts) < total:
        parts[i % len(parts)] += 1
        i += 1
    while sum(parts) > total:
        j = max(range(len(parts)), key=lambda k: parts[k])
        parts[j] -= 1
    return parts


def login_rate_factor(t: float) -> float:
    """Relative login rate at time t (seconds from midnight): 1 at night, 5 at 14:00."""
    phase = 2 * math.pi * ((t % DAY) - 14 * HOUR) / DAY
    return 1.0 + 4.0 * ((1.0 + math.cos(phase)) / 2.0) ** 2


def generate(params: Params) -> Iterator[dict[str, Any]]:
    """Issue 15's trace, record by record, in time order."""
    rng = random.Random(params.seed)
    horizon = params.hours * HOUR
    yield {
        "type": "header",
        "format": FORMAT,
        "version": VERSION,
        "seed": params.seed,
        "hours": params.hours,
        "node": {
            "bandwidth_Bps": params.node_bandwidth_Bps,
            "disk_bytes": 500 * GB,
            "system_bytes": 30 * GB,
            "gc_high_percent": 85,
            "gc_low_percent": 80,
            "gc_min_age_s": 120.0,
            "gc_period_s": 300.0,
            "boot_s": 60.0,
        },
        "kubelet": {"backoff_initial_s": 10.0, "backoff_max_s": 300.0},
        "watcher": {"latency_s": 0.5, "api_write_s": 0.05},
        "params": {k: v for k, v in vars(params).items()},
    }
    yield {
        "type": "registry",
        "host": APP_REGISTRY,
        "bandwidth_Bps": params.app_registry_Bps,
        "requests_per_s": 500.0,
        "request_timeout_s": 30.0,
        "latency_s": 0.2,
    }
    yield {
        "type": "registry",
        "host": PLATFORM_REGISTRY,
        "bandwidth_Bps": params.platform_registry_Bps,
        "requests_per_s": 200.0,
        "request_timeout_s": 30.0,
        "latency_s": 0.2,
    }
    for name, _, labels, taints in POOLS:
        yield {"type": "pool", "name": name, "labels": labels, "taints": taints}

    # Applications: 60% general (three stacks), 20% GPU, 20% high-memory.
    pool_apps = dict(zip([p[0] for p in POOLS], _split(params.apps, (0.6, 0.2, 0.2)), strict=True))
    apps: list[dict[str, Any]] = []
    for pool, count in pool_apps.items():
        for i in range(count):
            stack = pool if pool != "general" else ("general", "general-jvm", "general-node")[i % 3]
            base, (lo, hi) = STACKS[stack]
            base_gb = sum(size for _, size in base)
            size = max(rng.uniform(lo, hi), base_gb + 0.3)
            own = size - base_gb
            deps = own * rng.uniform(0.6, 0.85)
            apps.append(
                {
                    "name": f"app{len(apps):02d}",
                    "pool": pool,
                    "base": [(_digest("base", n), int(s * GB)) for n, s in base],
                    "deps": (_digest("deps", len(apps)), int(deps * GB)),
                    "code_bytes": (own - deps) * GB,
                    "tag": 0,
                }
            )

    def image_record(app: dict[str, Any], t: float, created: float) -> dict[str, Any]:
        tag = app["tag"]
        code = int(app["code_bytes"] * (1.0 if tag == 0 else rng.uniform(0.8, 1.2)))
        ref = f"{APP_REGISTRY}/tenants/{app['name']}:r{tag}"
        layers = [*app["base"], app["deps"], (_digest("code", app["name"], tag), code)]
        return {
            "type": "image",
            "t": t,
            "ref": ref,
            "layers": [list(layer) for layer in layers],
            "created": created,
            "labels": {PRUNE_LABEL: "true"},
        }

    for app in apps:
        yield image_record(app, 0.0, -rng.uniform(4, 30) * DAY)
    agent_tag = 0

    def agent_record(t: float, created: float) -> dict[str, Any]:
        return {
            "type": "image",
            "t": t,
            "ref": f"{PLATFORM_REGISTRY}/platform/node-agent:v{agent_tag}",
            "layers": [
                [_digest("base", "os"), int(0.08 * GB)],
                [_digest("agent", agent_tag), int(0.35 * GB)],
            ],
            "created": created,
            "labels": {},
        }

    yield agent_record(0.0, -10 * DAY)

    # Nodes: three pools; the autoscaler's extra nodes come at the peak and go at night.
    node_counts = _split(params.nodes, [p[1] for p in POOLS])
    extra_counts = _split(round(params.nodes * params.autoscale_share), [p[1] for p in POOLS])
    for (pool, *_), count in zip(POOLS, node_counts, strict=True):
        for i in range(count):
            yield {
                "type": "node",
                "t": 0.0,
                "name": f"{pool}-{i:04d}",
                "pool": pool,
                "action": "add",
            }

    # Tenants: spread over their pool's apps with a mild popularity skew.
    tenant_counts = _split(params.tenants, [p[1] for p in POOLS])
    tenants: list[dict[str, Any]] = []
    for (pool, _, labels, taints), count in zip(POOLS, tenant_counts, strict=True):
        mine = [a for a in apps if a["pool"] == pool]
        weights = [1.0 / (rank + 1) ** 0.7 for rank in range(len(mine))]
        for _ in range(count):
            app = rng.choices(mine, weights)[0]
            namespace = f"t-{len(tenants):05d}"
            tolerations = [
                {"key": t["key"], "operator": "Equal", "value": t["value"], "effect": t["effect"]}
                for t in taints
            ]
            tenant = {
                "type": "tenant",
                "namespace": namespace,
                "name": "app",
                "pool": pool,
                "app": app["name"],
                "image": f"{APP_REGISTRY}/tenants/{app['name']}:r0",
                "node_selector": {"node-pool": labels["node-pool"]},
                "tolerations": tolerations,
            }
            tenants.append(tenant)
            yield dict(tenant)  # the generator keeps moving its own copy
    yield {
        "type": "daemonset",
        "namespace": "platform",
        "name": "node-agent",
        "image": f"{PLATFORM_REGISTRY}/platform/node-agent:v0",
        "tolerations": [{"operator": "Exists"}],
    }

    events: list[dict[str, Any]] = []
    hours = max(1, math.ceil(params.hours))
    by_app: dict[str, list[dict[str, Any]]] = {}
    for tenant in tenants:
        by_app.setdefault(tenant["app"], []).append(tenant)
    target = max(1, round(params.tenants * params.release_share))
    for hour in range(hours):
        t = hour * HOUR + rng.uniform(60.0, 900.0)
        if t >= horizon:
            break
        moved = 0
        order = apps[:]
        rng.shuffle(order)
        for app in order:
            if moved >= target:
                break
            members = by_app.get(app["name"], [])
            if not members:
                continue
            take = members[: target - moved]
            app["tag"] += 1
            image = image_record(app, t, t - rng.uniform(600.0, 3600.0))
            if params.prepull_lead_s > 0:
                events.append(
                    {
                        "type": "prepull",
                        "t": max(0.0, t - params.prepull_lead_s),
                        "image": image["ref"],
                        "pool": app["pool"],
                        "ttl_s": params.prepull_lead_s + 2 * HOUR,
                    }
                )
            events.append(image)
            events.append(
                {
                    "type": "release",
                    "t": t,
                    "image": image["ref"],
                    "pool": app["pool"],
                    "namespaces": [m["namespace"] for m in take],
                    "spread_s": 60.0,
                }
            )
            for member in take:
                member["image"] = image["ref"]
            moved += len(take)
            # Who moves first next time: the tenants that did not move this time.
            by_app[app["name"]] = members[len(take) :] + take

    if horizon > 13.5 * HOUR:
        agent_tag += 1
        t = 13.5 * HOUR
        events.append(agent_record(t, t - HOUR))
        events.append(
            {
                "type": "ds-release",
                "t": t,
                "namespace": "platform",
                "name": "node-agent",
                "image": f"{PLATFORM_REGISTRY}/platform/node-agent:v{agent_tag}",
                "rollout_s": HOUR,
            }
        )

    lo, hi = (9 * HOUR, 17 * HOUR) if horizon >= 18 * HOUR else (0.3 * horizon, 0.7 * horizon)
    events.append(
        {
            "type": "outage",
            "t": rng.uniform(lo, hi),
            "host": APP_REGISTRY,
            "duration_s": params.outage_s,
        }
    )

    # The autoscaler: +N at the peak (10:00-12:00), -N at night (22:00-23:00).
    extra = sum(extra_counts)
    scale = min(1.0, params.hours / 24.0)
    add_at, remove_at = 10 * HOUR * scale, 22 * HOUR * scale
    names = [
        f"{pool}-x{i:03d}"
        for (pool, *_), n in zip(POOLS, extra_counts, strict=True)
        for i in range(n)
    ]
    pools = [pool for (pool, *_), n in zip(POOLS, extra_counts, strict=True) for _ in range(n)]
    joining = list(range(extra))
    rng.shuffle(joining)
    for rank, k in enumerate(joining):
        t = add_at + rank * 2 * HOUR * scale / max(extra, 1)
        events.append({"type": "node", "t": t, "name": names[k], "pool": pools[k], "action": "add"})
    for rank, k in enumerate(joining):
        t = remove_at + rank * HOUR * scale / max(extra, 1)
        if t < horizon:
            events.append(
                {"type": "node", "t": t, "name": names[k], "pool": pools[k], "action": "remove"}
            )

    # Logins: a Poisson process with the daily profile (thinning), uniform over tenants.
    mean_factor = 2.5  # the mean of login_rate_factor over a day
    night = params.tenants * params.logins_per_tenant_day / (DAY * mean_factor)
    peak = 5.0 * night
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= horizon:
            break
        if rng.random() * 5.0 > login_rate_factor(t):
            continue
        tenant = tenants[rng.randrange(len(tenants))]
        session = min(max(rng.expovariate(1.0 / params.session_mean_s), 300.0), 4 * HOUR)
        events.append(
            {
                "type": "login",
                "t": round(t, 3),
                "namespace": tenant["namespace"],
                "session_s": round(session, 1),
            }
        )

    events.sort(key=lambda e: (e["t"], _ORDER.get(e["type"], 9)))
    yield from events


# Same-time records: images before what uses them, nodes before logins.
_ORDER = {
    "image": 0,
    "prepull": 1,
    "node": 2,
    "release": 3,
    "ds-release": 4,
    "outage": 5,
    "login": 6,
}
