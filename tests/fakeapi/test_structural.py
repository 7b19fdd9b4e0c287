"""The harness refuses non-structural CRDs as kube-apiserver does (one case per rule of apiextensions'
structural-schema validation), and accepts the project's CRDs."""

from __future__ import annotations

import copy
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import kubernetes.client
import pytest
import yaml

from tests.fakeapi import apiserver, structural

pytestmark = pytest.mark.kube

REPO = pathlib.Path(__file__).resolve().parents[2]
ROOT = "spec.versions[0].schema.openAPIV3Schema"
SPEC = f"{ROOT}.properties[spec]"
INT_OR_STRING = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}


def crd(schema: dict[str, Any], *, status: bool = False) -> dict[str, Any]:
    version: dict[str, Any] = {"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}
    if status:
        version["subresources"] = {"status": {}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "things.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Cluster",
            "names": {"plural": "things", "singular": "thing", "kind": "Thing"},
            "versions": [version],
        },
    }


def spec(**properties: Any) -> dict[str, Any]:
    """A root schema whose ``spec`` object has these properties."""
    return {"type": "object", "properties": {"spec": {"type": "object", "properties": properties}}}


CASES = [
    (
        "field-without-type",
        spec(x={"description": "untyped"}),
        f"{SPEC}.properties[x].type: Required value: must not be empty for specified object fields",
    ),
    (
        "item-without-type",
        spec(x={"type": "array", "items": {"description": "untyped"}}),
        f"{SPEC}.properties[x].items.type: Required value: must not be empty for specified array items",
    ),
    (
        "root-without-type",
        {"properties": {"spec": {"type": "object"}}},
        f"{ROOT}.type: Required value: must not be empty at the root",
    ),
    ("root-not-object", {"type": "string"}, f'{ROOT}.type: Invalid value: "string": must be object at the root'),
    (
        "array-without-items",
        spec(x={"type": "array"}),
        f"{SPEC}.properties[x].items: Required value: must be specified",
    ),
    (
        "int-or-string-with-bounds",
        spec(
            x={
                "x-kubernetes-int-or-string": True,
                "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": "^a$"}],
            }
        ),
        f"{SPEC}.properties[x].anyOf[0].type: Forbidden: must be empty to be structural",
    ),
    (
        "type-in-any-of",
        spec(x={"type": "string", "anyOf": [{"type": "string", "maxLength": 3}]}),
        f"{SPEC}.properties[x].anyOf[0].type: Forbidden: must be empty to be structural",
    ),
    (
        "description-in-all-of",
        spec(x={"type": "string", "allOf": [{"description": "d", "maxLength": 3}]}),
        f"{SPEC}.properties[x].allOf[0].description: Forbidden: must be empty to be structural",
    ),
    (
        "title-in-one-of",
        spec(x={"type": "string", "oneOf": [{"title": "t"}]}),
        f"{SPEC}.properties[x].oneOf[0].title: Forbidden: must be empty to be structural",
    ),
    (
        "default-in-one-of",
        spec(x={"type": "string", "oneOf": [{"default": "a"}]}),
        f"{SPEC}.properties[x].oneOf[0].default: Forbidden: must be undefined to be structural",
    ),
    (
        "nullable-in-not",
        spec(x={"type": "string", "not": {"nullable": True}}),
        f"{SPEC}.properties[x].not.nullable: Forbidden: must be false to be structural",
    ),
    (
        "int-or-string-in-any-of",
        spec(x={"type": "string", "anyOf": [{"x-kubernetes-int-or-string": True}]}),
        f"{SPEC}.properties[x].anyOf[0].x-kubernetes-int-or-string: Forbidden: must be false to be structural",
    ),
    (
        "preserve-in-all-of",
        spec(x={"type": "object", "allOf": [{"x-kubernetes-preserve-unknown-fields": True}]}),
        f"{SPEC}.properties[x].allOf[0].x-kubernetes-preserve-unknown-fields: Forbidden: must be false to be "
        "structural",
    ),
    (
        "list-type-in-any-of",
        spec(x={"type": "array", "items": {"type": "string"}, "anyOf": [{"x-kubernetes-list-type": "set"}]}),
        f"{SPEC}.properties[x].anyOf[0].x-kubernetes-list-type: Forbidden: must be undefined to be structural",
    ),
    (
        "cel-in-any-of",
        spec(x={"type": "string", "anyOf": [{"x-kubernetes-validations": [{"rule": "true"}]}]}),
        f"{SPEC}.properties[x].anyOf[0].x-kubernetes-validations: Forbidden: must be empty to be structural",
    ),
    (
        "additional-properties-in-any-of",
        spec(
            x={
                "type": "object",
                "additionalProperties": {"type": "string"},
                "anyOf": [{"additionalProperties": {"maxLength": 2}}],
            }
        ),
        f"{SPEC}.properties[x].anyOf[0].additionalProperties: Forbidden: must be undefined to be structural",
    ),
    (
        "metadata-in-nested-context",
        {
            "type": "object",
            "properties": {"metadata": {"type": "object"}},
            "anyOf": [{"properties": {"metadata": {"required": ["name"]}}}],
        },
        f"{ROOT}.anyOf[0].properties[metadata]: Forbidden: must not be specified in a nested context",
    ),
    (
        "junctor-property-not-in-structure",
        spec(x={"type": "object", "anyOf": [{"properties": {"y": {}}}]}),
        f"{SPEC}.properties[x].properties[y]: Required value: because it is defined in "
        f"{SPEC}.properties[x].anyOf[0].properties[y]",
    ),
    (
        "int-or-string-and-preserve",
        spec(x={**INT_OR_STRING, "x-kubernetes-preserve-unknown-fields": True}),
        f"{SPEC}.properties[x].x-kubernetes-preserve-unknown-fields: Invalid value: true: must be false if "
        "x-kubernetes-int-or-string is true",
    ),
    (
        "additional-properties-at-root",
        {"type": "object", "additionalProperties": {"type": "string"}},
        f"{ROOT}.additionalProperties: Forbidden: must not be used at the root",
    ),
    (
        "metadata-beyond-name",
        {
            "type": "object",
            "properties": {"metadata": {"type": "object", "properties": {"labels": {"type": "object"}}}},
        },
        f"{ROOT}.properties[metadata]: Forbidden: must not specify anything other than name and generateName, but "
        "metadata is implicitly specified",
    ),
    (
        "metadata-not-object",
        {"type": "object", "properties": {"metadata": {"type": "string"}}},
        f'{ROOT}.properties[metadata].type: Invalid value: "string": must be object',
    ),
    (
        "kind-not-string",
        {"type": "object", "properties": {"kind": {"type": "integer"}}},
        f'{ROOT}.properties[kind].type: Invalid value: "integer": must be string',
    ),
    (
        "embedded-not-object",
        spec(x={"type": "string", "x-kubernetes-embedded-resource": True}),
        f'{SPEC}.properties[x].type: Invalid value: "string": must be object if x-kubernetes-embedded-resource is true',
    ),
    (
        "embedded-without-properties",
        spec(x={"type": "object", "x-kubernetes-embedded-resource": True}),
        f"{SPEC}.properties[x].properties: Required value: must not be empty if x-kubernetes-embedded-resource is "
        "true without x-kubernetes-preserve-unknown-fields",
    ),
    (
        "bad-pattern",
        spec(x={"type": "string", "pattern": "a("}),
        f'{SPEC}.properties[x].pattern: Invalid value: "a(": must be a valid regular expression',
    ),
    (
        "ref",
        spec(x={"type": "object", "$ref": "#/definitions/x"}),
        f"{SPEC}.properties[x].$ref: Forbidden: $ref is not supported",
    ),
    (
        "type-null",
        spec(x={"type": "null"}),
        f"{SPEC}.properties[x].type: Forbidden: type cannot be set to null, use nullable as an alternative",
    ),
    (
        "unique-items",
        spec(x={"type": "array", "items": {"type": "string"}, "uniqueItems": True}),
        f"{SPEC}.properties[x].uniqueItems: Forbidden: uniqueItems cannot be set to true since the runtime "
        "complexity becomes quadratic",
    ),
    (
        "properties-and-additional-properties",
        spec(x={"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}}),
        f"{SPEC}.properties[x].additionalProperties: Forbidden: additionalProperties and properties are mutual "
        "exclusive",
    ),
    (
        "preserve-false",
        spec(x={"type": "object", "x-kubernetes-preserve-unknown-fields": False}),
        f"{SPEC}.properties[x].x-kubernetes-preserve-unknown-fields: Invalid value: false: must be true or undefined",
    ),
    (
        "list-type-on-string",
        spec(x={"type": "string", "x-kubernetes-list-type": "set"}),
        f'{SPEC}.properties[x].type: Invalid value: "string": must be array if x-kubernetes-list-type is specified',
    ),
    (
        "list-map-without-keys",
        spec(x={"type": "array", "items": {"type": "object"}, "x-kubernetes-list-type": "map"}),
        f"{SPEC}.properties[x].x-kubernetes-list-map-keys: Required value: must not be empty if "
        "x-kubernetes-list-type is map",
    ),
    (
        "default-in-metadata",
        {"type": "object", "properties": {"metadata": {"type": "object", "default": {"name": "x"}}}},
        f"{ROOT}.properties[metadata].default: Forbidden: must not be set in top-level metadata",
    ),
    (
        "nullable-root",
        {"type": "object", "nullable": True},
        f"{ROOT}.nullable: Forbidden: nullable cannot be true at the root",
    ),
]

ACCEPTED = [
    ("int-or-string-bare", spec(x=INT_OR_STRING)),
    (
        "int-or-string-all-of",
        spec(
            x={
                "x-kubernetes-int-or-string": True,
                "allOf": [{"anyOf": [{"type": "integer"}, {"type": "string"}]}, {"maxLength": 3}],
            }
        ),
    ),
    ("preserve-without-type", spec(x={"x-kubernetes-preserve-unknown-fields": True})),
    (
        "metadata-name-only",
        {
            "type": "object",
            "properties": {"metadata": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}}}},
        },
    ),
    (
        "junctor-on-known-property",
        spec(
            x={
                "type": "object",
                "properties": {"y": {"type": "string"}},
                "anyOf": [{"required": ["y"]}, {"properties": {"y": {"maxLength": 2}}}],
            }
        ),
    ),
]


