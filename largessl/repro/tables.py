"""The paper tables ``largessl repro`` reproduces: variants, the paper's numbers, and the verdict rules.

Each :class:`Table` names its variants (config overrides on top of the shared small-scale recipe in
:mod:`largessl.repro.runner`), the paper's values for the columns we also measure, and a verdict function
that checks the paper's qualitative claim for every row with thresholds stated in :data:`THRESHOLDS`.
A verdict is computed from the measured numbers only; a row that does not reproduce is printed as such.

Small-scale substitutions (the same for every table, stated in the output): 1437 train / 360 held-out
handwritten digits at 16 px instead of CIFAR; a 3-conv backbone instead of ResNet-18; a few hundred steps
instead of 200–1000 epochs; weighted kNN (k=20) instead of a linear probe (seed 000 Fig. 4 also uses kNN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

THRESHOLDS: dict[str, float] = {
    "std_collapsed": 0.05,
    "std_healthy": 0.5,
    "corr_high": 0.3,
    "corr_low": 0.1,
    "m_o_collapsed": 0.9,
    "std_l2_collapsed": 0.2,
    "rankme_collapsed": 0.05,
}
"""Verdict thresholds.

- complete collapse (seed 000): ``std < std_collapsed`` (BN/DBN outputs have std 1 when healthy);
  no complete collapse: ``std > std_healthy``.
- dimensional collapse: ``corr > corr_high`` (paper: BN 0.99); decorrelated: ``corr < corr_low`` (DBN 0.00).
- SimSiam-family collapse (seed 004), measured on the output the loss compares (z; p for the symmetric
  predictor): *complete* when ``m_o > m_o_collapsed`` or ``std_l2·√D < std_l2_collapsed`` (l2-normalised
  outputs have std ≈ 1/√D when spread out, → 0 when collapsed; m_o → 1 when collapsed); *dimensional* when
  ``RankMe < rankme_collapsed·D`` (the outputs span a handful of directions, seed 000's second pattern).
  The projector's last BN (SimSiam's, no affine) keeps every dimension centred before the l2-normalisation,
  which slows the centre's growth: in a few hundred steps the collapsing variants reach the dimensional
  pattern first (RankMe 1.6-1.9 of 256 at 300 steps) while m_o is still ~0.8.
"""


@dataclass(frozen=True)
class Variant:
    """One row of a table."""

    key: str
    """Run-directory name."""
    name: str
    """Row label as the paper writes it."""
    overrides: tuple[str, ...]
    """Config overrides (``section.key=value``) of this variant."""
    paper: dict[str, str] = field(default_factory=dict)
    """The paper's values for this row, by column key (text as printed in the paper)."""


@dataclass(frozen=True)
class Check:
    """One condition of a row's claim and whether our numbers meet it."""

    text: str
    ok: bool


@dataclass(frozen=True)
class Verdict:
    """Whether a row's qualitative claim holds in our run, and the evidence."""

    claim: str
    checks: tuple[Check, ...]

    @property
    def reproduced(self) -> bool:
        """All checks hold."""
        return all(c.ok for c in self.checks)

    def explain(self) -> str:
        """The failed checks (or all of them when it reproduced)."""
        shown = [c for c in self.checks if not c.ok] or list(self.checks)
        return "; ".join(f"{c.text} [{'ok' if c.ok else 'FAILS'}]" for c in shown)


Rows = dict[str, dict[str, float]]
"""Measured metrics by variant key."""


@dataclass(frozen=True)
class Table:
    """A paper table (or figure) reproduced at small scale."""

    name: str
    title: str
    source: str
    base: tuple[str, ...]
    """Overrides shared by every variant of the table."""
    variants: tuple[Variant, ...]
    columns: tuple[tuple[str, str], ...]
    """(metric key, header) of the measured columns, in print order."""
    paper_columns: tuple[tuple[str, str], ...]
    """(paper key, header) of the paper's columns printed beside ours."""
    verdict: Callable[[Rows], dict[str, Verdict]]
    num_steps: int
    """Training steps per variant at the default length."""
    minutes: float
    """Default time budget of the whole table's training (split evenly over the variants)."""
    curves: tuple[str, ...] = ("loss", "collapse/std", "collapse/corr", "collapse/rankme")
    scatter: bool = False
    """Scatter-plot the 2-D projection space of every variant (seed 000 Fig. 2)."""
    notes: str = ""


