"""Search-space files: loading, validation with named keys, realizing designs."""

import random
from pathlib import Path

import optuna
import pytest
import yaml

from nas.budget import count
from nas.errors import UserError
from nas.space import Choice, IntRange, load_space, parse_space

PAPER = "search_spaces/paper.yaml"


def test_paper_space_spans_all_four_levels():
    space = load_space(PAPER)
    names = {k.name for k in space.knobs}
    assert {"sharing.blocks.pattern", "sharing.modules.conv.n", "sharing.ties.attn_qk",
            "sharing.low_rank.ffn_in.rank", "sharing.per_layer_cheap"} <= names
    assert space.budget.max_params == 1_000_000


def test_values_realize_a_design_with_conditional_knobs():
    space = load_space(PAPER)
    chosen = {"frontend.channels": 32, "encoder.d_model": 128, "encoder.ffn_dim": 2, "encoder.conv_kernel": 15,
              "$blocks": 4, "$repeats": 3, "sharing.blocks.pattern": "cycle_rev",
              "$share_ffn": False, "$share_attn": False, "$share_conv": True,
              "sharing.modules.conv.pattern": "cycle", "sharing.modules.conv.n": 1,
              "sharing.ties.ffn_macaron": False, "sharing.ties.attn_qk": True, "sharing.ties.conv_glu": False,
              "$lr_ffn": True, "sharing.low_rank.ffn_in.rank": 32, "sharing.low_rank.ffn_in.share": "U",
              "sharing.low_rank.ffn_out.share": "none", "$lr_attn": False, "$lr_conv": False,
              "sharing.per_layer_cheap": True}
    arch = space.from_values(chosen)
    assert arch.encoder.n_layers == 12 and arch.encoder.ffn_dim == 256
    assert arch.block_map() == (0, 1, 2, 3, 0, 1, 2, 3, 3, 2, 1, 0)
    assert arch.instance_map("conv") == (0,) * 12
    assert arch.sharing.low_rank.ffn_out.rank == 32  # a ref to ffn_in's rank
    assert arch.sharing.low_rank.attn_qkv.rank is None  # its knob was not active


def test_optuna_samples_only_active_knobs():
    space = load_space(PAPER)
    knobs = yaml.safe_load(Path(PAPER).read_text())["knobs"]
    conditional = {k: v for k, v in knobs.items()
                   if isinstance(v, dict) and "when" in v and ("choice" in v or "int" in v)}
    assert len(conditional) >= 10
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        arch = space.sample(trial)
        # Every sampled knob with a `when` (read from the file itself) is a parameter of the trial
        # exactly when each knob it names holds one of the listed values.
        for name, spec in conditional.items():
            holds = all(trial.params.get(k, object()) in (v if isinstance(v, list) else [v])
                        for k, v in spec["when"].items())
            assert (name in trial.params) == holds, (name, trial.params)
        assert arch.encoder.n_layers == trial.params["$blocks"] * trial.params["$repeats"]
        assert count(arch).physical > 0
        study.tell(trial, 0.0)


def bad(tmp_path, text: str) -> str:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        load_space(p)
    return e.value.line().replace(str(p), "space.yaml")


@pytest.mark.parametrize("text, line", [
    ("knobs: {encoder.depth: 3}", "error: space.yaml: knobs.encoder.depth: unknown knob"),
    ("knobs: {encoder.d_model: {choice: []}}", "error: space.yaml: knobs.encoder.d_model.choice: must be a non-empty list"),
    ("knobs: {encoder.n_layers: {int: [8, 2]}}", "error: space.yaml: knobs.encoder.n_layers.int: low 8 is above high 2"),
    ("knobs: {encoder.n_layers: {int: [2, 8], stride: 2}}", "error: space.yaml: knobs.encoder.n_layers.stride: unknown key"),
    ("knobs: {encoder.n_layers: {int: [2, $x]}}", "error: space.yaml: knobs.encoder.n_layers.int: bound '$x' names no earlier knob"),
    ("budget: 4XB@int9\nknobs: {encoder.n_layers: 4}", "error: space.yaml: budget: budget '4XB@int9'"),
    ("knobs: [1, 2", "error: space.yaml: line 1: YAML syntax error"),
    ("knob: {}", "error: space.yaml: knob: unknown key"),
    ("knobs: {}", "error: space.yaml: knobs: must be a non-empty mapping"),
    ("knobs: {encoder.d_model: {choice: [96], when: {$a: 1}}}", "error: space.yaml: knobs.encoder.d_model.when: '$a' names no earlier knob"),
    # Each kind of spec takes only its own keys: step and log belong to int.
    ("knobs: {encoder.d_model: {choice: [96], step: 2}}", "error: space.yaml: knobs.encoder.d_model.step: unknown key"),
    ("knobs: {encoder.d_model: {choice: [96], int: [1, 2]}}",
     "error: space.yaml: knobs.encoder.d_model: a knob spec needs exactly one of choice, int, ref"),
    ("knobs: {encoder.d_model: {times: 2}}", "error: space.yaml: knobs.encoder.d_model: a knob spec needs exactly one of"),
    ("knobs: {encoder.d_model: {choice: 96}}", "error: space.yaml: knobs.encoder.d_model.choice: must be a non-empty list"),
    ("knobs: {encoder.d_model: {choice: [96, [128]]}}",
     "error: space.yaml: knobs.encoder.d_model.choice.1: [128] is not a plain value"),
    ("knobs: {encoder.n_layers: {int: [2]}}", "error: space.yaml: knobs.encoder.n_layers.int: must be [low, high]"),
    ("knobs: {encoder.n_layers: {int: [2, 8.5]}}",
     "error: space.yaml: knobs.encoder.n_layers.int.1: bound 8.5 is neither an integer nor a knob's name"),
    ("knobs: {encoder.n_layers: {int: [2, 8], step: 0}}", "error: space.yaml: knobs.encoder.n_layers.step: must be a positive integer"),
    ("knobs: {encoder.n_layers: {int: [2, 8], log: yes please}}", "error: space.yaml: knobs.encoder.n_layers.log: must be true or false"),
    ("knobs: {encoder.n_layers: {int: [2, 8], step: 2, log: true}}",
     "error: space.yaml: knobs.encoder.n_layers.log: a log scale takes step 1"),
    ("knobs: {encoder.n_layers: {int: [0, 8], log: true}}", "error: space.yaml: knobs.encoder.n_layers.log: a log scale needs low >= 1"),
    ("knobs: {$a: 2, encoder.n_layers: {ref: [$a]}}", "error: space.yaml: knobs.encoder.n_layers.ref: ['$a'] is not a knob's name"),
    ("knobs: {$a: 2, encoder.n_layers: {int: [1, 2], times: $b}}",
     "error: space.yaml: knobs.encoder.n_layers.times: '$b' names no earlier knob"),
    ("knobs: {$a: 2, encoder.n_layers: {int: [1, 2], when: [$a]}}",
     "error: space.yaml: knobs.encoder.n_layers.when: must map earlier knobs to allowed values"),
    ("knobs: {$a: 2, encoder.n_layers: {ref: $a, 7: 1}}", "error: space.yaml: knobs.encoder.n_layers.7: Keys should be strings"),
    # A name that would break the one-line error shows as its repr.
    ('knobs: {"$a\\nb": {choice: [1], ref: x}}', "error: space.yaml: knobs.'$a\\nb': a knob spec needs exactly one of"),
    ("name: [x]\nknobs: {encoder.n_layers: 4}", "error: space.yaml: name: Input should be a valid string"),
    ("3: x\nknobs: {encoder.n_layers: 4}", "error: space.yaml: 3: Keys should be strings"),
])
def test_bad_space_files_name_file_and_key(tmp_path, text, line):
    assert bad(tmp_path, text).startswith(line)


