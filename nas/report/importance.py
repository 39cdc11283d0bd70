"""How much each design decision explains the proxy signal, over the trained designs.

The decisions are read from each design's :class:`~nas.config.ArchConfig` (:func:`decisions`), not
from the space's knobs, so baselines count and every decision is defined for every design. The
estimate is Optuna's: fANOVA, else PED-ANOVA (which needs no scikit-learn).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import optuna

from nas.config import FAMILIES, KINDS, ArchConfig, Tiling
from nas.report.analysis import Signal
from nas.trials import TrialRecord

MIN_TRIALS_FOR_IMPORTANCE = 5


def decisions(arch: ArchConfig) -> dict[str, int | str]:
    """The design decisions of ``arch``, each defined for every design (so none is conditional)."""
    enc, sh = arch.encoder, arch.sharing
    blocks = arch.block_map()
    n_blocks = len(set(blocks))
    out: dict[str, int | str] = {
        "frontend.channels": arch.frontend.channels, "frontend.subsampling": arch.frontend.subsampling,
        "vocab_size": arch.vocab_size, "encoder.rel_pos_buckets": enc.rel_pos_buckets,
        "encoder.d_model": enc.d_model, "encoder.ffn_dim": enc.ffn_dim, "encoder.n_heads": enc.n_heads,
        "encoder.conv_kernel": enc.conv_kernel, "virtual layers": enc.n_layers, "stored blocks": n_blocks,
        "block pattern": "none" if n_blocks == len(blocks) else
        sh.blocks.pattern if isinstance(sh.blocks, Tiling) else "explicit",
    }
    for kind in KINDS:
        out[f"{kind} modules"] = arch.n_instances(kind)
    for name, tied in sh.ties:
        out[f"ties.{name}"] = "yes" if tied else "no"
    for fam in FAMILIES:
        lr = getattr(sh.low_rank, fam)
        out[f"low_rank.{fam}.rank"] = lr.rank or 0
        out[f"low_rank.{fam}.share"] = lr.share
        out[f"low_rank.{fam}.groups"] = lr.groups
    out["per_layer_cheap"] = "yes" if sh.per_layer_cheap else "no"
    return out


def param_importances(complete: list[TrialRecord], signal: str) -> tuple[dict[str, float], str, list[str]]:
    """Importance of each varying decision for ``signal`` over the ``complete`` designs.

    Returns the importances (largest first), the evaluator's name and notes on evaluators that
    could not run (each: why).
    """
    from optuna.distributions import CategoricalDistribution, IntDistribution
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    rows = [decisions(r.arch) for r in complete]
    dists = {}
    for name in rows[0]:
        values = sorted({row[name] for row in rows})
        if len(values) < 2:
            continue
        dists[name] = (IntDistribution(values[0], values[-1]) if isinstance(values[0], int)
                       else CategoricalDistribution(values))
    if not dists:
        return {}, "", ["no design decision varied between the trained designs"]
    view = optuna.create_study()  # in memory: the decisions as params, the signal as the value
    view.add_trials([optuna.trial.create_trial(params={n: row[n] for n in dists}, distributions=dists,
                                               value=r.values[signal]) for row, r in zip(rows, complete)])
    quantile = min(0.5, max(0.1, 3 / len(complete)))  # keep a few designs in PED-ANOVA's top group
    notes = []
    for name, evaluator in (("fANOVA", lambda: FanovaImportanceEvaluator(seed=0)),
                            ("PED-ANOVA", lambda: PedAnovaImportanceEvaluator(target_quantile=quantile))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return dict(optuna.importance.get_param_importances(view, evaluator=evaluator())), name, notes
        except Exception as exc:  # noqa: BLE001 - e.g. fANOVA without scikit-learn; try the next one
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "sklearn" in reason:
                reason = "it needs scikit-learn, which is not installed"
            notes.append(f"{name} could not run ({reason if len(reason) <= 120 else reason[:119] + '…'}).")
    return {}, "", notes


@dataclass
class Importance:
    """The importance of each decision (largest first), or why it was not estimated: too few
    trained designs, all with the same signal value (``same_value``), or no evaluator ran
    (``notes``)."""

    signal: Signal
    n: int  # trained designs
    importances: dict[str, float] = field(default_factory=dict)
    evaluator: str = ""
    notes: list[str] = field(default_factory=list)
    same_value: float | None = None

    @property
    def too_few(self) -> bool:
        return self.n < MIN_TRIALS_FOR_IMPORTANCE


def importance(recs: list[TrialRecord], signal: Signal) -> Importance:
    complete = [r for r in recs if r.state == "complete"]
    out = Importance(signal, len(complete))
    if out.too_few:
        return out
    if len({r.values[signal.name] for r in complete}) == 1:
        out.same_value = complete[0].values[signal.name]
        return out
    out.importances, out.evaluator, out.notes = param_importances(complete, signal.name)
    return out
