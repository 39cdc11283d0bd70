"""The job a worker gets and the run directory it trains in."""

import json
import random

from nas.config import ArchConfig
from nas.schedule import load_schedule
from nas.workers import run_key

DESIGN = "search_spaces/designs/paper-style.json"


def shuffled(obj, rng):
    """The same JSON value with every object's keys in another order."""
    if isinstance(obj, dict):
        items = list(obj.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(obj, list):
        return [shuffled(v, rng) for v in obj]
    return obj


def test_the_run_key_does_not_depend_on_how_the_config_was_serialized():
    arch = ArchConfig.load(DESIGN)
    proxy = load_schedule("proxy")
    key = run_key(arch, proxy)
    doc = json.loads(arch.to_json())
    for seed in range(5):
        text = json.dumps(shuffled(doc, random.Random(seed)), indent=seed or None)
        assert run_key(ArchConfig.from_json(text), proxy) == key
    # defaults left out of the file are the same design, so the same run
    sparse = {k: v for k, v in doc.items() if k != "schema_version"}
    assert run_key(ArchConfig.from_dict(sparse), proxy) == key


def test_the_run_key_changes_with_the_design_or_the_schedule():
    arch = ArchConfig.load(DESIGN)
    proxy = load_schedule("proxy")
    other = ArchConfig.from_dict(json.loads(arch.to_json()) | {"vocab_size": arch.vocab_size + 1})
    keys = {run_key(arch, proxy), run_key(other, proxy), run_key(arch, load_schedule("full")),
            run_key(arch, proxy.model_copy(update={"seed": 1}))}
    assert len(keys) == 4 and all(len(k) == 16 for k in keys)


def test_a_schedule_field_added_later_keeps_the_run_keys_of_before():
    """``blank_bias``, ``inter_ctc`` and ``muon_lr`` came after runs were committed: at its default
    each is no part of the schedule's serialization, so the benchmark runs of `full` as it was then
    (`full-v2` since 2026-12-07) are found under the keys they were trained under (their directories'
    names); set, it is another run."""
    from pathlib import Path

    from nas.baselines import baselines
    from nas.bench.learn import SPACE, _evaluated, _key
    from nas.budget import parse_budget
    from nas.space import load_space

    arch = dict(baselines(load_space(SPACE), parse_budget("1M")))["unshared"]
    full = load_schedule("full-v2").model_copy(update={"name": "full"})  # `full` until 2026-12-07
    later = {"blank_bias", "inter_ctc", "muon_lr"}
    assert not later & full.model_dump().keys() and full.blank_bias == full.inter_ctc == full.muon_lr == 0.0
    key = _key(arch, _evaluated(full, 3000, 100), "synth")
    assert key == "406cf729" and (Path(__file__).parents[1] / f"results/bench-learn/unshared-full-{key}").is_dir()
    for field, value in (("blank_bias", 3.7), ("inter_ctc", 0.3), ("muon_lr", 8e-3)):
        changed = full.model_copy(update={field: value})
        assert changed.model_dump()[field] == value and run_key(arch, changed) != run_key(arch, full)
