"""A ctypes binding to libespeak-ng (the library ``espeakng_loader`` ships), for :mod:`nas.data.synth`.

Only what the corpus needs: synchronous synthesis into memory, with a voice, rate, pitch,
intonation and a seed for the library's random generators. libespeak-ng keeps global state
between utterances, so a process should hold one :class:`Espeak` at most.
"""

from __future__ import annotations

import ctypes

import espeakng_loader
import numpy as np

ESPEAK_RATE = 22_050  # the sample rate libespeak-ng synthesizes at

# espeak-ng's API constants (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS, _POS_CHARACTER, _CHARS_UTF8 = 2, 1, 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
    """libespeak-ng loaded into this process, synthesizing synchronously into memory at 22.05 kHz.

    ``say(text, voice, rate, pitch, intonation, seed)`` returns the speech as float32 samples.

    Args (of ``say``):
        text: what to say, plain UTF-8 text.
        voice: an espeak-ng voice name, optionally with a variant: ``"en-us"``, ``"en+m3"``.
        rate: words per minute.
        pitch: 0–100, around the voice's own pitch.
        intonation: the pitch range, 0 (monotone) to 100.
        seed: for espeak-ng's own random generator and libc's ``rand()``, which it also draws from.

    Raises:
        RuntimeError: the library does not load, or a call fails.
    """

    def __init__(self):
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
        data = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if rate != ESPEAK_RATE:
            raise RuntimeError(f"espeak_Initialize returned {rate}, expected the sample rate {ESPEAK_RATE}")
        self._lib, self._libc = lib, ctypes.CDLL(None)
        self._pieces: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept referenced: the library calls it
        lib.espeak_SetSynthCallback(self._callback)

    def say(self, text: str, voice: str, rate: int, pitch: int, intonation: int, seed: int) -> np.ndarray:
        """``text`` in ``voice`` at this rate, pitch and intonation: float32 ``(samples,)`` at 22.05 kHz."""
        _check("espeak_SetVoiceByName", self._lib.espeak_SetVoiceByName(voice.encode()))
        for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, intonation)):
            _check("espeak_SetParameter", self._lib.espeak_SetParameter(param, value, 0))
        # espeak-ng draws noise from its own generator and from libc's rand()
        self._lib.espeak_ng_SetRandSeed(seed)
        self._libc.srand(seed)
        data = text.encode("utf-8") + b"\0"
        self._pieces = []
        _check("espeak_Synth", self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None))
        if not self._pieces:
            raise RuntimeError(f"espeak-ng made no audio for {text!r} in voice {voice}")
        return np.concatenate(self._pieces).astype(np.float32) / 32768

    def _collect(self, samples, count: int, events) -> int:
        """The synthesis callback: keep a copy of each piece of audio; 0 means go on."""
        if count > 0:
            self._pieces.append(np.ctypeslib.as_array(samples, (count,)).copy())
        return 0


def _check(call: str, status: int) -> None:
    """Raise if a libespeak-ng call did not return EE_OK (0)."""
    if status != 0:
        raise RuntimeError(f"{call} failed with espeak-ng status {status}")