def _std_ok(r: dict[str, float]) -> Check:
    return Check(f"std {r['std']:.2f} > {THRESHOLDS['std_healthy']}", r["std"] > THRESHOLDS["std_healthy"])


def _complete_collapse(r: dict[str, float]) -> Check:
    return Check(f"std {r['std']:.3f} < {THRESHOLDS['std_collapsed']}", r["std"] < THRESHOLDS["std_collapsed"])


def siam_collapse(r: dict[str, float]) -> str:
    """Seed 004's collapse of one row: ``"complete"`` (the centre dominates, m_o → 1, or l2-normalised
    outputs stop spreading, std → 0), ``"dimensional"`` (RankMe below ``rankme_collapsed``·D) or ``"no"``."""
    scaled = r["std_l2"] * r["dim"] ** 0.5
    if r["m_o"] > THRESHOLDS["m_o_collapsed"] or scaled < THRESHOLDS["std_l2_collapsed"]:
        return "complete"
    if r["rankme"] < THRESHOLDS["rankme_collapsed"] * r["dim"]:
        return "dimensional"
    return "no"


def siam_collapsed(r: dict[str, float]) -> bool:
    """Whether the row collapsed in either pattern (:func:`siam_collapse`)."""
    return siam_collapse(r) != "no"


def _siam_check(r: dict[str, float], collapsed: bool) -> Check:
    scaled = r["std_l2"] * r["dim"] ** 0.5
    kind = siam_collapse(r)
    state = "not collapsed" if kind == "no" else f"{kind} collapse"
    return Check(f"{state} (m_o {r['m_o']:.2f}, std·√D {scaled:.2f}, RankMe {r['rankme']:.1f} of D={r['dim']:.0f})",
                 (kind != "no") == collapsed)


def _verdict_t1(rows: Rows) -> dict[str, Verdict]:
    v, b, d = rows["vanilla"], rows["bn"], rows["dbn"]
    return {
        "vanilla": Verdict("complete collapse (std → 0)", (_complete_collapse(v),)),
        "bn": Verdict("dimensional collapse (std ≈ 1, corr high)", (
            _std_ok(b), Check(f"corr {b['corr']:.2f} > {THRESHOLDS['corr_high']}", b["corr"] > THRESHOLDS["corr_high"]))),
        "dbn": Verdict("no collapse, corr ≈ 0, best accuracy", (
            _std_ok(d), Check(f"corr {d['corr']:.2f} < {THRESHOLDS['corr_low']}", d["corr"] < THRESHOLDS["corr_low"]),
            Check(f"kNN {d['knn']:.1f} > BN {b['knn']:.1f} and vanilla {v['knn']:.1f}",
                  d["knn"] > max(b["knn"], v["knn"])))),
    }


def _verdict_fig2(rows: Rows) -> dict[str, Verdict]:
    v, b, d = rows["vanilla"], rows["bn"], rows["dbn"]
    return {
        "vanilla": Verdict("collapses to a point (std → 0)", (_complete_collapse(v),)),
        "bn": Verdict("collapses to a line (std ≈ 1, |corr| → 1)", (
            _std_ok(b), Check(f"corr {b['corr']:.2f} > 0.9", b["corr"] > 0.9))),
        "dbn": Verdict("spreads over the plane (corr ≈ 0), best accuracy", (
            _std_ok(d), Check(f"corr {d['corr']:.2f} < {THRESHOLDS['corr_low']}", d["corr"] < THRESHOLDS["corr_low"]),
            Check(f"kNN {d['knn']:.1f} > BN {b['knn']:.1f} > vanilla {v['knn']:.1f}",
                  d["knn"] > b["knn"] > v["knn"]))),
    }


