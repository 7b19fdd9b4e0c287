"""What kube-apiserver does to objects per verb, minus HTTP: create/get/list/update/patch/delete.

Covers system metadata (uid, resourceVersion, creationTimestamp, generation), CR defaulting and
validation, the status subresource split, finalizers and deletionTimestamp, ownerReference
garbage collection, namespace and CRD cascades. Failures raise ``status.ApiError``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import datetime
import json
import random
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from tests.fakeapi import apply, kubeschemas, openapi, patches, resources, selectors, status, storage, structural

SYSTEM_META = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "namespace",
    "name",
    "resourceVersion",
)
NAMESPACES = ("", "namespaces")
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
CR_PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, APPLY_PATCH)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _generated_name(prefix: str) -> str:
    return prefix + "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))


Admit = Callable[[str, resources.ResourceType, str, str, dict[str, Any], dict[str, Any] | None], list[str]]


@dataclasses.dataclass
class Options:
    field_validation: str = "Strict"
    dry_run: bool = False
    manager: str = ""  # fieldManager (or what the user agent implies)
    force: bool = False  # server-side apply: take conflicting fields
    applying: bool = False  # the write is a server-side apply (managedFields come with it)
    # Admission after validation: (operation, rt, version, subresource, object, oldObject) -> warnings; raises
    # status.ApiError to refuse (the server binds the requesting user: admission.check).
    admit: Admit | None = None


# Built-in kinds validated against the real Kubernetes schemas (the chart's kinds).
VALIDATED = frozenset(
    {
        ("apps", "deployments"),
        ("apps", "daemonsets"),
        ("batch", "jobs"),
        ("", "services"),
        ("", "secrets"),
        ("", "configmaps"),
        ("", "serviceaccounts"),
        ("", "namespaces"),
        *((resources.RBAC, plural) for plural in ("clusterroles", "clusterrolebindings", "roles", "rolebindings")),
        (resources.ADMISSION, "validatingadmissionpolicies"),
        (resources.ADMISSION, "validatingadmissionpolicybindings"),
    }
)


@dataclasses.dataclass
class Result:
    obj: dict[str, Any]
    warnings: list[str] = dataclasses.field(default_factory=list)
    created: bool = False


def _ns_name(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]


class Registry:
    def __init__(self, store: storage.Store, catalogue: resources.Catalogue) -> None:
        self.store = store
        self.catalogue = catalogue

    # ----------------------------------------------------------------------- helpers

    def render(
        self, rt: resources.ResourceType, version: str, obj: Mapping[str, Any], *, in_list: bool = False
    ) -> dict[str, Any]:
        out = copy.deepcopy(dict(obj))
        if in_list and not rt.custom:
            out.pop("apiVersion", None)
            out.pop("kind", None)
        else:
            out = {
                "apiVersion": rt.api_version(version),
                "kind": rt.kind,
                **{k: v for k, v in out.items() if k not in ("apiVersion", "kind")},
            }
        return out

    @staticmethod
    def has_status(rt: resources.ResourceType, version: str) -> bool:
        v = rt.version(version)
        return bool(v and v.status)

    def _decode(self, rt: resources.ResourceType, version: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise status.bad_request(f"Object in request body is not a {rt.kind}")
        obj = copy.deepcopy(body)
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if rt.custom and (not api_version or not kind):
            missing = "Kind" if not kind else "Version"
            raise status.bad_request(f"Object '{missing}' is missing in '{json.dumps(body)[:200]}'")
        if (api_version and api_version != rt.api_version(version)) or (kind and kind != rt.kind):
            raise status.bad_request(
                f"the API version in the data ({api_version}) does not match the expected API version "
                f"({rt.api_version(version)})"
                if api_version != rt.api_version(version)
                else f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )
        obj["apiVersion"], obj["kind"] = rt.api_version(version), rt.kind
        if not isinstance(obj.setdefault("metadata", {}), dict):
            raise status.bad_request("metadata must be an object")
        return obj

    def _admit(
        self,
        rt: resources.ResourceType,
        version: str,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        opts: Options,
    ) -> list[str]:
        """Validate (and, for CRs, prune/default) ``obj`` in place; return warnings."""
        meta = obj["metadata"]
        errors = openapi.validate_metadata(meta)
        warnings: list[str] = []
        v = rt.version(version)
        if rt.custom and v is not None and v.schema is not None:
            outcome = openapi.process(obj, old, v.schema, self.catalogue.cel, field_validation=opts.field_validation)
            if outcome.unknown and opts.field_validation == "Strict":
                raise status.strict_decoding(rt.kind, version, outcome.unknown)
            if opts.field_validation == "Warn":
                warnings += [f'unknown field "{path}"' for path in outcome.unknown]
            errors += outcome.errors
        if rt.key in VALIDATED:
            found, unknown = kubeschemas.problems(obj)
            if unknown and opts.field_validation == "Strict":
                raise status.strict_decoding(rt.kind, version, unknown)
            if opts.field_validation == "Warn":
                warnings += [f'unknown field "{path}"' for path in unknown]
            errors += found
        if rt.key == resources.CRD_KEY:
            errors += structural.check_crd(obj)
        if rt.key == resources.CRD_KEY and not errors:
            try:
                resources.from_crd(obj, self.catalogue.cel)
            except (openapi.SchemaError, KeyError, TypeError) as exc:
                errors.append(openapi.FieldError("Invalid", "spec", "object", f"invalid CRD: {exc}"))
        if errors:
            raise status.invalid(rt.group, rt.kind, meta.get("name") or meta.get("generateName", ""), errors)
        return warnings

    def _namespace_exists(self, namespace: str) -> bool:
        return self.store.get(NAMESPACES, "", namespace) is not None

    # ----------------------------------------------------------------------- read

    def get(self, rt: resources.ResourceType, version: str, namespace: str, name: str) -> dict[str, Any]:
        obj = self.store.get(rt.key, namespace, name)
        if obj is None:
            raise status.not_found(rt.group, rt.plural, name)
        return self.render(rt, version, obj)

    def predicate(
        self,
        rt: resources.ResourceType,
        version: str,
        namespace: str | None,
        label_selector: str | None,
        field_selector: str | None,
    ) -> selectors.Predicate:
        try:
            by_label = selectors.label_predicate(label_selector)
            by_field = selectors.field_predicate(field_selector, rt.field_keys(version))
        except selectors.SelectorError as exc:
            raise status.bad_request(str(exc)) from exc

        def predicate(obj: Mapping[str, Any]) -> bool:
            if namespace and (obj.get("metadata") or {}).get("namespace") != namespace:
                return False
            return by_label(obj) and by_field(obj)

        return predicate

    def list(
        self,
        rt: resources.ResourceType,
        version: str,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> dict[str, Any]:
        match = self.predicate(rt, version, namespace, label_selector, field_selector)
        with self.store.lock:
            items = [obj for obj in self.store.items(rt.key, namespace or None) if match(obj)]
            rv = self.store.rv
        if continue_token:
            try:
                start = tuple(json.loads(base64.b64decode(continue_token)))
            except (ValueError, binascii.Error) as exc:
                raise status.bad_request("continue key is not valid") from exc
            items = [obj for obj in items if _ns_name(obj) > start]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if limit and len(items) > limit:
            items, rest = items[:limit], len(items) - limit
            meta["continue"] = base64.b64encode(json.dumps(list(_ns_name(items[-1]))).encode()).decode()
            meta["remainingItemCount"] = rest
        return {
            "kind": rt.list_kind or f"{rt.kind}List",
            "apiVersion": rt.api_version(version),
            "metadata": meta,
            "items": [self.render(rt, version, obj, in_list=True) for obj in items],
        }

    # ----------------------------------------------------------------------- create

    def create(self, rt: resources.ResourceType, version: str, namespace: str, body: Any, opts: Options) -> Result:
        obj = self._decode(rt, version, body)
        meta = obj["metadata"]
        if rt.namespaced:
            if namespace and meta.get("namespace") and meta["namespace"] != namespace:
                raise status.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = meta.get("namespace") or namespace or "default"
            if not self._namespace_exists(meta["namespace"]):
                raise status.not_found("", "namespaces", meta["namespace"])
        else:
            meta.pop("namespace", None)
        if meta.get("resourceVersion"):
            raise status.bad_request("resourceVersion should not be set on objects to be created")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = _generated_name(meta["generateName"])
        for key in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "selfLink",
            *(() if opts.applying else ("managedFields",)),
        ):
            meta.pop(key, None)
        if rt.custom and self.has_status(rt, version):
            obj.pop("status", None)
        warnings = self._admit(rt, version, obj, None, opts)
        if opts.admit is not None:
            warnings += opts.admit("CREATE", rt, version, "", self.render(rt, version, obj), None)
        with self.store.lock:
            if self.store.get(rt.key, meta.get("namespace", ""), meta["name"]) is not None:
                raise status.already_exists(rt.group, rt.plural, meta["name"])
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now()
            if rt.custom:
                meta["generation"] = 1
            self._on_create(rt, obj)
            if opts.dry_run:
                return Result(self.render(rt, version, obj), warnings, created=True)
            if rt.key == resources.CRD_KEY:
                self.catalogue.add_crd(obj)
            self.store.write(rt.key, "ADDED", obj, None)
            return Result(self.render(rt, version, obj), warnings, created=True)

    def _on_create(self, rt: resources.ResourceType, obj: dict[str, Any]) -> None:
        if rt.key == NAMESPACES:
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj["status"] = {"phase": "Active"}
        elif rt.key == resources.CRD_KEY:
            names = obj["spec"]["names"]
            stored = [v["name"] for v in obj["spec"].get("versions") or [] if v.get("storage")]
            obj["status"] = {
                "acceptedNames": {k: v for k, v in names.items()},
                "storedVersions": stored,
                "conditions": [
                    {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": now()}
                    for t, r, m in (
                        ("NamesAccepted", "NoConflicts", "no conflicts found"),
                        ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                    )
                ],
            }

    # ----------------------------------------------------------------------- update & patch

    def update(
        self,
        rt: resources.ResourceType,
        version: str,
        namespace: str,
        name: str,
        body: Any,
        subresource: str,
        opts: Options,
    ) -> Result:
        def make(current: dict[str, Any]) -> dict[str, Any]:
            new = self._decode(rt, version, body)
            rv = new["metadata"].get("resourceVersion")
            if not rv and rt.custom:
                raise status.invalid(
                    rt.group,
                    rt.kind,
                    name,
                    [openapi.FieldError("Invalid", "metadata.resourceVersion", 0, "must be specified for an update")],
                )
            if rv and rv != current["metadata"]["resourceVersion"]:
                raise status.conflict(rt.group, rt.plural, name)
            return new

        return self._modify(rt, version, namespace, name, subresource, make, opts)

    def patch(
        self,
        rt: resources.ResourceType,
        version: str,
        namespace: str,
        name: str,
        content_type: str,
        patch: Any,
        subresource: str,
        opts: Options,
    ) -> Result:
        content_type = content_type.split(";")[0].strip()
        accepted = CR_PATCH_TYPES if rt.custom else (JSON_PATCH, MERGE_PATCH, STRATEGIC_PATCH, APPLY_PATCH)
        if content_type not in accepted:
            raise status.unsupported_media_type(content_type, accepted)
        if content_type == APPLY_PATCH:
            return self._apply(rt, version, namespace, name, patch, subresource, opts)

        def make(current: dict[str, Any]) -> dict[str, Any]:
            try:
                if content_type == JSON_PATCH:
                    patched = patches.apply_json_patch(current, patch)
                else:  # merge patch; strategic merge patch is approximated by it for built-ins
                    if not isinstance(patch, dict):
                        raise patches.MalformedPatch("merge patch must be a JSON object")
                    patched = patches.merge(current, patch)
            except patches.MalformedPatch as exc:
                raise status.bad_request(str(exc)) from exc
            except patches.PatchError as exc:
                raise status.unprocessable(str(exc)) from exc
            new = self._decode(rt, version, patched)
            rv = new["metadata"].get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                raise status.conflict(rt.group, rt.plural, name)
            return new

        return self._modify(rt, version, namespace, name, subresource, make, opts)

    def _modify(
        self,
        rt: resources.ResourceType,
        version: str,
        namespace: str,
        name: str,
        subresource: str,
        make: Callable[[dict[str, Any]], dict[str, Any]],
        opts: Options,
    ) -> Result:
        with self.store.lock:
            current = self.store.get(rt.key, namespace, name)
            if current is None:
                raise status.not_found(rt.group, rt.plural, name)
            body = make(self.render(rt, version, current))
            if body["metadata"].get("name", name) != name:
                raise status.bad_request(
                    f"the name of the object ({body['metadata']['name']}) does not match the name on the URL ({name})"
                )
            new = self._prepare_update(rt, version, subresource, current, body)
            if opts.applying:
                new["metadata"]["managedFields"] = body["metadata"]["managedFields"]
            else:
                apply.record_update(current, new, opts.manager, subresource)
            self._check_finalizers(rt, current, new)
            warnings = self._admit(rt, version, new, self.render(rt, version, current), opts)
            if opts.admit is not None:
                warnings += opts.admit("UPDATE", rt, version, subresource, self.render(rt, version, new),
                                       self.render(rt, version, current))
            if rt.custom and self._spec_changed(rt, version, current, new):
                new["metadata"]["generation"] = int(current["metadata"].get("generation") or 0) + 1
            if self._same(rt, version, current, new):
                return Result(self.render(rt, version, current), warnings)
            if opts.dry_run:
                return Result(self.render(rt, version, new), warnings)
            if rt.key == resources.CRD_KEY:
                self.catalogue.add_crd(new)
            meta = new["metadata"]
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                self.store.write(rt.key, "DELETED", new, current)
                self._after_removal(rt, new, "Background")
            else:
                self.store.write(rt.key, "MODIFIED", new, current)
            return Result(self.render(rt, version, new), warnings)

    def _apply(
        self,
        rt: resources.ResourceType,
        version: str,
        namespace: str,
        name: str,
        patch: Any,
        subresource: str,
        opts: Options,
    ) -> Result:
        if not opts.manager:
            raise status.invalid(
                rt.group,
                rt.kind,
                name,
                [openapi.FieldError("Required", "fieldManager", detail="is required for apply patch")],
            )
        applied = self._decode(rt, version, patch)
        if applied["metadata"].get("name", name) != name:
            raise status.bad_request(
                f"the name of the object ({applied['metadata'].get('name')}) does not match the name on the URL "
                f"({name})"
            )
        applied["metadata"]["name"] = name
        opts = dataclasses.replace(opts, applying=True)
        with self.store.lock:
            if self.store.get(rt.key, namespace, name) is None:
                if subresource:
                    raise status.not_found(rt.group, rt.plural, name)
                body = apply.apply(None, applied, opts.manager, force=opts.force)
                return self.create(rt, version, namespace, body, opts)

            def make(current: dict[str, Any]) -> dict[str, Any]:
                try:
                    return apply.apply(current, applied, opts.manager, force=opts.force, sub=subresource)
                except apply.Conflicts as exc:
                    raise status.apply_conflict(exc.conflicts, rt.api_version(version)) from exc

            return self._modify(rt, version, namespace, name, subresource, make, opts)

    def _prepare_update(
        self,
        rt: resources.ResourceType,
        version: str,
        subresource: str,
        current: dict[str, Any],
        body: dict[str, Any],
    ) -> dict[str, Any]:
        if subresource == "status":
            new = copy.deepcopy(current)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
            return new
        new = copy.deepcopy(body)
        meta, old_meta = new["metadata"], current["metadata"]
        for key in SYSTEM_META:
            if key in old_meta:
                meta[key] = old_meta[key]
            else:
                meta.pop(key, None)
        meta.pop("managedFields", None)
        meta.pop("selfLink", None)
        if self.has_status(rt, version):
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
            else:
                new.pop("status", None)
        return new

    @staticmethod
    def _check_finalizers(rt: resources.ResourceType, current: dict[str, Any], new: dict[str, Any]) -> None:
        if not current["metadata"].get("deletionTimestamp"):
            return
        added = [
            f for f in new["metadata"].get("finalizers") or [] if f not in (current["metadata"].get("finalizers") or [])
        ]
        if added:
            quoted = ", ".join(json.dumps(f) for f in added)
            raise status.invalid(
                rt.group,
                rt.kind,
                current["metadata"]["name"],
                [
                    openapi.FieldError(
                        "Forbidden",
                        "metadata.finalizers",
                        detail="no new finalizers can be added if the object is being deleted, "
                        f"found new finalizers []string{{{quoted}}}",
                    )
                ],
            )

    def _spec_changed(
        self, rt: resources.ResourceType, version: str, current: dict[str, Any], new: dict[str, Any]
    ) -> bool:
        ignored = {"metadata", "apiVersion", "kind"} | ({"status"} if self.has_status(rt, version) else set())
        return {k: v for k, v in current.items() if k not in ignored} != {
            k: v for k, v in new.items() if k not in ignored
        }

    def _same(self, rt: resources.ResourceType, version: str, current: dict[str, Any], new: dict[str, Any]) -> bool:
        return self.render(rt, version, current) == self.render(rt, version, new)

    # ----------------------------------------------------------------------- delete

    def delete(
        self,
        rt: resources.ResourceType,
        version: str,
        namespace: str,
        name: str,
        options: Mapping[str, Any] | None,
        opts: Options,
    ) -> Result:
        options = options or {}
        with self.store.lock:
            current = self.store.get(rt.key, namespace, name)
            if current is None:
                raise status.not_found(rt.group, rt.plural, name)
            meta = current["metadata"]
            pre = options.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != meta["uid"]:
                raise status.conflict(
                    rt.group,
                    rt.plural,
                    name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {meta['uid']}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
                raise status.conflict(
                    rt.group,
                    rt.plural,
                    name,
                    f"Precondition failed: ResourceVersion in "
                    f"precondition: {pre['resourceVersion']}, ResourceVersion in object meta: "
                    f"{meta['resourceVersion']}",
                )
            policy = options.get("propagationPolicy") or ("Orphan" if options.get("orphanDependents") else "Background")
            if opts.dry_run:
                return Result(self.render(rt, version, current))
            return Result(self.render(rt, version, self._delete_object(rt, current, policy)))

    def _delete_object(self, rt: resources.ResourceType, current: dict[str, Any], policy: str) -> dict[str, Any]:
        meta = current["metadata"]
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return current
            new = copy.deepcopy(current)
            new["metadata"]["deletionTimestamp"] = now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            if int(meta.get("generation") or 0) > 0:
                new["metadata"]["generation"] = int(meta["generation"]) + 1
            self.store.write(rt.key, "MODIFIED", new, current)
            if policy == "Orphan":
                self._collect_garbage(new, "Orphan")
            return new
        gone = copy.deepcopy(current)
        self.store.write(rt.key, "DELETED", gone, current)
        self._after_removal(rt, gone, policy)
        return gone

    def delete_collection(
        self,
        rt: resources.ResourceType,
        version: str,
        namespace: str | None,
        label_selector: str | None,
        field_selector: str | None,
        options: Mapping[str, Any] | None,
        opts: Options,
    ) -> dict[str, Any]:
        match = self.predicate(rt, version, namespace, label_selector, field_selector)
        deleted = []
        with self.store.lock:
            for obj in [o for o in self.store.items(rt.key, namespace or None) if match(o)]:
                ns, name = _ns_name(obj)
                deleted.append(self.delete(rt, version, ns, name, options, opts).obj)
            rv = self.store.rv
        return {
            "kind": rt.list_kind or f"{rt.kind}List",
            "apiVersion": rt.api_version(version),
            "metadata": {"resourceVersion": str(rv)},
            "items": deleted,
        }

    def _after_removal(self, rt: resources.ResourceType, obj: dict[str, Any], policy: str) -> None:
        if rt.key == NAMESPACES:
            namespace = obj["metadata"]["name"]
            for other in self.catalogue.all():
                if other.namespaced:
                    for item in self.store.items(other.key, namespace):
                        self._delete_object(other, item, "Background")
        elif rt.key == resources.CRD_KEY:
            removed = self.catalogue.remove_crd(obj["metadata"]["name"])
            if removed is not None:
                for item in self.store.items(removed.key):
                    self.store.write(removed.key, "DELETED", copy.deepcopy(item), item)
        self._collect_garbage(obj, policy)

    def _collect_garbage(self, owner: dict[str, Any], policy: str) -> None:
        """Background GC, done synchronously: dependents of a removed owner go when no owner is left."""
        uid = owner["metadata"].get("uid")
        with self.store.lock:
            everything = self.store.all_items()
            live = {obj["metadata"].get("uid") for _, obj in everything}
            for key, dep in everything:
                refs = dep["metadata"].get("ownerReferences") or []
                if not any(ref.get("uid") == uid for ref in refs):
                    continue
                dep_rt = self.catalogue.by_key(key)
                if dep_rt is None:
                    continue
                remaining = [ref for ref in refs if ref.get("uid") != uid]
                alive = [ref for ref in remaining if ref.get("uid") in live]
                if policy != "Orphan" and not alive:
                    current = self.store.get(key, *_ns_name(dep))
                    if current is not None:
                        self._delete_object(dep_rt, current, "Background")
                    continue
                new = copy.deepcopy(dep)
                new["metadata"]["ownerReferences"] = remaining
                if not remaining:
                    new["metadata"].pop("ownerReferences")
                self.store.write(key, "MODIFIED", new, dep)

    # ----------------------------------------------------------------------- watch support

    def translate(
        self, rt: resources.ResourceType, version: str, match: selectors.Predicate
    ) -> Callable[[storage.Change], dict[str, Any] | None]:
        """Turn a store change into the watch event this watcher sees (selector transitions included)."""

        def event(change: storage.Change) -> dict[str, Any] | None:
            if change.key != rt.key:
                return None
            now_in = match(change.obj)
            was_in = change.old is not None and match(change.old)
            if change.type == "DELETED":
                kind = "DELETED" if (now_in or was_in) else None
            elif change.type == "ADDED" or not was_in:
                kind = "ADDED" if now_in else None
            else:
                kind = "MODIFIED" if now_in else "DELETED"
            return None if kind is None else {"type": kind, "object": self.render(rt, version, change.obj)}

        return event
