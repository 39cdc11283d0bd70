"""`ArchConfig`: the one contract between search, training and export.

An `ArchConfig` describes a Conformer-CTC recognizer and how it reuses its weights, at the four
levels of Hernandez et al. 2023 (arXiv 2303.08343):

1. ``sharing.blocks``: which stored block each *virtual* layer runs (``sequence`` AABBCC,
   ``cycle`` ABCABC, ``cycle_rev`` ABCCBA, or an explicit list).
2. ``sharing.modules``: per module kind (``ffn``, ``attn``, ``conv``), which stored blocks share
   one module instance. The map runs over stored blocks, so it can only be coarser than level 1.
3. ``sharing.ties``: sub-components tied inside a module (the two macaron feed-forward halves,
   attention's query/key projections, attention's value/output projections, the two GLU halves
   of the convolution module's first pointwise layer).
4. ``sharing.low_rank``: per matrix family a rank (``W = U·V``), and sharing of the factors across
   module instances in groups (``U``, ``V`` or both).

``sharing.per_layer_cheap`` keeps norms and biases unshared per virtual layer.

The config is frozen, validated (every error names its field) and round-trips through JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from nas.errors import UserError
from nas.files import atomic_write, read_json

SCHEMA_VERSION = 1

Pattern = Literal["sequence", "cycle", "cycle_rev"]
Kind = Literal["ffn", "attn", "conv"]
Family = Literal["ffn_in", "ffn_out", "attn_qkv", "attn_out", "conv_pw"]
FAMILIES: tuple[str, ...] = ("ffn_in", "ffn_out", "attn_qkv", "attn_out", "conv_pw")
KINDS: tuple[str, ...] = ("ffn", "attn", "conv")
FAMILY_KIND = {"ffn_in": "ffn", "ffn_out": "ffn", "attn_qkv": "attn", "attn_out": "attn", "conv_pw": "conv"}
PosInt = Annotated[int, Field(gt=0)]
# The front end's convolutions by subsampling factor: (kernel, stride) of each, in time and
# frequency alike, without padding.
CONV_STACKS = {4: ((3, 2), (3, 2)), 6: ((3, 2), (5, 3)), 8: ((3, 2), (3, 2), (3, 2))}
# Relative distances (in encoder frames) past which ``encoder.rel_pos_buckets`` tells no more apart:
# T5's 128; at 4x subsampling, 5.1 s.
REL_POS_MAX_DISTANCE = 128


class Frozen(BaseModel):
    """A validated, immutable config (designs here, schedules in :mod:`nas.schedule`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Fields added after designs or schedules were stored (in studies, run keys, exports, committed
    # benchmark runs): left out of the serialization at their default, so that every design and
    # schedule of before serializes, and hashes, exactly as it did (a study resumes onto its own
    # trials, a benchmark reads its runs back). Reading one without such a field gives the default.
    _added_later: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_later_defaults(self, handler):
        out = handler(self)
        for name in self._added_later:
            if getattr(self, name) == type(self).model_fields[name].default:
                out.pop(name, None)
        return out


class Tiling(Frozen):
    """A map of ``length`` positions onto ``n`` stored items by a named pattern."""

    pattern: Pattern
    n: PosInt


# A sharing map: a named tiling, or an explicit list (position -> stored item id).
SharingMap = Tiling | tuple[Annotated[int, Field(ge=0)], ...]


def resolve_map(m: SharingMap | None, length: int) -> tuple[int, ...]:
    """The item id used at each of ``length`` positions. ``None`` means no sharing.

    ``cycle_rev`` follows Takase & Kiyono 2021: cycle through the items, and run the last
    ``n`` positions in reverse order (ABC ABC CBA for 9 positions on 3 items).
    """
    if m is None:
        return tuple(range(length))
    if not isinstance(m, Tiling):
        if len(m) != length:
            raise ValueError(f"explicit map has {len(m)} entries, expected {length}")
        return tuple(m)
    n = m.n
    if n > length:
        raise ValueError(f"{n} stored items for {length} positions: some would never be used")
    if m.pattern == "sequence":
        return tuple(i * n // length for i in range(length))
    if m.pattern == "cycle":
        return tuple(i % n for i in range(length))
    head = n * (-(-length // n) - 1)  # positions before the final reversed run
    return tuple(i % n if i < head else n - 1 - (i - head) % n for i in range(length))


class FrontEnd(Frozen):
    """Log-mel input and the convolutional subsampling in time and frequency: 4x is two 3x3
    stride-2 Conv2d (torchaudio's and ESPnet's), 6x a 3x3 stride-2 then a 5x5 stride-3 one, 8x
    three 3x3 stride-2 ones; each with ReLU, then a linear projection to ``d_model``. 6x and 8x
    leave 16.7 and 12.5 frames per second: too few for characters, so they go with subword units
    (a larger ``vocab_size`` and a ``unigram`` or ``bpe`` tokenizer)."""

    n_mels: PosInt = 80
    channels: PosInt = 64
    subsampling: Literal[4, 6, 8] = 4


class Encoder(Frozen):
    d_model: PosInt = 144
    n_heads: PosInt = 4
    ffn_dim: PosInt = 576
    conv_kernel: PosInt = 31
    n_layers: PosInt = 16  # virtual layers
    # Relative positions in self-attention: 0, none (torchaudio's Conformer, whose attention sees no
    # position); n, a learned bias per head and relative-distance bucket added to the attention
    # logits (T5's bidirectional buckets, n/4 exact distances each way, then log-spaced up to
    # REL_POS_MAX_DISTANCE frames), stored with the attention module (n_heads x n parameters).
    rel_pos_buckets: int = Field(0, ge=0)
    _added_later: ClassVar[tuple[str, ...]] = ("rel_pos_buckets",)

    @model_validator(mode="after")
    def _check(self) -> Encoder:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
        if self.rel_pos_buckets and (self.rel_pos_buckets < 4 or self.rel_pos_buckets % 2):
            raise ValueError(f"rel_pos_buckets={self.rel_pos_buckets} must be 0 (no relative positions) or an even "
                             "number of at least 4 (half for each direction)")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel={self.conv_kernel} must be odd (same-length padding)")
        return self


class ModuleMaps(Frozen):
    """Level 2: per module kind, a map over *stored blocks* to module instances."""

    ffn: SharingMap | None = None
    attn: SharingMap | None = None
    conv: SharingMap | None = None


class Ties(Frozen):
    """Level 3: sub-components tied inside a module (the weight matrices; biases stay separate)."""

    ffn_macaron: bool = False  # second feed-forward half reuses the first one's matrices
    attn_qk: bool = False  # key projection = query projection
    attn_v_out: bool = False  # output projection = value projection
    conv_glu: bool = False  # both GLU halves of the first pointwise layer use one matrix


class LowRank(Frozen):
    """Level 4 for one matrix family: ``W (out×in) = U (out×rank) · V (rank×in)``.

    ``share`` names the factors shared across module instances, within ``groups`` contiguous
    groups of instances (``groups=1``: one basis for all instances).
    """

    rank: PosInt | None = None  # None: full rank, a plain weight matrix
    share: Literal["none", "U", "V", "UV"] = "none"
    groups: PosInt = 1


class LowRankFamilies(Frozen):
    ffn_in: LowRank = LowRank()
    ffn_out: LowRank = LowRank()
    attn_qkv: LowRank = LowRank()
    attn_out: LowRank = LowRank()
    conv_pw: LowRank = LowRank()


class Sharing(Frozen):
    blocks: SharingMap | None = None  # level 1: virtual layer -> stored block
    modules: ModuleMaps = ModuleMaps()
    ties: Ties = Ties()
    low_rank: LowRankFamilies = LowRankFamilies()
    per_layer_cheap: bool = False  # norms and biases unshared per virtual layer


class ArchConfig(Frozen):
    schema_version: Literal[1] = SCHEMA_VERSION
    frontend: FrontEnd = FrontEnd()
    encoder: Encoder = Encoder()
    vocab_size: PosInt = 64  # CTC output classes, blank included
    sharing: Sharing = Sharing()

    @model_validator(mode="after")
    def _check_sharing(self) -> ArchConfig:
        enc, sh = self.encoder, self.sharing
        fe = self.frontend
        least = next(n for n in range(1, 100) if _conv_stack_out(n, fe.subsampling) >= 1)
        if fe.n_mels < least:
            raise ValueError(f"frontend.n_mels must be at least {least} for the {fe.subsampling}x front end's "
                             "convolutions")
        try:
            blocks = resolve_map(sh.blocks, enc.n_layers)
        except ValueError as exc:
            raise ValueError(f"sharing.blocks: {exc}") from None
        if sorted(set(blocks)) != list(range(len(set(blocks)))):
            raise ValueError(f"sharing.blocks: ids must be 0..n-1 with none missing, got {sorted(set(blocks))}")
        n_blocks = len(set(blocks))
        for kind in KINDS:
            try:
                inst = resolve_map(getattr(sh.modules, kind), n_blocks)
            except ValueError as exc:
                raise ValueError(f"sharing.modules.{kind}: {exc} (maps run over the {n_blocks} stored blocks)") from None
            if sorted(set(inst)) != list(range(len(set(inst)))):
                raise ValueError(f"sharing.modules.{kind}: ids must be 0..n-1 with none missing")
        d, f = enc.d_model, enc.ffn_dim
        max_rank = {"ffn_in": min(d, f), "ffn_out": min(d, f), "attn_qkv": d, "attn_out": d, "conv_pw": d}
        for fam in FAMILIES:
            lr: LowRank = getattr(sh.low_rank, fam)
            where = f"sharing.low_rank.{fam}"
            if lr.rank is not None and lr.rank > max_rank[fam]:
                raise ValueError(f"{where}.rank: {lr.rank} exceeds min(out, in) = {max_rank[fam]}")
            if lr.rank is None and lr.share != "none":
                raise ValueError(f"{where}.share: factors can only be shared when a rank is set")
            n_inst = self.n_instances(FAMILY_KIND[fam])
            if lr.groups > n_inst:
                raise ValueError(f"{where}.groups: {lr.groups} groups for {n_inst} {FAMILY_KIND[fam]} instances")
        qkv, out = sh.low_rank.attn_qkv, sh.low_rank.attn_out
        if sh.ties.attn_v_out and (qkv.rank, qkv.share, qkv.groups) != (out.rank, out.share, out.groups):
            raise ValueError(
                "sharing.ties.attn_v_out: value and output projections differ in shape or factor sharing "
                f"(attn_qkv {qkv.rank=}, {qkv.share=}, {qkv.groups=} vs attn_out {out.rank=}, {out.share=}, {out.groups=})"
            )
        return self

    # Derived maps: what each virtual layer uses. Pure functions of the config.
    def block_map(self) -> tuple[int, ...]:
        return resolve_map(self.sharing.blocks, self.encoder.n_layers)

    def instance_map(self, kind: str, blocks: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """Module instance of ``kind`` used by each virtual layer (``blocks``: the block map)."""
        blocks = blocks or self.block_map()
        inst = resolve_map(getattr(self.sharing.modules, kind), len(set(blocks)))
        return tuple(inst[b] for b in blocks)

    def n_instances(self, kind: str) -> int:
        return len(set(self.instance_map(kind)))

    # JSON round trip.
    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> ArchConfig:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise user_error(source, exc) from None

    @classmethod
    def load(cls, path: str | Path) -> ArchConfig:
        """Load ``arch.json`` (a bare config, or an export's ``{"arch": ..., "provenance": ...}``)."""
        obj = read_json(path)
        if isinstance(obj, dict) and "arch" in obj and "provenance" in obj:
            obj = obj["arch"]
        return cls.from_dict(obj, source=str(path))

    @classmethod
    def from_dict(cls, obj: object, source: str = "<dict>", field: str = "") -> ArchConfig:
        """Validate ``obj``; an error names ``source`` and the field, under ``field`` if given."""
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            raise user_error(source, exc, prefix=field) from None

    def save(self, path: str | Path) -> None:
        atomic_write(path, self.to_json() + "\n")


def _conv_stack_out(n: int, factor: int) -> int:
    for k, s in CONV_STACKS[factor]:
        n = (n - k) // s + 1
    return n


def user_error(source: str, exc: ValidationError, prefix: str = "") -> UserError:
    """One pydantic error as one line: file, dotted field, reason.

    An unknown key is reported before any other error: a misspelt key is the likely cause of the
    missing one beside it.
    """
    err = min(exc.errors(), key=lambda e: e["type"] not in ("extra_forbidden", "invalid_key"))  # the first such
    loc = [p for p in err["loc"] if not _is_union_tag(p)]
    msg = " ".join(err["msg"].removeprefix("Value error, ").splitlines())
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    field = dotted(*([prefix] if prefix else []), *loc)
    if ": " in msg and msg.split(": ", 1)[0].startswith(("sharing.", "frontend.")):
        field, msg = msg.split(": ", 1)  # model-level checks name their own field
        field = ".".join(([prefix] if prefix else []) + [field])
    return UserError(source, field, msg)


def dotted(*parts: object) -> str:
    """A field's dotted path (``encoder.d_model``) for an error line; a part that is not
    printable text (a key holding a newline, say) shows as its repr, so the line stays one line."""
    return ".".join(p if p.isprintable() else repr(p) for p in map(str, parts))


def _is_union_tag(part: object) -> bool:
    # pydantic inserts the union member's name (e.g. "Tiling", "tuple[...]") into error paths
    return isinstance(part, str) and (part == "Tiling" or part.startswith("tuple["))
