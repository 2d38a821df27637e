"""The native module's `.pyi` describes the module as it is: the same classes with the same
bases, the same public attributes, and the same parameters for every method."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import fastmoe_load._fastmoe_load as native

STUB = Path(native.__file__).with_name("_fastmoe_load.pyi")


def stub_classes() -> dict[str, ast.ClassDef]:
    tree = ast.parse(STUB.read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def public(names) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def test_every_class_is_described_with_its_base():
    stubs = stub_classes()
    classes = {n for n in dir(native) if isinstance(getattr(native, n), type)}
    assert set(stubs) == classes
    for name, node in stubs.items():
        bases = [ast.unparse(b) for b in node.bases]
        real = getattr(native, name).__mro__[1].__name__
        assert bases == ([] if real == "object" else [real]), name


def test_attributes_and_parameters_match():
    for name, node in stub_classes().items():
        cls = getattr(native, name)
        if issubclass(cls, BaseException):
            continue
        functions = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
        assert public(functions) == public(dir(cls)), name
        for method, stub in functions.items():
            if method.startswith("_"):
                continue
            real = getattr(cls, method)
            if isinstance(real, property) or not callable(real):
                continue
            try:
                signature = inspect.signature(real)
            except (TypeError, ValueError):
                continue  # a slot wrapper without a text signature
            params = [a.arg for a in stub.args.posonlyargs + stub.args.args + stub.args.kwonlyargs]
            expected = [p for p in signature.parameters if p != "self"]
            assert params[1:] == expected, f"{name}.{method}"
    init = next(
        f for f in stub_classes()["Checkpoint"].body if getattr(f, "name", "") == "__init__"
    )
    stub_init = [a.arg for a in init.args.args[1:] + init.args.kwonlyargs]
    assert stub_init == list(inspect.signature(native.Checkpoint).parameters)