def _verdict_t2(rows: Rows) -> dict[str, Verdict]:
    e0, e1, af = rows["eps0"], rows["eps0.1"], rows["affine"]
    out = {"eps0": Verdict("variance standardised (std ≈ 1), best accuracy", (
        _std_ok(e0), Check(f"kNN {e0['knn']:.1f} > eps 0.1 {e1['knn']:.1f} and affine {af['knn']:.1f}",
                           e0["knn"] > max(e1["knn"], af["knn"]))))}
    for key, label in (("eps0.1", "eps 0.1"), ("affine", "affine")):
        r = rows[key]
        out[key] = Verdict(f"{label} compromises standardisation and degrades accuracy", (
            Check(f"std {r['std']:.2f} < eps-0 std {e0['std']:.2f} − 0.1", r["std"] < e0["std"] - 0.1),
            Check(f"kNN {r['knn']:.1f} < eps-0 kNN {e0['knn']:.1f}", r["knn"] < e0["knn"])))
    return out


def _verdict_fig4(rows: Rows) -> dict[str, Verdict]:
    d, s = rows["dbn"], rows["shuffled_dbn"]
    return {
        "dbn": Verdict("no complete collapse (std ≈ 1)", (_std_ok(d),)),
        "shuffled_dbn": Verdict("lower corr, higher rank, higher kNN than DBN", (
            Check(f"corr {s['corr']:.3f} < DBN {d['corr']:.3f}", s["corr"] < d["corr"]),
            Check(f"RankMe {s['rankme']:.1f} > DBN {d['rankme']:.1f}", s["rankme"] > d["rankme"]),
            Check(f"kNN {s['knn']:.1f} ≥ DBN {d['knn']:.1f}", s["knn"] >= d["knn"]))),
    }


def _verdict_004_t2(rows: Rows) -> dict[str, Verdict]:
    out = {"simsiam": Verdict("avoids collapse", (_siam_check(rows["simsiam"], False),))}
    for key in ("mirror", "naive", "symmetric"):
        out[key] = Verdict("collapses", (_siam_check(rows[key], True),))
    return out


def _verdict_004_t5(rows: Rows) -> dict[str, Verdict]:
    bias = rows["bias"]
    out = {}
    for key, r in rows.items():
        checks = [_siam_check(r, False)]
        if key == "bias":
            worst = min(v["knn"] for k, v in rows.items() if k != "bias")
            checks.append(Check(f"kNN {bias['knn']:.1f} < every other predictor (min {worst:.1f})", bias["knn"] < worst))
        out[key] = Verdict("avoids collapse" + (", worst accuracy" if key == "bias" else ""), tuple(checks))
    return out


_SEED000 = ("method.name=decorrelation", "data.augment=decorrelation", "train.global_batch_size=128",
            "optim.name=sgd", "optim.base_lr=0.06", "optim.bias_norm_lr=0", "optim.weight_decay=0.001",
            "optim.warmup_epochs=2", "optim.final_lr_ratio=0.0")
_SEED004 = ("method.name=simsiam", "data.augment=simsiam", "train.global_batch_size=128",
            "method.projector=256-256-256", "method.predictor_hidden=64", "optim.name=sgd", "optim.base_lr=0.5",
            "optim.bias_norm_lr=0", "optim.weight_decay=0.0005", "optim.warmup_epochs=0",
            "optim.fixed_predictor_lr=true", "optim.final_lr_ratio=0.0")
_COLS_000 = (("knn", "kNN%"), ("std", "std"), ("corr", "corr"), ("loss", "loss"))
_COLS_004 = (("collapse", "collapse"), ("std_l2", "std"), ("m_o", "m_o"), ("m_r", "m_r"), ("corr", "corr"),
             ("rankme", "RankMe"), ("knn", "kNN%"))