def test_fixed_values_are_validated_when_realized():
    space = parse_space({"knobs": {"encoder.n_heads": 5}}, "s.yaml")
    with pytest.raises(UserError, match="error: s.yaml: encoder: n_heads=5 does not divide d_model=144"):
        space.from_values({})


def test_values_are_checked_against_the_field_as_archconfig_reads_them():
    space = parse_space({"knobs": {"encoder.n_layers": 4, "sharing.blocks": [0, 1, 0, 1]}}, "s.yaml")
    assert space.from_values({}).sharing.blocks == (0, 1, 0, 1)  # a list where the field holds a tuple
    with pytest.raises(UserError, match=r"knobs\.sharing\.ties\.attn_qk\.choice: 3 is not a valid value .*\(bool\)"):
        parse_space({"knobs": {"sharing.ties.attn_qk": {"choice": [True, 3]}}}, "s.yaml")


@pytest.mark.parametrize("knobs, line", [
    ({"$b": {"int": [0, 0]}, "encoder.n_layers": {"int": [1, "$b"]}},
     "knobs.encoder.n_layers.int: low 1 is above high 0 (bounds filled in from earlier knobs)"),
    ({"$b": {"choice": ["x"]}, "encoder.n_layers": {"int": [1, "$b"]}},
     "knobs.encoder.n_layers.int: bound 'x' is not an integer"),
    ({"$b": {"choice": ["x"]}, "encoder.n_layers": {"choice": [2], "times": "$b"}},
     "knobs.encoder.n_layers.times: cannot multiply 2 by $b='x': both must be numbers"),
    ({"$a": {"choice": [1]}, "$b": {"choice": [3], "when": {"$a": 2}}, "encoder.n_layers": {"ref": "$b"}},
     "knobs.encoder.n_layers.ref: '$b' has no value here"),
])
def test_values_that_only_sampling_shows_wrong_name_the_knob(knobs, line):
    """What a spec names is checked when the file is read; what those knobs then hold, when a design
    is sampled: a wrong one is a UserError, from random draws and from Optuna alike."""
    space = parse_space({"knobs": knobs}, "s.yaml")
    with pytest.raises(UserError) as e:
        space.random(random.Random(0))
    assert e.value.line().startswith(f"error: s.yaml: {line}")
    with pytest.raises(UserError) as e:
        space.sample(optuna.create_study().ask())
    assert e.value.line().startswith(f"error: s.yaml: {line}")


def test_specs_are_models_and_when_lists_its_values():
    space = parse_space({"knobs": {"$a": {"int": [1, 4], "step": 3},
                                   "encoder.n_layers": {"choice": [2, 4], "when": {"$a": 4}, "times": "$a"}}}, "s.yaml")
    a, layers = (k.spec for k in space.knobs)
    assert isinstance(a, IntRange) and (a.bounds, a.step, a.log) == ((1, 4), 3, False)
    assert isinstance(layers, Choice) and layers.choice == (2, 4) and layers.when == {"$a": (4,)}
    # $a is 1 or 4; only at 4 is n_layers sampled (2 or 4, times 4); otherwise it keeps its default, 16
    assert {space.random(random.Random(seed)).encoder.n_layers for seed in range(30)} == {8, 16}


SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.mark.parametrize("name", sorted(p.name for p in SPACES.glob("*.yaml")))
def test_every_committed_space_samples_only_valid_designs(name):
    """A space whose knobs leave out a field ArchConfig requires (a module map's pattern, say)
    would spend its samples on invalid designs and never search the choices behind them."""
    space = load_space(SPACES / name)
    rng = random.Random(0)
    for _ in range(200):
        space.random(rng)  # raises UserError on a design ArchConfig refuses
