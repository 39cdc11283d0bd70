"""The export's model card (``README.md``): ``templates/model_card.md.j2`` filled in from the design
and the provenance :func:`nas.export.write_export` gathered (sizes, accuracy, decoding, storage at
the deployment dtype, the measurements of the deployment path)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

import jinja2

from nas.config import ArchConfig
from nas.describe import layer_map, sharing_in_words
from nas.measure import MEMORY_SECONDS


def model_card(name: str, arch: ArchConfig, prov: dict, onnx_size: int) -> str:
    """The export's README.md: ``templates/model_card.md.j2`` filled in from the design and ``prov``."""
    b, run = prov["bytes"], prov.get("run", {})
    dtype, onnx_file = prov.get("dtype", "fp32"), prov.get("onnx_file")
    sizes = [("physical parameters (stored)", f"{prov['physical_params']:,}"),
             ("virtual parameters (every use)", f"{prov['virtual_params']:,}"),
             ("weights at fp32 / bf16 / int8 (budget arithmetic)", f"{b['fp32']:,} / {b['bf16']:,} / {b['int8']:,} B"),
             ("MACs per second of audio", f"{prov['macs_per_second'] / 1e6:.1f} M"),
             ("model.onnx", f"{onnx_size:,} B at {dtype}")]
    if onnx_file:
        f = onnx_file
        sizes += [(f"weights in model.onnx ({f['stored_tensors']} stored tensors)",
                   f"{f['weights']:,} B: {f['difference']:+,} B ({f['difference_share']:+.2%}) against the arithmetic"),
                  ("quantization scales and zero points", f"{f['quantization_params']:,} B"),
                  ("BatchNorm statistics (float32, outside the budget)", f"{f['buffers']:,} B"),
                  ("graph constants; graph and names", f"{f['constants']:,} B; {f['graph_and_names']:,} B")]
    wers = [(k.replace("_", " "), f"{v:.3f}" if isinstance(v, float) else str(v))
            for k, v in prov.items() if "wer" in k.lower() and not isinstance(v, dict)]
    if prov.get("proxy_value") is not None:  # the search's proxy signal (dev CER, WER or a loss), named
        wers.insert(0, (f"proxy {prov['proxy_signal'].replace('_', ' ')}", f"{prov['proxy_value']:.3f}"))
    wers += [(f"this run, {k.replace('_', ' ')}", f"{v:.3f}") for k, v in run.items() if k.endswith(("_wer", "_cer"))]
    shown = ("bytes", "features", "run", "physical_params", "virtual_params", "macs_per_second", "onnx_file",
             "quantization", "decoder", "deployment", "proxy_signal", "proxy_value")
    given = [(k, json.dumps(v)) for k, v in prov.items() if k not in shown and "wer" not in k.lower()]
    given += [(f"run {k}", str(v)) for k, v in run.items() if not k.endswith(("_wer", "_cer"))]
    return _card_template().render(
        name=name, label=prov.get("label"), sharing=sharing_in_words(arch), layer_map=layer_map(arch),
        enc=arch.encoder, frontend=arch.frontend, vocab=arch.vocab_size, sizes=sizes, wers=wers, provenance=given,
        feat=prov["features"], tokenizer_sha256=prov["tokenizer_sha256"], dtype=dtype,
        storage=_storage_text(dtype, prov.get("quantization")), decoding=_decoding_text(prov.get("decoder")),
        has_lm=bool(prov.get("decoder")), deployment=_deployment_rows(prov.get("deployment"), dtype, prov),
    )


def _storage_text(dtype: str, q: dict | None) -> str:
    """The card's words on how model.onnx stores the weights and computes the activations."""
    text = f"`model.onnx` holds the weights at **{dtype}**"
    if not q:
        return text + ", as trained. Each stored tensor is one initializer under its `model.safetensors` key."
    text += f": {q['weights']}. Activations: {q['activations']}"
    cal = q.get("calibration")
    if cal:
        text += (f", calibrated on {cal['utterances']} training utterances ({cal['seconds']:.0f} s of "
                 f"`{cal['data']}`, spread evenly over its training manifest; {cal['method']}). Static rather than "
                 "dynamic activation scales: an int8 neural processor runs integer kernels with fixed scales and "
                 "cannot compute an activation's range at run time, so this is the error the device makes")
    node = "DequantizeLinear" if dtype == "int8" else "Cast"
    return (text + f". Each stored tensor is one initializer under its `model.safetensors` key, read through one "
                   f"{node} node: a tensor shared by several layers is stored, and scaled, once.")


