"""A static guard: no host-made tensor may flow into a collective.

Why this test exists: NCCL has no CPU backend. A ``torch.tensor([...])`` (or zeros/ones/empty/full) made
without ``device=`` lives on the CPU; handed to ``all_reduce`` on a CUDA job's NCCL group it raises "No
backend type associated with device type cpu" at the first step. Every CPU test passes anyway, because
gloo serves CPU tensors. The first multi-GPU version of largessl shipped three such call sites (the stop
flag's agreement, the trainer's log counters, the linear probe's sums) and CI could not see any of them.

This test walks the package's source (AST) and fails when, inside one function, a tensor made by a
device-less factory call reaches a collective's arguments: directly, or through names assigned from it
(``flags = torch.tensor(...)`` → ``flags2 = flags.double()`` → ``all_reduce(flags2)``). A ``.to(...)``
or ``.cuda()`` on the way clears the taint. It is a lint, so it is deliberately simple: it follows names
within one function body, in source order, and does not follow calls into other functions.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "largessl"

FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "as_tensor", "arange", "randn", "rand", "randint",
             "randperm", "eye", "linspace", "logspace", "empty_strided", "from_numpy", "frombuffer"}
"""``torch.<name>(...)`` calls that make a tensor on the CPU unless ``device=`` is given."""
ALWAYS_HOST = {"from_numpy", "frombuffer"}
"""Factories that have no ``device=``: their tensor is on the CPU whatever the call says."""

TORCH_COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
}
"""torch.distributed's tensor collectives."""
COLLECTIVES_MODULE = PACKAGE / "distributed" / "collectives.py"


def _call_name(node: ast.Call) -> str:
    f = node.func
    if isinstance(f, ast.Attribute):
        return f.attr
    if isinstance(f, ast.Name):
        return f.id
    return ""


