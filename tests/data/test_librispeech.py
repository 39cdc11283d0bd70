"""The LibriSpeech reader on a genuine utterance and on a larger layout built here."""

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from nas.data.librispeech import librispeech_splits, to_manifests
from nas.data.manifest import read_manifest
from nas.errors import UserError

FIXTURE = Path(__file__).parents[1] / "fixtures/librispeech"  # see ATTRIBUTION.md there
GENUINE_TEXT = (
    "IF THE READER WILL EXCUSE ME I WILL SAY NOTHING OF MY ANTECEDENTS NOR OF THE CIRCUMSTANCES "
    "WHICH LED ME TO LEAVE MY NATIVE COUNTRY THE NARRATIVE WOULD BE TEDIOUS TO HIM AND PAINFUL TO MYSELF"
)


@pytest.mark.parametrize("root", [FIXTURE, FIXTURE / "dev-clean-2"], ids=["corpus-root", "subset-dir"])
def test_genuine_utterance(root, tmp_path):
    manifests = to_manifests(root, tmp_path)
    assert manifests == {"dev-clean-2": tmp_path / "dev-clean-2.jsonl"}
    [row] = read_manifest(manifests["dev-clean-2"])
    flac = FIXTURE / "dev-clean-2/2412/153948/2412-153948-0000.flac"
    samples, sample_rate = sf.read(flac)  # decoded, independent of the header's frame count
    assert (len(samples), sample_rate) == (186_560, 16_000)
    assert row.id == "2412-153948-0000"
    assert row.audio.resolve() == flac.resolve()
    assert row.text == GENUINE_TEXT
    assert row.speaker == "2412"
    assert row.duration == len(samples) / sample_rate
    assert row.duration == pytest.approx(11.66)
    assert librispeech_splits(tmp_path) == {"dev": [manifests["dev-clean-2"]]}


def _build_layout(root: Path) -> dict[str, dict[str, tuple[str, str, int]]]:
    """Subsets of short noise flacs; returns subset → utterance id → (text, speaker, samples)."""
    rng = np.random.default_rng(0)
    layout = {
        "train-clean-100": {"19": ["198", "227"], "26": ["495"]},
        "train-other-500": {"20": ["205"]},
        "dev-clean": {"84": ["121123", "121550"]},
        "dev-other": {"116": ["288045"]},
        "test-clean": {"61": ["70968"]},
    }
    expected: dict[str, dict[str, tuple[str, str, int]]] = {}
    for subset, speakers in layout.items():
        expected[subset] = {}
        for speaker, chapters in speakers.items():
            for chapter in chapters:
                folder = root / subset / speaker / chapter
                folder.mkdir(parents=True)
                lines = []
                for u in range(3):
                    utt_id = f"{speaker}-{chapter}-{u:04d}"
                    text = f"WORD {subset.upper()} {speaker} {u} IT'S"
                    samples = int(rng.integers(800, 4000))
                    sf.write(folder / f"{utt_id}.flac", rng.uniform(-0.5, 0.5, samples), 16_000)
                    lines.append(f"{utt_id} {text}")
                    expected[subset][utt_id] = (text, speaker, samples)
                (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    # One line whose flac is missing: skipped and counted.
    chapter = root / "train-clean-100/19/198"
    with (chapter / "19-198.trans.txt").open("a") as f:
        f.write("19-198-0099 NO AUDIO FOR THIS LINE\n")
    return expected


def test_layout_with_subsets_and_a_missing_flac(tmp_path, caplog):
    expected = _build_layout(tmp_path / "LibriSpeech")
    out = tmp_path / "manifests"
    with caplog.at_level(logging.INFO, logger="nas.data.librispeech"):
        manifests = to_manifests(tmp_path / "LibriSpeech", out)

    assert manifests == {subset: out / f"{subset}.jsonl" for subset in expected}
    for subset, utterances in expected.items():
        rows = read_manifest(manifests[subset])
        assert [r.id for r in rows] == sorted(utterances)
        for row in rows:
            text, speaker, samples = utterances[row.id]
            assert (row.text, row.speaker) == (text, speaker)
            assert row.duration == samples / 16_000
            assert row.audio.is_file()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "19-198-0099.flac" in warnings[0].getMessage()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    summaries = {message.split(":")[0]: message for message in infos}
    assert "9 utterances, 1 skipped" in summaries["train-clean-100"]
    assert "6 utterances, 0 skipped" in summaries["dev-clean"]

    assert librispeech_splits(out) == {
        "train": [out / "train-clean-100.jsonl", out / "train-other-500.jsonl"],
        "dev": [out / "dev-clean.jsonl"],
        "test": [out / "test-clean.jsonl"],
    }


def test_splits_fall_back_to_the_first_subset_by_name(tmp_path):
    for name in ("dev-other", "dev-clean-2", "test-other"):
        (tmp_path / f"{name}.jsonl").write_text("")
    assert librispeech_splits(tmp_path) == {
        "dev": [tmp_path / "dev-clean-2.jsonl"],
        "test": [tmp_path / "test-other.jsonl"],
    }
    with pytest.raises(UserError, match="no subset manifest"):
        librispeech_splits(tmp_path / "nothing-here")


def test_bad_roots_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="LibriSpeech directory not found"):
        to_manifests(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty/dev-clean").mkdir(parents=True)
    with pytest.raises(UserError, match="no LibriSpeech transcript"):
        to_manifests(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()
