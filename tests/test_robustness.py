"""Robustness tables: manifests record conditions, WER is grouped by them, and the report shows a
table per condition for each retrained design."""

import json
import shutil

import optuna
import pytest
import torch

from conftest import TINY_ARCH
from nas.config import ArchConfig
from nas.data.features import FeatureSet
from nas.data.manifest import CONDITIONS, Utterance, manifest_digest, read_manifest, write_manifest
from nas.data.text import normalize
from nas.data.tokenizer import Tokenizer
from nas.errors import UserError
from nas.model import ConformerCTC
from nas.report import write_report
from nas.conditions import conditions_of, group_of, markdown_tables, robustness_table
from nas.report.robustness import TITLE, robustness, robustness_section


def test_groups_snr_bands_booleans_and_values():
    assert [group_of("snr_db", v) for v in (5, 9.99, 10, 19.5, 20, 30)] == \
        ["5–10 dB", "5–10 dB", "10–20 dB", "10–20 dB", "20–30 dB", "20–30 dB"]
    assert (group_of("snr_db", 2), group_of("snr_db", 35)) == ("under 5 dB", "over 30 dB")
    assert (group_of("reverb", True), group_of("reverb", False)) == ("reverberant", "dry")
    assert (group_of("telephone", True), group_of("telephone", False)) == ("telephone band", "full band")
    assert group_of("accent", "en-029") == "en-029"


def test_wer_per_group_of_each_condition_present():
    refs = {"a": "one two", "b": "three four", "c": "five six", "d": "seven eight"}
    hyps = {"a": "one two", "b": "three", "c": "five sex", "d": "seven eight"}
    conditions = {"a": {"snr_db": 25.0, "accent": "en-us", "reverb": False},
                  "b": {"snr_db": 7.0, "accent": "en-gb", "reverb": True},
                  "c": {"snr_db": 12.0, "accent": "en-gb", "reverb": True},
                  "d": {"snr_db": 29.0, "accent": "en-us"}}  # reverb not recorded: not in that table
    table = robustness_table(refs, hyps, conditions)
    assert table["all"] == {"wer": 2 / 8, "utterances": 4}
    assert list(table["snr_db"]) == ["5–10 dB", "10–20 dB", "20–30 dB"]  # bands in order
    assert table["snr_db"]["5–10 dB"] == {"wer": 0.5, "utterances": 1}
    assert table["snr_db"]["20–30 dB"] == {"wer": 0.0, "utterances": 2}
    assert table["accent"] == {"en-gb": {"wer": 0.5, "utterances": 2}, "en-us": {"wer": 0.0, "utterances": 2}}
    assert list(table["reverb"]) == ["dry", "reverberant"] and table["reverb"]["dry"]["utterances"] == 1
    assert "telephone" not in table and "noise" not in table  # no column for a field no row records
    md = markdown_tables(table)
    assert "| SNR | utterances | WER |" in md and "| en-gb | 2 | 50.0% |" in md


def test_manifests_carry_optional_conditions(tmp_path):
    rows = [Utterance("a", tmp_path / "a.wav", "hello", "s1", 1.0, accent="en-us", noise="pink", snr_db=12.5,
                      reverb=True, telephone=False),
            Utterance("b", tmp_path / "b.wav", "world")]
    write_manifest(tmp_path / "m.jsonl", rows)
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines[1] == {"id": "b", "audio": "b.wav", "text": "world", "speaker": ""}  # nothing unrecorded written
    back = read_manifest(tmp_path / "m.jsonl")
    assert back == rows
    assert back[0].conditions() == {"accent": "en-us", "noise": "pink", "snr_db": 12.5, "reverb": True,
                                    "telephone": False}
    assert back[1].conditions() == {}


@pytest.mark.parametrize("field, value, why", [
    ("snr_db", "loud", "must be a number"), ("snr_db", True, "must be a number"),
    ("reverb", "yes", "must be true or false"), ("telephone", 1, "must be true or false"),
    ("accent", 3, "must be a string"), ("noise", ["pink"], "must be a string")])
def test_a_condition_of_the_wrong_type_is_refused_in_one_line(tmp_path, field, value, why):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"audio": "a.wav", "text": "hi", field: value}) + "\n")
    with pytest.raises(UserError) as err:
        read_manifest(path)
    assert err.value.line() == f"error: {path}: line 1.{field}: {why}"
    assert set(CONDITIONS) == {"accent", "noise", "snr_db", "reverb", "telephone"}


def test_a_synth_corpus_made_before_conditions_were_recorded(tiny_corpus_dir, tmp_path):
    """Its manifests lack the fields; the conditions are drawn again from its done.json."""
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tiny_corpus_dir / "done.json", old / "done.json")
    rows = read_manifest(tiny_corpus_dir / "test.jsonl")
    write_manifest(old / "test.jsonl", [Utterance(r.id, r.audio, r.text, r.speaker, r.duration) for r in rows])
    found, source = conditions_of(old / "test.jsonl")
    assert found == {r.id: r.conditions() for r in rows} and "synth corpus's parameters" in source
    assert conditions_of(tiny_corpus_dir / "test.jsonl") == (found, "the test manifest")