def collective_wrappers(path: Path = COLLECTIVES_MODULE) -> set[str]:
    """Every function of the collectives module that reaches a tensor collective, directly or through another
    of its functions (a fixpoint over the module's call graph): a new wrapper is covered without a list to edit."""
    tree = ast.parse(path.read_text())

    def called(node: ast.AST) -> set[str]:
        out = set()
        for c in ast.walk(node):
            if isinstance(c, ast.Call):
                out.add(_call_name(c))
                f = c.func  # ``_AllGather.apply(...)`` calls the autograd Function class
                if isinstance(f, ast.Attribute) and f.attr == "apply" and isinstance(f.value, ast.Name):
                    out.add(f.value.id)
        return out

    calls = {n.name: called(n) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    found: set[str] = set()
    while True:
        more = {name for name, c in calls.items() if c & (TORCH_COLLECTIVES | found)} - found
        if not more:
            return found - classes
        found |= more


COLLECTIVES = TORCH_COLLECTIVES | collective_wrappers()
"""Calls whose tensor arguments must be on the training device: torch's collectives and every wrapper of them
in largessl.distributed.collectives (the only place the package may call torch.distributed from)."""
MOVES = {"to", "cuda"}
"""Method calls that put a tensor where the caller says (assumed to be the training device)."""


def _is_hostless_factory(node: ast.AST) -> bool:
    """``torch.tensor(...)``-style call without a ``device=`` keyword."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return False
    base = node.func.value
    if not (isinstance(base, ast.Name) and base.id == "torch" and node.func.attr in FACTORIES):
        return False
    return node.func.attr in ALWAYS_HOST or not any(k.arg == "device" for k in node.keywords)


def _tainted(expr: ast.AST, names: set[str]) -> bool:
    """True when ``expr`` is a device-less factory call or uses a tainted name, and is not moved by .to()/.cuda()."""
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr in MOVES:
        return False
    for node in ast.walk(expr):
        if _is_hostless_factory(node):
            return True
        if isinstance(node, ast.Name) and node.id in names:
            return True
    return False


def _targets(target: ast.AST) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for t in target.elts for n in _targets(t)]
    return []


class _FunctionScan(ast.NodeVisitor):
    """Source-order scan of one function body: assignments update the tainted names, collectives are checked."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.names: set[str] = set()
        self.findings: list[str] = []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:  # nested functions get their own scan
        return None

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        hot = _tainted(node.value, self.names)
        for t in node.targets:
            for name in _targets(t):
                (self.names.add if hot else self.names.discard)(name)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
            for name in _targets(node.target):
                (self.names.add if _tainted(node.value, self.names) else self.names.discard)(name)

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        name = _call_name(node)
        if name not in COLLECTIVES:
            return
        args = [*node.args, *(k.value for k in node.keywords if k.arg not in ("group", "op", "src", "dst"))]
        if any(_tainted(a, self.names) for a in args):
            self.findings.append(f"{self.where}:{node.lineno}: a tensor made without device= reaches {name}()")


def scan_source(source: str, filename: str = "<source>") -> list[str]:
    """Findings (``file:function:line: ...``) for every function of ``source``."""
    tree = ast.parse(source, filename)
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scan = _FunctionScan(f"{filename}:{node.name}")
            for stmt in node.body:
                scan.visit(stmt)
            out += scan.findings
    return out


def scan_package(root: Path = PACKAGE) -> list[str]:
    """Findings over every module of the package."""
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        out += scan_source(path.read_text(), str(path.relative_to(root.parent)))
    return out


# ------------------------------------------------------------------------------------------------------
# The cases it must catch and the ones it must let through


def test_guard_catches_the_bug_that_crashed_the_first_gpu_run():
    # StopFlag.agreed as it was: CPU flags all-reduced on the training group.
    planted = textwrap.dedent("""
        def agreed(self):
            flags = torch.tensor([1.0 if self.local else 0.0, 0.0])
            all_reduce_sum_no_grad(flags, self.group)
            return bool(flags[0] > 0)
    """)
    findings = scan_source(planted, "planted.py")
    assert len(findings) == 1 and "planted.py:agreed:4" in findings[0] and "all_reduce_sum_no_grad" in findings[0]


def test_guard_follows_names_and_direct_calls():
    planted = textwrap.dedent("""
        def record(self, steps, group):
            counters = torch.tensor([steps, 1.0], dtype=torch.float64)
            both = torch.cat([counters, self.extra])
            dist.all_reduce(both, group=group)
            dist.all_reduce(torch.zeros(3), group=group)
            n = torch.full((1,), 4.0)
            out = all_gather_no_grad(n.double(), group)
    """)
    lines = sorted(int(f.split(":")[2]) for f in scan_source(planted, "p.py"))
    assert lines == [5, 6, 8]


def test_guard_lets_device_tensors_through():
    fine = textwrap.dedent("""
        def record(self, steps, group, device):
            counters = torch.tensor([steps, 1.0], dtype=torch.float64, device=device)
            dist.all_reduce(counters, group=group)
            host = torch.tensor([1.0, 2.0])
            moved = host.to(device)
            all_reduce_sum_no_grad(moved, group)
            host = x.new_zeros(3)  # re-assigned from a device-following factory: no longer tainted
            all_reduce_sum(host, group)
            n = torch.tensor([x.shape[0]], device=x.device)
            all_gather_no_grad(n, group)
    """)
    assert scan_source(fine, "fine.py") == []


def test_package_hands_no_host_tensor_to_a_collective():
    findings = scan_package()
    assert not findings, "tensors made without device= reach collectives (NCCL has no CPU backend):\n" + \
        "\n".join(findings)


def test_every_collective_wrapper_of_the_collectives_module_is_guarded():
    wrappers = collective_wrappers()
    assert {"broadcast_tensor", "all_gather_variable", "all_reduce_sum", "all_reduce_sum_no_grad",
            "all_gather_with_grad", "all_gather_no_grad", "global_gram", "global_count",
            "all_gather_counts"} <= wrappers, wrappers
    assert "get_rank" not in wrappers and "barrier" not in wrappers  # no tensor argument to check


@pytest.mark.parametrize("wrapper", sorted(collective_wrappers()))
def test_guard_catches_a_host_tensor_in_each_wrapper(wrapper):
    planted = f"def f(group):\n    x = torch.zeros(4)\n    {wrapper}(x, group)\n"
    findings = scan_source(planted, "p.py")
    assert len(findings) == 1 and wrapper in findings[0], findings


@pytest.mark.parametrize("factory", ["from_numpy(a)", "randn(3)", "randint(0, 5, (3,))", "eye(3)",
                                     "linspace(0, 1, 5)", "rand(2)", "randperm(4)", "frombuffer(b, dtype=u8)"])
def test_guard_catches_each_factory(factory):
    planted = f"def f(group):\n    x = torch.{factory}\n    broadcast_tensor(x, 0, group)\n"
    assert len(scan_source(planted, "p.py")) == 1
    moved = f"def f(group, d):\n    x = torch.{factory}.to(d)\n    broadcast_tensor(x, 0, group)\n"
    assert scan_source(moved, "p.py") == []


def test_from_numpy_is_on_the_host_whatever_the_call_says():
    # from_numpy has no device=: a keyword would be a TypeError, but the guard must not take it as a move
    planted = "def f(group, d):\n    x = torch.from_numpy(a, device=d)\n    all_gather_variable(x, group)\n"
    assert len(scan_source(planted, "p.py")) == 1
