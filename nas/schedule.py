"""Training schedules: named recipes in ``nas/schedules/*.yaml``, or a user's YAML file.

A schedule says how a design is trained (steps, batch size, learning rate curve, regularization,
tokens, evaluation) and nothing about the design itself. ``proxy`` ranks designs during a search,
``full`` retrains a chosen one, ``demo`` is the main job's shorter retrain and ``tiny`` is for tests;
each file's header says what it reaches and in how long.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nas.config import Frozen, user_error
from nas.errors import UserError
from nas.files import read_yaml

SCHEDULES = Path(__file__).with_name("schedules")


class _Augment(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    freq_masks: int = Field(2, ge=0)
    freq_width: int = Field(15, ge=0)
    time_masks: int = Field(2, ge=0)
    time_width_ratio: float = Field(0.05, ge=0, le=1)


class Schedule(Frozen):
    """A named training recipe, read from ``nas/schedules/<name>.yaml`` or a user's YAML file.

    ``batch_frames`` counts padded 10 ms log-mel frames per batch. The learning rate warms up
    linearly for ``warmup_steps``, then decays along a cosine to ``final_lr_ratio`` of its peak.
    SpecAugment's masks apply from step ``specaugment_from`` on (early masks slow the first
    learning; late ones keep a small model from overfitting). ``sort_first_steps`` steps take their
    batches shortest first (SortaGrad, Amodei et al. 2016),
    the rest in a shuffled order. With ``ema`` (a decay such as 0.995) the weights evaluated and
    saved are an exponential moving average of the trained ones. ``branch_init_gain`` scales the
    initial output matrix of every residual branch against ``nn.Linear``'s (:mod:`nas.model.build`);
    ``blank_bias`` is added to the output layer's initial blank bias (CTC emits blank on most
    frames: starting nearer there shortens the first plateau, where the model emits nothing).
    With ``inter_ctc`` at a weight ``w > 0`` the loss is ``(1 - w)`` times the CTC loss plus ``w``
    times the CTC loss of the middle virtual layer's output through the same head (InterCTC, Lee
    and Watanabe 2021: no parameter is added, and the exported model is the same); a run's
    ``train_loss`` is then that mix. With ``muon_lr > 0`` the encoder's linear maps learn with Muon
    at that peak rate (scaled to AdamW's update size), the other tensors with AdamW at ``peak_lr``
    (:mod:`nas.optim`).
    A tensor that serves ``k`` places of the encoder (shared by layers, or tied) learns at the
    learning rate divided by ``k ** shared_lr_exponent`` (:func:`nas.train._param_groups`).
    ``eval_every`` steps the dev set (its first ``eval_utterances``)
    is decoded greedily. ``decode`` says how the final evaluation decodes: ``greedy``, or ``beam``
    (beam search with a lexicon and a word ``lm_order``-gram LM built from the training
    transcripts, its LM weight tuned on dev; the greedy figures are reported beside it).
    ``data`` is the corpus ``nas train`` trains on with this schedule when its ``--data`` is not
    given (``full`` names 30 h of the embedded corpus); a search, a retrain and a benchmark train on
    the corpus they are given. It is not part of the schedule's serialization, so not of a run's
    key: a run records its corpus itself (``metrics.json``'s ``data``).
    """

    name: str
    steps: int = Field(gt=0)
    batch_frames: int = Field(gt=0)
    peak_lr: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    final_lr_ratio: float = Field(ge=0, le=1)
    weight_decay: float = Field(ge=0)
    grad_clip: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    specaugment: _Augment = _Augment()
    specaugment_from: int = Field(0, ge=0)
    sort_first_steps: int = Field(0, ge=0)
    ema: float = Field(0.0, ge=0, lt=1)
    branch_init_gain: float = Field(0.1, gt=0, le=1)
    blank_bias: float = Field(0.0, ge=0)
    inter_ctc: float = Field(0.0, ge=0, lt=1)
    muon_lr: float = Field(0.0, ge=0)
    shared_lr_exponent: float = Field(1.0, ge=0, le=1)
    eval_every: int = Field(gt=0)
    eval_utterances: int | None = Field(None, gt=0)
    tokenizer: Literal["char", "unigram", "bpe"] = "char"
    decode: Literal["greedy", "beam"] = "greedy"
    lm_order: int = Field(3, ge=1, le=6)
    seed: int = 0
    data: str | None = Field(None, exclude=True)
    # not serialized at their default, so every run trained before they came keeps its key
    _added_later: ClassVar[tuple[str, ...]] = ("blank_bias", "inter_ctc", "muon_lr")

    @field_validator("data")
    @classmethod
    def _corpus_name(cls, value: str | None) -> str | None:
        if value is not None:
            from nas.data.corpus import check_spec  # here: it imports torch, which `nas transcribe` never does

            try:
                check_spec(value)
            except UserError as exc:
                raise ValueError(exc.why) from None
        return value


def load_schedule(name_or_path: str | Path) -> Schedule:
    """A built-in schedule by name (``proxy``, ``full``, ``demo``, ``tiny``) or a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCHEDULES / f"{name_or_path}.yaml"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in SCHEDULES.glob("*.yaml")))
            raise UserError("--schedule", "", f"no schedule named {str(name_or_path)!r} (built in: {names}; or a .yaml path)")
    doc = read_yaml(path)
    try:
        return Schedule.model_validate(doc)
    except ValidationError as exc:
        raise user_error(str(path), exc) from None


@dataclass(frozen=True)
class Rungs:
    """Rungs at ``multiples`` of the base proxy's steps, and the share ``1/eta`` of a rung that goes on.

    The default, 2x, 4x and 9x, is what ``nas bench search`` measured best against a fixed proxy as
    long as the last rung (60 min on 2 cores, 2026-12-05): 16 designs evaluated against 6, and the
    same best design. A design costs 600 steps, a third of them 600 more, and a ninth 1,500 more:
    967 steps on average against 2,700, at most 2.8x in steady state. Dev loss ranks designs at
    Kendall tau 0.809, 0.899 and 0.854 after those 600, 1,200 and 2,700 steps (``nas bench
    fidelity``). Rejected: a first rung at 1x (tau 0.629), which stopped after 300 steps the design
    the fixed proxy found best (a deep one that starts slower); 3x and 9x (11 designs in the hour,
    bounded at 1.8x); 2x and 9x (11), and there ``eta`` 4 (8): at a rung of a few designs, the two
    ends of its (signal, bytes) front lead MOASHA's order and go on whatever ``eta`` is."""

    multiples: tuple[int, ...] = (2, 4, 9)
    eta: int = 3

    @property
    def tag(self) -> str:
        """``asha2-4-9`` (``asha2-9-eta4`` at another eta): names what was trained under these rungs
        (schedules, benchmark studies)."""
        eta = "" if self.eta == Rungs.eta else f"-eta{self.eta}"
        return f"asha{'-'.join(map(str, self.multiples))}{eta}"

    def steps(self, base: Schedule) -> tuple[int, ...]:
        return tuple(base.steps * m for m in self.multiples)

    def schedule(self, base: Schedule) -> Schedule:
        """The proxy stretched to the last rung: the same recipe, ``multiples[-1]`` times as many
        steps (its learning rate decays over all of them), evaluated every base proxy's steps (so
        at every rung, and a curve comparable across rungs settings)."""
        return base.model_copy(update={
            "name": f"{base.name}-{self.tag}", "steps": base.steps * self.multiples[-1], "eval_every": base.steps})