def _decoding_text(decoder: dict | None) -> str:
    """The card's words on the decoding: the LM directory and the beam settings, or greedy."""
    if not decoder:
        return "Greedy CTC: the run decoded greedily, so the export has no lexicon or LM."
    lm = decoder.get("lm") or {}
    source = ", ".join(f"{k} {lm[k]}" for k in ("order", "smoothing", "sentences", "words", "source") if k in lm)
    tuned = f", tuned on {decoder['tuned_on']}" if "tuned_on" in decoder else ""
    return (f"`lm/` holds the beam search's lexicon (`lexicon.txt`, every training word spelled in the tokenizer's "
            f"pieces), its classes (`tokens.txt`) and a word n-gram LM (`lm.arpa`{': ' + source if source else ''}). "
            f"Beam search settings{tuned}: beam {decoder['beam']}, {decoder['beam_tokens']} classes per frame, "
            f"threshold {decoder['beam_threshold']}, LM weight {decoder['lm_weight']}, word score "
            f"{decoder['word_score']}. `nas transcribe` uses them (flashlight-text's lexicon decoder with KenLM); "
            "`--greedy` decodes greedily instead.")


def _deployment_rows(d: dict | None, dtype: str, prov: dict) -> dict | None:
    """What the card shows of the measurements: a table of fp32 against the dtype, and notes."""
    if not d:
        return None
    from nas.conditions import markdown_tables

    dts = ["fp32"] + ([dtype] if dtype != "fp32" else [])
    rows = []
    for dec in ("greedy", "beam"):
        for m in ("wer", "cer"):
            if all(dec in d["accuracy"].get(dt, {}) for dt in dts):
                label = f"test {m.upper()} ({'greedy' if dec == 'greedy' else 'beam + lexicon + LM'})"
                diff = d["difference"].get(dec, {}).get(m)
                rows.append([label, *(f"{d['accuracy'][dt][dec][m]:.2%}" for dt in dts)]
                            + ([f"{100 * diff:+.2f} points"] if dtype != "fp32" else []))
    rows.append(["real-time factor, one CPU thread", *(f"{d['rtf'][dt]:.4f}" for dt in dts)]
                + ([""] if dtype != "fp32" else []))
    mem = d["activation_memory"]
    rows.append([f"peak activation memory, {MEMORY_SECONDS:g} s utterance", *(_mb(mem[dt].get("bytes")) for dt in dts)]
                + ([""] if dtype != "fp32" else []))
    weights = prov.get("onnx_file", {}).get("weights")
    act = mem[dtype].get("bytes")
    return {
        "table": "\n".join("| " + " | ".join(r) + " |" for r in [
            ["", *dts] + (["difference"] if dtype != "fp32" else []), ["---"] * (len(dts) + (dtype != "fp32") + 1),
            *rows]),
        "test": d["test"], "decoding": d["decoding"], "rtf_how": d["rtf_how"], "rtf_features": d["rtf_features"],
        "memory_how": mem[dtype].get("method") or mem[dtype].get("why", ""),
        "device_total": None if weights is None or act is None else f"{_mb(weights)} of weights + {_mb(act)} of "
                                                                  f"activations = {_mb(weights + act)}",
        "robustness": markdown_tables(d["robustness"]["table"]), "robustness_from": d["robustness"]["conditions_from"],
    }


def _mb(n: int | None) -> str:
    return "not measured" if n is None else f"{n / 1e6:.2f} MB"


@cache
def _card_template() -> jinja2.Template:
    text = (resources.files("nas") / "templates" / "model_card.md.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True, autoescape=False)
    return env.from_string(text)