@pytest.fixture(scope="module")
def run_dir(tiny_corpus_dir, tmp_path_factory):
    """An untrained tiny design's run directory (its WER does not matter here)."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    ConformerCTC(ArchConfig.from_dict(TINY_ARCH)).save(run / "model.safetensors")
    Tokenizer.train([r.text for r in read_manifest(tiny_corpus_dir / "train.jsonl")], 40, "char",
                    run / "tokenizer.model")
    (run / "metrics.json").write_text(json.dumps({"schedule": "none"}))
    return run


def rows_for(run_dir) -> list[dict]:
    row = {"number": 3, "label": None, "proxy_signal": "wer", "proxy_value": 0.9, "full_dev_wer": 0.8, "full_test_wer": 0.8,
           "full_test_cer": 0.5, "bytes": 100, "physical_params": 25, "arch": TINY_ARCH, "run_dir": str(run_dir)}
    gone = row | {"number": 0, "label": "unshared", "run_dir": str(run_dir.parent / "gone")}
    return [row, gone]


def test_each_retrained_design_gets_a_table_per_condition(run_dir, tiny_corpus_dir, tmp_path, monkeypatch):
    r = robustness(rows_for(run_dir), f"manifest:{tiny_corpus_dir}", tmp_path)
    table = r.tables["trial 3"]
    assert table["all"]["utterances"] == 8 and r.decoding["trial 3"] == "greedy"
    assert set(CONDITIONS) <= table.keys() and r.missing == ["trial 0 (unshared)"]
    md = robustness_section(r)
    for title in ("SNR", "accent", "noise colour", "reverberation", "telephone band"):
        assert f"**By {title}**" in md
    assert "| design | all (n=8) |" in md and "Not run (neither weights nor transcripts of this test set in their run directories): trial 0" in md
    # cached beside the report: a second report neither runs the model nor loads the features again
    monkeypatch.setattr(ConformerCTC, "load", lambda *a: pytest.fail("the model ran again"))
    monkeypatch.setattr(FeatureSet, "__init__", lambda *a, **k: pytest.fail("the test features were loaded"))
    assert robustness(rows_for(run_dir), f"manifest:{tiny_corpus_dir}", tmp_path).tables == r.tables


def test_no_weights_no_section_and_a_bad_corpus_says_why(run_dir, tmp_path):
    assert robustness([rows_for(run_dir)[1]], "synth", tmp_path) is None  # nothing resolved, nothing built
    r = robustness(rows_for(run_dir), f"manifest:{tmp_path / 'nowhere'}", tmp_path)
    assert r.why_not and "corpus directory not found" in robustness_section(r)


def test_the_report_has_the_robustness_section(run_dir, tiny_corpus_dir, tmp_path):
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.set_user_attr("settings", {"objectives": ["wer", "bytes"], "data": f"manifest:{tiny_corpus_dir}"})
    md = write_report(study, tmp_path, 1000, "fp32", retrained=rows_for(run_dir)).read_text()
    assert f"## {TITLE}" in md and "**By SNR**" in md
    assert (tmp_path / "robustness.json").is_file()


def test_a_run_whose_weights_are_gone_is_tabled_from_the_test_transcripts_its_trainer_kept(tiny_corpus_dir, tmp_path,
                                                                                          monkeypatch):
    """A retrain finished on another machine brings its metrics.json and test transcripts, not its
    weights (results/paper-1m commits the small files only). Its table is the one its weights give,
    with no features loaded, and the kept transcripts score the test WER its metrics record.
    Transcripts of another test manifest are not used."""
    import jiwer

    from nas.data.corpus import resolve_data
    from nas.schedule import load_schedule
    from nas.train import TEST_TRANSCRIPTS, train

    run, data = tmp_path / "run", f"manifest:{tiny_corpus_dir}"
    schedule = load_schedule("tiny").model_copy(update={"decode": "beam"})  # as `full` decodes
    metrics = train(ArchConfig.from_dict(TINY_ARCH), schedule, resolve_data(data), run, progress=False)
    kept = json.loads((run / TEST_TRANSCRIPTS).read_text())
    assert kept["decoding"] == "beam + lexicon + LM" and len(kept["hyps"]) == metrics["test"]["utterances"] == 8
    refs = {u.id: normalize(u.text) for u in read_manifest(tiny_corpus_dir / "test.jsonl")}
    assert kept["refs"] == refs and kept["manifest_sha256"] == manifest_digest(tiny_corpus_dir / "test.jsonl")
    assert jiwer.wer([refs[i] for i in kept["hyps"]], list(kept["hyps"].values())) == \
        pytest.approx(metrics["test"]["beam_wer"])
    rows = [rows_for(run)[0]]
    for report_dir in ("a", "b"):
        (tmp_path / report_dir).mkdir()
    (run / TEST_TRANSCRIPTS).rename(tmp_path / "aside.json")
    from_weights = robustness(rows, data, tmp_path / "a")
    (tmp_path / "aside.json").rename(run / TEST_TRANSCRIPTS)
    (run / "model.safetensors").unlink()
    monkeypatch.setattr(FeatureSet, "__init__", lambda *a, **k: pytest.fail("the test features were loaded"))
    kept_only = robustness(rows, data, tmp_path / "b")
    assert kept_only.missing == [] and kept_only.decoding == from_weights.decoding == {"trial 3": "beam + lexicon + LM"}
    assert kept_only.tables == from_weights.tables
    assert not (tmp_path / "b" / "robustness.json").exists()  # nothing was run, so nothing is cached
    (run / TEST_TRANSCRIPTS).write_text(json.dumps(kept | {"manifest_sha256": "another test set"}))
    assert robustness(rows, data, tmp_path / "b").missing == ["trial 3"]