TABLES: dict[str, Table] = {}


def _add(t: Table) -> None:
    if t.name in TABLES:
        raise ValueError(f"repro table {t.name!r} is defined twice")
    TABLES[t.name] = t


_add(Table(
    name="000-table1", title="vanilla / BN / DBN at the projector output (64-d, DBN G = D)",
    source="seed 000 (Hua et al., On Feature Decorrelation in SSL, ICCV 2021), Table 1",
    base=(*_SEED000, "method.projector=64-64"),
    variants=(
        Variant("vanilla", "vanilla", ("method.head=none",),
                {"acc": "35.44", "std": "0.00", "corr": "0.13", "loss": "0.00"}),
        Variant("bn", "BN", ("method.head=bn", "method.bn_eps=0", "method.bn_affine=false"),
                {"acc": "70.85", "std": "1.00", "corr": "0.99", "loss": "7.01"}),
        Variant("dbn", "DBN", ("method.head=dbn", "method.group_size=64"),
                {"acc": "84.41", "std": "1.00", "corr": "0.00", "loss": "39.04"}),
    ),
    columns=_COLS_000,
    paper_columns=(("acc", "acc%"), ("std", "std"), ("corr", "corr"), ("loss", "loss")),
    verdict=_verdict_t1, num_steps=200, minutes=7.5,
    notes="paper: CIFAR-10, ResNet-18, linear-probe accuracy; projector 2-layer MLP 128-128 with DBN group size "
          "128 = D. Here 64-64 with G = 64 = D, so that whole-space whitening fits batch 128 (B - 1 >= G).",
))
_add(Table(
    name="000-table2", title="BN at the projector output: eps 0 / eps 0.1 / learnable affine",
    source="seed 000, Table 2 (§3.4.2)",
    base=(*_SEED000, "method.projector=128-128", "method.head=bn"),
    variants=(
        Variant("eps0", "eps 0, no affine", ("method.bn_eps=0", "method.bn_affine=false"), {"acc": "70.85"}),
        Variant("eps0.1", "eps 0.1, no affine", ("method.bn_eps=0.1", "method.bn_affine=false"), {"acc": "34.47"}),
        Variant("affine", "eps 0, affine", ("method.bn_eps=0", "method.bn_affine=true"), {"acc": "10.00"}),
    ),
    columns=_COLS_000, paper_columns=(("acc", "acc%"),),
    verdict=_verdict_t2, num_steps=200, minutes=7.5,
    notes="paper: CIFAR-10 linear-probe accuracy only (no std/corr/loss columns).",
))
_add(Table(
    name="000-fig4", title="DBN vs Shuffled-DBN at equal group size (G = 64, 256-d projection)",
    source="seed 000, Figure 4 (§3.3)",
    base=(*_SEED000, "method.projector=256-256-256", "method.group_size=64"),
    variants=(
        Variant("dbn", "DBN (w/o shuffle)", ("method.head=dbn",),
                {"corr": "higher", "rank": "lower", "acc": "lower"}),
        Variant("shuffled_dbn", "Shuffled-DBN (w shuffle)", ("method.head=shuffled_dbn",),
                {"corr": "lower", "rank": "higher", "acc": "higher"}),
    ),
    columns=(("knn", "kNN%"), ("std", "std"), ("corr", "corr"), ("rank", "rank"), ("rankme", "RankMe"),
             ("loss", "loss")),
    paper_columns=(("corr", "corr"), ("rank", "rank"), ("acc", "kNN")),
    verdict=_verdict_fig4, num_steps=200, minutes=7.5,
    notes="paper: a figure (curves, no table values): Shuffled-DBN has lower corr, higher rank, higher kNN "
          "accuracy; projector 512-1024-512. We compare the orderings; 'rank' is RankMe (the numerical "
          "rank of whitened outputs is full for both).",
))
_add(Table(
    name="000-fig2", title="2-D projection space: vanilla / BN / DBN (G = 2), as in Figure 2",
    source="seed 000, Figure 2 and §3.2",
    base=(*_SEED000, "method.projector=64-64-2"),
    variants=(
        Variant("vanilla", "vanilla", ("method.head=none",), {"acc": "28.56", "shape": "a point"}),
        Variant("bn", "BN", ("method.head=bn", "method.bn_eps=0", "method.bn_affine=false"),
                {"acc": "69.52", "shape": "a line"}),
        Variant("dbn", "DBN (G=2)", ("method.head=dbn", "method.group_size=2"), {"acc": "72.45", "shape": "a plane"}),
    ),
    columns=_COLS_000, paper_columns=(("acc", "acc%"), ("shape", "shape")),
    verdict=_verdict_fig2, num_steps=200, minutes=7.5, scatter=True,
    notes="paper: CIFAR-10 linear-probe accuracy; projector 64-64-2.",
))
_add(Table(
    name="004-table2", title="Siamese architectures: SimSiam / Mirror SimSiam / Naive Siamese / Symmetric predictor",
    source="seed 004 (Zhang et al., How does SimSiam avoid collapse..., ICLR 2022), Table 2",
    base=_SEED004,
    variants=(
        Variant("simsiam", "SimSiam", ("method.variant=simsiam",), {"collapse": "no", "acc": "66.62"}),
        Variant("mirror", "Mirror SimSiam", ("method.variant=mirror",), {"collapse": "yes", "acc": "1"}),
        Variant("naive", "Naive Siamese", ("method.variant=naive",), {"collapse": "yes", "acc": "1"}),
        Variant("symmetric", "Symmetric predictor", ("method.variant=symmetric",), {"collapse": "yes", "acc": "1"}),
    ),
    columns=_COLS_004, paper_columns=(("collapse", "collapse"), ("acc", "acc%")),
    verdict=_verdict_004_t2, num_steps=300, minutes=7.5,
    curves=("loss", "collapse/std_l2", "collapse/m_o", "collapse/corr", "collapse/rankme"),
    notes="paper: CIFAR-100 linear-probe accuracy (1% = chance); std, m_o, m_r are not in the paper's table. "
          "Projector 256-256-256 with the paper's depth (App. A.1: FC-BN-ReLU x2, FC-BN; 2048 wide there).",
))
_add(Table(
    name="004-table5", title="Simplified SimSiam predictors: MLP / FC+FC+bias / Tanh(FC) / bias",
    source="seed 004, Table 5 (§4)",
    base=(*_SEED004, "method.variant=simsiam"),
    variants=(
        Variant("mlp", "MLP", ("method.predictor=mlp",), {"collapse": "no", "acc": "66.9"}),
        Variant("fc_fc_bias", "FC+FC+Bias", ("method.predictor=fc_fc_bias",), {"collapse": "no", "acc": "66.7"}),
        Variant("tanh_fc", "Tanh(FC)", ("method.predictor=tanh_fc",), {"collapse": "no", "acc": "64.82"}),
        Variant("bias", "Bias", ("method.predictor=bias",), {"collapse": "no", "acc": "49.82"}),
    ),
    columns=_COLS_004, paper_columns=(("collapse", "collapse"), ("acc", "acc%")),
    verdict=_verdict_004_t5, num_steps=200, minutes=7.5,
    curves=("loss", "collapse/std_l2", "collapse/m_o", "collapse/corr", "collapse/rankme"),
    notes="paper: CIFAR-100 linear-probe accuracy; the simplified predictors l2-normalise the encoder output. "
          "Projector 256-256-256 (the paper's depth, 2048 wide there).",
))


def get_table(name: str) -> Table:
    """The table called ``name``; an unknown name raises listing the valid ones."""
    if name not in TABLES:
        raise ValueError(f"unknown repro table {name!r}; available: {', '.join(TABLES)} (see largessl repro --list)")
    return TABLES[name]