@pytest.fixture(scope="module")
def server() -> Iterator[apiserver.ApiServer]:
    with apiserver.ApiServer() as started:
        yield started


@pytest.fixture(scope="module")
def extensions(server: apiserver.ApiServer) -> Iterator[kubernetes.client.ApiextensionsV1Api]:
    client = server.api_client()
    yield kubernetes.client.ApiextensionsV1Api(client)
    client.close()  # type: ignore[no-untyped-call]


def rejection(extensions: kubernetes.client.ApiextensionsV1Api, body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(kubernetes.client.ApiException) as caught:
        extensions.create_custom_resource_definition(body)
    assert caught.value.status == 422, caught.value.body
    answer: dict[str, Any] = json.loads(caught.value.body)
    return answer


@pytest.mark.parametrize(("case", "schema", "expected"), CASES, ids=[c[0] for c in CASES])
def test_non_structural_crd_is_refused_with_the_apiservers_words(
    extensions: kubernetes.client.ApiextensionsV1Api, case: str, schema: dict[str, Any], expected: str
) -> None:
    answer = rejection(extensions, crd(schema))
    assert answer["reason"] == "Invalid"
    assert answer["message"].startswith(
        'CustomResourceDefinition.apiextensions.k8s.io "things.example.com" is invalid: '
    )
    assert expected in answer["message"], answer["message"]
    assert any(expected.startswith(c["field"] + ": ") for c in answer["details"]["causes"])


@pytest.mark.parametrize(("case", "schema"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_structural_crd_is_accepted(
    server: apiserver.ApiServer, extensions: kubernetes.client.ApiextensionsV1Api, case: str, schema: dict[str, Any]
) -> None:
    created = extensions.create_custom_resource_definition(crd(schema))
    try:
        assert created.metadata.name == "things.example.com"
    finally:
        extensions.delete_custom_resource_definition("things.example.com")


def test_status_subresource_limits_the_root(extensions: kubernetes.client.ApiextensionsV1Api) -> None:
    schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    answer = rejection(extensions, crd(schema, status=True))
    assert f"{ROOT}: Invalid value" in answer["message"]
    assert "fields are allowed at the root of the schema if the status subresource is enabled" in answer["message"]


def test_update_is_checked_too(extensions: kubernetes.client.ApiextensionsV1Api) -> None:
    extensions.create_custom_resource_definition(crd(spec(x={"type": "string"})))
    try:
        current = extensions.read_custom_resource_definition("things.example.com").to_dict()
        body = crd(spec(x={"description": "untyped now"}))
        body["metadata"]["resourceVersion"] = current["metadata"]["resource_version"]
        with pytest.raises(kubernetes.client.ApiException) as caught:
            extensions.replace_custom_resource_definition("things.example.com", body)
        assert caught.value.status == 422
        assert "must not be empty for specified object fields" in json.loads(caught.value.body)["message"]
    finally:
        extensions.delete_custom_resource_definition("things.example.com")


def project_crds() -> list[dict[str, Any]]:
    files = sorted((REPO / "crds").glob("*.yaml")) + sorted(
        (REPO / "charts/agent-latency-operator/crds").glob("*.yaml")
    )
    return [doc for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


@pytest.mark.parametrize("document", project_crds(), ids=lambda d: d["metadata"]["name"])
def test_project_crds_are_structural(
    extensions: kubernetes.client.ApiextensionsV1Api, document: dict[str, Any]
) -> None:
    assert structural.check_crd(document) == []
    created = extensions.create_custom_resource_definition(copy.deepcopy(document))
    try:
        assert {c.type: c.status for c in created.status.conditions}["Established"] == "True"
    finally:
        extensions.delete_custom_resource_definition(document["metadata"]["name"])


def test_the_issue_16_crd_is_refused(extensions: kubernetes.client.ApiextensionsV1Api) -> None:
    """The project's old agentCpus schema (bounds inside the int-or-string anyOf), as kube-apiserver refused it."""
    old = spec(
        agentCpus={
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer", "minimum": 0, "maximum": 8191}, {"type": "string", "maxLength": 1024}],
        }
    )
    message = rejection(extensions, crd(old))["message"]
    assert f"{SPEC}.properties[agentCpus].anyOf[0].type: Forbidden: must be empty to be structural" in message
    assert f"{SPEC}.properties[agentCpus].anyOf[1].type: Forbidden: must be empty to be structural" in message
