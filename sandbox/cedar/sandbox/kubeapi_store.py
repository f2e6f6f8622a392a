"""Pure: the simulated Kubernetes API's state: objects, resourceVersions, history, pages.

Thread-safe and free of I/O: the HTTP handlers (kubeapi_http.py), the controllers
(kubeapi_controllers.py) and the tests' control calls (kubeapi.py) all use it; the rules for
one object are in kubeapi_objects.py. Objects are serialised to JSON bytes once per write so
that lists and watch events are built by joining bytes, which keeps a 60,000-object list
cheap.

Two behaviours of the real server that clients must not assume away:

- a write's watch event is delivered `watch_delay` seconds after the write (the watch cache
  is fed from etcd's watch, asynchronously: staging/src/k8s.io/apiserver/pkg/storage/
  cacher/cacher.go), never as part of the write's response; lists see the write at once;
- deleting a Namespace only marks it Terminating (deletionTimestamp, phase) and the
  namespace controller removes it later (pkg/registry/core/namespace/storage/storage.go
  Delete), while new objects in it are refused (staging/src/k8s.io/apiserver/pkg/admission/
  plugin/namespace/lifecycle/admission.go).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cedar.sandbox.errors import ApiError
from cedar.sandbox.kubeapi_objects import (
    clone,
    dump,
    finalized,
    namespace_terminating,
    new_object,
    now,
    qualified_resource,
    updated_object,
)
from cedar.sandbox.kubeapi_ops import JsonObj, ResourceTable, ResourceType, WatchFilter, apply_patch

ObjKey = tuple[str, str]  # (namespace or "", name)


@dataclass(slots=True)
class Stored:
    obj: JsonObj
    raw: bytes


@dataclass(slots=True, frozen=True)
class WatchEvent:
    rv: int
    obj: JsonObj
    line: bytes  # the whole newline-terminated watch event
    type: str = "ADDED"
    visible: float = 0.0  # time.monotonic() from which watches deliver it


@dataclass(slots=True)
class Pending:
    """What a watch from `since` gets now: the events, the RV to go on from, and when the
    next held-back event becomes deliverable (None: nothing is held back)."""

    events: list[WatchEvent]
    since: int
    due: float | None


@dataclass
class _Bucket:
    """Everything about one resource type."""

    history_limit: int
    objects: dict[ObjKey, Stored] = field(default_factory=dict)
    keys: list[ObjKey] = field(default_factory=list)  # sorted, for pagination
    keys_sorted: bool = True
    history: deque[WatchEvent] = field(default_factory=deque)
    # Watches (and list continuations) from a resourceVersion below this get 410 Gone:
    # the events after it are no longer all in `history`.
    floor: int = 0

    def sorted_keys(self) -> list[ObjKey]:
        if not self.keys_sorted:
            self.keys.sort()
            self.keys_sorted = True
        return self.keys

    def add_key(self, key: ObjKey) -> None:
        if self.keys_sorted:
            bisect.insort(self.keys, key)
        else:
            self.keys.append(key)

    def remove_key(self, key: ObjKey) -> None:
        keys = self.sorted_keys()
        index = bisect.bisect_left(keys, key)
        if index < len(keys) and keys[index] == key:
            del keys[index]

    def record(self, event: WatchEvent) -> None:
        if len(self.history) >= self.history_limit:
            self.floor = max(self.floor, self.history.popleft().rv)
        self.history.append(event)


def event_line(type_: str, raw: bytes) -> bytes:
    return b'{"type":"' + type_.encode() + b'","object":' + raw + b"}\n"


def _encode_continue(rv: int, key: ObjKey) -> str:
    return base64.urlsafe_b64encode(dump({"rv": rv, "start": list(key)})).decode()


def _decode_continue(token: str) -> tuple[int, ObjKey]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        rv, (namespace, name) = int(data["rv"]), data["start"]
        return rv, (str(namespace), str(name))
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise ApiError(400, "BadRequest", f"invalid continue token {token!r}") from None


class Store:
    """Every object of every resource type in `table`, with the watch history of each type.

    `history_limit` is how many events per resource type a watch can resume across;
    `on_change` is called after every write, from whichever thread wrote, so it must be
    cheap and thread-safe.
    """

    def __init__(
        self,
        table: ResourceTable,
        *,
        history_limit: int,
        on_change: Callable[[], None],
        watch_delay: float = 0.0,
        require_namespaces: bool = False,
    ) -> None:
        self.on_change = on_change
        self.watch_delay = watch_delay
        self.require_namespaces = require_namespaces
        self._lock = threading.RLock()
        # Never 0: to a watch, resourceVersion "0" means "any", not "the start".
        self._rv = 1
        # Bumped by expire(): open watches notice it and end with a 410 ERROR event.
        self.epoch = 0
        self._buckets: dict[ResourceType, _Bucket] = {r: _Bucket(history_limit) for r in table.all}
        self._namespace_res = next((r for r in table.all if r.kind == "Namespace"), None)

    # ------------------------------------------------------------ helpers

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def _bucket(self, res: ResourceType) -> _Bucket:
        return self._buckets[res]

    def _key(self, res: ResourceType, namespace: str | None, name: str) -> ObjKey:
        if res.namespaced and not namespace:
            raise ApiError(400, "BadRequest", f"{res.plural} are namespaced: namespace required")
        return (namespace or "" if res.namespaced else "", name)

    def _find(self, res: ResourceType, namespace: str | None, name: str) -> Stored:
        stored = self._bucket(res).objects.get(self._key(res, namespace, name))
        if stored is None:
            raise ApiError(
                404,
                "NotFound",
                f'{qualified_resource(res)} "{name}" not found',
                {"name": name, "group": res.group, "kind": res.plural},
            )
        return stored

    def _commit(self, res: ResourceType, key: ObjKey, obj: JsonObj, type_: str) -> bytes:
        """Assign the next resourceVersion, store (or drop) the object and record the event."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        raw = dump(obj)
        bucket = self._bucket(res)
        if type_ == "DELETED":
            del bucket.objects[key]
            bucket.remove_key(key)
        else:
            if key not in bucket.objects:
                bucket.add_key(key)
            bucket.objects[key] = Stored(obj, raw)
        visible = time.monotonic() + self.watch_delay
        bucket.record(WatchEvent(self._rv, obj, event_line(type_, raw), type_, visible))
        return raw

    def _admit_create(self, res: ResourceType, name: str, namespace: str | None) -> None:
        """NamespaceLifecycle: nothing new goes into a namespace being deleted (nor, with
        `require_namespaces`, into one that does not exist)."""
        if not res.namespaced or not namespace:
            return
        ns_res = self._namespace_res
        stored = None if ns_res is None else self._bucket(ns_res).objects.get(("", namespace))
        if stored is None and self.require_namespaces and ns_res is not None:
            raise ApiError(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                {"name": namespace, "group": "", "kind": "namespaces"},
            )
        if stored is not None and (stored.obj.get("status") or {}).get("phase") == "Terminating":
            raise namespace_terminating(res, name, namespace)

    # ------------------------------------------------------------ writes

    def create(self, res: ResourceType, obj: JsonObj, namespace: str | None = None) -> JsonObj:
        new = new_object(res, obj, namespace)
        meta = new["metadata"]
        with self._lock:
            key = self._key(res, meta.get("namespace"), meta["name"])
            self._admit_create(res, meta["name"], meta.get("namespace"))
            if key in self._bucket(res).objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{qualified_resource(res)} "{meta["name"]}" already exists',
                    {"name": meta["name"], "group": res.group, "kind": res.plural},
                )
            result: JsonObj = json.loads(self._commit(res, key, new, "ADDED"))
        self.on_change()
        return result

    def load(self, res: ResourceType, objects: Iterable[JsonObj]) -> int:
        """Insert many objects at once: one sort and one notification for all of them.

        The store takes ownership: the caller must not change the objects afterwards.
        """
        count = 0
        prepared = [new_object(res, obj, None, owned=True) for obj in objects]
        with self._lock:
            bucket = self._bucket(res)
            bucket.keys_sorted = False
            for new in prepared:
                meta = new["metadata"]
                key = self._key(res, meta.get("namespace"), meta["name"])
                if key in bucket.objects:
                    raise ApiError(409, "AlreadyExists", f'{res.plural} "{meta["name"]}" exists')
                self._commit(res, key, new, "ADDED")
                count += 1
        self.on_change()
        return count

    def _write(
        self,
        res: ResourceType,
        namespace: str | None,
        name: str,
        compute: Callable[[JsonObj], JsonObj],
        *,
        subresource: str | None,
        keep_status: bool,
    ) -> JsonObj:
        """Replace an object with `compute(current)`, keeping the fields clients cannot change."""
        with self._lock:
            stored = self._find(res, namespace, name)
            new = updated_object(
                res,
                stored.obj,
                compute(clone(stored.obj)),
                subresource=subresource,
                keep_status=keep_status,
            )
            if new is None:
                return json.loads(stored.raw)  # type: ignore[no-any-return]
            type_ = "MODIFIED"
            if finalized(res, new):
                # ShouldDeleteDuringUpdate: the last finalizer of a deleted Namespace went.
                type_, new = "DELETED", clone(stored.obj)
            key = stored_key(res, stored.obj)
            result: JsonObj = json.loads(self._commit(res, key, new, type_))
        self.on_change()
        return result

    def replace(
        self,
        res: ResourceType,
        namespace: str | None,
        name: str,
        obj: JsonObj,
        *,
        subresource: str | None = None,
        keep_status: bool = True,
    ) -> JsonObj:
        body = clone(obj)
        body_name = (body.get("metadata") or {}).get("name")
        if body_name not in (None, name):
            raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
        return self._write(
            res,
            namespace,
            name,
            lambda _old: body,
            subresource=subresource,
            keep_status=keep_status,
        )

    def patch(
        self,
        res: ResourceType,
        namespace: str | None,
        name: str,
        content_type: str,
        patch: Any,
        *,
        subresource: str | None = None,
    ) -> JsonObj:
        return self._write(
            res,
            namespace,
            name,
            lambda old: apply_patch(old, content_type, patch),
            subresource=subresource,
            keep_status=True,
        )

    def delete(self, res: ResourceType, namespace: str | None, name: str) -> JsonObj:
        """Delete; a Namespace is only marked Terminating (its controller removes it)."""
        with self._lock:
            stored = self._find(res, namespace, name)
            key = stored_key(res, stored.obj)
            if res.kind == "Namespace" and (stored.obj.get("spec") or {}).get("finalizers"):
                if stored.obj["metadata"].get("deletionTimestamp"):
                    raise ApiError(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on namespaces "{name}": The system is '
                        "ensuring all content is removed from this namespace.  Upon completion, "
                        "this namespace will automatically be purged by the system.",
                        {"name": name, "group": "", "kind": "namespaces"},
                    )
                terminating = clone(stored.obj)
                terminating["metadata"]["deletionTimestamp"] = now()
                terminating.setdefault("status", {})["phase"] = "Terminating"
                result: JsonObj = json.loads(self._commit(res, key, terminating, "MODIFIED"))
            else:
                result = json.loads(stored.raw)
                self._commit(res, key, clone(stored.obj), "DELETED")
        self.on_change()
        return result

    def delete_namespace_content(self, namespace: str) -> int:
        """What the namespace controller does first: every object in `namespace` goes,
        each with its DELETED event. Returns how many."""
        count = 0
        with self._lock:
            for res, bucket in self._buckets.items():
                if res.namespaced:
                    for key in [k for k in bucket.sorted_keys() if k[0] == namespace]:
                        self._commit(res, key, clone(bucket.objects[key].obj), "DELETED")
                        count += 1
        if count:
            self.on_change()
        return count

    def reset(self) -> None:
        """Forget every object and all history; resourceVersions keep increasing."""
        with self._lock:
            self._rv += 1
            self.epoch += 1
            for bucket in self._buckets.values():
                bucket.objects.clear()
                bucket.keys.clear()
                bucket.keys_sorted = True
                bucket.history.clear()
                bucket.floor = self._rv
        self.on_change()

    def expire(self) -> None:
        """Compact: open watches end with 410, and so does any watch from an RV seen so far."""
        with self._lock:
            self._rv += 1
            self.epoch += 1
            for bucket in self._buckets.values():
                bucket.history.clear()
                bucket.floor = self._rv
        self.on_change()

    # ------------------------------------------------------------ reads

    def get(self, res: ResourceType, namespace: str | None, name: str) -> JsonObj:
        with self._lock:
            raw = self._find(res, namespace, name).raw
        result: JsonObj = json.loads(raw)
        return result

    def get_raw(self, res: ResourceType, namespace: str | None, name: str) -> bytes:
        with self._lock:
            return self._find(res, namespace, name).raw

    def list_objects(self, res: ResourceType, flt: WatchFilter | None = None) -> list[JsonObj]:
        with self._lock:
            bucket = self._bucket(res)
            raws = [
                bucket.objects[k].raw
                for k in bucket.sorted_keys()
                if flt is None or flt.matches(bucket.objects[k].obj)
            ]
        return [json.loads(raw) for raw in raws]

    def list_page(
        self,
        res: ResourceType,
        flt: WatchFilter,
        *,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> bytes:
        """A whole `<Kind>List` response body, one page of it when `limit` is given."""
        namespace = flt.namespace
        with self._lock:
            bucket = self._bucket(res)
            keys = bucket.sorted_keys()
            if continue_token:
                snapshot_rv, start = _decode_continue(continue_token)
                if snapshot_rv < bucket.floor:
                    raise ApiError(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter.",
                    )
                index = bisect.bisect_right(keys, start)
            else:
                snapshot_rv = self._rv
                index = bisect.bisect_left(keys, (namespace, "")) if namespace else 0
            items: list[bytes] = []
            while index < len(keys) and (limit is None or len(items) < limit):
                key = keys[index]
                if namespace is not None and key[0] != namespace:
                    index = len(keys)
                    break
                stored = bucket.objects[key]
                if (flt.labels is None and flt.fields is None) or flt.matches(stored.obj):
                    items.append(stored.raw)
                index += 1
            more = index < len(keys) and (namespace is None or keys[index][0] == namespace)
            token = _encode_continue(snapshot_rv, keys[index - 1]) if more else ""
        meta: JsonObj = {"resourceVersion": str(snapshot_rv)}
        if token:
            meta["continue"] = token
        head = dump({"kind": res.list_kind, "apiVersion": res.api_version, "metadata": meta})
        return head[:-1] + b',"items":[' + b",".join(items) + b"]}"

    def initial_events(self, res: ResourceType, flt: WatchFilter) -> tuple[list[bytes], int]:
        """Synthetic ADDED events for a watch that starts without a resourceVersion."""
        with self._lock:
            bucket = self._bucket(res)
            lines = [
                event_line("ADDED", bucket.objects[k].raw)
                for k in bucket.sorted_keys()
                if flt.matches(bucket.objects[k].obj)
            ]
            return lines, self._rv

    def pending(
        self, res: ResourceType, since: int, flt: WatchFilter | None = None
    ) -> Pending | None:
        """The events after `since` a watch may deliver now; None when `since` is too old
        (410). Events still held back (`watch_delay`) hold back everything after them."""
        clock = time.monotonic()
        with self._lock:
            bucket = self._bucket(res)
            if since < bucket.floor:
                return None
            newer: list[WatchEvent] = []
            for event in reversed(bucket.history):
                if event.rv <= since:
                    break
                newer.append(event)
            newer.reverse()
            picked: list[WatchEvent] = []
            for event in newer:
                if event.visible > clock:
                    return Pending(picked, event.rv - 1, event.visible)
                if flt is None or flt.matches(event.obj):
                    picked.append(event)
            return Pending(picked, max(self._rv, since), None)

    def events_since(
        self, res: ResourceType, since: int, flt: WatchFilter
    ) -> tuple[list[bytes], int, float | None] | None:
        """Event lines after `since`, the RV they reach and when more are due; None: 410."""
        got = self.pending(res, since, flt)
        if got is None:
            return None
        return [e.line for e in got.events], got.since, got.due


def stored_key(res: ResourceType, obj: JsonObj) -> ObjKey:
    meta = obj["metadata"]
    return (meta.get("namespace") or "" if res.namespaced else "", meta["name"])
