"""The celpy environment that evaluates the CRDs' ``x-kubernetes-validations`` rules, its parser loaded
from the per-user cache.

celpy builds its LALR parser from its grammar at every start: ~90 ms, a fifth of ``agentlat plan``;
loading it with lark's own ``Lark.save``/``Lark.load`` takes ~6 ms. The file is keyed on celpy's
grammar and parser module (which hold every option celpy gives lark), lark's version and Python's, so
a parser is only ever loaded into the code that built it. It is a pickle: ``model.cache`` reads only
files that no other user could have written, the same trust Python gives its own ``.pyc`` files.
"""

from __future__ import annotations

import hashlib
import io
import pathlib
import sys

import celpy
import lark
from celpy import celparser

from agentlat.operator.model import cache


def environment() -> celpy.Environment:
    if celparser.CELParser.CEL_PARSER is None:
        celparser.CELParser.CEL_PARSER = cached_parser()
    return celpy.Environment()


def cached_parser() -> lark.Lark:
    name = cache_name()
    parser = load(cache.read(name))
    if parser is None:
        parser = build()
        cache.write(name, dump(parser))
    return parser


def build() -> lark.Lark:
    """The parser as celpy builds it from its grammar (it keeps it in a class attribute)."""
    celparser.CELParser.CEL_PARSER = None
    celparser.CELParser(tree_class=celpy.InterpretedRunner.tree_node_class)
    parser = celparser.CELParser.CEL_PARSER
    if parser is None:
        raise RuntimeError("celpy built no parser")
    return parser


def cache_name() -> str:
    module = pathlib.Path(celparser.__file__)
    key = hashlib.sha256()
    for part in ((module.parent / "cel.lark").read_bytes(), module.read_bytes(), lark.__version__.encode(),
                 sys.version.encode()):
        key.update(part + b"\0")
    return f"cel-parser-{key.hexdigest()[:16]}.pickle"


def dump(parser: lark.Lark) -> bytes:
    stream = io.BytesIO()
    parser.save(stream)
    return stream.getvalue()


def load(blob: bytes | None) -> lark.Lark | None:
    if blob is None:
        return None
    try:
        return lark.Lark.load(io.BytesIO(blob))
    except Exception:  # a damaged file (unpickling and lark raise many kinds): build the parser instead
        return None
