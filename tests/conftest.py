"""Shared fixtures: a tiny real corpus synthesized once per test session."""

from pathlib import Path

import pytest

from nas.config import ArchConfig

TINY_ARCH = {"frontend": {"channels": 8}, "vocab_size": 40,
             "encoder": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 2, "conv_kernel": 7}}


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> Path:
    from nas.data import synth

    return synth.build(tmp_path_factory.mktemp("synth"), hours=0.03, dev_utterances=8, test_utterances=8,
                       progress=False)


@pytest.fixture()
def tiny_arch() -> ArchConfig:
    return ArchConfig.from_dict(TINY_ARCH)
