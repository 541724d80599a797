"""Only secagg/primitives.py touches `cryptography`'s hazmat layer.

The rule: no module of the secagg package other than primitives.py imports anything under
`cryptography.hazmat` (`import cryptography.hazmat...`, `from cryptography.hazmat... import`,
`from cryptography import hazmat`, or an `importlib` call naming it). `cryptography.x509` (the
certificate layer: identity.py, trust.py, roster_sig.py parse and build certificates with it)
and `cryptography.exceptions` are not hazmat and stay allowed; the key types those modules
annotate with come from primitives (`SigningKey`, `VerifyingKey`, `X25519Key`). The PKI code of
coordinator/ and silo_agent/ (CA, enrolment, key files) is outside this rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import secagg

PACKAGE = Path(secagg.__file__).parent
GATEWAY = "primitives.py"


def _hazmat_imports(source: str) -> list[str]:
    """`line: what` for every import of the hazmat layer in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # importlib.import_module("cryptography.hazmat...") and the like
            names = [node.value] if node.value.startswith("cryptography.hazmat") else []
        hits = [
            n for n in names if n == "cryptography.hazmat" or n.startswith("cryptography.hazmat.")
        ]
        found += [f"{getattr(node, 'lineno', '?')}: {n}" for n in hits[:1]]
    return found


def test_only_primitives_imports_hazmat() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / GATEWAY in modules and len(modules) > 10  # the scan sees the package
    offenders = {
        str(path.relative_to(PACKAGE)): hits
        for path in modules
        if path.name != GATEWAY and (hits := _hazmat_imports(path.read_text(encoding="utf-8")))
    }
    assert not offenders, (
        "import cryptography.hazmat only in secagg/primitives.py (add a small function there): "
        f"{offenders}"
    )
    assert _hazmat_imports((PACKAGE / GATEWAY).read_text(encoding="utf-8"))  # the gateway does


def test_the_scan_finds_every_form_of_import() -> None:
    forms = [
        "import cryptography.hazmat.primitives.hashes",
        "from cryptography.hazmat.primitives.asymmetric import ec",
        "from cryptography import hazmat",
        "import importlib\nimportlib.import_module('cryptography.hazmat.primitives')",
        "def f() -> None:\n    from cryptography.hazmat.primitives import hashes",
    ]
    for source in forms:
        assert _hazmat_imports(source), source
    allowed = "from cryptography import x509\nfrom cryptography.exceptions import InvalidSignature"
    assert _hazmat_imports(allowed) == []
