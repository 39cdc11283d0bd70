"""Robustness: test WER by recording condition (SNR band, accent, noise colour, reverberation,
telephone band), for each retrained design.

The conditions come from the test manifest's optional condition fields
(:data:`nas.data.manifest.CONDITIONS`): a table gets a column per group of each field present.
The embedded corpus records them; for a synth corpus made before its manifests did, they are drawn
again from its parameters (:func:`nas.data.synth.conditions`).

- :func:`nas.conditions.robustness_table` groups any per-utterance hypotheses by condition;
- :func:`robustness` reads each retrained design's test hypotheses as its trainer kept them
  (``test_transcripts.json``), else computes them (its weights on the test features, decoded as
  its run decoded: beam search with its LM when it has one, else greedy), cached in
  ``robustness.json`` beside the report;
- :func:`robustness_section` writes the report's section.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from nas.conditions import TITLES, conditions_of, percent, robustness_table
from nas.data.manifest import CONDITIONS, manifest_digest
from nas.errors import UserError
from nas.files import atomic_write
from nas.report.document import _escape, _table

CACHE = "robustness.json"
MAX_FRAMES = 20_000  # log-mel frames per batch when the designs are run on the test set


# ---- the retrained designs ------------------------------------------------------------------

@dataclass
class Robustness:
    """Per design (``"trial N (label)"``), its robustness table and decoding."""

    tables: dict[str, dict] = field(default_factory=dict)
    decoding: dict[str, str] = field(default_factory=dict)
    source: str = ""  # where the conditions come from
    test: str = ""  # the test manifest
    missing: list[str] = field(default_factory=list)  # retrained designs whose weights are gone
    why_not: str | None = None  # why nothing was measured


def design_name(row: dict) -> str:
    return f"trial {row['number']}" + (f" ({row['label']})" if row.get("label") else "")


def robustness(rows: list[dict], data: str | None, out_dir: Path) -> Robustness | None:
    """Robustness tables of the retrained ``rows`` (``retrained.json``) on the test split of corpus
    ``data``; None when no row has weights to run or test transcripts kept (nothing to say)."""
    from nas.train import TEST_TRANSCRIPTS
    runs = [r for r in rows if r.get("run_dir") and any((Path(r["run_dir"]) / name).is_file()
                                                        for name in ("model.safetensors", TEST_TRANSCRIPTS))]
    if not runs:
        return None
    result = Robustness(missing=[design_name(r) for r in rows if r not in runs])
    if not data:
        result.why_not = "the study names no corpus"
        return result
    from nas.data.corpus import resolve_data

    try:
        corpus = resolve_data(data, progress=False)
        conditions, result.source = conditions_of(corpus.test)
    except UserError as exc:
        result.why_not = exc.line().removeprefix("error: ")
        return result
    result.test = str(corpus.test)
    cache_path = Path(out_dir) / CACHE
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    test_digest = manifest_digest(corpus.test)
    features: dict[int, object] = {}
    for row in runs:
        found = _kept(row, test_digest) or _run_weights(row, corpus, test_digest, features, cache)
        if found is None:  # its transcripts are of another test set, and its weights are gone
            result.missing.append(design_name(row))
            continue
        hyps, refs, decoding = found
        result.tables[design_name(row)] = robustness_table(refs, hyps, conditions)
        result.decoding[design_name(row)] = decoding
    if cache or cache_path.is_file():
        atomic_write(cache_path, json.dumps(cache) + "\n")
    return result


def _kept(row: dict, test_digest: str) -> tuple[dict, dict, str] | None:
    """The design's test hypotheses, references (by id) and decoding as its trainer kept them
    (``test_transcripts.json``, written as it scored the test set), when they are of this test set.
    A run trained on another machine keeps them when its weights did not come along."""
    from nas.train import TEST_TRANSCRIPTS

    kept = Path(row["run_dir"]) / TEST_TRANSCRIPTS
    if not kept.is_file():
        return None
    saved = json.loads(kept.read_text())
    if saved.get("manifest_sha256") != test_digest:  # scored on another test manifest
        return None
    return saved["hyps"], saved["refs"], saved["decoding"]


def _run_weights(row: dict, corpus, test_digest: str, features: dict, cache: dict) -> tuple[dict, dict, str] | None:
    """The design's test hypotheses, references and decoding from its weights run on the test
    features, decoded as its run decoded; from ``cache`` (updated here) when its weights, decoder
    settings and test manifest are those cached. None when its weights are gone."""
    import torch

    from nas.config import ArchConfig
    from nas.data.features import FeatureConfig, FeatureSet, bucket_batches, collate
    from nas.data.tokenizer import Tokenizer
    from nas.decode import BeamDecoder, BeamSettings, greedy_decode
    from nas.model import ConformerCTC

    run = Path(row["run_dir"])
    if not (run / "model.safetensors").is_file():
        return None
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    settings = metrics.get("decoder") if (run / "lm" / "lm.arpa").is_file() else None
    digest = hashlib.sha256((run / "model.safetensors").read_bytes())
    digest.update(test_digest.encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    key = digest.hexdigest()
    hit = cache.get(row["run_dir"])
    if hit and hit.get("key") == key:
        return hit["hyps"], hit["refs"], hit["decoding"]
    arch = ArchConfig.from_dict(row["arch"]) if row.get("arch") else ArchConfig.load(run / "arch.json")
    n_mels = arch.frontend.n_mels
    if n_mels not in features:
        features[n_mels] = FeatureSet(corpus.test, corpus.feature_cache, FeatureConfig(n_mels=n_mels))
    test = features[n_mels]
    model = ConformerCTC.load(arch, run / "model.safetensors").eval()
    tokenizer = Tokenizer.load(run / "tokenizer.model")
    decoder = None
    if settings:
        decoder = BeamDecoder(run / "lm", BeamSettings(**{k: settings[k] for k in (
            "beam", "beam_tokens", "beam_threshold", "lm_weight", "word_score")}))
    hyps = {}
    with torch.no_grad():
        for idx in bucket_batches(test.lengths, MAX_FRAMES, shuffle=False):
            batch = collate(test, idx, tokenizer)
            log_probs, lengths = model(batch.feats, batch.feat_lens)
            texts = decoder(log_probs, lengths) if decoder else greedy_decode(log_probs, lengths, tokenizer)
            hyps.update(zip(batch.ids, texts))
    refs = dict(zip(test.ids, test.texts))
    decoding = "beam + lexicon + LM" if decoder else "greedy"
    cache[row["run_dir"]] = {"key": key, "decoding": decoding, "hyps": hyps, "refs": refs}
    return hyps, refs, decoding


# ---- the report section ---------------------------------------------------------------------

TITLE = "Robustness by recording condition"


def robustness_section(r: Robustness) -> str:
    """Test WER of each retrained design per condition group: one table per condition field."""
    blocks = []
    if r.why_not:
        blocks.append(f"Not measured: {_escape(r.why_not)}.")
    elif not r.tables:
        blocks.append("Not measured: no retrained design has weights.")
    else:
        names = list(r.tables)
        decodings = sorted(set(r.decoding.values()))
        blocks.append(
            f"Test WER of each retrained design ({', '.join(decodings)} decoding, as its run decoded), by the "
            f"conditions of the test utterances, from {_escape(r.source)}. Each cell is the WER over the "
            "utterances of that group (n in the header); a small group's WER is noisy.")
        fields = [k for k in CONDITIONS if any(k in t for t in r.tables.values())]
        if not fields:
            blocks.append("The test manifest records no condition (accent, noise, snr_db, reverb, telephone).")
        for key in fields:
            groups: dict[str, int] = {}
            for t in r.tables.values():
                for g, cell in t.get(key, {}).items():
                    groups.setdefault(g, cell["utterances"])
            header = ["design", f"all (n={r.tables[names[0]]['all']['utterances']})",
                      *(f"{g} (n={n})" for g, n in groups.items())]
            rows = [[_escape(name), percent(t["all"]["wer"]), *(percent(t.get(key, {}).get(g, {}).get("wer"))
                                                               for g in groups)] for name, t in r.tables.items()]
            blocks.append(f"**By {TITLES[key]}**\n\n" + _table(header, rows))
    if r.missing:
        blocks.append("Not run (neither weights nor transcripts of this test set in their run directories): "
                      f"{_escape(', '.join(r.missing))}.")
    return "\n\n".join([f"## {TITLE}", *blocks])
