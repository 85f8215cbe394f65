"""Speech quality of a run's answers, from the WAVs ``reempathy run --speech`` wrote.

- ``options``: the option models (light; imported when the evaluators register)
- ``answer``: an item's WAV read, or the one-line reason it has none
- ``stats``: ``audio-stats``: duration, silence share, clipping share, RMS loudness (no model)
- ``asr``: ``asr-wer``: a local Whisper transcribes; WER and CER against the spoken text (jiwer)
- ``tiny``: a tiny random Whisper directory saved by transformers, for tests and demos
"""
