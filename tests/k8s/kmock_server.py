"""An in-memory Kubernetes API server over real HTTP for the Kubernetes runner's contract tests: kmock's emulator
(PyPI ``kmock``) with the API-server behaviour the runner relies on that kmock 0.8 lacks (label selectors,
resourceVersion, the status subresource, watches from a version, 410 Gone, dropped watches, cascading deletes).

`KmockThread` runs it in a background thread, so the synchronous ``kubernetes`` client (in the daemon under test
and in the test's fake kubelet) can talk to it.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import itertools
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import kmock
from kmock._internal import rendering  # the Request type, for annotations only
from kubernetes import client


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside parentheses: 'a in (x,y),b' -> ['a in (x,y)', 'b']."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [t.strip() for t in out if t.strip()]


_SET_RE = re.compile(r"^(?P<key>\S+)\s+(?P<op>in|notin)\s+\((?P<vals>[^)]*)\)$")
_EQ_RE = re.compile(r"^(?P<key>[^!=\s]+)\s*(?P<op>==|=|!=)\s*(?P<val>\S*)$")


def label_matcher(selector: str | None) -> Callable[[dict[str, str]], bool]:
    """Kubernetes label-selector semantics: =, ==, !=, in, notin, exists, !exists (ANDed)."""
    if not selector:
        return lambda labels: True
    preds: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_top_level(selector):
        if m := _SET_RE.match(term):
            key, op = m["key"], m["op"]
            vals = {v.strip() for v in m["vals"].split(",") if v.strip()}
            if op == "in":
                preds.append(lambda labels, k=key, v=vals: k in labels and labels[k] in v)
            else:
                preds.append(lambda labels, k=key, v=vals: k not in labels or labels[k] not in v)
        elif m := _EQ_RE.match(term):
            key, op, val = m["key"], m["op"], m["val"]
            if op == "!=":
                preds.append(lambda labels, k=key, v=val: labels.get(k) != v)
            else:
                preds.append(lambda labels, k=key, v=val: labels.get(k) == v)
        elif term.startswith("!"):
            absent = term[1:].strip()
            preds.append(lambda labels, k=absent: k not in labels)
        else:
            preds.append(lambda labels, k=term: k in labels)
    return lambda labels: all(p(labels or {}) for p in preds)


def field_matcher(selector: str | None) -> Callable[[dict[str, Any]], bool]:
    """Only metadata.name / metadata.namespace (=, ==, !=) -- what controllers typically use."""
    if not selector:
        return lambda obj: True
    preds = []
    for term in _split_top_level(selector):
        m = _EQ_RE.match(term)
        if not m or m["key"] not in ("metadata.name", "metadata.namespace"):
            raise kmock.KubernetesError(status=400, reason="BadRequest",
                                        message=f"unsupported field selector (emulator): {term!r}")
        field = m["key"].split(".", 1)[1]
        if m["op"] == "!=":
            preds.append(lambda o, f=field, v=m["val"]: o.get("metadata", {}).get(f) != v)
        else:
            preds.append(lambda o, f=field, v=m["val"]: o.get("metadata", {}).get(f) == v)
    return lambda obj: all(p(obj) for p in preds)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------
# 2. The emulator subclass.
# --------------------------------------------------------------------------------------

# Resources the emulator must "know" (kmock 404s LIST/WATCH for undeclared, empty resources).
DROPFIT_RESOURCES = {
    "batch/v1/jobs": dict(kind="Job", namespaced=True, subresources={"status"},
                          verbs={"create", "delete", "get", "list", "patch", "watch"}),
    "v1/pods": dict(kind="Pod", namespaced=True, subresources={"status", "log"},
                    verbs={"create", "delete", "get", "list", "patch", "watch"}),
    "v1/events": dict(kind="Event", namespaced=True, verbs={"create", "list", "watch"}),
}
KINDS = {("batch", "jobs"): ("batch/v1", "JobList"), ("", "pods"): ("v1", "PodList"),
         ("", "events"): ("v1", "EventList")}


@attrs.define(kw_only=True)
class DropfitKubernetes(kmock.KubernetesEmulator):
    """
    kmock.KubernetesEmulator + the API-server behaviour a Job runner depends on:

    * metadata stamping on CREATE: namespace (REQUIRED: kmock's watch filters events by
      metadata.namespace and silently drops objects that lack it), uid, creationTimestamp,
      generation, resourceVersion (global monotonic counter), generateName.
    * resourceVersion bump on every PATCH; LIST returns metadata.resourceVersion + kind.
    * labelSelector (full syntax) + fieldSelector (metadata.name/namespace) on LIST and WATCH.
    * status subresource semantics: PATCH .../status only changes .status; PATCH on the main
      resource ignores .status; CREATE drops .status.
    * WATCH: ?resourceVersion=N skips replaying objects with rv <= N; if N < compacted_rv the
      stream answers an in-stream ERROR/410 "Expired" event exactly like kube-apiserver;
      ?timeoutSeconds=N ends the stream cleanly after N s.
    * test controls: compact(), end_watches() (clean EOF), drop_watches() (TCP close mid-stream).
    * DELETE with propagationPolicy=Background|Foreground cascades to objects whose
      metadata.ownerReferences[].uid is the deleted object's uid (the real GC is async; here
      it is immediate).  Orphan / no policy leaves dependents (the batch/v1 REST default!).
      A dependent with finalizers (a Job's pods carry batch.kubernetes.io/job-tracking) is
      only marked (deletionTimestamp, a MODIFIED event) and stays, Terminating, until they
      are removed -- as kmock's own DELETE does for such an object.
    """

    compacted_rv: int = 0
    _rv_counter: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    last_rv: int = attrs.field(default=0, init=False)
    _watches: dict[int, tuple[rendering.Request, Any]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for res, info in DROPFIT_RESOURCES.items():
            self.resources[res] = kmock.ResourceInfo(**info)
        # kubernetes.client.VersionApi().get_code() requests "/version/" (trailing slash);
        # kmock only routes "/version".  Custom routes are plain kmock DSL:
        self.fallback["get /version/"] << self._serve_server_version

    # -- helpers -------------------------------------------------------------------------
    def _next_rv(self) -> str:
        self.last_rv = next(self._rv_counter)
        return str(self.last_rv)

    def compact(self) -> int:
        """Everything older than 'now' becomes too old to watch from (-> 410 Gone)."""
        self.compacted_rv = self.last_rv  # watching from the current rv stays valid
        return self.compacted_rv

    def end_watches(self) -> int:
        """Close every open watch stream cleanly (what apiserver does on its watch timeout)."""
        loop = asyncio.get_running_loop()
        for _, timeout_cm in list(self._watches.values()):
            timeout_cm.reschedule(loop.time())
        return len(self._watches)

    def drop_watches(self) -> int:
        """Abruptly close the TCP connection of every open watch (mid-chunked-body)."""
        n = len(self._watches)
        for request, timeout_cm in list(self._watches.values()):
            transport = request._raw_request.transport
            if transport is not None:
                transport.abort()
            timeout_cm.reschedule(asyncio.get_running_loop().time())
        return n

    # -- request interception --------------------------------------------------------------
    async def _handle(self, request: rendering.Request) -> Any:
        cascade_uid: str | None = None
        if request.resource is not None:
            data = request.data
            if request.action == kmock.action.CREATE and isinstance(data, dict):
                meta = data.setdefault("metadata", {})
                if request.namespace and meta.get("namespace") not in (None, request.namespace):
                    raise kmock.KubernetesError(status=400, reason="BadRequest",
                                                message="the namespace of the object does not match the URL")
                if request.namespace:
                    meta["namespace"] = request.namespace
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                if not meta.get("name"):
                    raise kmock.KubernetesError(status=422, reason="Invalid",
                                                message="metadata.name or generateName is required")
                key = (request.resource, request.namespace, meta["name"])
                if key in self.objects and not self.objects[key].deleted:
                    raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                                message=f'"{meta["name"]}" already exists')
                meta.update(uid=str(uuid.uuid4()), generation=1, resourceVersion=self._next_rv(),
                            creationTimestamp=_now())
                if "status" in self.resources[request.resource].subresources:
                    data.pop("status", None)
            elif request.action == kmock.action.UPDATE and isinstance(data, dict):
                if request.subresource == "status":
                    new = {"status": data["status"]} if "status" in data else {}
                elif request.subresource is None and "status" in self.resources[request.resource].subresources:
                    new = {k: v for k, v in data.items() if k != "status"}
                else:
                    new = dict(data)
                new.setdefault("metadata", {})
                if not isinstance(new["metadata"], dict):
                    new["metadata"] = {}
                new["metadata"]["resourceVersion"] = self._next_rv()
                data.clear()
                data.update(new)
            elif request.action == kmock.action.UPDATE and isinstance(data, list):  # JSON patch
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": self._next_rv()})
            elif request.action == kmock.action.DELETE and request.name:
                key = (request.resource, request.namespace, request.name)
                policy = request.params.get("propagationPolicy")  # client 37: query param
                if not policy and isinstance(request.data, dict):   # older clients: DeleteOptions body
                    policy = request.data.get("propagationPolicy")
                if key in self.objects and not self.objects[key].deleted and policy in ("Background", "Foreground"):
                    cascade_uid = self.objects[key].raw.get("metadata", {}).get("uid")

        response = await super()._handle(request)

        if cascade_uid:
            async with self._lock:
                for (res, _ns, _name), obj in list(self.objects.items()):
                    refs = [] if obj.deleted else obj.raw.get("metadata", {}).get("ownerReferences") or []
                    if not any(ref.get("uid") == cascade_uid for ref in refs):
                        continue
                    meta = obj.raw.get("metadata", {})
                    if meta.get("finalizers"):  # deleted gracefully: it stays, Terminating, until they are removed
                        if not meta.get("deletionTimestamp"):
                            obj.patch({"metadata": {"deletionTimestamp": _now(), "resourceVersion": self._next_rv()}})
                            await self._buses[res].put({"type": "MODIFIED", "object": obj.raw})
                    else:
                        obj.delete()
                        await self._buses[res].put({"type": "DELETED", "object": obj.last.raw})
        return response

    async def _serve_list(self, request: rendering.Request) -> Any:
        result = await super()._serve_list(request)
        labels_ok = label_matcher(request.params.get("labelSelector"))
        fields_ok = field_matcher(request.params.get("fieldSelector"))
        result["items"] = [o for o in result["items"]
                           if labels_ok(o.get("metadata", {}).get("labels") or {}) and fields_ok(o)]
        api_version, kind = KINDS.get((request.resource.group, request.resource.plural), (None, None))
        result.update(apiVersion=api_version, kind=kind)
        result["metadata"] = {"resourceVersion": str(self.last_rv)}
        return result

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        labels_ok = label_matcher(request.params.get("labelSelector"))
        fields_ok = field_matcher(request.params.get("fieldSelector"))
        since = request.params.get("resourceVersion") or ""
        since_rv = int(since) if since.isdigit() else 0
        timeout_s = request.params.get("timeoutSeconds")

        if since_rv and since_rv < self.compacted_rv:
            yield b""  # start the 200 stream (the real apiserver also answers 200 + an ERROR event)
            yield {"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f"too old resource version: {since_rv} ({self.compacted_rv})",
                "reason": "Expired", "code": 410}}
            return

        inner = super()._serve_watch(request)
        try:
            async with asyncio.timeout(float(timeout_s) if timeout_s else None) as cm:
                self._watches[id(request)] = (request, cm)
                async for item in inner:
                    if not isinstance(item, dict):  # the b'' header-flushing chunk
                        yield item
                        continue
                    obj = item.get("object", {})
                    rv = obj.get("metadata", {}).get("resourceVersion", "0")
                    if item["type"] == "ADDED" and since_rv and int(rv) <= since_rv:
                        continue  # already seen by the client (initial replay)
                    if labels_ok(obj.get("metadata", {}).get("labels") or {}) and fields_ok(obj):
                        yield item
        except TimeoutError:
            pass  # clean end of stream
        finally:
            self._watches.pop(id(request), None)
            await inner.aclose()


# --------------------------------------------------------------------------------------
# 3. Run the asyncio server in a thread so the sync kubernetes client can talk to it.
# --------------------------------------------------------------------------------------

class KmockThread:
    def __init__(self, cls: type[kmock.RawHandler] = DropfitKubernetes, **handler_kwargs: Any):
        self.cls, self.handler_kwargs = cls, handler_kwargs
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.handler: Any = None
        self.url = ""
        self.loop: asyncio.AbstractEventLoop | None = None

    async def _main(self) -> None:
        try:
            async with self.cls(**self.handler_kwargs) as handler, \
                    kmock.Server(handler, host="127.0.0.1") as server:
                self.handler, self.loop = handler, asyncio.get_running_loop()
                self.url = str(server.url).rstrip("/")
                self._stop = asyncio.Event()
                self._ready.set()
                await self._stop.wait()
                handler.end_watches() if hasattr(handler, "end_watches") else None
        except BaseException as e:  # surface startup errors to the test thread
            self._error = e
            self._ready.set()

    def start(self) -> KmockThread:
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),),
                                        name="kmock", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error:
            raise RuntimeError(f"kmock failed to start: {self._error!r}")
        return self

    def stop(self) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "kmock thread did not stop"

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 5) -> Any:
        """Run fn(*args) inside the server's event loop (thread-safe); awaits it if async."""
        async def runner() -> Any:
            result = fn(*args)
            return await result if inspect.isawaitable(result) else result
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(runner(), self.loop).result(timeout)

    def api_client(self) -> client.ApiClient:
        cfg = client.Configuration(host=self.url)  # plain http, no auth, no kubeconfig
        cfg.retries = False  # fail fast instead of urllib3's 3 retries on connection errors
        return client.ApiClient(cfg)
